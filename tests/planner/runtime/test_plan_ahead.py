"""Plans streamed per step and planned ahead (planner/runtime/feed.py): a streamed plan replays as its
JSON does; with --plan-ahead rank 0 plans each step while the one before runs, sends every rank only
its part, and gradients still equal the single-process reference (torchrun, gloo, 2 ranks, tiny)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from planner.api import PlanRequest, make_plan  # noqa: E402
from planner.plan.stream import write_stream  # noqa: E402
from planner.runtime.feed import rank_parts  # noqa: E402
from planner.runtime.model import TokenSource, TokenStream  # noqa: E402

from tests.planner.runtime.test_runtime import (assert_matches_reference, json_lines, meshplan,  # noqa: E402
                                                 two_rank_plan)

REQ = PlanRequest(model="tiny", cluster="local-cpu", gpus=2, profile="h100-sxm.analytic",
                  lengths="lognormal:median=60,sigma=1.0,max=300", tokens_per_step=600, max_context_tokens=300,
                  capacity_tokens=200, seed=3, steps=3)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The request's plan as JSON and as a stream, and a token file."""
    d = tmp_path_factory.mktemp("ahead")
    with pytest.warns(UserWarning, match="profile"):  # an H100 profile on a CPU cluster: only the plan's shape matters
        plan = make_plan(REQ, "hdp")
    assert any(u.degree == 2 for s in plan.steps for u in s.units)  # context parallelism in the plan
    plan.save(d / "p.json")
    write_stream(plan, d / "p.jsonl")
    np.save(d / "tokens.npy", np.random.default_rng(0).integers(0, 256, 3000).astype(np.int32))
    return d, plan


def test_a_ranks_part_holds_its_units_and_reads_the_tokens_of_the_whole_step(planned):
    d, plan = planned
    source = TokenSource(256, 0, str(d / "tokens.npy"))
    for st in plan.steps:
        whole = source.tokens(0, st.sequences, 123)
        for rank, (part, starts, ops) in enumerate(rank_parts(st, plan.mesh)):
            assert ops is None and part.global_tokens == st.global_tokens and list(part.order) == [rank]
            assert {u.id for u in part.units} == set(st.order.get(rank, []))
            assert all(rank in u.hdp_ranks for u in part.units)
            got = source.tokens(0, part.sequences, 123, starts=starts)
            assert set(got) == {p.seq for u in part.units for p in u.pieces}
            for q, t in got.items():
                assert torch.equal(t.ids, whole[q].ids) and torch.equal(t.labels, whole[q].labels)
    assert isinstance(source.stream, TokenStream)


def test_plan_ahead_needs_a_planned_request_and_lengths_needs_plan_ahead(tmp_path):
    two_rank_plan().save(tmp_path / "hand.json")
    res = meshplan("replay", "hand.json", "--nproc", "2", "--plan-ahead", cwd=tmp_path)
    assert res.returncode == 2 and "records no planning request" in res.stderr and "Traceback" not in res.stderr
    res = meshplan("replay", "hand.json", "--nproc", "2", "--lengths", "github-like", cwd=tmp_path)
    assert res.returncode == 2 and "needs --plan-ahead" in res.stderr


@pytest.mark.torchrun
def test_streamed_and_planned_ahead_replays_match_the_json_plan_and_the_reference(planned):
    d, plan = planned
    tokens = ("--tokens", "tokens.npy")  # parts must read the same stream offsets as the whole step
    units = sum(len(s.units) for s in plan.steps)
    base = assert_matches_reference(meshplan("replay", "p.json", "--nproc", "2", "--check", *tokens, cwd=d),
                                    ranks=2, units=units)
    streamed = assert_matches_reference(meshplan("replay", "p.jsonl", "--nproc", "2", "--check", *tokens, cwd=d),
                                        ranks=2, units=units)
    assert streamed["step"] == [{**s, "wall_s": t["wall_s"]} for s, t in zip(base["step"], streamed["step"])]

    # One more iteration than the plan holds: rank 0 plans it from the length source as it planned the others.
    res = meshplan("replay", "p.jsonl", "--nproc", "2", "--check", "--plan-ahead", "--steps", "4", *tokens,
                   "--trace", "t.json", cwd=d)
    with pytest.warns(UserWarning, match="profile"):
        extra = make_plan(replace(REQ, steps=4), "hdp").steps[3]
    ahead = assert_matches_reference(res, ranks=2, units=units + len(extra.units))
    # the same steps as the plan's, on the same weights: the same losses, step for step
    assert [s["loss"] for s in ahead["step"][:3]] == [s["loss"] for s in base["step"]]
    assert [s["predicted_s"] for s in ahead["step"]] == [s.predicted.step_time_s for s in [*plan.steps, extra]]
    summary = json_lines(res.stdout)["plan_ahead"][0]
    assert summary["steps_planned_ahead"] == 3 and summary["plan_s"] > 0 and summary["sent_bytes"] > 0
    doc = json.loads((d / "t.json").read_text())
    assert doc["meta"]["plan_ahead"] == summary
    planning = [s["planning"] for s in doc["steps"]]
    assert [p["step"] for p in planning] == [0, 1, 2, 3]
    for t, (p, q) in enumerate(zip(planning, planning[1:])):  # rank 0's clock: orders, not durations
        rank0 = doc["steps"][t]["ranks"][0]
        # step t+1 is planned once step t's plan is made, and planning began before step t ended
        assert p["start_s"] + p["plan_s"] <= q["start_s"] <= rank0["start_s"] + rank0["wall_s"]
    chrome = json.loads((d / "t.chrome.json").read_text())
    assert sum(e.get("cat") == "planning" for e in chrome["traceEvents"]) == 4


@pytest.mark.torchrun
def test_a_step_edited_after_writing_fails_the_run_in_one_line_when_reached(planned):
    """Only the header and step 0 are read before the job starts; step 1, changed since written, is
    refused by the ranks when they reach it: one line naming the rank, the step and the cause, exit 1."""
    d, _ = planned
    lines = (d / "p.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"step":1', b'"step":7')
    (d / "edited.jsonl").write_bytes(b"".join(lines))
    res = meshplan("replay", "edited.jsonl", "--nproc", "2", cwd=d)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: replay failed: rank") and "step 1: reading its plan" in last, res.stderr[-3000:]
    assert "step 1: its line does not match the index" in last and "Traceback" not in res.stderr
    assert [s["step"] for s in json_lines(res.stdout).get("step", [])] == []  # nothing reported as done
