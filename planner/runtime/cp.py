"""Attention for one unit: packed bins (per-document causal) and context parallelism over P2P.

A unit sharded over N HDP ranks splits each of its documents zigzag (REFERENCE 2.3): padded to a
multiple of 2N, cut into 2N chunks, member i keeps chunks i and 2N-1-i. Members talk with
isend/irecv on the world group only (no process group per unit, ByteScale's dynamic
communication). Two implementations, same numbers up to float summation order:

- `GatherAttention` ("allgather"): all-gather K/V by P2P in forward, reduce-scatter dK/dV in
  backward (a custom autograd.Function around the transfers; attention itself is autograd).
- `RingAttention` ("ring"): N steps, each computing one K/V block with online softmax while the
  next block is in flight; backward passes K/V and the dK/dV accumulators round the ring. A block
  runs on torch's fused CPU flash kernel (`FusedCPUBlocks`) or in plain torch (`MathBlocks`, the
  GPU path). Blocks are dense under a mask: about twice the FLOPs of a causal-aware kernel.

Padding tokens attend only to themselves (never seen by real tokens, labels ignored), so no
softmax row is empty."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from planner.plan import Piece, Unit
from planner.runtime.launch import CPImpl


# Message tags: gloo matches (peer, tag) in FIFO order, so K/V and dK/dV streams that are in
# flight at the same time must not share one. NCCL ignores tags; there both sides issue the
# streams in the same order, which is what NCCL's FIFO matching needs.
_TAG_KV, _TAG_DKV, _TAG_GATHER, _TAG_SCATTER = 1, 2, 3, 4


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


def attention_mask(q: ShardLayout, k: ShardLayout) -> torch.Tensor:
    """[Tq, Tk] bool, True where a query may attend a key: same document, key not later, both real
    tokens; padding queries see only themselves."""
    real = ((q.doc[:, None] == k.doc[None, :]) & (k.pos[None, :] <= q.pos[:, None])
            & q.valid[:, None] & k.valid[None, :])
    return real | (q.key[:, None] == k.key[None, :])


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


# -- attention implementations -----------------------------------------------------------------

def _bhtd(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [1, H, T, D] for scaled_dot_product_attention."""
    return x.transpose(0, 1).unsqueeze(0)


