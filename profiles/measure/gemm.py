"""GEMM table: time of C[m,n] = A[m,k] @ B[k,n] per (m, n, k, dtype), with a preallocated output
so the allocator stays out of the timing."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from profiles.measure import GemmPoint, MeasureConfig, TimingConfig, median, time_op, torch_dtype
from profiles.table import TABLE_COLUMNS


def time_gemm(p: GemmPoint, timing: TimingConfig, device: str) -> float:
    """Median seconds of one (m×k)·(k×n) product."""
    dt = torch_dtype(p.dtype)
    a = torch.randn(p.m, p.k, dtype=dt, device=device)
    b = torch.randn(p.k, p.n, dtype=dt, device=device)
    c = torch.empty(p.m, p.n, dtype=dt, device=device)
    return median(time_op(lambda _: torch.mm(a, b, out=c), timing, device=device))


def measure_gemm(cfg: MeasureConfig, points: list[GemmPoint],
                 on_point: Callable[[tuple], None] | None = None) -> pd.DataFrame:
    rows = []
    for p in points:
        rows.append((p.m, p.n, p.k, p.dtype, time_gemm(p, cfg.timing, cfg.device)))
        if on_point:  # the runner checkpoints each row
            on_point(rows[-1])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS["gemm"])


def dtype_rate_flops(dtype: str, device: str, edge: int = 512) -> float:
    """Achieved FLOP/s of one edge³ product: the probe that decides whether a dtype is worth
    profiling on this device (bf16 on CPUs without native bf16 runs ~100x below fp32)."""
    t = time_gemm(GemmPoint(edge, edge, edge, dtype), TimingConfig(1, 3, 3, float("inf")), device)
    return 2.0 * edge**3 / t
