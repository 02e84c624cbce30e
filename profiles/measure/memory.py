"""Memory table: time of one memory-bound elementwise kernel per size, what the cost model prices norms,
activations, residuals, softmax and the optimizer with.

The kernel is y = x + 1 out of place (torch.add(x, 1, out=y)) in the profile's main dtype on the device:
it reads one tensor and writes another of the same size, so bytes = read + written = 2 x tensor bytes.
All sizes are views of one pair of buffers (the largest size, or on CPU at least twice the L3).

Robust to load: each size's time is the MINIMUM over every timed call of `cfg.mem_rounds` passes over all
sizes (alternately ascending and descending), not a median of back-to-back calls. A bandwidth is a
hardware limit, and calls spread over the whole run cannot all be slowed by a burst of other work.
The median of the same calls is kept (column median_s) to show how loaded the machine was.

Operands come from memory, as a real step's do (they were evicted since they were written): on GPU the L2
is flushed before each call for sizes below twice its size, on CPU each call works on the next slice of
buffers that span twice the L3; larger sizes stream past the cache anyway. Each size's first call in a pass
is an untimed warm-up."""

from __future__ import annotations

import itertools
import statistics
from typing import Callable

import pandas as pd
import torch

from profiles.measure import (MeasureConfig, MeasureError, MemoryPoint, TimingConfig, last_level_cache_bytes, time_op,
                              torch_dtype)
from profiles.table import TABLE_COLUMNS

COLUMNS = TABLE_COLUMNS["memory"] + ["median_s"]


