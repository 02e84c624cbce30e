"""Micro-benchmarks that fill the Profile tables (profiles/table.py) on the machine they run on.

This module is torch-free at import time: it holds the measurement plan (which points each table
measures, `MeasureConfig`), the one timing helper every benchmark uses (`time_op`, which imports
torch when called) and the device fingerprint. The benchmarks themselves live in gemm.py,
attention.py, collectives.py (a torchrun worker), host_copy.py and memory.py; runner.py orchestrates
them.

Timing: warm-up calls, then repeated calls, median reported; on CPU the GEMM, attention and host-copy points are
timed in interleaved passes and keep the fastest pass's median (`in_passes`). On GPU each call is bracketed by
CUDA events after an L2 flush (a memset of twice the L2 size); on CPU by time.perf_counter, the GEMM
and memory benchmarks cycling through copies of their operands that span twice the L3, so each call
reads them from memory as a training step does.
The memory table instead reports the minimum over passes interleaved across its sizes: a bandwidth
is a hardware limit, and a minimum over calls spread in time stays clear of other processes' load.
Python's cyclic garbage collector is paused while anything is timed (`collector_paused`), as `timeit` does.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from profiles.table import ProfileError

P = TypeVar("P")  # a table's point type
KiB = 2**10
MiB = 2**20
GiB = 2**30

TABLES = ("gemm", "attention", "collective", "host_copy", "memory")  # measurement order
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
# Which profiled dtype is the main one (attention is measured in it alone): the first of these that
# the GEMM table holds, the same order the cost model and `runner.main_dtype` read a profile in.
# GEMM dtypes, main first. fp8 (E4M3, torch._scaled_mm) is only ever measured beside a main dtype: attention and
# every non-GEMM table stay in the main one
DTYPE_PREFERENCE = ("bf16", "fp16", "fp32", "fp8")
# CPU: passes over the GEMM, attention and host-copy points (MeasureConfig.passes). On a shared 2-core VM the
# host's speed moves by tens of percent between seconds: three single-pass quick profiles in a row differed point
# by point by 10% at the median and 33% at the 90th percentile (docs/BENCHMARKS.md, "Interleaved passes")
CPU_PASSES = 3
FP8_ALIGN = 16  # torch._scaled_mm (cuBLASLt fp8) needs every GEMM dimension a multiple of 16


class MeasureError(ProfileError):
    """A measurement could not run (bad option, worker failure, missing torch); one actionable line."""


def worker_env() -> dict[str, str]:
    """The environment of a torchrun worker this package starts: the tree holding `profiles` first on PYTHONPATH
    (installed or not), one thread per rank unless the caller's environment says otherwise (what torchrun would set;
    stated to silence its warning)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimingConfig:
    """How often one point is run."""

    warmup: int  # untimed calls first (lazy init, allocator, caches, autotuning)
    repeats: int  # timed calls at most; the median is reported
    min_repeats: int  # timed calls at least, whatever the budget
    budget_s: float  # stop adding repeats once this much time went into one point (inf: fixed count)

    def repeats_for(self, est_s: float) -> int:
        """Timed calls for a point whose call takes about est_s seconds."""
        if not math.isfinite(self.budget_s) or est_s <= 0:
            return self.repeats
        return max(self.min_repeats, min(self.repeats, int(self.budget_s / est_s)))


@dataclass(frozen=True)
class GemmPoint:
    m: int  # tokens (rows of A)
    n: int  # output features
    k: int  # input features
    dtype: str  # "bf16" | "fp16" | "fp32"

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


@dataclass(frozen=True)
class AttentionPoint:
    direction: str  # "fwd" | "bwd"
    causal: bool
    heads: int  # query heads
    kv_heads: int  # key/value heads (GQA)
    head_dim: int
    doc_len: int  # tokens per document
    docs: int  # documents per measured call
    dtype: str
    layout: str  # "varlen" (looked up by the cost model), "single" (one lone document), "docmask"


