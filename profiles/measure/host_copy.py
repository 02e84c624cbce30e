"""Host-copy table. On GPU: host->device and device->host, pinned and pageable. On CPU there is no
device: the table holds memcpy bandwidth (torch copy_ between two host buffers, with torch's
threads), marked direction "memcpy", which the cost model uses for CPU offload copies."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from profiles.measure import HostCopyPoint, MeasureConfig, in_passes, median, time_op
from profiles.table import TABLE_COLUMNS


def time_copy(p: HostCopyPoint, cfg: MeasureConfig) -> float:
    host = torch.empty(p.nbytes, dtype=torch.uint8, pin_memory=p.pinned)
    host.fill_(1)  # touch every page: first-touch faults are not bandwidth
    if p.direction == "memcpy":
        dst = torch.empty_like(host)
        dst.fill_(0)
        fn = lambda _: dst.copy_(host)  # noqa: E731
    else:
        dev = torch.empty(p.nbytes, dtype=torch.uint8, device="cuda")
        if p.direction == "h2d":
            fn = lambda _: dev.copy_(host, non_blocking=p.pinned)  # noqa: E731
        else:
            fn = lambda _: host.copy_(dev, non_blocking=p.pinned)  # noqa: E731
    # No L2 flush: the copy's source is host memory (or streams far past L2 for large sizes).
    return median(time_op(fn, cfg.timing, device=cfg.device, flush_l2=False))


def measure_host_copy(cfg: MeasureConfig, points: list[HostCopyPoint], on_point: Callable[[tuple], None] | None = None,
                      on_progress: Callable[[float], None] | None = None) -> pd.DataFrame:
    """One row per point, in point order, timed in `cfg.passes` interleaved passes (profiles.measure.in_passes);
    on_point gets each row once it is final (the runner checkpoints it)."""
    def row(p: HostCopyPoint, t: float) -> tuple:
        return p.direction, p.pinned, p.nbytes, t

    best = in_passes(points, cfg.passes, lambda p: (time_copy(p, cfg), None),
                     (lambda i, t, _: on_point(row(points[i], t))) if on_point else None, on_progress)
    return pd.DataFrame([row(p, t) for p, (t, _) in zip(points, best)], columns=TABLE_COLUMNS["host_copy"])
