"""Megatron-core's recompute modules (costmodel.recompute, TrainingSpec.recompute_modules): the bytes each module
frees, hand-computed against recompute none; what each replays, recomputed from the profile's own lookups; what
Megatron-core refuses; plans that record them, and the replay that refuses to run them as its own."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from costmodel.memory import layer_activation_per_token, memory_budget, recompute_working_bytes_per_token
from costmodel.moe import ExpertLayout, moe_activation_bytes_per_token
from costmodel.presets import load_cluster, load_model
from costmodel.recompute import effective_modules
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import _TOKEN_GRID, CostModel, gemm_shapes
from planner.api import PlanRequest, resolve_setup
from planner.plan import Plan, PlanError
from planner.runtime.launch import replay_recompute
from profiles.table import load_profile

_PROFILE = load_profile("h100-sxm.analytic")
S = float(_TOKEN_GRID[150])  # a token count on the cost model's grid: its curves are exact there


def setup(model: str, gpus: int = 64, **training) -> Setup:
    return Setup(load_model(model), load_cluster("dgx-h100").with_gpus(gpus), TrainingSpec(**training))


def saved(s: Setup, modules=None) -> float:
    """Saved bytes per token per layer: selective with `modules`, or recompute none."""
    tr = dataclasses.replace(s.training, recompute="selective" if modules else "none", recompute_modules=modules)
    return layer_activation_per_token(dataclasses.replace(s, training=tr))


def test_dense_mlp_frees_all_but_its_input():
    s = setup("llama3-8b", tp=2, recompute="selective", recompute_modules=("mlp",))
    m = s.model
    h, f = m.hidden, m.ffn
    # the fused norm's output (2h, split over tp by SP), gate and up (4f) and the activation's output (2f), over tp 2
    assert saved(s, ("mlp",)) == pytest.approx(saved(s) - (2 * h + 6 * f) / 2)
    fp8 = dataclasses.replace(s, training=dataclasses.replace(s.training, dtype="fp8"))
    assert saved(fp8, ("mlp",)) == pytest.approx(saved(fp8) - (h + 5 * f) / 2)  # fp8 casts of the GEMMs' inputs


def test_dense_layers_norms_are_fused_and_moe_modules_do_nothing():
    s = setup("llama3-8b", tp=2)
    for mods in (("layernorm",), ("moe",), ("shared_experts",), ("core_attn",)):
        assert saved(s, mods) == saved(s)  # flash attention: core_attn frees nothing either
    assert effective_modules(s.model, ("layernorm", "moe", "mlp")) == {"mlp"}


def test_moe_modules_free_hand_computed():
    s = setup("qwen3-30b-a3b", tp=4, ep=4, moe_grouped_gemm=True)
    m, t = s.model, 4
    h, f, k = m.hidden, m.ffn, m.top_k
    assert saved(s, ("layernorm",)) == pytest.approx(saved(s) - 2 * h / t)  # the pre-MLP norm's output
    assert saved(s, ("moe_act",)) == pytest.approx(saved(s) - 2 * k * f / t)  # the routed activation's output
    lay = ExpertLayout.of(s.training)
    inside = 6 * k * f / t + moe_activation_bytes_per_token(m, lay, "none")
    assert saved(s, ("moe",)) == pytest.approx(saved(s) - inside)
    assert saved(s, ("moe", "moe_act")) == saved(s, ("moe",))  # moe_act is inside the checkpointed layer
    assert saved(s, ("mlp",)) == saved(s)  # Megatron's mlp leaves MoE layers alone


def test_shared_expert_and_fp8_terms_hand_computed():
    s = setup("deepseek-v3", gpus=1024, tp=8, ep=8, pp=16, moe_grouped_gemm=True)
    m, t = s.model, 8
    assert saved(s, ("shared_experts",)) == pytest.approx(saved(s) - 6 * m.shared_expert_ffn / t)  # gate, up; act
    fp8 = dataclasses.replace(s, training=dataclasses.replace(s.training, dtype="fp8", fp8_recipe="tensorwise"))
    none = saved(fp8)
    ln, sh = none - saved(fp8, ("layernorm",)), none - saved(fp8, ("shared_experts",))
    # the shared expert's own fp8 copy of its input (h/t) is freed once, by either module
    assert none - saved(fp8, ("layernorm", "shared_experts")) == pytest.approx(ln + sh - m.hidden / t)
    assert sh == pytest.approx(5 * m.shared_expert_ffn / t + m.hidden / t)  # the down input its fp8 cast
    # under fp8 the core's bf16 output is kept beside the projection's fp8 cast: core_attn frees it
    assert none - saved(fp8, ("core_attn",)) == pytest.approx(2 * m.attn_out_width / t)
    assert saved(s, ("core_attn",)) == saved(s)  # bf16: the projection saves that same tensor


def test_dense_layers_of_an_moe_model_take_the_mean():
    s = setup("deepseek-v3", tp=8, ep=8, moe_grouped_gemm=True)  # pp 1: its 3 dense layers of 61 are priced
    m, t = s.model, 8
    mu = m.moe_fraction
    # MLA's input norm in every layer, the pre-MLP norm in the MoE layers only (the dense ones fuse it into fc1)
    assert saved(s, ("layernorm",)) == pytest.approx(saved(s) - 2 * m.hidden / t * (1 + mu))
    dense_mlp = 2 * m.hidden / t + 6 * m.dense_ffn / t  # the fused norm's output, gate and up, the activation's
    assert saved(s, ("mlp",)) == pytest.approx(saved(s) - (1 - mu) * dense_mlp)


def test_the_backward_rebuilds_one_layer_of_what_was_freed():
    s = setup("llama3-8b", tp=2, recompute="selective", recompute_modules=("mlp",))
    freed = saved(s) - saved(s, ("mlp",))
    assert memory_budget(s).recompute_working_bytes_per_token == pytest.approx(freed)
    mixed = setup("deepseek-v3", tp=8, ep=8, moe_grouped_gemm=True, recompute="selective",
                  recompute_modules=("mlp",))
    # a peak, not the mean: the dense layers' MLP, which the MoE layers do not free
    dense_mlp = 2 * mixed.model.hidden / 8 + 6 * mixed.model.dense_ffn / 8
    assert recompute_working_bytes_per_token(mixed) == pytest.approx(dense_mlp)


def test_latent_attention_modules_free_hand_computed():
    s = setup("deepseek-v3", gpus=1024, tp=8, ep=8, pp=16, moe_grouped_gemm=True)
    m, t = s.model, 8
    qkv = 2 * (m.q_width + 2 * m.kv_width) / t + 2 * (m.q_lora_rank + m.kv_lora_rank) / t
    assert saved(s, ("mla_up_proj",)) == pytest.approx(saved(s) - qkv)
    # the input norm (MLA: its own module) and the MoE layers' pre-MLP norm, every layer of the busiest stage MoE
    assert saved(s, ("layernorm",)) == pytest.approx(saved(s) - 2 * 2 * m.hidden / t)


def _cm(s: Setup, modules) -> CostModel:
    tr = dataclasses.replace(s.training, recompute="selective" if modules else "none", recompute_modules=modules)
    return CostModel(dataclasses.replace(s, training=tr), _PROFILE)


def test_core_attn_replays_the_attention_forward():
    s = setup("llama3-8b", tp=2)
    base, rec = _cm(s, None).unit_cost([int(S)]), _cm(s, ("core_attn",)).unit_cost([int(S)])
    assert rec.attn_bwd_compute_s - base.attn_bwd_compute_s == pytest.approx(base.attn_fwd_compute_s)
    assert rec.bwd_compute_s - base.bwd_compute_s == pytest.approx(base.attn_fwd_compute_s)


def test_mlp_replays_its_gemms_kernels_and_tp_pair():
    s = setup("llama3-8b", tp=2)
    none, mlp = _cm(s, None), _cm(s, ("mlp",))
    gemms = sum(_PROFILE.gemm_time_s(S, g.n, g.k) for g in gemm_shapes(s.model, 2) if g.label in ("gate_up", "down"))
    assert float(mlp._lookup("gemm_recompute", S)) == pytest.approx(float(gemms), rel=1e-6)
    l = none.layers_per_stage
    base, rec = none.unit_cost([int(S)]), mlp.unit_cost([int(S)])
    kernels = float(mlp._lookup("mem_recompute", S))
    assert kernels > 0  # the fused norm and the activation
    assert rec.bwd_compute_s - base.bwd_compute_s == pytest.approx(l * (float(gemms) + kernels), rel=1e-6)
    assert rec.tp_comm_bwd_s - base.tp_comm_bwd_s == pytest.approx(l * float(none.tp_pair_s(S, layer=True)), rel=1e-6)


def test_moe_replays_the_dispatch_and_combine():
    s = setup("qwen3-30b-a3b", tp=4, ep=4, moe_grouped_gemm=True)
    none, moe = _cm(s, None), _cm(s, ("moe",))
    base, rec = none.unit_cost([int(S)]), moe.unit_cost([int(S)])
    a2a = float(none._lookup("moe_comm", S))
    assert a2a > 0
    assert rec.tp_comm_bwd_s - base.tp_comm_bwd_s == pytest.approx(none.layers_per_stage * a2a, rel=1e-6)
    assert rec.fwd_s == pytest.approx(base.fwd_s)  # the forward is what it was


@pytest.mark.parametrize("training, needle", [
    (dict(recompute="none", recompute_modules=("mlp",)), "apply to recompute selective"),
    (dict(recompute="selective", recompute_modules=()), "is empty"),
    (dict(recompute="selective", recompute_modules=("mlp",), kernels="eager"), "the replay"),
])
def test_training_spec_refusals(training, needle):
    with pytest.raises(SpecError, match=needle):
        TrainingSpec(**training)


def test_auto_recompute_refuses_modules_it_would_not_keep():
    req = PlanRequest(model="llama3-8b", gpus=64, recompute="auto", recompute_modules=("mla_up_proj",))
    with pytest.raises(SpecError, match="multi-head latent attention"):
        resolve_setup(req)  # auto keeps none here; the refusal is not swallowed
    with pytest.raises(SpecError, match="more than once"):
        TrainingSpec(recompute="selective", recompute_modules=("mlp", "mlp"))


def test_setup_refusals_as_megatron_core():
    with pytest.raises(SpecError, match="needs moe_grouped_gemm"):
        setup("qwen3-30b-a3b", tp=4, ep=4, recompute="selective", recompute_modules=("moe_act",))
    with pytest.raises(SpecError, match="multi-head latent attention"):
        setup("llama3-8b", recompute="selective", recompute_modules=("mla_up_proj",))
    fp8 = dict(tp=4, ep=4, moe_grouped_gemm=True, dtype="fp8", recompute="selective", recompute_modules=("layernorm",))
    with pytest.raises(SpecError, match="recompute layernorm under fp8 .*default on H100.* tensorwise, or drop"):
        setup("qwen3-30b-a3b", **fp8)  # Transformer Engine's default recipe on an H100 is delayed scaling
    setup("qwen3-30b-a3b", **fp8, fp8_recipe="tensorwise")


def test_round_trip_and_old_plans():
    tr = TrainingSpec(recompute="selective", recompute_modules=("moe_act", "layernorm"), moe_grouped_gemm=True)
    d = json.loads(json.dumps(tr.to_dict()))
    assert d["recompute_modules"] == ["moe_act", "layernorm"]
    assert TrainingSpec.from_dict(d) == tr
    assert "recompute_modules" not in TrainingSpec(recompute="selective").to_dict()  # old plans stay as they were


def test_plan_records_modules_and_the_replay_refuses_them(tmp_path):
    out = tmp_path / "plan.json"
    runner = CliRunner()
    r = runner.invoke(app, ["plan", "--model", "tiny", "--cluster", "local-cpu", "--gpus", "4", "--tokens-per-step",
                            "16K", "--max-context", "4K", "--recompute", "selective", "--recompute-modules",
                            "core_attn,mlp", "--out", str(out), "--compare", "static"])
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.meta["training"]["recompute_modules"] == ["core_attn", "mlp"]
    with pytest.raises(PlanError, match="pass --recompute"):
        replay_recompute(plan, None, str(out))
    assert replay_recompute(plan, "selective", str(out)) == "selective"
    bad = runner.invoke(app, ["plan", "--recompute", "full", "--recompute-modules", "mlp", "--out", str(out)])
    assert bad.exit_code != 0 and "selective" in bad.output
    assert np.isfinite(plan.meta["dkv_activation_ratio"])


def test_core_attn_replays_the_context_parallel_exchange():
    s = setup("llama3-8b", tp=1)
    for cp in ("ring", "allgather"):
        sc = dataclasses.replace(s, training=dataclasses.replace(s.training, cp=cp))
        base, rec = _cm(sc, None).unit_cost([65536], degree=4), _cm(sc, ("core_attn",)).unit_cost([65536], degree=4)
        assert rec.ring_exposed_fwd_s == pytest.approx(base.ring_exposed_fwd_s)
        assert rec.ring_comm_s > base.ring_comm_s and rec.ring_exposed_bwd_s >= base.ring_exposed_bwd_s
        mlp = _cm(sc, ("mlp",)).unit_cost([65536], degree=4)  # no core replayed: the exchange runs once
        assert mlp.ring_comm_s == pytest.approx(base.ring_comm_s)


def test_mlp_replays_its_exposed_pair_under_tp_overlap():
    s = setup("llama3-8b", tp=2, tp_comm_overlap=True)
    none, mlp = _cm(s, None), _cm(s, ("mlp",))
    base, rec = none.unit_cost([int(S)]), mlp.unit_cost([int(S)])
    _, _, mlp_f = none._overlapped_tp_comm_s(np.array([S]))
    assert float(mlp_f[0]) > 0
    assert rec.tp_comm_bwd_s - base.tp_comm_bwd_s == pytest.approx(none.layers_per_stage * float(mlp_f[0]), rel=1e-6)
    assert rec.tp_comm_fwd_s == pytest.approx(base.tp_comm_fwd_s)
