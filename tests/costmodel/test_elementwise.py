"""Memory-bound kernels and the terms they add to a unit: bytes per kernel, sequence parallelism, materialised
attention, recompute semantics, the optimizer step, gradient accumulation and an overlapped gradient reduce."""

import dataclasses

import pytest

from costmodel.elementwise import (eager_head_kernels, eager_layer_kernels, embedding_kernels,
                                   grad_accumulation_bytes, head_kernels, layer_kernels, recompute_kernels,
                                   score_kernels)
from costmodel.memory import activation_bytes_per_token_layer, params_per_rank, stage_parts
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel
from profiles.table import load_profile


@pytest.fixture(scope="module")
def a100():
    return load_profile("a100-sxm-80gb.analytic")


def _cm(profile, model="gpt-22b", gpus=8, **training) -> CostModel:
    tr = TrainingSpec(**{"tp": 8, **training})
    return CostModel(Setup(load_model(model), load_cluster("dgx-a100").with_gpus(gpus), tr), profile)


def _total(kernels) -> float:
    return sum(k.bytes_per_item for k in kernels)


def test_gpt_layer_bytes_by_hand():
    gpt = load_model("gpt-22b")
    h, f = gpt.hidden, gpt.ffn
    # forward, bf16, no TP: 2 norms (2·2h), 2 bias-dropout-adds (3·2h + 1 mask byte per element), bias-GeLU (2·2f)
    assert _total(layer_kernels(gpt, 1, True, 2, "fwd")) == pytest.approx(2 * 4 * h + 2 * 7 * h + 4 * f)
    # backward: norms 3·2h, residual 2·2h + mask, GeLU 3·2f
    assert _total(layer_kernels(gpt, 1, True, 2, "bwd")) == pytest.approx(2 * 6 * h + 2 * 5 * h + 6 * f)


def test_sequence_parallelism_splits_only_the_hidden_state_kernels():
    gpt = load_model("gpt-22b")
    sp, plain = (_total(layer_kernels(gpt, 8, s, 2, "fwd")) for s in (True, False))
    act = 4 * gpt.ffn / 8  # bias-GeLU acts on the TP-sharded MLP width either way
    assert (plain - act) == pytest.approx(8 * (sp - act))


def test_llama_has_rope_and_swiglu_and_no_masks():
    llama = load_model("llama-7b")
    labels = [k.label for k in layer_kernels(llama, 1, True, 2, "fwd")]
    assert "rope" in labels and "swiglu" in labels and "gelu" not in labels
    res = next(k for k in layer_kernels(llama, 1, True, 2, "fwd") if k.label == "residual")
    assert res.bytes_per_item == pytest.approx(3 * 2 * llama.hidden)  # no dropout mask
    assert [k.label for k in recompute_kernels(llama, 1, True, 2, "selective")] == ["swiglu"]
    assert recompute_kernels(load_model("gpt-22b"), 1, True, 2, "selective") == ()
    assert len(recompute_kernels(llama, 1, True, 2, "full")) == len(layer_kernels(llama, 1, True, 2, "fwd"))


def test_squared_relu_is_an_ungated_mlp_with_megatrons_two_kernels():
    # Nemotron-4's MLP: up, squared ReLU, down. GeLU's shapes and saved activations (4f); Megatron-core runs
    # relu then pow, two kernels each way: 4b·f forward, 6b·f backward (GeLU fused: 2b·f, 3b·f)
    gelu = load_model("gpt-22b")
    relu2 = dataclasses.replace(gelu, mlp="relu2", linear_bias=False)
    assert not relu2.gated and relu2.mlp_matrices == 2
    assert relu2.layer_params() == dataclasses.replace(gelu, linear_bias=False).layer_params()
    f = gelu.ffn
    for direction, per in (("fwd", 4), ("bwd", 6)):
        k = next(k for k in layer_kernels(relu2, 1, True, 2, direction) if k.label == "relu2")
        assert k.bytes_per_item == per * 2 * f
    assert activation_bytes_per_token_layer(relu2, 1, "none") == activation_bytes_per_token_layer(gelu, 1, "none")
    assert recompute_kernels(relu2, 1, True, 2, "selective") == ()
    assert [k.label for k in eager_layer_kernels(relu2, 1, True, 2, "fwd")].count("relu2_1") == 1


