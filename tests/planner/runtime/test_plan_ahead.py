"""Plans streamed per step and planned ahead (planner/runtime/feed.py): a streamed plan replays as its
JSON does; with --plan-ahead rank 0 plans each step while the one before runs, sends every rank only
its part, and gradients still equal the single-process reference (torchrun, gloo, 2 ranks, tiny)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import planner.api  # noqa: E402
from planner.api import PlanRequest, cost_model_for_plan, make_batches, make_plan  # noqa: E402
from planner.plan import PlanError  # noqa: E402
from planner.plan.stream import write_stream  # noqa: E402
from planner.runtime.ahead import step_planner  # noqa: E402
from planner.strategies import HdpOptions  # noqa: E402
from planner.runtime.feed import rank_parts  # noqa: E402
from planner.runtime.model import TokenSource, TokenStream  # noqa: E402

from tests.planner.runtime.test_runtime import (DEEP_TIED, assert_matches_reference, json_lines,  # noqa: E402
                                                 meshplan, two_rank_plan)

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


# -- pp > 1 and tp > 1 --------------------------------------------------------------------------------

# pp = 2 over 2 pipelines of a 4-layer model (v = 1 or 2): steps 0 and 1 of this request choose v = 2 on their own,
# step 2 alone v = 1, so plan-ahead must hold the first step's v for the run's one layer placement.
PP_REQ = PlanRequest(model="deep.json", cluster="local-cpu", gpus=4, pp=2, profile="h100-sxm.analytic",
                     lengths="lognormal:median=100,sigma=1.0,max=400", tokens_per_step=800, max_context_tokens=400,
                     capacity_tokens=200, seed=4, steps=1)


@pytest.fixture(scope="module")
def pp_planned(tmp_path_factory):
    """PP_REQ's one-step plan (no --pp-v), its request with the model's path, and step 2 planned alone."""
    d = tmp_path_factory.mktemp("ahead_pp")
    (d / "deep.json").write_text(json.dumps(DEEP_TIED))
    req = replace(PP_REQ, model=str(d / "deep.json"))
    with pytest.warns(UserWarning, match="profile"):
        plan = make_plan(req, "hdp")
        cm = cost_model_for_plan(plan)
        alone = make_plan(req, "hdp", cm, [make_batches(replace(req, steps=3), cm)[2]]).steps[0]
    assert plan.meta["options"]["hdp"]["pp_v"] is None and plan.steps[0].chunks_per_stage == 2
    assert alone.chunks_per_stage == 1  # what step 2 would get unpinned: a layer placement the run does not have
    plan.save(d / "p.json")
    return d, plan, req


def test_plan_ahead_plans_every_step_at_the_first_steps_v(pp_planned, monkeypatch):
    """Each step planned ahead is that step of `meshplan plan --steps N --pp-v v` (v: the first step's);
    a step the planner cannot plan at v stops the run in one line naming the iteration and v."""
    _, plan, req = pp_planned
    with pytest.warns(UserWarning, match="profile"):
        plan_step = step_planner(plan, None, 3, "p.json")
        pinned = make_plan(replace(req, steps=3, options=replace(req.options, hdp=HdpOptions(pp_v=2))), "hdp").steps
        got = [plan_step(t) for t in range(3)]
        whole = make_plan(replace(req, steps=3), "hdp").steps  # `meshplan plan --steps 3`: one v for the run
    assert [st.chunks_per_stage for st in got] == [2, 2, 2] == [st.chunks_per_stage for st in whole]
    assert got == pinned

    def refuse(r: PlanRequest, *_):
        assert r.options.hdp.pp_v == 2
        raise PlanError("pp_v = 2: the pipelines' op lists deadlock")

    monkeypatch.setattr(planner.api, "make_plan", refuse)
    with pytest.raises(PlanError, match=r"^--plan-ahead iteration 2: no plan at the run's 2 model chunks per stage "
                                        r"\(the first step's v; .*\): pp_v = 2: the pipelines' op lists deadlock$"):
        step_planner(plan, None, 3, "p.json")(2)


@pytest.mark.torchrun
def test_pipelined_plan_ahead_without_a_pinned_v_matches_the_reference(pp_planned):
    """pp = 2 × 2 pipelines (4 ranks), a plan written without --pp-v: iterations 1 and 2 planned ahead (the
    second one past the plan, where the step alone would choose another v) replay with the reference's
    gradients."""
    d, plan, req = pp_planned
    res = meshplan("replay", "p.json", "--nproc", "4", "--check", "--plan-ahead", "--steps", "3",
                   "--model", "deep.json", cwd=d)
    steps = step_planner(plan, None, 3, "p.json")  # the plan's recorded profile: no warning
    ahead = [steps(t) for t in range(3)]
    lines = assert_matches_reference(res, ranks=4, units=sum(len(st.units) for st in ahead))
    assert [s["predicted_s"] for s in lines["step"]] == [st.predicted.step_time_s for st in ahead]
    assert json_lines(res.stdout)["plan_ahead"][0]["steps_planned_ahead"] == 2


@pytest.mark.torchrun
def test_tensor_parallel_plan_ahead_matches_the_reference(tmp_path):
    """tp = 2 × 2 HDP ranks (4 processes): the TP ranks of an HDP rank receive the same part (units, token
    offsets) from rank 0, including a context-parallel unit over both HDP ranks and a step past the plan."""
    req = replace(REQ, gpus=4, tp=2, steps=2)
    with pytest.warns(UserWarning, match="profile"):
        plan = make_plan(req, "hdp")
        extra = make_plan(replace(req, steps=3), "hdp").steps[2]
    assert plan.mesh.tp == 2 and any(u.degree == 2 for s in plan.steps for u in s.units)
    plan.save(tmp_path / "p.json")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 256, 3000).astype(np.int32))
    res = meshplan("replay", "p.json", "--nproc", "4", "--check", "--plan-ahead", "--steps", "3",
                   "--tokens", "tokens.npy", cwd=tmp_path)
    ahead = [*plan.steps, extra]
    lines = assert_matches_reference(res, ranks=4, units=sum(len(st.units) for st in ahead))
    assert [s["predicted_s"] for s in lines["step"]] == [st.predicted.step_time_s for st in ahead]


@pytest.mark.torchrun
def test_plan_ahead_with_tp_and_pp_together_matches_the_reference(tmp_path):
    """tp = 2 × pp = 2 × 2 HDP ranks (8 processes): sliced units and a context-parallel unit, a step past the plan
    planned ahead; the TP ranks of each stage receive their HDP rank's part."""
    (tmp_path / "deep.json").write_text(json.dumps(DEEP_TIED))
    req = PlanRequest(model=str(tmp_path / "deep.json"), cluster="local-cpu", gpus=8, tp=2, pp=2,
                      profile="h100-sxm.analytic", lengths="lognormal:median=200,sigma=1.0,max=400",
                      tokens_per_step=800, max_context_tokens=400, capacity_tokens=200, seed=5, steps=2)
    with pytest.warns(UserWarning, match="profile"):
        plan = make_plan(req, "hdp")
    units = [u for s in plan.steps for u in s.units]
    assert plan.mesh.tp == 2 and plan.mesh.pp == 2 and max(u.degree for u in units) == 2
    assert max(u.slices for u in units) > 1
    plan.save(tmp_path / "p.json")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 256, 3000).astype(np.int32))
    res = meshplan("replay", "p.json", "--nproc", "8", "--check", "--plan-ahead", "--steps", "3",
                   "--model", "deep.json", "--tokens", "tokens.npy", cwd=tmp_path)
    steps = step_planner(plan, None, 3, "p.json")
    ahead = [steps(t) for t in range(3)]
    lines = assert_matches_reference(res, ranks=8, units=sum(len(st.units) for st in ahead))
    assert [s["predicted_s"] for s in lines["step"]] == [st.predicted.step_time_s for st in ahead]
    assert json_lines(res.stdout)["plan_ahead"][0]["steps_planned_ahead"] == 2