@dataclass(frozen=True)
class CollectiveCase:
    op: str  # one of OPS
    group_size: int  # ranks per group
    concurrent_groups: int  # groups running the op at the same time (interleaved: j, j + c, ...)
    nbytes: int  # requested S (nccl-tests convention); the worker rounds to whole elements per rank


@dataclass(frozen=True)
class HostCopyPoint:
    direction: str  # "h2d" | "d2h" on GPU, "memcpy" on CPU
    pinned: bool
    nbytes: int


@dataclass(frozen=True)
class MemoryPoint:
    nbytes: int  # requested bytes read + written by one elementwise kernel; rounded to whole elements
    dtype: str


@dataclass(frozen=True)
class MeasureConfig:
    """Everything that decides what a profile run measures; pure data, so it can be planned (and
    its run time estimated) without torch. Build it with `plan_config`."""

    device: str  # "cpu" | "cuda"
    quick: bool
    dtypes: tuple[str, ...]  # GEMM dtypes, main first (DTYPE_PREFERENCE order); attention: `attention_dtypes`
    timing: TimingConfig
    gemm_tokens: tuple[int, ...]  # m grid for the model shapes
    gemm_flop_cap: float  # skip GEMMs above this many FLOPs (time budget)
    gemm_generic_edges: tuple[int, ...]  # cube edges of the generic grid
    gemm_generic_nk: int  # also (m, nk, nk) for m in gemm_tokens
    model_shapes: tuple[tuple[str, int, int], ...]  # (label, n, k) from --models
    attn_heads: tuple[int, int]  # (query heads, KV heads)
    attn_head_dims: tuple[int, ...]
    attn_lengths: tuple[int, ...]  # document lengths, log grid
    attn_pack_tokens: int  # tokens per varlen call (FA3 benchmark convention on GPU: 16K)
    attn_docmask_lengths: tuple[int, ...]  # lengths also measured as one call with a document mask
    attn_single: bool  # also measure lone short documents (differs from varlen on GPU only)
    nproc: int  # ranks for the collective table
    coll_sizes: tuple[int, ...]  # S grid in bytes
    coll_group_sizes: tuple[int, ...]
    coll_timing: TimingConfig
    copy_sizes: tuple[int, ...]
    mem_sizes: tuple[int, ...]  # bytes read + written per elementwise kernel, x2 grid
    mem_rounds: int  # passes over all sizes; each size's time is the minimum over every pass
    mem_timing: TimingConfig  # calls of one size within one pass
    cpu_threads: int = 0  # torch threads for CPU compute (0: leave as is; GPU runs)
    # GEMM, attention and host-copy tables: passes over all the table's points (`in_passes`); a point's time is the
    # minimum over passes of each pass's median, so a slow spell of a shared host spoils one pass of a point, not it
    passes: int = 1

    @property
    def main_dtype(self) -> str:
        return self.dtypes[0]

    @property
    def attention_dtypes(self) -> tuple[str, ...]:
        """The main dtype, the one the cost model looks up (bf16 for bf16/fp16 runs); on a CPU whose bf16 is fast
        fp32 too: a CPU replay runs in fp32 unless told otherwise (`meshplan replay --dtype`), and its plans look
        up fp32 attention. A GPU's fp32 attention is not a training path (no flash kernel): never measured."""
        return self.dtypes if self.device == "cpu" else self.dtypes[:1]

    def key(self) -> dict[str, Any]:
        """The plan as JSON data: the partial file keeps it so a resumed run measures the same points."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["timing"] = vars(self.timing)
        d["coll_timing"] = vars(self.coll_timing)
        d["mem_timing"] = vars(self.mem_timing)
        return _jsonable(d)

    @classmethod
    def from_key(cls, d: dict[str, Any]) -> "MeasureConfig":
        """The inverse of `key` (JSON lists back to tuples)."""
        try:
            fields = {k: _tupled(d[k]) for k in cls.__dataclass_fields__}
            fields["timing"] = TimingConfig(**d["timing"])
            fields["coll_timing"] = TimingConfig(**d["coll_timing"])
            fields["mem_timing"] = TimingConfig(**d["mem_timing"])
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise MeasureError(f"measurement plan lacks or garbles {e}") from None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _pow2(lo: int, hi: int, step: int = 2) -> tuple[int, ...]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= step
    return tuple(out)


def plan_config(device: str, *, quick: bool, nproc: int, max_bytes: int | None = None,
                model_shapes: tuple[tuple[str, int, int], ...] = (), dtypes: tuple[str, ...] | None = None,
                mem_cap_bytes: int | None = None, model_head_dims: tuple[int, ...] = ()) -> MeasureConfig:
    """The grids for one device kind and mode. CPU grids are sized so the quick profile runs in a few
    minutes on 2 cores; GPU grids follow the issue (1 KiB..1 GiB, 16K-token attention calls). Attention is
    measured at head dims 64 and 128 and at each of `model_head_dims` (--models): a kernel's rate per FLOP
    depends on the head dim (on one CPU core SDPA at d = 16 runs 1.5-1.9x below its d = 64 rate)."""
    if device not in ("cpu", "cuda"):
        raise MeasureError(f"device must be 'cpu' or 'cuda', got {device!r}")
    gpu = device == "cuda"
    if dtypes is None:
        dtypes = ("bf16", "fp16", "fp32") if gpu else ("fp32",)
    unknown = [d for d in dtypes if d not in DTYPE_PREFERENCE]
    if unknown or not dtypes:
        raise MeasureError(f"dtypes must be some of {', '.join(DTYPE_PREFERENCE)}, got {list(dtypes)}")
    # Main dtype first whatever order was asked: a CPU with fast bf16 must time attention in bf16,
    # the dtype its GEMM table makes the cost model look up.
    dtypes = tuple(sorted(set(dtypes), key=DTYPE_PREFERENCE.index))
    if dtypes[0] == "fp8":
        raise MeasureError("fp8 GEMMs are measured beside a main dtype (bf16, fp16 or fp32), not alone")
    if gpu:
        timing = (TimingConfig(warmup=3, repeats=20, min_repeats=5, budget_s=0.2) if quick else
                  TimingConfig(warmup=5, repeats=50, min_repeats=10, budget_s=0.5))
        coll_timing = (TimingConfig(warmup=3, repeats=20, min_repeats=5, budget_s=math.inf) if quick else
                       TimingConfig(warmup=5, repeats=40, min_repeats=5, budget_s=math.inf))
    else:
        # Per pass (CPU_PASSES of them, interleaved): a descheduled call costs a whole time slice, which the
        # pass's median stays clear of; a slow spell of the host lasting seconds, which the minimum over passes does.
        timing = (TimingConfig(warmup=1, repeats=5, min_repeats=2, budget_s=0.1) if quick else
                  TimingConfig(warmup=1, repeats=10, min_repeats=3, budget_s=0.5))
        # A collective's row is the mean of its repeats (collectives.row_time_s), and gloo's times on a shared host
        # are heavy-tailed: with 15 repeats five quick tables of 4 ranks on the 2-core Xeon differed row by row by a
        # coefficient of variation of 0.25 at the median (0.47 at the 90th percentile), with 60 by 0.13 (0.28)
        coll_timing = (TimingConfig(warmup=1, repeats=60, min_repeats=3, budget_s=math.inf) if quick else
                       TimingConfig(warmup=2, repeats=100, min_repeats=3, budget_s=math.inf))
    default_bytes = (256 * MiB if quick else GiB) if gpu else (16 * MiB if quick else GiB)
    cap = min(max_bytes or default_bytes, mem_cap_bytes or 2**62)
    if cap < KiB:
        raise MeasureError(f"--max-bytes must be at least 1024, got {cap}")
    # Collective sizes: x2 on a full GPU run (protocol switches are sharp there), x4 otherwise.
    coll_sizes = _pow2(KiB, cap, 2 if gpu and not quick else 4)
    copy_sizes = _pow2(4 * KiB, cap, 4)
    # Memory-bound kernels: from 4 KiB (the launch floor) to well past the last-level cache (CPU L3,
    # GPU L2) by default; cheap per point, so a x2 grid even when quick.
    mem_cap = min(max_bytes or (256 * MiB if quick else GiB), mem_cap_bytes or 2**62)
    mem_sizes = _pow2(4 * KiB, mem_cap) or (mem_cap,)
    mem_rounds = 5 if quick else 10
    if gpu:
        mem_timing = (TimingConfig(warmup=1, repeats=10, min_repeats=3, budget_s=0.01) if quick else
                      TimingConfig(warmup=2, repeats=20, min_repeats=5, budget_s=0.02))
    else:
        mem_timing = (TimingConfig(warmup=1, repeats=10, min_repeats=2, budget_s=0.02) if quick else
                      TimingConfig(warmup=1, repeats=20, min_repeats=3, budget_s=0.05))
    head_dims = tuple(sorted({64, 128} | {int(d) for d in model_head_dims}))
    if nproc >= 2:
        group_sizes = (tuple(range(2, nproc + 1)) if not quick or nproc <= 4 else
                       tuple(sorted({g for g in _pow2(2, nproc)} | {nproc})))
    else:
        group_sizes = ()
    if gpu:
        return MeasureConfig(
            device=device, quick=quick, dtypes=tuple(dtypes), timing=timing,
            gemm_tokens=_pow2(256, 32768) if quick else _pow2(128, 131072),
            gemm_flop_cap=2e13 if quick else 1.2e14,
            gemm_generic_edges=_pow2(256, 16384) if quick else _pow2(128, 32768),
            gemm_generic_nk=4096, model_shapes=model_shapes,
            attn_heads=(32, 8), attn_head_dims=head_dims,
            attn_lengths=_pow2(256, 32768) if quick else _pow2(128, 131072),
            attn_pack_tokens=16384, attn_docmask_lengths=(), attn_single=True,
            nproc=nproc, coll_sizes=coll_sizes, coll_group_sizes=group_sizes, coll_timing=coll_timing,
            copy_sizes=copy_sizes, mem_sizes=mem_sizes, mem_rounds=mem_rounds, mem_timing=mem_timing)
    return MeasureConfig(
        device=device, quick=quick, dtypes=tuple(dtypes), timing=timing,
        gemm_tokens=_pow2(128, 4096) if quick else _pow2(64, 16384),
        gemm_flop_cap=4e9 if quick else 3e10,
        gemm_generic_edges=_pow2(128, 1024) if quick else _pow2(64, 2048),
        gemm_generic_nk=1024, model_shapes=model_shapes,
        # Fewer heads than a 7B layer: the rate per head is what the lookup uses (FLOPs scale with heads).
        attn_heads=(8, 2), attn_head_dims=head_dims,
        # Down to 16 tokens: one call per document has a fixed cost that short documents' FLOPs do not show.
        attn_lengths=_pow2(16, 2048) if quick else _pow2(16, 4096),
        attn_pack_tokens=2048 if quick else 4096,
        attn_docmask_lengths=(128, 512) if quick else (64, 256, 1024),
        attn_single=False,  # the CPU varlen path already runs one call per document
        nproc=nproc, coll_sizes=coll_sizes, coll_group_sizes=group_sizes, coll_timing=coll_timing,
        copy_sizes=copy_sizes, mem_sizes=mem_sizes, mem_rounds=mem_rounds, mem_timing=mem_timing,
        # One thread, as each torchrun rank of the CPU runtime has (OMP_NUM_THREADS=1): the tables
        # then give per-rank compute, and a descheduled OpenMP thread cannot stall a parallel region.
        cpu_threads=1, passes=CPU_PASSES)


def gemm_points(cfg: MeasureConfig) -> list[GemmPoint]:
    """Model shapes x token grid, then the generic grid; each (m, n, k, dtype) once. At least the two
    smallest m of a model shape are kept past the FLOP cap, since the lookup needs two points."""
    seen: dict[tuple, GemmPoint] = {}

    def add(m: int, n: int, k: int, dt: str, force: bool = False) -> None:
        p = GemmPoint(m, n, k, dt)
        # fp32 on a GPU runs without tensor cores (~1/15 of bf16): cap its FLOPs to match in time.
        cap = cfg.gemm_flop_cap / (16 if cfg.device == "cuda" and dt == "fp32" else 1)
        if dt == "fp8" and (m % FP8_ALIGN or n % FP8_ALIGN or k % FP8_ALIGN):
            return
        if (force or p.flops <= cap) and (m, n, k, dt) not in seen:
            seen[(m, n, k, dt)] = p

    for dt in cfg.dtypes:
        for _, n, k in cfg.model_shapes:
            for i, m in enumerate(cfg.gemm_tokens):
                add(m, n, k, dt, force=i < 2)
        for e in cfg.gemm_generic_edges:
            add(e, e, e, dt)
        for m in cfg.gemm_tokens:
            add(m, cfg.gemm_generic_nk, cfg.gemm_generic_nk, dt)
    return list(seen.values())


def attention_points(cfg: MeasureConfig) -> list[AttentionPoint]:
    hq, hkv = cfg.attn_heads
    pts = []
    for dt in cfg.attention_dtypes:
        for hd in cfg.attn_head_dims:
            for s in cfg.attn_lengths:
                docs = max(1, cfg.attn_pack_tokens // s)
                layouts = ["varlen"]
                if cfg.attn_single and docs > 1:
                    layouts.append("single")
                if s in cfg.attn_docmask_lengths and docs > 1 and hd == max(cfg.attn_head_dims):
                    layouts.append("docmask")
                # varlen also without the mask: a context-parallel ring step's block of another member's keys
                # is a full rectangle (costmodel.timing prices it at the non-causal rate)
                cases = [(layout, True) for layout in layouts] + [("varlen", False)]
                for layout, causal in cases:
                    for direction in ("fwd", "bwd"):
                        pts.append(AttentionPoint(direction, causal, hq, hkv, hd, s,
                                                  1 if layout == "single" else docs, dt, layout))
    return pts


def collective_cases(cfg: MeasureConfig, world: int) -> list[CollectiveCase]:
    """Each op x group size x {one group, as many disjoint groups as fit} x size."""
    out = []
    for op in OPS:
        for g in cfg.coll_group_sizes:
            if g > world:
                continue
            for conc in sorted({1, world // g}):
                for s in cfg.coll_sizes:
                    out.append(CollectiveCase(op, g, conc, s))
    return out


def collective_timing(cfg: MeasureConfig, nbytes: int) -> TimingConfig:
    """Same repeat count on every rank (decided by size, never by a local clock): big messages get
    fewer repeats so a full run stays within minutes."""
    budget_bytes = 64 * GiB if cfg.device == "cuda" else GiB
    t = cfg.coll_timing
    reps = max(t.min_repeats, min(t.repeats, budget_bytes // max(nbytes, 1)))
    return TimingConfig(warmup=t.warmup, repeats=reps, min_repeats=reps, budget_s=math.inf)


def host_copy_points(cfg: MeasureConfig) -> list[HostCopyPoint]:
    if cfg.device == "cpu":
        return [HostCopyPoint("memcpy", False, s) for s in cfg.copy_sizes]
    return [HostCopyPoint(d, pinned, s) for d in ("h2d", "d2h") for pinned in (True, False)
            for s in cfg.copy_sizes]


def memory_points(cfg: MeasureConfig) -> list[MemoryPoint]:
    """One elementwise kernel per size, in the main dtype (the one the cost model prices the step in)."""
    return [MemoryPoint(s, cfg.main_dtype) for s in cfg.mem_sizes]


# ---- timing ----------------------------------------------------------------------------------

_L2_FLUSH: dict[str, Any] = {}


def last_level_cache_bytes(device: str) -> int:
    """The cache a timed call's operands could stay in between calls: the GPU's L2, or the CPU's last level
    (sysfs; 32 MiB when unknown, an EPYC CCX's L3)."""
    if device == "cuda":
        import torch
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 50 * MiB))
    best = (0, 32 * MiB)
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(root):
            with open(f"{root}/{d}/level") as f:
                level = int(f.read())
            with open(f"{root}/{d}/size") as f:
                text = f.read().strip().upper()
            mult = {"K": KiB, "M": MiB, "G": GiB}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * mult
            best = max(best, (level, size))
    except (OSError, ValueError):
        pass
    return best[1]


