"""Attention for one unit: packed bins (per-document causal) and context parallelism over P2P, in memory
linear in the tokens per rank.

A unit sharded over N HDP ranks splits each of its documents zigzag (REFERENCE 2.3): padded to a
multiple of 2N, cut into 2N chunks, member i keeps chunks i and 2N-1-i. Members talk with
isend/irecv on the world group only (no process group per unit, ByteScale's dynamic
communication). Three context-parallel forms, same numbers up to float summation order:

- `GatherAttention` ("allgather"): all-gather K/V by P2P in forward, reduce-scatter dK/dV in
  backward (a custom autograd.Function around the transfers).
- `RingAttention` ("ring"): N steps, each computing one member's K/V with online softmax while the
  next member's is in flight; backward passes K/V and the dK/dV accumulators round the ring.
- `SlicedAttention`: a sliced unit's slice against the K/V cache of earlier slices (SlimPipe).

All three run on a `BlockKernel`: queries and keys in blocks of `block_tokens` rows (the fused CPU kernel: whole
runs, FUSED_CPU_BLOCK_TOKENS), each block pair's mask settled from its spans (`span_mode`) or else built when it
runs from the two shard layouts (document ids and positions: causal within a document, nothing across documents),
pairs no query of which sees a key skipped, partial results merged by log-sum-exp; backward recomputes each pair's
scores from the saved q, k, v, output and log-sum-exp (FlashAttention's scheme). Nothing T² is built or saved: the
largest transient is one block pair's scores. A pair runs on torch's fused CPU flash kernel (`FusedCPUBlocks`), in
plain torch (`MathBlocks`, the GPU default) or, opt-in, on torch's CUDA flash kernel (`FlashCUDABlocks`). A packed
bin (degree 1) is one flash_attn varlen call on CUDA when flash_attn is installed, else one SDPA call per document
(flash kernels on CPU and CUDA).

Padding tokens attend only to themselves (never seen by real tokens, labels ignored), so no
softmax row is empty.

A unit with `ulysses` > 1 first splits heads by all-to-all inside groups of consecutive members, then
runs ring or all-gather across the groups on their merged layouts (planner/runtime/ulysses.py). The
kind is the unit's own (`Unit.cp`) when the plan records one, else the replay's."""

from __future__ import annotations

import bisect
import math
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from planner.plan import Piece, Unit
from planner.runtime.launch import CPImpl


# Message tags: gloo matches (peer, tag) in FIFO order, so K/V and dK/dV streams that are in
# flight at the same time must not share one. NCCL ignores tags; there both sides issue the
# streams in the same order, which is what NCCL's FIFO matching needs.
_TAG_KV, _TAG_DKV, _TAG_GATHER, _TAG_SCATTER = 1, 2, 3, 4
_TAG_A2A = 8  # Ulysses all-to-all (5-6: stages.py's activations, 7: step.py's tied embedding)


# -- layout -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Document:
    """The pieces of one sequence inside a unit; attention is causal within it. Pieces of the
    same sequence in different units are different documents (no context across units)."""

    seq: int  # sequence id
    positions: torch.Tensor  # [n] true token positions in the sequence, increasing

    @property
    def length(self) -> int:
        return int(self.positions.numel())


def unit_documents(pieces: tuple[Piece, ...]) -> list[Document]:
    """Group a unit's pieces by sequence, in order of first appearance."""
    by_seq: dict[int, list[Piece]] = {}
    for p in pieces:
        by_seq.setdefault(p.seq, []).append(p)
    return [Document(seq, torch.cat([torch.arange(p.start, p.end) for p in sorted(ps, key=lambda p: p.start)]))
            for seq, ps in by_seq.items()]


