"""ZeRO-3 rounds: the round simulator against the formula by hand, round layouts, the alignment rule in
validate, and a Llama-3 70B ZeRO-3 plan produced, validated and simulated."""

import dataclasses

import numpy as np
import pytest

from costmodel.memory import model_state_bytes
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, TrainingSpec
from costmodel.timing import CostModel
from costmodel.zero import round_collectives
from planner.api import PlanRequest, build_cost_model, make_batches, make_plan
from planner.plan import Mesh, Piece, Plan, PlanError, Predicted, Sequence, Step, Unit, validate
from planner.plan.validate import unit_rounds
from planner.simulate import simulate_plan, simulate_step
from planner.strategies.common import Draft, finalize
from planner.strategies.rounds import keep_ranks_rounds, redegree, relayout_rounds, round_layouts
from profiles.table import load_profile


@pytest.fixture(scope="module")
def cm3() -> CostModel:
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(4)
    return CostModel(Setup(m, c, TrainingSpec(zero_stage=3, recompute="full")), load_profile("h100-sxm.analytic"))


def _step(units: list[Unit], order: dict[int, list[int]], lengths: list[int], hdp: int) -> Step:
    return Step(0, sum(lengths), [Sequence(i, s) for i, s in enumerate(lengths)], units, order,
                Predicted(0.0, 0.0, [0.0] * hdp, [0.0] * hdp))


def test_two_rounds_by_hand(cm3):
    # 4 HDP ranks. Round 0: a 16K document on rank 0, an 8K one on rank 1 (ranks 2, 3: empty passes);
    # round 1: a 4K document on rank 0 alone. Per layer and round: the slowest member's compute; the
    # forward gather exposed once, then prefetched; backward gather + reduce-scatter under each layer.
    lengths = [16384, 8192, 4096]
    units = [Unit(0, (0,), (Piece(0, 0, 16384),)), Unit(1, (1,), (Piece(1, 0, 8192),)),
             Unit(2, (0,), (Piece(2, 0, 4096),))]
    step = _step(units, {0: [0, 2], 1: [1], 2: [], 3: []}, lengths, 4)
    assert unit_rounds(step) == {0: 0, 1: 0, 2: 1}
    sim = simulate_step(step, cm3)
    cost = [cm3.unit_cost([s]) for s in lengths]
    L, co = cm3.layers_per_stage, round_collectives(cm3.setup, cm3.profile)
    g, r = co.layer_gather_s, co.layer_reduce_scatter_s

    def by_hand(u):  # one round whose slowest member runs unit cost u (the others are faster or empty)
        f, b, h = (u.fwd_s - u.head_fwd_s) / L, (u.bwd_s - u.head_bwd_s) / L, u.head_fwd_s + u.head_bwd_s
        fwd = g + (L - 1) * max(f, g) + f
        bwd = max(0.0, g - h) + max(b, g) + (L - 2) * max(b, g + r) + max(b, r) + r
        return co.root_gather_s + fwd + h + bwd + co.root_reduce_scatter_s

    rounds = [by_hand(cost[0]), by_hand(cost[2])]
    assert cost[0].total_s > cost[1].total_s  # rank 0 is round 0's slowest
    assert sim.step_time_s == pytest.approx(sum(rounds) + cm3.optimizer_step_s(4), rel=1e-12)
    exposed = [rounds[0] - cost[0].total_s, rounds[1] - cost[2].total_s]
    assert sim.breakdown["zero3_exposed"] == pytest.approx(sum(exposed))
    assert sim.breakdown["grad_sync"] == 0.0
    # every rank waits on every round's collectives; rank 3 ran nothing
    assert sim.per_rank_busy_s[1] == pytest.approx(cost[1].total_s + sum(exposed))
    assert sim.per_rank_busy_s[3] == pytest.approx(sum(exposed))
    assert min(sim.peak_memory_bytes) >= model_state_bytes(cm3.setup)


def _zero3_plan_of(order: dict[int, list[int]]) -> Plan:
    """Two HDP ranks: sequence 0 sharded over both (unit 0), sequence 1 on rank 1 (unit 1); ZeRO-3 meta."""
    units = [Unit(0, (0, 1), (Piece(0, 0, 10),), tokens_per_rank=6), Unit(1, (1,), (Piece(1, 0, 6),))]
    step = Step(0, 16, [Sequence(0, 10), Sequence(1, 6)], units, order, Predicted(1.0, 0.5, [1.0, 1.0], [1e9, 1e9]))
    return Plan(meta={"training": {"zero_stage": 3}}, mesh=Mesh(2, 1, 1, 2), steps=[step])


def test_misaligned_zero3_plan_is_rejected():
    validate(_zero3_plan_of({0: [0], 1: [0, 1]}))
    bad = _zero3_plan_of({0: [0], 1: [1, 0]})  # deadlock-free, but unit 0 is round 0 on rank 0, round 1 on rank 1
    with pytest.raises(PlanError, match="unit 0 is number 0 in HDP rank 0's order and number 1 in rank 1's"):
        validate(bad)
    validate(dataclasses.replace(bad, meta={"training": {"zero_stage": 1}}))  # no rounds below ZeRO-3


def _drafts(ranks: list[tuple[int, ...]]) -> list[Draft]:
    return [Draft(ranks=rs, pieces=[Piece(i, 0, 1)]) for i, rs in enumerate(ranks)]