def test_score_head_and_embedding_kernels():
    gpt, llama = load_model("gpt-22b"), load_model("llama-7b")
    assert _total(score_kernels(gpt, 2, "fwd")) == 4 + 5  # softmax, dropout with its mask
    assert _total(score_kernels(llama, 2, "fwd")) == 4
    fused, in_place, fp32 = (_total(head_kernels(llama, 1, True, 2, loss, "fwd"))
                             for loss in ("online", "in_place", "fp32"))
    # Megatron's fp32 loss: cast, max, shift, exp, sum, division to the kept softmax (b + 36 B per logit); an
    # in-place loss reads each row twice and writes its gradient (3b)
    assert fp32 - fused == pytest.approx(36 * llama.vocab)
    assert in_place - fused == pytest.approx(2 * 2 * llama.vocab)
    fused, in_place, fp32 = (_total(head_kernels(llama, 1, True, 2, loss, "bwd"))
                             for loss in ("online", "in_place", "fp32"))
    assert fp32 - fused == pytest.approx(10 * llama.vocab)  # scaled in place (8), cast back (4 + 2) against 2b
    assert in_place == fused  # the gradient scaled in place (2b)
    assert len(embedding_kernels(gpt, 2, "fwd")) == 2 and len(embedding_kernels(llama, 2, "fwd")) == 1


def test_alibi_scores_copy_the_bias_in_and_read_it_back():
    # baddbmm over the broadcast ALiBi bias: the forward writes the bias into the scores and the GEMM reads it
    # (2b per score); the backward has nothing of it, and the model has no position table or RoPE kernel
    gpt = load_model("gpt-22b")
    bloom = dataclasses.replace(gpt, position="alibi", max_positions=0)
    assert _total(score_kernels(bloom, 2, "fwd")) - _total(score_kernels(gpt, 2, "fwd")) == 4
    assert _total(score_kernels(bloom, 2, "bwd")) == _total(score_kernels(gpt, 2, "bwd"))
    assert len(embedding_kernels(bloom, 2, "fwd")) == 1
    assert bloom.input_embedding_params() < gpt.input_embedding_params()
    assert "rope" not in [k.label for k in layer_kernels(bloom, 1, True, 2, "fwd")]


def test_memory_bound_terms_reach_the_unit(a100):
    cm = _cm(a100)
    u = cm.unit_cost([2048] * 4, with_head=False)
    assert 0 < u.mem_fwd_s < u.fwd_compute_s and 0 < u.mem_bwd_s < u.bwd_compute_s
    # without SP the replicated kernels run on all tokens of every TP rank
    plain = _cm(a100, sequence_parallel=False).unit_cost([2048] * 4, with_head=False)
    assert plain.mem_fwd_s > 2 * u.mem_fwd_s and plain.tp_comm_s == pytest.approx(u.tp_comm_s)


def test_materialised_attention_costs_more_and_grows_with_the_square(a100):
    flash, unfused = _cm(a100), _cm(a100, attention_kernel="unfused")
    for s in (2048, 8192):
        assert unfused.attn_fwd_s(s) > flash.attn_fwd_s(s)
    ratio = float(unfused.attn_fwd_s(8192) / unfused.attn_fwd_s(2048))
    assert 10 < ratio < 20  # s² work and bytes: 16x, softened by efficiency at the shorter length


def test_recompute_semantics(a100):
    none = _cm(a100, recompute="none").unit_cost([2048] * 4, with_head=False)
    full = _cm(a100, recompute="full").unit_cost([2048] * 4, with_head=False)
    # full replays the whole forward in the backward, TP collectives included
    assert full.fwd_s == pytest.approx(none.fwd_s)
    assert full.tp_comm_bwd_s == pytest.approx(2 * none.tp_comm_bwd_s)
    assert full.bwd_s == pytest.approx(none.bwd_s + none.fwd_s, rel=1e-6)
    # selective replays the materialised attention core; with FlashAttention a GeLU block replays nothing
    sel_unfused = _cm(a100, recompute="selective", attention_kernel="unfused").unit_cost([2048] * 4, with_head=False)
    none_unfused = _cm(a100, attention_kernel="unfused").unit_cost([2048] * 4, with_head=False)
    assert sel_unfused.bwd_s - none_unfused.bwd_s == pytest.approx(none_unfused.attn_fwd_compute_s)
    sel = _cm(a100, recompute="selective").unit_cost([2048] * 4, with_head=False)
    assert sel.bwd_s == pytest.approx(none.bwd_s)


