"""MoE models whose first layers are dense (ModelSpec.dense_layers): parameters counted layer by layer against
published totals, every per-layer price the shares' mean of an all-MoE and an all-dense model, the HF rules of
DeepSeek, GLM and Qwen-MoE, and the spec's errors."""

import dataclasses
import json

import numpy as np
import pytest

from costmodel.flops import linear_flops_per_token
from costmodel.memory import (activation_bytes_per_token_layer, expert_params_per_rank, fp8_gemm_params_parts,
                              params_per_rank)
from costmodel.presets import load_cluster, load_model
from costmodel.specs import ModelSpec, Setup, SpecError, TrainingSpec
from costmodel.timing import _TOKEN_GRID, CostModel, profile_gemm_shapes
from profiles.table import load_profile

_PROFILE = load_profile("h100-sxm.analytic")
S = float(_TOKEN_GRID[150])  # a token count on the cost model's grid: its curves are exact there

# DeepSeekMoE 16B's config.json (deepseek-ai/deepseek-moe-16b-base): the first layer dense (first_k_dense_replace
# 1, intermediate_size 10944), 27 layers of 64 routed experts of 1408, top 6, and 2 shared ones; published 16.4B
# parameters, 2.8B active (Dai et al. 2024, DeepSeekMoE, Table 1)
DEEPSEEK_MOE_16B = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "num_hidden_layers": 28, "hidden_size": 2048,
    "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "vocab_size": 102400, "tie_word_embeddings": False}


def _hf(tmp_path, cfg: dict) -> ModelSpec:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_model(str(tmp_path / "config.json"))


def _kinds(m: ModelSpec) -> tuple[ModelSpec, ModelSpec]:
    """The model with every layer MoE, and with every layer dense."""
    (_, moe), (_, dense) = m.layer_kinds()
    return moe, dense


def test_deepseek_moe_16b_counts_its_published_parameters(tmp_path):
    m = _hf(tmp_path, DEEPSEEK_MOE_16B)
    assert (m.layers, m.dense_layers, m.dense_ffn, m.experts, m.top_k, m.ffn, m.shared_expert_ffn) == \
        (28, 1, 10944, 64, 6, 1408, 2 * 1408)
    assert m.parameters == pytest.approx(16.4e9, rel=0.01) and m.active_parameters == pytest.approx(2.8e9, rel=0.02)
    moe, dense = _kinds(m)
    h, attn = 2048, 4 * 2048 * 2048
    assert dense.layer_params() == attn + 3 * h * 10944 + 2 * h  # a Llama layer of 10944
    assert moe.layer_params() == attn + (64 + 2) * 3 * h * 1408 + h * 64 + 2 * h  # 64 routed + 2 shared, router
    assert m.parameters == 27 * moe.layer_params() + dense.layer_params() + 2 * 102400 * h + h
    assert m.routed_expert_params() == pytest.approx(27 / 28 * 64 * 3 * h * 1408)


def test_hf_rules_of_each_family(tmp_path):
    # GLM-4.5: the preset, read from its config.json keys
    glm = _hf(tmp_path, {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "num_hidden_layers": 92,
        "hidden_size": 5120, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "vocab_size": 151552, "attention_bias": True})
    preset = load_model("glm-4.5")
    assert dataclasses.replace(glm, name=preset.name, source=preset.source) == preset
    # Qwen-MoE: every decoder_sparse_step-th layer (counting from 1) outside mlp_only_layers has experts
    qwen = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_hidden_layers": 8,
            "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024, "moe_intermediate_size": 128,
            "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000}
    assert _hf(tmp_path, {**qwen, "decoder_sparse_step": 2}).dense_layers == 4  # layers 1, 3, 5, 7 MoE
    assert _hf(tmp_path, {**qwen, "decoder_sparse_step": 2, "mlp_only_layers": [1, 2]}).dense_layers == 5
    assert _hf(tmp_path, {**qwen, "decoder_sparse_step": 1, "mlp_only_layers": []}).dense_layers == 0
    # DeepSeek's moe_layer_freq: MoE from first_k_dense_replace on, every freq-th
    assert _hf(tmp_path, {**DEEPSEEK_MOE_16B, "moe_layer_freq": 2}).dense_layers == 28 - 13  # layers 2, 4, ..., 26
    # no layer with experts: a dense model of intermediate_size
    dense = _hf(tmp_path, {**qwen, "mlp_only_layers": list(range(8))})
    assert (dense.experts, dense.ffn, dense.dense_layers) == (1, 1024, 0)
    # multi-head latent attention is refused, not misread as GQA
    with pytest.raises(SpecError, match="multi-head latent attention \\(kv_lora_rank 512"):
        _hf(tmp_path, {**DEEPSEEK_MOE_16B, "kv_lora_rank": 512, "q_lora_rank": 1536})


