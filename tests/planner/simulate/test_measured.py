"""Predicted vs measured, with the host beside it: the host probe and other processes' load, replay against profile."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from costmodel.timing import CostModel
from planner.api import PlanRequest, cost_model_for_plan, make_plan
from planner.simulate import simulate_step, unit_costs
from planner.simulate.measured import (OtherLoad, compare_measured, host_slowdown, predicted_cpu_s, predicted_op_cpu_s,
                                       predicted_units_s, warm_steps)
from planner.simulate.pipelined import slice_sources_s, sliced_pass_s
from planner.simulate.step import slice_costs

PROFILE_PROBE_S = 0.020


@pytest.fixture(scope="module")
def plan_and_cm():
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=2, lengths="lognormal:median=200,sigma=1.0,max=800",
                      tokens_per_step=2048, max_context_tokens=1024, seed=1)
    plan = make_plan(req, "hdp")
    cm = cost_model_for_plan(plan)
    prof = copy.deepcopy(cm.profile)
    prof.constants["host_probe_s"] = {"value": PROFILE_PROBE_S, "unit": "s", "source": "test"}
    prof.constants.pop("host_other_cores", None)  # a profile measured before the load was recorded
    return plan, CostModel(cm.setup, prof)


def _trace(plan, cm, slower: float, probe: dict | None) -> dict:
    """A trace whose every unit and step took `slower` times its prediction (pp = 1: a unit's simulated time)."""
    step = plan.steps[0]
    sim = simulate_step(step, cm)
    took = predicted_units_s(step, cm, sim)
    units = [{"unit": u.id, "stage": 0, "fwd_s": took[(u.id, 0)] * slower, "bwd_s": 0.0} for u in step.units]
    doc = {"schema": "meshplan.measured/1", "complete": True, "meta": {},
           "steps": [{"step": 0, "plan_step": step.step, "units": units, "step_time_s": sim.step_time_s * slower}]}
    if probe:
        doc["meta"]["host_probe"] = probe
    return doc


def test_host_slowdown_is_the_replays_probe_over_the_profiles(plan_and_cm):
    plan, cm = plan_and_cm
    probe = {"before_s": 1.4 * PROFILE_PROBE_S, "after_s": 1.6 * PROFILE_PROBE_S, "source": "test"}
    c = compare_measured(plan, cm, _trace(plan, cm, 1.5, probe))
    assert c.host_slowdown == pytest.approx(1.5)  # the mean of before and after
    # a diagnostic beside the errors, never applied to them
    assert all(x["rel_err"] == pytest.approx(1 / 1.5 - 1) for x in [*c.steps, *c.units])


def test_no_host_slowdown_without_both_probes(plan_and_cm):
    plan, cm = plan_and_cm
    assert compare_measured(plan, cm, _trace(plan, cm, 1.5, None)).host_slowdown is None  # e.g. a GPU replay
    stripped = copy.deepcopy(cm.profile)
    del stripped.constants["host_probe_s"]  # a profile measured before the probe existed
    probe = {"before_s": 0.03, "after_s": 0.03, "source": "test"}
    assert host_slowdown(CostModel(cm.setup, stripped), _trace(plan, cm, 1.5, probe)) is None


def test_other_load_is_the_median_over_the_replays_steps_beside_the_profiles(plan_and_cm):
    plan, cm = plan_and_cm
    doc = _trace(plan, cm, 1.0, None)
    assert compare_measured(plan, cm, doc).other_load is None  # a GPU or multi-node replay records none
    doc["steps"] = [{**doc["steps"][0], "step": i, "other_cores": x, "steal_cores": 0.01} for i, x in
                    enumerate([0.1, 0.9, 0.2])]
    assert compare_measured(plan, cm, doc).other_load == OtherLoad(0.2, 0.01, None)
    prof = copy.deepcopy(cm.profile)
    prof.constants["host_other_cores"] = {"value": 0.05, "unit": "cores", "source": "test"}
    assert compare_measured(plan, CostModel(cm.setup, prof), doc).other_load == OtherLoad(0.2, 0.01, 0.05)


def test_a_units_time_runs_from_its_last_members_start(plan_and_cm):
    plan, cm = plan_and_cm
    doc = _trace(plan, cm, 1.0, None)
    one = doc["steps"][0]["units"][0]
    pred = one["fwd_s"]
    # two members of one unit: the first entered 30 ms early and waited for the second inside the unit
    doc["steps"][0]["units"] = [{**one, "start_s": 1.0, "fwd_s": pred + 0.030},
                                {**one, "start_s": 1.030, "fwd_s": pred}]
    got = compare_measured(plan, cm, doc).units[0]
    assert got["measured_s"] == pytest.approx(pred) and got["rel_err"] == pytest.approx(0.0, abs=1e-9)


def _steps(plan_steps: list[int]) -> dict:
    return {"steps": [{"step": i, "plan_step": ps} for i, ps in enumerate(plan_steps)]}


@pytest.mark.parametrize("plan_steps, kept", [
    ([0, 1, 0, 1, 0, 1], [2, 3, 4, 5]),  # each plan step's first replay is cold (new shapes)
    ([0, 1, 2, 0], [1, 2, 3]),  # plan steps replayed once keep their only replay
    ([0, 1], [0, 1]),
    ([0, 0, 0], [1, 2]),
    ([0], [0]),
])
def test_warm_steps_leave_out_each_plan_steps_cold_first_replay(plan_steps, kept):
    assert [s["step"] for s in warm_steps(_steps(plan_steps))] == kept


def test_a_unit_beside_ranks_that_idle_is_predicted_as_the_schedule_ran_it():
    """A CPU profile, 3 ranks on its 2 cores: the 2-rank unit is priced at the 3-rank share, but its third rank is
    done after a 44-token unit and leaves its core (planner/simulate/cores.py): the unit is predicted at the time the
    simulation gives it, not its price."""
    fixture = Path(__file__).resolve().parents[2] / "data" / "epyc-avx2.measured.json"  # a 2-rank unit beside one
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=3, lengths="lognormal:median=200,sigma=1.0,max=800",
                      tokens_per_step=2048, max_context_tokens=1024, seed=1, profile=str(fixture))  # of 44 tokens
    plan = make_plan(req, "hdp")
    cm = cost_model_for_plan(plan)
    step = plan.steps[0]
    took = {op.unit: op.end_s - op.start_s for op in simulate_step(step, cm).ops}
    price = {u.id: unit_costs(step, cm)[u.id][0].total_s for u in step.units}
    assert any(took[u] < 0.95 * price[u] for u in took)  # some unit ran while a rank of its node idled
    got = compare_measured(plan, cm, _trace(plan, cm, 1.0, None)).units
    assert [g["predicted_s"] for g in got] == pytest.approx([took[g["unit"]] for g in got])


