"""Per-unit context-parallel kinds (issue 17 item 3): ring, all-gather, Ulysses and 2D chosen per sharded unit
by predicted time and memory; never slower than the plan-wide kind, plans valid and re-simulated alike."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.plan import Mesh, Piece, Plan, PlanError, validate
from planner.simulate import simulate_step
from planner.strategies import HEURISTICS, PlanOptions, get_strategy
from planner.strategies.cp_kinds import CP_KINDS, candidates, choose_cp_kinds, parse_cp_kinds

# llama-7b (8 KV heads, so Ulysses degrees 2, 4 and 8) at a small capacity: a few thousand tokens need several ranks
from tests.planner.strategies.test_ilp import CAP, batch_of, cost_model


def plan_of(step, cm) -> Plan:
    return Plan(meta={"capacity_tokens": cm.capacity_tokens, "layers_per_stage": cm.layers_per_stage,
                      "strategy": "test"}, mesh=Mesh(cm.setup.cluster.world_size, cm.tp, cm.pp, cm.setup.hdp),
                steps=[step])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.one_of(st.integers(1, 3000), st.integers(3000, 60_000)), min_size=1, max_size=40),
       gpus=st.sampled_from([8, 16, 32]), name=st.sampled_from(list(HEURISTICS)))
def test_choice_never_slower_and_plans_validate(lengths, gpus, name):
    cm = cost_model(gpus)
    b = batch_of(lengths)
    fn = get_strategy(name)
    try:
        ring = fn(b, cm, PlanOptions())
    except PlanError:  # a static/dcp mesh too small for the longest sequence
        return
    chosen = fn(b, cm, PlanOptions(cp_kinds=CP_KINDS))
    assert [(u.hdp_ranks, u.pieces, u.offload_ratio) for u in chosen.units] == \
        [(u.hdp_ranks, u.pieces, u.offload_ratio) for u in ring.units]  # the same units, only their kind
    for u, r in zip(chosen.units, ring.units):
        assert u.predicted_time_s <= r.predicted_time_s
        if u.ulysses > 1:
            assert u.degree % u.ulysses == 0 and cm.max_ulysses % u.ulysses == 0
            assert u.ulysses == u.degree or not any(  # 2D groups stay inside one node
                cm.setup.mesh.spans_domains(u.hdp_ranks[k:k + u.ulysses]) for k in range(0, u.degree, u.ulysses))
    assert chosen.predicted.step_time_s <= ring.predicted.step_time_s * (1 + 1e-12)
    plan = plan_of(chosen, cm)
    validate(plan)
    loaded = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))  # what a loaded plan re-simulates
    assert [(u.ulysses, u.cp) for u in loaded.steps[0].units] == [(u.ulysses, u.cp) for u in chosen.units]
    assert simulate_step(loaded.steps[0], cm).step_time_s == chosen.predicted.step_time_s


def test_one_node_unit_takes_the_fastest_candidate():
    cm = cost_model(8)
    ranks = tuple(range(8))
    assert candidates(ranks, cm, CP_KINDS) == [(1, None), (1, "allgather"), (8, None), (2, None), (2, "allgather"),
                                               (4, None), (4, "allgather")]
    assert candidates(ranks, cm, ("ring",)) == [(1, None)]
    assert candidates((0,), cm, CP_KINDS) == [(1, None)]
    docs = [30_000, 2_000]  # under C per rank: every kind fits
    u, cp = choose_cp_kinds([ranks], [tuple(Piece(i, 0, s) for i, s in enumerate(docs))], [0.0], cm, CP_KINDS)
    times = {c: cm.unit_cost(docs, 8, ulysses=c[0], cp=c[1], ulysses_inter=False).total_s
             for c in candidates(ranks, cm, CP_KINDS)}
    assert times[(u[0], cp[0])] == min(times.values())


def test_2d_groups_stay_in_a_node():
    cm = cost_model(32)
    straddling = tuple(range(4, 20))  # 16 ranks over three nodes: groups of 4 stay inside, groups of 8 do not
    us = {u for u, _ in candidates(straddling, cm, ("2d",))}
    assert us == {1, 2, 4}


def test_allgather_refused_when_its_gathered_kv_does_not_fit():
    cm = cost_model(32)
    ranks = tuple(range(32))  # four nodes, C tokens per rank: all-gather is faster than the ring here ...
    assert cm.unit_cost([32 * CAP], 32, cp="allgather", inter_node=True).total_s < \
        cm.unit_cost([32 * CAP], 32, inter_node=True).total_s
    full = (Piece(0, 0, 32 * CAP),)  # ... but leaves no room for the gathered K/V and dK/dV
    assert choose_cp_kinds([ranks], [full], [0.0], cm, ("ring", "allgather")) == ([1], [None])
    half = (Piece(0, 0, 16 * CAP),)  # half of C per rank: room enough
    assert choose_cp_kinds([ranks], [half], [0.0], cm, ("ring", "allgather")) == ([1], ["allgather"])


@pytest.mark.parametrize("text,kinds", [("auto", CP_KINDS), ("2d, ring", ("ring", "2d")), ("ULYSSES", ("ulysses",))])
def test_parse_cp_kinds(text, kinds):
    assert parse_cp_kinds(text) == kinds


@pytest.mark.parametrize("text", ["", "ring,foo", "auto,ring"])
def test_parse_cp_kinds_refuses(text):
    with pytest.raises(PlanError, match="--cp-kinds must be auto or a comma-separated subset"):
        parse_cp_kinds(text)
