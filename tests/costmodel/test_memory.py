"""Memory model: capacity per rank, offload degree, and the out-of-memory message (what dominates, what
would help)."""

import dataclasses

import pytest

from costmodel.memory import (activation_bytes_per_token_layer, layer_activation_bytes, layer_activation_per_token,
                              memory_budget, min_degree, model_state_bytes, offload_lower_bound,
                              offload_ratio_for_tokens, params_per_rank, state_bytes_per_param)
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec


def test_capacity_llama7b_h100():
    # REFERENCE 2.1 derives C ≈ 7.4K for LLaMA-7B, 80 GB, ZeRO-1 over 512 ranks, 3 GB context, 10%
    # fragmentation, with an unfused SwiGLU (8f); ByteScale runs C = 8K. Megatron-core's fused SwiGLU saves 6f:
    # 12h + 4h_kv + 6f = 29.1·h a token and layer, 3.817 MB over 32 layers. An H100 80GB gives CUDA 85.02 GB,
    # so (85.02 − 35.74 states − 3.22 context − 8.50 fragmentation − 2.10 fused-loss chunk) GB / 3.817 MB ≈ 9.29K.
    setup = Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(512), TrainingSpec())
    b = memory_budget(setup)
    assert 9_200 <= b.capacity_tokens <= 9_400
    assert b.states_bytes / 1e9 == pytest.approx(5.933 * 6.0234, rel=0.01)
    assert activation_bytes_per_token_layer(setup.model, 1, "none") == 12 * 4096 + 4 * 1024 + 6 * 11008


def test_capacity_grows_with_recompute_and_tp():
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64)
    base = memory_budget(Setup(m, c, TrainingSpec())).capacity_tokens
    assert memory_budget(Setup(m, c, TrainingSpec(recompute="full"))).capacity_tokens > 5 * base
    assert memory_budget(Setup(m, c, TrainingSpec(tp=2))).capacity_tokens > 1.8 * base


def test_offload_degree_readings():
    # REFERENCE 2.5: l = 32, C = 8K: r = 1 gives 2M -> 16 ranks instead of 256, 256K -> 2 instead of 32.
    C = 8192
    assert min_degree(2**21, C, 0.0, 32) == 256
    assert min_degree(2**21, C, 1.0, 32) == 16
    assert min_degree(2**18, C, 1.0, 32) == 2
    assert min_degree(2**16, C, 1.0, 32) == 1
    assert offload_lower_bound(2**16, C, 32) == pytest.approx(32 * C / (30 * 2**16))
    r = offload_ratio_for_tokens(2**18 / 16, C, 32)
    assert min_degree(2**18, C, r, 32) == 16 and min_degree(2**18, C, r - 0.01, 32) > 16


# ---- the out-of-memory message: what dominates, and what would help ---------------------------------
def _oom(setup: Setup) -> str:
    with pytest.raises(SpecError) as e:
        memory_budget(setup)
    return str(e.value)


def test_oom_message_when_model_states_dominate():
    # llama3-405b, P = 405,853,388,800 parameters, all on one GPU (tp = pp = 1), ZeRO-1 over 64 HDP ranks:
    # weights 2P = 811.7 GB, fp32 gradients 4P = 1623.4 GB, optimizer 12P/64 = 76.1 GB, 2511.2 GB in all.
    # Left of an H100's 85.02 GB: 85.02 − 3 GiB context − 8.50 GB fragmentation − 8192·128256·8 B loss chunk
    # = 64.9 GB.
    m, c = load_model("llama3-405b"), load_cluster("dgx-h100").with_gpus(64)
    msg = _oom(Setup(m, c, TrainingSpec(recompute="full")))
    for part in ("2511.2 GB per GPU", "weights 811.7 GB", "gradients 1623.4 GB",
                 "optimizer 76.1 GB sharded by ZeRO-1 over 64", "only 64.9 GB of the 85 GB",
                 "recompute and offload cannot shrink model states"):
        assert part in msg
    assert "use recompute" not in msg and "\n" not in msg
    # 64 GPUs allow tp·pp up to 64; pp 8 leaves uneven stages of at most ⌈126/8⌉ = 16 layers (priced at the
    # busiest): at tp = 8, pp = 8 (one HDP rank) every GPU still holds (16 layers of 3.188B + the 128256 × 16384
    # embedding) / 8 = 6.64B parameters × (6 + 12) B = 119.5 GB.
    assert "no tp×pp fits 64 GPUs (the least, tp=8, pp=8, still takes 119.5 GB per GPU)" in msg
    # The fewest GPUs: 112 with tp = 8, pp = 14, hdp = 1 (9 layers + embedding per GPU, 18 B each: 69.3 GB of the
    # 72.2 GB left at tp = 8, whose loss chunk is 8x smaller).
    assert "the fewest GPUs that fit are 112 with tp=8, pp=14 (69.3 GB of states per GPU" in msg
    assert memory_budget(Setup(m, load_cluster("dgx-h100").with_gpus(112), TrainingSpec(tp=8, pp=14,
                                                                                         recompute="full")))
    for gpus, pp in ((72, 9), (96, 6), (120, 3)):  # the closest layouts with fewer layers per GPU do not fit
        _oom(Setup(m, load_cluster("dgx-h100").with_gpus(gpus), TrainingSpec(tp=8, pp=pp, recompute="full")))