def test_a_units_cpu_is_its_compute_at_the_share_of_as_many_busy_ranks_as_cores():
    """4 ranks on the 2-core local-cpu node: priced at k/c · s/2 (time-sliced), their threads' CPU at b (every core
    busy, one rank each): time slicing stretches wall time, not CPU time. Exposed transfers are no CPU of the rank."""
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, lengths="lognormal:median=300,sigma=1.0,max=1500",
                      tokens_per_step=4096, max_context_tokens=2048, capacity_tokens=1024, seed=2)
    plan = make_plan(req, "hdp")
    cm = cost_model_for_plan(plan)
    consts = cm.profile.constants
    assert cm.shares_cores and consts["cores_per_node"]["value"] == 2
    b, s = consts["cores_busy_slowdown"]["value"], consts["cores_shared_slowdown"]["value"]
    step = plan.steps[0]
    costs = unit_costs(step, cm)
    got = predicted_cpu_s(step, cm)
    assert any(u.degree > 1 for u in step.units)  # a ring unit: exposed transfers left out
    for k, u in enumerate(step.units):
        row = costs.ids.index(u.id)
        c = (costs.last.fwd_compute_s[row] + costs.last.bwd_compute_s[row] + costs.last.head_fwd_s[row]
             + costs.last.head_bwd_s[row])
        assert got[(u.id, 0)] == pytest.approx(c * b / (4 / 2 * s / 2))
        assert got[(u.id, 0)] < costs.last.total_s[row]
    # a replay whose threads took 25% more CPU than that, its gloo threads 3 ms a member
    doc = _trace(plan, cm, 1.0, None)
    for u in doc["steps"][0]["units"]:
        u.update(thread_cpu_s=1.25 * got[(u["unit"], 0)], helper_cpu_s=0.003)
    rows = compare_measured(plan, cm, doc).units
    assert all(r["cpu_err"] == pytest.approx(1 / 1.25 - 1) and r["helper_cpu_s"] == pytest.approx(0.003)
               for r in rows)
    assert "cpu_err" not in compare_measured(plan, cm, _trace(plan, cm, 1.0, None)).units[0]  # older traces


