"""MoE with expert parallelism folded into the TP group (costmodel.moe): hand-computed all-to-all bytes, expert GEMM
rows and activation bytes; ep validation; a Mixtral 8x22B plan with ep 8 produced, validated and simulated."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli import app
from costmodel.flops import linear_flops_per_token
from costmodel.memory import model_state_bytes, params_per_rank
from costmodel.moe import ExpertLayout, dispatch_bytes, expert_gather_bytes, moe_comm_fwd_s, moe_kernels
from costmodel.presets import load_cluster, load_model
from costmodel.specs import ModelSpec, Setup, SpecError, TrainingSpec
from costmodel.timing import _TOKEN_GRID, CostModel, gemm_shapes
from profiles.table import load_profile

H, F, E, K = 6144, 16384, 8, 2  # Mixtral 8x22B: hidden, expert ffn, experts, top_k
S = float(_TOKEN_GRID[150])  # a token count on the cost model's grid: its curves are exact there
_PROFILE = load_profile("h100-sxm.analytic")


@pytest.fixture(scope="module")
def mixtral():
    return load_model("mistral-8x22b")


@pytest.fixture(scope="module")
def profile():
    return _PROFILE


def cost_model(model, profile, **training) -> CostModel:
    tr = TrainingSpec(**{"tp": 8, "pp": 4, **training})
    return CostModel(Setup(model, load_cluster("dgx-h100").with_gpus(128), tr), profile)


def test_all_to_all_and_gather_bytes_hand_computed(mixtral):
    lay = ExpertLayout(tp=8, ep=4, capacity_factor=1.25)
    # each TP rank sends its 8192/8 tokens' 2 copies, x1.25 on the busiest rank, of 6144 bf16 values
    assert float(dispatch_bytes(8192, mixtral, lay, 2)) == 1024 * 2 * 1.25 * 6144 * 2 == 31_457_280
    # after the ETP all-gather a rank holds its 2 experts' rows: 8192·2·1.25/4 rows of 6144 values
    assert float(expert_gather_bytes(8192, mixtral, lay, 2)) == 5120 * 6144 * 2


def test_expert_gemm_rows_and_shapes_hand_computed(mixtral):
    shapes = {g.label: g for g in gemm_shapes(mixtral, 8, ExpertLayout(tp=8, ep=4, capacity_factor=1.25))}
    up, down, router = shapes["gate_up"], shapes["down"], shapes["router"]
    # m = s·k·cf/E = 8192·2·1.25/8 = 2560 rows per expert, E/ep = 2 local experts, columns over etp = 2
    assert 8192 * up.rows_per_token == 2560 and up.launches == 2
    assert (up.n, up.k) == (2 * F // 2, H) and (down.n, down.k, down.launches) == (H, F // 2, 2)
    assert (router.n, router.k, router.rows_per_token) == (E, H, 1 / 8)  # s/tp tokens per rank (SP)
    grouped = {g.label: g for g in gemm_shapes(mixtral, 8, ExpertLayout(tp=8, ep=4, grouped_gemm=True))}["down"]
    assert (8192 * grouped.rows_per_token, grouped.launches) == (8192 * 2 * 2 / 8, 1)  # 2 experts' rows at once
    dense = {g.label: g for g in gemm_shapes(load_model("llama-7b"), 8)}
    assert "router" not in dense and dense["gate_up"].rows_per_token == 1 and dense["gate_up"].launches == 1


def test_layer_gemms_priced_at_per_expert_rows(mixtral, profile):
    cm = cost_model(mixtral, profile, ep=8)
    g = lambda m, n, k: float(profile.gemm_time_s(m, n, k, "bf16"))  # noqa: E731
    q, kv = mixtral.q_width, mixtral.kv_width
    # ep = 8 = tp: one whole expert per rank on s·2/8 rows; the router on the rank's s/8 tokens
    want = (g(S, (q + 2 * kv) // 8, H) + g(S, H, q // 8) + g(S * K / E, 2 * F, H) + g(S * K / E, H, F)
            + g(S / 8, E, H))
    assert float(cm.gemm_layer_fwd_s(S)) == pytest.approx(want, rel=1e-9)
    ep1 = cost_model(mixtral, profile)  # 8 experts per rank, launched one by one, columns over tp = 8
    want1 = want - g(S * K / E, 2 * F, H) - g(S * K / E, H, F) + 8 * (g(S * K / E, 2 * F // 8, H)
                                                                     + g(S * K / E, H, F // 8))
    assert float(ep1.gemm_layer_fwd_s(S)) == pytest.approx(want1, rel=1e-9)


def test_backward_expert_gemms_one_weight_gradient_per_expert(mixtral, profile):
    # dgrad at the transposed shape over all the rank's rows; wgrad one k x n weight per expert, each over its own
    # rows, whether the experts launch one by one or grouped (2 local experts at ep = 4)
    g = lambda m, n, k: float(profile.gemm_time_s(m, n, k, "bf16"))  # noqa: E731
    rows = S * K / E
    for grouped in (False, True):
        cm = cost_model(mixtral, profile, ep=4, moe_grouped_gemm=grouped)
        down = next(x for x in cm._layer_gemms(mixtral) if x[0].label == "down")
        shape, _, dgrad, wgrad = down
        i = int(np.searchsorted(_TOKEN_GRID, S))
        n, k = shape.n, shape.k
        want_d = g(2 * rows, k, n) if grouped else 2 * g(rows, k, n)
        assert dgrad[i] == pytest.approx(want_d, rel=1e-9) and wgrad[i] == pytest.approx(2 * g(k, n, rows), rel=1e-9)


def test_all_to_all_replaces_the_mlp_tp_pair(mixtral, profile):
    ep8, ep1 = cost_model(mixtral, profile, ep=8), cost_model(mixtral, profile)
    a2a = float(profile.collective_time_s("all_to_all", S / 8 * K * H * 2, 8, "intra"))
    pair = float(ep8.tp_pair_s(S))
    assert float(ep8.layer_tp_comm_s(S)[0]) == pytest.approx(pair + 2 * a2a, rel=1e-9)
    assert float(ep1.layer_tp_comm_s(S)[0]) == pytest.approx(2 * pair, rel=1e-9)  # all-gather dispatcher
    lay = ExpertLayout(tp=8, ep=2)  # etp = 4: the all-to-all over 2 ranks, then all-gather / reduce-scatter over 4
    g = S * K / 2 * H * 2
    want = (2 * profile.collective_time_s("all_to_all", S / 8 * K * H * 2, 2, "intra")
            + profile.collective_time_s("all_gather", g, 4, "intra")
            + profile.collective_time_s("reduce_scatter", g, 4, "intra"))
    assert float(moe_comm_fwd_s(profile, S, mixtral, lay, 2)) == pytest.approx(float(want), rel=1e-12)
    u8, u1 = ep8.unit_cost([int(S)]), ep1.unit_cost([int(S)])
    assert u8.tp_comm_fwd_s == pytest.approx(ep8.layers_per_stage * (pair + 2 * a2a), rel=1e-9)
    assert u8.tp_comm_s < u1.tp_comm_s  # s/2 rows of the all-to-alls vs 2s of the pair


def test_capacity_factor_scales_the_busiest_rank(mixtral, profile):
    lay, skew = ExpertLayout(tp=8, ep=8), ExpertLayout(tp=8, ep=8, capacity_factor=1.5)
    assert float(dispatch_bytes(S, mixtral, skew, 2)) == 1.5 * float(dispatch_bytes(S, mixtral, lay, 2))
    extra = {k.label: k.bytes_per_item for k in moe_kernels(mixtral, skew, 2, "fwd")}
    assert extra["swiglu_imbalance"] == pytest.approx(0.5 * F * K / 8 * 3 * 2)  # (cf − 1)·k·f/tp·3 B
    balanced, skewed = cost_model(mixtral, profile, ep=8), cost_model(mixtral, profile, ep=8, moe_capacity_factor=1.5)
    assert skewed.unit_cost([int(S)]).total_s > balanced.unit_cost([int(S)]).total_s
    with pytest.raises(SpecError, match="moe_capacity_factor"):
        TrainingSpec(tp=8, ep=8, moe_capacity_factor=0.8)


def test_ep_validation_errors(mixtral):
    cluster = load_cluster("dgx-h100").with_gpus(64)
    with pytest.raises(SpecError, match="exceeds tp=4.*lockstep under HDP.*--ep at most --tp"):
        TrainingSpec(tp=4, ep=8)
    with pytest.raises(SpecError, match="ep=4 must divide tp=6"):
        TrainingSpec(tp=6, ep=4)
    six = ModelSpec(name="six", layers=2, hidden=64, heads=4, kv_heads=4, head_dim=16, ffn=32, vocab=128,
                    experts=6, top_k=2)
    with pytest.raises(SpecError, match="ep=4 must divide the 6 experts"):
        Setup(six, cluster, TrainingSpec(tp=4, ep=4))
    with pytest.raises(SpecError, match="dense"):
        Setup(load_model("llama-7b"), cluster, TrainingSpec(tp=8, ep=2))
    with pytest.raises(SpecError, match="sequence parallelism"):
        Setup(mixtral, cluster, TrainingSpec(tp=8, ep=8, sequence_parallel=False))


def test_cli_refuses_ep_beyond_tp_in_one_line():
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["plan", "--model", "mistral-8x7b", "--gpus", "64", "--tp", "4", "--ep", "8"])
    assert r.exit_code == 2 and "exceeds tp=4" in r.stderr and "Traceback" not in r.output, r.output


def test_expert_states_sharded_by_ep_etp_and_activations_by_ep(mixtral, profile):
    cluster = load_cluster("dgx-h100").with_gpus(128)
    setups = {ep: Setup(mixtral, cluster, TrainingSpec(tp=8, pp=4, ep=ep)) for ep in (1, 2, 8)}
    # E/ep experts of 3hf/etp each = 8·3hf/8 whatever the split: the dense MLP's 1/tp
    experts_per_rank = mixtral.layers // 4 * E * 3 * H * F / 8
    rest = (mixtral.layers // 4 * (mixtral.layer_params() - E * mixtral.expert_params())
            + max(mixtral.input_embedding_params(), mixtral.head_params())) / 8
    for s in setups.values():
        assert params_per_rank(s) == pytest.approx(experts_per_rank + rest, rel=1e-12)
    assert model_state_bytes(setups[1]) == model_state_bytes(setups[8])
    # one TP group of 8 holding the experts vs none: the states drop by 7/8 of the experts
    one = Setup(mixtral, cluster, TrainingSpec(tp=1, pp=4))
    assert params_per_rank(one) - params_per_rank(setups[8]) == pytest.approx(
        (experts_per_rank + rest) * 7, rel=1e-12)
    # saved activations per token per layer: dispatched rows 2hk/ep and routing-weighted outputs (all-gather
    # dispatcher: the same rows; all-to-all: the rank's own 2hk/tp); recompute none
    a = {ep: cost_model(mixtral, profile, ep=ep, recompute="none").a_tok for ep in (1, 8)}
    assert a[1] - a[8] == pytest.approx((4 * H * K) - (2 * H * K / 8 + 2 * H * K / 8))


def test_fp8_keeps_the_dispatched_rows_as_fp8_casts(mixtral):
    # Transformer Engine's GroupedLinear saves the columnwise fp8 cast of its input for the weight gradient: the
    # dispatched rows cost h·G·k/ep bytes per token in fp8 where bf16 keeps 2h·G·k/ep; the combined outputs and
    # the imbalance terms stay bf16
    from costmodel.moe import moe_activation_bytes_per_token

    for lay in (ExpertLayout(tp=8, ep=8), ExpertLayout(tp=1, ep=8, etp=1, capacity_factor=1.25)):
        bf16 = moe_activation_bytes_per_token(mixtral, lay, "none", 2)
        fp8 = moe_activation_bytes_per_token(mixtral, lay, "none", 2, fp8=True)
        assert bf16 - fp8 == pytest.approx(H * lay.groups * K * lay.capacity_factor / lay.ep)
    assert moe_activation_bytes_per_token(mixtral, ExpertLayout(tp=8, ep=8), "full", 2, fp8=True) == 0.0


def test_mixtral_8x22b_ep8_plan_validated_and_simulated():
    from planner.api import PlanRequest, cost_model_for_plan, make_plan
    from planner.plan import Plan, validate
    from planner.simulate import simulate_step

    req = PlanRequest(model="mistral-8x22b", gpus=128, tp=8, ep=8, pp=4, max_context_tokens=128 * 1024)
    plan = make_plan(req, "hdp")
    validate(plan)
    assert plan.meta["training"]["ep"] == 8 and plan.mesh.tp == 8
    again = Plan.from_dict(plan.to_dict())
    cm = cost_model_for_plan(again)
    assert cm.experts.ep == 8 and cm.experts.etp == 1
    sim = simulate_step(again.steps[0], cm)
    assert np.isfinite(sim.step_time_s) and sim.step_time_s > 0
    dense_meta = dataclasses.replace(req, model="llama-7b", ep=1, pp=1, max_context_tokens=8192)
    assert "ep" not in make_plan(dense_meta, "static").meta["training"]  # dense plans unchanged


def test_fine_grained_preset_and_flops():
    q = load_model("qwen3-30b-a3b")
    assert (q.experts, q.top_k, q.ffn) == (128, 8, 768)
    assert q.parameters == pytest.approx(30.5e9, rel=0.01) and q.active_parameters == pytest.approx(3.3e9, rel=0.02)
    h = q.hidden
    assert linear_flops_per_token(q) == (2 * h * (q.q_width + 2 * q.kv_width) + 2 * q.q_width * h
                                         + 2 * 3 * h * 768 * 8 + 2 * h * 128)
    small = {g.label: g for g in gemm_shapes(q, 8, ExpertLayout(tp=8, ep=8))}["gate_up"]
    assert (small.launches, 4096 * small.rows_per_token) == (16, 4096 * 8 / 128)  # 16 experts of 256 rows


def test_whatif_configs_take_min_ep_tp():
    from planner.studies.capacity import LayoutRules
    from planner.studies.sweep import SweepSpec

    cfgs = SweepSpec(models=("mistral-8x22b",), gpus=(64,), tps=(2, 8), ep=4, contexts_tokens=(8192,)).configs()
    assert [(c.tp, c.ep) for c in cfgs] == [(2, 2), (8, 4)]
    assert cfgs[1].key.endswith("|ep4") and cfgs[1].request().ep == 4
    assert "|ep" not in SweepSpec(gpus=(64,), contexts_tokens=(8192,)).configs()[0].key  # old journals resume
    assert (8, 4) in LayoutRules(tps=(8,), pps=(4,), ep=8).layouts("mistral-8x22b", "dgx-h100", 128)


@settings(max_examples=8, deadline=None)
@given(ep=st.sampled_from([1, 2, 4, 8]), cf=st.floats(1.0, 2.0), tokens=st.integers(256, 65536))
def test_unit_costs_finite_and_growing_with_imbalance(ep, cf, tokens):
    m, p = load_model("qwen3-30b-a3b"), _PROFILE
    base = cost_model(m, p, ep=ep, pp=1).unit_cost([tokens])
    skew = cost_model(m, p, ep=ep, pp=1, moe_capacity_factor=cf).unit_cost([tokens])
    assert np.isfinite(skew.total_s) and skew.total_s > 0
    assert skew.fwd_compute_s >= base.fwd_compute_s * (1 - 1e-12) and skew.tp_comm_s >= base.tp_comm_s * (1 - 1e-12)


# ---- expert groups beyond the TP group (etp given: Megatron-core's EP drawn from DP, lockstep layouts only) ----
def test_expert_group_over_tp_groups_hand_computed(mixtral, profile):
    # tp 2, ep 8, etp 1: an expert group of 8 ranks holds G = 4 TP groups; each rank one whole expert, which gets
    # the tokens of the 4 TP groups: G·s·k/E rows
    cm = cost_model(mixtral, profile, tp=2, ep=8, etp=1)
    lay = cm.experts
    assert (lay.etp, lay.groups, lay.inter_node) == (1, 4, False)  # 8 ranks in one node of 8
    up = {g.label: g for g in gemm_shapes(mixtral, 2, lay)}["gate_up"]
    assert (S * up.rows_per_token, up.launches, up.n) == (S * 4 * K / E, 1, 2 * F)
    assert float(dispatch_bytes(S, mixtral, lay, 2)) == S / 2 * K * H * 2  # its own s/tp tokens' k copies
    a2a = float(profile.collective_time_s("all_to_all", S / 2 * K * H * 2, 8, "intra"))
    assert float(moe_comm_fwd_s(profile, S, mixtral, lay, 2)) == pytest.approx(2 * a2a, rel=1e-12)
    assert float(cm.layer_tp_comm_s(S)[0]) == pytest.approx(float(cm.tp_pair_s(S)) + 2 * a2a, rel=1e-9)
    # the same layout over 16 ranks (etp 2): G = 8 TP groups, two nodes: the all-to-all is inter-node
    wide = cost_model(mixtral, profile, tp=2, ep=8, etp=2).experts
    assert (wide.groups, wide.inter_node) == (8, True)
    # tp 1: no TP collectives, the all-to-alls alone are the unit's communication
    tp1 = cost_model(mixtral, profile, tp=1, ep=8, etp=1)
    u = tp1.unit_cost([int(S)])
    want = tp1.layers_per_stage * 2 * float(profile.collective_time_s("all_to_all", S * K * H * 2, 8, "intra"))
    assert u.tp_comm_fwd_s == pytest.approx(want, rel=1e-9)


def test_folded_etp_given_prices_as_folded(mixtral, profile):
    folded, given = cost_model(mixtral, profile, ep=4), cost_model(mixtral, profile, ep=4, etp=2)
    assert given.experts.groups == 1 and given.unit_cost([int(S)]).total_s == folded.unit_cost([int(S)]).total_s
    assert given.step_end_s() == folded.step_end_s()
    assert model_state_bytes(given.setup) == model_state_bytes(folded.setup)


def test_wide_expert_group_sync_and_all_to_all_across_nodes(profile):
    q = load_model("qwen3-30b-a3b")
    # tp 2, ep 16, etp 1: expert groups of 16 ranks (G = 8 TP groups, two nodes); 128 GPUs, pp 1: 64 HDP ranks, the
    # experts sync over 8 ranks 16 GPUs apart, one per node: 8 such groups per node at once, not tp·G = 16
    cm = CostModel(Setup(q, load_cluster("dgx-h100").with_gpus(128), TrainingSpec(tp=2, ep=16, etp=1)), profile)
    from costmodel.memory import expert_params_per_rank
    experts = expert_params_per_rank(cm.setup)
    t = lambda op, p, g, c: float(profile.collective_time_s(op, p, g, "inter", c))  # noqa: E731
    dense = params_per_rank(cm.setup) - experts
    want = (t("reduce_scatter", dense * 4, 64, 2) + t("all_gather", dense * 2, 64, 2)
            + t("reduce_scatter", experts * 4, 8, 8) + t("all_gather", experts * 2, 8, 8))
    assert cm.grad_sync_s() == pytest.approx(want, rel=1e-12)
    # tp 4, ep 8, etp 4: the 8 EP members sit 4 apart over 32 ranks, four nodes: looked up at 32 ranks, not 8
    lay = ExpertLayout(tp=4, ep=8, etp=4, inter_node=True)
    a2a = float(profile.collective_time_s("all_to_all", S / 4 * 8 * 2048 * 2, 32, "inter"))
    g = S * 8 * 8 / 8 * 2048 * 2  # G·s·k/ep rows of h: the rank's experts' rows after the ETP gather
    want = 2 * a2a + float(profile.collective_time_s("all_gather", g, 4, "intra")
                           + profile.collective_time_s("reduce_scatter", g, 4, "intra"))
    assert float(moe_comm_fwd_s(profile, S, q, lay, 2)) == pytest.approx(want, rel=1e-12)


def test_inter_node_all_to_all_busbw_is_one_nic_times_k_over_k_minus_1(profile):
    # 16 and 32 ranks of 8-GPU nodes (k = 2, 4), a buffer far above the latency floor: busbw = S·(n-1)/n / (t - floor)
    from profiles.analytic import FLOOR_INTER_P2P, H100, P2P_NIC_EFF
    nic = H100.nic.value * P2P_NIC_EFF.value
    nbytes = 2.0**30
    for n, k in ((16, 2), (32, 4)):
        t = float(profile.collective_time_s("all_to_all", nbytes, n, "inter"))
        assert nbytes * (n - 1) / n / (t - FLOOR_INTER_P2P.value) == pytest.approx(nic * k / (k - 1), rel=1e-6)


def test_expert_group_states_and_sync_hand_computed(mixtral, profile):
    from costmodel.memory import expert_params_per_rank, state_bytes_per_param_parts

    cm = cost_model(mixtral, profile, tp=2, ep=8, etp=1)  # 128 GPUs, pp 4: 16 HDP ranks a stage, G = 4
    s = cm.setup
    n = mixtral.layers // 4
    experts = n * E * mixtral.expert_params() / 8  # E/ep experts, whole (etp 1)
    dense = (n * (mixtral.layer_params() - E * mixtral.expert_params())
             + max(mixtral.input_embedding_params(), mixtral.head_params())) / 2
    assert expert_params_per_rank(s) == pytest.approx(experts) and params_per_rank(s) == pytest.approx(dense + experts)
    kept, sharded = state_bytes_per_param_parts(s.training)
    # the dense states shard over the 16 HDP ranks, the experts' over the 16/4 ranks that hold the same experts
    want = (dense + experts) * kept + (dense / 16 + experts / 4) * sharded
    assert model_state_bytes(s) == pytest.approx(want, rel=1e-12)
    # gradient sync: the dense parameters over 16 ranks, then the experts over 4 ranks 4 apart (tp·G groups at once)
    t = lambda op, p, g, c: float(profile.collective_time_s(op, p, g, "inter", c))  # noqa: E731
    want_s = (t("reduce_scatter", dense * 4, 16, 2) + t("all_gather", dense * 2, 16, 2)
              + t("reduce_scatter", experts * 4, 4, 8) + t("all_gather", experts * 2, 4, 8))
    assert cm.grad_sync_s() == pytest.approx(want_s, rel=1e-12)
    # the optimizer updates 1/16 of the dense and 1/4 of its experts (Megatron's 46 B each), then zeroes the fp32
    # gradients of every parameter it holds
    assert cm.optimizer_step_s() == pytest.approx(
        float(profile.memory_time_s((dense / 16 + experts / 4) * 46) + profile.memory_time_s((dense + experts) * 4)),
        rel=1e-12)


def test_expert_group_validation_errors(mixtral):
    with pytest.raises(SpecError, match="ep=3 x etp=1 must be a multiple of tp=2"):
        TrainingSpec(tp=2, ep=3, etp=1)
    with pytest.raises(SpecError, match="etp=4 over tp=2 with ep=1"):
        TrainingSpec(tp=2, ep=1, etp=4)
    with pytest.raises(SpecError, match="zero_stage 3 with an expert group"):
        TrainingSpec(tp=1, ep=8, etp=1, zero_stage=3)
    with pytest.raises(SpecError, match="spans 8 TP groups, which must divide the 4 DP x CP ranks"):
        Setup(mixtral, load_cluster("dgx-h100").with_gpus(64), TrainingSpec(tp=8, pp=2, ep=8, etp=8))
    with pytest.raises(SpecError, match="etp applies to MoE models only"):
        Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64), TrainingSpec(tp=8, etp=8))
    with pytest.raises(SpecError, match="etp=16 must divide the 8 GPUs of an NVLink domain"):
        Setup(load_model("qwen3-30b-a3b"), load_cluster("dgx-h100").with_gpus(64), TrainingSpec(tp=8, ep=8, etp=16))
    with pytest.raises(ValueError, match="needs ep | tp; give etp"):
        ExpertLayout(tp=2, ep=8)
    # a run that does not fit says so, whatever its expert group (no ZeRO-3 suggestion it cannot take)
    with pytest.raises(SpecError, match="mistral-8x22b does not fit on H100 SXM") as e:
        CostModel(Setup(mixtral, load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=1, ep=8, etp=1)), _PROFILE)
    assert "zero_stage=3" not in str(e.value)


def test_plan_with_expert_group_beyond_tp_refused():
    from planner.api import PlanRequest, cost_model_for_plan, make_plan
    from planner.plan import Plan, PlanError

    plan = make_plan(PlanRequest(model="mistral-8x7b", gpus=64, tp=8, ep=8, max_context_tokens=8192), "static")
    d = plan.to_dict()
    d["meta"]["training"].update(ep=8, etp=4)
    with pytest.raises(PlanError, match="spans 4 HDP ranks"):
        cost_model_for_plan(Plan.from_dict(d))


def test_shared_expert_from_a_qwen_moe_config(tmp_path, profile):
    import json

    # Qwen1.5-MoE-A2.7B's config.json: 60 experts of 1,408, top-4, a shared expert of 5,632; published 14.3B / 2.7B
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_hidden_layers": 24,
           "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632,
           "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
           "num_experts_per_tok": 4, "vocab_size": 151936, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path / "config.json"))
    assert (m.experts, m.top_k, m.ffn, m.shared_expert_ffn) == (60, 4, 1408, 5632)
    assert m.parameters == pytest.approx(14.3e9, rel=0.01) and m.active_parameters == pytest.approx(2.7e9, rel=0.01)
    assert linear_flops_per_token(m) - linear_flops_per_token(dataclasses.replace(m, shared_expert_ffn=0)) == \
        2 * 3 * 2048 * 5632
    # its GEMMs: the shared expert's up (gate and up fused) and down over tp, one row per token
    shapes = {g.label: g for g in gemm_shapes(m, 4, ExpertLayout(tp=4, ep=4))}
    assert (shapes["shared_gate_up"].n, shapes["shared_gate_up"].k, shapes["shared_gate_up"].rows_per_token) == \
        (2 * 5632 // 4, 2048, 1.0)
    assert (shapes["shared_down"].n, shapes["shared_down"].k) == (2048, 5632 // 4)
    # a TP group prices the shared expert's gather and scatter beside the experts' all-to-alls; its states are
    # dense ones (over tp), its activation's elementwise work k·f + f_shared per token
    cm = CostModel(Setup(m, load_cluster("dgx-h100").with_gpus(64), TrainingSpec(tp=4, ep=4)), profile)
    none = CostModel(Setup(dataclasses.replace(m, shared_expert_ffn=0), load_cluster("dgx-h100").with_gpus(64),
                           TrainingSpec(tp=4, ep=4)), profile)
    assert float(cm.layer_tp_comm_s(S)[0]) == pytest.approx(float(none.layer_tp_comm_s(S)[0])
                                                             + float(cm.tp_pair_s(S, layer=True)), rel=1e-12)
    assert params_per_rank(cm.setup) - params_per_rank(none.setup) == pytest.approx(
        m.layers * 3 * 2048 * 5632 / 4, rel=1e-12)
    assert cm.unit_cost([int(S)]).total_s > none.unit_cost([int(S)]).total_s
    # routing imbalance scales the routed experts' activation only: the same extra bytes with or without the shared
    skew = {x.label: x.bytes_per_item for x in moe_kernels(m, ExpertLayout(tp=4, ep=4, capacity_factor=1.5), 2, "fwd")}
    bare = {x.label: x.bytes_per_item for x in moe_kernels(dataclasses.replace(m, shared_expert_ffn=0),
                                                           ExpertLayout(tp=4, ep=4, capacity_factor=1.5), 2, "fwd")}
    assert skew["swiglu_imbalance"] == pytest.approx(bare["swiglu_imbalance"]) == pytest.approx(0.5 * 4 * 1408 / 4 * 6)
    with pytest.raises(SpecError, match="shared_expert_ffn \\(64\\) needs routed experts"):
        dataclasses.replace(load_model("tiny"), shared_expert_ffn=64)