def test_every_layer_price_is_the_shares_mean(tmp_path):
    """A model of L layers, D of them dense: each per-layer term (GEMMs, attention, elementwise kernels, TP and
    expert communication, activations, parameters, FLOPs) is (L−D)/L of the all-MoE model's and D/L of the
    all-dense one's; the head is the same."""
    # spread dense layers (Qwen-MoE's decoder_sparse_step): every pipeline stage holds the mean layer
    m = dataclasses.replace(load_model("glm-4.5"), layers=8, dense_layers=2, experts=16, top_k=4,
                            dense_layers_first=False)
    moe, dense = _kinds(m)
    mu = 6 / 8
    cluster = load_cluster("dgx-h100").with_gpus(64)
    for training in (TrainingSpec(tp=8, ep=8, pp=2), TrainingSpec(tp=4, ep=2, pp=2, tp_comm_overlap=True),
                     TrainingSpec(tp=2, ep=2, pp=2, dtype="fp8", recompute="full")):
        cms = [CostModel(Setup(x, cluster, training if x.is_moe else dataclasses.replace(training, ep=1)), _PROFILE)
               for x in (m, moe, dense)]  # ep has no say over a dense layer
        costs = [cm.unit_cost([int(S)], with_head=True) for cm in cms]
        for part in ("fwd_compute_s", "bwd_compute_s", "tp_comm_fwd_s", "tp_comm_bwd_s", "mem_fwd_s", "mem_bwd_s",
                     "attn_fwd_compute_s"):
            mixed, a, b = (getattr(c, part) for c in costs)
            assert mixed == pytest.approx(mu * a + (1 - mu) * b, rel=1e-9), (training, part)
        assert costs[0].head_fwd_s == pytest.approx(costs[1].head_fwd_s, rel=1e-12)
        mixed, a, b = (cm.a_tok for cm in cms)
        assert mixed == pytest.approx(mu * a + (1 - mu) * b, rel=1e-12)
        mixed, a, b = (params_per_rank(cm.setup) for cm in cms)
        assert mixed == pytest.approx(mu * a + (1 - mu) * b, rel=1e-12)
        assert expert_params_per_rank(cms[0].setup) == pytest.approx(mu * expert_params_per_rank(cms[1].setup))
        assert expert_params_per_rank(cms[2].setup) == 0.0
    # an fp8 layer's weights: the dense MLP over tp with the attention, the routed experts apart
    (over_tp, experts), (moe_tp, moe_experts), (dense_tp, dense_experts) = (
        fp8_gemm_params_parts(x, 4, 8) for x in (m, moe, dense))
    assert dense_experts == 0.0 and dense_tp == (5120 * (2 * 12288 + 2 * 1024) + 3 * 5120 * 12288) / 4
    assert (over_tp, experts) == pytest.approx((mu * moe_tp + (1 - mu) * dense_tp, mu * moe_experts))
    assert linear_flops_per_token(m) == pytest.approx(mu * linear_flops_per_token(moe)
                                                      + (1 - mu) * linear_flops_per_token(dense))
    assert activation_bytes_per_token_layer(m, 8, "none") == pytest.approx(
        mu * activation_bytes_per_token_layer(moe, 8, "none") + (1 - mu) * activation_bytes_per_token_layer(
            dense, 8, "none"))
    assert m.mlp_width_per_token == pytest.approx(mu * (4 * 1536 + 1536) + (1 - mu) * 12288)
    # `meshplan profile --models` measures the dense MLP's GEMMs too
    shapes = {label: (n, k) for label, n, k in profile_gemm_shapes({"g": m})}
    assert shapes["g.dense_gate_up"] == (2 * 12288, 5120) and shapes["g.gate_up"] == (2 * 1536, 5120)
    assert np.isfinite(CostModel(Setup(m, cluster, TrainingSpec(tp=8, ep=8, pp=2)), _PROFILE).grad_sync_s())


def test_dense_first_layers_price_the_busiest_stage():
    """DeepSeek-V3's 3 dense layers come first: with pp > 1 the first stage holds them and every other stage, the
    last included (which sets the pace and holds the most expert weights), is all MoE: each stage is priced as
    that. pp = 1 holds them all: the mean. The MFU's FLOPs stay the model's own."""
    m = load_model("deepseek-v3")
    moe, _ = _kinds(m)
    cluster = load_cluster("dgx-h100").with_gpus(1024)
    training = TrainingSpec(tp=8, ep=8, pp=16)
    staged, all_moe = (CostModel(Setup(x, cluster, training), _PROFILE) for x in (m, moe))
    assert staged.setup.stage_model == moe and staged.model == m
    assert staged.unit_cost([8192]).total_s == pytest.approx(all_moe.unit_cost([8192]).total_s, rel=1e-12)
    assert params_per_rank(staged.setup) == pytest.approx(params_per_rank(all_moe.setup), rel=1e-12)
    assert Setup(m, load_cluster("hgx-h200").with_gpus(1024), TrainingSpec(tp=8, ep=8, zero_stage=3)).stage_model == m
    spread = dataclasses.replace(m, dense_layers_first=False)
    assert Setup(spread, cluster, training).stage_model == spread


def test_dense_layer_spec_errors():
    base = load_model("qwen3-30b-a3b")
    with pytest.raises(SpecError, match="dense_layers \\(2\\) and dense_ffn \\(0\\) go together"):
        dataclasses.replace(base, dense_layers=2)
    with pytest.raises(SpecError, match="dense_layers \\(2\\) needs routed experts"):
        dataclasses.replace(load_model("llama3-8b"), dense_layers=2, dense_ffn=1024)
    with pytest.raises(SpecError, match="dense_layers \\(48\\) must be fewer than layers \\(48\\)"):
        dataclasses.replace(base, dense_layers=48, dense_ffn=6144)
