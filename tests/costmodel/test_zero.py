"""ZeRO-3 formulas (costmodel.zero) and the model states of ZeRO 0..3, by hand."""

import pytest

from costmodel.memory import memory_budget, model_state_bytes, params_per_rank
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel
from costmodel.zero import (backward_pass_s, forward_pass_s, inflight_bytes, layer_params_per_rank,
                            round_collectives, round_time_s)
from profiles.table import load_profile

# llama-7b preset (h 4096, f 11008, 32 heads, 8 KV heads of 128, V 32000, untied, 32 layers), by hand:
LAYER_7B = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # QKV, O, SwiGLU, 2 RMSNorms
ROOT_7B = 32000 * 4096 + (4096 + 32000 * 4096)  # embedding; final norm + LM head
PARAMS_7B = 32 * LAYER_7B + ROOT_7B


def test_model_states_per_rank_for_zero_0_to_3():
    # 64 HDP ranks, tp 1, bf16 params, fp32 grads, fp32 master + Adam m, v (REFERENCE 7.3: 18 B, ZeRO-3 18/d)
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64)
    assert m.layer_params() == LAYER_7B and m.parameters == PARAMS_7B
    got = [model_state_bytes(Setup(m, c, TrainingSpec(zero_stage=z))) for z in range(4)]
    # ZeRO-3 also holds 2 gathered layers + the root in bf16, one layer's + the root's unsharded fp32 gradients
    inflight = (2 * LAYER_7B + ROOT_7B) * 2 + (LAYER_7B + ROOT_7B) * 4
    want = [PARAMS_7B * 18, PARAMS_7B * (6 + 12 / 64), PARAMS_7B * (2 + 16 / 64), PARAMS_7B * 18 / 64 + inflight]
    assert got == pytest.approx(want, rel=1e-12)
    assert inflight_bytes(Setup(m, c, TrainingSpec(zero_stage=3))) == pytest.approx(inflight)
    caps = [memory_budget(Setup(m, c, TrainingSpec(zero_stage=z))).capacity_tokens for z in (1, 2, 3)]
    assert caps == sorted(caps) and caps[0] < caps[2]


def test_zero3_with_pipelining_is_refused_in_one_line():
    with pytest.raises(SpecError, match=r"zero_stage 3 with pp=2 is not modelled.*use pp=1"):
        TrainingSpec(zero_stage=3, pp=2)


def test_forward_pass_prefetches_one_layer_ahead():
    # first gather exposed, then per layer max(compute, next gather), last layer's compute: g + (l-1)max(c, g) + c
    assert forward_pass_s(layer_s=5.0, gather_s=3.0, layers=4) == 3 + 3 * 5 + 5  # compute-bound: 3 s exposed
    assert forward_pass_s(layer_s=2.0, gather_s=3.0, layers=4) == 3 + 3 * 3 + 2  # gather-bound: 3 + 3·1 exposed
    assert forward_pass_s(layer_s=2.0, gather_s=3.0, layers=1) == 3 + 2


def test_backward_pass_overlaps_gather_and_reduce_scatter():
    # 4 layers, c = 4, g = 1, r = 2, head 0.5 before it: the first gather 0.5 exposed, then max(4, 1),
    # 2 x max(4, 1 + 2), max(4, 2), the last reduce-scatter 2 exposed
    assert backward_pass_s(4.0, 1.0, 2.0, 4, lead_s=0.5) == 0.5 + 4 + 2 * 4 + 4 + 2
    # comm-bound middle layers: g + r = 5 > c = 4
    assert backward_pass_s(4.0, 2.0, 3.0, 4, lead_s=0.0) == 2 + 4 + 2 * 5 + 4 + 3
    assert backward_pass_s(4.0, 1.0, 2.0, 1, lead_s=3.0) == 0 + 4 + 2


