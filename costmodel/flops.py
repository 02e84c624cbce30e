"""FLOP counts (REFERENCE 7.1). Pure functions of ModelSpec and token counts; numpy-vectorised.

Convention: a multiply-add is 2 FLOPs. Attention is counted per document (Σ s_j², never the
packed row's (Σ s_j)²). Causal attention counts the (q, k) pairs actually computed, s(s+1)/2,
i.e. it is "halved"; `causal_halved=False` gives the PaLM / Megatron unhalved convention."""

from __future__ import annotations

import numpy as np

from costmodel.specs import ModelSpec, Setup, mean_over_layers

ArrayLike = np.ndarray | float | int


@mean_over_layers
def linear_flops_per_token(model: ModelSpec) -> float:
    """Forward GEMM FLOPs of one layer per token: QKV (MLA: its down and up projections), output projection, MLP
    (top_k experts: SwiGLU 6hf, GeLU 4hf), router; the mean over the layers where some are dense. Bias adds, norms
    and activations are not GEMMs and not counted (Megatron's convention)."""
    h = model.hidden
    attention = 2 * model.attention_gemm_params()  # QKV and O (MLA: its down and up projections)
    mlp = 2 * model.mlp_matrices * h * model.mlp_width_per_token  # top-k experts and the shared one
    router = 2 * h * model.experts if model.is_moe else 0
    return float(attention + mlp + router)


def causal_pairs(s: ArrayLike) -> np.ndarray:
    """(query, key) pairs under a causal mask, diagonal included: s(s+1)/2."""
    s = np.asarray(s, dtype=float)
    return s * (s + 1) / 2


def window_pairs(s: ArrayLike, window: int) -> np.ndarray:
    """(query, key) pairs under a causal mask with a sliding window of `window` keys (itself included):
    Σ min(i + 1, w) = s(s+1)/2 up to w, then w(w+1)/2 + (s − w)·w."""
    s = np.asarray(s, dtype=float)
    w = float(window)
    return np.where(s <= w, causal_pairs(s), w * (w + 1) / 2 + (s - w) * w)


def chunk_pairs(s: ArrayLike, chunk: int) -> np.ndarray:
    """(query, key) pairs under chunked causal attention (Llama 4): ⌊s/c⌋ whole chunks' causal squares and the
    remainder's, c(c+1)/2 each and r(r+1)/2."""
    s = np.asarray(s, dtype=float)
    c = float(chunk)
    return np.floor(s / c) * causal_pairs(c) + causal_pairs(np.mod(s, c))


def local_pairs(s: ArrayLike, model: ModelSpec) -> np.ndarray:
    """(query, key) pairs of one of the model's local layers: its sliding window's band or its chunks' squares."""
    if model.sliding_window:
        return window_pairs(s, model.sliding_window)
    return chunk_pairs(s, model.attention_chunk)


def attention_flops_fwd(lengths: ArrayLike, model: ModelSpec, causal: bool = True,
                        causal_halved: bool = True) -> np.ndarray:
    """Forward attention-core FLOPs of one layer (the mean over the layers, local and not), per document:
    2·pairs·n_q·(d_h + d_v) (QKᵀ and PV: 4·pairs·n_q·d_h but under MLA). Unhalved, a layer counts the full
    square s², a local one 2·pairs − s, what the square would be under its window (the sum of its chunks'
    squares)."""
    s = np.asarray(lengths, dtype=float)
    halved = causal and causal_halved
    pairs = causal_pairs(s) if halved else s * s
    if model.local_attention:
        win = local_pairs(s, model)
        win = win if halved else 2 * win - s
        pairs = (1 - model.windowed_fraction) * pairs + model.windowed_fraction * win
    return 2.0 * pairs * (model.q_width + model.attn_out_width)


def zigzag_shard_pairs(s: int, degree: int) -> np.ndarray:
    """Causal (q, k) pairs held by each of the `degree` ranks of a document sharded zigzag into
    2·degree chunks (rank i keeps chunks i and 2·degree−1−i) after padding to a multiple of
    2·degree. The shares are equal and sum to the padded document's pairs (REFERENCE 2.3)."""
    n2 = 2 * degree
    c = -(-int(s) // n2)  # chunk length after padding
    i = np.arange(degree, dtype=float)
    # chunk k holds rows k·c .. (k+1)·c−1, each row r attends r+1 keys: c·k·c + c(c+1)/2 pairs
    chunk = lambda k: c * k * c + c * (c + 1) / 2  # noqa: E731
    return chunk(i) + chunk(n2 - 1 - i)


def layer_flops_fwd(lengths: ArrayLike, model: ModelSpec, causal_halved: bool = True) -> np.ndarray:
    """Forward FLOPs of one layer for each document."""
    s = np.asarray(lengths, dtype=float)
    return linear_flops_per_token(model) * s + attention_flops_fwd(s, model, causal_halved=causal_halved)


def lm_head_flops_fwd(tokens: ArrayLike, model: ModelSpec) -> np.ndarray:
    return 2.0 * np.asarray(tokens, dtype=float) * model.hidden * model.vocab


def model_flops(lengths: ArrayLike, model: ModelSpec, causal_halved: bool = True) -> float:
    """Training FLOPs (forward + backward = 3× forward, recompute excluded) of a set of documents:
    the numerator of MFU. For a GPT block with causal_halved=False this is Megatron's (Narayanan et al.
    2021) 72·B·s·L·h²·(1 + s/(6h) + V/(12·h·L)) for B documents of s tokens."""
    s = np.asarray(lengths, dtype=float)
    fwd = model.layers * layer_flops_fwd(s, model, causal_halved).sum() + lm_head_flops_fwd(s.sum(), model)
    return float(3.0 * fwd)


def mtp_flops(lengths: ArrayLike, layer: ModelSpec, depths: int, causal_halved: bool = True) -> float:
    """Training FLOPs (3× forward) of `depths` multi-token-prediction depths over a set of documents, which
    Megatron-LM counts in its MFU numerator: per depth one more decoder layer (`layer`: the model as the last stage
    holds its layers, Setup.stage_model), the 2h → h projection and the LM head again."""
    if not depths:
        return 0.0
    s = np.asarray(lengths, dtype=float)
    per_depth = (layer_flops_fwd(s, layer, causal_halved).sum() + 2.0 * 2 * layer.hidden * layer.hidden * s.sum()
                 + lm_head_flops_fwd(s.sum(), layer))
    return float(3.0 * depths * per_depth)


def training_flops(lengths: ArrayLike, setup: Setup, causal_halved: bool = True) -> float:
    """The MFU numerator of a set of documents under a setup: the model's training FLOPs and its MTP depths'."""
    return model_flops(lengths, setup.model, causal_halved) + mtp_flops(lengths, setup.stage_model,
                                                                       setup.training.mtp_layers, causal_halved)
