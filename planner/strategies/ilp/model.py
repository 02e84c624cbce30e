"""The partition model of one step: items (sequences and DP buckets), cost tables, the linear model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from costmodel.timing import CostModel
from planner.plan import PlanError, zigzag_tokens_per_rank
from planner.strategies.common import SeqTable, long_degree, ratio_for_tokens

if TYPE_CHECKING:  # the container imports the ilp package for IlpOptions
    from planner.strategies.options import PlanOptions

SHARD_WASTE_MAX = 0.10  # a short sequence is sharded only if that costs ≤ 10% more rank-time than one rank
LONG_ITEMS_MAX = 1024  # long sequences (s > C) are exact items up to this many lengths (they are few; a
#                        bucket's mean misprices its longest member on a narrow group by 15% and more); beyond,
#                        this many buckets, and the plan written is the fastest simulated (see solve_step)
EXACT_ITEMS = 32  # with fewer long lengths, the longest short lengths fill up this many exact items
SAMPLE_MAX = 16  # a bucket's mean sharded time comes from at most this many members, spread over its range


# ---- items: sequences and DP buckets ---------------------------------------------------------------

def padding_buckets(lengths: np.ndarray, q: int) -> list[np.ndarray]:
    """FlexSP's bucketing (Eqs. 15–16): cut the sorted values (lengths, or times) into at most q
    consecutive runs with the least padding Σ (run max − s). DP over distinct values, vectorised over
    the cut point; returns index arrays into `lengths`, largest bucket first."""
    order = np.argsort(lengths, kind="stable")
    vals, first, cnt = np.unique(lengths[order], return_index=True, return_counts=True)
    u = len(vals)
    if u <= q:
        cuts = list(range(u + 1))
    else:
        n = np.concatenate([[0], np.cumsum(cnt)]).astype(float)
        s = np.concatenate([[0], np.cumsum(cnt * vals.astype(float))])
        j = np.arange(1, u + 1)
        f = n[j] * vals[j - 1] - s[j]  # one bucket over the first j values
        f = np.concatenate([[0.0], f])
        back = np.zeros((q, u + 1), dtype=np.int64)
        for level in range(1, q):
            g = f.copy()  # fewer buckets stay allowed
            for lo in range(1, u + 1, 256):  # blocks of j keep the i × j matrix small
                jj = np.arange(lo, min(u, lo + 255) + 1)
                i = np.arange(0, jj[-1])
                c = (f[i][:, None] + (n[jj][None, :] - n[i][:, None]) * vals[jj - 1][None, :]
                     - (s[jj][None, :] - s[i][:, None]))  # padding of the last bucket, values i..j−1
                c[i[:, None] >= jj[None, :]] = np.inf
                k = np.argmin(c, axis=0)
                better = c[k, np.arange(len(jj))] < g[jj]
                g[jj[better]] = c[k, np.arange(len(jj))][better]
                back[level, jj[better]] = k[better]
                back[level, jj[~better]] = -1
            back[level, 0] = -1
            f = g
        cuts, j_, level = [u], u, q - 1
        while j_ > 0 and level > 0:
            k = back[level, j_]
            if k >= 0:
                cuts.append(int(k))
                j_ = int(k)
            level -= 1
        if cuts[-1] != 0:
            cuts.append(0)
        cuts = sorted(set(cuts))
    out = [order[first[a]:first[b - 1] + cnt[b - 1]] for a, b in zip(cuts, cuts[1:])]
    return out[::-1]


@dataclass
class Items:
    """Model items: each long sequence alone, short ones in buckets (members as SeqTable indices)."""

    members: list[np.ndarray]  # per item, longest first
    count: np.ndarray  # b_i
    max_len: np.ndarray  # tokens of the longest member (sets D_min)
    mean_tokens: np.ndarray  # τ_i, rounded up to whole tokens (integral bin rows in every backend)


def make_items(seqs: SeqTable, cm: CostModel, q: int, price: "Pricer") -> Items:
    """Long sequences (s > C) are exact items, one per distinct length (all of them up to LONG_ITEMS_MAX
    lengths, else LONG_ITEMS_MAX buckets), and so are the longest short ones up to EXACT_ITEMS lengths in all: a few
    big members in a bucket would make its mean a poor guide. The other short ones form q buckets cut
    by the padding DP on their one-rank time (FlexSP pads tokens; time is what the makespan adds up)."""
    C = cm.capacity_tokens
    L = seqs.lengths
    long_idx = np.flatnonzero(L > C)
    long_idx = long_idx[np.argsort(-L[long_idx], kind="stable")]
    short_idx = np.flatnonzero(L <= C)
    short_idx = short_idx[np.argsort(-L[short_idx], kind="stable")]
    groups: list[np.ndarray] = []
    exact = np.unique(L[long_idx])
    if len(exact) <= LONG_ITEMS_MAX:
        spare = max(0, EXACT_ITEMS - len(exact))
        exact = np.union1d(exact, np.unique(L[short_idx])[::-1][:spare])
        groups += [np.flatnonzero(L == v) for v in exact[::-1]]  # equal lengths share one exact item
        short_idx = short_idx[~np.isin(L[short_idx], exact)]
    else:
        groups += [long_idx[b] for b in padding_buckets(L[long_idx], LONG_ITEMS_MAX)]
    if len(short_idx):
        groups += [short_idx[b] for b in padding_buckets(price.bin_s(L[short_idx]), q)]
    members = [g[np.argsort(-L[g], kind="stable")] for g in groups]
    return Items(members=members, count=np.array([len(m) for m in members], dtype=np.int64),
                 max_len=np.array([int(L[m[0]]) for m in members], dtype=np.int64),
                 mean_tokens=np.array([math.ceil(L[m].mean()) for m in members], dtype=float))


# ---- cost tables -----------------------------------------------------------------------------------

@dataclass
class Table:
    """Times of one member of each item on a group of each candidate size (inf: not allowed)."""

    sizes: np.ndarray  # candidate group sizes, ascending
    time_s: np.ndarray  # [items, sizes]
    gamma_s: float  # fixed cost of one C-token bin on a single rank
    copies: np.ndarray  # candidate groups per size


@dataclass(frozen=True)
class BinPrice:
    """How the model prices a C-token bin on one rank. The cost model is additive in a packed unit:
    time = F(n) + Σ_j A(s_j), F the parts priced by the unit's n tokens (GEMMs, memory-bound kernels,
    head, TP collectives, per-layer overheads), A those priced per document (attention core and its
    call set-up). The MILP is linear, so F is replaced by its chord between 1 and C tokens: a member
    costs A(s) + k·s and each bin γ, k = (F(C) − F(1)) / (C − 1), γ = F(1) − k. Exact for a full bin and
    a one-token one; a partial bin is off by F(n) − (γ + k·n). (The margin of a document in a full bin,
    used before, prices F by its slope near C: bins of many short documents came out up to 17% low.)"""

    slope_s_per_token: float  # k
    gamma_s: float  # γ: what a bin costs for existing
    doc_call_s: float  # the attention-call set-up one more document adds to a bin (per step, fwd + bwd)

    @classmethod
    def of(cls, cm: CostModel) -> "BinPrice":
        C = cm.capacity_tokens
        # one-document units of 1 and C tokens, and a 2-token unit as one and as two documents: the
        # overhead they differ by is the per-document call set-up
        u = cm.price_units(np.array([1.0, float(C), 2.0, 1.0, 1.0]), np.array([0, 1, 2, 3]))
        over = u.overhead_fwd_s + u.overhead_bwd_s
        call = float(over[3] - over[2])
        f1, fc = (float(x) for x in (u.total_s - u.attn_fwd_compute_s - u.attn_bwd_compute_s - call)[:2])
        k = (fc - f1) / max(1, C - 1)
        return cls(slope_s_per_token=k, gamma_s=f1 - k, doc_call_s=call)

    def member_s(self, lengths: np.ndarray, cm: CostModel) -> np.ndarray:
        """A(s) + k·s per length (one vectorised cost-model call)."""
        s = np.asarray(lengths, dtype=float)
        u = cm.price_units(s, np.arange(len(s)))
        return u.attn_fwd_compute_s + u.attn_bwd_compute_s + self.doc_call_s + self.slope_s_per_token * s


def node_local_sizes(hdp: int, per_node: int) -> set[int]:
    """Group sizes the layout keeps inside one node: on one node every size; otherwise a chain of
    divisors of the node (powers of two and the node itself), which packs from rank 0 without ever
    straddling a boundary. Other sizes are priced as crossing nodes (the simulator may find them
    cheaper, never dearer)."""
    if hdp <= per_node:
        return set(range(1, hdp + 1))
    chain = {d for d in (2**k for k in range(per_node.bit_length())) if per_node % d == 0}
    return chain | {per_node}


def sharded_time_s(s: int, d: int, cm: CostModel, inter_node: bool) -> float:
    """One sequence as its own unit over d ranks, offloading no more than the zigzag share needs."""
    r = ratio_for_tokens(zigzag_tokens_per_rank([s], d), cm) or 0.0
    return cm.unit_time_s([s], d, r, inter_node)


class Pricer:
    """Member times with caches: bins by BinPrice, priced once per distinct length; sharded units once
    per (length, size)."""

    def __init__(self, cm: CostModel) -> None:
        self.cm = cm
        self.sharded: dict[tuple[int, int], float] = {}
        self.binned: dict[int, float] = {}
        self.bin = BinPrice.of(cm)
        self.gamma_s = self.bin.gamma_s
        self.local = node_local_sizes(cm.setup.hdp, cm.setup.mesh.hdp_per_domain)

    def bin_s(self, lengths: np.ndarray) -> np.ndarray:
        s = np.asarray(lengths, dtype=np.int64)
        todo = [int(x) for x in np.unique(s) if int(x) not in self.binned]
        if todo:
            self.binned.update(zip(todo, self.bin.member_s(np.array(todo), self.cm).tolist()))
        return np.array([self.binned[int(x)] for x in s.tolist()], dtype=float)

    def shard_s(self, s: int, d: int) -> float:
        if (s, d) not in self.sharded:
            self.sharded[(s, d)] = sharded_time_s(s, d, self.cm, d not in self.local)
        return self.sharded[(s, d)]

    def prime(self, lengths: np.ndarray, sizes: np.ndarray) -> None:
        """Price every (length, size) pair not cached yet in one vectorised cost-model call (hundreds of
        exact long items on hundreds of sizes: ~10⁵ units), as shard_s would, one unit per pair."""
        todo = [(int(s), int(d)) for s in np.unique(lengths) for d in sizes if (int(s), int(d)) not in self.sharded]
        if not todo:
            return
        s_, d_ = np.array(todo, dtype=np.int64).T
        r = [ratio_for_tokens(zigzag_tokens_per_rank([s], d), self.cm) or 0.0 for s, d in todo]
        inter = np.array([d not in self.local for _, d in todo])
        t = self.cm.price_units(s_, np.arange(len(todo)), d_, np.array(r), inter).total_s
        self.sharded.update(zip(todo, t.tolist()))


def make_table(items: Items, seqs: SeqTable, cm: CostModel, opt: PlanOptions, price: Pricer) -> Table:
    hdp = cm.setup.hdp
    pow2 = opt.ilp.placement == "dcp_pow2"
    sizes = np.array([d for d in range(1, hdp + 1) if not pow2 or d & (d - 1) == 0])
    top = int(sizes[-1])
    gamma = price.gamma_s
    C = cm.capacity_tokens
    t = np.full((len(items.count), len(sizes)), np.inf)
    d_mins = [long_degree(int(s), cm, opt.offload)[0] for s in items.max_len]
    for i in np.flatnonzero(np.array(d_mins) > 1):  # sharded only: every size from d_min up is priced
        price.prime(seqs.lengths[items.members[i]], sizes[sizes >= d_mins[i]])
    for i, mem in enumerate(items.members):
        lens = seqs.lengths[mem]
        d_min = d_mins[i]
        sample = lens[np.unique(np.linspace(0, len(lens) - 1, min(len(lens), SAMPLE_MAX)).round().astype(int))]

        def mean_shard_s(d: int) -> float:
            if sample[0] == sample[-1]:  # an exact item (the common case: hundreds of them on hundreds of sizes)
                return price.shard_s(int(sample[0]), d)
            return float(np.mean([price.shard_s(int(s), d) for s in sample]))

        if d_min == 1:
            t[i, 0] = float(np.mean(price.bin_s(lens)))
            one_rank = t[i, 0] + gamma * items.mean_tokens[i] / C
        for k, d in enumerate(sizes):
            d = int(d)
            if d < max(2, d_min):
                continue
            t[i, k] = mean_shard_s(d)
            if d_min == 1 and d != top and d * t[i, k] > (1 + SHARD_WASTE_MAX) * one_rank:
                t[i, k] = np.inf
                # wider groups waste more still; only the whole mesh stays open (feasibility)
                k_top = len(sizes) - 1
                if k_top > k:
                    t[i, k_top] = mean_shard_s(top)
                break
    bad = np.flatnonzero(~np.isfinite(t).any(axis=1))
    if len(bad):
        s = int(items.max_len[bad[0]])
        need = long_degree(s, cm, opt.offload)[0]
        raise PlanError(f"ilp: a {s}-token sequence needs a group of {need} HDP ranks but the largest "
                        f"{'power-of-two ' if pow2 else ''}group on this mesh has {top}"
                        + ("; allow groups of any size (placement hdp_any)" if pow2 else ""))
    return with_copies(Table(sizes=sizes, time_s=t, gamma_s=gamma, copies=np.zeros(0, np.int64)), items, hdp)


def with_copies(tab: Table, items: Items, hdp: int) -> Table:
    """Candidate groups per size: as many as fit the mesh, and no more than sequences that may use them."""
    users = (np.isfinite(tab.time_s) * items.count[:, None]).sum(axis=0)
    return dataclasses.replace(tab, copies=np.minimum(hdp // tab.sizes, users).astype(np.int64))


def rank_time_s(items: Items, tab: Table, C: int) -> np.ndarray:
    """[items, sizes] ranks × time one member occupies (bins' fixed cost amortised over their tokens)."""
    bins = np.where(tab.sizes == 1, 1.0, 0.0)[None, :] * (tab.gamma_s * items.mean_tokens / C)[:, None]
    return tab.sizes[None, :] * tab.time_s + bins


def area_bound_s(items: Items, tab: Table, hdp: int, C: int) -> float:
    """Makespan bound: every member at its cheapest rank-time, spread evenly over the ranks."""
    return float(np.min(rank_time_s(items, tab, C), axis=1) @ items.count) / hdp


def prune(items: Items, tab: Table, hdp: int, C: int, incumbent_s: float) -> Table:
    """Drop placements no solution better than the incumbent can use (so the optimum is kept): a member
    that alone outlasts it, or that wastes so much rank-time over its cheapest size that the area bound
    would pass it."""
    work = rank_time_s(items, tab, C)
    waste = work - np.min(work, axis=1, keepdims=True)
    slack = (incumbent_s - area_bound_s(items, tab, hdp, C)) * hdp
    keep = (tab.time_s <= incumbent_s * (1 + 1e-9)) & (waste <= slack * (1 + 1e-9) + 1e-12)
    return with_copies(dataclasses.replace(tab, time_s=np.where(keep, tab.time_s, np.inf)), items, hdp)


# ---- the linear model, backend-neutral --------------------------------------------------------------

@dataclass
class LinearModel:
    """min x[objective] s.t. lo ≤ A·x ≤ hi, lb ≤ x ≤ ub, x_j integer where integer[j]. Time columns
    and rows are flagged so CP-SAT can turn seconds into integer ticks."""

    lb: list[float] = field(default_factory=list)
    ub: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    time_col: list[bool] = field(default_factory=list)
    rows: list[tuple[np.ndarray, np.ndarray, float, float, bool, float]] = field(default_factory=list)
    objective: int = 0

    def col(self, lb: float, ub: float, integer: bool, time_col: bool = False) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(integer)
        self.time_col.append(time_col)
        return len(self.lb) - 1

    def row(self, idx, val, lo: float, hi: float, time_row: bool = False, int_scale: float = 1.0) -> None:
        """int_scale: what CP-SAT multiplies a non-time row by to make its coefficients integers."""
        self.rows.append((np.asarray(idx, dtype=np.int64), np.asarray(val, dtype=float), lo, hi, time_row,
                          int_scale))

    @property
    def n(self) -> int:
        return len(self.lb)


@dataclass
class StepModel:
    """The MILP of one step and where its variables live."""

    lm: LinearModel
    group_size: np.ndarray  # d_g per candidate group
    u: np.ndarray  # column of u_g
    load: np.ndarray  # column of L_g
    bins: np.ndarray  # column of β_g (−1 when d_g > 1)
    x: dict[tuple[int, int], int]  # (item, group) -> column
    T: int


def build_model(items: Items, tab: Table, hdp: int, C: int, floor_s: float = 0.0) -> StepModel:
    """The MILP; floor_s is a proven lower bound on the makespan (T ≥ floor_s is a valid cut)."""
    lm = LinearModel()
    inf = math.inf
    t = tab.time_s
    t_ub = float(sum(items.count[i] * t[i][np.isfinite(t[i])].max() for i in range(len(items.count)))
                 + tab.gamma_s * (math.ceil(items.mean_tokens @ items.count / C) + len(items.count)))
    T = lm.col(0.0, t_ub, False, time_col=True)
    lm.objective = T
    size_of, kofs = [], []
    for k, d in enumerate(tab.sizes):
        size_of += [int(d)] * int(tab.copies[k])
        kofs += [k] * int(tab.copies[k])
    G = len(size_of)
    u = np.array([lm.col(0, 1, True) for _ in range(G)], dtype=np.int64)
    load = np.array([lm.col(0.0, t_ub, False, time_col=True) for _ in range(G)], dtype=np.int64)
    bins = np.array([lm.col(0, inf, True) if d == 1 else -1 for d in size_of], dtype=np.int64)
    x: dict[tuple[int, int], int] = {}
    per_group: list[list[tuple[int, float]]] = [[] for _ in range(G)]
    per_item: list[list[tuple[int, float]]] = [[] for _ in range(len(items.count))]  # (column, member time)
    kofs_ = np.array(kofs, dtype=np.int64)
    for i in range(len(items.count)):
        b = int(items.count[i])
        for g in map(int, np.flatnonzero(np.isfinite(t[i, kofs_]))):
            c = lm.col(0, b, True)
            x[(i, g)] = c
            per_group[g].append((i, c))
            per_item[i].append((c, float(t[i, kofs[g]])))
            lm.row([c, u[g]], [1.0, -b], -inf, 0.0)  # only formed groups run work
    for i in range(len(items.count)):  # every member of every item runs once
        cols = [c for c, _ in per_item[i]]
        lm.row(cols, np.ones(len(cols)), float(items.count[i]), float(items.count[i]))
    lm.row(u, np.array(size_of, dtype=float), -inf, float(hdp))  # ranks
    for i in np.flatnonzero(items.count == 1):  # a lone sequence ends by T wherever it runs (lifts the LP bound)
        cols = per_item[i]
        lm.row([T] + [c for c, _ in cols], [1.0] + [-v for _, v in cols], 0.0, inf, time_row=True)
    for g in range(G):
        idx = [c for _, c in per_group[g]]
        val = [t[i, kofs[g]] for i, _ in per_group[g]]
        if size_of[g] == 1:  # bins of ≤ C tokens (in units of C: keeps the matrix well scaled)
            lm.row([bins[g]] + idx, [1.0] + [-items.mean_tokens[i] / C for i, _ in per_group[g]], 0.0, inf,
                   int_scale=C)
            idx, val = idx + [bins[g]], val + [tab.gamma_s]
        lm.row([load[g]] + idx, [1.0] + [-v for v in val], 0.0, 0.0, time_row=True)  # L_g = group time
        lm.row([T, load[g]], [1.0, -1.0], 0.0, inf, time_row=True)
    lm.row([T] + list(load), [float(hdp)] + [-float(d) for d in size_of], 0.0, inf, time_row=True)
    if floor_s > 0:  # the configuration-LP bound: lifts the root bound the area argument stops at
        lm.row([T], [1.0], floor_s, inf, time_row=True)
    for g in range(G - 1):  # copies of one size are interchangeable: order them
        if size_of[g] == size_of[g + 1]:
            lm.row([u[g], u[g + 1]], [1.0, -1.0], 0.0, inf)
            lm.row([load[g], load[g + 1]], [1.0, -1.0], 0.0, inf, time_row=True)
    return StepModel(lm=lm, group_size=np.array(size_of, dtype=np.int64), u=u, load=load, bins=bins, x=x, T=T)
