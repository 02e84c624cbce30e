"""The executor's fixed cost per attention call, measured: what `PackedAttention` (planner/runtime/cp.py) spends on
a packed bin's documents beyond the SDPA calls the attention table times (the split into documents, the layout
views, the cat of the outputs, and their backward), per document and direction. The cost model charges it per
attention call (profile constant `attn_call_overhead_s`, costmodel/timing.py). Likewise, forward and backward, the
host work per K/V source of a SlimPipe slice and per ring step beyond the attention they are priced as, a fixed part
and one per token and head (`attn_source_*`, `attn_ring_step_*`; `CostModel.attention_glue_s`). `meshplan profile`
measures them on CPU, where the host's work is the step's time; on a GPU the host issues the same ops ahead of the
kernels, so they cost time only where a unit is host-bound, and `meshplan calibrate` fits the call's constant there."""

from __future__ import annotations

import statistics
import time
import types

DOC_TOKENS = 16  # the CPU attention table's shortest document: above its grid's floor, the glue is what is left
DOCS = 32  # documents of one timed bin: enough calls that a bin outlasts the timer's resolution many times
ROUNDS = 40  # interleaved rounds (runtime path, then the table's); each path's fastest round is kept
WARMUP = 3


def _bin_times_s(fn, leaves, grads) -> tuple[float, float]:
    """Forward and backward seconds of one bin through `fn`."""
    import torch

    t0 = time.perf_counter()
    outs = fn()
    t1 = time.perf_counter()
    torch.autograd.backward(outs, grads)
    t2 = time.perf_counter()
    for x in leaves:
        x.grad = None
    return t1 - t0, t2 - t1


