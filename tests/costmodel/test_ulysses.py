"""Ulysses and 2D (head × ring) context parallelism in `CostModel.price_units` (issue 17 item 3): all-to-all
volumes per rank, attention on a head subset, the ring across Ulysses groups, and the degrees refused."""

import dataclasses

import numpy as np
import pytest

from costmodel.memory import allgather_cp_working_bytes
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel
from planner.plan import Piece, PlanError
from planner.simulate.step import price_units_of
from profiles.table import load_profile

S, D = 65536, 8  # one document on 8 ranks of one node: 8192 tokens per rank (65536 / 16 per zigzag chunk, 2 each)


@pytest.fixture(scope="module")
def cm() -> CostModel:
    # llama-7b: 32 query heads, 8 KV heads of 128 (q width 4096, KV width 1024), 32 layers; bf16, tp 1
    return CostModel(Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64),
                           TrainingSpec(recompute="none")), load_profile("h100-sxm.analytic"))


def _a2a(cm: CostModel, nbytes: float, group: int, scope: str = "intra") -> float:
    return float(cm.profile.collective_time_s("all_to_all", nbytes, group, scope))


def test_pure_ulysses_volumes_and_attention(cm):
    ring = cm.unit_cost([S], D)
    uly = cm.unit_cost([S], D, ulysses=D, ulysses_inter=False)
    # per-rank send buffers: 8192 tokens x width x 2 B; nccl-tests S is the send buffer, (u-1)/u of it leaves
    q_bytes, kv_bytes = 8192 * 4096 * 2, 8192 * 1024 * 2
    assert (q_bytes, kv_bytes) == (67_108_864, 16_777_216)
    t_q, t_kv = _a2a(cm, q_bytes, 8), _a2a(cm, kv_bytes, 8)
    assert t_q > t_kv > 0
    fwd, bwd = 2 * t_q + 2 * t_kv, 3 * t_q + 2 * t_kv  # Q, K, V, O; O + dO, dQ, dK, dV
    assert uly.ring_exposed_fwd_s == pytest.approx(32 * fwd, rel=1e-12)
    assert uly.ring_exposed_bwd_s == pytest.approx(32 * bwd, rel=1e-12)
    assert uly.ring_comm_s == pytest.approx(32 * (fwd + bwd), rel=1e-12)
    # attention: the whole (padded) document on 32/8 = 4 heads: 1/8 of one rank's whole-document time
    assert uly.attn_fwd_compute_s == pytest.approx(32 * float(cm.attn_fwd_s(S)) / 8, rel=1e-12)
    assert uly.attn_bwd_compute_s == pytest.approx(32 * float(cm.attn_bwd_s(S)) / 8, rel=1e-12)
    # the linear layers see the same tokens per rank as the ring
    assert uly.tokens_per_rank == ring.tokens_per_rank == 8192
    assert uly.mem_fwd_s == ring.mem_fwd_s and uly.fwd_compute_s - uly.attn_fwd_compute_s == pytest.approx(
        ring.fwd_compute_s - ring.attn_fwd_compute_s, rel=1e-12)


def test_2d_ring_across_groups(cm):
    u, groups = 2, 4
    two_d = cm.unit_cost([S], D, ulysses=u, ulysses_inter=False)
    # a rank attends its group's 2 x 8192 tokens on 32/2 heads over 4 ring steps: the causal square of its own
    # 16,384 and 3 full rectangles of 16,384 x 8192 (two 8192-token squares without the mask each), per layer
    attn_f = (float(cm.attn_fwd_s(16384)) + 3 * 2 * float(cm.attn_full_s(8192, "fwd"))) / u
    assert two_d.attn_fwd_compute_s == pytest.approx(32 * attn_f, rel=1e-12)
    # ring part: 3 steps per layer, each passing 16384 tokens' K/V on half the KV heads = 8192 x 2 x 1024 x 2 B
    kv_step = 8192 * 2 * 1024 * 2
    comm_f, comm_b = float(cm.p2p_s(kv_step, False)), float(cm.p2p_s(2 * kv_step, False))
    a2a_f = 2 * _a2a(cm, 8192 * 4096 * 2, u) + 2 * _a2a(cm, 8192 * 1024 * 2, u)
    a2a_b = 3 * _a2a(cm, 8192 * 4096 * 2, u) + 2 * _a2a(cm, 8192 * 1024 * 2, u)
    assert two_d.ring_comm_s == pytest.approx(32 * 3 * (comm_f + comm_b) + 32 * (a2a_f + a2a_b), rel=1e-12)
    hidden_f = 32 * 3 * max(0.0, comm_f - attn_f / groups)
    assert two_d.ring_exposed_fwd_s == pytest.approx(hidden_f + 32 * a2a_f, rel=1e-12)
    # all-gather across the 4 groups instead: one all-gather of 4 x kv_step per layer, reduce-scatter of dK/dV
    ag = cm.unit_cost([S], D, ulysses=u, cp="allgather", ulysses_inter=False)
    gather = float(cm.profile.collective_time_s("all_gather", kv_step * groups, groups, "intra"))
    assert ag.ring_exposed_fwd_s == pytest.approx(32 * (gather + a2a_f), rel=1e-12)