def test_head_and_embedding_only_where_they_run(a100):
    pp1 = _cm(a100).unit_cost([2048] * 4)
    pp2 = _cm(a100, gpus=16, pp=2)
    last, mid = pp2.unit_cost([2048] * 4, with_head=True), pp2.unit_cost([2048] * 4, with_head=False)
    assert mid.head_fwd_s == 0 and last.head_fwd_s > 0
    assert pp1.head_fwd_s > last.head_fwd_s  # pp = 1 prices the embedding with the head


def test_optimizer_step_by_who_runs_it(a100):
    """Megatron-core: the gradient norm (4 B) and clip scaling (8), Adam (16 read, 12 written) and the master-to-model
    copy (4 + 2) on the shard, fp32 gradients cast first where they are bf16 (2 + 4), the whole gradient buffer
    zeroed; its precision-aware optimizer's own passes; torch FSDP2 (eager, ZeRO-3): the norm, the unconditional clip
    scaling (8) and fused AdamW on the shard; the replay (eager): fused AdamW alone."""
    cm = _cm(a100, gpus=64)  # 8 HDP ranks
    p = params_per_rank(cm.setup)
    mem = lambda b: float(a100.memory_time_s(b))  # noqa: E731
    assert cm.optimizer_step_s() == pytest.approx(mem(p / 8 * 46) + mem(p * 4))
    bf16 = _cm(a100, gpus=64, grad_dtype="bf16")
    assert bf16.optimizer_step_s() == pytest.approx(mem(p / 8 * 52) + mem(p * 2))
    replicated = _cm(a100, gpus=64, zero_stage=0)
    assert replicated.optimizer_step_s() == pytest.approx(mem(p * 46) + mem(p * 4))
    assert cm.step_end_s() == pytest.approx(cm.grad_sync_s() + cm.optimizer_step_s())
    # precision-aware (bf16 moments, TE's FusedAdam): norm and scaling (3 g), the moments to fp32 and back (12 + 12),
    # Adam on the gradient, parameter, remainder and fp32 moments (g + 12 read, 12 written); bf16 gradients: 56 B
    aware = _cm(a100, gpus=64, grad_dtype="bf16", optimizer_moments="bf16")
    assert aware.optimizer_step_s() == pytest.approx(mem(p / 8 * 56) + mem(p * 2))
    llama = lambda **tr: _cm(a100, model="llama3-8b", gpus=8, tp=1, kernels="eager", **tr)  # noqa: E731
    fsdp, replay = llama(zero_stage=3), llama(zero_stage=1)
    q = params_per_rank(replay.setup)
    assert fsdp.optimizer_step_s() == pytest.approx(mem(q / 8 * 40))
    assert replay.optimizer_step_s() == pytest.approx(mem(q * 28))  # every parameter: the replay shards no state


