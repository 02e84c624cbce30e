"""Multi-head latent attention (ModelSpec.kv_lora_rank): DeepSeek-V3's and V2-Lite's published parameter counts, the
projections as Megatron-core's MLASelfAttention runs them (down projections on a rank's own tokens, up projections
over TP), their FLOPs, the latents' all-gather, the saved activations and K/V bytes, and the spec's errors."""

import dataclasses
import json

import numpy as np
import pytest

from costmodel.elementwise import layer_kernels
from costmodel.flops import attention_flops_fwd, linear_flops_per_token
from costmodel.memory import (activation_bytes_per_token_layer, fp8_gemms_per_layer,
                              full_layer_activation_bytes_per_token)
from costmodel.moe import ExpertLayout
from costmodel.presets import load_cluster, load_model
from costmodel.specs import ModelSpec, Setup, SpecError, TrainingSpec
from costmodel.timing import _TOKEN_GRID, CostModel, gemm_shapes
from profiles.table import load_profile

_PROFILE = load_profile("h100-sxm.analytic")
S = float(_TOKEN_GRID[150])  # a token count on the cost model's grid: its curves are exact there

# DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3); published: 671B parameters, 37B activated (arXiv 2412.19437)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 61,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280,
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "n_group": 8, "topk_group": 4}
# H, latents and heads of DeepSeek-V3's attention
H, QL, KVL, ROPE, N, DQK, DV = 7168, 1536, 512, 64, 128, 192, 128


def _hf(tmp_path, cfg: dict) -> ModelSpec:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_model(str(tmp_path / "config.json"))


def _dense_mla(**kw) -> ModelSpec:
    """One dense layer of DeepSeek-V3's attention and dense MLP."""
    v3 = load_model("deepseek-v3")
    return dataclasses.replace(v3, layers=4, experts=1, top_k=1, ffn=18432, shared_expert_ffn=0, dense_layers=0,
                               dense_ffn=0, expert_groups=1, groups_per_token=1, **kw)


def test_deepseek_v3_counts_its_published_parameters(tmp_path):
    m = _hf(tmp_path, DEEPSEEK_V3)
    preset = load_model("deepseek-v3")
    assert dataclasses.replace(m, name=preset.name, source=preset.source) == preset
    assert m.parameters == pytest.approx(671e9, rel=0.002) and m.active_parameters == pytest.approx(37e9, rel=0.02)
    # Q: h -> 1536 -> 128 x 192; K/V: h -> 512 + 64, 512 -> 128 x (128 + 128); O: 128 x 128 -> h; the latents' norms
    assert m.attention_gemm_params() == (H * QL + QL * N * DQK + H * (KVL + ROPE) + KVL * N * (DQK - ROPE + DV)
                                         + N * DV * H)
    assert m.attention_params() == m.attention_gemm_params() + QL + KVL == 187_107_328
    # DeepSeek-V2-Lite: no Q latent (Q straight from h); published 15.7B parameters
    lite = _hf(tmp_path, {**DEEPSEEK_V3, "num_hidden_layers": 27, "hidden_size": 2048, "intermediate_size": 10944,
                          "moe_intermediate_size": 1408, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
                          "first_k_dense_replace": 1, "q_lora_rank": None, "vocab_size": 102400})
    assert (lite.q_lora_rank, lite.kv_lora_rank, lite.head_dim) == (0, 512, 192)
    assert lite.parameters == pytest.approx(15.7e9, rel=0.005)
    assert lite.attention_gemm_params() == 2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048