class PackedAttention:
    """Degree-1 unit: per-document causal attention over contiguous local documents (the varlen
    kernel's semantics; cost sum of s_j^2, not (sum s_j)^2)."""

    def __init__(self, layout: ShardLayout) -> None:
        self.slices = layout.doc_slices

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        outs = [F.scaled_dot_product_attention(_bhtd(q[a:b]), _bhtd(k[a:b]), _bhtd(v[a:b]), is_causal=True,
                                               enable_gqa=True)[0].transpose(0, 1) for a, b in self.slices]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class _GatherKV(torch.autograd.Function):
    """All-gather of stacked K/V [T, 2, Hkv, D] -> [N, T, 2, Hkv, D]; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, peers: Peers) -> torch.Tensor:
        ctx.peers = peers
        return peers.all_gather(kv.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.peers.reduce_scatter(grad), None


class GatherAttention:
    """Context-parallel attention, first-correct form: gather every member's K/V, attend with the
    zigzag document mask, send dK/dV back to their owners in backward."""

    def __init__(self, layouts: list[ShardLayout], peers: Peers, device: torch.device) -> None:
        me = layouts[peers.index]
        self.peers = peers
        self.mask = torch.cat([attention_mask(me, other) for other in layouts], dim=1).to(device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        full = _GatherKV.apply(torch.stack((k, v), dim=1), self.peers)
        n, t = full.shape[0], full.shape[1]
        kf = full[:, :, 0].reshape(n * t, *k.shape[1:])
        vf = full[:, :, 1].reshape(n * t, *v.shape[1:])
        return F.scaled_dot_product_attention(_bhtd(q), _bhtd(kf), _bhtd(vf), attn_mask=self.mask,
                                              enable_gqa=True)[0].transpose(0, 1)


# One ring block: attention of our queries to one member's keys, returning the block-normalised
# output and its log-sum-exp (-inf on rows the block does not reach), and the matching backward
# given the *final* output and log-sum-exp. Tensors are heads-first: q [Hq, T, D], k and v
# [Hkv, S, D]; `blocked` [T, S] is True where attention is not allowed.

def _row_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[Hq, T, ...] -> [Hkv, G, T, ...]: the query heads sharing each K/V head (GQA)."""
    return x.reshape(kv_heads, x.shape[0] // kv_heads, *x.shape[1:])


def _safe(x: torch.Tensor) -> torch.Tensor:
    """-inf -> 0, so that exp(-inf - x) is 0 and never nan."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


class MathBlocks:
    """Plain torch: scores are materialised per block (used on GPU, and the reference for the
    fused kernel). Elementwise work is in place: on CPU it, not the matmuls, is the cost. bf16
    inputs are computed in fp32, as a flash kernel accumulates its softmax."""

    name = "math"

    def __init__(self, blocked: dict[int, torch.Tensor]) -> None:
        self.blocked = blocked

    def _probs(self, q, k, member, scale, lse=None):
        hkv = k.shape[0]
        p = (_row_groups(q, hkv) @ k.unsqueeze(1).transpose(-1, -2)).mul_(scale)
        p.masked_fill_(self.blocked[member], float("-inf"))
        if lse is not None:  # backward: the final lse is finite on every row
            return p.sub_(_row_groups(lse, hkv)[..., None]).exp_(), None
        m = _safe(p.amax(-1))
        p.sub_(m[..., None]).exp_()
        return p, m

    def forward(self, q, k, v, member, scale):
        q, k, v = q.float(), k.float(), v.float()
        p, m = self._probs(q, k, member, scale)
        denom = p.sum(-1)
        out = (p @ v.unsqueeze(1)) / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
        return out.flatten(0, 1), (m + denom.log()).flatten(0, 1)

    def backward(self, dout, q, k, v, out, lse, member, scale):
        dout, q, k, v, out = dout.float(), q.float(), k.float(), v.float(), out.float()
        hkv = k.shape[0]
        p, _ = self._probs(q, k, member, scale, lse)
        dog = _row_groups(dout, hkv)
        dv = (p.transpose(-1, -2) @ dog).sum(1)
        ds = (dog @ v.unsqueeze(1).transpose(-1, -2)).sub_(_row_groups((dout * out).sum(-1), hkv)[..., None]).mul_(p)
        dq = (ds @ k.unsqueeze(1)).mul_(scale).flatten(0, 1)
        dk = (ds.transpose(-1, -2) @ _row_groups(q, hkv)).sum(1).mul_(scale)
        return dq, dk, dv


@dataclass(frozen=True)
class BlockShape:
    """How one block's mask reduces to a single unmasked kernel call. Zigzag makes most blocks of
    a one-document unit such a call (the standard zigzag ring decomposition): our own block is
    causal; an earlier member's block is every query against its first chunk ("cols"); a later
    member's is our second chunk's queries against all its keys ("rows")."""

    kind: Literal["causal", "rows", "cols", "masked"]
    a: int = 0  # rows / cols: the range [a, b) that takes part
    b: int = 0


def block_shape(allowed: torch.Tensor, real_rows: torch.Tensor, own: bool) -> BlockShape:
    """Classify a block's mask, exactly on the rows that matter: padding queries' outputs feed
    nothing (no real token sees a padding key, their labels are ignored), so they may attend
    anything; padding keys stay hidden from real queries, or the block stays "masked"."""
    t, s = allowed.shape
    real = allowed[real_rows]
    if own and t == s and torch.equal(real, torch.ones(t, s, dtype=torch.bool).tril()[real_rows]):
        return BlockShape("causal")
    for kind, any_axis in (("rows", 1), ("cols", 0)):
        hit = (real.any(1) if kind == "rows" else real.any(0)).nonzero().flatten()
        if hit.numel() == 0:
            continue
        a, b = int(hit[0]), int(hit[-1]) + 1
        want = torch.zeros(t, s, dtype=torch.bool)
        if kind == "rows":
            rows = torch.arange(t)[real_rows]  # hit indexes real rows: map back to block rows
            a, b = int(rows[a]), int(rows[b - 1]) + 1
            want[a:b] = True
        else:
            want[:, a:b] = True
        if torch.equal(real, want[real_rows]):
            return BlockShape(kind, a, b)
    return BlockShape("masked")


class FusedCPUBlocks:
    """torch's fused CPU flash kernel (aten::_scaled_dot_product_flash_attention_for_cpu, the op
    behind scaled_dot_product_attention, which also returns the log-sum-exp): no score matrix in
    memory. Blocks of a zigzag shape run unmasked on the part that takes part (`BlockShape`);
    others take the mask as an additive bias. The kernel wants as many K/V heads as query heads,
    and reports lse 0 on rows with no key: both fixed here."""

    name = "fused-cpu"

    def __init__(self, blocked: dict[int, torch.Tensor], real_rows: torch.Tensor, own: int) -> None:
        self.shapes = {j: block_shape(~b, real_rows, j == own) for j, b in blocked.items()}
        self.bias = {j: torch.zeros(b.shape, dtype=torch.float32).masked_fill_(b, float("-inf"))
                     for j, b in blocked.items() if self.shapes[j].kind == "masked"}
        self.empty_rows = {j: b.all(-1) for j, b in blocked.items()}

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

    @staticmethod
    def _fwd(q, k, v, scale, causal=False, bias=None):
        g = q.shape[0] // k.shape[0]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None], 0.0, causal,
            attn_mask=bias, scale=scale)
        return out[0], lse[0]

    @staticmethod
    def _bwd(dout, q, k, v, out, lse, scale, causal=False, bias=None):
        hkv, g = k.shape[0], q.shape[0] // k.shape[0]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout[None], q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None], out[None],
            lse[None], 0.0, causal, attn_mask=bias, scale=scale)
        return dq[0], _row_groups(dk[0], hkv).sum(1), _row_groups(dv[0], hkv).sum(1)

    def forward(self, q, k, v, member, scale):
        sh = self.shapes[member]
        if sh.kind == "causal":
            return self._fwd(q, k, v, scale, causal=True)
        if sh.kind == "cols":
            return self._fwd(q, k[:, sh.a:sh.b], v[:, sh.a:sh.b], scale)
        if sh.kind == "rows":
            out, lse = torch.zeros_like(q), q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
            out[:, sh.a:sh.b], lse[:, sh.a:sh.b] = self._fwd(q[:, sh.a:sh.b], k, v, scale)
            return out, lse
        out, lse = self._fwd(q, k, v, scale, bias=self.bias[member].to(q.dtype))
        return out, lse.masked_fill(self.empty_rows[member], float("-inf"))

    def backward(self, dout, q, k, v, out, lse, member, scale):
        sh = self.shapes[member]
        if sh.kind == "causal":
            return self._bwd(dout, q, k, v, out, lse, scale, causal=True)
        if sh.kind == "cols":
            dq, dks, dvs = self._bwd(dout, q, k[:, sh.a:sh.b], v[:, sh.a:sh.b], out, lse, scale)
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
            dk[:, sh.a:sh.b], dv[:, sh.a:sh.b] = dks, dvs
            return dq, dk, dv
        if sh.kind == "rows":
            r = slice(sh.a, sh.b)
            dqs, dk, dv = self._bwd(dout[:, r], q[:, r], k, v, out[:, r], lse[:, r], scale)
            dq = torch.zeros_like(q)
            dq[:, r] = dqs
            return dq, dk, dv
        return self._bwd(dout, q, k, v, out, lse, scale, bias=self.bias[member].to(q.dtype))


def merge_block(out: torch.Tensor, lse: torch.Tensor, blk: torch.Tensor, blk_lse: torch.Tensor):
    """Online softmax: fold one block's normalised output and log-sum-exp into the running ones, in the
    running ones' dtype (fp32 in the ring, whatever the blocks' precision)."""
    blk, blk_lse = blk.to(out.dtype), blk_lse.to(lse.dtype)
    new = torch.logaddexp(lse, blk_lse)
    ns = _safe(new)  # rows no block has reached yet stay 0 / -inf
    return out * torch.exp(lse - ns)[..., None] + blk * torch.exp(blk_lse - ns)[..., None], new


class _RingAttentionFn(torch.autograd.Function):
    """Heads-first q [Hq, T, D], k and v [Hkv, T, D] in; output [Hq, T, D]. Blocks run in the inputs'
    precision (K/V travel in it); the softmax merge, dQ and the dK/dV accumulators that travel the ring
    are fp32, so that a bf16 ring rounds once per output, not once per block. Autocast is off inside:
    every dtype here is explicit."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: "RingAttention") -> torch.Tensor:
        peers, n, kern = ring.peers, ring.peers.degree, ring.kernel
        out = torch.zeros_like(q, dtype=torch.float32)
        lse = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        kv = torch.stack((k, v)).contiguous()
        with torch.autocast(q.device.type, enabled=False):
            for s in range(n):
                nxt = peers.ring(kv, _TAG_KV) if s < n - 1 else None  # next block flies while we compute
                member = (peers.index - s) % n
                if member in ring.members:
                    out, lse = merge_block(out, lse, *kern.forward(q, kv[0], kv[1], member, ring.scale))
                if nxt is not None:
                    kv = nxt.wait()[0]
        out = out.to(q.dtype)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring = ctx.ring
        peers, n, kern = ring.peers, ring.peers.degree, ring.kernel
        dout = dout.to(q.dtype).contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack((k, v)).contiguous()
        acc: Pending | None = None  # dK/dV accumulator of the block we hold, coming from the previous member
        with torch.autocast(q.device.type, enabled=False):
            for s in range(n):
                nxt = peers.ring(kv, _TAG_KV) if s < n - 1 else None
                member = (peers.index - s) % n
                dkv = torch.zeros_like(kv, dtype=torch.float32)
                if member in ring.members:
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
    block s (forward and backward); blocks the zigzag mask leaves empty are skipped. The N block
    masks are built once per unit (N·T² bools: less than one block's float scores while N < 4·Hq)
    and reused by every layer, forward and backward."""

    def __init__(self, layouts: list[ShardLayout], peers: Peers, head_dim: int, device: torch.device,
                 kernel: str = "auto") -> None:
        me = layouts[peers.index]
        self.peers = peers
        self.scale = 1.0 / math.sqrt(head_dim)
        blocked = {}
        for j, other in enumerate(layouts):
            m = attention_mask(me, other)
            if bool(m.any()):
                blocked[j] = (~m).to(device)
        self.members = frozenset(blocked)  # members whose keys our queries reach
        if kernel == "auto":
            kernel = "fused-cpu" if FusedCPUBlocks.available(device) else "math"
        self.kernel = (FusedCPUBlocks(blocked, me.valid, peers.index) if kernel == "fused-cpu"
                       else MathBlocks(blocked))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        heads_first = (x.transpose(0, 1).contiguous() for x in (q, k, v))
        return _RingAttentionFn.apply(*heads_first, self).transpose(0, 1)


class KVCache:
    """The K/V of a sliced unit's slices as every member sees them (gathered over the unit's members),
    per (slice, layer): later slices attend them as leaves, whose gradients accumulate the dK/dV that
    the slice's own backward then feeds into its graph (SlimPipe's KV cache and dK/dV accumulators)."""

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
    K/V of slice j, all-gathered over the unit's members (degree 1: nothing to move), under the
    per-document causal mask. `layouts[i][m]` is member m's layout of slice i."""

    def __init__(self, layouts: list[list[ShardLayout]], j: int, peers: Peers, cache: KVCache,
                 device: torch.device) -> None:
        me = layouts[j][peers.index]
        self.j, self.peers, self.cache = j, peers, cache
        self.mask = torch.cat([attention_mask(me, other) for i in range(j + 1) for other in layouts[i]],
                              dim=1).to(device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        kv = torch.stack((k, v), dim=1)
        full = (_GatherKV.apply(kv, self.peers) if self.peers.degree > 1 else kv[None]).flatten(0, 1)
        self.cache.put(self.j, layer, full)
        kv_all = torch.cat([self.cache.leaves[(i, layer)] for i in range(self.j)] + [full])
        return F.scaled_dot_product_attention(_bhtd(q), _bhtd(kv_all[:, 0]), _bhtd(kv_all[:, 1]),
                                              attn_mask=self.mask, enable_gqa=True)[0].transpose(0, 1)


def unit_attention(unit: Unit, layouts: list[ShardLayout], peers: Peers, impl: CPImpl, head_dim: int,
                   device: torch.device, kernel: str = "auto"):
    """The attention callable a member runs for `unit` (layouts: one per member)."""
    if unit.degree == 1:
        return PackedAttention(layouts[0])
    if impl == "ring":
        return RingAttention(layouts, peers, head_dim, device, kernel)
    return GatherAttention(layouts, peers, device)
