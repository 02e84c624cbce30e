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

from profiles.measure import MeasureConfig, MeasureError, MemoryPoint, last_level_cache_bytes, time_op, torch_dtype
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