def measure_memory(cfg: MeasureConfig, points: list[MemoryPoint], on_point: Callable[[tuple], None] | None = None,
                   on_progress: Callable[[float], None] | None = None) -> pd.DataFrame:
    """One row (bytes, time_s = minimum, median_s) per point, in point order. The rows exist only once
    every pass is done (each is a minimum over all passes): on_point gets them at the end, on_progress
    the fraction of calls made after each (pass, size)."""
    if not points:
        return pd.DataFrame([], columns=COLUMNS)
    dt = torch_dtype(points[0].dtype)
    if any(p.dtype != points[0].dtype for p in points):
        raise MeasureError("measure_memory: all points must have one dtype; plan them with memory_points")
    item = torch.tensor([], dtype=dt).element_size()
    numels = [max(1, p.nbytes // (2 * item)) for p in points]
    # CPU: each call's operands at the next offset of buffers spanning twice the L3, so they come from memory
    # (as profiles.measure.cold_copies does for GEMMs); GPU: one pair, the L2 flushed instead
    cache = last_level_cache_bytes(cfg.device)
    span = max(max(numels), 2 * cache // item if cfg.device == "cpu" else 0)
    x = torch.empty(span, dtype=dt, device=cfg.device)
    y = torch.empty_like(x)
    x.fill_(1)  # touch every page: first-touch faults are not bandwidth
    y.fill_(0)
    samples: list[list[float]] = [[] for _ in points]
    order = list(range(len(points)))
    steps, done = cfg.mem_rounds * len(points), 0
    for r in range(cfg.mem_rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            k, slots = numels[i], span // numels[i]
            calls = itertools.count()

            def add(_: object, k: int = k, slots: int = slots, calls=calls) -> None:
                o = (next(calls) % slots) * k
                torch.add(x[o:o + k], 1.0, out=y[o:o + k])

            samples[i] += time_op(add, cfg.mem_timing, device=cfg.device, flush_l2=2 * k * item < 2 * cache)
            done += 1
            if on_progress:
                on_progress(done / steps)
    rows = [(2 * n * item, min(s), float(statistics.median(s))) for n, s in zip(numels, samples)]
    for row in rows:
        if on_point:  # the runner checkpoints each row
            on_point(row)
    return pd.DataFrame(rows, columns=COLUMNS)


# -- kernel kinds ---------------------------------------------------------------------------------------------------
# Eager PyTorch's elementwise kernels do not all stream at the table kernel's bandwidth: a product with an operand
# broadcast along tokens or hidden (a norm's statistic or weight, RoPE's cos/sin) or of two dtypes (the fp32 stream
# plus a bf16 branch), the fp32 log-softmax over the vocabulary, and strided copies (Q out of fused QKV rows,
# [heads, tokens] -> [tokens, heads]) run slower; measured once per profile, at one size past the cache, as each
# kind's bandwidth over the table kernel's on the same operands (profile constants memory_kind_<kind>; the cost model
# divides a kernel's bytes by its kind's ratio, costmodel/elementwise.py).
KIND_TIMING = TimingConfig(warmup=2, repeats=10, min_repeats=3, budget_s=1.0)
KIND_WIDTH = 4096
# log-softmax over a real vocabulary (Llama 3's): longer rows run slower (H200: 0.48-0.53 of the table's bandwidth
# at 128,256, 0.64 at 32,768), and on a GPU at least 8 rows per SM (one thread block a row) keep it busy
KIND_VOCAB = 128256


def kind_kernels(tokens: int, width: int, vocab: int, device: str) -> dict[str, tuple[str, Callable, int]]:
    """Each kind's kernel on fresh [tokens, width] operands: name -> (what, call, bytes read + written). The
    names after `table_add` are those bench/elementwise_kinds.py prints; KIND_OF_KERNEL maps them to the kinds."""
    bf, f32 = torch.bfloat16, torch.float32
    x32 = torch.randn(tokens, width, device=device, dtype=f32)
    x16 = x32.to(bf)
    w32 = torch.randn(width, device=device, dtype=f32)
    g16, u16 = torch.randn_like(x16), torch.randn_like(x16)
    heads = max(1, width // 128)
    qkv = torch.randn(tokens, 3 * width, device=device, dtype=bf)
    att = torch.randn(heads, tokens, 128, device=device, dtype=bf)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 0
    rows = max(1, tokens * width // vocab, 8 * sms)  # as many logits as one operand's elements, or every SM busy
    logits = torch.randn(rows, vocab, device=device, dtype=f32)
    n = tokens * width
    return {
        "table_add": ("y = x + 1, bf16 (the memory table's kernel)", lambda _: torch.add(x16, 1.0), 4 * n),
        "add_fp32": ("y = x + 1, fp32 (the eager residual stream)", lambda _: torch.add(x32, 1.0), 8 * n),
        "cast": ("fp32 -> bf16 (autocast at a GEMM)", lambda _: x32.to(bf), 6 * n),
        "silu_mul": ("silu(g) · u, bf16 (two kernels)", lambda _: torch.nn.functional.silu(g16) * u16, 10 * n),
        "cat3": ("cat of three [T, h] bf16", lambda _: torch.cat([g16, u16, x16], dim=1), 12 * n),
        "row_mean_sq": ("x.pow(2).mean(-1), fp32 (RMSNorm statistic, two kernels)",
                        lambda _: x32.pow(2).mean(-1, keepdim=True), 12 * n + 4 * tokens),
        "residual": ("fp32 stream + bf16 branch -> fp32", lambda _: x32 + g16, 10 * n),
        "bcast_mul": ("fp32 x · w[h] (norm weight)", lambda _: x32 * w32, 8 * n + 4 * width),
        "log_softmax": (f"log_softmax over rows of {vocab} fp32 logits", lambda _: torch.log_softmax(logits, -1),
                        rows * vocab * (4 + 4)),
        "qkv_slice_copy": ("Q out of fused QKV rows, bf16 (strided read)", lambda _: qkv[:, :width].contiguous(),
                           4 * n),
        "head_transpose": ("[H, T, D] -> [T, H, D] contiguous, bf16", lambda _: att.transpose(0, 1).contiguous(),
                           4 * heads * tokens * 128),
    }


KIND_OF_KERNEL = {"residual": "mixed", "bcast_mul": "broadcast", "log_softmax": "softmax",
                  "qkv_slice_copy": "strided", "head_transpose": "strided"}  # the rest stream as the table kernel


def kind_tokens(device: str, max_bytes: int | None = None) -> int:
    """Tokens of the kind operands: a [tokens, KIND_WIDTH] fp32 operand spans at least twice the cache, unless
    `max_bytes` (meshplan profile --max-bytes) caps it."""
    need = 2 * last_level_cache_bytes(device) // (4 * KIND_WIDTH)
    tokens = max(4096, 1 << max(0, need - 1).bit_length())
    return tokens if max_bytes is None else max(16, min(tokens, max_bytes // (4 * KIND_WIDTH)))


def measure_kinds(device: str, tokens: int | None = None, width: int = KIND_WIDTH, vocab: int = KIND_VOCAB,
                  timing: TimingConfig = KIND_TIMING) -> dict[str, tuple[str, int, float]]:
    """name -> (what, bytes, median seconds) of every kind_kernels entry, in its order."""
    kernels = kind_kernels(tokens or kind_tokens(device), width, vocab, device)
    return {name: (what, nbytes, float(statistics.median(time_op(call, timing, device=device))))
            for name, (what, call, nbytes) in kernels.items()}


def kind_constants(measured: dict[str, tuple[str, int, float]], device: str, main_dtype: str) -> dict[str, dict]:
    """Profile constants memory_kind_<kind>: each kind's bandwidth over the table kernel's (y = x + 1 in the profile's
    main dtype, as the memory table measures it); strided: the mean of its two copies."""
    ref = "add_fp32" if main_dtype == "fp32" else "table_add"
    table_bw = measured[ref][1] / measured[ref][2]
    ratios: dict[str, list[float]] = {}
    for name, kind in KIND_OF_KERNEL.items():
        ratios.setdefault(kind, []).append(measured[name][1] / measured[name][2] / table_bw)
    where = "CUDA events after an L2 flush" if device == "cuda" else "wall time"
    out = {}
    for k, v in ratios.items():
        names = ", ".join(n for n, kk in KIND_OF_KERNEL.items() if kk == k)
        out[f"memory_kind_{k}"] = {"value": round(float(statistics.mean(v)), 4), "unit": "x table bandwidth",
                                   "source": f"meshplan profile: {names} against {ref} (y = x + 1) on "
                                             f"{measured['table_add'][1] // 4:,}-element operands, median, {where}"}
    return out


def memory_kind_constants(device: str, main_dtype: str, max_bytes: int | None = None) -> dict[str, dict]:
    """Measure the kinds and return them as profile constants (`meshplan profile`, `meshplan machine-check`)."""
    return kind_constants(measure_kinds(device, kind_tokens(device, max_bytes)), device, main_dtype)