def test_ulysses_1_and_plan_kind_are_todays_prices(cm):
    lengths = np.array([S, 3000, 5000, 70000, 12], float)
    offsets = np.array([0, 1, 3])
    base = cm.price_units(lengths, offsets, [D, 1, 4], 0.0, False)
    same = cm.price_units(lengths, offsets, [D, 1, 4], 0.0, False, ulysses=np.ones(3, np.int64),
                          cp=[None, "ring", None], ulysses_inter=np.zeros(3, bool))
    assert base.units() == same.units()
    ag_cm = CostModel(dataclasses.replace(cm.setup, training=dataclasses.replace(cm.setup.training, cp="allgather")),
                      cm.profile)
    assert cm.price_units(lengths, offsets, [D, 1, 4], cp="allgather").units() == \
        ag_cm.price_units(lengths, offsets, [D, 1, 4]).units()
    mixed = cm.price_units(lengths, offsets, [D, 1, 4], cp=["allgather", None, "ring"]).units()
    assert mixed[0] == ag_cm.unit_cost([S], D) and mixed[2] == cm.unit_cost([70000, 12], 4)


def test_impossible_ulysses_degrees_refused(cm):
    with pytest.raises(SpecError, match="ulysses degree 16 must divide .* 8 KV heads per TP rank"):
        cm.unit_cost([S], 16, ulysses=16)  # more than the 8 KV heads
    with pytest.raises(SpecError, match="ulysses degree 4 must divide the unit's 6 ranks"):
        cm.unit_cost([S], 6, ulysses=4)
    tp8 = CostModel(Setup(cm.model, cm.setup.cluster, TrainingSpec(tp=8)), cm.profile)
    assert tp8.max_ulysses == 1  # one KV head per TP rank: nothing to split
    with pytest.raises(PlanError, match="unit 7: ulysses degree 2"):
        price_units_of([7], [(0, 1)], [(Piece(0, 0, S),)], [0.0], tp8, [2], [None])
    with pytest.raises(SpecError, match="context-parallel kind"):
        cm.unit_cost([S], D, cp="ulysses")


def test_ulysses_groups_across_domains_priced_inter(cm):
    # 16 ranks over two nodes: groups of 16 span them (inter table), groups of 8 stay in one node each
    ranks = tuple(range(16))
    piece = (Piece(0, 0, 2 * S),)
    inter = price_units_of([0], [ranks], [piece], [0.0], cm, [2], [None]).last.unit(0)
    assert inter == cm.unit_cost([2 * S], 16, inter_node=True, ulysses=2, ulysses_inter=False)
    shifted = price_units_of([0], [tuple(range(4, 20))], [piece], [0.0], cm, [8], [None]).last.unit(0)
    assert shifted == cm.unit_cost([2 * S], 16, inter_node=True, ulysses=8, ulysses_inter=True)


def test_allgather_working_bytes():
    m = load_model("llama-7b")
    # 65536 tokens x 2 x 1024 / (1 x 2) x (2 + 4) B
    assert allgather_cp_working_bytes(m, 1, 2, 65536, 2) == 65536 * 1024 * 6
