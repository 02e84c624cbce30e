"""Memory per rank (REFERENCE 2.1, 2.5, 7.2-7.4): model states, activations by recompute policy,
logits, the per-rank token capacity C, and ByteScale's offload-aware degree D(s; r)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from costmodel import zero
from costmodel.elementwise import swiglu_saved_bytes_per_f
from costmodel.moe import (ExpertLayout, deepep_buffer_bytes, hybridep_bytes_per_token,
                           moe_activation_bytes_per_token)
from costmodel.recompute import freed_bytes_per_token, working_bytes_per_token
from costmodel.specs import (DTYPE_BYTES, Fp8Recipe, ModelSpec, Recompute, Setup, SpecError, TrainingSpec,
                             mean_over_layers)

GB = 1e9  # messages report decimal GB, as the CLI's tables do


def params_per_rank(setup: Setup, stage: int | None = None, layers: int | None = None) -> float:
    """Parameters held by one GPU: the stage's layers ÷ TP, plus the embedding on the first stage
    and the LM head on the last (both on the only stage when pp = 1), and on the last the multi-token-prediction
    depths (each a layer and mtp_extra_params). stage=None: the largest. `layers`: the stage's layer count where
    stages differ (default the busiest's)."""
    m, t = setup.stage_model, setup.training.tp  # the layers as the busiest stage holds them
    n, extra = stage_parts(setup, stage, layers)
    if setup.training.expert_groups == 1:  # experts split over ep·etp = tp ranks, as the rest
        return (n * m.layer_params() + extra) / t
    return (n * (m.layer_params() - m.routed_expert_params()) + extra) / t + expert_params_per_rank(setup, n)


def stage_parts(setup: Setup, stage: int | None, layers: int | None) -> tuple[int, float]:
    """(decoder layers, other parameters) of a stage: its layers (and the MTP depths' on the last), the embedding
    on the first, the head (and the MTP depths' projections and norms, and with pp > 1 a copy of the embedding,
    Megatron-core's for the next tokens' lookup) on the last; with pp > 1 a tied head is the last stage's own copy
    of the word embedding (Megatron's output_layer weight, kept equal by the embedding all-reduce; DeepSpeed's
    TiedLayerSpec); stage None: whichever of the first and the last holds more parameters per GPU."""
    m, p, mtp = setup.model, setup.training.pp, setup.training.mtp_layers
    n = _stage_layers(setup, layers)
    if stage is None and p > 1:
        stage = max((0, p - 1), key=lambda s: params_per_rank(setup, s, layers))
    first, last = p == 1 or stage == 0, p == 1 or stage == p - 1
    extra = m.input_embedding_params() if first or (last and mtp) else 0
    extra += m.head_params() + mtp * m.mtp_extra_params() if last else 0
    if last and not first and m.tied_embeddings and not mtp:  # MTP's copy above serves the tied head as well
        extra += m.vocab * m.hidden
    return n + (mtp if last else 0), float(extra)


def expert_params_per_rank(setup: Setup, layers: int | None = None) -> float:
    """Expert MLP parameters of one GPU: its stage's `layers` (default the busiest's) E experts over the ep·etp
    ranks of an expert group (0 for a dense model; the mean layer's where some layers are dense)."""
    return _stage_layers(setup, layers) * setup.stage_model.routed_expert_params() / setup.training.expert_ranks


def _stage_layers(setup: Setup, layers: int | None) -> int:
    """A stage's layer count: `layers` where stages differ, else the busiest stage's ⌈L/p⌉."""
    return setup.layers_per_stage if layers is None else layers


def sharded_state_params(setup: Setup, stage: int | None = None, layers: int | None = None) -> float:
    """Parameters of which one GPU keeps a 1/hdp share of the sharded states (ZeRO), times hdp: its dense ones,
    sharded over the stage's hdp ranks, and G times its expert ones, sharded over the hdp/G ranks that hold the
    same experts (G = TrainingSpec.expert_groups; G = 1: params_per_rank)."""
    n, _ = stage_parts(setup, stage, layers)
    extra = (setup.training.expert_groups - 1) * expert_params_per_rank(setup, n)
    return params_per_rank(setup, stage, layers) + extra


def optimizer_state_bytes(training: TrainingSpec) -> float:
    """Adam's state per parameter: fp32 master weights, m and v (12 B); with bf16 moments (Megatron-core's
    precision-aware optimizer, Transformer Engine's FusedAdam) m and v in bf16 and the master as the 16 low bits the
    bf16 parameter lacks (store_param_remainders, on by default): 2 + 2 + 2 B, or a whole fp32 master beside fp8
    weights (fp8_param_gather: no bf16 parameter to complete): 2 + 2 + 4 B. FusedAdam's fp32 copies of the bf16
    moments live only inside the step, after the activations are freed, so they set no peak."""
    if training.optimizer_moments == "fp32":
        return 12.0
    return 2.0 + 2.0 + (4.0 if training.fp8_param_gather else 2.0)


def state_bytes_per_param_parts(training: TrainingSpec) -> tuple[float, float]:
    """(bytes per parameter every HDP rank keeps, bytes per parameter sharded over the HDP ranks): bf16
    params kept; fp32 master/m/v (12 B; 6 B with the precision-aware optimizer's bf16 moments, optimizer_state_bytes)
    sharded from ZeRO-1 on, fp32 grads from ZeRO-2 on, params from ZeRO-3 on (REFERENCE 7.3: 18/d), else kept."""
    params, grads = float(DTYPE_BYTES[training.dtype]), float(DTYPE_BYTES[training.grad_dtype])
    opt = optimizer_state_bytes(training)
    if training.zero_stage == 3:
        return 0.0, params + grads + opt
    if training.zero_stage >= 2:
        return params, grads + opt
    return (params + grads, opt) if training.zero_stage == 1 else (params + grads + opt, 0.0)


def state_bytes_per_param(setup: Setup) -> float:
    """Megatron mixed precision (REFERENCE 7.3): bf16 params + fp32 grads + fp32 master/m/v.
    Replicated: 2 + 4 + 12 = 18 B; distributed optimizer over d HDP ranks: 6 + 12/d (an expert group over G TP
    groups shards its experts' over d/G: model_state_bytes)."""
    kept, sharded = state_bytes_per_param_parts(setup.training)
    return kept + sharded / setup.hdp


def model_state_bytes(setup: Setup, stage: int | None = None, layers: int | None = None) -> float:
    """Model states of one GPU (`layers`: as in params_per_rank); ZeRO-3 adds the layers and root it holds
    gathered (costmodel.zero.inflight_bytes), fp8 training its cached fp8 weights and scaling state."""
    if setup.training.expert_groups == 1:
        states = params_per_rank(setup, stage, layers) * state_bytes_per_param(setup)
    else:
        kept, sharded = state_bytes_per_param_parts(setup.training)
        states = (params_per_rank(setup, stage, layers) * kept
                  + sharded_state_params(setup, stage, layers) * sharded / setup.hdp)
    return states + zero.inflight_bytes(setup) + fp8_state_bytes(setup)


# ---- fp8 training's extra state (Transformer Engine; docs/COSTMODEL.md "fp8") ------------------------------
MXFP8_BLOCK = 32  # elements sharing one 1-byte E8M0 scale
FP8_AMAX_HISTORY_LEN = 1024  # DelayedScaling's default amax_history_len
# scaled fp8 tensors per GEMM: forward input, weight, output; backward output gradient, input gradient
FP8_FWD_TENSORS_PER_GEMM, FP8_BWD_TENSORS_PER_GEMM = 3, 2


def fp8_recipe(setup: Setup) -> Fp8Recipe:
    """The training's fp8 recipe on the cluster's GPU (TrainingSpec.fp8_recipe_on)."""
    return setup.training.fp8_recipe_on(setup.cluster.gpu)


@mean_over_layers
def fp8_gemm_params_parts(model: ModelSpec, tp: int, expert_ranks: int | None = None) -> tuple[float, float]:
    """(over tp, routed experts') weights of one layer's fp8 GEMMs on one rank (the mean layer's where some layers
    are dense): QKV, output projection, a shared expert's and a dense MLP's matrices over tp; the routed experts'
    matrices, E/ep experts split over etp: E/(ep·etp) of them (`expert_ranks` = ep·etp, default tp). Router,
    norms and biases stay bf16."""
    attn = model.attention_gemm_params()
    mlp = model.mlp_matrices * model.hidden * model.ffn
    shared = model.mlp_matrices * model.hidden * model.shared_expert_ffn  # over tp, as the attention's
    if not model.is_moe:
        return (attn + mlp) / tp, 0.0
    return (attn + shared) / tp, model.experts * mlp / (expert_ranks or tp)


def fp8_gemm_params_per_layer(model: ModelSpec, tp: int, expert_ranks: int | None = None) -> float:
    """Weights of one layer's fp8 GEMMs on one rank (fp8_gemm_params_parts, summed)."""
    return sum(fp8_gemm_params_parts(model, tp, expert_ranks))


@mean_over_layers
def fp8_gemms_per_layer(model: ModelSpec, ep: int) -> float:
    """fp8 GEMMs (TE modules' GEMMs, each with its own scales) of one layer on one rank: the attention's
    projections (QKV and O; MLA's five), the MLP's up (gate and up fused) and down of each local expert (dense:
    one), and a shared expert's two; the mean layer's where some layers are dense."""
    mlp = 2 * (model.experts // ep) if model.is_moe else 2
    return model.attention_gemms + mlp + (2 if model.shared_expert_ffn else 0)


def fp8_weight_bytes_per_param(recipe: Fp8Recipe) -> float:
    """Bytes of the cached fp8 copies of one weight: the forward (rowwise) copy and the backward (columnwise) one
    the dgrad GEMM reads: per-tensor recipes (delayed, tensorwise) a physical transpose, 1 B each; MXFP8's
    columnwise copy is quantized apart (32×1 blocks), each copy 1 B plus a 1-byte scale per 32 elements."""
    return 2.0 * (1.0 + 1.0 / MXFP8_BLOCK) if recipe == "mxfp8" else 2.0


def fp8_scaled_tensors(setup: Setup) -> tuple[int, int]:
    """(forward, backward) per-tensor scaled fp8 tensors of a stage's layers on one rank under delayed scaling,
    whose amaxes are reduced each step (costmodel.timing); (0, 0) otherwise (MXFP8 scales are per block, current
    scaling takes each tensor's amax as it casts it and keeps no history)."""
    tr = setup.training
    if tr.dtype != "fp8" or fp8_recipe(setup) != "delayed":
        return 0, 0
    gemms = round(fp8_gemms_per_layer(setup.stage_model, tr.ep) * setup.layers_per_stage)
    return FP8_FWD_TENSORS_PER_GEMM * gemms, FP8_BWD_TENSORS_PER_GEMM * gemms


def fp8_state_bytes(setup: Setup) -> float:
    """fp8 training's extra bytes on one GPU (0 otherwise): the fp8 copies of the GEMM weights it holds, cast once
    per step and cached across micro-batches (TE's is_first_microbatch weight cache, as Megatron-LM runs it):
    the stage's layers, or under ZeRO-3 the INFLIGHT_LAYERS gathered ones (cast after each gather [assumption]);
    and with delayed scaling each scaled tensor's fp32 amax history, scale and inverse scale. With
    fp8_param_gather those fp8 copies are the weights themselves: less the bf16 weights that are then not kept
    (model_state_bytes counts every weight in the training dtype)."""
    tr = setup.training
    if tr.dtype != "fp8":
        return 0.0
    layers = zero.INFLIGHT_LAYERS if tr.zero_stage == 3 else setup.layers_per_stage
    per_param = fp8_weight_bytes_per_param(fp8_recipe(setup)) - (DTYPE_BYTES[tr.dtype] if tr.fp8_param_gather else 0)
    cache = layers * fp8_gemm_params_per_layer(setup.stage_model, tr.tp, tr.expert_ranks) * per_param
    return cache + sum(fp8_scaled_tensors(setup)) * 4.0 * (FP8_AMAX_HISTORY_LEN + 2)


def _fp8_saved_bytes_per_token(model: ModelSpec, recompute: Recompute) -> tuple[float, float]:
    """(the norms' outputs, the rest): bytes per token per layer that fp8 training saves less than bf16.
    Transformer Engine keeps an fp8 GEMM's input for its wgrad as the fp8 cast (1 B, TE's inputmat_t / the norm's
    fp8 ln_out) instead of the bf16 tensor: the QKV and MLP inputs (the norms' outputs, h each), and the down
    projection's input (f); the output projection's fp8 input (q) is kept beside the bf16 attention output the
    attention core saves. MoE: the router needs the MLP input in bf16; its dispatched rows are fp8 casts too
    (costmodel.moe); a shared expert's first GEMM keeps its own fp8 copy of that input (h more: delayed scaling;
    with TE >= 2.6 under current scaling Megatron saves its original input instead, shared with the router's)
    [conservative].
    Full recompute keeps only the layer input; selective does not keep the down projection's input of a gated
    MLP."""
    if recompute == "full":
        return 0.0, 0.0
    norms = model.hidden * (1 if model.is_moe else 2) - (model.hidden if model.shared_expert_ffn else 0)
    down = 0.0 if recompute == "selective" and model.gated else model.mlp_width_per_token
    return norms, down - model.attn_out_width


def _saved_bytes_per_token(model: ModelSpec, recompute: Recompute, dtype_bytes: int) -> tuple[float, float]:
    """(bytes TP replicates, bytes TP shards) saved per token per layer without attention scores
    (FlashAttention keeps none). Replicated: the two norm inputs (4h), the QKV and MLP inputs (4h),
    dropout masks (2h, 1 byte each), MLA's latents (each its norm's input and output, 4·(q_lora + kv_lora): TE's
    LayerNormLinear keeps its rank's own tokens and gathers them again for the weight gradient); sharded: Q and
    the attention output (4q; MLA 2q + 2n·d_v), K and V (4h_kv), and the MLP's: SwiGLU 6f
    (`swiglu_saved_bytes_per_f`; 4f under selective), ungated 4f (the activation's input and output).
    GPT (q = h_kv = h, f = 4h): 34h, Korthikanti 2022 Table 2; Llama (q = h) 12h + 4h_kv + 6f."""
    h, f = model.hidden, model.mlp_width_per_token
    scale = dtype_bytes / 2.0
    if recompute == "full":  # only the layer input
        return 0.0, 2 * h * scale
    masks = 2 * h if model.dropout else 0
    attention = 2 * (model.q_width + 2 * model.kv_width + model.attn_out_width)  # Q, K, V, the core's output
    latents = 4 * (model.q_lora_rank + model.kv_lora_rank)
    mlp = 4 * f if not model.gated else swiglu_saved_bytes_per_f(recompute) * f  # GeLU's input and output
    return (8 * h + latents) * scale + masks, (attention + mlp) * scale


@mean_over_layers
def activation_bytes_per_token_layer(model: ModelSpec, tp: int, recompute: Recompute, dtype_bytes: int = 2,
                                     sequence_parallel: bool = True, experts: ExpertLayout | None = None,
                                     fp8: bool = False) -> float:
    """Saved activations per token per layer (REFERENCE 7.2, FlashAttention: no s² term), divided over TP with
    sequence parallelism; without it TP replicates the norm, input and mask terms (and full recompute's layer
    input). Llama block: none 8h + 4q + 4h_kv + 6f (bf16, Megatron-core's fused SwiGLU); selective recomputes the
    down projection's input (8h + 4q + 4h_kv + 4f); full keeps only the layer input (2h). GPT block: 34h, 2h full.
    MoE adds its dispatched rows and routing imbalance (costmodel.moe; `experts` default: ep = 1, balanced).
    fp8: the GEMM inputs saved in fp8 (_fp8_saved_bytes_per_token). The mean layer's where some layers are
    dense."""
    replicated, sharded = _saved_bytes_per_token(model, recompute, dtype_bytes)
    if fp8:  # the norms' outputs are replicated terms (the GEMMs' inputs), the rest sharded
        norms, rest = _fp8_saved_bytes_per_token(model, recompute)
        replicated, sharded = replicated - norms, sharded - rest
    moe = moe_activation_bytes_per_token(model, experts or ExpertLayout(tp=tp, sequence_parallel=sequence_parallel),
                                         recompute, dtype_bytes, fp8)
    if sequence_parallel:
        return (replicated + sharded) / tp + moe
    if recompute == "full":  # the layer input is whole on every TP rank
        return replicated + sharded
    return replicated + sharded / tp + moe


# The eager replay's loss (planner/runtime: cross-entropy over fp32 logits) at its peak, the start of its backward,
# per logit: log-softmax's saved fp32 output, the fp32 gradient coming in and the one going out. Megatron's
# fp32 loss keeps fp32 logits and their gradient (8 B), and so does an online loss over its chunk.
EAGER_LOGIT_BYTES = 12.0
LOGIT_BYTES = 8.0
LOSS_CHUNK_TOKENS = 8192.0  # an online loss's chunk (ByteScale §7)


def eager_activation_bytes_per_token_layer(model: ModelSpec, tp: int, recompute: Recompute, dtype_bytes: int = 2,
                                           sequence_parallel: bool = True) -> float:
    """Saved activations per token per layer of meshplan's replay (planner/runtime/model.py under autocast over
    fp32 parameters: the stream in EAGER_STREAM_BYTES r), storage by storage: each norm keeps its fp32 input, x·r
    and its output as the next GEMM's input, (2r + b)·h; attention keeps the fused QKV output (K's RoPE reads views
    of it), Q's reshaped copy, rotated Q and K, contiguous V, the core's output and its token-layout copy,
    b·(5q + 4kv), and the fp32 log-sum-exp (4 B a head); SwiGLU keeps gate/up's output, silu and their product,
    4f·b (GeLU 2f·b). Selective recompute (the core checkpointed) drops the core's output and log-sum-exp; full
    keeps the layer input r·h. H200, 4 Llama-3-8B layers: peak memory grows 2.48 MB a token, this and the loss's
    EAGER_LOGIT_BYTES give 2.52 (docs/BENCHMARKS.md "GPU: one H200")."""
    from costmodel.elementwise import EAGER_STREAM_BYTES as r

    b = float(dtype_bytes)
    h = model.hidden / (tp if sequence_parallel else 1)
    if recompute == "full":
        return r * h
    q, kv, heads = model.q_width / tp, model.kv_width / tp, model.heads / tp
    f = model.mlp_width_per_token / tp
    core = 0.0 if recompute == "selective" else q * b + 4 * heads
    mlp = (4 if model.gated else 2) * f * b
    return 2 * (2 * r + b) * h + b * (4 * q + 4 * kv) + core + mlp


def layer_activation_per_token(setup: Setup, recompute: Recompute | None = None) -> float:
    """Saved activations per token per layer on one rank for a setup: the replay's eager layer with eager
    kernels (dense models: the replay runs no MoE), else Megatron's (activation_bytes_per_token_layer), under
    selective with recompute_modules recompute none's less what the modules free (costmodel.recompute)."""
    tr, m = setup.training, setup.stage_model
    recompute = tr.recompute if recompute is None else recompute
    if tr.kernels == "eager" and not m.is_moe:
        return eager_activation_bytes_per_token_layer(m, tr.tp, recompute, tr.dtype_bytes, tr.sequence_parallel)
    args = (tr.dtype_bytes, tr.sequence_parallel, ExpertLayout.of(tr))
    fp8 = tr.dtype == "fp8"
    if recompute == "selective" and tr.recompute_modules:  # Megatron-core's modules: what they free of none's
        return (activation_bytes_per_token_layer(m, tr.tp, "none", *args, fp8=fp8)
                - freed_bytes_per_token(m, tr.tp, tr.recompute_modules, *args, fp8=fp8))
    return activation_bytes_per_token_layer(m, tr.tp, recompute, *args, fp8=fp8)


def logit_bytes(setup: Setup) -> float:
    """Bytes the loss holds per logit at its peak: EAGER_LOGIT_BYTES with eager kernels; the logits' own dtype for
    an in-place loss (Transformer Engine's parallel_cross_entropy saves its bf16 input and writes the gradient into
    it, its fp32 row statistics aside); else 8 (fp32 logits and their gradient)."""
    tr = setup.training
    if tr.kernels == "eager":
        return EAGER_LOGIT_BYTES
    return float(DTYPE_BYTES[tr.dtype]) if tr.loss == "in_place" else LOGIT_BYTES


def layer_activation_bytes(model: ModelSpec, seq_tokens: int, micro_batch: int, tp: int, recompute: Recompute,
                           sequence_parallel: bool = True, flash_attention: bool = True,
                           dtype_bytes: int = 2) -> float:
    """Saved activations of one layer for a micro-batch of `micro_batch` sequences of `seq_tokens` (Korthikanti
    et al. 2022, Table 2). Without sequence parallelism TP replicates the norm, input and mask terms; materialised
    attention (no FlashAttention, recompute none) also keeps per head the softmax output (2 B per score), and with
    dropout its mask and output (1 + 2 B): GPT with TP + SP: s·b·h/t · (34 + 5·a·s/h)."""
    per_token = activation_bytes_per_token_layer(model, tp, recompute, dtype_bytes, sequence_parallel)
    scores = 0.0
    if recompute == "none" and not flash_attention:
        per_score = (2 * dtype_bytes / 2.0) * (2 if model.dropout else 1) + (1 if model.dropout else 0)
        scores = per_score * model.heads * seq_tokens / tp  # a·s scores per token, heads split over TP
    return (per_token + scores) * seq_tokens * micro_batch


def full_layer_activation_bytes_per_token(setup: Setup) -> float:
    """One whole layer's activations per token (no recompute), full recompute's working set in the backward: the
    largest layer kind's where the layers differ (a peak, not the mean)."""
    tr, kinds = setup.training, setup.model.layer_kinds()
    if len(kinds) == 1:
        return layer_activation_per_token(setup, "none")
    return max(activation_bytes_per_token_layer(kind, tr.tp, "none", tr.dtype_bytes, tr.sequence_parallel,
                                                ExpertLayout.of(tr), fp8=tr.dtype == "fp8") for _, kind in kinds)


def recompute_working_bytes_per_token(setup: Setup) -> float:
    """What a backward rebuilds of one layer at a time, per token on one rank: full recompute's whole layer;
    Megatron-core's recompute modules what they freed (costmodel.recompute); else nothing."""
    tr = setup.training
    if tr.recompute == "full":
        return full_layer_activation_bytes_per_token(setup)
    if tr.recompute == "selective" and tr.recompute_modules:
        return working_bytes_per_token(setup.stage_model, tr.tp, tr.recompute_modules, tr.dtype_bytes,
                                       tr.sequence_parallel, ExpertLayout.of(tr), fp8=tr.dtype == "fp8")
    return 0.0


def logits_bytes(tokens: float, setup: Setup) -> float:
    """Loss-head peak for `tokens` tokens on a rank, `logit_bytes` per logit over V/t: every token's logits (fp32
    and in-place losses), or one 8K-token chunk's (an online-softmax cross-entropy, REFERENCE 7.4, ByteScale §7);
    each multi-token-prediction depth's head as much again [assumption: every head's logits held at once]."""
    v = setup.model.vocab / setup.training.tp
    chunk = min(tokens, LOSS_CHUNK_TOKENS) if setup.training.loss_chunked else tokens
    return chunk * v * logit_bytes(setup) * (1 + setup.training.mtp_layers)


@dataclass(frozen=True)
class MemoryBudget:
    """How one rank's HBM is spent at the capacity point."""

    hbm_bytes: float
    states_bytes: float
    ctx_bytes: float
    frag_bytes: float
    logits_bytes: float
    activation_bytes_per_token: float  # all resident layers (× in-flight micro-batches), one token
    recompute_working_bytes_per_token: float  # what a backward rebuilds of one layer (recompute_working_bytes_...)
    capacity_tokens: int  # C


@dataclass(frozen=True)
class _Terms:
    """The terms of C's formula for one setup, before the capacity_tokens override."""

    states_bytes: float
    frag_bytes: float
    free_bytes: float  # HBM − states − ctx − frag − online-loss chunk: what activations may use
    activation_bytes_per_token: float  # all resident layers, one token
    working_bytes_per_token: float  # full recompute: one layer's activations during backward
    head_bytes_per_token: float  # a loss holding every logit: logit_bytes over V/t (0 for an online one)
    buffer_bytes_per_token: float = 0.0  # HybridEP's buffers, sized by the largest batch (dispatch_buffer_...)

    @property
    def per_token_bytes(self) -> float:
        return (self.activation_bytes_per_token + self.working_bytes_per_token + self.head_bytes_per_token
                + self.buffer_bytes_per_token)

    @property
    def capacity_tokens(self) -> float:
        return self.free_bytes / self.per_token_bytes


def layers_held(setup: Setup) -> int:
    """Layers' activations a GPU holds at once at most, per in-flight token: stage 0 keeps p micro-batches of its
    layers in flight (1F1B), the last stage one of its layers and the MTP depths'. Under the EP overlap one
    micro-batch more: a forward runs beside another's backward (pp = 1: two micro-batches alive)."""
    tr = setup.training
    extra = 1 if tr.ep_comm_overlap else 0
    return max(setup.layers_per_stage * (tr.pp + extra), setup.layers_per_stage * (1 + extra) + tr.mtp_layers)


def context_bytes(setup: Setup) -> float:
    """GPU memory outside PyTorch's caching allocator: the CUDA context and NCCL's buffers (ctx_overhead_bytes), and
    under the flex dispatcher DeepEP's buffers (costmodel.moe.deepep_buffer_bytes)."""
    tr = setup.training
    # the flex dispatcher's group is Megatron-core's tp_ep_group: the ep·etp ranks of an expert group
    deepep = deepep_buffer_bytes(setup.model.hidden, tr.expert_ranks) if tr.moe_dispatcher == "flex" else 0.0
    return float(tr.ctx_overhead_bytes) + deepep


def dispatch_buffer_bytes_per_token(setup: Setup) -> float:
    """HybridEP's buffers per token of a rank's micro-batch (costmodel.moe.hybridep_bytes_per_token; each TP rank
    dispatches its s/tp tokens under sequence parallelism): outside PyTorch's allocator like the context, but grown
    to the largest batch, so they count per token of C. 0 under the other dispatchers (DeepEP's are fixed:
    context_bytes)."""
    m, tr = setup.model, setup.training
    if tr.moe_dispatcher != "hybridep" or not m.is_moe:
        return 0.0
    per_rank = hybridep_bytes_per_token(m.hidden, tr.expert_ranks, m.experts / tr.ep, setup.cluster.domain_gpus)
    return per_rank / (tr.tp if tr.sequence_parallel else 1)


def _terms(setup: Setup) -> _Terms:
    tr = setup.training
    hbm = float(setup.cluster.gpu_memory_bytes)
    states = model_state_bytes(setup)
    frag = tr.frag_fraction * hbm
    free = hbm - states - context_bytes(setup) - frag - (logits_bytes(LOSS_CHUNK_TOKENS, setup)
                                                          if tr.loss_chunked else 0.0)
    act = layer_activation_per_token(setup) * layers_held(setup)
    work = recompute_working_bytes_per_token(setup)
    head = 0.0 if tr.loss_chunked else logits_bytes(1.0, setup)  # per token: every logit held at once
    return _Terms(states, frag, free, act, work, head, dispatch_buffer_bytes_per_token(setup))


def memory_budget(setup: Setup) -> MemoryBudget:
    """Per-rank token capacity C (REFERENCE 2.1):
    C = (M_hbm − M_states − M_logits − M_ctx − M_frag) / (k_inflight · l · a_tok).
    With PP under 1F1B, stage 0 keeps p micro-batches of its l = ⌈L/p⌉ layers (the busiest stage's), so k·l = p·l,
    L where p divides it."""
    tr = setup.training
    t = _terms(setup)
    cap = float(tr.capacity_tokens) if tr.capacity_tokens is not None else t.capacity_tokens
    if cap < 1:
        raise SpecError(does_not_fit_message(setup, t))
    c = int(cap)
    return MemoryBudget(float(setup.cluster.gpu_memory_bytes), t.states_bytes,
                        context_bytes(setup) + t.buffer_bytes_per_token * c,
                        t.frag_bytes, logits_bytes(c, setup), t.activation_bytes_per_token,
                        t.working_bytes_per_token, c)


# ---- why a setup does not fit, and what would -----------------------------------------------------
def _fits(setup: Setup) -> bool:
    return _terms(setup).capacity_tokens >= 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pipeline_depths(layers: int) -> list[int]:
    """Pipeline depths a layout search tries: the divisors of the layers (equal stages) and the powers of two up
    to them (uneven stages, priced at the busiest: Setup.layers_per_stage)."""
    twos = {1 << k for k in range(layers.bit_length()) if 1 << k <= layers}
    return sorted(set(_divisors(layers)) | twos)


def _layouts(setup: Setup, gpus: int) -> list[Setup]:
    """Every valid tp × pp of the model on `gpus` GPUs of this cluster, by tp·pp then pp (TP up to the NVLink
    domain: a GB200 NVL72 rack allows tp = 8 on its 4-GPU trays)."""
    out = []
    cluster = setup.cluster.with_gpus(gpus)
    for tp in _divisors(setup.cluster.domain_gpus):
        for pp in _pipeline_depths(setup.model.layers):
            try:
                out.append(Setup(setup.model, cluster, dataclasses.replace(setup.training, tp=tp, pp=pp)))
            except SpecError:
                continue
    return sorted(out, key=lambda s: (s.training.tp * s.training.pp, s.training.pp))


def _fewest_gpus(setup: Setup) -> Setup | None:
    """The fewest GPUs (then the smallest tp·pp) whose model states leave room for a token. More
    GPUs shrink only the ZeRO-1 optimizer shard, so per layout the HDP degree needed is solved for."""
    kept, sharded = state_bytes_per_param_parts(setup.training)
    per_node = setup.cluster.gpus_per_node
    best: Setup | None = None
    for tp in _divisors(setup.cluster.domain_gpus):
        for pp in _pipeline_depths(setup.model.layers):
            step = math.lcm(per_node, tp * pp)  # cluster sizes this layout can use
            try:
                probe = Setup(setup.model, setup.cluster.with_gpus(step),
                              dataclasses.replace(setup.training, tp=tp, pp=pp))
            except SpecError:
                continue
            t, params = _terms(probe), params_per_rank(probe)
            slack = (t.free_bytes + t.states_bytes - t.per_token_bytes - kept * params
                     - fp8_state_bytes(probe))  # for the optimizer shard
            if slack <= 0:
                continue  # weights and gradients alone do not fit this layout
            hdp = max(1, math.ceil(sharded * params / slack))
            gpus = math.ceil(tp * pp * hdp / step) * step
            if best is not None and gpus > best.cluster.world_size:
                continue
            cand = next((c for c in (Setup(setup.model, setup.cluster.with_gpus(gpus + k * step), probe.training)
                                     for k in range(4)) if _fits(c)), None)  # rounding: a size or two up
            if cand is None:
                continue
            key = (cand.cluster.world_size, tp * pp, pp)
            if best is None or key < (best.cluster.world_size, best.training.tp * best.training.pp, best.training.pp):
                best = cand
    return best


def _layout_text(s: Setup) -> str:
    return f"tp={s.training.tp}, pp={s.training.pp}"


def _fit_text(s: Setup) -> str:
    """'tp=8, pp=2 (54.9 GB of states per GPU, C = 9,000 tokens)': C says whether the fit is of use."""
    return (f"{_layout_text(s)} ({model_state_bytes(s) / GB:.1f} GB of states per GPU, "
            f"C = {int(_terms(s).capacity_tokens):,} tokens)")


def does_not_fit_message(setup: Setup, terms: _Terms) -> str:
    """One line: what fills the HBM and what would help. Model states (weights, gradients, optimizer)
    shrink only with tp, pp, more HDP ranks for the ZeRO-1 optimizer shard, or a higher ZeRO stage;
    recompute and offload shrink activations only."""
    tr, m, c = setup.training, setup.model, setup.cluster
    head = (f"{m.name} does not fit on {c.gpu} ({c.world_size} GPUs, {_layout_text(setup)}, "
            f"recompute={tr.recompute})")
    hbm = float(c.gpu_memory_bytes)
    room = terms.free_bytes + terms.states_bytes  # left for states and activations
    if terms.free_bytes > 0:  # the states fit: one token's activations do not
        return (f"{head}: model states take {terms.states_bytes / GB:.1f} GB per GPU, leaving "
                f"{terms.free_bytes / 1e6:.1f} MB, less than one token's activations "
                f"({terms.per_token_bytes / 1e6:.1f} MB over {layers_held(setup)} layers); "
                + ("raise tp or pp" if tr.recompute == "full" else "use --recompute full, or raise tp or pp"))
    params = params_per_rank(setup)
    weights = params * DTYPE_BYTES[tr.dtype] / (setup.hdp if tr.zero_stage == 3 else 1)
    # ZeRO-2 shards gradients as the optimizer states: experts over the hdp/G ranks holding them
    grads = (sharded_state_params(setup) / setup.hdp if tr.zero_stage >= 2 else params) * DTYPE_BYTES[tr.grad_dtype]
    fp8 = fp8_state_bytes(setup)
    opt = terms.states_bytes - weights - grads - zero.inflight_bytes(setup) - fp8
    sharding = f"sharded by ZeRO-{tr.zero_stage} over {setup.hdp} HDP ranks" if tr.zero_stage >= 1 else "replicated"
    fp8_text = ((f", GEMM weights in fp8 with their transposes {fp8 / GB:+.1f} GB against bf16" if tr.fp8_param_gather
                 else f", fp8 weight copies {fp8 / GB:.1f} GB") if fp8 else "")
    msg = (f"{head}: model states alone take {terms.states_bytes / GB:.1f} GB per GPU (weights {weights / GB:.1f} GB, "
           f"gradients {grads / GB:.1f} GB, optimizer {opt / GB:.1f} GB {sharding}{fp8_text}) but only "
           f"{room / GB:.1f} GB of "
           f"the {hbm / GB:.0f} GB HBM is left after the CUDA context, loss chunk and fragmentation reserve; "
           "recompute and offload cannot shrink model states")
    if tr.zero_stage == 0 and setup.hdp > 1:
        z1 = Setup(m, c, dataclasses.replace(tr, zero_stage=1))
        msg += f"; zero_stage=1 would shard the optimizer: {model_state_bytes(z1) / GB:.1f} GB per GPU"
        if _fits(z1):
            return msg
    if tr.zero_stage in (1, 2) and tr.pp == 1 and setup.hdp > 1 and tr.expert_groups == 1:  # ZeRO-3: G = 1 only
        try:  # FSDP2 runs its own Adam and gathers: the precision-aware optimizer and fp8 gathers are Megatron's
            z3 = Setup(m, c, dataclasses.replace(tr, zero_stage=3, optimizer_moments="fp32", fp8_param_gather=False))
        except SpecError:  # what else the run sets that ZeRO-3 is not modelled with (MTP, ...): no hint
            z3 = None
        if z3 is not None and _fits(z3):
            msg += (f"; zero_stage=3 (--zero 3, FSDP) would shard the weights and gradients too: "
                    f"{model_state_bytes(z3) / GB:.1f} GB per GPU")
    layouts = _layouts(setup, c.world_size)
    fit = next((s for s in layouts if _fits(s)), None)
    if fit is not None:
        return msg + f"; the smallest tp×pp that fits {c.world_size} GPUs is {_fit_text(fit)}"
    least = min(layouts, key=model_state_bytes)
    msg += (f"; no tp×pp fits {c.world_size} GPUs (the least, {_layout_text(least)}, still takes "
            f"{model_state_bytes(least) / GB:.1f} GB per GPU)")
    more = _fewest_gpus(setup)
    if more is None:
        return msg + f"; no GPU count fits on {c.gpu}: use GPUs with more memory"
    why = (f"; tp·pp must divide the GPU count (pp up to the {m.layers} layers: their divisors or a power of two)"
           if more.cluster.world_size < c.world_size else "")
    return msg + f"; the fewest GPUs that fit are {more.cluster.world_size} with {_fit_text(more)}{why}"


# ---- tokens a rank holds under selective offload (ByteScale Eq. 3, REFERENCE 2.5) and pipeline slices ----
def offload_allowed(recompute: str) -> bool:
    """Full recompute keeps only layer inputs; its working set (one whole layer) cannot be offloaded,
    so Eq. 3 does not apply: offload and full recompute are alternatives (ByteScale Fig. 21)."""
    return recompute != "full"


def activation_factor(offload_ratio: float, layers_per_stage: int) -> float:
    """Resident share of a rank's activations under offload ratio r (Eq. 3): two layers stay on the
    GPU, the other l − 2 keep (1 − r) of theirs: (2 + (1 − r)(l − 2)) / l."""
    l = layers_per_stage
    if l <= 2:
        return 1.0
    return (2 + (1 - offload_ratio) * (l - 2)) / l


def sliced_capacity_tokens(capacity_tokens: float, pp: int, slices: int, dkv_ratio: float = 0.0) -> float:
    """Tokens per rank a unit of n pipeline slices may hold: stage 0 keeps n + p − 1 of its slices in
    flight where 1F1B keeps p whole micro-batches of C tokens, and a sliced unit also holds fp32 dK/dV
    accumulators of the whole sequence (dkv_ratio = their bytes per token ÷ activation bytes per
    token), so C·p / ((n + p − 1)/n + dkv_ratio) (C when n = 1)."""
    if slices <= 1:
        return float(capacity_tokens)
    return capacity_tokens * pp / ((slices + pp - 1) / slices + dkv_ratio)


def allgather_cp_working_bytes(model: ModelSpec, tp: int, dtype_bytes: int, seq_tokens, ulysses=1):
    """Transient bytes of one layer of all-gather context parallelism on a rank (REFERENCE 7.5): the whole
    sequence's K and V on the rank's heads (KV width / (t·u) with a head split of u), and in the backward their
    fp32 gradients before the reduce-scatter: seq_tokens · 2·h_kv/(t·u) · (b + 4). Ring CP holds one chunk's
    K/V and Ulysses one layer's all-to-all buffers instead (left to the reserve). Arrays broadcast."""
    return seq_tokens * 2 * model.kv_width / (tp * ulysses) * (dtype_bytes + 4)


def dkv_activation_ratio(model: ModelSpec, tp: int, recompute: Recompute, dtype_bytes: int = 2,
                         sequence_parallel: bool = True, experts: ExpertLayout | None = None,
                         fp8: bool = False) -> float:
    """fp32 dK and dV bytes per token per layer over the saved activation bytes per token per layer."""
    return (2 * model.kv_width * 4 / tp) / activation_bytes_per_token_layer(model, tp, recompute, dtype_bytes,
                                                                            sequence_parallel, experts, fp8)


def min_degree(s: float, capacity_tokens: int, offload_ratio: float, layers_per_stage: int) -> int:
    """ByteScale D(s; r) = ceil([2 + (1 − r)(l − 2)] · s / (l · C)), with Act(s) ∝ s (REFERENCE 2.5)."""
    return max(1, math.ceil(activation_factor(offload_ratio, layers_per_stage) * s / capacity_tokens - 1e-9))


def offload_lower_bound(s: float, capacity_tokens: int, layers_per_stage: int) -> float:
    """Smallest useful ratio: offloading must free at least one rank's worth, min(1, l·C/((l−2)·s))."""
    l = layers_per_stage
    if l <= 2:
        return 1.0
    return min(1.0, l * capacity_tokens / ((l - 2) * s))


def offload_ratio_for_tokens(tokens_per_rank: float, capacity_tokens: float, layers_per_stage: int) -> float | None:
    """Smallest offload ratio r with activation_factor(r, l) · tokens ≤ C (Eq. 3's budget on a rank's
    tokens; C may be a sliced unit's capacity, see sliced_capacity_tokens): solve
    (2 + (1 − r)(l − 2))/l · tokens ≤ C for r. None when even r = 1 is not enough."""
    C, l = capacity_tokens, layers_per_stage
    if tokens_per_rank <= C:
        return 0.0
    if l <= 2:
        return None
    r = 1.0 - (l * C / tokens_per_rank - 2.0) / (l - 2)
    return None if r > 1.0 + 1e-12 else max(0.0, min(1.0, r))


def offload_ratio_max(fwd_s: float, act_bytes: float, d2h_s: float, h2d_s: float) -> float:
    """r_max = min(1, T_fwd · B_min / Act) per layer: the share of a layer's activations (act_bytes)
    whose host copies (d2h_s, h2d_s for all of them) hide under its forward compute (fwd_s)."""
    b_min = min(act_bytes / d2h_s, act_bytes / h2d_s)
    return min(1.0, fwd_s * b_min / act_bytes)
