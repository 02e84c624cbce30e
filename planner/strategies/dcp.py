"""`dcp`: Megatron Dynamic Context Parallelism, re-implemented from REFERENCE §3 (not from its code).

One micro-batch at a time: documents sorted by length; degree need(s) = the smallest power of two
whose zigzag share fits C; work proxy w(s) = s²/need(s); buckets cut by work; the longest placeable
document of the first non-empty bucket opens a new aligned block of free ranks (preferred while
free ranks remain) or joins an open group of its degree whose members stay within C; stop once
loads are within δ of each other after the degree dropped below the first document's; then
`fill_empty_gpus` doubles the smallest groups until every rank is busy. Every rank runs the same
number of micro-batches; no offload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from costmodel.timing import CostModel
from planner.workload import GlobalBatch
from planner.plan import PlanError, Step, zigzag_tokens_per_rank
from planner.strategies.common import Draft, SeqTable, finalize, fit_degree

if TYPE_CHECKING:  # the container imports this module for DcpOptions
    from planner.strategies.options import PlanOptions


@dataclass(frozen=True)
class DcpOptions:
    """Knobs of Megatron's dynamic CP."""

    delta: float = 0.05  # stop rule: a micro-batch closes once group loads are within this share of the largest
    compat: bool = False  # mirror Megatron's quirks (stop-rule reference degree set once)


@dataclass
class _Group:
    size: int  # ranks (power of two)
    docs: list[int] = field(default_factory=list)  # indices into the SeqTable
    load: float = 0.0  # Σ w(s) of its documents
    tokens: int = 0  # zigzag tokens per member at its original degree
    start: int = 0  # first rank after layout


def _need(s: int, cm: CostModel) -> int:
    return fit_degree(s, 1, cm, 0.0, pow2=True)[0]  # 1F1B without slicing: n = 1


def _layout(groups: list[_Group]) -> None:
    """Aligned contiguous placement: power-of-two blocks laid out largest first stay aligned."""
    pos = 0
    for g in sorted(groups, key=lambda g: -g.size):
        g.start = pos
        pos += g.size


def _buckets(order: list[int], w: np.ndarray, needs: np.ndarray) -> list[list[int]]:
    """k = distinct degrees; cut the sorted list when the next item would pass 1.1 × Σw/k, keeping at
    least one item for every later bucket."""
    k = len(set(int(needs[i]) for i in order))
    target = float(w[order].sum()) / max(k, 1)
    out: list[list[int]] = [[]]
    acc = 0.0
    for pos, i in enumerate(order):
        left = len(order) - pos
        later = k - len(out)
        if out[-1] and acc + w[i] > 1.1 * target and later > 0 and left >= later:
            out.append([])
            acc = 0.0
        out[-1].append(i)
        acc += float(w[i])
    return out


def plan_step(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    G = cm.setup.hdp
    C = cm.capacity_tokens
    seqs = SeqTable.of(batch)
    lengths = seqs.lengths
    needs = np.array([_need(int(s), cm) for s in lengths])
    if needs.max() > G:
        i = int(np.argmax(needs))
        raise PlanError(f"dcp: a {int(lengths[i])}-token sequence needs an aligned group of {int(needs[i])} ranks "
                        f"at C = {C}, but the mesh has {G} HDP ranks")
    w = lengths.astype(float) ** 2 / needs
    share = np.array([zigzag_tokens_per_rank([int(x)], int(d)) for x, d in zip(lengths, needs)])
    remaining = [int(i) for i in np.argsort(-lengths, kind="stable")]
    drafts: list[Draft] = []
    mb = 0
    ref_degree = None
    while remaining:
        groups: list[_Group] = []
        g_size = np.zeros(G, dtype=np.int64)  # per open group (index = position in `groups`)
        g_load = np.zeros(G)
        g_tok = np.zeros(G, dtype=np.int64)
        used = 0
        if ref_degree is None or not opt.dcp.compat:
            ref_degree = int(needs[remaining[0]])  # compat: Megatron sets the stop-rule reference once
        placed: set[int] = set()
        # A document that fits neither option now never will in this micro-batch (free ranks and group
        # room only shrink), so each bucket is scanned once: a cursor per bucket.
        buckets = _buckets(remaining, w, needs)
        cursor = [0] * len(buckets)
        stop = False
        while not stop:
            cand = None
            for b, bucket in enumerate(buckets):
                while cursor[b] < len(bucket):
                    i = bucket[cursor[b]]
                    d = int(needs[i])
                    if used + d <= G:  # option B: a new aligned block of free ranks
                        cand = (i, None)
                        break
                    n = len(groups)
                    ok = (g_size[:n] == d) & (g_tok[:n] + share[i] <= C)
                    if ok.any():  # option A: the open group of this degree with the lowest load
                        k = int(np.flatnonzero(ok)[np.argmin(g_load[:n][ok])])
                        cand = (i, k)
                        break
                    cursor[b] += 1
                if cand:
                    cursor[b] += 1
                    break
            if cand is None:
                break
            i, k = cand
            if k is None:
                k = len(groups)
                groups.append(_Group(size=int(needs[i])))
                g_size[k] = needs[i]
                used += int(needs[i])
            g = groups[k]
            g.docs.append(i)
            g.load += float(w[i])
            g.tokens += int(share[i])
            g_load[k], g_tok[k] = g.load, g.tokens
            placed.add(i)
            if int(needs[i]) < ref_degree and used >= G:
                n = len(groups)
                stop = g_load[:n].max() - g_load[:n].min() <= opt.dcp.delta * g_load[:n].max()
        if not groups:
            raise PlanError("dcp: no document could be placed in a micro-batch")
        # fill_empty_gpus: double the smallest group until every rank is busy (cap G).
        while used < G:
            g = min((x for x in groups if x.size * 2 <= G and used + x.size <= G), key=lambda x: x.size, default=None)
            if g is None:
                break
            used += g.size
            g.size *= 2
        _layout(groups)
        for g in groups:
            drafts.append(Draft(ranks=tuple(range(g.start, g.start + g.size)),
                                pieces=[seqs.piece(i) for i in g.docs], sort_key=float(mb)))
        remaining = [i for i in remaining if i not in placed]
        mb += 1
    return finalize(batch, drafts, cm, G)