def test_gradient_accumulation_outside_the_gemm(a100):
    """An add reads the GEMM's gradient and reads and writes the accumulator (bf16 into fp32: 10 B a parameter), a cast
    first writes and reads it back at the accumulator's width (18 B); fused, the GEMM accumulates (Megatron-core). Each
    unit's backward pays it over the rank's layers and, where the head is, over the head's parameters."""
    assert [grad_accumulation_bytes(k, 2, 4) for k in ("fused", "add", "cast_add")] == [0, 10, 18]
    assert grad_accumulation_bytes("add", 2, 2) == 6  # fp16 into fp16 (Megatron-LM of 2021)
    assert TrainingSpec().grad_accumulation_kind == "fused"
    assert TrainingSpec(kernels="eager").grad_accumulation_kind == "cast_add"  # the replay under autocast
    assert TrainingSpec(kernels="eager", dtype="fp32").grad_accumulation_kind == "add"
    assert TrainingSpec(kernels="eager", zero_stage=3).grad_accumulation_kind == "fused"  # rounds reduce-scatter
    assert TrainingSpec(kernels="eager", zero_stage=2).grad_accumulation_kind == "cast_add"  # the replay shards none
    assert TrainingSpec(kernels="eager", zero_stage=2, grad_accumulation="add").grad_accumulation == "add"
    with pytest.raises(SpecError, match="grad_accumulation 'add' with zero_stage 2"):
        TrainingSpec(grad_accumulation="add", zero_stage=2)
    fused, added = _cm(a100, gpus=16), _cm(a100, gpus=16, grad_accumulation="cast_add")
    mem = lambda b: float(a100.memory_time_s(b))  # noqa: E731
    layers, extra = stage_parts(added.setup, 0, None)
    per_layer = (params_per_rank(added.setup) - extra / 8) / layers
    a, b = fused.unit_cost([2048] * 4), added.unit_cost([2048] * 4)
    assert b.fwd_s == pytest.approx(a.fwd_s)
    assert b.bwd_compute_s - a.bwd_compute_s == pytest.approx(layers * mem(per_layer * 18))
    assert b.head_bwd_s - a.head_bwd_s == pytest.approx(mem(extra / 8 * 18))  # pp = 1: embedding and head
    assert b.parts_s("bwd")["fixed"] - a.parts_s("bwd")["fixed"] == pytest.approx(layers * mem(per_layer * 18))
    # multi-token prediction: each depth's layer adds a layer's pass; the head's parameters (and the depths' extras)
    # once, however many heads run
    fused_mtp, add_mtp = (_cm(a100, model="llama3-8b", gpus=16, pp=2, mtp_layers=1, grad_accumulation=k)
                          for k in ("fused", "add"))
    plain, acc = (cm.unit_cost([2048] * 4, with_head=True) for cm in (fused_mtp, add_mtp))
    assert acc.head_bwd_s - plain.head_bwd_s == pytest.approx(add_mtp.grad_accum_layer_s + add_mtp.grad_accum_head_s)
    assert TrainingSpec.from_dict(TrainingSpec(grad_accumulation="add").to_dict()).grad_accumulation == "add"
    assert "grad_accumulation" not in TrainingSpec().to_dict()


def test_overlapped_gradient_reduce_hides_under_the_backward(a100):
    cm = _cm(a100, gpus=64)
    sync = cm.grad_sync_s()
    assert cm.exposed_grad_sync_s(None, 10.0) == sync  # Megatron-core's default: no overlap
    over = _cm(a100, gpus=64, overlap_grad_reduce=True)
    assert over.exposed_grad_sync_s(None, 0.0) == pytest.approx(sync)
    r, g = over._grad_sync_parts_s(over.setup.hdp)  # ZeRO-1: reduce-scatter, then the parameter all-gather
    assert r + g == pytest.approx(sync)
    hidden = over.exposed_grad_sync_s(None, 10.0)
    assert g < hidden < g + 0.2 * r  # the reduce-scatter's last bucket stays exposed; the all-gather follows the step
    assert over.exposed_grad_sync_s(None, r / 2) == pytest.approx(r / 2 + g)


def test_new_training_fields_round_trip():
    tr = TrainingSpec(sequence_parallel=False, attention_kernel="unfused", overlap_grad_reduce=True)
    assert TrainingSpec.from_dict(tr.to_dict()) == tr
    assert dataclasses.replace(tr, attention_kernel="flash").attention_kernel == "flash"
    with pytest.raises(ValueError, match="attention_kernel"):
        TrainingSpec.from_dict({**tr.to_dict(), "attention_kernel": "xformers"})


def test_allgather_context_parallelism_exposes_its_collectives(a100):
    ring = _cm(a100, gpus=64)
    gather = _cm(a100, gpus=64, cp="allgather")
    r, g = ring.unit_cost([65536], 8, inter_node=True), gather.unit_cost([65536], 8, inter_node=True)
    # the same attention work and kernel calls: the rank's causal square (8K tokens here) and 7 full rectangles
    # of 8K x 4K, at the non-causal rate of 4K-token squares
    for ring_s, gather_s in ((r.fwd_compute_s, g.fwd_compute_s), (r.bwd_compute_s, g.bwd_compute_s)):
        assert ring_s == pytest.approx(gather_s, rel=1e-12)
    attn = float(ring.attn_fwd_s(8192)) + 7 * 2 * float(ring.attn_full_s(4096, "fwd"))
    assert r.attn_fwd_compute_s == pytest.approx(ring.layers_per_stage * attn, rel=1e-12)
    # a square without the mask: twice the causal FLOPs at FlashAttention-2's higher non-causal rate (A100 profile)
    assert 1.0 < float(ring.attn_full_s(4096, "fwd")) / float(ring.attn_fwd_s(4096)) < 2.0
    assert g.ring_comm_s > 0 and g.ring_exposed_s == pytest.approx(g.ring_comm_s)  # nothing overlaps the all-gather
    assert r.ring_exposed_s < r.ring_comm_s  # the ring hides part of its transfers under attention
    gathered = 65536 / 8 * 2 * ring.model.kv_width / 8 * 2 * 8  # K/V of the 8 members, bf16, per TP rank
    per_layer = float(a100.collective_time_s("all_gather", gathered, 8, "inter", 8))  # the 8 TP ranks' groups at once
    assert g.ring_exposed_fwd_s == pytest.approx(ring.layers_per_stage * per_layer)
    assert ring.unit_cost([4096], 1).total_s == pytest.approx(gather.unit_cost([4096], 1).total_s)  # no CP