def test_oom_message_names_a_layout_that_fits_the_gpus():
    # llama3-70b on 64 GPUs: tp = 8 divides the 70.6e9 parameters to 8.8e9 per GPU (embeddings included),
    # × (6 + 12/8) B = 66.1 GB, which fits the 72.2 GB left at tp = 8 (its loss chunk is 8× smaller).
    msg = _oom(Setup(load_model("llama3-70b"), load_cluster("dgx-h100").with_gpus(64), TrainingSpec(recompute="full")))
    assert "the smallest tp×pp that fits 64 GPUs is tp=8, pp=1 (66.1 GB of states per GPU, C = " in msg


def test_oom_message_suggests_zero1_when_the_optimizer_is_replicated():
    # llama-7b (6.74e9 parameters) on 8 GPUs without ZeRO: 18 B/param = 121.3 GB; ZeRO-1 over 8: 6 + 12/8 = 7.5
    # B/param = 50.5 GB, which fits.
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(8)
    p = m.parameters
    msg = _oom(Setup(m, c, TrainingSpec(zero_stage=0)))
    assert f"{p * 18 / 1e9:.1f} GB per GPU" in msg and "replicated" in msg
    assert msg.endswith(f"zero_stage=1 would shard the optimizer: {p * 7.5 / 1e9:.1f} GB per GPU")


def test_oom_message_when_activations_dominate():
    # The states fit, but less than one token's activations remain: recompute (or tp/pp) is the advice.
    m = load_model("tiny")
    tr = TrainingSpec(ctx_overhead_bytes=0, frag_fraction=0.0, loss="fp32")
    states = m.parameters * 18.0  # one GPU: nothing to shard over
    per_token = activation_bytes_per_token_layer(m, 1, "none") * m.layers + m.vocab * 8.0  # + unfused logits
    c = dataclasses.replace(load_cluster("local-cpu").with_gpus(1), gpu_memory_bytes=int(states + per_token / 2))
    msg = _oom(Setup(m, c, tr))
    assert "less than one token's activations" in msg and "use --recompute full" in msg
    assert f"({per_token / 1e6:.1f} MB over 2 layers)" in msg


def test_gpt_activation_bytes_match_korthikanti_table_2():
    # Korthikanti et al. 2022 Table 2, per layer, 2-byte activations, 1-byte dropout masks
    m = load_model("gpt-22b")
    s, b, h, a, t = 2048, 4, m.hidden, m.heads, 8
    sbh = s * b * h
    kw = dict(flash_attention=False)
    assert layer_activation_bytes(m, s, b, 1, "none", **kw) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert layer_activation_bytes(m, s, b, t, "none", sequence_parallel=False, **kw) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert layer_activation_bytes(m, s, b, t, "none", **kw) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert layer_activation_bytes(m, s, b, t, "selective", **kw) == pytest.approx(sbh / t * 34)
    assert layer_activation_bytes(m, s, b, t, "full", sequence_parallel=False, **kw) == pytest.approx(2 * sbh)
    # FlashAttention keeps no scores: the planner's per-token figure is the SP formula without 5as²b
    assert activation_bytes_per_token_layer(m, t, "none") == pytest.approx(34 * h / t)
    assert activation_bytes_per_token_layer(m, t, "full") == pytest.approx(2 * h / t)


def test_llama_activation_bytes_unchanged_by_block_fields():
    m = load_model("llama-70b")
    h, hkv, f = m.hidden, m.kv_width, m.ffn
    assert activation_bytes_per_token_layer(m, 8, "none") == (12 * h + 4 * hkv + 6 * f) / 8
    assert activation_bytes_per_token_layer(m, 8, "selective") == (12 * h + 4 * hkv + 4 * f) / 8
    assert layer_activation_bytes(m, 4096, 2, 8, "none") == pytest.approx(
        activation_bytes_per_token_layer(m, 8, "none") * 4096 * 2)


def test_capacity_follows_sequence_parallelism():
    # without SP the norm, input and mask terms are whole on every TP rank: more bytes per token, fewer tokens
    m, c = load_model("gpt-22b"), load_cluster("dgx-a100").with_gpus(8)
    sp, plain = (Setup(m, c, TrainingSpec(tp=8, sequence_parallel=s)) for s in (True, False))
    assert activation_bytes_per_token_layer(m, 8, "none", 2, False) == pytest.approx(
        layer_activation_bytes(m, 1, 1, 8, "none", sequence_parallel=False))
    assert memory_budget(plain).capacity_tokens < 0.5 * memory_budget(sp).capacity_tokens