def test_projections_flops_and_widths():
    m = load_model("deepseek-v3")
    for sp, own in ((True, 1 / 8), (False, 1.0)):  # the down projections run on a rank's own tokens under SP
        g = {x.label: x for x in gemm_shapes(m, 8, ExpertLayout(tp=8, ep=8, sequence_parallel=sp))}
        assert (g["q_down"].n, g["q_down"].k, g["q_down"].rows_per_token) == (QL, H, own)
        assert (g["kv_down"].n, g["kv_down"].k, g["kv_down"].rows_per_token) == (KVL + ROPE, H, own)
        assert (g["q_up"].n, g["q_up"].k, g["q_up"].rows_per_token) == (N * DQK // 8, QL, 1.0)
        assert (g["kv_up"].n, g["kv_up"].k) == (N * (DQK - ROPE + DV) // 8, KVL)
        assert (g["o"].n, g["o"].k) == (H, N * DV // 8) and "qkv" not in g
    dense = _dense_mla()
    assert linear_flops_per_token(dense) == 2 * dense.attention_gemm_params() + 2 * 3 * H * 18432
    # QKᵀ at the Q/K head width, PV at V's: 2·pairs·n·(d_qk + d_v)
    assert float(attention_flops_fwd(4096, dense)) == pytest.approx(4096 * 4097 / 2 * 2 * N * (DQK + DV))
    assert (dense.k_width, dense.v_width, dense.kv_width * 2, dense.attn_out_width) == (N * DQK, N * DV, N * 320,
                                                                                         N * DV)
    assert dense.attn_head_dim == 160 and dense.attn_gather_width == QL + KVL + ROPE


def test_latents_gathered_saved_and_normalised():
    dense = _dense_mla()
    cm = CostModel(Setup(dense, load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=8)), _PROFILE)
    # with SP the attention all-gathers the latents and the RoPE key part, 2112 values a token, not h, and scatters
    # their gradient back; the dense MLP's pair is h wide both ways
    lat, pair = QL + KVL + ROPE, float(cm.tp_pair_s(S, layer=True))
    fwd, bwd = cm.layer_tp_comm_s(S)
    assert float(fwd) == pytest.approx(float(cm.tp_pair_s(S, layer=True, gather_width=lat)) + pair, rel=1e-12)
    assert float(bwd) == pytest.approx(float(cm.tp_pair_s(S, layer=True, scatter_width=lat)) + pair, rel=1e-12)
    no_sp = CostModel(Setup(dense, load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=8, sequence_parallel=False)),
                      _PROFILE)
    fwd, bwd = no_sp.layer_tp_comm_s(S)  # all-reduces: of O's output h forward, of the latents' gradient backward
    assert float(fwd) == pytest.approx(2 * float(no_sp.tp_all_reduce_s(S)), rel=1e-12)
    assert float(bwd) == pytest.approx(float(no_sp.tp_all_reduce_s(S, lat) + no_sp.tp_all_reduce_s(S)), rel=1e-12)
    # TP overlap splits the up projections against the latents' gather and their gradient's scatter
    over = CostModel(Setup(dense, load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=8, tp_comm_overlap=True)),
                     _PROFILE)
    looked: list[tuple[str, float]] = []
    lookup = over._lookup
    over._lookup = lambda curve, x: looked.append((curve, float(np.max(x)))) or lookup(curve, x)
    over.layer_tp_comm_s(S)
    for op in ("tp_all_gather", "tp_reduce_scatter"):
        assert (op, S * lat * 2) in looked and (op, S * H * 2) in looked, op
    # saved per token (bf16, no recompute, one rank): the norms' and GEMMs' inputs 8h, each latent's norm input and
    # output, Q, K, V and the core's output, SwiGLU's 6f
    sharded = 2 * (N * DQK + N * DQK + N * DV + N * DV) + 6 * 18432
    assert activation_bytes_per_token_layer(dense, 1, "none") == 8 * H + 4 * (QL + KVL) + sharded
    # without SP the inputs and latents are whole on every TP rank
    assert activation_bytes_per_token_layer(dense, 8, "none", sequence_parallel=False) == \
        8 * H + 4 * (QL + KVL) + sharded / 8
    # the latents' RMSNorms run on a rank's own tokens, before the gather
    norms = {k.label: k.bytes_per_item for k in layer_kernels(dense, 8, True, 2, "fwd")}
    assert norms["latent_norm"] == (QL + KVL) / 8 * 4 and norms["rope"] == (N * DQK * 2) / 8 * 4
    # a ring passes each layer's K and V at their own widths
    ring = CostModel(Setup(dense, load_cluster("dgx-h100").with_gpus(16), TrainingSpec(tp=8)), _PROFILE)
    cost = ring.unit_cost([65536], degree=2)
    kv_bytes = 32768 * (N * DQK + N * DV) / 8 * 2
    assert cost.ring_comm_s == pytest.approx(4 * float(ring.p2p_s(kv_bytes, False) + ring.p2p_s(2 * kv_bytes, False)),
                                             rel=1e-9)  # 4 layers' K/V forward, dK/dV back