def test_eager_kernels_are_the_runtime_ops_by_hand():
    tiny = load_model("tiny")
    h, q, kv, f = tiny.hidden, tiny.q_width, tiny.kv_width, tiny.ffn
    fwd = eager_layer_kernels(tiny, 1, True, 4, "fwd")
    # two RMSNorms (pow 2h, mean h+1, +eps 2, rsqrt 2, x·r 2h+1, ·w 2h), rotate-half RoPE on Q and K (four products
    # of the width, a sub and an add of 1.5x, the cat 2x: 9x each), Q and V copied out of the fused QKV (2q + 2kv),
    # attention's output copy (2q), SwiGLU (silu 2f, product 3f), two residual adds (3h)
    per_norm = 2 * h + (h + 1) + 2 + 2 + (2 * h + 1) + 2 * h
    expect = 2 * per_norm + 9 * q + 9 * kv + 2 * (q + kv) + 2 * q + 5 * f + 2 * 3 * h
    assert _total(fwd) == pytest.approx(4 * expect)
    assert len(fwd) == 2 * 6 + 2 * 7 + 1 + 1 + 2 + 2
    fused = layer_kernels(tiny, 1, True, 4, "fwd")
    assert len(fwd) > 5 * len(fused) and _total(fwd) > 2 * _total(fused)
    bwd = eager_layer_kernels(tiny, 1, True, 4, "bwd")
    assert _total(bwd) > _total(fwd)  # every op's backward reads more than its forward
    # the backward puts dQ, dK, dV back into the QKV gradient (one cat) and d(gate), d(up) into gate/up's (a stack)
    parts = {k.label: k.bytes_per_item for k in bwd}
    assert parts["qkv_split"] == 4 * 2 * (q + 2 * kv) and parts["gate_up_grad_cat"] == 4 * 2 * 2 * f
    # GPT blocks: LayerNorm and GeLU kernels, dropout masks, no RoPE
    gpt = load_model("gpt-22b")
    labels = {k.label.rsplit("_", 1)[0] for k in eager_layer_kernels(gpt, 1, True, 2, "fwd")}
    assert {"layernorm", "gelu", "residual", "dropout"} <= labels and "rope" not in labels


def test_eager_recompute_replays_what_the_runtime_checkpoints():
    tiny = load_model("tiny")
    # selective checkpoints the attention core only (no elementwise kernel); full replays the eager forward
    assert recompute_kernels(tiny, 1, True, 4, "selective", eager=True) == ()
    assert recompute_kernels(tiny, 1, True, 4, "full", eager=True) == eager_layer_kernels(tiny, 1, True, 4, "fwd")


def test_eager_training_prices_more_memory_time_and_an_unfused_loss(a100):
    fused, eager = _cm(a100, model="llama-7b", tp=1), _cm(a100, model="llama-7b", tp=1, kernels="eager")
    u, v = fused.unit_cost([4096]), eager.unit_cost([4096])
    assert v.mem_fwd_s > 2 * u.mem_fwd_s and v.mem_bwd_s > 2 * u.mem_bwd_s  # more kernels, more bytes
    assert v.attn_fwd_compute_s == pytest.approx(u.attn_fwd_compute_s)  # GEMMs and attention are the same
    assert v.head_fwd_s > u.head_fwd_s  # the fp32 logits' softmax is written out
    assert "kernels" not in TrainingSpec().to_dict() and TrainingSpec(kernels="eager").to_dict()["kernels"] == "eager"