def slice_documents(docs: list[Document], n: int, j: int) -> list[Document]:
    """Slice j of n (SlimPipe's uniform token slices): the j-th of n nearly equal contiguous parts of
    every document. Documents keep their index (a part may be empty), so masks compare across slices."""
    return [Document(d.seq, d.positions[d.length * j // n: d.length * (j + 1) // n]) for d in docs]


def slice_layout(docs: list[Document], n: int, j: int, degree: int, index: int) -> ShardLayout:
    """Member `index`'s zigzag shard of slice j; padding ids are offset per slice so that a padding
    query still matches only its own key when earlier slices' keys sit beside it."""
    lay = shard_layout(slice_documents(docs, n, j), degree, index)
    return replace(lay, key=lay.key + (j << 32))


@dataclass(frozen=True)
class ShardLayout:
    """The local tokens of member `index` of a unit over `degree` ranks (zigzag per document)."""

    degree: int  # N: ranks sharing the unit
    index: int  # this member's position in the unit's hdp_ranks
    doc: torch.Tensor  # [T] document index within the unit
    seq: torch.Tensor  # [T] sequence id (token lookup)
    pos: torch.Tensor  # [T] true position in the sequence; 0 for padding
    valid: torch.Tensor  # [T] False for zigzag padding
    key: torch.Tensor  # [T] unit-wide token id in the padded space (padding attends to itself)
    doc_slices: tuple[tuple[int, int], ...]  # local [start, end) of each document (degree 1 only)

    @property
    def tokens(self) -> int:
        return int(self.doc.numel())


def shard_layout(docs: list[Document], degree: int, index: int) -> ShardLayout:
    doc_i, seq_i, pos_i, valid_i, key_i, slices = [], [], [], [], [], []
    base, local = 0, 0
    for d, doc in enumerate(docs):
        n = doc.length
        if degree == 1:
            idx = torch.arange(n)
            padded = n
        else:
            chunk = math.ceil(n / (2 * degree))
            padded = 2 * degree * chunk
            a, b = index, 2 * degree - 1 - index
            idx = torch.cat([torch.arange(a * chunk, (a + 1) * chunk), torch.arange(b * chunk, (b + 1) * chunk)])
        ok = idx < n
        doc_i.append(torch.full_like(idx, d))
        seq_i.append(torch.full_like(idx, doc.seq))
        pos_i.append(torch.where(ok, doc.positions[idx.clamp(max=n - 1)], 0))
        valid_i.append(ok)
        key_i.append(base + idx)
        slices.append((local, local + idx.numel()))
        base += padded
        local += idx.numel()
    cat = torch.cat
    return ShardLayout(degree, index, cat(doc_i), cat(seq_i), cat(pos_i), cat(valid_i), cat(key_i), tuple(slices))


def block_mask(q: ShardLayout, k: ShardLayout, rows: slice = slice(None), cols: slice = slice(None),
               self_keys: bool = True) -> torch.Tensor:
    """[rows, cols] bool, True where a query may attend a key: same document, key not later, both real
    tokens; padding queries see only themselves (`self_keys`: the key ids can coincide, i.e. q and k
    are the same layout; key ids are unit-wide, so elsewhere the test is False anyway)."""
    qd, qp, qv = q.doc[rows, None], q.pos[rows, None], q.valid[rows, None]
    kd, kp, kv = k.doc[None, cols], k.pos[None, cols], k.valid[None, cols]
    m = (qd == kd) & (kp <= qp) & qv & kv
    if self_keys:
        m |= q.key[rows, None] == k.key[None, cols]
    return m


def attention_mask(q: ShardLayout, k: ShardLayout) -> torch.Tensor:
    """The whole [Tq, Tk] mask: a reference for tests; the kernels build one block pair's at a time."""
    return block_mask(q, k)


# -- point-to-point among a unit's members ------------------------------------------------------

@dataclass
class CommStats:
    """What the P2P traffic of one unit cost this rank."""

    wait_s: float = 0.0  # host time blocked in Work.wait() (exact on gloo; NCCL waits are stream-side)
    sent_bytes: int = 0  # bytes this rank sent
    messages: int = 0  # sends issued


@dataclass
class Pending:
    """Transfers in flight; wait() returns the receive buffers."""

    works: list
    bufs: list[torch.Tensor]
    keep: list[torch.Tensor]  # send tensors kept alive until the transfer completes
    stats: CommStats

    def wait(self) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        self.stats.wait_s += time.perf_counter() - t0
        return self.bufs


@dataclass
class Peers:
    """The members of one unit as global ranks of the world group, and this rank's index."""

    ranks: tuple[int, ...]  # global rank of each member, in hdp_ranks order
    index: int  # this rank's member index
    stats: CommStats = field(default_factory=CommStats)

    @property
    def degree(self) -> int:
        return len(self.ranks)

    def post(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], tag: int) -> Pending:
        """Issue sends and receives (member index, tensor) as one batch: grouping them is what
        keeps NCCL from deadlocking when two members send to each other at once."""
        ops = [dist.P2POp(dist.isend, t, self.ranks[j], tag=tag) for j, t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.ranks[j], tag=tag) for j, t in recvs]
        self.stats.sent_bytes += sum(t.numel() * t.element_size() for _, t in sends)
        self.stats.messages += len(sends)
        works = dist.batch_isend_irecv(ops) if ops else []
        return Pending(works, [t for _, t in recvs], [t for _, t in sends], self.stats)

    def ring(self, t: torch.Tensor, tag: int) -> Pending:
        """Send t to the next member, receive a tensor like it from the previous one."""
        n, i = self.degree, self.index
        if n == 1:  # our own next member: nothing to move
            return Pending([], [t], [], self.stats)
        return self.post([((i + 1) % n, t)], [((i - 1) % n, torch.empty_like(t))], tag)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[N, *t.shape]: every member's t (all members hold the same shape)."""
        out = t.new_empty((self.degree, *t.shape))
        out[self.index] = t
        others = [j for j in range(self.degree) if j != self.index]
        self.post([(j, t) for j in others], [(j, out[j]) for j in others], _TAG_GATHER).wait()
        return out

    def all_to_all(self, parts: torch.Tensor) -> torch.Tensor:
        """parts [N, ...]: part j goes to member j; returns [N, ...] whose slot j came from member j (its
        part self.index). The exchange is its own inverse (slot j of member i is slot i of member j)."""
        parts = parts.contiguous()
        out = torch.empty_like(parts)
        out[self.index] = parts[self.index]
        others = [j for j in range(self.degree) if j != self.index]
        self.post([(j, parts[j]) for j in others], [(j, out[j]) for j in others], _TAG_A2A).wait()
        return out

    def reduce_scatter(self, full: torch.Tensor) -> torch.Tensor:
        """Sum over members of their full[self.index]; added in member order, so deterministic."""
        full = full.contiguous()
        others = [j for j in range(self.degree) if j != self.index]
        bufs = dict(zip(others, self.post([(j, full[j]) for j in others],
                                          [(j, torch.empty_like(full[j])) for j in others], _TAG_SCATTER).wait()))
        acc = None
        for j in range(self.degree):
            part = full[self.index] if j == self.index else bufs[j]
            acc = part.clone() if acc is None else acc + part
        return acc


# -- blockwise attention --------------------------------------------------------------------------

SCORE_BLOCK_BYTES = 16 << 20  # fp32 scores of one block pair over all query heads: the transient working set
MIN_BLOCK_TOKENS, MAX_BLOCK_TOKENS = 64, 2048
BLOCK_ENV = "MESHPLAN_BLOCK_TOKENS"  # overrides block_tokens in every rank (tests: many blocks on small units)


# The fused CPU kernel tiles a pair itself and keeps no scores: its blocks follow the spans' runs (layout_spans cuts
# at documents, zigzag chunks and padding), so a slice or ring step is a few calls, not one per 1,024-token block pair
# with its merge (a 2-slice unit of 2,899 tokens of `tiny` ran 10 block pairs a layer and direction, 6.5x the
# operators of the whole unit).
FUSED_CPU_BLOCK_TOKENS = 1 << 20


def block_tokens(q_heads: int, score_bytes: int = SCORE_BLOCK_BYTES) -> int:
    """Rows (= columns) of a block pair: the largest power of two whose fp32 scores over all query heads
    fit score_bytes (1024 for 4 heads, 256 for 32), within [MIN_BLOCK_TOKENS, MAX_BLOCK_TOKENS]."""
    b = 1 << int(math.log2(math.sqrt(score_bytes / (4 * q_heads))))
    return max(MIN_BLOCK_TOKENS, min(MAX_BLOCK_TOKENS, b))


@dataclass(frozen=True)
class Span:
    """Block [a, b) of a layout, summarised for the skip test. A layout's real tokens are sorted by
    (document, position) (documents in order, zigzag chunks in order), so `first` and `last` are the
    least and greatest (document, position) of the block's real tokens: None when all are padding."""

    a: int
    b: int
    first: tuple[int, int] | None
    last: tuple[int, int] | None
    padding: bool  # holds padding tokens (they need their own key)


def span_runs(lay: ShardLayout, block: int) -> list[tuple[Span, tuple[Span, ...]]]:
    """The layout's tokens in spans of at most `block`, cut at documents and where padding starts, each with its
    runs: the same tokens cut where a run of consecutive positions ends (a zigzag chunk). A span's real tokens are
    one document's in position order, so our own layout's diagonal pair of spans is causal whatever chunks it
    holds (one kernel call where a member holds two chunks), and a pair is fully visible when every key precedes
    every query; a pair of runs is fully visible, causal or hidden, so a fused kernel runs it without a mask."""
    order = lay.doc[lay.valid] * (1 << 40) + lay.pos[lay.valid]
    if bool((order[1:] <= order[:-1]).any()):  # the skip test relies on it: refuse rather than skip wrongly
        raise ValueError("a shard layout's real tokens are not sorted by (document, position)")
    v = lay.valid
    cut = (lay.doc[1:] != lay.doc[:-1]) | (v[1:] != v[:-1])
    run_cut = cut | (v[1:] & v[:-1] & (lay.pos[1:] != lay.pos[:-1] + 1))
    starts = [0, *(cut.nonzero().flatten() + 1).tolist(), lay.tokens]
    run_starts = (run_cut.nonzero().flatten() + 1).tolist()

    def span(a: int, b: int) -> Span:
        if not bool(v[a]):  # spans are all real or all padding
            return Span(a, b, None, None, True)
        return Span(a, b, (int(lay.doc[a]), int(lay.pos[a])), (int(lay.doc[b - 1]), int(lay.pos[b - 1])), False)

    out = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        for a in range(lo, hi, block):
            b = min(a + block, hi)
            inner = run_starts[bisect.bisect_right(run_starts, a):bisect.bisect_left(run_starts, b)]
            edges = [a, *inner, b]
            out.append((span(a, b), tuple(span(x, y) for x, y in zip(edges[:-1], edges[1:]))))
    return out


def layout_spans(lay: ShardLayout, block: int) -> list[Span]:
    """The layout's runs (span_runs): spans of at most `block` of consecutive positions of one document, or of
    padding."""
    return [r for _, runs in span_runs(lay, block) for r in runs]


def may_attend(q: Span, k: Span) -> bool:
    """False only when no real query of q can see a real key of k: every key is later, in (document,
    position) order, than every query, or every key is in an earlier document."""
    if q.first is None or k.first is None:
        return False
    return k.first <= q.last and k.last[0] >= q.first[0]


def span_mode(q: Span, k: Span) -> str | None:
    """A block pair's mask from its spans alone, where they settle it: a real span holds one document's tokens in
    position order (span_runs), so keys of that document that all precede or equal the first query are all
    visible ("all"), the very same span is the causal triangle ("causal"; positions are unique in a unit, so equal
    ends mean the same tokens); None otherwise (padding, partial overlaps): the caller builds the mask. Building
    every pair's mask to classify it cost a 4-slice unit of 2,899 tokens 18 ms of its 160 on a CPU."""
    if q.padding or k.padding or q.first is None or k.first is None or q.first[0] != k.first[0]:
        return None
    if k.last[1] <= q.first[1]:
        return "all"
    return "causal" if (k.first, k.last) == (q.first, q.last) else None


def _own_pairs(q_spans: list[tuple[Span, tuple[Span, ...]]]) -> list[tuple[Span, list[Span]]]:
    """Block pairs of our queries against our own keys: whole spans, each a document's tokens in position order,
    so every pair is causal (the diagonal), fully visible or hidden; a padding span sees itself."""
    spans = [sp for sp, _ in q_spans]
    by_q = []
    for i, q in enumerate(spans):
        hit = [k for j, k in enumerate(spans) if may_attend(q, k) or (i == j and q.padding)]
        if hit:
            by_q.append((q, hit))
    return by_q


def _source_pairs(q_spans: list[tuple[Span, tuple[Span, ...]]], k_spans: list[tuple[Span, tuple[Span, ...]]]
                  ) -> list[tuple[Span, list[Span]]]:
    """Block pairs of our queries against another layout's keys, as few as settle without a mask: a pair of
    spans where all its keys precede its queries, else the spans cut into runs on one side (a zigzag member's
    late chunk against a whole earlier span, a whole span against an earlier member's early chunk: one kernel
    call per document and ring step, as Transformer Engine's zigzag ring runs), else on both. Entries may share
    query rows: the caller merges them in order."""
    by_q: list[tuple[Span, list[Span]]] = []

    def add(pairs: list[tuple[Span, Span]]) -> None:
        for q, k in pairs:
            if by_q and by_q[-1][0] == q:
                by_q[-1][1].append(k)
            else:
                by_q.append((q, [k]))

    for q, q_runs in q_spans:
        for k, k_runs in k_spans:
            if not may_attend(q, k):
                continue
            if span_mode(q, k) is not None:
                add([(q, k)])
                continue
            splits = ([(q, r) for r in k_runs], [(r, k) for r in q_runs], [(a, b) for a in q_runs for b in k_runs])
            seen = [[p for p in pairs if may_attend(*p)] for pairs in splits]
            settled = [s for s in seen[:2] if all(span_mode(*p) is not None for p in s)]
            add(min(settled, key=len) if settled else seen[2])
    return by_q


def _first_touches(by_q: list[tuple[Span, list[Span]]], tokens: int) -> list[bool]:
    """Per entry: whether no earlier entry's query span overlaps its rows (entries may share rows, _source_pairs)."""
    touched = torch.zeros(tokens, dtype=torch.bool)
    out = []
    for q, _ in by_q:
        out.append(not bool(touched[q.a:q.b].any()))
        touched[q.a:q.b] = True
    return out


def _on(lay: ShardLayout, device: torch.device) -> ShardLayout:
    return replace(lay, doc=lay.doc.to(device), pos=lay.pos.to(device), valid=lay.valid.to(device),
                   key=lay.key.to(device))


def _row_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[Hq, T, ...] -> [Hkv, G, T, ...]: the query heads sharing each K/V head (GQA)."""
    return x.reshape(kv_heads, x.shape[0] // kv_heads, *x.shape[1:])


def _expand_kv(k: torch.Tensor, g: int) -> torch.Tensor:
    """[Hkv, S, D] -> [1, Hq, S, D]: each K/V head repeated for its g query heads, as the fused flash ops want."""
    return k[None] if g == 1 else k.repeat_interleave(g, 0)[None]


def _safe(x: torch.Tensor) -> torch.Tensor:
    """-inf -> 0, so that exp(-inf - x) is 0 and never nan."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def merge_block(out: torch.Tensor, lse: torch.Tensor, blk: torch.Tensor, blk_lse: torch.Tensor):
    """Online softmax: fold one block's normalised output and log-sum-exp into the running ones, in the
    running ones' dtype (fp32 here, whatever the blocks' precision)."""
    blk, blk_lse = blk.to(out.dtype), blk_lse.to(lse.dtype)
    new = torch.logaddexp(lse, blk_lse)
    ns = _safe(new)  # rows no block has reached yet stay 0 / -inf
    return out * torch.exp(lse - ns)[..., None] + blk * torch.exp(blk_lse - ns)[..., None], new


class BlockKernel(ABC):
    """Attention of one layout's queries to the keys of other layouts ("sources", named by any hashable
    key: a member index, a (slice, member) pair), block pair by block pair. forward(q, k, v, source)
    returns that source's normalised output and log-sum-exp (-inf on rows it does not reach), to be
    merged with merge_block; backward(..., out, lse, source) its dQ, dK, dV given the *final* output
    and log-sum-exp. Tensors are heads-first: q [Hq, T, D], k and v [Hkv, S, D]; results are fp32.
    `pairs[source]`: per query block, the key blocks it may see (computed once, O(blocks²) ints)."""

    name = "?"

    def __init__(self, q_layout: ShardLayout, k_layouts: dict, own, block: int, device: torch.device) -> None:
        self.block, self.own = block, own
        q_spans = span_runs(q_layout, block)
        self.pairs: dict = {}
        for key, lay in k_layouts.items():
            by_q = _own_pairs(q_spans) if key == own else _source_pairs(q_spans, span_runs(lay, block))
            if by_q:
                self.pairs[key] = by_q
        # per source and entry: whether no earlier entry reached its rows (forward takes its first block as it is)
        self.fresh = {key: _first_touches(by_q, q_layout.tokens) for key, by_q in self.pairs.items()}
        self.members = frozenset(self.pairs)  # sources some query of ours sees
        self.q_layout = _on(q_layout, device)
        self.k_layouts = {key: _on(lay, device) for key, lay in k_layouts.items() if key in self.pairs}
        self._modes: dict = {}  # (source, q span bounds, k span bounds) -> "all" | "causal"

    def _allowed(self, source, q: Span, k: Span) -> torch.Tensor:
        return block_mask(self.q_layout, self.k_layouts[source], slice(q.a, q.b), slice(k.a, k.b),
                          self_keys=source == self.own)

    def _visible(self, source, q: Span, k: Span):
        """What one block pair's mask is, classified once per unit (O(blocks) pairs, a few bytes each): "all"
        (every query sees every key), "causal" (our own diagonal pair, the lower triangle), or the bool mask
        itself, built at each call (padding spans only, when layout_spans cut the blocks)."""
        key = (source, q.a, q.b, k.a, k.b)  # a span and one of its runs can start alike
        mode = self._modes.get(key)
        if mode is not None:
            return mode
        mode = span_mode(q, k)
        if mode is not None:
            self._modes[key] = mode
            return mode
        allowed = self._allowed(source, q, k)
        t, s = allowed.shape
        if bool(allowed.all()):
            mode = "all"
        elif source == self.own and q.a == k.a and t == s and torch.equal(allowed, torch.ones_like(allowed).tril()):
            mode = "causal"
        else:
            return allowed
        self._modes[key] = mode
        return mode

    def forward(self, q, k, v, source, scale):
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        for (qs, kss), fresh in zip(self.pairs.get(source, ()), self.fresh.get(source, ())):
            r = slice(qs.a, qs.b)
            o, m, qb = out[:, r], lse[:, r], q[:, r]
            for ks in kss:
                c = slice(ks.a, ks.b)
                blk, blk_lse = self._fwd(qb, k[:, c], v[:, c], (source, qs, ks), scale)
                o, m = (blk.float(), blk_lse.float()) if fresh else merge_block(o, m, blk, blk_lse)
                fresh = False
            out[:, r], lse[:, r] = o, m
        return out, lse

    def backward(self, dout, q, k, v, out, lse, source, scale):
        dq = q.new_zeros(q.shape, dtype=torch.float32)
        dk, dv = k.new_zeros(k.shape, dtype=torch.float32), v.new_zeros(v.shape, dtype=torch.float32)
        for qs, kss in self.pairs.get(source, ()):
            r = slice(qs.a, qs.b)
            for ks in kss:
                c = slice(ks.a, ks.b)
                bq, bk, bv = self._bwd(dout[:, r], q[:, r], k[:, c], v[:, c], out[:, r], lse[:, r], (source, qs, ks),
                                       scale)
                dq[:, r] += bq
                dk[:, c] += bk
                dv[:, c] += bv
        return dq, dk, dv

    @abstractmethod
    def _fwd(self, q, k, v, pair, scale):
        """(out, lse) of one block pair; pair = (source, q span, k span) for its mask."""

    @abstractmethod
    def _bwd(self, dout, q, k, v, out, lse, pair, scale):
        """(dq, dk, dv) of one block pair."""


class MathBlocks(BlockKernel):
    """Plain torch: one block pair's scores in memory at a time (the GPU path, and the reference for the
    fused kernel). Elementwise work is in place: on CPU it, not the matmuls, is the cost. bf16 inputs
    are computed in fp32, as a flash kernel accumulates its softmax."""

    name = "math"

    @staticmethod
    def _probs(q, k, allowed, scale, lse=None):
        hkv = k.shape[0]
        p = (_row_groups(q, hkv) @ k.unsqueeze(1).transpose(-1, -2)).mul_(scale)
        p.masked_fill_(~allowed, float("-inf"))
        if lse is not None:  # backward: the final lse is finite on every row
            return p.sub_(_row_groups(lse, hkv)[..., None]).exp_(), None
        m = _safe(p.amax(-1))
        p.sub_(m[..., None]).exp_()
        return p, m

    def _fwd(self, q, k, v, pair, scale):
        q, k, v = q.float(), k.float(), v.float()
        p, m = self._probs(q, k, self._allowed(*pair), scale)
        denom = p.sum(-1)
        out = (p @ v.unsqueeze(1)) / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
        return out.flatten(0, 1), (m + denom.log()).flatten(0, 1)

    def _bwd(self, dout, q, k, v, out, lse, pair, scale):
        dout, q, k, v, out = dout.float(), q.float(), k.float(), v.float(), out.float()
        hkv = k.shape[0]
        p, _ = self._probs(q, k, self._allowed(*pair), scale, lse)
        dog = _row_groups(dout, hkv)
        dv = (p.transpose(-1, -2) @ dog).sum(1)
        ds = (dog @ v.unsqueeze(1).transpose(-1, -2)).sub_(_row_groups((dout * out).sum(-1), hkv)[..., None]).mul_(p)
        dq = (ds @ k.unsqueeze(1)).mul_(scale).flatten(0, 1)
        dk = (ds.transpose(-1, -2) @ _row_groups(q, hkv)).sum(1).mul_(scale)
        return dq, dk, dv


class FusedCPUBlocks(BlockKernel):
    """torch's fused CPU flash kernel (aten::_scaled_dot_product_flash_attention_for_cpu, the op behind
    scaled_dot_product_attention, which also returns the log-sum-exp) per block pair: a pair the mask
    fully allows runs unmasked, our own diagonal pair causal when its mask is the triangle, others with
    the mask as an additive bias of one pair's size. The kernel wants as many K/V heads as query heads,
    and reports lse 0 on rows with no key: both fixed here."""

    name = "fused-cpu"

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

    def _how(self, pair, dtype: torch.dtype) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
        """(causal, additive bias or None, rows with no key or None) that reproduce the pair's mask."""
        mode = self._visible(*pair)
        if isinstance(mode, str):
            return mode == "causal", None, None
        bias = torch.zeros(mode.shape, dtype=dtype, device=mode.device).masked_fill_(~mode, float("-inf"))
        return False, bias, ~mode.any(1)

    def _fwd(self, q, k, v, pair, scale):
        causal, bias, empty = self._how(pair, q.dtype)
        g = q.shape[0] // k.shape[0]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous()[None], _expand_kv(k, g), _expand_kv(v, g), 0.0, causal, attn_mask=bias, scale=scale)
        out, lse = out[0], lse[0]
        if empty is not None:
            out, lse = out.masked_fill(empty[None, :, None], 0.0), lse.masked_fill(empty[None], float("-inf"))
        return out, lse

    def _bwd(self, dout, q, k, v, out, lse, pair, scale):
        causal, bias, _ = self._how(pair, q.dtype)
        hkv, g = k.shape[0], q.shape[0] // k.shape[0]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous()[None], q.contiguous()[None], _expand_kv(k, g), _expand_kv(v, g),
            out.contiguous()[None], lse.contiguous()[None], 0.0, causal, attn_mask=bias, scale=scale)
        return dq[0], _row_groups(dk[0], hkv).sum(1), _row_groups(dv[0], hkv).sum(1)


