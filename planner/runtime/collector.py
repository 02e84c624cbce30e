"""Python's cyclic garbage collector, kept out of the replay's steps and timed where it still runs.

Once set up, a replay rank holds some 340,000 objects the collector tracks (the plan, the model, the libraries it
imported). CPython's oldest-generation collection walks every one of them: on a 2-core Xeon such a pass took 90-200 ms
inside pp2's 160 ms steps, on every rank at nearly the same allocation count, so one step in five ran at twice its
time. Nothing the set-up made is garbage the steps could free, so the rank collects once and freezes it all
(`gc.freeze`: later collections never walk it) before its first step, as long-running Python services do; what the
steps allocate is still collected as usual. `GcClock` also times every collection, so a trace says what the collector
still cost each step (`StepRecord.gc_s`)."""

from __future__ import annotations

import gc
import time


class GcClock:
    """Seconds the cyclic collector ran in this process, read and reset by `take()`; `process_clock()` gives the
    process's one."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._started: float | None = None
        self.frozen_objects = 0  # what freeze_set_up moved out of the collector's reach
        gc.callbacks.append(self._on_collect)

    def _on_collect(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._started = None

    def take(self) -> float:
        """Collector seconds since the last take (or since installed)."""
        s, self._seconds = self._seconds, 0.0
        return s

    def freeze_set_up(self) -> int:
        """Collect, then move every object alive now to the collector's permanent generation; returns how many."""
        gc.collect()
        gc.freeze()
        self.take()  # that collection is set-up's, not a step's
        self.frozen_objects = gc.get_freeze_count()
        return self.frozen_objects

    def close(self) -> None:
        if self._on_collect in gc.callbacks:
            gc.callbacks.remove(self._on_collect)


_CLOCK: GcClock | None = None


def process_clock() -> GcClock:
    """The process's clock, installed on first use: the collector is the process's, whatever asks."""
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = GcClock()
    return _CLOCK