def test_layer_kinds_counted_and_peaked():
    """fp8 GEMMs of DeepSeek-V3's layers (MLA's five projections; a dense layer's MLP two, an MoE layer's 2 per
    local expert and the shared expert's two), and full recompute's working set at the larger layer's."""
    m = load_model("deepseek-v3")
    moe, dense = (kind for _, kind in m.layer_kinds())
    assert fp8_gemms_per_layer(dense, 8) == 5 + 2 and fp8_gemms_per_layer(moe, 8) == 5 + 2 * 32 + 2
    assert fp8_gemms_per_layer(m, 8) == pytest.approx(58 / 61 * 71 + 3 / 61 * 7)
    setup = Setup(m, load_cluster("dgx-h100").with_gpus(1024), TrainingSpec(tp=8, ep=8, pp=16))
    layer = [activation_bytes_per_token_layer(k, 8, "none", experts=ExpertLayout(tp=8, ep=8)) for k in (moe, dense)]
    assert full_layer_activation_bytes_per_token(setup) == pytest.approx(max(layer))
    assert max(layer) > activation_bytes_per_token_layer(m, 8, "none", experts=ExpertLayout(tp=8, ep=8))


def test_latent_attention_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="kv_heads \\(8\\) must equal heads \\(128\\)"):
        _dense_mla(kv_heads=8)
    with pytest.raises(SpecError, match="0 < rope_head_dim \\(192\\) < head_dim \\(192\\)"):
        _dense_mla(rope_head_dim=192)
    with pytest.raises(SpecError, match="q_lora_rank \\(1536\\), rope_head_dim \\(64\\), v_head_dim \\(128\\) "):
        _dense_mla(kv_lora_rank=0)
    with pytest.raises(SpecError, match="modelled without biases"):
        _dense_mla(qkv_bias=True)
    with pytest.raises(SpecError, match="needs \\['qk_nope_head_dim'\\]"):
        _hf(tmp_path, {k: v for k, v in DEEPSEEK_V3.items() if k != "qk_nope_head_dim"})
    with pytest.raises(SpecError, match="attention_bias with multi-head latent attention"):
        _hf(tmp_path, {**DEEPSEEK_V3, "attention_bias": True})
    with pytest.raises(SpecError, match="kernels eager prices meshplan's replay"):
        Setup(_dense_mla(), load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=8, kernels="eager"))


def test_multi_token_prediction_on_the_last_stage():
    """DeepSeek-V3's MTP depth (Megatron-core --mtp-num-layers 1): the last stage runs the next tokens' embedding,
    the 2h -> h projection, one more layer and the LM head again, and holds that layer, the projection and three
    norms; the first stage is unchanged; the loss head's logits are held twice."""
    from costmodel.memory import logits_bytes, params_per_rank

    m = load_model("deepseek-v3")
    cluster = load_cluster("hgx-h200").with_gpus(1024)
    base = TrainingSpec(tp=8, ep=8, pp=16)
    plain, mtp = (CostModel(Setup(m, cluster, dataclasses.replace(base, mtp_layers=k)), _PROFILE) for k in (0, 1))
    u = plain.unit_cost([4096], with_head=True)
    got = mtp.unit_cost([4096], with_head=True)
    l = plain.layers_per_stage
    layer_f = (u.fwd_compute_s + u.tp_comm_fwd_s + u.ring_exposed_fwd_s) / l
    # the projection under SP: its 2h input and its h/t outputs all-gathered (bf16)
    proj_tp = sum(float(mtp._lookup("tp_all_gather", 4096 * w * H * 2)) for w in (2, 1))
    extra_f = float(mtp._lookup("mem_embed_fwd", 4096) + mtp.tp_pair_s(4096) / 2 + mtp._lookup("gemm_mtp_proj", 4096)
                    + proj_tp)
    assert got.head_fwd_s == pytest.approx(2 * u.head_fwd_s + layer_f + extra_f, rel=1e-9)
    assert (got.fwd_compute_s, got.bwd_compute_s) == (u.fwd_compute_s, u.bwd_compute_s)  # the layers' are the same
    assert params_per_rank(mtp.setup, 0) == params_per_rank(plain.setup, 0)
    # the last stage: the depth's layer (an MoE one, as every layer of the stage), projection and norms, and a copy
    # of the embedding for the next tokens
    moe_layer = m.layer_kinds()[0][1].layer_params()
    assert params_per_rank(mtp.setup, 15) - params_per_rank(plain.setup, 15) == pytest.approx(
        (moe_layer + 2 * H * H + 3 * H + m.input_embedding_params()) / 8)
    assert params_per_rank(mtp.setup) == params_per_rank(mtp.setup, 15)  # the last stage is now the larger
    assert logits_bytes(4096, mtp.setup) == 2 * logits_bytes(4096, plain.setup)
    with pytest.raises(SpecError, match="runs no multi-token prediction"):
        Setup(load_model("llama3-8b"), cluster, TrainingSpec(tp=8, mtp_layers=1, kernels="eager"))
    with pytest.raises(SpecError, match="zero_stage 3 with mtp_layers=1 is not modelled"):
        TrainingSpec(tp=8, mtp_layers=1, zero_stage=3)