def test_zero2_shards_the_gradients_too():
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64)
    z1, z2 = (Setup(m, c, TrainingSpec(zero_stage=z)) for z in (1, 2))
    params = params_per_rank(z1)
    assert state_bytes_per_param(z1) == pytest.approx(2 + 4 + 12 / 64)
    assert state_bytes_per_param(z2) == pytest.approx(2 + 16 / 64)
    assert memory_budget(z2).capacity_tokens > memory_budget(z1).capacity_tokens
    assert model_state_bytes(z2) == pytest.approx(params * (2 + 16 / 64))
    with pytest.raises(SpecError, match="zero_stage"):
        TrainingSpec(zero_stage=4)


def test_eager_kernels_price_the_replays_own_saved_tensors():
    # meshplan's replay (autocast over fp32 parameters), storage by storage: per norm its fp32 input, x·r and the
    # next GEMM's bf16 input (2·4 + 2)h; attention b(5q + 4kv) + 4 B per head; SwiGLU 4f·b
    m = load_model("llama3-8b")
    h, q, kv, f = m.hidden, m.q_width, m.kv_width, m.ffn
    c = load_cluster("hgx-h200").with_gpus(1)
    eager = Setup(m, c, TrainingSpec(kernels="eager", capacity_tokens=32768))
    per_layer = 2 * 10 * h + 2 * (5 * q + 4 * kv) + 4 * m.heads + 4 * f * 2
    assert layer_activation_per_token(eager) == pytest.approx(per_layer)
    assert layer_activation_per_token(eager, "selective") == pytest.approx(per_layer - 2 * q - 4 * m.heads)
    assert layer_activation_per_token(eager, "full") == pytest.approx(4 * h)  # the fp32 layer input
    fused = Setup(m, c, TrainingSpec(capacity_tokens=32768))
    assert layer_activation_per_token(fused) == activation_bytes_per_token_layer(m, 1, "none")
    # the eager loss holds every logit of a unit (12 B each), the online one an 8K-token chunk of 8 B, an in-place
    # one (Transformer Engine's) every logit in bf16, its gradient written over them
    assert memory_budget(eager).logits_bytes == pytest.approx(32768 * m.vocab * 12.0)
    assert memory_budget(fused).logits_bytes == pytest.approx(8192 * m.vocab * 8.0)
    in_place = Setup(m, c, TrainingSpec(capacity_tokens=32768, loss="in_place"))
    assert memory_budget(in_place).logits_bytes == pytest.approx(32768 * m.vocab * 2.0)
    planned = memory_budget(Setup(m, load_cluster("hgx-h200").with_gpus(8), TrainingSpec(loss="in_place")))
    assert planned.logits_bytes == pytest.approx(planned.capacity_tokens * m.vocab * 2.0)  # C's logits, no chunk


def test_a_tied_head_is_the_last_stages_own_copy_of_the_embedding():
    # pp > 1: Megatron's last stage keeps its own output_layer weight (the word embedding's copy, kept equal by the
    # embedding all-reduce), with its gradients and optimizer states; pp = 1 holds the one matrix once
    gpt = load_model("gpt-22b")
    cluster = load_cluster("dgx-a100").with_gpus(64)
    two = Setup(gpt, cluster, TrainingSpec(tp=8, pp=2))
    layers = gpt.layers // 2 * gpt.layer_params() / 8
    assert params_per_rank(two, 0) == pytest.approx(layers + gpt.input_embedding_params() / 8)
    assert params_per_rank(two, 1) == pytest.approx(layers + (gpt.norm_params + gpt.vocab * gpt.hidden) / 8)
    one = Setup(gpt, cluster, TrainingSpec(tp=8))
    assert params_per_rank(one) == pytest.approx((gpt.layers * gpt.layer_params() + gpt.embedding_params()
                                                  + gpt.norm_params) / 8)


def test_oom_advice_never_hides_what_does_not_fit():
    """The ZeRO-3 hint prices FSDP2, which runs its own Adam and gathers: Megatron-only flags (fp8 weight gathers,
    the precision-aware optimizer) are dropped for it, so the error stays the run's own "does not fit"."""
    m, c = load_model("llama3-405b"), load_cluster("dgx-h100").with_gpus(16)
    for flags in (dict(fp8_param_gather=True), dict(optimizer_moments="bf16")):
        with pytest.raises(SpecError, match="llama3-405b does not fit on H100"):
            memory_budget(Setup(m, c, TrainingSpec(tp=8, dtype="fp8", recompute="full", **flags)))
