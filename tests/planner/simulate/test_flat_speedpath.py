"""The flat simulator's and finalize's batch paths equal the per-unit computation they replace: the
simulation replayed unit after unit on UnitCost objects, each unit priced alone, zigzag token counts."""

import dataclasses

import numpy as np
import pytest

from costmodel.timing import CostModel
from planner.api import PlanRequest, build_cost_model, make_batches
from planner.plan import Piece, Predicted, Sequence, Step, Unit, zigzag_tokens_per_rank
from planner.simulate import activation_bytes, simulate_step, static_memory_bytes, unit_costs
from planner.simulate.memory import recompute_working_bytes
from planner.simulate.flat import _topological_units
from planner.strategies import STRATEGIES


def _reference(step: Step, cm: CostModel) -> dict:
    """The simulation as the flat simulator computed it before its batch path: a numpy update per unit."""
    hdp = cm.setup.hdp
    costs = unit_costs(step, cm)
    units = {u.id: u for u in step.units}
    free, busy, peak_act, last_bwd = np.zeros(hdp), np.zeros(hdp), np.zeros(hdp), np.zeros(hdp)
    parts = {k: np.zeros(hdp) for k in ("compute", "ring_exposed", "tp_comm", "offload_exposed")}
    ops = []
    for uid in _topological_units(step):
        u, c = units[uid], costs[uid][1]
        r = np.array(u.hdp_ranks)
        start = float(free[r].max())
        free[r] = start + c.total_s
        busy[r] += c.total_s
        last_bwd[r] = c.bwd_s
        for k in parts:
            parts[k][r] += getattr(c, f"{k}_s")
        peak_act[r] = np.maximum(peak_act[r], activation_bytes(c.tokens_per_rank, u.offload_ratio, cm)
                                 + recompute_working_bytes(c.tokens_per_rank, cm))
        ops.append((uid, u.hdp_ranks, start, start + c.total_s))
    finish = float(free.max()) if step.units else 0.0
    sync = cm.exposed_grad_sync_s(hdp, float(last_bwd[int(np.argmax(free))]))
    return {"step_time_s": finish + sync + cm.optimizer_step_s(hdp), "busy": busy.tolist(),
            "idle": (finish - busy).tolist(), "mem": (static_memory_bytes(cm) + peak_act).tolist(),
            "parts": {k: float(v.mean()) for k, v in parts.items()}, "ops": ops}


def _assert_same(step: Step, cm: CostModel) -> None:
    ref, sim = _reference(step, cm), simulate_step(step, cm)
    assert sim.step_time_s == ref["step_time_s"]
    assert sim.per_rank_busy_s == ref["busy"] and sim.per_rank_idle_s == ref["idle"]
    assert sim.peak_memory_bytes == ref["mem"]
    assert {k: sim.breakdown[k] for k in ref["parts"]} == ref["parts"]
    assert [(o.unit, o.ranks, o.start_s, o.end_s) for o in sim.ops] == ref["ops"]


def _cm(gpus: int = 64, tp: int = 1, overlap: bool = False, lengths: str = "byted-like"):
    req = PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=gpus, tp=tp, lengths=lengths,
                      tokens_per_step=2 * 2**20 * gpus // 64)
    cm = build_cost_model(req)
    if overlap:
        s = cm.setup
        cm = CostModel(dataclasses.replace(s, training=dataclasses.replace(s.training, overlap_grad_reduce=True)),
                       cm.profile)
    return req, cm


@pytest.mark.parametrize("strategy,gpus,tp,lengths", [("hdp", 64, 1, "byted-like"), ("hdp", 128, 2, "github-like"),
                                                      ("dcp", 64, 1, "prolong-like"), ("hdp-naive", 64, 4, "byted-like")])
def test_planned_steps_simulate_as_unit_by_unit(strategy, gpus, tp, lengths):
    req, cm = _cm(gpus, tp, lengths=lengths)
    step = STRATEGIES[strategy](make_batches(req)[0], cm, req.options)
    _assert_same(step, cm)
    # finalize priced each unit before building it: the same figures as pricing it alone
    for u in step.units:
        alone = cm.unit_cost([p.tokens for p in u.pieces], u.degree, u.offload_ratio,
                             cm.setup.mesh.spans_domains(u.hdp_ranks))
        assert u.predicted_time_s == alone.total_s
        assert u.tokens_per_rank == alone.tokens_per_rank == zigzag_tokens_per_rank([p.tokens for p in u.pieces],
                                                                                    u.degree)


@pytest.mark.parametrize("overlap", [False, True])
def test_hand_step_with_shared_units_offload_and_a_non_increasing_order(overlap):
    _, cm = _cm(overlap=overlap)
    hdp = cm.setup.hdp
    seqs = [Sequence(i, s) for i, s in enumerate([300_000, 40_000, 9_000, 120_000, 7_000, 500])]
    units = [Unit(0, (0, 1, 2, 3), (Piece(0, 0, 300_000),), offload_ratio=0.25),
             Unit(1, (2,), (Piece(1, 0, 40_000), Piece(2, 0, 9_000))),
             Unit(2, (1, 2, 9, 10), (Piece(3, 0, 120_000),)),  # crosses a node: ring over the inter-node link
             Unit(3, (9,), (Piece(4, 0, 7_000),)),
             Unit(4, (2,), (Piece(5, 0, 500),))]  # rank 2 ends last, on a backward shorter than the sync
    # rank 2 runs unit 1 before unit 0 and rank 9 unit 3 before unit 2: not every order is increasing
    order = {r: [] for r in range(hdp)}
    order.update({0: [0], 1: [0, 2], 2: [1, 0, 2, 4], 3: [0], 9: [3, 2], 10: [2]})
    step = Step(0, sum(q.length for q in seqs), seqs, units, order,
                Predicted(0.0, 0.0, [0.0] * hdp, [0.0] * hdp))
    assert _topological_units(step) == [1, 0, 3, 2, 4]
    _assert_same(step, cm)


def test_step_costs_mapping_matches_unit_cost():
    req, cm = _cm(128, 2)
    step = STRATEGIES["hdp"](make_batches(req)[0], cm, req.options)
    costs = unit_costs(step, cm)
    assert list(costs) == [u.id for u in step.units] and len(costs) == len(step.units)
    for u in step.units[:: max(1, len(step.units) // 20)]:
        mid, last = costs[u.id]
        assert mid == last == cm.unit_cost([p.tokens for p in u.pieces], u.degree, u.offload_ratio,
                                           cm.setup.mesh.spans_domains(u.hdp_ranks))


def test_full_recompute_peak_holds_the_layer_rebuilt_in_the_backward():
    """With full recompute a rank keeps each layer's input and, during a backward, one layer's whole activations:
    the simulated peak counts both, as C's formula does."""
    req = PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=64, lengths="byted-like", recompute="full",
                      tokens_per_step=2 * 2**20)
    cm = build_cost_model(req)
    assert cm.setup.training.recompute == "full" and cm.budget.recompute_working_bytes_per_token > 0
    step = STRATEGIES["hdp"](make_batches(req)[0], cm, req.options)
    _assert_same(step, cm)
    sim = simulate_step(step, cm)
    top = max(step.units, key=lambda u: u.tokens_per_rank)
    kept = activation_bytes(top.tokens_per_rank, top.offload_ratio, cm)
    rebuilt = recompute_working_bytes(top.tokens_per_rank, cm)
    assert rebuilt > 0.05 * kept  # one whole layer next to every layer's input: not a rounding term
    assert max(sim.peak_memory_bytes) == pytest.approx(static_memory_bytes(cm) + kept + rebuilt)
