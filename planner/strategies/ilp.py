"""Exact solvers for one step with pp = 1 (REFERENCE §4.1–4.2, decision 17): a MILP solved by CBC
(through pulp) or HiGHS (highspy), and the same model in CP-SAT (OR-Tools).

The model partitions the HDP ranks into disjoint groups for the whole step (FlexSP's MILP, priced
by our cost model) and puts every sequence on one group:

  items i    one sequence, or a DP bucket of short ones (b_i members; mean time of a member)
  groups g   candidate rank groups: size d_g in 1..hdp (or powers of two), copies k = 0, 1, ...
  u_g ∈ {0,1}   the group is formed           x_ig ∈ Z≥0  members of item i run on group g
  β_g ∈ Z≥0     C-token bins (d_g = 1)         L_g ≥ 0     group time (s);  T  makespan (s)

  min T  s.t.  Σ_g x_ig = b_i                    every sequence runs exactly once (token conservation)
               Σ_g d_g u_g ≤ hdp                 ranks
               x_ig ≤ b_i u_g                    only formed groups run work
               C β_g ≥ Σ_i τ_i x_ig             per-rank capacity: a rank's sequences fill β_g bins
               L_g = Σ_i t_i(d_g) x_ig + γ β_g   co-scheduling: all d_g members are busy for L_g
               T ≥ L_g ;  hdp·T ≥ Σ_g d_g L_g    (the second is implied by the rest; it lifts the LP bound)
               u and L non-increasing over the copies of one size (symmetry between identical groups)

x_ig exists only where d_g ≥ D_min(i) (the memory minimum after offload, REFERENCE 2.5). t_i(d) is
the cost model's unit time of a member sharded over d ranks (ring exposure and offload included),
and for d = 1 its marginal time inside a C-token bin, γ being the bin's fixed cost. Groups are laid
out contiguously; sizes of a divisor chain of the node (1, 2, 4, 8 on 8-GPU nodes) never cross a
node boundary, other sizes are priced as if they did. So T + gradient sync is the step time the
simulator reports, up to bucketing (members of a bucket differ from its mean), bin packing (best
fit may need more bins than ⌈tokens/C⌉) and odd-sized groups that land inside a node (cheaper).

Size reduction (REFERENCE 4.2): one exact item per distinct long length, and per the longest short
lengths up to EXACT_ITEMS; the other short sequences in `ilp_buckets` classes cut by FlexSP's
padding DP (on one-rank time); minimum-degree pruning; a short sequence is sharded only where it
wastes at most SHARD_WASTE_MAX rank-time, or over the whole mesh (keeps every instance feasible);
copies of a size capped by the sequences that may use them; placements pruned that no solution
better than the warm start can use. The warm start is the best of greedy partitions (hdp's degrees
at hdp's makespan, first fit over a ladder of targets, homogeneous sizes) after a local search
(moves and swaps off the busiest group).

Bounds and incumbents. The MILP's LP relaxation is only the area bound; where long sequences fill
wide groups two or three at a time, whole members leave idle time that it does not see (up to ≈6%
below the optimum on 64 ranks with small C), and HiGHS or CP-SAT rarely close that in 10 s. So before the
MILP, within shares of the time limit:
  1. the configuration LP (column generation, knapsack pricing, Farley's bound as the certificate),
     bisected over the makespan: the largest refuted makespan is a proven bound (config_bound);
  2. price and round: partitions from its configurations (LP rounding, a small cover MIP), completed
     greedily and polished (pool_partition);
  3. the integer configuration model (every configuration of the big members enumerated, whole
     group counts, small members fluid), bisected again: a bound where the number of groups matters,
     and partitions from its solutions (integer_search).
The MILP then starts from the best partition with T ≥ the best proven bound as a cut. A plan's gap
is (objective − bound) / objective with the largest proven bound: the area bound or the slowest
member, the two configuration bounds, or the solver's own; each is a bound on the same model.

A static partition cannot re-group ranks in the middle of a step (hdp can: a long unit on 16 ranks,
then bins on each), so on some batches hdp beats this "optimum"; the plan's meta reports both.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from costmodel.timing import CostModel
from planner.batch import GlobalBatch
from planner.plan import PlanError, Step, zigzag_tokens_per_rank
from planner.strategies.common import (Draft, PlanOptions, SeqTable, best_fit_pack, check_fits, finalize, long_degree,
                                       ratio_for_tokens)
from planner.strategies.hdp import plan_balance

SOLVERS = ("cbc", "highs", "cpsat")
SHARD_WASTE_MAX = 0.10  # a short sequence is sharded only if that costs ≤ 10% more rank-time than one rank
LONG_ITEMS_MAX = 48  # long sequences (s > C) stay exact items up to this many lengths; beyond, bucketed too
EXACT_ITEMS = 32  # with fewer long lengths, the longest short lengths fill up this many exact items
SAMPLE_MAX = 16  # a bucket's mean sharded time comes from at most this many members, spread over its range
BIN_GRID = 96  # lengths priced exactly for bins; more distinct lengths read a curve through this many
CHILD_GRACE_S = 30.0  # a solver process that outlives its limit by this much is killed (no solution)
REL_GAP = 1e-4  # every backend stops once proven within 0.01% of the optimum
LOCAL_SEARCH_ROUNDS = 400  # member moves or swaps that polish a partition
WARM_POLISH = 3  # greedy partitions polished by the local search
WARM_SIZES = (2, 3, 4, 5, 6, 8)  # group sizes of the homogeneous warm starts
WARM_TARGETS = (1.0, 1.005, 1.01, 1.02, 1.03, 1.05, 1.08, 1.12, 1.2, 1.35)  # greedy makespans × area bound
CPSAT_TICKS = 10**6  # CP-SAT needs integer times: the makespan bound is cut into this many ticks
PULP_IO_SHARE = 0.05  # of CBC's limit, kept for pulp writing the MPS and mst files and reading the solution


class SolverWarning(UserWarning):
    """The exact solver gave no plan: the warm start (or, without one, the heuristic's plan) was used."""


# ---- solver reports: a side channel from strategies to meta["solver"] ------------------------------

@dataclass(frozen=True)
class SolverInfo:
    """What the solver did for one step."""

    name: str  # backend: cbc | highs | cpsat
    status: str  # optimal | feasible (time limit, incumbent kept) | fallback (heuristic plan used)
    seconds: float  # wall time of the whole strategy call (model, warm start, solve, finalize)
    gap: float | None  # (objective − bound) / objective of the makespan (before the gradient sync)
    objective_s: float | None  # model step time: makespan + gradient sync
    bound_s: float | None  # best proven lower bound on objective_s within the model
    simulated_s: float | None  # step time of the emitted plan, from the simulator
    hdp_s: float | None  # step time of the `hdp` plan (the warm start's seed) on the same batch
    items: int = 0  # sequences or buckets in the model
    groups: int = 0  # candidate groups
    variables: int = 0
    note: str = ""  # why a fallback happened, or why the warm start was kept
    bound_from: str = ""  # what proved bound_s: area (or slowest member), configuration LP, integer
    #                       configurations, or solver

    def to_meta(self) -> dict:
        """Per-step record for the plan's meta (no wall times: plans stay byte-identical when optimal)."""
        d = dataclasses.asdict(self)
        d.pop("seconds")
        d.pop("bound_from")  # depends on which proof finished first: kept out of the (deterministic) plan
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in d.items()}


_REPORTS: contextvars.ContextVar[list[SolverInfo] | None] = contextvars.ContextVar("solver_reports", default=None)


@contextlib.contextmanager
def collect_solver_reports() -> Iterator[list[SolverInfo]]:
    """Collect the SolverInfo of every strategy call made inside the block (see solver_meta)."""
    reports: list[SolverInfo] = []
    token = _REPORTS.set(reports)
    try:
        yield reports
    finally:
        _REPORTS.reset(token)


def report_solver(info: SolverInfo) -> None:
    reports = _REPORTS.get()
    if reports is not None:
        reports.append(info)


def solver_meta(reports: list[SolverInfo], strategy: str, seconds: float) -> dict:
    """meta["solver"] of a plan: heuristics report themselves; solver steps give their worst status and gap."""
    if not reports:
        return {"name": strategy, "status": "heuristic", "seconds": round(seconds, 6), "gap": None}
    worst = max(reports, key=lambda r: ("optimal", "feasible", "fallback").index(r.status))
    gaps = [r.gap for r in reports if r.gap is not None]
    return {"name": reports[0].name, "status": worst.status, "seconds": round(seconds, 6),
            "gap": round(max(gaps), 9) if gaps else None, "steps": [r.to_meta() for r in reports]}


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
    lengths, else q buckets), and so are the longest short ones up to EXACT_ITEMS lengths in all: a few
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
        groups += [long_idx[b] for b in padding_buckets(L[long_idx], q)]
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


