"""SlimPipe's mirror-pairing exchange between two pipeline stages (REFERENCE §6 "P2P cost"): bytes
per layer and the part of the transfer time that compute does not hide. Pure functions; the
simulator decides who pairs with whom (planner.schedule.mirror_pairs) and how many chunks move."""

from __future__ import annotations

from costmodel.specs import ModelSpec

LSE_BYTES = 4  # the softmax log-sum-exp travels in fp32


def mirror_exchange_bytes(slice_tokens: float, chunks: int, model: ModelSpec, tp: int, dtype_bytes: int,
                          kind: str) -> tuple[float, float]:
    """(bytes to the light partner, bytes back to the heavy one) per layer and TP rank when the heavy
    op hands `chunks` K/V chunks (one slice of `slice_tokens` tokens each) to its partner.
    Forward: Q and the chunks' K/V out; the partial O and its log-sum-exp back (merged by online
    softmax). Backward: dO, Q, O, lse and the chunks' K/V out; dQ′ and the borrowed chunks' dK/dV back."""
    q_bytes = slice_tokens * model.q_width * dtype_bytes / tp  # Q and dQ′ each
    o_bytes = slice_tokens * model.attn_out_width * dtype_bytes / tp  # O and dO each (MLA: V's head width)
    lse_bytes = slice_tokens * model.heads / tp * LSE_BYTES
    kv_bytes = chunks * slice_tokens * 2 * model.kv_width * dtype_bytes / tp
    if kind == "F":
        return q_bytes + kv_bytes, o_bytes + lse_bytes
    return q_bytes + 2 * o_bytes + lse_bytes + kv_bytes, q_bytes + kv_bytes


def mirror_exchange_exposed_s(to_light_s: float, back_s: float, heavy_attn_s: float, light_attn_s: float,
                              moved_s: float) -> tuple[float, float]:
    """(heavy, light) seconds per layer that the exchange adds to the two ops. The light partner
    receives while it computes its own attention, then computes the borrowed part `moved_s` and sends
    it back; the heavy one computes what it kept meanwhile and waits for the result to merge it."""
    light = max(0.0, to_light_s - light_attn_s)
    ready_s = max(to_light_s, light_attn_s) + moved_s + back_s
    heavy = max(0.0, ready_s - (heavy_attn_s - moved_s))
    return heavy, light
