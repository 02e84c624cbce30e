"""Host-copy table. On GPU: host->device and device->host, pinned and pageable. On CPU there is no
device: the table holds memcpy bandwidth (torch copy_ between two host buffers, with torch's
threads), marked direction "memcpy", which the cost model uses for CPU offload copies."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from profiles.measure import HostCopyPoint, MeasureConfig, median, time_op
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


def measure_host_copy(cfg: MeasureConfig, points: list[HostCopyPoint],
                      on_point: Callable[[tuple], None] | None = None) -> pd.DataFrame:
    rows = []
    for p in points:
        rows.append((p.direction, p.pinned, p.nbytes, time_copy(p, cfg)))
        if on_point:  # the runner checkpoints each row
            on_point(rows[-1])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS["host_copy"])