def bin_marginal_s(s: int, cm: CostModel) -> float:
    """A document's time inside a C-token bin: the bin's cost with it minus without it (a one-document
    filler of C − s tokens: attention is per document, so only the GEMM margin and its own attention
    count)."""
    C = cm.capacity_tokens
    if s >= C:
        return cm.unit_time_s([s], 1)
    return cm.unit_time_s([s, C - s], 1) - cm.unit_time_s([C - s], 1)


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
    """Member times with caches: exact per length while few distinct lengths are asked for, then a
    log-log curve over BIN_GRID lengths for bins (smooth in s; ≈0.1% from exact)."""

    def __init__(self, cm: CostModel) -> None:
        self.cm = cm
        self.sharded: dict[tuple[int, int], float] = {}
        self.curve: tuple[np.ndarray, np.ndarray] | None = None
        # γ: a one-token bin's time less the token's margin — what a bin costs for existing.
        self.gamma_s = cm.unit_time_s([1], 1) - bin_marginal_s(1, cm)
        self.local = node_local_sizes(cm.setup.hdp, cm.setup.hdp_per_node)

    def bin_s(self, lengths: np.ndarray) -> np.ndarray:
        s = np.asarray(lengths, dtype=np.int64)
        u, inv = np.unique(s, return_inverse=True)
        if len(u) <= BIN_GRID:
            return np.array([bin_marginal_s(int(x), self.cm) for x in u])[inv]
        if self.curve is None:
            grid = np.unique(np.round(np.geomspace(1, self.cm.capacity_tokens, BIN_GRID)).astype(np.int64))
            self.curve = np.log(grid), np.log([bin_marginal_s(int(x), self.cm) for x in grid])
        return np.exp(np.interp(np.log(s), *self.curve))

    def shard_s(self, s: int, d: int) -> float:
        if (s, d) not in self.sharded:
            self.sharded[(s, d)] = sharded_time_s(s, d, self.cm, d not in self.local)
        return self.sharded[(s, d)]


def make_table(items: Items, seqs: SeqTable, cm: CostModel, opt: PlanOptions, price: Pricer) -> Table:
    hdp = cm.setup.hdp
    pow2 = opt.placement == "dcp_pow2"
    sizes = np.array([d for d in range(1, hdp + 1) if not pow2 or d & (d - 1) == 0])
    top = int(sizes[-1])
    gamma = price.gamma_s
    C = cm.capacity_tokens
    t = np.full((len(items.count), len(sizes)), np.inf)
    for i, mem in enumerate(items.members):
        lens = seqs.lengths[mem]
        d_min = long_degree(int(items.max_len[i]), cm, opt.offload)[0]
        sample = lens[np.unique(np.linspace(0, len(lens) - 1, min(len(lens), SAMPLE_MAX)).round().astype(int))]
        if d_min == 1:
            t[i, 0] = float(np.mean(price.bin_s(lens)))
            one_rank = t[i, 0] + gamma * items.mean_tokens[i] / C
        for k, d in enumerate(sizes):
            d = int(d)
            if d < max(2, d_min):
                continue
            t[i, k] = float(np.mean([price.shard_s(int(s), d) for s in sample]))
            if d_min == 1 and d != top and d * t[i, k] > (1 + SHARD_WASTE_MAX) * one_rank:
                t[i, k] = np.inf
                # wider groups waste more still; only the whole mesh stays open (feasibility)
                k_top = len(sizes) - 1
                if k_top > k:
                    t[i, k_top] = float(np.mean([price.shard_s(int(s), top) for s in sample]))
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
    for i in range(len(items.count)):
        b = int(items.count[i])
        for g in range(G):
            ti = t[i, kofs[g]]
            if np.isfinite(ti):
                c = lm.col(0, b, True)
                x[(i, g)] = c
                per_group[g].append((i, c))
                lm.row([c, u[g]], [1.0, -b], -inf, 0.0)  # only formed groups run work
    for i in range(len(items.count)):  # every member of every item runs once
        cols = [c for (ii, _), c in x.items() if ii == i]
        lm.row(cols, np.ones(len(cols)), float(items.count[i]), float(items.count[i]))
    lm.row(u, np.array(size_of, dtype=float), -inf, float(hdp))  # ranks
    for i in np.flatnonzero(items.count == 1):  # a lone sequence ends by T wherever it runs (lifts the LP bound)
        cols = [(c, t[i, kofs[g]]) for (ii, g), c in x.items() if ii == i]
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


# ---- warm start: a greedy partition seeded by hdp ---------------------------------------------------

@dataclass
class Partition:
    """Groups of a solution: size and member counts per item."""

    sizes: list[int]
    counts: list[np.ndarray]  # per group, [items]


def group_time_s(d: int, counts: np.ndarray, items: Items, tab: Table, C: int) -> float:
    k = int(np.searchsorted(tab.sizes, d))
    nz = counts > 0
    busy = float(counts[nz] @ tab.time_s[nz, k]) if nz.any() else 0.0
    if d == 1 and nz.any():
        busy += tab.gamma_s * math.ceil(float(counts @ items.mean_tokens) / C - 1e-9)
    return busy


def greedy_partition(items: Items, tab: Table, hdp: int, C: int, target_s: float,
                     hint: np.ndarray | None = None, shard_above_s: float | None = None) -> Partition | None:
    """First-fit decreasing by area for a makespan target. Members to shard (longest first: those that
    cannot run on one rank, or would take longer there than shard_above_s, default the target) go to
    the fullest formed group they still finish on by the target, else open the smallest group that
    finishes them by then (or their `hint` degree), else join the group they finish soonest on; groups
    are then shrunk and merged (merge_groups); the ranks left become single-rank groups; the other
    members, longest first, go where they finish soonest."""
    t = tab.time_s
    n_items = len(items.count)
    allowed = np.isfinite(t)
    k_of = {int(d): k for k, d in enumerate(tab.sizes)}
    # "short": may run on one rank and finishes there by the target; the rest are sharded first
    cut = target_s if shard_above_s is None else shard_above_s
    short = (allowed[:, 0] & ((t[:, 0] <= cut) | ~allowed[:, 1:].any(axis=1))) if tab.sizes[0] == 1 \
        else np.zeros(n_items, bool)
    sizes: list[int] = []
    counts: list[np.ndarray] = []
    load: list[float] = []

    def add(g: int, i: int) -> None:
        counts[g][i] += 1
        load[g] = group_time_s(sizes[g], counts[g], items, tab, C)

    def soonest(i: int) -> int | None:
        here = [g for g in range(len(sizes)) if allowed[i, k_of[sizes[g]]]]
        return min(here, key=lambda g: load[g] + t[i, k_of[sizes[g]]]) if here else None

    longs = sorted((i for i in range(n_items) if not short[i]), key=lambda i: -float(t[i][allowed[i]].min()))
    for i in longs:  # first fit, as if ranks were unlimited; the repair below makes them fit
        ok = tab.sizes[allowed[i] & (tab.sizes > 1)]
        quick = ok[t[i, allowed[i] & (tab.sizes > 1)] <= target_s]
        want = int(quick[0]) if len(quick) else int(ok[-1])
        if hint is not None and hint[i] > 1:
            want = int(ok[min(len(ok) - 1, np.searchsorted(ok, hint[i]))])
        for _ in range(int(items.count[i])):
            fits = [g for g in range(len(sizes)) if allowed[i, k_of[sizes[g]]]
                    and load[g] + t[i, k_of[sizes[g]]] <= target_s]
            if fits:
                add(max(fits, key=lambda g: load[g]), i)
            else:
                sizes.append(want)
                counts.append(np.zeros(n_items, dtype=np.int64))
                load.append(0.0)
                add(len(sizes) - 1, i)
    sizes, counts = merge_groups(sizes, counts, tab, target_s)
    load = [group_time_s(d, c, items, tab, C) for d, c in zip(sizes, counts)]
    room = hdp - (1 if short.any() and max(sizes, default=0) < hdp else 0)  # a rank for the short members
    while sum(sizes) > room:  # too many ranks: dissolve the lightest group into the others
        g = min(range(len(sizes)), key=lambda g: load[g] * sizes[g])
        members = counts.pop(g)
        sizes.pop(g)
        load.pop(g)
        for i in np.repeat(np.arange(n_items), members):
            h = soonest(int(i))
            if h is None:
                return None
            add(h, int(i))
    for _ in range(hdp - sum(sizes) if short.any() else 0):
        sizes.append(1)
        counts.append(np.zeros(n_items, dtype=np.int64))
        load.append(0.0)
    g_size = np.array(sizes)
    cur = np.array(load)
    rest = sorted(((float(t[i, 0]), i) for i in range(n_items) if short[i] for _ in range(int(items.count[i]))),
                  reverse=True)
    for ti, i in rest:
        ki = np.searchsorted(tab.sizes, g_size)
        ti_g = t[i, ki] + np.where(g_size == 1, tab.gamma_s * items.mean_tokens[i] / C, 0.0)  # bins amortised
        g = int(np.argmin(cur + ti_g))
        if not np.isfinite(ti_g[g]):
            return None
        counts[g][i] += 1
        cur[g] += ti_g[g]
    keep = [g for g in range(len(sizes)) if counts[g].any()]
    return Partition(sizes=[sizes[g] for g in keep], counts=[counts[g] for g in keep])


def merge_groups(sizes: list[int], counts: list[np.ndarray], tab: Table,
                 target_s: float) -> tuple[list[int], list[np.ndarray]]:
    """Shrink every multi-rank group to the smallest size that still finishes its members by the
    target, then merge the pair of groups that frees the most ranks while any pair does (two members
    that each leave a group half idle often fill one group together)."""
    allowed = np.isfinite(tab.time_s)
    t0 = np.where(allowed, tab.time_s, 0.0)
    if not sizes:
        return sizes, counts
    c = np.array(counts)
    while True:
        load = c @ t0  # [groups, sizes]
        ok = ~((c > 0).astype(int) @ (~allowed).astype(int)).astype(bool) & (load <= target_s * (1 + 1e-12))
        need = np.where(ok.any(axis=1), tab.sizes[np.argmax(ok, axis=1)], np.array(sizes))
        sizes = [int(min(d, n)) for d, n in zip(sizes, need)]
        if len(sizes) < 2:
            break
        pair_ok = ok[:, None, :] & ok[None, :, :] & (load[:, None, :] + load[None, :, :] <= target_s * (1 + 1e-12))
        pair_need = np.where(pair_ok.any(axis=2), tab.sizes[np.argmax(pair_ok, axis=2)], 10**9)
        d = np.array(sizes)
        saving = d[:, None] + d[None, :] - pair_need
        np.fill_diagonal(saving, 0)
        a, b = np.unravel_index(np.argmax(saving), saving.shape)
        if saving[a, b] <= 0:
            break
        c[a] += c[b]
        sizes[a] = int(pair_need[a, b])
        c = np.delete(c, b, axis=0)
        del sizes[b]
    return sizes, list(c)