def test_no_cpu_prediction_off_cpu_cores():
    gpu = PlanRequest(model="tiny", cluster="dgx-h100", gpus=8, lengths="lognormal:median=300,sigma=1.0,max=1500",
                      tokens_per_step=8192, max_context_tokens=2048, seed=2)
    plan = make_plan(gpu, "hdp")
    assert predicted_cpu_s(plan.steps[0], cost_model_for_plan(plan)) is None


def test_a_pipelined_units_cpu_is_each_stages_compute_as_its_slices_run_it():
    """pp = 2 on 4 ranks of the 2-core node: each (unit, stage)'s forward and backward compute (sliced_pass_s with
    compute_only, its slices' sources with it; the last stage's with the head and loss) at b over k/c · s/2."""
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, pp=2,
                      lengths="lognormal:median=300,sigma=1.4,max=4096", tokens_per_step=8192, max_context_tokens=4096,
                      capacity_tokens=2048, seed=0, dtype="fp32")
    plan = make_plan(req, "hdp")
    cm = cost_model_for_plan(plan)
    step = plan.steps[0]
    assert any(u.slices > 1 for u in step.units)
    consts = cm.profile.constants
    x = consts["cores_busy_slowdown"]["value"] / (4 / 2 * consts["cores_shared_slowdown"]["value"] / 2)
    costs, one = unit_costs(step, cm), slice_costs(step, cm)
    got = predicted_cpu_s(step, cm)
    assert set(got) == {(u.id, s) for u in step.units for s in (0, 1)}
    for u in step.units:
        for s in (0, 1):
            whole, sliced = costs[u.id][s], one[u.id][s] if u.id in one else None
            want = sum(sliced_pass_s(whole, sliced, u.slices, f, True, slice_sources_s(cm, costs[u.id][0], u, f))
                       for f in (True, False))
            assert got[(u.id, s)] == pytest.approx(want * x)
        assert got[(u.id, 1)] > got[(u.id, 0)]  # the head and loss
    units = [{"unit": uid, "stage": s, "fwd_s": t, "bwd_s": 0.0, "thread_cpu_s": 0.8 * got[(uid, s)],
              "helper_cpu_s": 0.0} for (uid, s), t in predicted_units_s(step, cm).items()]
    doc = {"schema": "meshplan.measured/1", "complete": True, "meta": {},
           "steps": [{"step": 0, "plan_step": step.step, "units": units, "step_time_s": 1.0}]}
    rows = compare_measured(plan, cm, doc).units
    assert len(rows) == len(got) and all(r["cpu_err"] == pytest.approx(1 / 0.8 - 1) for r in rows)
    # each op: its slice's share of its stage's pass, the shares adding up to the pass
    ops = predicted_op_cpu_s(step, cm)
    assert {(k[0], k[1]) for k in ops} == set(got)
    for key, want in got.items():
        assert sum(c for k, c in ops.items() if k[:2] == key) == pytest.approx(want)
    sliced = next(u for u in step.units if u.slices > 1)
    fwd = [ops[(sliced.id, 0, "F", j, 0)] for j in range(sliced.slices)]
    assert all(b > a for a, b in zip(fwd, fwd[1:]))  # one more cached slice's block each
    # a trace whose ops record their CPU (the 6th field), 20% under their price
    for u in units:
        u["ops"] = [[k[2], k[3], k[4], 0.0, 0.01, 0.8 * c] for k, c in ops.items() if k[:2] == (u["unit"], u["stage"])]
    got_ops = compare_measured(plan, cm, doc).ops
    assert len(got_ops) == len(ops) and all(o["cpu_err"] == pytest.approx(1 / 0.8 - 1) for o in got_ops)
    for u in units:
        u["ops"] = [o[:5] for o in u["ops"]]  # traces before the op's CPU
    assert compare_measured(plan, cm, doc).ops == []