def attention_call_overhead(heads: int, kv_heads: int, head_dim: int, rounds: int = ROUNDS) -> dict:
    """Profile constant `attn_call_overhead_s` on this CPU (fp32, the thread count in force): (PackedAttention's
    bin − the table's per-document SDPA loop) / documents, each path's fastest of interleaved rounds (as the tables
    keep a minimum: a busy moment does not set it), the mean of forward and backward (the cost model charges the
    same per call in each), never below 0."""
    import torch
    import torch.nn.functional as F

    from planner.runtime.cp import PackedAttention

    n, s, d = DOCS, DOC_TOKENS, head_dim
    attn = PackedAttention(types.SimpleNamespace(doc_slices=tuple((i * s, (i + 1) * s) for i in range(n))))
    packed = [torch.randn(n * s, h, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
    packed_grad = [torch.ones(n * s, heads, d)]
    # the attention table's CPU varlen rows: one SDPA call per document on its own [1, H, s, D] leaves
    per_doc = [[torch.randn(1, h, s, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)] for _ in range(n)]
    table_leaves = [x for doc in per_doc for x in doc]
    table_grads = [torch.ones(1, heads, s, d)] * n

    def runtime():
        return [attn(*packed, 0)]

    def table():
        return [F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
                for q, k, v in per_doc]

    best = {"rf": float("inf"), "rb": float("inf"), "tf": float("inf"), "tb": float("inf")}
    for r in range(WARMUP + rounds):
        times = dict(zip(("rf", "rb"), _bin_times_s(runtime, packed, packed_grad)))
        times.update(zip(("tf", "tb"), _bin_times_s(table, table_leaves, table_grads)))
        if r >= WARMUP:
            best = {k: min(v, times[k]) for k, v in best.items()}
    value = max(0.0, ((best["rf"] - best["tf"]) + (best["rb"] - best["tb"])) / (2 * n))
    return {"value": value, "unit": "s",
            "source": f"measured: planner.runtime PackedAttention over {n} documents of {s} tokens ({heads}/{kv_heads} "
                      f"heads, head dim {d}) less the attention table's per-document SDPA calls, per call, mean of "
                      f"forward and backward, each path's fastest of {rounds} interleaved rounds, "
                      f"{torch.get_num_threads()} torch thread(s)"}


SOURCE_SLICES = 4  # slices of the timed document: 1 + 2 + 3 + 4 sources
SOURCE_TOKENS = (128, 512)  # a slice's tokens in the two timed units: the glue's fixed part and its growth per token
GLUE_ROUNDS = 120  # the glue is a few percent of the attention it rides on: many paired rounds


def _paired_excess_s(runtime, table, rounds: int) -> tuple[float, float]:
    """(forward, backward) seconds the executor's path (`runtime`) takes beyond the SDPA calls it is priced as
    (`table`): each a function returning (outputs, their gradients), timed back to back each round (a slow spell of a
    shared host hits both), the median over rounds of the differences."""
    import torch

    def timed(fn) -> tuple[float, float]:
        t0 = time.perf_counter()
        outs, grads = fn()
        t1 = time.perf_counter()
        torch.autograd.backward(outs, grads)
        return t1 - t0, time.perf_counter() - t1

    diffs: list[tuple[float, float]] = []
    for r in range(WARMUP + rounds):
        tr, tt = timed(runtime), timed(table)
        if r >= WARMUP:
            diffs.append((tr[0] - tt[0], tr[1] - tt[1]))
    return statistics.median(d[0] for d in diffs), statistics.median(d[1] for d in diffs)


def _glue_constants(kind: str, excess_at, lengths: tuple[int, int], heads: int, rounds: int, what: str) -> dict:
    """Profile constants attn_{kind}_{fwd,bwd}_s (a fixed part) and attn_{kind}_token_{fwd,bwd}_s (one per token and
    head): the line through the glue measured at two lengths, `excess_at(tokens)` -> (forward, backward) seconds,
    neither part below 0; `what` (the path timed, at {t1} and {t2}) opens their source text."""
    import torch

    (f1, b1), (f2, b2) = (excess_at(t) for t in lengths)
    t1, t2 = lengths
    what = (what.format(t1=t1, t2=t2) + f": the median over {rounds} rounds of the two timed back to back, "
            f"{torch.get_num_threads()} torch thread(s)")
    out = {}
    for way, a, b in (("fwd", f1, f2), ("bwd", b1, b2)):
        slope = max(0.0, (b - a) / ((t2 - t1) * heads))
        out[f"attn_{kind}_{way}_s"] = {"value": max(0.0, a - slope * t1 * heads), "unit": "s",
                                       "source": f"{what}; the fixed part"}
        out[f"attn_{kind}_token_{way}_s"] = {"value": slope, "unit": "s/(token·head)",
                                             "source": f"{what}; the growth per token and head"}
    return out


def _source_excess_s(heads: int, kv_heads: int, head_dim: int, tokens: int, rounds: int) -> tuple[float, float]:
    """(forward, backward) seconds per K/V source that SOURCE_SLICES slices of `tokens` tokens of one document spend
    beyond the SDPA calls on the same blocks (causal on a slice's own, full on a cached slice's)."""
    import torch
    import torch.nn.functional as F

    from planner.plan import Piece
    from planner.runtime.cp import KVCache, Peers, SlicedAttention, slice_layout, unit_documents

    n, s, d = SOURCE_SLICES, tokens, head_dim
    cpu = torch.device("cpu")
    pieces = unit_documents((Piece(0, 0, n * s),))
    layouts = [[slice_layout(pieces, n, j, 1, 0)] for j in range(n)]
    qkv = [[torch.randn(s, h, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)] for _ in range(n)]
    blocks = [[torch.randn(1, h, s, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)] for _ in range(n)]

    def runtime():
        cache, peers = KVCache(), Peers((0,), 0)
        outs = [SlicedAttention(layouts, j, peers, cache, cpu)(*qkv[j], 0) for j in range(n)]
        return outs, [torch.ones_like(o) for o in outs]

    def table():
        outs = [F.scaled_dot_product_attention(blocks[j][0], blocks[i][1], blocks[i][2], is_causal=i == j,
                                               enable_gqa=heads != kv_heads) for j in range(n) for i in range(j + 1)]
        return outs, [torch.ones_like(o) for o in outs]

    sources = n * (n + 1) // 2
    return tuple(x / sources for x in _paired_excess_s(runtime, table, rounds))


def attention_source_overhead(heads: int, kv_heads: int, head_dim: int, rounds: int = GLUE_ROUNDS) -> dict:
    """Profile constants of a SlimPipe slice's host work per K/V source (its own block and each cached slice's) beyond
    the attention table's SDPA calls on the same blocks, forward (the block kernel's call and copies, the
    online-softmax merge, the sources function's Python) and backward (the block calls, the dQ, dK and dV
    accumulators), with autograd as in training: one document of SOURCE_SLICES slices at each of SOURCE_TOKENS
    tokens a slice; a fixed part per source (`attn_source_fwd_s`, `attn_source_bwd_s`) and one per token and head
    (`attn_source_token_fwd_s`, `..._bwd_s`), the line through the two (`_glue_constants`)."""
    what = (f"measured: planner.runtime SlicedAttention over {SOURCE_SLICES} slices of one document ({heads}/"
            f"{kv_heads} heads, head dim {head_dim}) less the attention table's SDPA calls on the same blocks, per "
            "source, at {t1} and {t2} tokens a slice")
    return _glue_constants("source", lambda t: _source_excess_s(heads, kv_heads, head_dim, t, rounds),
                           SOURCE_TOKENS, heads, rounds, what)


RING_TOKENS = (256, 1024)  # a member's tokens in the two timed rings: the glue's fixed part and its growth per token


class _Loopback:
    """Member 0 of a 2-member ring whose peer's blocks are already here: the ring's own work runs on this thread
    (the block calls, merges, accumulators and their allocations), the transfers are none (gloo's threads move
    them; the cost model prices them apart)."""

    degree, index = 2, 0

    def __init__(self, got: dict) -> None:
        self.got = got  # what the peer sends, by message tag
        self.stats = types.SimpleNamespace(wait_s=0.0, sent_bytes=0, messages=0)

    def ring(self, t, tag: int):
        return types.SimpleNamespace(wait=lambda: [self.got[tag]])


def _ring_excess_s(heads: int, kv_heads: int, head_dim: int, tokens: int, rounds: int) -> tuple[float, float]:
    """(forward, backward) seconds a ring step of one document over 2 members, `tokens` a member, spends beyond the
    SDPA calls the cost model prices it as (each member's causal square and its other member's two chunk squares at
    the full rate, costmodel.timing.CostModel.unit_costs), per step."""
    import torch
    import torch.nn.functional as F

    from planner.plan import Piece
    from planner.runtime.cp import _TAG_DKV, _TAG_KV, RingAttention, shard_layout, unit_documents

    d, t, half = head_dim, tokens, tokens // 2
    docs = unit_documents((Piece(0, 0, 2 * t),))
    peers = _Loopback({_TAG_KV: torch.randn(2, kv_heads, t, d), _TAG_DKV: torch.zeros(2, kv_heads, t, d)})
    ring = RingAttention([shard_layout(docs, 2, i) for i in range(2)], peers, d, torch.device("cpu"))
    qkv = [torch.randn(t, h, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
    grad = torch.ones(t, heads, d)
    blocks = [[torch.randn(1, h, n, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
              for n in (t, half, half)]
    gqa = heads != kv_heads

    def runtime():
        return [ring(*qkv, 0)], [grad]

    def table():
        own = F.scaled_dot_product_attention(*blocks[0], is_causal=True, enable_gqa=gqa)
        other = [F.scaled_dot_product_attention(*b, enable_gqa=gqa) for b in blocks[1:]]
        return [own, *other], [torch.ones_like(own), *(torch.ones_like(o) for o in other)]

    return tuple(x / 2 for x in _paired_excess_s(runtime, table, rounds))


def ring_step_overhead(heads: int, kv_heads: int, head_dim: int, rounds: int = GLUE_ROUNDS) -> dict:
    """Profile constants of a ring step's host work beyond its attention on this CPU (fp32, the thread count in
    force), forward and backward: what RingAttention spends per step (its kernel's block calls, the online-softmax
    merge, the K/V stack, the dQ and dK/dV accumulators and their copies, the Python) beyond the SDPA calls the cost
    model prices the step as, timed as member 0 of a 2-member ring at RING_TOKENS tokens a member; a fixed part per
    step (`attn_ring_step_fwd_s`, `attn_ring_step_bwd_s`) and one per token and head a member holds
    (`attn_ring_step_token_fwd_s`, `..._bwd_s`), the line through the two (`_glue_constants`)."""
    what = (f"measured: planner.runtime RingAttention as member 0 of a 2-member ring over one document ({heads}/"
            f"{kv_heads} heads, head dim {head_dim}; the peer's blocks in place, no transfer) less the SDPA calls "
            "the cost model prices its steps as, per step, at {t1} and {t2} tokens a member")
    return _glue_constants("ring_step", lambda t: _ring_excess_s(heads, kv_heads, head_dim, t, rounds),
                           RING_TOKENS, heads, rounds, what)
