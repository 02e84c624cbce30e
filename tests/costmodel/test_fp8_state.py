"""fp8 training's extra state and step-end time (Transformer Engine): cached fp8 weight copies (Hopper's transposed
copy, Blackwell's MXFP8 columnwise copy), delayed scaling's amax history and its amax all-reduce; bf16 unchanged."""

import dataclasses

import pytest

from costmodel.memory import fp8_recipe, fp8_scaled_tensors, fp8_state_bytes, memory_budget, model_state_bytes
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel
from profiles.table import load_profile

# llama-7b (h 4096, 32 query and 8 KV heads of 128, f 11008, SwiGLU, 32 layers) at tp = 2, per layer and rank:
# QKV 4096·(4096 + 2·1024) + O 4096·4096 + MLP 3·4096·11008 = 177,209,344 fp8 GEMM weights / 2 = 88,604,672.
LAYER_PARAMS_TP2 = 88_604_672
# delayed scaling: 4 GEMMs × 32 layers, 3 forward + 2 backward scaled tensors each = 640 tensors, each with an fp32
# amax history of 1024 entries, a scale and an inverse scale: 640 · 4 · 1026 B
SCALING_BYTES = 640 * 4 * 1026


def _setup(dtype: str = "fp8", cluster: str = "dgx-h100", gpus: int = 16, model: str = "llama-7b",
           **training) -> Setup:
    return Setup(load_model(model), load_cluster(cluster).with_gpus(gpus), TrainingSpec(dtype=dtype, tp=2, **training))


def test_fp8_state_bytes_hopper_hand_computed():
    # Hopper, delayed scaling: rowwise fp8 copy + its transpose (dgrad reads the weight columnwise), 1 B each
    s = _setup()
    assert fp8_recipe(s) == "delayed"
    assert fp8_state_bytes(s) == 32 * LAYER_PARAMS_TP2 * 2 + SCALING_BYTES == 5_673_325_568
    bf16 = _setup("bf16")
    assert fp8_state_bytes(bf16) == 0.0
    assert model_state_bytes(s) == pytest.approx(model_state_bytes(bf16) + 5_673_325_568, rel=1e-12)
    # pp = 2: a stage holds 16 layers, their copies and scaling state
    assert fp8_state_bytes(_setup(pp=2)) == 16 * LAYER_PARAMS_TP2 * 2 + SCALING_BYTES // 2 == 2_836_662_784
    # ZeRO-3: copies of the 2 gathered layers only; every layer keeps its scaling state
    assert fp8_state_bytes(_setup(zero_stage=3)) == 2 * LAYER_PARAMS_TP2 * 2 + SCALING_BYTES == 357_045_248


def test_fp8_state_bytes_blackwell_mxfp8_hand_computed():
    # Blackwell, MXFP8: rowwise and columnwise copies quantized apart, 1 B + one 1-byte E8M0 scale per 32 elements
    # each (2.0625 B per weight); per-block scales need no amax history
    s = _setup(cluster="dgx-b200")
    assert fp8_recipe(s) == "mxfp8" and fp8_recipe(_setup(cluster="gb200-nvl72", gpus=72)) == "mxfp8"
    assert fp8_scaled_tensors(s) == (0, 0)
    assert fp8_state_bytes(s) == 32 * LAYER_PARAMS_TP2 * 2 * 33 / 32 == 5_847_908_352


def test_fp8_state_bytes_moe_counts_every_local_expert():
    # mistral-8x7b (h 4096, q 4096, kv 1024, f 14336, 8 experts) at tp = ep = 2: per layer and rank
    # (4096·10240 + 8·3·4096·14336) / 2 = 725,614,592 weights; GEMMs: QKV, O and up/down of 4 local experts = 10,
    # so 32·10·(3 + 2) scaled tensors
    s = _setup(model="mistral-8x7b", ep=2)
    assert fp8_scaled_tensors(s) == (960, 640)
    assert fp8_state_bytes(s) == 32 * 725_614_592 * 2 + 1600 * 4 * 1026 == 46_445_900_288


