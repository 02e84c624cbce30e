"""The replay's garbage-collector clock and freeze (planner/runtime/collector.py)."""

from __future__ import annotations

import gc

from planner.runtime.collector import GcClock, process_clock


class _Cycle:
    def __init__(self) -> None:
        self.me = self  # garbage only the cyclic collector frees


def test_clock_times_collections_and_resets():
    clock = GcClock()
    try:
        clock.take()
        for _ in range(20_000):
            _Cycle()
        gc.collect()
        first = clock.take()
        assert first > 0  # the collection above ran under the clock
        assert clock.take() == 0.0  # taken: reset
    finally:
        clock.close()
    assert clock._on_collect not in gc.callbacks


def test_freeze_moves_set_up_out_of_reach():
    clock = GcClock()
    try:
        kept = [object() for _ in range(1_000)]  # alive now: set-up's
        frozen = clock.freeze_set_up()
        assert frozen == gc.get_freeze_count() >= len(kept) and clock.frozen_objects == frozen
        assert clock.take() == 0.0  # the freeze's own collection is not a step's
        # a full collection now walks only what was made after the freeze, not the frozen objects
        tracked = len(gc.get_objects())
        assert tracked < frozen
    finally:
        gc.unfreeze()
        clock.close()


def test_one_clock_per_process():
    assert process_clock() is process_clock()
