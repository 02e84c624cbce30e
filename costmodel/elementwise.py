"""Memory-bound kernels of a training step (REFERENCE 7.1 leaves them out; Korthikanti et al. 2022 §4 and
Megatron-LM's fused kernels define them): bytes each kernel reads and writes, priced by the cost model as a
profile's memory-table lookup per kernel (launch floor + bytes at achievable HBM bandwidth; a kernel of a slower
access kind, e.g. a strided copy, at its kind's measured share of that bandwidth).

A layer's GEMMs and attention core are priced elsewhere; here are the kernels between them, as Megatron-LM
fuses them: the two norms, the activation (bias fused: bias-GeLU; SwiGLU reads gate and up), RoPE on Q and K,
and the two bias-dropout-add residuals. Norms, dropout and residuals act on the hidden state, which sequence
parallelism splits over TP ranks and plain TP replicates; the activation and RoPE act on TP-sharded widths.
Backward kernels read the forward's inputs and the incoming gradient and write the outgoing gradient.
Unfused attention (no FlashAttention) adds per attention score the scaled-masked softmax and the attention
dropout. Counting conventions: bytes = elements × dtype bytes, a dropout mask is 1 byte per element."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from costmodel.specs import GradAccumulation, LossKernel, ModelSpec, Recompute

# The optimizer step, bytes per parameter the rank updates (its ZeRO shard, or all of them), by who runs it.
# Megatron-core's (DistributedOptimizer / Float16Optimizer.step, Adam over fp32 master weights): the gradients' L2
# norm for clipping (4 read; clip_grad 1.0 by default) and their scaling by the clamped coefficient (8 read and
# written: with Transformer Engine's multi_tensor_scale_tensor every step; older Apex-only versions only when the norm
# exceeds clip_grad), fused Adam (grad, master, m, v: 16 read; master, m, v: 12 written), the master copied into the
# model's parameter (4 read, 2 written); bf16 gradients are cast to fp32 first (MEGATRON_BF16_GRAD_CAST_BYTES). With
# zero_stage < 3 it also zeroes its whole gradient buffer each step, every parameter of the rank at the gradients'
# width (zero_grad_buffer).
MEGATRON_OPTIMIZER_BYTES = 4 + 8 + 16 + 12 + 4 + 2
MEGATRON_BF16_GRAD_CAST_BYTES = 2 + 4


def precision_aware_optimizer_bytes(grad_bytes: float) -> float:
    """Megatron-core's precision-aware optimizer step, bytes per parameter (bf16 moments; Transformer Engine's FusedAdam
    with use_decoupled_grad on the gradient buffer itself, no cast): the clipping's norm and scaling (3 g for g-byte
    gradients), each bf16 moment copied to fp32 before the kernel and back after it (2 read, 4 written, then 4 read, 2
    written: 12 each way for m and v), then the Adam kernel (gradient, bf16 parameter, master remainder, fp32 m and v
    read: g + 12; parameter, remainder, m, v written: 12), which writes the model's parameter itself (no master
    copy). A full fp32 master (fp8 weights) moves the same bytes as parameter and remainder."""
    return 3 * grad_bytes + 12 + (grad_bytes + 12) + 12 + 12

# torch FSDP2 (zero_stage 3 with eager kernels: torchtitan): the fp32 sharded parameters are the master weights;
# clip_grad_norm_ reads the gradients for the norm and scales them unconditionally (4 + 8), fused AdamW (16 + 12),
# the gradients then set to None.
FSDP2_OPTIMIZER_BYTES = 4 + 8 + 16 + 12
# meshplan's replay (eager kernels, zero_stage < 3; planner/runtime/context.py): fused AdamW over the whole fp32
# parameters (16 + 12), no clipping; it zeroes its gradients before the step's clock starts.
REPLAY_OPTIMIZER_BYTES = 16 + 12


def grad_accumulation_bytes(kind: GradAccumulation, grad_bytes: float, acc_bytes: float) -> float:
    """Bytes per parameter one micro-batch moves to accumulate its weight gradients outside the GEMM: nothing when
    the GEMM accumulates (fused); an add reads the GEMM's gradient (grad_bytes, the training dtype's) and reads and
    writes the accumulator (acc_bytes each: the gradients' dtype); a cast first writes the gradient at the
    accumulator's width and the add reads it back (2 acc_bytes more): bf16 into fp32, 10 B and 18 B."""
    return {"fused": 0.0, "add": grad_bytes + 2 * acc_bytes, "cast_add": grad_bytes + 4 * acc_bytes}[kind]


# fp8 training (Transformer Engine): each fp8 GEMM operand is cast from bf16, its amax taken on the way, into fp8 and
# its transpose (Hopper's fp8 GEMMs take only the TN layout, so the other pass needs the transposed copy): read 2 B,
# write 1 + 1 B per element [assumption: one unfused cast-transpose per operand; TE fuses some into the norm]
FP8_CAST_BYTES = 2 + 1 + 1
# Current scaling (Float8CurrentScaling, "tensorwise") first reads the bf16 operand for its amax, then casts: one
# more 2 B read per element (TE docs, "FP8 Current Scaling": "requires reading the tensor twice")
FP8_AMAX_PASS_BYTES = 2


KINDS = ("stream", "broadcast", "mixed", "strided", "softmax")  # profiles/measure/memory.py measures each


@dataclass(frozen=True)
class MemKernel:
    """One memory-bound kernel: bytes read + written per unit of work on one rank, and its access kind (a profile's
    constant memory_kind_<kind> says how far that kind's bandwidth is from the memory table's streaming kernel)."""

    label: str
    bytes_per_item: float  # per token of the micro-batch (layer, head kernels) or per attention score
    kind: str = "stream"  # one of KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"memory kernel {self.label!r}: kind {self.kind!r} is not one of {KINDS}")


def layer_kernels(model: ModelSpec, tp: int, sequence_parallel: bool, dtype_bytes: int,
                  direction: str) -> tuple[MemKernel, ...]:
    """A layer's memory-bound kernels in one direction ("fwd" or "bwd"), bytes per token of the micro-batch on
    one TP rank."""
    b = float(dtype_bytes)
    hidden = model.hidden / (tp if sequence_parallel else 1)  # norms, dropout, residuals
    ffn = model.mlp_width_per_token / tp  # top-k experts and the shared one
    qk = (model.q_width + model.k_width) / tp
    mask = 1.0 if model.dropout else 0.0
    fwd = direction == "fwd"
    norm = MemKernel("norm", hidden * (2 * b if fwd else 3 * b))  # y = norm(x) | dx from x, dy
    # bias-dropout-add: out = residual + dropout(x + bias) | the backward passes dy on and masks it
    residual = MemKernel("residual", hidden * ((3 * b + mask) if fwd else (2 * b + mask)))
    if model.mlp == "swiglu":  # silu(gate) * up | d(gate), d(up) from gate, up, dy
        act = MemKernel("swiglu", ffn * (3 * b if fwd else 5 * b))
    elif model.mlp == "gelu":  # gelu(x + bias) | dx from x, dy
        act = MemKernel("gelu", ffn * (2 * b if fwd else 3 * b))
    else:  # Megatron-core's squared ReLU is unfused: relu, then pow | pow's and relu's backward, one kernel each
        act = MemKernel("relu2", ffn * (4 * b if fwd else 6 * b))
    out = [norm, norm, residual, residual, act]
    if model.position == "rope":  # rotate Q and K (the backward rotates back); MLA: its fused kernel writes them
        out.append(MemKernel("rope", qk * 2 * b))  # whole from the RoPE and the other parts
    if model.is_mla:  # the latents' RMSNorms, on each rank's own tokens before their all-gather (TE's LayerNormLinear)
        latents = (model.q_lora_rank + model.kv_lora_rank) / (tp if sequence_parallel else 1)
        out.append(MemKernel("latent_norm", latents * (2 * b if fwd else 3 * b)))
    return tuple(out)


# Eager PyTorch (planner/runtime's decoder, HF transformers without torch.compile): one kernel per tensor op, each
# reading its operands from memory and writing a fresh output. Elements read + written per token of each kernel,
# x = the norm's width, q = the rotated width (Q or K), f = the activation width. Forward from the runtime's code
# (RMSNorm: pow, mean, +eps, rsqrt, x·r, ·w; LayerNorm: mean, x−μ, pow, mean, +eps, rsqrt, ·r, ·w, +b;
# rotate-half RoPE: four products with cos/sin, a sub, an add, the cat), backward from autograd's formula of each op (a
# product of two tensors: two products; a broadcast operand's gradient: a product and a sum over tokens; a tensor
# used twice: one accumulation). Tiny per-token scalars (the norm's statistics) count 2 elements.
_B = "broadcast"  # a product with an operand broadcast along tokens or hidden: a norm's statistic or weight, cos/sin
_EAGER_FWD: dict[str, tuple[tuple[float, float, str], ...]] = {  # label -> ((x-coefficient, constant, kind), ...)
    "rmsnorm": ((2, 0, ""), (1, 1, ""), (0, 2, ""), (0, 2, ""), (2, 1, _B), (2, 0, _B)),
    "layernorm": ((1, 1, ""), (2, 1, _B), (2, 0, ""), (1, 1, ""), (0, 2, ""), (0, 2, ""), (2, 1, _B), (2, 0, _B),
                  (2, 0, _B)),
    "rope": ((1, 0, _B), (1, 0, _B), (1, 0, _B), (1, 0, _B), (1.5, 0, ""), (1.5, 0, ""), (2, 0, "")),
    "swiglu": ((2, 0, ""), (3, 0, "")),  # silu(gate), · up
    "gelu": ((2, 0, ""), (2, 0, "")),  # + bias (linear_bias), gelu
    "relu2": ((2, 0, ""), (2, 0, "")),  # relu, pow 2
    "residual": ((3, 0, ""),),
}
# Backward kinds: each broadcast product's gradient with respect to the full tensor is again a product with the
# broadcast operand (dy·w, dy·r, dy·cos, the mean's expand); the broadcast operand's own gradient sums over tokens.
_EAGER_BWD: dict[str, tuple[tuple[float, float, str], ...]] = {
    "rmsnorm": ((2, 0, _B), (3, 0, ""), (1, 0, ""), (3, 0, _B), (1, 1, ""), (0, 2, ""), (0, 2, ""), (1, 1, _B),
                (3, 0, ""), (2, 0, ""), (3, 0, "")),
    "layernorm": ((2, 0, _B), (3, 0, ""), (1, 0, ""), (1, 0, ""), (3, 0, _B), (1, 1, ""), (0, 2, ""), (0, 2, ""),
                  (1, 1, _B), (3, 0, ""), (2, 0, ""), (3, 0, ""), (1, 1, _B), (1, 1, ""), (3, 0, ""), (3, 0, "")),
    "rope": ((1, 0, ""), (1, 0, _B), (1, 0, _B), (1, 0, _B), (1, 0, _B), (1.5, 0, ""), (1.5, 0, ""), (2, 0, "")),
    "swiglu": ((3, 0, ""), (3, 0, ""), (3, 0, "")),  # d(up) = dy·silu, d(silu) = dy·up, silu_backward
    "gelu": ((3, 0, ""), (1, 0, "")),  # gelu_backward; the bias gradient's sum over tokens
    "relu2": ((3, 0, ""), (3, 0, "")),  # pow_backward, threshold_backward
    "residual": ((3, 0, ""),),  # the branch point's gradient accumulation
}


def _eager(label: str, width: float, dtype_bytes: float, direction: str) -> tuple[MemKernel, ...]:
    table = _EAGER_FWD if direction == "fwd" else _EAGER_BWD
    return tuple(MemKernel(f"{label}_{i}", (a * width + c) * dtype_bytes, kind or "stream")
                 for i, (a, c, kind) in enumerate(table[label]))


# planner/runtime keeps fp32 parameters and autocasts a bf16 step (torch.autocast): the embedding's fp32 output starts
# an fp32 residual stream, the norms run on it in fp32 and their output is cast to bf16 at the next GEMM; what the
# GEMMs and attention return (projections, RoPE, the activation) is bf16. Measured on an H200 (torch profiler, a
# 4-layer Llama-3-8B, 32K tokens): 66 ms of elementwise kernels in the forward where a bf16 stream priced 21 ms.
EAGER_STREAM_BYTES = 4.0


def eager_layer_kernels(model: ModelSpec, tp: int, sequence_parallel: bool, dtype_bytes: int,
                        direction: str) -> tuple[MemKernel, ...]:
    """A layer's kernels as eager PyTorch runs them (see _EAGER_FWD): the two norms, RoPE on Q and K (each over
    its own width), attention's output back to token layout (one copy), the activation and the two residual
    adds; and the fused projections' outputs taken apart (planner/runtime/model.py, Megatron's layout): forward,
    Q and V copied out of the group-major QKV rows (K stays a view: RoPE writes a new one); backward, one cat of
    dQ, dK, dV into the QKV gradient and, for SwiGLU, one cat of d(gate), d(up) (the fused projection's output holds
    the gate, then the up). Norms and residuals act on the fp32 stream (EAGER_STREAM_BYTES); below fp32 each norm's
    output is cast for its GEMM (backward: the gradient cast back) and each residual adds a bf16 branch into the
    stream (backward: the branch's gradient cast down). Bytes per token on one TP rank."""
    b, r = float(dtype_bytes), EAGER_STREAM_BYTES
    hidden = model.hidden / (tp if sequence_parallel else 1)
    ffn = model.mlp_width_per_token / tp  # top-k experts and the shared one
    fwd = direction == "fwd"
    out = [*_eager(model.norm, hidden, r, direction), *_eager(model.norm, hidden, r, direction)]
    if b < r:  # autocast: norm output -> GEMM input (backward: its gradient back to fp32), twice
        out += [MemKernel("autocast_cast", hidden * (r + b)), MemKernel("autocast_cast", hidden * (r + b))]
    qkv = (model.q_width + 2 * model.kv_width) / tp
    out.append(MemKernel("qkv_split", 2 * ((model.q_width + model.kv_width) / tp if fwd else qkv) * b, "strided"))
    if model.position == "rope":
        out += [*_eager("rope", model.q_width / tp, b, direction), *_eager("rope", model.kv_width / tp, b, direction)]
    out.append(MemKernel("attn_out_layout", 2 * model.q_width / tp * b, "strided"))
    if model.mlp == "swiglu" and not fwd:
        out.append(MemKernel("gate_up_grad_cat", 2 * 2 * ffn * b))
    out += _eager(model.mlp, ffn, b, direction)
    # residual: stream + branch -> stream | the branch point's accumulation, and the branch's gradient cast down
    mixed = "mixed" if b < r else "stream"  # an fp32 stream plus a bf16 branch
    residual = (MemKernel("residual", hidden * (2 * r + b), mixed) if fwd else
                MemKernel("residual", hidden * (3 * r + (r + b if b < r else 0)), mixed))
    out += [residual, residual]
    if model.dropout:  # dropout after attention and after the MLP: apply the mask (fwd), mask the gradient (bwd)
        out += [MemKernel("dropout", hidden * (2 * b + 1)), MemKernel("dropout", hidden * (2 * b + 1))]
    return tuple(out)


def eager_head_kernels(model: ModelSpec, tp: int, sequence_parallel: bool, dtype_bytes: int,
                       direction: str) -> tuple[MemKernel, ...]:
    """Last stage as planner/runtime runs it: the eager final norm on the fp32 stream (cast for the LM head
    below fp32) and cross-entropy over fp32 logits, per logit (V/t per token): forward the cast to fp32 (b + 4, below
    fp32) and log-softmax (4 + 4); backward the zero-filled gradient (4), log-softmax's backward (4 + 4 + 4) and the
    cast back (4 + b, below fp32). Measured on an H200 (4-layer Llama-3-8B, 32K tokens): softmax 15.7 ms forward
    (2.1 TB/s), 16.6 backward (3.0 TB/s)."""
    b, r = float(dtype_bytes), EAGER_STREAM_BYTES
    hidden = model.hidden / (tp if sequence_parallel else 1)
    vocab = model.vocab / tp
    fwd = direction == "fwd"
    norm = _eager(model.norm, hidden, r, direction)
    cast = (MemKernel("autocast_cast", hidden * (r + b)),) if b < r else ()
    logits_cast = (MemKernel("logits_cast", vocab * (b + r)),) if b < r else ()
    if fwd:
        ce = (*logits_cast, MemKernel("log_softmax", vocab * 2 * r, "softmax"))
    else:
        ce = (MemKernel("logits_grad_fill", vocab * r), MemKernel("log_softmax", vocab * 3 * r, "softmax"),
              *logits_cast)
    return (*norm, *cast, *ce)


def recompute_kernels(model: ModelSpec, tp: int, sequence_parallel: bool, dtype_bytes: int,
                      recompute: Recompute, eager: bool = False) -> tuple[MemKernel, ...]:
    """The forward kernels a backward replays: all of them under full recompute; under selective, SwiGLU's
    product (costmodel.memory does not keep it); GeLU blocks' selective replays the attention core only. Eager
    (planner/runtime): selective checkpoints the attention core alone, which has no kernels here."""
    if recompute == "full":
        kernels = eager_layer_kernels if eager else layer_kernels
        return kernels(model, tp, sequence_parallel, dtype_bytes, "fwd")
    if recompute == "selective" and model.mlp == "swiglu" and not eager:
        return tuple(k for k in layer_kernels(model, tp, sequence_parallel, dtype_bytes, "fwd") if k.label == "swiglu")
    return ()


def score_kernels(model: ModelSpec, dtype_bytes: int, direction: str) -> tuple[MemKernel, ...]:
    """Unfused attention's kernels per score (one query-key pair of one head): Megatron's fused scale-mask-
    softmax, then the attention dropout where the model has it. ALiBi (Megatron-DeepSpeed's BLOOM) computes the
    scores as baddbmm(bias, Q, Kᵀ, beta, alpha) over the [heads, 1, s] bias: PyTorch copies the broadcast bias into
    the output first and the GEMM reads it back (beta ≠ 0), one write and one read per score in the forward."""
    b = float(dtype_bytes)
    fwd = direction == "fwd"
    out = [MemKernel("softmax", 2 * b if fwd else 3 * b)]  # p = softmax(s) | ds from p, dp
    if model.position == "alibi" and fwd:
        out.append(MemKernel("alibi_bias", 2 * b, "broadcast"))
    if model.dropout:
        out.append(MemKernel("attn_dropout", 2 * b + 1))  # reads and writes with its mask both ways
    return tuple(out)


def head_kernels(model: ModelSpec, tp: int, sequence_parallel: bool, dtype_bytes: int, loss: LossKernel,
                 direction: str) -> tuple[MemKernel, ...]:
    """Last stage: the final norm and the vocab-parallel softmax cross-entropy over V/t logits per token. An
    online-softmax loss reads the logits once and recomputes (b forward, 2b backward). An in-place one (Transformer
    Engine's parallel_cross_entropy, transformer_engine/pytorch/triton/cross_entropy.py) reads each row for its
    online max and sum, then again to write the gradient into it (3b), and backward scales it in place by the loss
    gradient (2b). Megatron's fp32 one (megatron/core/tensor_parallel/cross_entropy.py), per logit: forward the cast
    (b + 4), the max (4), the in-place shift (4 + 4), exp (4 + 4), its sum (4) and the in-place division that leaves
    the softmax kept for the backward (4 + 4); backward the in-place scaling by the loss gradient (4 + 4) and the
    cast back (4 + b)."""
    b = float(dtype_bytes)
    hidden = model.hidden / (tp if sequence_parallel else 1)
    vocab = model.vocab / tp
    fwd = direction == "fwd"
    norm = MemKernel("final_norm", hidden * (2 * b if fwd else 3 * b))
    per_logit = {"online": (b, 2 * b), "in_place": (3 * b, 2 * b), "fp32": (b + 36, 12 + b)}[loss]
    return norm, MemKernel("cross_entropy", vocab * per_logit[0 if fwd else 1])


def embedding_kernels(model: ModelSpec, dtype_bytes: int, direction: str) -> tuple[MemKernel, ...]:
    """First stage: the embedding lookup (gather of h values per token) and, backward, its scatter-add into the
    fp32 gradient of the table; a learned position embedding adds one more of each."""
    b = float(dtype_bytes)
    per = model.hidden * (2 * b if direction == "fwd" else b + 2 * 4)
    n = 2 if model.position == "learned" else 1
    return tuple(MemKernel("embedding", per) for _ in range(n))


def fp8_cast_kernels(gemm_widths: Mapping[str, tuple[float, float]], direction: str,
                     current_scaling: bool = False) -> tuple[MemKernel, ...]:
    """fp8 training's casts of one layer, bytes per token: `gemm_widths` maps each fp8 GEMM to its (input, output)
    elements per token on one rank. Forward: each GEMM's input is cast; backward: each GEMM's output gradient (the
    dgrad and wgrad GEMMs then reuse the forward's cast input and weight). Current scaling adds its amax pass."""
    side = 0 if direction == "fwd" else 1
    per = FP8_CAST_BYTES + (FP8_AMAX_PASS_BYTES if current_scaling else 0)
    return tuple(MemKernel(f"fp8_cast_{label}", w[side] * per) for label, w in gemm_widths.items())


def swiglu_saved_bytes_per_f(recompute: Recompute) -> float:
    """Bytes a SwiGLU MLP saves per token and unit of its width f (bf16). Megatron-core's fused SwiGLU
    (`bias_swiglu_impl`, on by default: `--no-bias-swiglu-fusion` turns it off) saves only its input, gate and
    up (4f), and the down projection its input (2f): 6f. Selective recomputes the down projection's input from
    gate and up: 4f. (An unfused SiLU would also keep SiLU(gate), 2f more: the eager layer counts its own.)"""
    return 6.0 if recompute == "none" else 4.0