class FlashCUDABlocks(MathBlocks):
    """torch's CUDA FlashAttention-2 kernel per block pair (aten::_scaled_dot_product_flash_attention and its
    backward, the ops behind scaled_dot_product_attention, which return and take the log-sum-exp): a pair the mask
    fully allows runs unmasked, our own diagonal pair causal; pairs with a mask of their own (padding spans), fp32
    inputs and head dims the kernel does not take run on the math kernel. The backward is given the final output
    (in the inputs' dtype) and log-sum-exp, as ring FlashAttention does. Opt-in: not yet run on a GPU here."""

    name = "flash-cuda"

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cuda" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention")

    @staticmethod
    def flash_ops():
        """(forward, backward): torch's CUDA flash ops, looked up per call (tests stand them in)."""
        aten = torch.ops.aten
        return aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward

    def _mode(self, pair, q: torch.Tensor) -> str | None:
        """"all" or "causal" when the flash kernel can run the pair, else None (the math kernel does)."""
        d = q.shape[-1]
        if q.dtype not in (torch.float16, torch.bfloat16) or d % 8 or d > 256:
            return None
        mode = self._visible(*pair)
        return mode if isinstance(mode, str) else None

    def _fwd(self, q, k, v, pair, scale):
        mode = self._mode(pair, q)
        if mode is None:
            return super()._fwd(q, k, v, pair, scale)
        g = q.shape[0] // k.shape[0]
        res = self.flash_ops()[0](
            q.contiguous()[None], _expand_kv(k, g), _expand_kv(v, g), 0.0,
            mode == "causal", False, scale=scale)
        return res[0][0], res[1][0]

    def _bwd(self, dout, q, k, v, out, lse, pair, scale):
        mode = self._mode(pair, q)
        if mode is None:
            return super()._bwd(dout, q, k, v, out, lse, pair, scale)
        hkv, g = k.shape[0], q.shape[0] // k.shape[0]
        none = torch.empty(0, dtype=torch.int64, device=q.device)  # no varlen offsets, no dropout RNG state
        dq, dk, dv = self.flash_ops()[1](
            dout.to(q.dtype).contiguous()[None], q.contiguous()[None], _expand_kv(k, g),
            _expand_kv(v, g), out.to(q.dtype).contiguous()[None], lse.float().contiguous()[None],
            none, none, q.shape[1], k.shape[1], 0.0, mode == "causal", none, none, scale=scale)
        return dq[0].float(), _row_groups(dk[0].float(), hkv).sum(1), _row_groups(dv[0].float(), hkv).sum(1)