def test_fp8_activations_keep_gemm_inputs_in_fp8():
    # TE saves the wgrad inputs as their 1-byte fp8 casts: the two norm outputs (2h less), the down projection's
    # input (f less), and the output projection's fp8 input beside attention's bf16 output (q more), ÷ tp with SP:
    # llama-7b at tp 2: (2·4096 + 11008 − 4096) / 2 = 7,552 B per token and layer
    bf16, fp8 = memory_budget(_setup("bf16")), memory_budget(_setup())
    assert bf16.activation_bytes_per_token - fp8.activation_bytes_per_token == 32 * 7552
    # selective keeps no down-projection input to save in fp8; full keeps the layer input only
    sel = [memory_budget(_setup(d, recompute="selective")).activation_bytes_per_token for d in ("bf16", "fp8")]
    assert sel[0] - sel[1] == 32 * (2 * 4096 - 4096) / 2
    full = [memory_budget(_setup(d, recompute="full")).activation_bytes_per_token for d in ("bf16", "fp8")]
    assert full[0] == full[1]
    # C: what the states leave (the fp8 copies less) over the fp8 per-token activations
    per_token = fp8.activation_bytes_per_token + fp8.recompute_working_bytes_per_token
    free = bf16.capacity_tokens * (bf16.activation_bytes_per_token + bf16.recompute_working_bytes_per_token)
    assert fp8.capacity_tokens == pytest.approx((free - 5_673_325_568) / per_token, abs=2)
    # llama3-70b at tp = 8, pp = 1 on 256 H100s fits in bf16 (56.2 GB of states of the 72.2 GB left) but not with
    # 17.1 GB of fp8 copies: the message says so
    m, c = load_model("llama3-70b"), load_cluster("dgx-h100").with_gpus(256)
    assert memory_budget(Setup(m, c, TrainingSpec(tp=8, recompute="full")))
    with pytest.raises(SpecError) as e:
        memory_budget(Setup(m, c, TrainingSpec(tp=8, recompute="full", dtype="fp8")))
    msg = str(e.value)
    assert "fp8 weight copies 17.1 GB" in msg and "the smallest tp×pp that fits 256 GPUs is tp=8, pp=2" in msg


def _cm(setup: Setup) -> CostModel:
    return CostModel(setup, load_profile(setup.cluster.profile))


def test_fp8_amax_all_reduce_at_the_step_end():
    """llama-7b, tp = 2 on 64 H100s: hdp = 32 over 8 nodes, so the amax all-reduce runs over all 64 ranks
    inter-node: one of 384 forward amaxes (1,536 B) and one of 256 backward amaxes (1,024 B)."""
    fp8, bf16 = _cm(_setup(gpus=64)), _cm(_setup("bf16", gpus=64))
    p = fp8.profile
    want = float(p.collective_time_s("all_reduce", 1536.0, 64, "inter") + p.collective_time_s("all_reduce", 1024.0,
                                                                                                 64, "inter"))
    assert fp8.fp8_amax_sync_s() == pytest.approx(want, rel=1e-12) and want > 0
    assert fp8.grad_sync_s() == pytest.approx(bf16.grad_sync_s() + want, rel=1e-12)
    assert fp8.step_end_s() == pytest.approx(bf16.step_end_s() + want, rel=1e-12)
    assert fp8.exposed_grad_sync_s(None, 0.0) == pytest.approx(bf16.exposed_grad_sync_s(None, 0.0) + want, rel=1e-12)
    # overlap_grad_reduce hides gradient buckets under the last backward, never the amax reduction after it
    fp8_o, bf16_o = (_cm(_setup(dt, gpus=64, overlap_grad_reduce=True)) for dt in ("fp8", "bf16"))
    assert fp8_o.exposed_grad_sync_s(None, 10.0) == pytest.approx(bf16_o.exposed_grad_sync_s(None, 10.0) + want,
                                                                  rel=1e-12)
    # inside one node (4 HDP ranks × tp 2): intra-node
    one_node = _cm(_setup(gpus=8))
    assert one_node.fp8_amax_sync_s() == pytest.approx(float(
        p.collective_time_s("all_reduce", 1536.0, 8, "intra") + p.collective_time_s("all_reduce", 1024.0, 8, "intra")))
    # bf16, MXFP8 (per-block scales) and a single GPU reduce nothing
    assert bf16.fp8_amax_sync_s() == 0.0
    assert _cm(_setup(cluster="dgx-b200", gpus=16)).fp8_amax_sync_s() == 0.0
    single = Setup(load_model("tiny"), load_cluster("dgx-h100").with_gpus(1), TrainingSpec(dtype="fp8"))
    assert _cm(single).fp8_amax_sync_s() == 0.0


