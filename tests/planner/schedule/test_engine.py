"""The discrete-event engine: deadlocks, co-scheduled ops and rendezvous pairs."""

import pytest

from planner.schedule import PipeOp, ScheduleError, run_ops


def test_out_of_order_list_is_a_deadlock():
    lists = {("a", 0): [("x", PipeOp("F", 0)), ("y", PipeOp("F", 1))],
             ("b", 0): [("y", PipeOp("F", 1)), ("x", PipeOp("F", 0))]}
    with pytest.raises(ScheduleError, match="deadlock"):
        run_ops(lists, lambda k: None, lambda k: 1.0, lambda k: 0.0)


def test_rendezvous_pairs_start_together_and_heavy_waits_for_light():
    lists = {"a": [("h0", PipeOp("F", 0)), ("h", PipeOp("F", 1))], "b": [("l", PipeOp("F", 1))]}
    dur = {"h0": 2.0, "h": 1.0, "l": 3.0}
    runs = {r.key: r for r in run_ops(lists, lambda k: None, dur.__getitem__, lambda k: 0.0, pairs=[("h", "l")])}
    assert runs["h"].start_s == runs["l"].start_s == 2.0  # the light op waits for its partner
    assert runs["h"].end_s == runs["l"].end_s == 5.0  # the heavy one merges the light one's result
    # a pair that cannot meet (each waits on the other through the schedule) runs alone, solo-timed
    lists = {"a": [("x", PipeOp("F", 0)), ("y", PipeOp("F", 1))], "b": [("z", PipeOp("F", 0))]}
    broken = []
    runs = {r.key: r for r in run_ops(lists, lambda k: "y" if k == "z" else None, lambda k: 1.0, lambda k: 0.0,
                                      pairs=[("x", "z")], solo=lambda k: 2.0, broken=broken)}
    assert broken == ["x"] and runs["z"].start_s == runs["y"].end_s == 3.0 and runs["z"].end_s == 5.0