def partition_to_vector(p: Partition, sm: StepModel, items: Items, tab: Table, C: int) -> np.ndarray | None:
    """Column values of a partition; None when it needs more copies of a size than the model has."""
    x = np.zeros(sm.lm.n)
    loads = [group_time_s(d, c, items, tab, C) for d, c in zip(p.sizes, p.counts)]
    for d in sorted(set(p.sizes)):
        mine = sorted((g for g in range(len(p.sizes)) if p.sizes[g] == d), key=lambda g: -loads[g])
        slots = np.flatnonzero(sm.group_size == d)
        if len(mine) > len(slots):
            return None
        for g, col in zip(mine, slots):
            x[sm.u[col]] = 1
            x[sm.load[col]] = loads[g]
            if d == 1:
                x[sm.bins[col]] = math.ceil(float(p.counts[g] @ items.mean_tokens) / C - 1e-9)
            for i in np.flatnonzero(p.counts[g]):
                if (int(i), int(col)) not in sm.x:
                    return None
                x[sm.x[(int(i), int(col))]] = p.counts[g][i]
    x[sm.T] = max(loads, default=0.0)
    return x


def makespan_s(p: Partition, items: Items, tab: Table, C: int) -> float:
    return max((group_time_s(d, c, items, tab, C) for d, c in zip(p.sizes, p.counts)), default=0.0)


def improve(p: Partition, items: Items, tab: Table, C: int, rounds: int = LOCAL_SEARCH_ROUNDS) -> Partition:
    """Local search on the busiest group: move one of its members to the group where it lands lightest,
    or, where no move helps, swap one of its members with one of another group's; each step lowers the
    larger of the two loads it touches (a strict improvement of the pair, so it terminates)."""
    if not p.sizes:
        return p
    sizes = np.array(p.sizes)
    k = np.searchsorted(tab.sizes, sizes)
    c = np.array(p.counts)
    t = tab.time_s[:, k].T  # [groups, items]
    one = sizes == 1
    busy = np.array([float(c[g][c[g] > 0] @ t[g][c[g] > 0]) for g in range(len(sizes))])
    tok = c @ items.mean_tokens

    def load(b: np.ndarray, tk: np.ndarray, m: np.ndarray) -> np.ndarray:
        return b + np.where(m, tab.gamma_s * np.ceil(np.maximum(tk, 0) / C - 1e-9), 0.0)

    def shift(i: int, src: int, dst: int) -> None:  # one member of item i from group src to dst
        c[src, i] -= 1
        c[dst, i] += 1
        busy[src] -= t[src, i]
        busy[dst] += t[dst, i]
        tok[src] -= items.mean_tokens[i]
        tok[dst] += items.mean_tokens[i]

    for _ in range(rounds):
        cur = load(busy, tok, one)
        g = int(np.argmax(cur))
        best = None
        for i in np.flatnonzero(c[g]):
            after_g = load(busy[g:g + 1] - t[g, i], tok[g:g + 1] - items.mean_tokens[i], one[g:g + 1])[0]
            after_h = load(busy + t[:, i], tok + items.mean_tokens[i], one)
            after_h[g] = np.inf
            h = int(np.argmin(after_h))
            worst = max(after_g, after_h[h])
            if worst < cur[g] - 1e-9 and (best is None or worst < best[0]):
                best = (worst, i, h)
        j = None
        if best is None:
            best, j = best_swap(g, c, t, busy, tok, cur, one, load, items.mean_tokens)
            if best is None:
                break
        _, i, h = best
        shift(i, g, h)
        if j is not None:
            shift(j, h, g)
    keep = np.flatnonzero(c.any(axis=1))
    return Partition([int(sizes[g]) for g in keep], [c[g] for g in keep])


def best_swap(g: int, c: np.ndarray, t: np.ndarray, busy: np.ndarray, tok: np.ndarray, cur: np.ndarray,
              one: np.ndarray, load, tau: np.ndarray) -> tuple[tuple[float, int, int] | None, int | None]:
    """The swap of a member i of group g with a member j of another group h that leaves the lower
    max(load g, load h), if below g's load now: ((that max, i, h), j), or (None, None)."""
    mine = np.flatnonzero(c[g])
    if not len(mine):
        return None, None
    with np.errstate(invalid="ignore"):
        # [i, j]: g gives i, takes j;  [i, h, j]: h takes i, gives j
        g_busy = busy[g] - t[g, mine][:, None] + t[g][None, :]
        g_tok = tok[g] - tau[mine][:, None] + tau[None, :]
        new_g = load(g_busy, g_tok, np.full(g_busy.shape, one[g]))
        h_busy = busy[None, :, None] + t.T[mine][:, :, None] - t[None, :, :]
        h_tok = tok[None, :, None] + tau[mine][:, None, None] - tau[None, None, :]
        new_h = load(h_busy, h_tok, np.broadcast_to(one[None, :, None], h_busy.shape))
        worst = np.maximum(new_g[:, None, :], new_h)
    ok = (c[None, :, :] > 0) & (mine[:, None, None] != np.arange(c.shape[1])[None, None, :])
    ok[:, g, :] = False
    worst = np.where(ok & np.isfinite(worst), worst, np.inf)
    a, h, j = np.unravel_index(int(np.argmin(worst)), worst.shape)
    if not worst[a, h, j] < cur[g] - 1e-9:
        return None, None
    return (float(worst[a, h, j]), int(mine[a]), int(h)), int(j)


def warm_start(items: Items, tab: Table, hdp: int, C: int, hint: np.ndarray, hdp_makespan_s: float) -> Partition | None:
    """The best greedy partition after local search: hdp's degrees (and none) at hdp's makespan, first
    fit over a ladder of targets above the area bound (the greedy is not monotone in its target), and
    homogeneous group sizes; the WARM_POLISH best are polished (the search reorders them)."""
    area = area_bound_s(items, tab, hdp, C)
    tries = [(hdp_makespan_s, hint, None), (hdp_makespan_s, None, None)]
    tries += [(area * f, None, area * f * cut) for f in WARM_TARGETS for cut in (1.0, 0.5)]
    for d in WARM_SIZES:  # FlexSP's homogeneous starts: every sharded member on groups of one size
        tries += [(area * f, np.full(len(items.count), d), area * f / 2) for f in (1.01, 1.03)]
    found = [p for p in (greedy_partition(items, tab, hdp, C, target, h, cut) for target, h, cut in tries) if p]
    found.sort(key=lambda p: makespan_s(p, items, tab, C))
    polished = [improve(p, items, tab, C) for p in found[:WARM_POLISH]]
    return min(polished, key=lambda p: makespan_s(p, items, tab, C), default=None)


# ---- a stronger bound: the configuration LP (column generation) -------------------------------------
#
# The MILP's LP relaxation is the area bound: it lets a group be "half formed" and a long member be
# spread over many groups, so the idle time that whole members leave in a group is free. On meshes
# where many long sequences need wide groups, that idle time is the gap (up to ≈6% on 64 ranks, C ≈ 6.6K).
# The configuration LP (Gilmore–Gomory) prices whole groups instead: for a makespan T, a configuration
# is a group size d and the members it runs, with load ≤ T. Long ("exact") members are counted whole;
# members that are small at that size (t < T·FLUID_SHARE) are fluid: they may fill the idle rank-time
# of configurations of that size, or ranks of their own, at their exact rank-time. So for one T:
#
#   min Σ_c d_c λ_c + Σ_k R_k   s.t.  Σ_c a_ic λ_c + Σ_k z_ik ≥ b_i                   (y_i)
#                                     Σ_{c∈k} d_k (T − ℓ_c) λ_c + T R_k ≥ Σ_i d_k t_ik z_ik  (μ_k)
#
# a relaxation of "some partition has makespan ≤ T" (a group's members split into its configuration
# and its fluid part; single ranks count bins by their amortised cost, ceil ≥ linear). If its value
# exceeds hdp, no partition reaches T. Columns come from a bounded knapsack per size (weights rounded
# down on a grid of T/KNAP_GRID, which only enlarges the set of configurations), and the refutation is
# certified by Farley's bound: for any duals y, μ ≥ 0 feasible for the z and R columns, Σ b_i y_i / ρ
# is a lower bound on the LP's value, ρ being the largest reduced ratio any configuration attains
# (at least 1). A bisection over T between the area bound and the incumbent keeps the largest refuted T.

FLUID_SHARE = 1 / 128  # a member shorter than T/128 at a size is fluid there; longer ones count whole
KNAP_GRID = 4096  # knapsack capacity steps per T (rounding down loses < T/4096 per whole member)
PRICE_BATCH = 4  # partial pricing: a round stops after this many improving configurations ...
FULL_PRICING = 4  # ... except every 4th round, which prices every size (and checks Farley's bound)
# The three phases before the MILP take at most these shares of the budget each (they stop sooner
# once their bisection closes), so the MILP keeps at least half of it.
BOUND_SHARE = 0.25  # the configuration-LP bound
POOL_SHARE = 0.1  # partitions assembled from its configurations
INT_SHARE = 0.15  # the integer configuration bound (and its partitions)
BISECT_TOL = 1e-3  # a bisection stops within 0.1% of the makespan it last failed to refute
INT_TOL = 2.5e-3  # the integer model's bisection (each step a MIP) stops within 0.25%


