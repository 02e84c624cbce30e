"""Attention table: forward and backward time of the attention core (causal, GQA; varlen also without the
mask, column `causal`) per document length, in three layouts (extra column `layout`, with `impl` naming the
kernel path):

- "varlen": `docs` documents of length s in one packed call, as the executor runs a packed bin.
  GPU: flash_attn_varlen_func when flash-attn is installed, else SDPA with the documents on the
  batch axis (equal lengths make that the same work; SDPA picks flash/cuDNN/efficient). CPU: one
  SDPA call per document (planner/runtime does the same; no fused varlen kernel exists on CPU), so
  per-call overhead of short documents shows up as the short-document derate.
  These are the rows Profile.attention_time_s interpolates.
- "single": one lone short document per call (GPU only: the 128-row tile floor, REFERENCE 8.2).
- "docmask": the same pack as one SDPA call over all tokens with a block-diagonal causal mask; it
  does T² work whatever the document lengths, so its rate (useful FLOPs / time) shows what a
  mask-based packed kernel costs. Kept for comparison, never looked up.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F

from profiles.measure import AttentionPoint, MeasureConfig, in_passes, median, time_op, torch_dtype
from profiles.table import TABLE_COLUMNS

COLUMNS = TABLE_COLUMNS["attention"] + ["layout", "impl"]

try:  # flash-attn's varlen kernel is what GPU training runs for packed documents
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except ImportError:  # not installed (always so on CPU)
    flash_attn_varlen_func = None


def _leaf(shape: tuple[int, ...], dt: torch.dtype, device: str, grad: bool) -> torch.Tensor:
    return torch.randn(shape, dtype=dt, device=device).requires_grad_(grad)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
          causal: bool = True) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def doc_mask(doc_len: int, docs: int, device: str) -> torch.Tensor:
    """Block-diagonal causal mask (True = attend) of `docs` documents of doc_len tokens."""
    t = doc_len * docs
    pos = torch.arange(t, device=device)
    same_doc = (pos[:, None] // doc_len) == (pos[None, :] // doc_len)
    return same_doc & (pos[None, :] <= pos[:, None])


def build_call(p: AttentionPoint, device: str) -> tuple[str, list[torch.Tensor], Callable[[], list[torch.Tensor]]]:
    """(impl name, leaf tensors, forward) for one point; forward returns the outputs."""
    dt = torch_dtype(p.dtype)
    grad = p.direction == "bwd"
    hq, hkv, d, s, n = p.heads, p.kv_heads, p.head_dim, p.doc_len, p.docs
    if p.layout == "docmask":
        q, k, v = (_leaf((1, h, n * s, d), dt, device, grad) for h in (hq, hkv, hkv))
        mask = doc_mask(s, n, device)
        return "sdpa_docmask", [q, k, v], lambda: [_sdpa(q, k, v, mask)]
    if p.layout == "varlen" and device == "cuda" and flash_attn_varlen_func is not None:
        q, k, v = (_leaf((n * s, h, d), dt, device, grad) for h in (hq, hkv, hkv))
        cu = torch.arange(0, (n + 1) * s, s, dtype=torch.int32, device=device)
        return "flash_attn_varlen", [q, k, v], lambda: [flash_attn_varlen_func(q, k, v, cu, cu, s, s,
                                                                                causal=p.causal)]
    if p.layout == "varlen" and device == "cpu" and n > 1:
        per_doc = [[_leaf((1, h, s, d), dt, device, grad) for h in (hq, hkv, hkv)] for _ in range(n)]
        leaves = [t for doc in per_doc for t in doc]
        return "sdpa_loop", leaves, lambda: [_sdpa(q, k, v, causal=p.causal) for q, k, v in per_doc]
    # One SDPA call: a lone document ("single"), or equal documents on the batch axis.
    q, k, v = (_leaf((n, h, s, d), dt, device, grad) for h in (hq, hkv, hkv))
    return ("sdpa" if n == 1 else "sdpa_batched"), [q, k, v], lambda: [_sdpa(q, k, v, causal=p.causal)]


def time_attention(p: AttentionPoint, cfg: MeasureConfig) -> tuple[float, str]:
    """Median seconds of the forward, or of the backward alone (its forward runs untimed in setup)."""
    impl, leaves, forward = build_call(p, cfg.device)
    if p.direction == "fwd":
        with torch.no_grad():
            samples = time_op(lambda _: forward(), cfg.timing, device=cfg.device)
    else:
        def setup() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            for t in leaves:
                t.grad = None  # accumulate-into-existing would add an extra pass
            outs = forward()
            return outs, [torch.ones_like(o) for o in outs]

        def backward(arg: Any) -> None:
            torch.autograd.backward(arg[0], arg[1])

        samples = time_op(backward, cfg.timing, device=cfg.device, setup=setup)
    return median(samples), impl


def measure_attention(cfg: MeasureConfig, points: list[AttentionPoint], on_point: Callable[[tuple], None] | None = None,
                      on_progress: Callable[[float], None] | None = None) -> pd.DataFrame:
    """One row per point, in point order, timed in `cfg.passes` interleaved passes (profiles.measure.in_passes);
    on_point gets each row once it is final (the runner checkpoints it)."""
    def row(p: AttentionPoint, t: float, impl: str) -> tuple:
        return p.direction, p.causal, p.heads, p.kv_heads, p.head_dim, p.doc_len, p.docs, p.dtype, t, p.layout, impl

    best = in_passes(points, cfg.passes, lambda p: time_attention(p, cfg),
                     (lambda i, t, impl: on_point(row(points[i], t, impl))) if on_point else None, on_progress)
    return pd.DataFrame([row(p, t, impl) for p, (t, impl) in zip(points, best)], columns=COLUMNS)