KERNELS: dict[str, type[BlockKernel]] = {"math": MathBlocks, "fused-cpu": FusedCPUBlocks,
                                         "flash-cuda": FlashCUDABlocks}


def kernel_kind(kind: str, device: torch.device) -> str:
    """kind, with "auto" resolved: the fused flash kernel on a CPU, the math kernel elsewhere."""
    if kind == "auto":
        return "fused-cpu" if FusedCPUBlocks.available(device) else "math"
    return kind


def make_kernel(kind: str, q_layout: ShardLayout, k_layouts: dict, own, block: int,
                device: torch.device) -> BlockKernel:
    """kind: "auto" (fused on CPU, math elsewhere), "math", "fused-cpu" or "flash-cuda"."""
    return KERNELS[kernel_kind(kind, device)](q_layout, k_layouts, own, block, device)


class _LazyKernel:
    """A BlockKernel built on the first call, when the query head count (this rank's, under TP) fixes
    the block size."""

    def __init__(self, kind: str, q_layout: ShardLayout, k_layouts: dict, own, block: int | None,
                 device: torch.device) -> None:
        self.args = (kind, q_layout, k_layouts, own)
        self.block, self.device, self.kernel = block, device, None

    def get(self, q_heads: int) -> BlockKernel:
        if self.kernel is None:
            kind, q_layout, k_layouts, own = self.args
            fused = kernel_kind(kind, self.device) == "fused-cpu"
            block = (self.block or int(os.environ.get(BLOCK_ENV, 0))
                     or (FUSED_CPU_BLOCK_TOKENS if fused else block_tokens(q_heads)))
            self.kernel = make_kernel(kind, q_layout, k_layouts, own, block, self.device)
        return self.kernel