def bin_weights(items: Items, tab: Table, C: int) -> np.ndarray:
    """[items, sizes] a member's share of a group's load: its time, plus on single ranks the bin cost
    its tokens amortise (a rank's bins cost γ·⌈tokens/C⌉ ≥ γ·tokens/C)."""
    w = tab.time_s.copy()
    if len(tab.sizes) and tab.sizes[0] == 1:
        w[:, 0] = w[:, 0] + tab.gamma_s * items.mean_tokens / C
    return w


def knapsack(weights: np.ndarray, values: np.ndarray, counts: np.ndarray, cap: int) -> np.ndarray:
    """Bounded knapsack, exact on integer weights: the counts a (0 ≤ a ≤ counts) of largest Σ values·a
    with Σ weights·a ≤ cap. Binary splitting of the counts, one vectorised 0/1 step per piece."""
    f = np.zeros(cap + 1)
    steps: list[tuple[int, int, int, np.ndarray]] = []
    for j in range(len(weights)):
        left, k = int(counts[j]), 1
        while left > 0:
            m = min(k, left)
            left -= m
            k *= 2
            w = int(weights[j]) * m
            if w > cap:
                break
            cand = f[:cap + 1 - w] + values[j] * m  # from the values before this piece
            take = cand > f[w:]  # take[c − w]: the piece is in the best load c
            np.maximum(f[w:], cand, out=f[w:])
            steps.append((j, m, w, take))
    c = int(np.argmax(f))
    a = np.zeros(len(weights), dtype=np.int64)
    for j, m, w, take in reversed(steps):
        if c >= w and take[c - w]:
            a[j] += m
            c -= w
    return a


class MasterLP:
    """A small LP, min c·x s.t. row_lo ≤ A·x, x ≥ 0, grown by columns, with row duals. HiGHS through
    highspy, or GLOP through OR-Tools where OR-Tools is (or will be) the process's library (see solve)."""

    def __init__(self, row_lo: np.ndarray, engine: str) -> None:
        self.engine = engine
        self.m = len(row_lo)
        if engine == "highs":
            import highspy

            self.h = highspy.Highs()
            self.h.setOptionValue("output_flag", False)
            self.h.setOptionValue("random_seed", 0)
            inf = highspy.kHighsInf
            self.h.addRows(self.m, np.asarray(row_lo, float), np.full(self.m, inf), 0, np.zeros(0, np.int32),
                           np.zeros(0, np.int32), np.zeros(0))
        else:
            from ortools.linear_solver import pywraplp

            self.s = pywraplp.Solver.CreateSolver("GLOP")
            self.rows = [self.s.Constraint(float(lo), self.s.infinity()) for lo in row_lo]
            self.obj = self.s.Objective()
            self.obj.SetMinimization()

    def add(self, cost: float, idx: np.ndarray, val: np.ndarray) -> None:
        if self.engine == "highs":
            inf = 1e30
            self.h.addCol(float(cost), 0.0, inf, len(idx), np.asarray(idx, np.int32), np.asarray(val, float))
        else:
            v = self.s.NumVar(0.0, self.s.infinity(), "")
            for i, a in zip(idx, val):
                self.rows[int(i)].SetCoefficient(v, float(a))
            self.obj.SetCoefficient(v, float(cost))

    def solve(self) -> tuple[float, np.ndarray] | None:
        """(objective, row duals ≥ 0) or None when the LP did not solve."""
        if self.engine == "highs":
            import highspy

            self.h.run()
            if self.h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                return None
            return self.h.getInfo().objective_function_value, np.maximum(0.0, np.array(self.h.getSolution().row_dual))
        from ortools.linear_solver import pywraplp

        if self.s.Solve() != pywraplp.Solver.OPTIMAL:
            return None
        return self.obj.Value(), np.maximum(0.0, np.array([r.dual_value() for r in self.rows]))

    def primal(self) -> np.ndarray:
        """Column values of the last solve, in the order the columns were added."""
        if self.engine == "highs":
            return np.array(self.h.getSolution().col_value)
        return np.array([v.solution_value() for v in self.s.variables()])


def lp_engine(backend: str) -> str:
    """highspy and OR-Tools cannot share a process (see solve): use the one already loaded, else the
    backend's own (GLOP for CP-SAT, HiGHS otherwise)."""
    loaded = {m.split(".")[0] for m in list(sys.modules)}
    if "highspy" in loaded:
        return "highs"
    if "ortools" in loaded or backend == "cpsat":
        return "glop"
    return "highs"


@dataclass
class ConfigBound:
    """Result of the configuration-LP bisection."""

    bound_s: float  # every partition of the model has makespan ≥ this (≥ the `lo` it started from)
    columns: list[tuple[int, np.ndarray]]  # configurations seen: (size index, member counts)
    refuted: int = 0  # makespans refuted
    tested: int = 0  # makespans tested


class ConfigLP:
    """The configuration LP of one model for a makespan T (see the section's comment)."""

    def __init__(self, items: Items, tab: Table, hdp: int, C: int, engine: str) -> None:
        self.items, self.tab, self.hdp, self.C, self.engine = items, tab, hdp, C, engine
        self.w = bin_weights(items, tab, C)
        self.b = items.count.astype(float)
        self.d = tab.sizes.astype(float)
        self.pool: dict[tuple[int, bytes], tuple[int, np.ndarray]] = {}

    def load(self, k: int, a: np.ndarray) -> float:
        nz = a > 0
        return float(self.w[nz, k] @ a[nz])

    def remember(self, k: int, a: np.ndarray) -> None:
        self.pool.setdefault((int(k), a.tobytes()), (int(k), a.copy()))

    def refutes(self, T: float, deadline: float) -> bool:
        """True only when proven: no partition of the model has makespan ≤ T."""
        return self.run(T, deadline, to_optimum=False)[0]

    def run(self, T: float, deadline: float, to_optimum: bool) -> tuple[bool, list[tuple[int, np.ndarray, float]]]:
        """Column generation at makespan T: (refuted, the configurations with their LP values). Stops
        as soon as the LP fits the mesh unless to_optimum (then it prices on: the columns and values
        are those of the cheapest fractional cover, which pool_partition rounds)."""
        n, K = len(self.b), len(self.d)
        w, d = self.w, self.d
        ok = np.isfinite(w) & (w <= T)
        if not ok.any(axis=1).all():
            return True, []  # some member outlasts T on every size it may use
        fluid = ok & (w < T * FLUID_SHARE)
        exact = ok & ~fluid
        eps = T / KNAP_GRID
        grid = np.where(exact, np.floor(np.where(exact, w, 0.0) / eps), 0.0).astype(np.int64)
        lp = MasterLP(np.concatenate([self.b, np.zeros(K)]), self.engine)
        for k in range(K):  # ranks of fluid members only
            lp.add(1.0, np.array([n + k]), np.array([T]))
        for i, k in zip(*np.nonzero(fluid)):
            lp.add(0.0, np.array([i, n + k]), np.array([1.0, -d[k] * w[i, k]]))

        configs: list[tuple[int, np.ndarray]] = []
        first = K + int(fluid.sum())  # columns before the configurations

        def column(k: int, a: np.ndarray) -> None:
            nz = np.flatnonzero(a)
            lp.add(d[k], np.concatenate([nz, [n + k]]), np.concatenate([a[nz], [d[k] * (T - self.load(k, a))]]))
            configs.append((k, a))

        def values() -> list[tuple[int, np.ndarray, float]]:
            x = lp.primal()[first:]
            return [(k, a, float(v)) for (k, a), v in zip(configs, x) if v > 1e-9]

        for k, a in self.pool.values():  # configurations seen before that still fit the grid
            nz = a > 0
            if ok[nz, k].all() and int(np.floor(w[nz, k] / eps) @ a[nz]) <= KNAP_GRID:
                column(k, a)
        for i in np.flatnonzero(~fluid.any(axis=1)):  # a member alone, so that the LP is feasible
            k = int(np.flatnonzero(exact[i])[np.argmin((d * w[i])[exact[i]])])
            a = np.zeros(n, dtype=np.int64)
            a[i] = 1
            column(k, a)
        last = np.full(K, np.inf)  # each size's ratio when last priced: the likeliest sizes go first
        rounds = 0
        while time.perf_counter() < deadline:
            res = lp.solve()
            if res is None:
                return False, []
            value, dual = res
            if value <= self.hdp * (1 + 1e-9) and not to_optimum:
                return False, []  # the relaxation fits: T stands
            mu = np.minimum(dual[n:], 1.0 / T)  # feasible for the R columns
            y = dual[:n].copy()  # feasible for the z columns
            for i, k in zip(*np.nonzero(fluid)):
                y[i] = min(y[i], mu[k] * d[k] * w[i, k])
            rho, found, full = 1.0, [], rounds % FULL_PRICING == 0
            rounds += 1
            for k in np.argsort(-last, kind="stable"):
                if len(found) >= PRICE_BATCH and not full:
                    break  # partial pricing: enough columns for this round
                v = y - mu[k] * d[k] * np.where(exact[:, k], w[:, k], 0.0)
                J = np.flatnonzero(exact[:, k] & (v > 0))
                if not len(J):
                    ratio = mu[k] * T  # the empty configuration
                else:
                    a = np.zeros(n, dtype=np.int64)
                    a[J] = knapsack(grid[J, k], v[J], self.items.count[J], KNAP_GRID)
                    ratio = (float(v @ a) + mu[k] * d[k] * T) / d[k]
                    if ratio > 1 + 1e-7 and a.any():
                        found.append((k, a))
                rho, last[k] = max(rho, ratio), ratio
            else:  # every size priced: Farley's bound holds
                if float(self.b @ y) / rho > self.hdp * (1 + 1e-9):
                    return True, []  # it exceeds the mesh
                if not found:
                    return False, values()
            for k, a in found:
                self.remember(k, a)
                column(k, a)
        return False, []


