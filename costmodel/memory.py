"""Memory per rank (REFERENCE 2.1, 2.5, 7.2-7.4): model states, activations by recompute policy,
logits, the per-rank token capacity C, and ByteScale's offload-aware degree D(s; r)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from costmodel.specs import DTYPE_BYTES, ModelSpec, Setup, SpecError


def params_per_rank(setup: Setup, stage: int | None = None) -> float:
    """Parameters held by one GPU: the stage's layers ÷ TP, plus the embedding on the first stage
    and the LM head on the last (both on the only stage when pp = 1). stage=None: the largest."""
    m, t, p = setup.model, setup.training.tp, setup.training.pp
    layers = m.layers // p * m.layer_params()
    emb = m.vocab * m.hidden
    head = 0 if m.tied_embeddings else m.vocab * m.hidden
    if p == 1:
        extra = emb + head + m.hidden
    elif stage is None:
        extra = max(emb, head + m.hidden)
    else:
        extra = (emb if stage == 0 else 0) + (head + m.hidden if stage == p - 1 else 0)
    return (layers + extra) / t


def state_bytes_per_param(setup: Setup) -> float:
    """Megatron mixed precision (REFERENCE 7.3): bf16 params + fp32 grads + fp32 master/m/v.
    Replicated: 2 + 4 + 12 = 18 B; distributed optimizer over d HDP ranks: 6 + 12/d."""
    tr = setup.training
    pb, gb = DTYPE_BYTES[tr.dtype], DTYPE_BYTES[tr.grad_dtype]
    opt = 12.0  # fp32 master weights, Adam m and v
    return pb + gb + (opt / setup.hdp if tr.zero_stage >= 1 else opt)


def model_state_bytes(setup: Setup, stage: int | None = None) -> float:
    return params_per_rank(setup, stage) * state_bytes_per_param(setup)


def activation_bytes_per_token_layer(model: ModelSpec, tp: int, recompute: str, dtype_bytes: int = 2) -> float:
    """Saved activations per token per layer, TP+SP divided (REFERENCE 7.2, Llama-style block with
    FlashAttention). none: 12h + 4h_kv + 8f (bf16); selective: the SwiGLU product and down-projection
    input are recomputed (12h + 4h_kv + 4f); full: only the layer input (2h)."""
    h, hkv, f = model.hidden, model.kv_width, model.ffn * model.top_k
    scale = dtype_bytes / 2.0
    if recompute == "none":
        b = 12 * h + 4 * hkv + 8 * f
    elif recompute == "selective":
        b = 12 * h + 4 * hkv + 4 * f
    elif recompute == "full":
        b = 2 * h
    else:
        raise SpecError(f"unknown recompute policy {recompute!r}")
    return b * scale / tp


def full_layer_activation_bytes_per_token(setup: Setup) -> float:
    return activation_bytes_per_token_layer(setup.model, setup.training.tp, "none", setup.training.dtype_bytes)


def logits_bytes(tokens: float, setup: Setup) -> float:
    """Loss-head peak for `tokens` tokens on a rank: fp32 logits and their gradient over V/t, or a
    fused online-softmax cross-entropy that processes 8K-token chunks (REFERENCE 7.4, ByteScale §7)."""
    v = setup.model.vocab / setup.training.tp
    chunk = min(tokens, 8192.0) if setup.training.fused_loss else tokens
    return chunk * v * 8.0


@dataclass(frozen=True)
class MemoryBudget:
    """How one rank's HBM is spent at the capacity point."""

    hbm_bytes: float
    states_bytes: float
    ctx_bytes: float
    frag_bytes: float
    logits_bytes: float
    activation_bytes_per_token: float  # all resident layers (× in-flight micro-batches), one token
    recompute_working_bytes_per_token: float  # full recompute: one layer's activations during backward
    capacity_tokens: int  # C


def memory_budget(setup: Setup) -> MemoryBudget:
    """Per-rank token capacity C (REFERENCE 2.1):
    C = (M_hbm − M_states − M_logits − M_ctx − M_frag) / (k_inflight · l · a_tok).
    With PP under 1F1B, stage 0 keeps p micro-batches of L/p layers, so k·l = L."""
    tr, m = setup.training, setup.model
    hbm = float(setup.cluster.gpu_memory_bytes)
    states = model_state_bytes(setup)
    frag = tr.frag_fraction * hbm
    a_tok = activation_bytes_per_token_layer(m, tr.tp, tr.recompute, tr.dtype_bytes)
    per_token = a_tok * m.layers  # k_inflight·l = L with or without PP (1F1B)
    work = full_layer_activation_bytes_per_token(setup) if tr.recompute == "full" else 0.0
    avail = hbm - states - tr.ctx_overhead_bytes - frag
    head = (setup.model.vocab / tr.tp) * 8.0
    if tr.fused_loss:
        avail -= logits_bytes(8192.0, setup)
        cap = avail / (per_token + work)
    else:
        cap = avail / (per_token + work + head)
    if tr.capacity_tokens is not None:
        cap = float(tr.capacity_tokens)
    if cap < 1:
        raise SpecError(f"{m.name} does not fit on {setup.cluster.gpu} with tp={tr.tp}, pp={tr.pp}: model states "
                        f"take {states / 1e9:.1f} GB of {hbm / 1e9:.0f} GB; raise tp or pp, or use recompute")
    c = int(cap)
    return MemoryBudget(hbm, states, float(tr.ctx_overhead_bytes), frag, logits_bytes(min(c, 8192), setup),
                        per_token, work, c)


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


def dkv_activation_ratio(model: ModelSpec, tp: int, recompute: str, dtype_bytes: int = 2) -> float:
    """fp32 dK and dV bytes per token per layer over the saved activation bytes per token per layer."""
    return (2 * model.kv_width * 4 / tp) / activation_bytes_per_token_layer(model, tp, recompute, dtype_bytes)


def min_degree(s: float, capacity_tokens: int, offload_ratio: float, layers_per_stage: int) -> int:
    """ByteScale D(s; r) = ceil([2 + (1 − r)(l − 2)] · s / (l · C)), with Act(s) ∝ s (REFERENCE 2.5)."""
    return max(1, math.ceil(activation_factor(offload_ratio, layers_per_stage) * s / capacity_tokens - 1e-9))


def offload_lower_bound(s: float, capacity_tokens: int, layers_per_stage: int) -> float:
    """Smallest useful ratio: offloading must free at least one rank's worth, min(1, l·C/((l−2)·s))."""
    l = layers_per_stage
    if l <= 2:
        return 1.0
    return min(1.0, l * capacity_tokens / ((l - 2) * s))


def ratio_for_degree(s: float, degree: int, capacity_tokens: int, layers_per_stage: int) -> float:
    """Smallest r with D(s; r) <= degree (offload no more than needed): solve
    (2 + (1 − r)(l − 2))·s ≤ degree·l·C for r, clipped to [0, 1]."""
    l = layers_per_stage
    if s <= degree * capacity_tokens or l <= 2:
        return 0.0
    r = 1.0 - (degree * l * capacity_tokens / s - 2.0) / (l - 2)
    return min(1.0, max(0.0, r))
