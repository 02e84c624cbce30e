"""Memory table: time of one memory-bound elementwise kernel per size, what the cost model prices norms,
activations, residuals, softmax and the optimizer with.

The kernel is y = x + 1 out of place (torch.add(x, 1, out=y)) in the profile's main dtype on the device:
it reads one tensor and writes another of the same size, so bytes = read + written = 2 x tensor bytes.
All sizes are views of one pair of buffers of the largest size (memory: the largest size, once).

Robust to load: each size's time is the MINIMUM over every timed call of `cfg.mem_rounds` passes over all
sizes (alternately ascending and descending), not a median of back-to-back calls. A bandwidth is a
hardware limit, and calls spread over the whole run cannot all be slowed by a burst of other work.
The median of the same calls is kept (column median_s) to show how loaded the machine was.

On GPU the L2 is flushed before each call for sizes below twice the L2 (a real step's operands were
evicted since they were written); larger sizes stream past it anyway. On CPU nothing is flushed (as in
the other CPU benchmarks); each size's first call in a pass is an untimed warm-up."""

from __future__ import annotations

import statistics
from typing import Callable

import pandas as pd
import torch

from profiles.measure import MeasureConfig, MeasureError, MemoryPoint, time_op, torch_dtype
from profiles.table import TABLE_COLUMNS

COLUMNS = TABLE_COLUMNS["memory"] + ["median_s"]


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0))


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
    x = torch.empty(max(numels), dtype=dt, device=cfg.device)
    y = torch.empty_like(x)
    x.fill_(1)  # touch every page: first-touch faults are not bandwidth
    y.fill_(0)
    l2 = _l2_bytes() if cfg.device == "cuda" else 0
    samples: list[list[float]] = [[] for _ in points]
    order = list(range(len(points)))
    steps, done = cfg.mem_rounds * len(points), 0
    for r in range(cfg.mem_rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            xi, yi = x[:numels[i]], y[:numels[i]]
            samples[i] += time_op(lambda _, a=xi, b=yi: torch.add(a, 1.0, out=b), cfg.mem_timing,
                                  device=cfg.device, flush_l2=2 * numels[i] * item < 2 * l2)
            done += 1
            if on_progress:
                on_progress(done / steps)
    rows = [(2 * n * item, min(s), float(statistics.median(s))) for n, s in zip(numels, samples)]
    for row in rows:
        if on_point:  # the runner checkpoints each row
            on_point(row)
    return pd.DataFrame(rows, columns=COLUMNS)
