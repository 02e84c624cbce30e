"""The executor's fixed cost per attention call, measured: what `PackedAttention` (planner/runtime/cp.py) spends on
a packed bin's documents beyond the SDPA calls the attention table times (the split into documents, the layout
views, the cat of the outputs, and their backward), per document and direction. The cost model charges it per
attention call (profile constant `attn_call_overhead_s`, costmodel/timing.py). Likewise per K/V source of a SlimPipe
slice's forward (`attn_source_fwd_s`, `CostModel.slice_sources_fwd_s`). `meshplan profile` measures it on
CPU, where the host's work is the step's time; on a GPU the host issues the same ops ahead of the kernels, so they
cost time only where a unit is host-bound, and `meshplan calibrate` fits the constant there."""

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
SOURCE_TOKENS = 128  # tokens a slice: the block calls stay short, the merges and glue are what is left


def attention_source_overhead(heads: int, kv_heads: int, head_dim: int, rounds: int = ROUNDS) -> dict:
    """Profile constants `attn_source_fwd_s` and `attn_source_tokens` (the slice length) on this CPU: what a
    SlimPipe slice's forward spends per K/V source (its own block and each cached slice's: the block kernel's call,
    the online-softmax merge, the sources function's Python) beyond the attention table's SDPA calls on the same
    blocks (causal on its own, full on a cached slice), with autograd recording as in training; one document of
    SOURCE_SLICES slices, each path's fastest of interleaved rounds, per source, never below 0. The backward takes
    the final log-sum-exp and merges nothing: forward only."""
    import torch
    import torch.nn.functional as F

    from planner.plan import Piece
    from planner.runtime.cp import KVCache, Peers, SlicedAttention, slice_layout, unit_documents

    n, s, d = SOURCE_SLICES, SOURCE_TOKENS, head_dim
    cpu = torch.device("cpu")
    pieces = unit_documents((Piece(0, 0, n * s),))
    layouts = [[slice_layout(pieces, n, j, 1, 0)] for j in range(n)]
    qkv = [[torch.randn(s, h, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)] for _ in range(n)]
    blocks = [[torch.randn(1, h, s, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)] for _ in range(n)]

    def runtime() -> float:
        cache, peers = KVCache(), Peers((0,), 0)
        t0 = time.perf_counter()
        outs = [SlicedAttention(layouts, j, peers, cache, cpu)(*qkv[j], 0) for j in range(n)]
        t = time.perf_counter() - t0
        del outs, cache
        return t

    def table() -> float:
        t0 = time.perf_counter()
        outs = [F.scaled_dot_product_attention(blocks[j][0], blocks[i][1], blocks[i][2], is_causal=i == j,
                                               enable_gqa=heads != kv_heads) for j in range(n) for i in range(j + 1)]
        t = time.perf_counter() - t0
        del outs
        return t

    best_r = best_t = float("inf")
    for r in range(WARMUP + rounds):
        tr, tt = runtime(), table()
        if r >= WARMUP:
            best_r, best_t = min(best_r, tr), min(best_t, tt)
    sources = n * (n + 1) // 2
    value = max(0.0, (best_r - best_t) / sources)
    return {"attn_source_fwd_s": {
                "value": value, "unit": "s",
                "source": f"measured: planner.runtime SlicedAttention forward over {n} slices of {s} tokens ({sources} "
                          f"sources; {heads}/{kv_heads} heads, head dim {d}) less the attention table's SDPA calls on "
                          f"the same blocks, per source, each path's fastest of {rounds} interleaved rounds, "
                          f"{torch.get_num_threads()} torch thread(s)"},
            "attn_source_tokens": {"value": float(s), "unit": "tokens",
                                   "source": "the slice length attn_source_fwd_s was measured at"}}


RING_TOKENS = (256, 1024)  # a member's tokens in the two timed rings: the glue's fixed part and its growth per token


class _Loopback:
    """Member 0 of a 2-member ring whose peer's blocks are already here: the ring's own work runs on this thread
    (the block calls, merges, accumulators and their allocations), the transfers are none (gloo's threads move
    them; the cost model prices them apart)."""

    degree, index = 2, 0

    def __init__(self, peer_kv, peer_dkv) -> None:
        self.got = {1: peer_kv, 2: peer_dkv}  # by tag: cp.py's _TAG_KV, _TAG_DKV
        self.stats = types.SimpleNamespace(wait_s=0.0, sent_bytes=0, messages=0)

    def ring(self, t, tag: int):
        return types.SimpleNamespace(wait=lambda: [self.got[tag]])