def _l2_flush_buffer() -> Any:
    """A GPU buffer twice the L2: writing it evicts the previous call's operands."""
    if "cuda" not in _L2_FLUSH:
        import torch
        _L2_FLUSH["cuda"] = torch.empty(max(2 * last_level_cache_bytes("cuda"), 8 * MiB), dtype=torch.uint8,
                                        device="cuda")
    return _L2_FLUSH["cuda"]


def cores_constant() -> dict[str, Any]:
    """The profile constant `cores_per_node`: the CPU cores this process may run on, which the ranks of a node
    share (costmodel.timing.compute_share_of)."""
    return {"value": len(os.sched_getaffinity(0)), "unit": "cores",
            "source": "measured: CPU cores this process may run on (sched_getaffinity)"}


def cold_copies(operand_bytes: int, device: str, cap: int = 64) -> int:
    """How many copies of a call's operands a CPU benchmark cycles through so that each call reads them from
    memory, as a training step does (a layer's inputs were written long before): enough to span twice the
    last-level cache. A flush between calls would also evict the framework's own code and data and add tens of
    microseconds to every call; GPUs flush their L2 in time_op instead (1 here)."""
    if device == "cuda":
        return 1
    return max(1, min(cap, -(-2 * last_level_cache_bytes(device) // max(1, operand_bytes))))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a timed region, as `timeit` times its statements. A full collection
    walks every object the process holds: 23-95 ms over a collective worker's 200,000 on the 2-core Xeon, landing in
    a timed call of a millisecond; all ranks of a torchrun job reach it at nearly the same allocation count.
    Tensors are still freed when their last reference goes; only reference cycles wait for the collection that
    follows the region."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_op(fn: Callable[[Any], object], timing: TimingConfig, *, device: str = "cpu",
            setup: Callable[[], Any] | None = None, flush_l2: bool = True) -> list[float]:
    """Seconds of each timed call of fn(setup()). setup runs before every call, outside the timed
    window (a barrier, a fresh forward graph); on GPU so does the L2 flush unless flush_l2 is False (CPU
    benchmarks cycle through copies of their operands instead, `cold_copies`). The first warm-up call's time
    sets the repeat count within the budget, unless the budget is infinite: collectives need the same count on
    every rank. The collector is paused throughout (setup's barriers included: a rank collecting after its barrier
    would stall the others' timed collective)."""
    setup = setup or (lambda: None)
    gpu = device == "cuda"
    if gpu:
        import torch
        flush = _l2_flush_buffer() if flush_l2 else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        arg = setup()
        if gpu:
            if flush is not None:
                flush.zero_()
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn(arg)
        return time.perf_counter() - t0

    est = 0.0
    with collector_paused():
        for i in range(timing.warmup):
            t = once()
            est = t if i == 0 else min(est, t)
        return [once() for _ in range(timing.repeats_for(est))]


def median(samples: list[float]) -> float:
    return float(statistics.median(samples))


def in_passes(points: list[P], passes: int, time_point: Callable[[P], tuple[float, Any]],
              on_done: Callable[[int, float, Any], None] | None = None,
              on_progress: Callable[[float], None] | None = None) -> list[tuple[float, Any]]:
    """(seconds, detail) per point: `time_point` gives one pass's (median, detail); passes go over every point,
    alternately ascending and descending, and a point keeps its fastest pass: other work on the host only ever adds
    time, and a slow spell lasting seconds hits some passes of a point, rarely all (three quick CPU profiles in a
    row differed point by point by 2.4% median, 7.9% at the 90th percentile, against 9.8% and 33% in one pass; the
    middle pass gave 2.6% and 20%). on_done(i, seconds, detail) gets a point once it is final: as soon as it is
    timed with one pass, after the last pass with several."""
    seen: list[list[tuple[float, Any]]] = [[] for _ in points]
    order = list(range(len(points)))
    done = 0
    for r in range(passes):
        for i in (order if r % 2 == 0 else order[::-1]):
            seen[i].append(time_point(points[i]))
            done += 1
            if passes == 1 and on_done:
                on_done(i, *seen[i][0])
            if on_progress:
                on_progress(done / (passes * len(points)))
    kept = [min(s, key=lambda x: x[0]) for s in seen]
    if passes > 1 and on_done:
        for i, (t, detail) in enumerate(kept):
            on_done(i, t, detail)
    return kept


# ---- fingerprint -----------------------------------------------------------------------------

def cpu_model_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_device_name() -> str:
    """This host as a CPU profile's fingerprint names its device: 'cpu: <model> (<n> cores)'."""
    return f"cpu: {cpu_model_name()} ({os.cpu_count() or 0} cores)"


def cpu_vector_isa() -> str | None:
    """The x86 kernels torch's CPU dispatch picks on this host, as a profile's `cpu_capability` records them
    (torch.backends.cpu.get_cpu_capability, without importing torch): ATEN_CPU_CAPABILITY where it names one, else
    as ATen's dispatch decides: 'AVX512' with AVX-512 VL, BW and DQ and FMA, 'AVX2' with AVX2 and FMA, else
    'DEFAULT'; None where /proc/cpuinfo has no x86 flags (another OS or ISA). A virtual CPU's model name can hide its
    generation ('AMD EPYC'); its vector units tell them apart."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").upper()
    if forced in ("DEFAULT", "AVX2", "AVX512"):
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return None
    flags = set(line.partition(":")[2].split())
    if not flags & {"sse2", "avx", "avx2"}:
        return None
    if {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "AVX512"
    return "AVX2" if {"avx2", "fma"} <= flags else "DEFAULT"


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_fingerprint(device: str) -> tuple[str, dict[str, str]]:
    """(device description, software versions) for the Fingerprint. Imports torch."""
    import torch

    versions = {"torch": torch.__version__, "python": platform.python_version(),
                "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
                "torch_threads": str(torch.get_num_threads())}
    try:
        from importlib.metadata import version
        versions["meshplan"] = version("meshplan")
    except Exception:  # noqa: BLE001 -- not installed: leave it out
        pass
    cores = os.cpu_count() or 0
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        versions["cuda"] = str(torch.version.cuda)
        try:
            versions["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 -- torch built without NCCL
            versions["nccl"] = "unavailable"
        versions["gpus"] = str(torch.cuda.device_count())
        try:
            import flash_attn  # noqa: F401
            versions["flash_attn"] = flash_attn.__version__
        except ImportError:
            pass
        return f"{name} (host cpu: {cpu_model_name()}, {cores} cores)", versions
    versions["cuda"] = "none"
    versions["nccl"] = "none"
    return cpu_device_name(), versions


def torch_dtype(name: str) -> Any:
    import torch
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}[name]
    except KeyError:
        raise MeasureError(f"unknown dtype {name!r}; one of {', '.join(DTYPE_PREFERENCE)}") from None