def test_mtp_projection_collectives():
    """eh_proj's TP collectives (Megatron-core): with SP its 2h input all-gathered forward and reduce-scattered
    backward, and h all-gathered each way (the output gathered whole forward, its split's gradient backward); without
    SP the output's gather forward and the input gradient's all-reduce (2h) backward; under full recompute the
    backward replays the projection and its forward collectives."""
    dense = load_model("llama3-70b")  # without SP: a dense model (MoE with TP needs SP)
    cluster = load_cluster("hgx-h200").with_gpus(1024)
    n, h = np.array([4096.0]), dense.hidden
    for sp in (True, False):
        c = CostModel(Setup(dense, cluster, TrainingSpec(tp=8, pp=4, mtp_layers=1, sequence_parallel=sp)), _PROFILE)
        ag = [float(c._lookup("tp_all_gather", 4096.0 * w * h * 2)) for w in (0, 1, 2)]
        rs2 = float(c._lookup("tp_reduce_scatter", 4096.0 * 2 * h * 2))
        f, b = (float(np.asarray(x).ravel()[0]) for x in c._mtp_proj_tp_s(n))
        want = (ag[2] + ag[1], rs2 + ag[1]) if sp else (ag[1], ag[2] + rs2)
        assert (f, b) == pytest.approx(want, rel=1e-12)
    m = load_model("deepseek-v3")
    full = CostModel(Setup(m, cluster, TrainingSpec(tp=8, ep=8, pp=16, mtp_layers=1, recompute="full")), _PROFILE)
    plain = CostModel(Setup(m, cluster, TrainingSpec(tp=8, ep=8, pp=16, recompute="full")), _PROFILE)
    got, base = full.unit_cost([4096], with_head=True), plain.unit_cost([4096], with_head=True)
    l = plain.layers_per_stage
    layer_b = (base.bwd_compute_s + base.tp_comm_bwd_s + base.ring_exposed_bwd_s) / l
    proj, proj_b = (float(full._lookup(c, 4096)) for c in ("gemm_mtp_proj", "gemm_mtp_proj_bwd"))
    pf, pb = (float(np.asarray(x).ravel()[0]) for x in full._mtp_proj_tp_s(n))
    embed_b = float(full._lookup("mem_embed_bwd", 4096))
    # the projection's dgrad and wgrad at their own shapes, and under full recompute its forward again
    assert got.head_bwd_s == pytest.approx(2 * base.head_bwd_s + embed_b + proj_b + proj + pb + pf + layer_b,
                                           rel=1e-9)

def test_multi_token_prediction_in_the_simulated_peak():
    """One step re-simulated with an MTP depth: every rank's peak grows by its static parts' growth and its largest
    unit's tokens through one more layer (pp = 1: every rank holds the depth)."""
    from planner.api import PlanRequest, cost_model_for_plan, make_plan
    from planner.simulate import simulate_step
    from planner.simulate.memory import static_memory_bytes

    plan = make_plan(PlanRequest(model="llama3-8b", gpus=8, max_context_tokens=16384, capacity_tokens=16384, steps=1),
                     "hdp")
    plain = cost_model_for_plan(plan)
    mtp = CostModel(dataclasses.replace(plain.setup, training=dataclasses.replace(plain.setup.training,
                                                                                    mtp_layers=1)), _PROFILE)
    step = plan.steps[0]
    a, b = (np.array(simulate_step(step, cm).peak_memory_bytes) - static_memory_bytes(cm) for cm in (plain, mtp))
    biggest = np.zeros(8)
    for u in step.units:
        for r in u.hdp_ranks:
            biggest[r] = max(biggest[r], u.tokens_per_rank)
    assert b - a == pytest.approx(biggest * mtp.a_tok, rel=1e-9)