def test_fit_hints_try_tp_across_the_nvlink_domain():
    """GB200 NVL72: 4-GPU trays in a 72-GPU NVLink domain, so tp = 8 is a valid layout on 8 GPUs (MeshLayout keeps
    a TP group inside a domain: 8 divides 72). The hint names it (P/8 = 8.82e9 parameters × (6 + 12) B = 158.7 GB,
    hdp = 1) where divisors of a tray alone gave tp = 4, pp = 2 (the same states)."""
    m, c = load_model("llama3-70b"), load_cluster("gb200-nvl72").with_gpus(8)
    setup = Setup(m, c, TrainingSpec(recompute="full"))
    with pytest.raises(SpecError) as e:
        memory_budget(setup)
    assert "the smallest tp×pp that fits 8 GPUs is tp=8, pp=1 (158.7 GB of states per GPU, C = 76,104" in str(e.value)
    assert memory_budget(dataclasses.replace(setup, training=TrainingSpec(tp=8, recompute="full")))


def test_current_scaling_keeps_no_history_and_reads_each_operand_twice():
    # Megatron's --fp8-recipe tensorwise (TE Float8CurrentScaling): the amax of the tensor being cast, no history
    s = _setup(fp8_recipe="tensorwise")
    assert fp8_recipe(s) == "tensorwise" and fp8_scaled_tensors(s) == (0, 0)
    assert fp8_state_bytes(s) == pytest.approx(fp8_state_bytes(_setup()) - SCALING_BYTES)
    profile = load_profile("h100-sxm.analytic")
    cur, delayed = CostModel(s, profile), CostModel(_setup(), profile)
    assert cur.fp8_amax_sync_s() == 0 and delayed.fp8_amax_sync_s() > 0
    from costmodel.elementwise import FP8_AMAX_PASS_BYTES, FP8_CAST_BYTES, fp8_cast_kernels

    widths = {"qkv": (4096.0, 3072.0)}
    assert (fp8_cast_kernels(widths, "fwd", True)[0].bytes_per_item
            == 4096.0 * (FP8_CAST_BYTES + FP8_AMAX_PASS_BYTES))
    assert float(cur._lookup("mem_layer_fwd", 4096)) > float(delayed._lookup("mem_layer_fwd", 4096))
    # with SP the layer's all-gathers move the fp8 cast (1 B), each after a 4-byte amax all-reduce over TP
    act = 4096 * 4096
    pair = float(cur._lookup("tp_all_gather", act * 1.0) + cur._lookup("tp_reduce_scatter", act * 2.0))
    amax = 2 * float(cur._lookup("tp_all_reduce", 4.0))
    fwd, bwd = cur.layer_tp_comm_s(4096.0)
    assert float(fwd) == pytest.approx(2 * pair + amax, rel=1e-9) and float(bwd) == pytest.approx(float(fwd))
    assert float(delayed.layer_tp_comm_s(4096.0)[0]) == pytest.approx(2 * float(delayed.tp_pair_s(4096.0)))


def test_fp8_recipe_is_checked():
    with pytest.raises(SpecError, match="dtype fp8 only"):
        TrainingSpec(dtype="bf16", fp8_recipe="tensorwise")
    with pytest.raises(SpecError, match="MXFP8 tensor cores"):
        fp8_recipe(_setup(fp8_recipe="mxfp8"))
    assert fp8_recipe(_setup(fp8_recipe="delayed", cluster="dgx-b200", gpus=16)) == "delayed"
    tr = TrainingSpec(dtype="fp8", fp8_recipe="tensorwise", tp_comm_overlap=True, overlap_param_gather=True)
    assert TrainingSpec.from_dict(tr.to_dict()) == tr
    assert "fp8_recipe" not in TrainingSpec().to_dict()  # plans that do not set them stay as they were


def test_fp8_param_gather_keeps_no_bf16_copy_and_gathers_in_fp8():
    # Megatron-LM's --fp8-param-gather: the fp8 weights (with their transposes) are the parameters; the bf16 copy of
    # the GEMM weights goes (2 B each) and the distributed optimizer's all-gather moves them at 1 B
    base, gathered = _setup(gpus=64), _setup(gpus=64, fp8_param_gather=True)
    assert model_state_bytes(base) - model_state_bytes(gathered) == pytest.approx(32 * LAYER_PARAMS_TP2 * 2)
    assert fp8_state_bytes(gathered) == SCALING_BYTES
    (rs0, ag0), (rs1, ag1) = _cm(base)._grad_sync_parts_s(32), _cm(gathered)._grad_sync_parts_s(32)
    assert rs1 == rs0 and ag1 < 0.75 * ag0
    for bad in ({"dtype": "bf16"}, {"zero_stage": 0}, {"zero_stage": 3}):
        with pytest.raises(SpecError, match="fp8_param_gather needs dtype fp8 and the distributed optimizer"):
            TrainingSpec(**{"dtype": "fp8", **bad, "fp8_param_gather": True})