"""GEMM table: time of C[m,n] = A[m,k] @ B[k,n] per (m, n, k, dtype), with a preallocated output
so the allocator stays out of the timing."""

from __future__ import annotations

import itertools
from typing import Callable

import pandas as pd
import torch

from profiles.measure import (GemmPoint, MeasureConfig, TimingConfig, cold_copies, in_passes, median, time_op,
                              torch_dtype)
from profiles.table import TABLE_COLUMNS


def time_gemm(p: GemmPoint, timing: TimingConfig, device: str) -> float:
    """Median seconds of one (m×k)·(k×n) product (fp8: E4M3 operands with per-tensor scales, bf16 output)."""
    if p.dtype == "fp8":
        return median(time_op(_scaled_mm_fn(p, device), timing, device=device))
    dt = torch_dtype(p.dtype)
    n = cold_copies((p.m * p.k + p.k * p.n + p.m * p.n) * torch.tensor([], dtype=dt).element_size(), device)
    ops = [(torch.randn(p.m, p.k, dtype=dt, device=device), torch.randn(p.k, p.n, dtype=dt, device=device),
            torch.empty(p.m, p.n, dtype=dt, device=device)) for _ in range(n)]
    calls = itertools.count()

    def mm(_: object) -> None:
        a, b, c = ops[next(calls) % n]  # CPU: operands cold in cache (cold_copies)
        torch.mm(a, b, out=c)

    return median(time_op(mm, timing, device=device))


def _scaled_mm_fn(p: GemmPoint, device: str) -> Callable[[object], torch.Tensor]:
    """torch._scaled_mm as Transformer Engine calls cuBLASLt: A row-major, B column-major (B's transpose stored)."""
    fp8 = torch_dtype("fp8")
    a = torch.randn(p.m, p.k, device=device).to(fp8)
    b = torch.randn(p.n, p.k, device=device).to(fp8).t()
    one = torch.ones((), dtype=torch.float32, device=device)
    return lambda _: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def fp8_supported(device: str) -> bool:
    """Whether this torch runs fp8 GEMMs on the device: torch._scaled_mm and, on CUDA, compute capability 8.9+
    (Ada, Hopper, Blackwell)."""
    if not (hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")):
        return False
    return device != "cuda" or torch.cuda.get_device_capability() >= (8, 9)


def measure_gemm(cfg: MeasureConfig, points: list[GemmPoint], on_point: Callable[[tuple], None] | None = None,
                 on_progress: Callable[[float], None] | None = None) -> pd.DataFrame:
    """One row per point, in point order, timed in `cfg.passes` interleaved passes (profiles.measure.in_passes);
    on_point gets each row once it is final (the runner checkpoints it)."""
    def row(p: GemmPoint, t: float) -> tuple:
        return p.m, p.n, p.k, p.dtype, t

    best = in_passes(points, cfg.passes, lambda p: (time_gemm(p, cfg.timing, cfg.device), None),
                     (lambda i, t, _: on_point(row(points[i], t))) if on_point else None, on_progress)
    return pd.DataFrame([row(p, t) for p, (t, _) in zip(points, best)], columns=TABLE_COLUMNS["gemm"])


def dtype_rate_flops(dtype: str, device: str, edge: int = 512) -> float:
    """Achieved FLOP/s of one edge³ product: the probe that decides whether a dtype is worth
    profiling on this device (bf16 on CPUs without native bf16 runs ~100x below fp32)."""
    t = time_gemm(GemmPoint(edge, edge, edge, dtype), TimingConfig(1, 3, 3, float("inf")), device)
    return 2.0 * edge**3 / t