def config_bound(items: Items, tab: Table, hdp: int, C: int, lo: float, hi: float, deadline: float,
                 engine: str) -> ConfigBound:
    """Bisection on T in [lo, hi): the largest T the configuration LP refutes by the deadline (lo when
    none). Every partition of the model then has makespan > that T."""
    cl = ConfigLP(items, tab, hdp, C, engine)
    out = ConfigBound(bound_s=lo, columns=[])
    while hi - lo > BISECT_TOL * hi and time.perf_counter() < deadline:
        mid = (lo + hi) / 2
        out.tested += 1
        if cl.refutes(mid, deadline):
            lo = mid
            out.refuted += 1
        elif time.perf_counter() < deadline:
            hi = mid
        else:
            break  # ran out of time: mid is neither refuted nor known to stand
    out.bound_s = lo
    out.columns = list(cl.pool.values())
    return out


def fill_partition(sizes: list[int], counts: list[np.ndarray], items: Items, tab: Table, hdp: int,
                   C: int) -> Partition | None:
    """Complete a partial partition: the ranks left become single-rank groups, and every member not
    yet placed goes, longest first, to the group it may use where it finishes soonest (bins amortised,
    as in greedy_partition). None when some member fits no group."""
    n = len(items.count)
    sizes = list(sizes) + [1] * (hdp - sum(sizes) if tab.sizes[0] == 1 else 0)
    counts = [np.asarray(c, np.int64).copy() for c in counts] + [np.zeros(n, np.int64)
                                                                  for _ in range(len(sizes) - len(counts))]
    left = items.count - np.sum(counts, axis=0) if counts else items.count.copy()
    if (left < 0).any() or sum(sizes) > hdp:
        return None
    g_size = np.array(sizes)
    ki = np.searchsorted(tab.sizes, g_size)
    cur = np.array([group_time_s(d, c, items, tab, C) for d, c in zip(sizes, counts)])
    amort = np.where(g_size == 1, tab.gamma_s / C, 0.0)
    t_min = np.where(np.isfinite(tab.time_s), tab.time_s, np.inf).min(axis=1)
    for i in sorted(np.flatnonzero(left), key=lambda i: -t_min[i]):
        for _ in range(int(left[i])):
            ti = tab.time_s[i, ki] + amort * items.mean_tokens[i]
            g = int(np.argmin(cur + ti))
            if not np.isfinite(ti[g]):
                return None
            counts[g][i] += 1
            cur[g] += ti[g]
    keep = [g for g in range(len(sizes)) if counts[g].any()]
    return Partition([sizes[g] for g in keep], [counts[g] for g in keep])