def _ring_excess_s(heads: int, kv_heads: int, head_dim: int, tokens: int, rounds: int) -> tuple[float, float]:
    """(forward, backward) seconds a ring step of one document over 2 members, `tokens` a member, spends beyond the
    SDPA calls the cost model prices it as (each member's causal square and its other member's two chunk squares at
    the full rate, costmodel.timing.CostModel.unit_costs): the median over rounds of the two timed back to back, per
    step."""
    import torch
    import torch.nn.functional as F

    from planner.plan import Piece
    from planner.runtime.cp import _TAG_DKV, _TAG_KV, RingAttention, shard_layout, unit_documents

    assert (_TAG_KV, _TAG_DKV) == (1, 2)  # _Loopback's tags
    d, t, half = head_dim, tokens, tokens // 2
    docs = unit_documents((Piece(0, 0, 2 * t),))
    peers = _Loopback(torch.randn(2, kv_heads, t, d), torch.zeros(2, kv_heads, t, d))
    ring = RingAttention([shard_layout(docs, 2, i) for i in range(2)], peers, d, torch.device("cpu"))
    qkv = [torch.randn(t, h, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
    grad = torch.ones(t, heads, d)
    blocks = [[torch.randn(1, h, n, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
              for n in (t, half, half)]
    gqa = heads != kv_heads

    def timed(fn) -> tuple[float, float]:
        t0 = time.perf_counter()
        outs, grads = fn()
        t1 = time.perf_counter()
        torch.autograd.backward(outs, grads)
        return t1 - t0, time.perf_counter() - t1

    def runtime():
        return [ring(*qkv, 0)], [grad]

    def table():
        own = F.scaled_dot_product_attention(*blocks[0], is_causal=True, enable_gqa=gqa)
        other = [F.scaled_dot_product_attention(*b, enable_gqa=gqa) for b in blocks[1:]]
        return [own, *other], [torch.ones_like(own), *(torch.ones_like(o) for o in other)]

    diffs: list[tuple[float, float]] = []  # per round, runtime − table, back to back: a slow spell hits both
    for r in range(WARMUP + rounds):
        tr, tt = timed(runtime), timed(table)
        if r >= WARMUP:
            diffs.append((tr[0] - tt[0], tr[1] - tt[1]))
    return tuple(max(0.0, statistics.median(d[k] for d in diffs) / 2) for k in (0, 1))


RING_ROUNDS = 120  # the glue is a few percent of the attention it rides on: many paired rounds (5 s on a 2-core EPYC)


def ring_step_overhead(heads: int, kv_heads: int, head_dim: int, rounds: int = RING_ROUNDS) -> dict:
    """Profile constants of a ring step's host work beyond its attention on this CPU (fp32, the thread count in
    force), forward and backward: what RingAttention spends per step (its kernel's block calls, the online-softmax
    merge, the K/V stack, the dQ and dK/dV accumulators and their copies, the Python) beyond the SDPA calls the cost
    model prices the step as, timed as member 0 of a 2-member ring at RING_TOKENS tokens a member; a fixed part per
    step (`attn_ring_step_fwd_s`, `attn_ring_step_bwd_s`) and one per token and head a member holds
    (`attn_ring_step_token_fwd_s`, `..._bwd_s`), the line through the two, neither below 0."""
    import torch

    (f1, b1), (f2, b2) = (_ring_excess_s(heads, kv_heads, head_dim, t, rounds) for t in RING_TOKENS)
    t1, t2 = RING_TOKENS
    where = (f"measured: planner.runtime RingAttention as member 0 of a 2-member ring over one document ({heads}/"
             f"{kv_heads} heads, head dim {head_dim}; the peer's blocks in place, no transfer) less the SDPA calls "
             f"the cost model prices its steps as, per step, at {t1} and {t2} tokens a member: the median over "
             f"{rounds} rounds of the two timed back to back, {torch.get_num_threads()} torch thread(s)")
    out = {}
    for way, a, b in (("fwd", f1, f2), ("bwd", b1, b2)):
        slope = max(0.0, (b - a) / ((t2 - t1) * heads))
        out[f"attn_ring_step_{way}_s"] = {"value": max(0.0, a - slope * t1 * heads), "unit": "s",
                                          "source": f"{where}; the fixed part"}
        out[f"attn_ring_step_token_{way}_s"] = {"value": slope, "unit": "s/(token·head)",
                                                "source": f"{where}; the growth per token and head"}
    return out