def test_keep_ranks_aligns_or_gives_up():
    # shared (0, 1) then shared (1, 2): rank 2 would need a unit of its own for round 0
    assert keep_ranks_rounds(_drafts([(0, 1), (1, 2)]), [5.0, 4.0], 3) is None
    # with a one-rank unit on rank 2 it fills round 0 there
    out = keep_ranks_rounds(_drafts([(0, 1), (1, 2), (2,)]), [5.0, 4.0, 1.0], 3)
    assert [d.sort_key for d in out] == [0.0, 1.0, 0.0]


def test_relayout_packs_longest_first_with_idle_ranks_last():
    # 3 ranks; times 9 (2 ranks), 8, 7, 6, 1 (one rank each): round 0 = {9, 8}, round 1 = {7, 6, 1}, each laid
    # out from rank 0, largest degree first
    out = relayout_rounds(_drafts([(1, 2), (0,), (1,), (2,), (0,)]), [9.0, 8.0, 7.0, 6.0, 1.0], 3)
    assert [(d.sort_key, d.ranks) for d in out] == [(0.0, (0, 1)), (0.0, (2,)), (1.0, (0,)), (1.0, (1,)),
                                                    (1.0, (2,))]
    # 9 on 2 ranks opens round 0, 8 on all 3 opens round 1: the fuller round runs first, so rank 2, idle while
    # 9 runs, has nothing after it
    out = relayout_rounds(_drafts([(1, 2), (0, 1, 2)]), [9.0, 8.0], 3)
    assert [(d.sort_key, d.ranks) for d in out] == [(1.0, (0, 1)), (0.0, (0, 1, 2))]


@pytest.mark.parametrize("strategy", ["hdp", "static", "dcp"])
def test_llama3_70b_zero3_plan_is_valid_and_simulates(strategy):
    # 256 H100, tp 8 (32 HDP ranks), 128K context, 4M tokens per step
    req = PlanRequest(model="llama3-70b", cluster="dgx-h100", gpus=256, tp=8, max_context_tokens=128 * 1024,
                      tokens_per_step=4 * 2**20, zero_stage=3)
    cm = build_cost_model(req)
    plan = make_plan(req, strategy, cm)
    validate(plan)
    assert plan.meta["training"]["zero_stage"] == 3
    st = plan.steps[0]
    rounds = unit_rounds(st)
    assert max(rounds.values()) + 1 == max(len(o) for o in st.order.values())
    sim = simulate_plan(plan, cm)[0]
    assert sim.step_time_s == pytest.approx(st.predicted.step_time_s)
    assert sim.breakdown["grad_sync"] == 0.0 and sim.breakdown["zero3_exposed"] > 0
    assert max(sim.peak_memory_bytes) <= cm.budget.hbm_bytes


def test_every_round_layout_of_a_70b_step_is_a_valid_plan():
    # the units of a ZeRO-1 hdp plan of the 70B step (they fit ZeRO-3's larger C) laid out every way finalize
    # tries (keep-ranks, relayout, refill, redegree then relayout / refill): each a valid ZeRO-3 plan
    req = PlanRequest(model="llama3-70b", cluster="dgx-h100", gpus=256, tp=8, max_context_tokens=128 * 1024,
                      tokens_per_step=4 * 2**20, zero_stage=3, recompute="selective")
    cm = build_cost_model(req)
    st1 = make_plan(dataclasses.replace(req, zero_stage=1), "hdp").steps[0]
    drafts = [Draft(u.hdp_ranks, list(u.pieces), u.offload_ratio - 1e-9 if u.offload_ratio else 0.0, float(u.id))
              for u in st1.units]
    plan = make_plan(req, "hdp", cm)
    layouts = round_layouts(drafts, cm, 32, repack=True)
    assert len(layouts) >= 4
    for layout in layouts:
        step = finalize(make_batches(req, cm)[0], layout, cm, 32, rounds_formed=True)
        validate(dataclasses.replace(plan, steps=[step]))
        assert unit_rounds(step)  # aligned


def test_redegree_takes_the_fewest_ranks_that_meet_the_target():
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(16)
    cm = CostModel(Setup(m, c, TrainingSpec(zero_stage=3, recompute="full", capacity_tokens=4096)),
                   load_profile("h100-sxm.analytic"))
    # a 16K document needs 4 ranks at C = 4K; priced on 4..16 ranks
    deg = list(range(4, 17))
    t = cm.price_units(np.full(len(deg), 16384.0), np.arange(len(deg)), np.array(deg), 0.0,
                       np.array([cm.setup.mesh.group_spans_domains(g) for g in deg])).total_s.tolist()
    drafts = [Draft((0, 1, 2, 3), [Piece(0, 0, 16384)]), Draft((4,), [Piece(1, 0, 4000)])]
    target = t[deg.index(8)] * (1 + 1e-9)
    out, times = redegree(drafts, [t[0], 1.0], 16, cm, target)
    want = next(g for g, x in zip(deg, t) if x <= target)
    assert len(out[0].ranks) == want and times[0] == pytest.approx(t[deg.index(want)])
    assert out[1] is drafts[1]  # one-rank bins without offload are refill's business
    assert redegree(drafts, [t[0], 1.0], 16, cm, t[0])[0] is drafts  # nothing longer than the target: unchanged