def test_eager_bf16_keeps_the_runtimes_fp32_stream():
    # planner/runtime autocasts over fp32 parameters: norms and residual adds on the fp32 stream, each norm's output
    # cast for its GEMM, the branches (projections, RoPE, activation) in bf16
    llama = load_model("llama3-8b")
    h = llama.hidden
    bf16, fp32 = (eager_layer_kernels(llama, 1, False, b, "fwd") for b in (2, 4))
    parts = {k.label: k.bytes_per_item for k in bf16}
    assert parts["autocast_cast"] == h * (4 + 2) and parts["residual"] == h * (4 + 2 + 4)
    norm = lambda ks: [k.bytes_per_item for k in ks if k.label.startswith("rmsnorm")]  # noqa: E731
    assert norm(bf16) == norm(fp32)  # the norms run in fp32 either way
    assert parts["swiglu_1"] == 3 * llama.ffn * 2  # the activation stays bf16
    assert "autocast_cast" not in {k.label for k in fp32}
    bwd = {k.label: k.bytes_per_item for k in eager_layer_kernels(llama, 1, False, 2, "bwd")}
    assert bwd["residual"] == h * (3 * 4 + 4 + 2)  # the stream's accumulation, the branch's gradient cast down
    # the loss over fp32 logits: cast up and log-softmax forward; zero fill, log-softmax backward, cast down
    ce = {(d, b): {k.label: k.bytes_per_item / llama.vocab for k in eager_head_kernels(llama, 1, False, b, d)
                   if not k.label.startswith(("rmsnorm", "autocast"))} for d in ("fwd", "bwd") for b in (2, 4)}
    assert ce["fwd", 2] == {"logits_cast": 2 + 4, "log_softmax": 8}
    assert ce["bwd", 2] == {"logits_grad_fill": 4, "log_softmax": 12, "logits_cast": 4 + 2}
    assert "logits_cast" not in ce["fwd", 4] and "logits_cast" not in ce["bwd", 4]  # fp32 logits: no cast


def test_kernels_of_slow_kinds_take_their_kinds_share_of_the_bandwidth(a100):
    """A profile's memory_kind_<kind> constants slow the eager kernels of that kind (bytes over the kind's share of the
    table's bandwidth) and leave streaming kernels and fused training alone."""
    llama = load_model("llama3-8b")
    kinds = {k.label: k.kind for k in eager_layer_kernels(llama, 1, True, 2, "fwd")}
    assert kinds["qkv_split"] == kinds["attn_out_layout"] == "strided" and kinds["residual"] == "mixed"
    assert kinds["rmsnorm_4"] == kinds["rope_0"] == "broadcast" and kinds["swiglu_0"] == "stream"
    head = {k.label: k.kind for k in eager_head_kernels(llama, 1, True, 2, "fwd")}
    assert head["log_softmax"] == "softmax" and head["logits_cast"] == "stream"
    assert {k.kind for k in eager_layer_kernels(llama, 1, True, 4, "fwd") if k.label == "residual"} == {"stream"}
    assert {k.kind for d in ("fwd", "bwd") for k in layer_kernels(llama, 1, True, 2, d)} == {"stream"}  # fused
    streams = dataclasses.replace(a100, constants={k: v for k, v in a100.constants.items()
                                                   if not k.startswith("memory_kind_")})  # every kind a stream
    assert streams.memory_kind_ratio("strided") == 1.0
    slow = dataclasses.replace(streams, constants={**streams.constants, "memory_kind_strided": {"value": 0.5},
                                                   "memory_kind_softmax": {"value": 0.25}})
    assert slow.memory_kind_ratio("strided") == 0.5 and slow.memory_kind_ratio("stream") == 1.0
    base, eager_slow = (_cm(p, model="llama3-8b", tp=1, kernels="eager").unit_cost([8192]) for p in (streams, slow))
    t = lambda nbytes: float(a100.memory_time_s(nbytes))  # noqa: E731
    # each strided kernel is priced as a streaming one of twice its bytes
    strided = sum(t(2 * 8192 * k.bytes_per_item) - t(8192 * k.bytes_per_item) for k in eager_layer_kernels(
        llama, 1, True, 2, "fwd") if k.kind == "strided") * llama.layers
    assert eager_slow.mem_fwd_s - base.mem_fwd_s == pytest.approx(strided, rel=0.03)
    assert eager_slow.head_fwd_s > base.head_fwd_s
    fused = [_cm(p, model="llama3-8b", tp=1).unit_cost([8192]) for p in (streams, slow)]
    assert fused[0].mem_fwd_s == fused[1].mem_fwd_s and fused[0].head_fwd_s == fused[1].head_fwd_s