def _heads_first_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v [T, Hkv, D] -> [2, Hkv, T, D]: one contiguous tensor to send and to slice per head."""
    return torch.stack((k.transpose(0, 1), v.transpose(0, 1))).contiguous()


# -- the attention callables --------------------------------------------------------------------

try:  # FlashAttention's varlen kernel: what GPU training runs for packed documents
    from flash_attn import flash_attn_varlen_func
except ImportError:  # not installed (always so on CPU): SDPA per document
    flash_attn_varlen_func = None


class PackedAttention:
    """Degree-1 unit: per-document causal attention over contiguous local documents (the varlen
    kernel's semantics; cost sum of s_j^2, not (sum s_j)^2). CUDA in bf16/fp16 with flash_attn: one
    varlen call over the bin; otherwise one SDPA call per document, which runs flash kernels (CPU:
    torch's flash kernel; CUDA: flash or memory-efficient), so no score matrix is ever in memory."""

    def __init__(self, layout: ShardLayout) -> None:
        self.slices = layout.doc_slices
        self._cu: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            if self._cu is None:  # not run on this project's CPU-only test machine
                bounds = [0] + [b for _, b in self.slices]
                self._cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
                self._max = max(b - a for a, b in self.slices)
            return flash_attn_varlen_func(q, k.to(q.dtype), v.to(q.dtype), self._cu, self._cu, self._max, self._max,
                                          causal=True)
        if len(self.slices) == 1:
            return _packed_call(q, k, v)
        # split, not indexing: its backward is one cat, where each slice's would write a zero-filled full-size gradient
        sizes = [b - a for a, b in self.slices]
        return torch.cat([_packed_call(*qkv) for qkv in zip(q.split(sizes), k.split(sizes), v.split(sizes))])


def _packed_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One document's causal attention, [T, H, D] in and out."""
    return F.scaled_dot_product_attention(_bhtd(q), _bhtd(k), _bhtd(v), is_causal=True,
                                          enable_gqa=True)[0].transpose(0, 1)


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [1, H, T, D] for scaled_dot_product_attention."""
    return x.transpose(0, 1).unsqueeze(0)


class _GatherKV(torch.autograd.Function):
    """All-gather of stacked heads-first K/V [2, Hkv, T, D] -> [N, 2, Hkv, T, D]; backward
    reduce-scatters."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, peers: Peers) -> torch.Tensor:
        ctx.peers = peers
        return peers.all_gather(kv.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.peers.reduce_scatter(grad), None


class _SourcesAttentionFn(torch.autograd.Function):
    """Heads-first q [Hq, T, D] against K/V sources kvs[i] [2, Hkv, S_i, D] that the kernel knows as
    keys[i]; output [Hq, T, D]. Saves q, the sources, the output and its log-sum-exp, nothing T²:
    backward recomputes each block pair's scores. Sources are merged in fp32; autocast is off inside
    (every dtype here is explicit)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, kern: BlockKernel, keys: tuple, scale: float, *kvs: torch.Tensor):
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            for key, kv in zip(keys, kvs):
                if key in kern.members:
                    out, lse = merge_block(out, lse, *kern.forward(q, kv[0], kv[1], key, scale))
        out = out.to(q.dtype)
        ctx.kern, ctx.keys, ctx.scale = kern, keys, scale
        ctx.save_for_backward(q, out, lse, *kvs)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, out, lse, *kvs = ctx.saved_tensors
        kern, scale = ctx.kern, ctx.scale
        dout = dout.to(q.dtype).contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        grads = []
        with torch.autocast(q.device.type, enabled=False):
            for key, kv in zip(ctx.keys, kvs):
                if key not in kern.members:
                    grads.append(None)
                    continue
                bq, bk, bv = kern.backward(dout, q, kv[0], kv[1], out, lse, key, scale)
                dq += bq
                grads.append(torch.stack((bk, bv)).to(kv.dtype))
        return dq.to(q.dtype), None, None, None, *grads


class GatherAttention:
    """Context-parallel attention, all-gather form: gather every member's K/V, attend blockwise under
    the zigzag document mask, send dK/dV back to their owners in backward. The gathered K/V (N times
    the local K/V, per layer) is what backward keeps besides the local q and output."""

    def __init__(self, layouts: list[ShardLayout], peers: Peers, device: torch.device, kernel: str = "auto",
                 block: int | None = None) -> None:
        self.peers = peers
        self.keys = tuple(range(len(layouts)))
        self.kernel = _LazyKernel(kernel, layouts[peers.index], dict(enumerate(layouts)), peers.index, block, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        full = _GatherKV.apply(_heads_first_kv(k, v), self.peers)
        kern = self.kernel.get(q.shape[1])
        out = _SourcesAttentionFn.apply(q.transpose(0, 1).contiguous(), kern, self.keys, q.shape[-1] ** -0.5,
                                        *full.unbind(0))
        return out.transpose(0, 1)


class _RingAttentionFn(torch.autograd.Function):
    """Heads-first q [Hq, T, D], k and v [Hkv, T, D] in; output [Hq, T, D]. Blocks run in the inputs'
    precision (K/V travel in it); the softmax merge, dQ and the dK/dV accumulators that travel the ring
    are fp32, so that a bf16 ring rounds once per output, not once per block. Autocast is off inside:
    every dtype here is explicit."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: "RingAttention") -> torch.Tensor:
        kern = ring.kernel.get(q.shape[0])
        peers, n = ring.peers, ring.peers.degree
        out = torch.zeros_like(q, dtype=torch.float32)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        kv = torch.stack((k, v)).contiguous()
        with torch.autocast(q.device.type, enabled=False):
            for s in range(n):
                nxt = peers.ring(kv, _TAG_KV) if s < n - 1 else None  # next block flies while we compute
                member = (peers.index - s) % n
                if member in kern.members:
                    out, lse = merge_block(out, lse, *kern.forward(q, kv[0], kv[1], member, ring.scale))
                if nxt is not None:
                    kv = nxt.wait()[0]
        out = out.to(q.dtype)
        ctx.ring, ctx.kern = ring, kern
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring, kern = ctx.ring, ctx.kern
        peers, n = ring.peers, ring.peers.degree
        dout = dout.to(q.dtype).contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack((k, v)).contiguous()
        acc: Pending | None = None  # dK/dV accumulator of the block we hold, coming from the previous member
        with torch.autocast(q.device.type, enabled=False):
            for s in range(n):
                nxt = peers.ring(kv, _TAG_KV) if s < n - 1 else None
                member = (peers.index - s) % n
                dkv = torch.zeros_like(kv, dtype=torch.float32)
                if member in kern.members:
                    bq, bk, bv = kern.backward(dout, q, kv[0], kv[1], out, lse, member, ring.scale)
                    dq += bq
                    dkv[0], dkv[1] = bk, bv
                if acc is not None:
                    dkv = acc.wait()[0] + dkv
                acc = peers.ring(dkv, _TAG_DKV)  # after the last step this brings our own blocks' total home
                if nxt is not None:
                    kv = nxt.wait()[0]
        total = acc.wait()[0]
        return dq.to(q.dtype), total[0].to(k.dtype), total[1].to(v.dtype), None


class RingAttention:
    """Context-parallel attention that overlaps the K/V transfer of block s+1 with the compute of
    block s (forward and backward); members whose keys no query of ours sees are skipped. Nothing
    is precomputed per unit but the block pairs to run (ints): masks are built per block pair."""

    def __init__(self, layouts: list[ShardLayout], peers: Peers, head_dim: int, device: torch.device,
                 kernel: str = "auto", block: int | None = None) -> None:
        self.peers = peers
        self.scale = 1.0 / math.sqrt(head_dim)
        self.kernel = _LazyKernel(kernel, layouts[peers.index], dict(enumerate(layouts)), peers.index, block, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        heads_first = (x.transpose(0, 1).contiguous() for x in (q, k, v))
        return _RingAttentionFn.apply(*heads_first, self).transpose(0, 1)


class KVCache:
    """The K/V of a sliced unit's slices as every member sees them (gathered over the unit's members,
    [N, 2, Hkv, T, D]), per (slice, layer): later slices attend them as leaves, whose gradients
    accumulate the dK/dV that the slice's own backward then feeds into its graph (SlimPipe's KV cache
    and dK/dV accumulators)."""

    def __init__(self) -> None:
        self.outs: dict[tuple[int, int], torch.Tensor] = {}  # in the graph of the slice that made them
        self.leaves: dict[tuple[int, int], torch.Tensor] = {}  # detached copies later slices attend

    def put(self, j: int, layer: int, kv: torch.Tensor) -> torch.Tensor:
        self.outs[(j, layer)] = kv
        leaf = self.leaves[(j, layer)] = kv.detach().requires_grad_()
        return leaf

    def backward_roots(self, j: int, layers: range) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(tensors, gradients) to add to slice j's backward: the dK/dV later slices accumulated. Slice
        j's entries are dropped: in reverse slice order nothing needs them again."""
        roots, grads = [], []
        for layer in layers:
            out, leaf = self.outs.pop((j, layer), None), self.leaves.pop((j, layer), None)
            if out is not None and leaf.grad is not None:
                roots.append(out)
                grads.append(leaf.grad)
        return roots, grads


class SlicedAttention:
    """Attention of slice j of a sliced unit: its queries against the cached K/V of slices < j and the
    K/V of slice j, all-gathered over the unit's members (degree 1: nothing to move), blockwise under
    the per-document causal mask. `layouts[i][m]` is member m's layout of slice i."""

    def __init__(self, layouts: list[list[ShardLayout]], j: int, peers: Peers, cache: KVCache,
                 device: torch.device, kernel: str = "auto", block: int | None = None) -> None:
        n = peers.degree
        self.j, self.peers, self.cache = j, peers, cache
        self.keys = tuple((i, m) for i in range(j + 1) for m in range(n))
        self.kernel = _LazyKernel(kernel, layouts[j][peers.index], {(i, m): layouts[i][m] for i, m in self.keys},
                                  (j, peers.index), block, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        kv = _heads_first_kv(k, v)
        full = _GatherKV.apply(kv, self.peers) if self.peers.degree > 1 else kv[None]
        self.cache.put(self.j, layer, full)
        sources = [s for i in range(self.j) for s in self.cache.leaves[(i, layer)].unbind(0)] + list(full.unbind(0))
        kern = self.kernel.get(q.shape[1])
        out = _SourcesAttentionFn.apply(q.transpose(0, 1).contiguous(), kern, self.keys, q.shape[-1] ** -0.5,
                                        *sources)
        return out.transpose(0, 1)


def unit_attention(unit: Unit, layouts: list[ShardLayout], peers: Peers, impl: CPImpl, head_dim: int,
                   device: torch.device, kernel: str = "auto", block: int | None = None):
    """The attention callable a member runs for `unit` (layouts: one per member); `block`: rows of a
    block pair (default: block_tokens of the query heads). The unit's own kind (Unit.cp) wins over the
    replay's `impl`; ulysses > 1 runs Ulysses or 2D attention (planner/runtime/ulysses.py)."""
    if unit.degree == 1:
        return PackedAttention(layouts[0])
    kind = unit.cp or impl
    if unit.ulysses > 1:
        from planner.runtime.ulysses import UlyssesAttention  # it builds on this module: imported when used
        return UlyssesAttention(unit, layouts, peers, kind, head_dim, device, kernel, block)
    if kind == "ring":
        return RingAttention(layouts, peers, head_dim, device, kernel, block)
    return GatherAttention(layouts, peers, device, kernel, block)