def test_kimi_k2_from_a_multimodal_wrapper(tmp_path):
    """Kimi K2's language model (DeepSeek-V3's architecture: 64 heads, 384 experts, one dense layer) read from a
    Kimi-K2.5-style config that nests it in text_config; published 1T parameters, 32B activated."""
    text = {**DEEPSEEK_V3, "model_type": "kimi_k2", "num_attention_heads": 64, "num_key_value_heads": 64,
            "n_routed_experts": 384, "first_k_dense_replace": 1, "vocab_size": 163840, "n_group": 1, "topk_group": 1}
    m = _hf(tmp_path, {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
                       "text_config": text, "vision_config": {"hidden_size": 1152}})
    preset = load_model("kimi-k2")
    assert dataclasses.replace(m, name=preset.name, source=preset.source) == preset
    assert m.parameters == pytest.approx(1.0e12, rel=0.03) and m.active_parameters == pytest.approx(32e9, rel=0.03)


LLAMA4_MAVERICK = {"model_type": "llama4_text", "num_hidden_layers": 48, "hidden_size": 5120, "num_attention_heads": 40,
                   "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                   "vocab_size": 202048, "num_local_experts": 128, "num_experts_per_tok": 1,
                   "interleave_moe_layer_step": 2, "attention_chunk_size": 8192, "tie_word_embeddings": False}


def test_llama4_from_its_configs(tmp_path):
    """Llama 4 (transformers' Llama4TextConfig inside Llama4ForConditionalGeneration's text_config): experts in every
    interleave_moe_layer_step-th layer beside a shared expert of intermediate_size, the other layers a dense MLP of
    intermediate_size_mlp; chunked attention in the RoPE layers, whole-sequence in the NoPE ones (every 4th by
    default). Maverick: published 400B parameters, 17B active; Scout 109B with its vision encoder, 17B active."""
    wrap = lambda text: {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",  # noqa: E731
                         "text_config": text, "vision_config": {"model_type": "llama4_vision_model"}}
    for name, text, total in (("llama4-maverick", LLAMA4_MAVERICK, 400e9),
                              ("llama4-scout", {**LLAMA4_MAVERICK, "num_local_experts": 16,
                                                "interleave_moe_layer_step": 1}, 109e9)):
        m = _hf(tmp_path, wrap(text))
        preset = load_model(name)
        assert dataclasses.replace(m, name=preset.name, source=preset.source) == preset
        assert m.parameters == pytest.approx(total, rel=0.02) and m.active_parameters == pytest.approx(17e9, rel=0.02)
        assert (m.attention_chunk, m.full_attention_layers, m.windowed_fraction) == (8192, 12, 0.75)
    maverick = load_model("llama4-maverick")
    assert (maverick.dense_layers, maverick.dense_ffn, maverick.dense_layers_first) == (24, 16384, False)
    # the NoPE layers as listed (no_rope_layers 0), or as layer_types name them; an explicit moe_layers list
    listed = _hf(tmp_path, {**LLAMA4_MAVERICK, "no_rope_layers": [0] * 6 + [1] * 42, "moe_layers": [0, 1, 2]})
    assert (listed.full_attention_layers, listed.dense_layers) == (6, 45)
    typed = _hf(tmp_path, {**LLAMA4_MAVERICK, "layer_types": ["full_attention"] * 2 + ["chunked_attention"] * 46})
    assert typed.full_attention_layers == 2
    assert _hf(tmp_path, {**LLAMA4_MAVERICK, "attention_chunk_size": None}).attention_chunk == 0
    # transformers' defaults: an empty no_rope_layers is every 4th layer NoPE; a missing chunk size is 8192
    default = {k: v for k, v in LLAMA4_MAVERICK.items() if k != "attention_chunk_size"}
    assert _hf(tmp_path, {**default, "no_rope_layers": []}) == _hf(tmp_path, LLAMA4_MAVERICK)
    # a Llama 4 without MoE layers: every layer the dense MLP of intermediate_size_mlp
    dense = _hf(tmp_path, {**LLAMA4_MAVERICK, "moe_layers": []})
    assert (dense.experts, dense.ffn, dense.shared_expert_ffn) == (1, 16384, 0)