def test_round_collectives_volumes_and_scope():
    # llama3-70b, tp 8, 256 H100: 32 HDP ranks on 4 nodes, so the stage's collectives are inter-node. Per layer
    # S = P_layer/t · b: all-gather bf16 (each rank receives (d-1)/d · S), reduce-scatter fp32 gradients.
    m, c = load_model("llama3-70b"), load_cluster("dgx-h100").with_gpus(256)
    setup = Setup(m, c, TrainingSpec(tp=8, zero_stage=3, recompute="full"))
    layer = (8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 28672 + 2 * 8192) / 8
    root = (128256 * 8192 + 8192 + 128256 * 8192) / 8
    assert layer_params_per_rank(setup) == layer
    p = load_profile("h100-sxm.analytic")
    got = round_collectives(setup, p)
    # one group per TP rank, the 8 at once on the same nodes (one member each per node: one NIC each)
    assert got.layer_gather_s == pytest.approx(float(p.collective_time_s("all_gather", layer * 2, 32, "inter", 8)))
    assert got.layer_reduce_scatter_s == pytest.approx(
        float(p.collective_time_s("reduce_scatter", layer * 4, 32, "inter", 8)))
    assert got.root_gather_s == pytest.approx(float(p.collective_time_s("all_gather", root * 2, 32, "inter", 8)))
    assert got.layer_gather_s < got.layer_reduce_scatter_s  # half the bytes
    one_node = Setup(m, load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=1, zero_stage=3, recompute="full"))
    intra = round_collectives(one_node, p).layer_gather_s
    assert intra == pytest.approx(float(p.collective_time_s("all_gather", layer * 8 * 2, 8, "intra")))
    # a round: root gather, forward, head, backward (its first gather under the head), root reduce-scatter
    t = round_time_s(1.0, 2.0, 0.5, 80, got)
    g, r = got.layer_gather_s, got.layer_reduce_scatter_s
    assert t == pytest.approx(got.root_gather_s + g + 79 * max(1.0, g) + 1.0 + 0.5 + max(0.0, g - 0.5)
                              + max(2.0, g) + 78 * max(2.0, g + r) + max(2.0, r) + r + got.root_reduce_scatter_s)


def test_zero3_has_no_end_of_step_gradient_sync_and_a_sharded_optimizer_step():
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64)
    p = load_profile("h100-sxm.analytic")
    z1, z3 = (CostModel(Setup(m, c, TrainingSpec(zero_stage=z)), p) for z in (1, 3))
    assert z1.grad_sync_s() > 0 and z3.grad_sync_s() == 0.0
    # both update a 1/64 shard; ZeRO-1 then zeroes its whole gradient buffer, ZeRO-3 has none to zero
    whole = float(p.memory_time_s(params_per_rank(z1.setup) * 4))
    assert z3.optimizer_step_s() == pytest.approx(z1.optimizer_step_s() - whole, rel=1e-12)


def test_oom_message_suggests_zero3_when_it_fits():
    # Llama-3 405B, tp 8, 32 HDP ranks: ZeRO-1 keeps 6 B/param unsharded (323 GB per GPU); ZeRO-3 shards all 18
    m, c = load_model("llama3-405b"), load_cluster("dgx-h100").with_gpus(256)
    with pytest.raises(SpecError) as e:
        memory_budget(Setup(m, c, TrainingSpec(tp=8)))
    z3 = model_state_bytes(Setup(m, c, TrainingSpec(tp=8, zero_stage=3)))
    assert f"zero_stage=3 (--zero 3, FSDP) would shard the weights and gradients too: {z3 / 1e9:.1f} GB per GPU" \
        in str(e.value)
    inflight = inflight_bytes(Setup(m, c, TrainingSpec(tp=8, zero_stage=3)))
    assert z3 == pytest.approx(m.parameters / 8 * 18 / 32 + inflight)


def test_precision_aware_optimizer_states_by_hand():
    """bf16 moments (Megatron-core's precision-aware optimizer): m and v 2 B each, the master as the 16-bit remainder
    of the bf16 parameter (2 B), or whole fp32 beside fp8 weights (4 B): 6 or 8 B sharded where fp32 moments take 12;
    more tokens fit; it is refused where Megatron's distributed optimizer does not run (ZeRO-0 is not it, ZeRO-3 is
    FSDP2's, eager kernels the replay's) and for fp32 or fp16 training."""
    m, c = load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64)
    states = lambda **tr: model_state_bytes(Setup(m, c, TrainingSpec(**tr)))  # noqa: E731
    assert states(optimizer_moments="bf16") == pytest.approx(PARAMS_7B * (6 + 6 / 64), rel=1e-12)
    assert states(optimizer_moments="bf16", zero_stage=2) == pytest.approx(PARAMS_7B * (2 + 10 / 64), rel=1e-12)
    fp8 = dict(dtype="fp8", fp8_param_gather=True)
    assert states(optimizer_moments="bf16", **fp8) - states(**fp8) == pytest.approx(PARAMS_7B * (8 - 12) / 64)
    cap = lambda **tr: memory_budget(Setup(m, c, TrainingSpec(**tr))).capacity_tokens  # noqa: E731
    assert cap(optimizer_moments="bf16") > cap()
    for bad in (dict(zero_stage=0), dict(zero_stage=3), dict(kernels="eager"), dict(dtype="fp32"), dict(dtype="fp16")):
        with pytest.raises(SpecError, match="optimizer_moments bf16 is Megatron-core's precision-aware optimizer"):
            TrainingSpec(optimizer_moments="bf16", **bad)
    assert "optimizer_moments" not in TrainingSpec().to_dict()
    assert TrainingSpec(optimizer_moments="bf16").to_dict()["optimizer_moments"] == "bf16"