def cover_mip(cl: ConfigLP, T: float, limit_s: float) -> list[tuple[int, np.ndarray, int]] | None:
    """The configuration model at makespan T with whole copies of the configurations seen (fluid
    members and ranks stay continuous): copies (size index, counts, n) of the cheapest cover that
    fits the mesh, or None."""
    w, d, b = cl.w, cl.d, cl.b
    n, K = len(b), len(d)
    ok = np.isfinite(w) & (w <= T)
    fluid = ok & (w < T * FLUID_SHARE)
    cols = [(k, a) for k, a in cl.pool.values() if ok[a > 0, k].all() and cl.load(k, a) <= T * (1 + 1e-12)]
    if not cols:
        return None
    # columns: λ per configuration (integer), R_k, z_ik; rows: items ≥ b, capacity ≥ 0, ranks ≤ hdp
    var_cost = [d[k] for k, _ in cols] + [1.0] * K
    entries: list[tuple[list[int], list[float]]] = []
    for k, a in cols:
        nz = np.flatnonzero(a)
        entries.append((nz.tolist() + [n + k, n + K],
                        a[nz].astype(float).tolist() + [d[k] * (T - cl.load(k, a)), d[k]]))
    for k in range(K):
        entries.append(([n + k, n + K], [T, 1.0]))
    pairs = list(zip(*np.nonzero(fluid)))
    for i, k in pairs:
        var_cost.append(0.0)
        entries.append(([int(i), n + int(k)], [1.0, -d[k] * w[i, k]]))
    row_lo = np.concatenate([b, np.zeros(K), [-np.inf]])
    row_hi = np.concatenate([np.full(n + K, np.inf), [float(cl.hdp)]])
    n_int = len(cols)
    x, _ = _small_mip(cl.engine, np.array(var_cost), entries, row_lo, row_hi, n_int,
                      [float(cl.hdp // int(d[k])) for k, _ in cols], limit_s)
    if x is None:
        return None
    return [(k, a, int(round(x[j]))) for j, (k, a) in enumerate(cols) if round(x[j]) >= 1]


def _small_mip(engine: str, cost: np.ndarray, entries: list, row_lo: np.ndarray, row_hi: np.ndarray, n_int: int,
               int_ub: list[float], limit_s: float) -> tuple[np.ndarray | None, float]:
    """min cost·x, row_lo ≤ A x ≤ row_hi, x ≥ 0, the first n_int columns integer ≤ int_ub: HiGHS, or
    SCIP through OR-Tools (same library rule as MasterLP). (The best solution by the limit or None,
    the proven lower bound on the objective: inf when proven infeasible, −inf when unknown.)"""
    m = len(row_lo)
    if engine == "highs":
        import highspy

        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", max(0.01, float(limit_s)))
        h.setOptionValue("random_seed", 0)
        inf = highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(entries), m
        lp.col_cost_ = np.asarray(cost, float)
        lp.col_lower_ = np.zeros(len(entries))
        lp.col_upper_ = np.array(list(int_ub[:n_int]) + [inf] * (len(entries) - n_int), float)
        lp.row_lower_ = np.clip(row_lo, -inf, inf)
        lp.row_upper_ = np.clip(row_hi, -inf, inf)
        a = lp.a_matrix_
        a.format_ = highspy.MatrixFormat.kColwise
        a.num_col_, a.num_row_ = len(entries), m
        a.start_ = np.concatenate([[0], np.cumsum([len(idx) for idx, _ in entries])]).astype(np.int32)
        a.index_ = np.concatenate([np.asarray(idx, np.int32) for idx, _ in entries]).astype(np.int32)
        a.value_ = np.concatenate([np.asarray(val, float) for _, val in entries])
        lp.integrality_ = [highspy.HighsVarType.kInteger] * n_int + [highspy.HighsVarType.kContinuous] * (
            len(entries) - n_int)
        h.passModel(lp)
        h.run()
        st = h.getModelStatus()
        if st == highspy.HighsModelStatus.kInfeasible:
            return None, math.inf
        bound = float(h.getInfo().mip_dual_bound) if st in (highspy.HighsModelStatus.kOptimal,
                                                             highspy.HighsModelStatus.kTimeLimit) else -math.inf
        if h.getInfo().primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
            return None, bound
        return np.array(h.getSolution().col_value), bound
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver("SCIP")
    s.SetTimeLimit(max(10, int(limit_s * 1000)))
    rows = [s.Constraint(-s.infinity() if np.isinf(lo) else float(lo), s.infinity() if np.isinf(hi) else float(hi))
            for lo, hi in zip(row_lo, row_hi)]
    xs = []
    for j, (idx, val) in enumerate(entries):
        v = s.IntVar(0.0, int_ub[j], "") if j < n_int else s.NumVar(0.0, s.infinity(), "")
        for i, a in zip(idx, val):
            rows[i].SetCoefficient(v, float(a))
        s.Objective().SetCoefficient(v, float(cost[j]))
        xs.append(v)
    s.Objective().SetMinimization()
    st = s.Solve()
    if st == pywraplp.Solver.INFEASIBLE:
        return None, math.inf
    bound = float(s.Objective().BestBound()) if st in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE) \
        else -math.inf
    if st not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return None, bound
    return np.array([v.solution_value() for v in xs]), bound


def pool_partition(cl: ConfigLP, items: Items, tab: Table, hdp: int, C: int, lo: float, hi: float,
                   deadline: float) -> tuple[Partition | None, float]:
    """Partitions from the configuration LP (price and round): at makespans bisected between the bound
    and the best makespan so far, the cheapest fractional cover is rounded (whole copies of its
    configurations, then fractional ones while ranks last), or covered in whole copies by cover_mip;
    fill_partition completes it and the local search polishes it. Returns the best partition that
    beats `hi` (or None) and the bound, raised where a makespan was refuted on the way."""
    best, best_s, proven = None, hi, lo
    while time.perf_counter() < deadline - 0.02 and best_s - lo > BISECT_TOL * best_s:
        T = (lo + best_s) / 2
        refuted, cfg = cl.run(T, deadline, to_optimum=True)
        if refuted:
            lo = proven = T  # a proof like config_bound's: the bound rises
            continue
        if not cfg:
            break  # out of time
        found = []
        for p in (_round_cover(cfg, items, tab, hdp, C),
                  _mip_cover(cl, T, items, tab, hdp, C, (deadline - time.perf_counter()) / 2)):
            if p is not None:
                p = improve(p, items, tab, C)
                found.append((makespan_s(p, items, tab, C), p))
        span, p = min(found, key=lambda f: f[0], default=(math.inf, None))
        if span < best_s * (1 - 1e-12):
            best, best_s = p, span
        else:
            break  # nothing better from here
    return best, proven


def _whole_copies(copies: list[tuple[int, np.ndarray, int]], items: Items, tab: Table, load) -> tuple[list, list]:
    """Groups of whole copies of configurations, heaviest first, members trimmed where covered twice."""
    sizes, counts, rest = [], [], items.count.copy()
    for k, a, n in sorted(copies, key=lambda c: -load(c[0], c[1])):
        for _ in range(n):
            take = np.minimum(a, rest)
            rest -= take
            if take.any():
                sizes.append(int(tab.sizes[k]))
                counts.append(take)
    return sizes, counts


def _round_cover(cfg: list[tuple[int, np.ndarray, float]], items: Items, tab: Table, hdp: int,
                 C: int) -> Partition | None:
    whole = [(k, a, int(math.floor(v + 1e-9))) for k, a, v in cfg]
    used = sum(int(tab.sizes[k]) * n for k, _, n in whole)
    for j in sorted(range(len(cfg)), key=lambda j: -(cfg[j][2] - whole[j][2])):
        k, a, n = whole[j]
        if cfg[j][2] - n > 1e-6 and used + int(tab.sizes[k]) <= hdp:
            whole[j] = (k, a, n + 1)
            used += int(tab.sizes[k])
    w = bin_weights(items, tab, C)
    sizes, counts = _whole_copies(whole, items, tab, lambda k, a: float(w[a > 0, k] @ a[a > 0]))
    return fill_partition(sizes, counts, items, tab, hdp, C)


def _mip_cover(cl: ConfigLP, T: float, items: Items, tab: Table, hdp: int, C: int, limit_s: float) -> Partition | None:
    if limit_s < 0.05:
        return None
    cover = cover_mip(cl, T, limit_s)
    if cover is None:
        return None
    sizes, counts = _whole_copies(cover, items, tab, cl.load)
    return fill_partition(sizes, counts, items, tab, hdp, C)


# ---- the integer configuration bound ----------------------------------------------------------------
#
# The configuration LP lets configurations be used fractionally; where a few dozen long members each
# fill a large share of a group (23 sequences of 64K tokens on 64 ranks, 2 or 3 to a group), the
# integrality of the number of groups is the rest of the gap. For a makespan T, every configuration of
# the "big" members (those taking ≥ BIG_SHARE·T at a size) is enumerated, with exact loads, and the
# other members stay fluid as in the LP; the number of groups of each configuration (the empty one
# included: groups of fluid members only) is an integer. A partition of makespan ≤ T maps to a solution
# (each group: its big members are its configuration, the rest fluid), so when the MIP proves that
# the fewest ranks exceed hdp, T is refuted. The share is raised (fewer big members) until at most
# ENUM_PER_SIZE configurations exist per size; the MIP's proven bound counts, so a time-limited solve can refute too.

BIG_SHARES = (1 / 8, 1 / 4, 1 / 2)  # per size, tried in turn until the enumeration fits
ENUM_PER_SIZE = 200  # configurations of big members enumerated per group size at most


def enumerate_configs(w: np.ndarray, counts: np.ndarray, ok: np.ndarray, T: float,
                      cap: int) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    """Per size, every multiset of big members with load ≤ T (the empty one too), for the smallest
    share in BIG_SHARES whose enumeration stays within cap (sizes where none does: no big members).
    Returns the configurations and the big mask."""
    n, K = ok.shape
    out: list[tuple[int, np.ndarray]] = []
    big = np.zeros_like(ok)
    limit = T * (1 + 1e-9)
    for k in range(K):
        for share in BIG_SHARES:
            J = np.flatnonzero(ok[:, k] & (w[:, k] >= T * share))
            J = J[np.argsort(-w[J, k], kind="stable")]
            a = np.zeros(n, dtype=np.int64)
            found = [(k, a.copy())]

            def walk(pos: int, load: float) -> bool:  # depth first; False once over the cap
                for p in range(pos, len(J)):
                    i = J[p]
                    if a[i] < counts[i] and load + w[i, k] <= limit:
                        a[i] += 1
                        found.append((k, a.copy()))
                        if len(found) > cap or not walk(p, load + w[i, k]):
                            return False
                        a[i] -= 1
                return True

            if walk(0, 0.0):
                out += found
                big[J, k] = True
                break
        else:
            out.append((k, np.zeros(n, dtype=np.int64)))
    return out, big


def integer_model(cl: ConfigLP, T: float, limit_s: float) -> tuple[bool, tuple | None]:
    """The integer configuration model at makespan T (see the section's comment): (refuted, a solution
    that fits the mesh or None). A solution is the copies (size index, big members, n) and the fluid
    members per item and size, [items, sizes] (fractional). Refuted only when proven."""
    w, d, b = cl.w, cl.d, cl.b
    n, K = len(b), len(d)
    ok = np.isfinite(w) & (w <= T)
    if not ok.any(axis=1).all():
        return True, None
    configs, big = enumerate_configs(w, cl.items.count, ok, T, ENUM_PER_SIZE)
    fluid = ok & ~big
    entries, cost = [], []
    for k, a in configs:
        nz = np.flatnonzero(a)
        load = float(w[nz, k] @ a[nz])
        entries.append((nz.tolist() + [n + k], a[nz].astype(float).tolist() + [d[k] * (T - load)]))
        cost.append(d[k])
    n_int = len(configs)
    for i, k in zip(*np.nonzero(fluid)):
        entries.append(([int(i), n + int(k)], [1.0, -d[k] * w[i, k]]))
        cost.append(0.0)
    row_lo = np.concatenate([b, np.zeros(K)])
    row_hi = np.full(n + K, np.inf)
    x, bound = _small_mip(cl.engine, np.array(cost), entries, row_lo, row_hi, n_int,
                          [float(cl.hdp // int(d[k])) for k, _ in configs], limit_s)
    if bound > cl.hdp + 1e-6:
        return True, None
    if x is None or float(np.array(cost) @ x) > cl.hdp + 1e-6:
        return False, None
    z = np.zeros((n, K))
    z[np.nonzero(fluid)] = x[n_int:]
    return False, ([(k, a, int(round(x[j]))) for j, (k, a) in enumerate(configs) if round(x[j]) >= 1], z)


def integer_partition(copies: list[tuple[int, np.ndarray, int]], z: np.ndarray, cl: ConfigLP, items: Items,
                      tab: Table, hdp: int, C: int) -> Partition | None:
    """A partition from a solution of the integer model: its configurations as groups (the empty ones
    too); each item's fluid members dealt to the sizes the solution gives them (largest remainders),
    within a size longest first to the group where they finish soonest; fill_partition for the rest."""
    sizes, counts = _whole_copies(copies, items, cl.tab, cl.load)
    sizes += [int(cl.tab.sizes[k]) for k, a, c in copies if not a.any() for _ in range(c)]
    counts += [np.zeros(len(items.count), np.int64) for _ in range(len(sizes) - len(counts))]
    left = items.count - (np.sum(counts, axis=0) if counts else 0)
    share = np.floor(z + 1e-9).astype(np.int64)
    for i in np.flatnonzero(left):  # whole members per size: floors, then the largest remainders
        share[i] = np.minimum(share[i], left[i])
        for k in np.argsort(-(z[i] - np.floor(z[i] + 1e-9)), kind="stable"):
            if share[i].sum() >= left[i]:
                break
            if z[i, k] > share[i, k] + 1e-9:
                share[i, k] += 1
        while share[i].sum() > left[i]:
            share[i, int(np.argmax(share[i]))] -= 1
    g_size = np.array(sizes, dtype=np.int64)
    load = np.array([group_time_s(d, c, items, tab, C) for d, c in zip(sizes, counts)])
    order = np.argsort(-np.where(np.isfinite(tab.time_s), tab.time_s, 0.0).max(axis=1), kind="stable")
    for i in order:
        for k in np.flatnonzero(share[i]):
            gs = np.flatnonzero(g_size == cl.tab.sizes[k])
            t = tab.time_s[i, k] + (tab.gamma_s * items.mean_tokens[i] / C if cl.tab.sizes[k] == 1 else 0.0)
            if not len(gs) or not np.isfinite(t):
                continue  # left to fill_partition
            for _ in range(int(share[i, k])):
                g = gs[int(np.argmin(load[gs]))]
                counts[g][i] += 1
                load[g] += t
    return fill_partition(sizes, counts, items, tab, hdp, C)


def integer_search(cl: ConfigLP, items: Items, tab: Table, hdp: int, C: int, lo: float, hi: float,
                   deadline: float) -> tuple[float, Partition | None]:
    """Bisection on T in [lo, hi) with the integer configuration model: the largest T refuted (lo when
    none), and the best partition its solutions lead to (their configurations as groups, the fluid
    members placed by fill_partition, then the local search) when one beats `hi`."""
    best, best_s = None, hi
    top = hi
    while top - lo > INT_TOL * top:
        left = deadline - time.perf_counter()
        if left < 0.05:
            break
        mid = (lo + top) / 2
        refuted, copies = integer_model(cl, mid, left / 2)  # copies: (configurations, fluid members)
        if refuted:
            lo = mid
            continue
        top = mid  # not refuted (or not in time): look lower
        if copies is not None:
            p = integer_partition(*copies, cl, items, tab, hdp, C)
            if p is not None:
                p = improve(p, items, tab, C)
                span = makespan_s(p, items, tab, C)
                if span < best_s * (1 - 1e-12):
                    best, best_s = p, span
    return lo, best


# ---- backends ---------------------------------------------------------------------------------------

@dataclass
class Solution:
    status: str  # optimal | feasible | infeasible | none
    x: np.ndarray | None
    objective: float | None  # makespan (s)
    bound: float | None
    note: str = ""  # why there is no solution, where known


def _solve_highs(lm: LinearModel, x0: np.ndarray | None, limit_s: float) -> Solution:
    import highspy

    deadline = time.perf_counter() + limit_s  # building the model counts against the limit too
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", REL_GAP)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("presolve_rule_off", 2**15)  # probing thousands of assignment binaries eats the budget
    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = lm.n, len(lm.rows)
    cost = np.zeros(lm.n)
    cost[lm.objective] = 1.0
    lp.col_cost_ = cost
    lp.col_lower_ = np.array(lm.lb)
    lp.col_upper_ = np.clip(np.array(lm.ub), -inf, inf)
    lp.row_lower_ = np.clip(np.array([r[2] for r in lm.rows]), -inf, inf)
    lp.row_upper_ = np.clip(np.array([r[3] for r in lm.rows]), -inf, inf)
    a = lp.a_matrix_
    a.format_ = highspy.MatrixFormat.kRowwise
    a.num_col_, a.num_row_ = lm.n, len(lm.rows)
    a.start_ = np.concatenate([[0], np.cumsum([len(r[0]) for r in lm.rows])]).astype(np.int32)
    a.index_ = np.concatenate([r[0] for r in lm.rows]).astype(np.int32)
    a.value_ = np.concatenate([r[1] for r in lm.rows])
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in lm.integer]
    h.passModel(lp)
    if x0 is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(map(float, x0))
        sol.value_valid = True
        h.setSolution(sol)
    h.setOptionValue("time_limit", max(0.05, deadline - time.perf_counter()))
    h.run()
    st = h.getModelStatus()
    info = h.getInfo()
    if st == highspy.HighsModelStatus.kInfeasible:
        return Solution("infeasible", None, None, None)
    if info.primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
        return Solution("none", None, None, None)
    x = np.array(h.getSolution().col_value)
    return Solution("optimal" if st == highspy.HighsModelStatus.kOptimal else "feasible", x,
                    float(info.objective_function_value), float(info.mip_dual_bound))


def _solve_cbc(lm: LinearModel, x0: np.ndarray | None, limit_s: float) -> Solution:
    import pulp

    deadline = time.perf_counter() + limit_s  # pulp's modelling and files count against the limit too
    prob = pulp.LpProblem("meshplan_step", pulp.LpMinimize)
    v = [pulp.LpVariable(f"v{j}", lowBound=lm.lb[j], upBound=None if math.isinf(lm.ub[j]) else lm.ub[j],
                         cat=pulp.LpInteger if lm.integer[j] else pulp.LpContinuous) for j in range(lm.n)]
    prob += v[lm.objective]
    for idx, val, lo, hi, *_ in lm.rows:
        e = pulp.LpAffineExpression([(v[j], float(a)) for j, a in zip(idx, val)])
        if lo == hi:
            prob += e == lo
        else:
            if not math.isinf(lo):
                prob += e >= lo
            if not math.isinf(hi):
                prob += e <= hi
    if x0 is not None:
        for var, val in zip(v, x0):
            var.setInitialValue(float(val))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "cbc.log"
        left = deadline - time.perf_counter() - PULP_IO_SHARE * limit_s  # writing the MPS, reading the solution
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=round(max(0.05, left), 2), gapRel=REL_GAP,
                                   warmStart=x0 is not None, logPath=str(log), threads=1)
        try:
            prob.solve(solver)
        except pulp.PulpSolverError:  # the CBC binary exited abnormally (it can crash mid-search)
            return Solution("none", None, None, None, note="CBC exited abnormally")
        text = log.read_text() if log.exists() else ""
    if prob.status == pulp.LpStatusInfeasible:
        return Solution("infeasible", None, None, None)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return Solution("none", None, None, None)
    x = np.array([var.value() or 0.0 for var in v])
    obj = float(x[lm.objective])
    m = re.search(r"Lower bound:\s*([-0-9.eE+]+)", text)
    optimal = "Optimal solution found" in text or prob.sol_status == pulp.LpSolutionOptimal and not m
    bound = float(m.group(1)) if m else (obj if optimal else None)
    return Solution("optimal" if optimal else "feasible", x, obj, bound)


def _solve_cpsat(lm: LinearModel, x0: np.ndarray | None, limit_s: float) -> Solution:
    from ortools.sat.python import cp_model

    deadline = time.perf_counter() + limit_s  # building the model counts against the limit too
    ub_t = max(lm.ub[j] for j in range(lm.n) if lm.time_col[j])
    if x0 is not None:
        ub_t = min(ub_t, float(x0[lm.objective]) * 1.5 + 1e-9)
    tick = ub_t / CPSAT_TICKS
    big = 2**40
    rows = []  # integer rows: times in ticks; token rows in tokens, members' tokens rounded up
    for idx, val, lo, hi, time_row, int_scale in lm.rows:
        if time_row:
            coef = np.array([a if lm.time_col[j] else a / tick for j, a in zip(idx, val)]).round().astype(np.int64)
        else:
            coef = np.where(val < 0, -np.ceil(-val * int_scale - 1e-6), np.round(val * int_scale)).astype(np.int64)
        scale = 1 / tick if time_row else int_scale
        rows.append((idx, coef, -big if math.isinf(lo) else math.floor(lo * scale),
                     big if math.isinf(hi) else math.ceil(hi * scale)))
    m = cp_model.CpModel()
    v = []
    for j in range(lm.n):
        lo, hi = lm.lb[j], lm.ub[j]
        if lm.time_col[j]:
            lo, hi = math.floor(lo / tick), math.ceil(min(hi, ub_t * 1.5) / tick)
        v.append(m.NewIntVar(int(lo), int(min(hi, big)), f"v{j}"))
    for idx, coef, lo, hi in rows:
        m.AddLinearConstraint(cp_model.LinearExpr.WeightedSum([v[j] for j in idx], coef.tolist()), int(lo), int(hi))
    m.Minimize(v[lm.objective])
    if x0 is not None:
        for j, val in enumerate(_tick_hint(lm, rows, x0)):
            m.AddHint(v[j], int(val))
    s = cp_model.CpSolver()
    s.parameters.max_time_in_seconds = max(0.05, deadline - time.perf_counter())
    s.parameters.num_workers = max(1, min(8, os.cpu_count() or 1))
    s.parameters.relative_gap_limit = REL_GAP
    s.parameters.random_seed = 0
    s.parameters.cp_model_probing_level = 0  # presolve probing of the assignment Booleans eats the budget
    st = s.Solve(m)
    if st == cp_model.INFEASIBLE:
        return Solution("infeasible", None, None, None)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Solution("none", None, None, None)
    x = np.array([s.Value(var) * (tick if lm.time_col[j] else 1) for j, var in enumerate(v)], dtype=float)
    return Solution("optimal" if st == cp_model.OPTIMAL else "feasible", x, s.ObjectiveValue() * tick,
                    s.BestObjectiveBound() * tick)


def _tick_hint(lm: LinearModel, rows: list, x0: np.ndarray) -> np.ndarray:
    """A complete, feasible hint in ticks: integers as given; each time column defined by an equality
    row recomputed from the rounded coefficients; the objective the least value every row allows."""
    h = np.where(lm.time_col, 0, np.round(x0)).astype(np.int64)
    for idx, coef, lo, hi in rows:
        tcols = [k for k, j in enumerate(idx) if lm.time_col[j]]
        if lo == hi and len(tcols) == 1 and idx[tcols[0]] != lm.objective:
            k = tcols[0]
            rest = int(coef @ h[idx]) - int(coef[k]) * int(h[idx[k]])
            h[idx[k]] = (lo - rest) // coef[k]
    need = 0
    for idx, coef, lo, hi in rows:
        k = np.flatnonzero(idx == lm.objective)
        if len(k) and coef[k[0]] > 0:
            rest = int(coef @ h[idx]) - int(coef[k[0]]) * int(h[lm.objective])
            need = max(need, -(-(lo - rest) // int(coef[k[0]])))
    h[lm.objective] = need
    return h


BACKENDS = {"cbc": _solve_cbc, "highs": _solve_highs, "cpsat": _solve_cpsat}


def solve(backend: str, lm: LinearModel, x0: np.ndarray | None, limit_s: float) -> Solution:
    """Run a backend. OR-Tools bundles its own HiGHS library, so highspy and CP-SAT cannot both load
    into one process (whichever comes second fails to link): then the backend runs in a fresh Python
    process, whose start-up counts against the time limit."""
    clash = {"cpsat": "highspy", "highs": "ortools"}.get(backend)
    if clash is None or not any(m.split(".")[0] == clash for m in list(sys.modules)):
        return BACKENDS[backend](lm, x0, limit_s)
    import pickle
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "solution.pkl"
        job.write_bytes(pickle.dumps((backend, lm, x0, time.time() + limit_s)))
        entry = "import sys; from planner.strategies.ilp import solve_job; solve_job(*sys.argv[1:])"
        cmd = [sys.executable, "-c", entry, str(job), str(result)]
        try:
            subprocess.run(cmd, capture_output=True, timeout=limit_s + CHILD_GRACE_S, check=True)
            return pickle.loads(result.read_bytes())
        except (subprocess.SubprocessError, OSError, EOFError, pickle.UnpicklingError):
            return Solution("none", None, None, None)


def solve_job(job: str, result: str) -> None:
    """Entry point of the separate solver process (see solve)."""
    import pickle

    backend, lm, x0, deadline = pickle.loads(Path(job).read_bytes())
    Path(result).write_bytes(pickle.dumps(BACKENDS[backend](lm, x0, max(0.05, deadline - time.time()))))


# ---- from a solution to units -----------------------------------------------------------------------

def read_partition(sol: np.ndarray, sm: StepModel, n_items: int) -> Partition:
    counts = np.zeros((len(sm.group_size), n_items), dtype=np.int64)
    for (i, g), col in sm.x.items():
        counts[g, i] = int(round(sol[col]))
    used = np.flatnonzero(counts.any(axis=1))
    return Partition([int(sm.group_size[g]) for g in used], [counts[g] for g in used])


def assign_members(p: Partition, items: Items, seqs: SeqTable, C: int, price: Pricer) -> list[list[int]]:
    """Sequences per group. A lone sequence goes where the solver put it. A bucket's members are dealt to
    group sizes in the solver's counts per size, interleaved by length (each size gets a fair share of
    long and short members, so its total matches the model's mean); within a size, members go longest
    first to the copy where they finish soonest, priced by their own length (LPT) — better balanced
    than the solver's per-copy counts, which only know the bucket's mean."""
    G = len(p.sizes)
    sizes = np.array(p.sizes)
    on_bin = dict(zip(seqs.lengths.tolist(), price.bin_s(seqs.lengths).tolist())) if (sizes == 1).any() else {}

    def cost(s: int, d: int) -> float:
        return on_bin[s] if d == 1 else price.shard_s(s, d)

    busy = np.zeros(G)  # Σ member times; single ranks add γ per started C-token bin
    tok = np.zeros(G)
    out: list[list[int]] = [[] for _ in range(G)]

    def put(m: int, g: int) -> None:
        s = int(seqs.lengths[m])
        busy[g] += cost(s, int(sizes[g]))
        tok[g] += s
        out[g].append(int(m))

    for i in np.flatnonzero(items.count == 1):
        put(int(items.members[i][0]), next(g for g in range(G) if p.counts[g][i]))
    dealt: dict[int, list[int]] = {int(d): [] for d in set(p.sizes)}
    for i in np.flatnonzero(items.count > 1):
        classes = sorted(dealt)
        quota = np.array([sum(int(p.counts[g][i]) for g in range(G) if sizes[g] == d) for d in classes], float)
        got = np.zeros(len(classes))
        for j, m in enumerate(items.members[i]):  # longest first: the class furthest behind its share
            c = int(np.argmax(quota * (j + 1) / len(items.members[i]) - got + 1e-9 * quota))
            got[c] += 1
            dealt[classes[c]].append(int(m))
    for d, mem in dealt.items():
        gs = np.flatnonzero(sizes == d)
        for m in sorted(mem, key=lambda m: -seqs.lengths[m]):
            s = int(seqs.lengths[m])
            finish = busy[gs] + cost(s, d)
            if d == 1:
                finish += price.gamma_s * np.ceil((tok[gs] + s) / C - 1e-9)
            put(m, int(gs[np.argmin(finish)]))
    return out


def layout(sizes: list[int], hdp: int, per_node: int) -> list[tuple[int, ...]]:
    """Contiguous rank sets: node-local sizes first, largest first, from rank 0 (each start is then a
    multiple of its size, so none crosses a node boundary), then the other sizes, largest first."""
    local = node_local_sizes(hdp, per_node)
    order = sorted(range(len(sizes)), key=lambda g: (sizes[g] not in local, -sizes[g], g))
    out: list[tuple[int, ...]] = [()] * len(sizes)
    start = 0
    for g in order:
        out[g] = tuple(range(start, start + sizes[g]))
        start += sizes[g]
    return out


def partition_drafts(p: Partition, items: Items, seqs: SeqTable, cm: CostModel, price: Pricer) -> list[Draft]:
    """Units of a partition: on single ranks best-fit bins of ≤ C tokens, on larger groups one sharded
    unit per sequence, longest first, one after another."""
    members = assign_members(p, items, seqs, cm.capacity_tokens, price)
    ranks = layout(p.sizes, cm.setup.hdp, cm.setup.hdp_per_node)
    drafts: list[Draft] = []
    for d, rs, mem in zip(p.sizes, ranks, members):
        mem = np.array(sorted(mem, key=lambda m: -seqs.lengths[m]), dtype=np.int64)
        if d == 1:
            for k, b in enumerate(best_fit_pack(seqs.lengths, mem, cm.capacity_tokens)):
                drafts.append(Draft(ranks=rs, pieces=[seqs.piece(i) for i in b], sort_key=float(k)))
            continue
        for k, m in enumerate(mem):
            r = ratio_for_tokens(zigzag_tokens_per_rank([int(seqs.lengths[m])], d), cm) or 0.0
            drafts.append(Draft(ranks=rs, pieces=[seqs.piece(int(m))], offload_ratio=r, sort_key=float(k)))
    return drafts


# ---- the strategy -----------------------------------------------------------------------------------

def model_bound_s(items: Items, tab: Table, hdp: int, C: int) -> float:
    """A bound valid for the whole model: the area bound, or the slowest member at its fastest size."""
    return max(area_bound_s(items, tab, hdp, C), float(np.min(tab.time_s, axis=1).max()))


def plan_step(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    """The `ilp` strategy: solve the step's partition model, fall back to `hdp` without an incumbent."""
    t0 = time.perf_counter()
    if cm.pp > 1:
        raise PlanError("ilp models pp = 1 only; use --strategy hdp for pipelined meshes")
    if opt.solver not in BACKENDS:
        raise PlanError(f"unknown solver {opt.solver!r}; one of {', '.join(SOLVERS)}")
    hdp, C = cm.setup.hdp, cm.capacity_tokens
    seqs = SeqTable.of(batch)
    check_fits(int(seqs.lengths.max()), cm, hdp, opt.offload)
    heuristic = plan_balance(batch, cm, opt)
    finalize_s = time.perf_counter() - t0  # about what mapping, finalize and simulation take afterwards
    sync = cm.grad_sync_s(hdp)
    hdp_s = heuristic.predicted.step_time_s
    price = Pricer(cm)
    items = make_items(seqs, cm, max(1, opt.ilp_buckets), price)
    tab = make_table(items, seqs, cm, opt, price)
    floor = model_bound_s(items, tab, hdp, C)
    hint = np.ones(len(items.count), dtype=np.int64)
    item_of = {int(m): i for i, mem in enumerate(items.members) for m in mem}
    row_of = {int(q): k for k, q in enumerate(seqs.ids)}
    for u in heuristic.units:  # hdp's degrees seed one of the warm starts
        if u.degree > 1:
            for p in u.pieces:
                i = item_of[row_of[p.seq]]
                hint[i] = max(hint[i], u.degree)
    warm = warm_start(items, tab, hdp, C, hint, hdp_s - sync)
    bound_from, incumbent = "area", math.inf
    if warm is not None:
        incumbent = makespan_s(warm, items, tab, C)
        tab = prune(items, tab, hdp, C, incumbent)
        budget = max(0.0, opt.time_limit_s - (time.perf_counter() - t0) - finalize_s)
        engine = lp_engine(opt.solver)
        if incumbent - floor > REL_GAP * incumbent:
            cb = config_bound(items, tab, hdp, C, floor, incumbent, time.perf_counter() + BOUND_SHARE * budget,
                              engine)
            if cb.bound_s > floor:
                floor, bound_from = cb.bound_s, "configuration LP"
            cl = ConfigLP(items, tab, hdp, C, engine)
            for k, a in cb.columns:
                cl.remember(k, a)
            for d, c in zip(warm.sizes, warm.counts):  # the warm start's groups are configurations too
                cl.remember(int(np.searchsorted(tab.sizes, d)), np.asarray(c, np.int64))
            better, raised = pool_partition(cl, items, tab, hdp, C, floor, incumbent,
                                            time.perf_counter() + POOL_SHARE * budget)
            if raised > floor:
                floor, bound_from = raised, "configuration LP"
            if better is not None:
                warm, incumbent = better, makespan_s(better, items, tab, C)
                tab = prune(items, tab, hdp, C, incumbent)
            raised, better = integer_search(cl, items, tab, hdp, C, floor, incumbent,
                                            time.perf_counter() + INT_SHARE * budget)
            if raised > floor:
                floor, bound_from = raised, "integer configurations"
            if better is not None:
                warm, incumbent = better, makespan_s(better, items, tab, C)
                tab = prune(items, tab, hdp, C, incumbent)
    sm = build_model(items, tab, hdp, C, floor)
    x0 = partition_to_vector(warm, sm, items, tab, C) if warm is not None else None
    size = dict(items=len(items.count), groups=len(sm.group_size), variables=sm.lm.n)
    if x0 is not None and incumbent - floor <= REL_GAP * incumbent:
        sol = Solution("optimal", x0, incumbent, floor)  # the bound already proves the warm start optimal
    else:
        limit = max(0.05, opt.time_limit_s - (time.perf_counter() - t0) - finalize_s)
        sol = solve(opt.solver, sm.lm, x0, limit)
        if sol.bound is not None and sol.bound > floor:
            bound_from = "solver"
    if sol.status == "infeasible":
        raise PlanError(f"ilp ({opt.solver}): no partition of the {hdp} HDP ranks holds this step's "
                        f"{len(seqs.ids)} sequences at C = {C} tokens/rank")
    note = ""
    if sol.x is None and x0 is not None:  # the solver failed, but the warm start is an incumbent
        note = f"{opt.solver} returned no solution ({sol.note or 'none in ' + f'{limit:.1f} s'}); kept the warm start"
        warnings.warn(f"ilp step {batch.step}: {note}", SolverWarning, stacklevel=2)
        sol = Solution("feasible", x0, incumbent, floor)
    if sol.x is None:
        note = f"{opt.solver} found no solution in {limit:.1f} s; using the hdp plan"
        warnings.warn(f"ilp step {batch.step}: {note}", SolverWarning, stacklevel=2)
        report_solver(SolverInfo(opt.solver, "fallback", time.perf_counter() - t0, None, None, None, hdp_s, hdp_s,
                                 note=note, **size))
        return heuristic
    part = read_partition(sol.x, sm, len(items.count))
    step = finalize(batch, partition_drafts(part, items, seqs, cm, price), cm, hdp)
    obj = makespan_s(part, items, tab, C)  # the solution's own makespan (CP-SAT's objective is in ticks)
    bound = min(obj, max(floor, sol.bound if sol.bound is not None else 0.0))
    report_solver(SolverInfo(opt.solver, sol.status, time.perf_counter() - t0, (obj - bound) / obj if obj > 0 else 0.0,
                             obj + sync, bound + sync, step.predicted.step_time_s, hdp_s, **size, note=note,
                             bound_from=bound_from))
    return step
