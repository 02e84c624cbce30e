"""ByteScale's Hybrid Data Parallelism (REFERENCE §2): `hdp-naive` (Alg. 1) and `hdp` (Alg. 2).

Both shard a sequence only when it exceeds C, over any number D(s; r) of ranks (offload lowers D),
best-fit pack the rest into C-token bins on single ranks, and communicate only inside sharded
units. They differ in assignment:

- hdp-naive: long sequences take the next D ranks of a cursor, bins are dealt round-robin;
  communication is minimal, balance is left to chance (ByteScale's case study: 4.7× spread).
- hdp: the balance scheduler. Decisions where the paper is silent (REFERENCE §11), each an option:
  * cost behind t_i: the cost model (exact unit time for sharded units, the fitted
    T(s) = α1·s² + β1·s + γ per packed document, γ once per bin);
  * a long sequence's D is raised above its memory minimum while its unit would outlast the
    average rank load (its critical path), which also lowers its offload ratio;
  * DP-Balance (pp = 1): sequences in descending cost order (the first bucket first), each to the
    most-lagging ranks, i.e. δ-lag targeting with the lag measured by t_i; a sharded unit takes the
    D least-loaded ranks, moved inside one node when that costs at most δ of the current maximum;
    short sequences fill per-rank bins so light ranks run more micro-batches;
  * PP-Balance (pp > 1): ranks are pipelines; t_i is the 1F1B estimate Σt + (p−1)·max t; sharded
    units are placed in rounds so that they occupy the same micro-batch slot in every member
    pipeline (otherwise co-scheduled 1F1B lists can deadlock); the cheapest pipeline gets the next
    bin, so cheaper pipelines run more micro-batches. A long unit's degree is either the one above
    (the critical-path rule) or capped against the fill and drain: (p − 1) × its largest slice is
    idle time on every stage, so the degree is raised until the slice is at most a cap chosen per
    step (issue 21: 400K-token units on 2 of 32 pipelines left 47 s of an 83 s step idle); the
    faster simulated set is kept. The step's chunk count v (interleaving; with slices SlimPipe's n·v
    schedule) is the fastest simulated one that fits HBM.
"""

from __future__ import annotations

import functools
import gc
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from costmodel.timing import CostModel
from planner.workload import GlobalBatch
from planner.plan import DEFAULT_MAX_CHUNKS, PipelineSection, PlanError, Piece, Step
from planner.strategies import dcp, static
from planner.strategies.common import (DomainLoads, Draft, SeqTable, best_fit_pack, check_fits, finalize, fit_degree,
                                       fits_first, long_degree, lpt_makespan, node_local_ranks,
                                       offload_r_maxes)

if TYPE_CHECKING:  # the container imports this module for HdpOptions
    from planner.strategies.options import PlanOptions

PpSchedule = Literal["1f1b", "sliced", "sliced-redistributed"]  # the pipeline schedules hdp plans with PP
PP_SCHEDULES: tuple[PpSchedule, ...] = get_args(PpSchedule)


@dataclass(frozen=True)
class HdpOptions:
    """Knobs of the balance scheduler (REFERENCE §11), and of both hdp strategies with PP."""

    delta: float = 0.05  # balance slack: relative lag that makes a rank a target (Alg. 2)
    balance_slacks: tuple[float, ...] = (1.0, 1.15, 1.35, 1.7, 2.5, 1e9)  # makespan targets tried
    max_slices: int = 64  # with PP: most uniform slices per sequence (SlimPipe: 2048K / 32K = 64)
    pp_schedule: PpSchedule = "sliced-redistributed"  # with PP: 1F1B, SlimPipe slices, plus mirror pairing
    pp_v: int | None = None  # with PP: model chunks per stage (interleaving); None = per step by simulation
    redistribute_max_chunks: int = DEFAULT_MAX_CHUNKS  # mirror pairing: most K/V chunks (one slice's each) a pair moves
    balanced_bins: bool = True  # with PP: also try short-document bins of equal time, not only equal tokens


def _split(seqs: SeqTable, cm: CostModel, offload: bool,
           max_slices: int = 1) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int, float, int]]]:
    """Short (≤ C, packed) and long (sharded) sequences, with each long one's (D, r, n)."""
    C = cm.capacity_tokens
    check_fits(int(seqs.lengths.max()), cm, cm.setup.hdp, offload, max_slices)
    long_idx = np.flatnonzero(seqs.lengths > C)
    short_idx = np.flatnonzero(seqs.lengths <= C)
    r_max = offload_r_maxes(seqs.lengths[long_idx], cm)  # the lookups in one batch (used only with offload)
    deg = {int(i): long_degree(int(seqs.lengths[i]), cm, offload, max_slices, r)
           for i, r in zip(long_idx, r_max)}
    return long_idx, short_idx, deg


def plan_naive(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    """Alg. 1: data-aware sharding + best-fit packing + a naive (cursor / round-robin) assignment."""
    if cm.pp > 1:
        return _plan_pp_balance(batch, cm, opt, naive=True)
    return finalize(batch, _naive_drafts(batch, cm, opt), cm, cm.setup.hdp)


def _naive_drafts(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> list[Draft]:
    hdp = cm.setup.hdp
    seqs = SeqTable.of(batch)
    long_idx, short_idx, deg = _split(seqs, cm, opt.offload)
    drafts: list[Draft] = []
    cursor = 0

    def place(ranks: tuple[int, ...], pieces, r: float) -> None:
        drafts.append(Draft(ranks=ranks, pieces=pieces, offload_ratio=r))

    for i in long_idx[np.argsort(-seqs.lengths[long_idx], kind="stable")]:
        d, r, _ = deg[int(i)]
        if cursor + d > hdp:
            cursor = 0
        place(tuple(range(cursor, cursor + d)), [seqs.piece(int(i))], r)
        cursor = (cursor + d) % hdp
    order = short_idx[np.argsort(-seqs.lengths[short_idx], kind="stable")]
    for b in best_fit_pack(seqs.lengths, order, cm.capacity_tokens):
        place((cursor,), [seqs.piece(i) for i in b], 0.0)
        cursor = (cursor + 1) % hdp
    t = np.zeros(hdp)  # planned finish per rank, only to order units
    for dr, cost in zip(drafts, _draft_times_s(drafts, cm)):
        idx = list(dr.ranks)
        dr.sort_key = float(t[idx].max())
        t[idx] = dr.sort_key + cost
    return drafts


def _unit_times_s(cm: CostModel, docs: list[list[int]], degree: list[int], ratio: list[float],
                  inter: list[bool]) -> list[float]:
    """CostModel.unit_time_s of many units (documents `docs[u]` over `degree[u]` ranks), priced in one batch."""
    if not docs:
        return []
    counts = np.fromiter((len(x) for x in docs), np.int64, len(docs))
    lengths = np.fromiter((s for x in docs for s in x), float, int(counts.sum()))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return cm.price_units(lengths, offsets, np.asarray(degree, np.int64), np.asarray(ratio, float),
                          np.asarray(inter, bool)).total_s.tolist()


def _draft_times_s(drafts: list[Draft], cm: CostModel) -> list[float]:
    """Each draft's unit time on its ranks (what the simulator will price), in one batch."""
    mesh = cm.setup.mesh
    return _unit_times_s(cm, [d.lengths for d in drafts], [len(d.ranks) for d in drafts],
                         [d.offload_ratio for d in drafts], [mesh.spans_domains(sorted(d.ranks)) for d in drafts])


def _slice_peak(n: int, schedule: str) -> float:
    """Largest share of a unit's stage time in one of its n slices: 1/n when redistribution evens the
    slices out, else the last slice's causal-attention share (2n − 1)/n² (attention-bound bound)."""
    return 1.0 / n if schedule == "sliced-redistributed" else (2 * n - 1) / (n * n)


LongBase = dict[int, tuple[int, float, float, int]]  # seq index -> (D_min, r, time at D_min, n slices)


def _long_base(seqs: SeqTable, long_idx: np.ndarray, deg: dict[int, tuple[int, float, int]], cm: CostModel,
               pp_schedule: str = "1f1b") -> LongBase:
    """Each long sequence's unit at its memory-minimal degree, priced once for every slack tried."""
    mesh = cm.setup.mesh
    keys = [int(i) for i in long_idx]
    times = _unit_times_s(cm, [[int(seqs.lengths[i])] for i in keys], [deg[i][0] for i in keys],
                          [deg[i][1] for i in keys], [mesh.group_spans_domains(deg[i][0]) for i in keys])
    base = {}
    for i, c in zip(keys, times):
        d, r, n = deg[i]
        # With PP a unit alone also fills and drains the pipeline: (p − 1) of its largest slice.
        base[i] = (d, r, c * (1 + (cm.pp - 1) * _slice_peak(n, pp_schedule)), n)
    return base


def _long_units(seqs: SeqTable, base: LongBase, cm: CostModel, short_work_s: float, slack: float = 1.0,
                pp_schedule: str = "1f1b",
                raised: dict[tuple[int, int], tuple[int, float, float, int]] | None = None,
                ) -> list[tuple[float, int, int, float, int]]:
    """(time, seq index, D, r, n slices) per long sequence, largest D·time first.

    Units that would outlast the step's target T get more ranks: D_k(T) = the smallest D ≥ D_min with
    time ≤ T (time ∝ 1/D). They must run side by side to finish by T, so T starts at the average rank
    load (times `slack`) and is raised by bisection until their degrees fit in the mesh; the other
    long units keep D_min and are packed around them like bins ("one length level per time step").
    `raised` memoises the units priced at a raised degree, keyed (seq index, D), across slacks."""
    hdp = cm.setup.hdp
    mesh = cm.setup.mesh
    if not base:
        return []
    raised = {} if raised is None else raised
    avg = slack * (short_work_s + sum(d * c for d, _, c, _ in base.values())) / hdp
    keys = list(base)
    d_min = np.array([base[i][0] for i in keys], dtype=float)
    time_s = np.array([base[i][2] for i in keys])

    def degree_array(T: float) -> np.ndarray:
        return np.minimum(hdp, np.maximum(d_min, np.ceil(d_min * time_s / T - 1e-9))).astype(np.int64)

    def degrees(T: float) -> dict[int, int]:
        return dict(zip(keys, degree_array(T).tolist()))

    def ranks_needed(T: float) -> int:
        """Ranks the units that would outlast T need side by side to finish by T (the others run
        one after another like packed bins)."""
        return int(degree_array(T)[time_s > T].sum())

    T = max(avg, 1e-12)
    if ranks_needed(T) > hdp:
        lo, hi = T, max(c for _, _, c, _ in base.values())
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if ranks_needed(mid) <= hdp else (mid, hi)
        T = hi
    target = degrees(T)
    new = [(i, nd) for i, nd in target.items() if nd > base[i][0] and (i, nd) not in raised]
    fits = [fit_degree(int(seqs.lengths[i]), nd, cm, base[i][1], max_slices=base[i][3]) for i, nd in new]
    times = _unit_times_s(cm, [[int(seqs.lengths[i])] for i, _ in new], [fd for fd, _, _ in fits],
                          [fr for _, fr, _ in fits], [mesh.group_spans_domains(fd) for fd, _, _ in fits])
    for key, (fd, fr, fn), c in zip(new, fits, times):
        raised[key] = (fd, fr, c * (1 + (cm.pp - 1) * _slice_peak(fn, pp_schedule)), fn)
    out = []
    for i, nd in target.items():
        d, r, c, n = base[i]
        if nd > d:
            nd, nr, nc, nn = raised[i, nd]
            if nc < c:
                d, r, c, n = nd, nr, nc, nn
        out.append((c, i, d, r, n))
    out.sort(key=lambda x: (-x[0] * x[2], -x[0]))  # largest rank-time area first (LPT for gangs)
    return out


def _cyclic_gc_paused(plan: Callable[..., Step]) -> Callable[..., Step]:
    """Run `plan` with Python's cyclic garbage collector paused (the previous setting restored after):
    a large step allocates ~10^5 acyclic objects (pieces, drafts, units, costs) that reference counting
    frees anyway, while the collector's full passes over them took a fifth of the time at 16,384 GPUs."""
    @functools.wraps(plan)
    def run(*args, **kwargs) -> Step:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return plan(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return run


@_cyclic_gc_paused
def plan_balance(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    """Alg. 2: the balance scheduler (DP-Balance without PP, PP-Balance with PP), never slower than a
    baseline on small steps (see _never_slower)."""
    step = _plan_pp_short_caps(batch, cm, opt) if cm.pp > 1 else _plan_dp_balance(batch, cm, opt)
    return _never_slower(batch, cm, opt, step)


NEVER_SLOWER_MAX_SEQUENCES = 256  # baselines as candidates up to here (dcp's loop grows ~ sequences × micro-batches)
# ... and above it when hdp's own plan is this far over its lower bound (hdp's plans sit at 1.00-1.24x in the
# benchmarks; the one loss found at scale, 512 GPUs pp 4 2M, was at 1.64x)
FAR_FROM_BOUND = 1.3


def _never_slower(batch: GlobalBatch, cm: CostModel, opt: PlanOptions, step: Step) -> Step:
    """Small steps (at most NEVER_SLOWER_MAX_SEQUENCES sequences and EXACT_SCORING_MAX_UNITS units, where the
    three plans cost tens of milliseconds), steps where hdp's plan is over FAR_FROM_BOUND x its lower bound, and
    ZeRO-3 steps: the baselines' plans, priced by the same simulator, are candidates too; the fastest that fits
    HBM (or needs no more memory than hdp's) is kept, hdp's on ties. On a few units heuristic balance can lose a
    few % to a baseline's regular layout. Larger steps near their bound keep hdp's own plan: the baselines would
    cost 5x hdp's planning at 32 GPUs with 32M tokens (3,587 sequences), where the layout candidates
    (_layout_candidates) win anyway."""
    # ZeRO-3 steps run in rounds that hdp's balance only approximates; dcp's lockstep micro-batches fit them
    # by construction, so there the baselines are always candidates (its plan time is not the scale target)
    small = len(batch.lengths_tokens) <= NEVER_SLOWER_MAX_SEQUENCES and len(step.units) <= EXACT_SCORING_MAX_UNITS
    far = step.predicted.step_time_s > FAR_FROM_BOUND * step.predicted.lower_bound_s
    if not (small or far or cm.setup.training.zero_stage == 3):
        return step
    mem_cap = max(cm.budget.hbm_bytes, max(step.predicted.peak_memory_bytes))
    # Without PP, DP-Balance already scored Alg. 1's placement exactly (replay + gradient sync = simulator)
    for plan in (static.plan_step, dcp.plan_step) + ((plan_naive,) if cm.pp > 1 else ()):
        try:
            other = plan(batch, cm, opt)
        except PlanError:  # the baseline cannot plan this batch (e.g. no aligned group holds a sequence)
            continue
        if opt.hdp.pp_v is not None and other.chunks_per_stage != opt.hdp.pp_v:
            continue  # the baselines never interleave: a pinned v (--pp-v, one v per run) rules them out
        if (other.predicted.step_time_s < step.predicted.step_time_s
                and max(other.predicted.peak_memory_bytes) <= mem_cap):
            step = other
    return step


def _plan_dp_balance(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    """DP-Balance (pp = 1)."""
    hdp = cm.setup.hdp
    seqs = SeqTable.of(batch)
    long_idx, short_idx, deg = _split(seqs, cm, opt.offload)
    short_cost = cm.doc_time_estimate_s(seqs.lengths[short_idx])
    gamma = cm.unit_overhead_s
    long_idx, short_idx, short_cost = _shard_heavy(seqs, long_idx, short_idx, short_cost, deg, cm)
    n_bins = max(1, int(np.ceil(seqs.lengths[short_idx].sum() / cm.capacity_tokens)))
    short_work = float(short_cost.sum()) + n_bins * gamma
    best = None
    base = _long_base(seqs, long_idx, deg, cm)
    raised: dict = {}
    # Every candidate has at least one unit per long sequence and one bin per C short tokens: when that
    # exceeds the exact-scoring limit, all are scored on the estimate, which a bound can prune.
    estimated = len(base) + n_bins > EXACT_SCORING_MAX_UNITS
    # The target makespan for long units is a guess (shorts must still fit around them): try a few
    # slacks and keep the plan with the smallest estimated finish (the first slack on ties); only that
    # one is finalised. Estimated candidates run in order of a lower bound on their finish and stop
    # once it shows they cannot win: in practice the bound is tight, so most never run.
    cands = [_long_units(seqs, base, cm, short_work, slack, raised=raised) for slack in opt.hdp.balance_slacks]
    cands += _layout_candidates(seqs, cands[0], cm)
    bounds = [_finish_bound(longs, short_cost, hdp) if estimated else 0.0 for longs in cands]
    for k in sorted(range(len(cands)), key=lambda k: (bounds[k], k)):
        cutoff = math.inf
        if best is not None and estimated:
            # a later slack must beat the best strictly; an earlier one wins a tie, so matching it is enough
            cutoff = best[1] if k > best[2] else math.nextafter(best[1], math.inf)
        if bounds[k] >= cutoff:
            continue
        placed = _dp_balance(seqs, short_idx, short_cost, cands[k], cm, opt, cutoff)
        if placed is None:  # provably no better than the best so far
            continue
        drafts, t = placed
        # Small steps: score with exact unit costs (the fit's few-% error can flip close calls).
        score = _replay_finish(drafts, cm, hdp) if len(drafts) <= EXACT_SCORING_MAX_UNITS else float(t.max())
        if best is None or (score, k) < (best[1], best[2]):
            best = (drafts, score, k)
    if len(best[0]) <= EXACT_SCORING_MAX_UNITS:
        # Alg. 1's placement is one more candidate: where candidates are scored exactly, the balance
        # scheduler is then never slower than naive HDP (a few units side by side can beat the gang LPT).
        naive = _naive_drafts(batch, cm, opt)
        if _replay_finish(naive, cm, hdp) < best[1]:
            best = (naive, 0.0, -1)
    return finalize(batch, best[0], cm, hdp, repack=True)  # ZeRO-3: bins and degrees may be re-shaped to rounds


def _shard_heavy(seqs: SeqTable, long_idx: np.ndarray, short_idx: np.ndarray, short_cost: np.ndarray,
                 deg: dict[int, tuple[int, float, int]], cm: CostModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(long, short, short cost) with every sequence that fits one rank (or pipeline) but alone outlasts
    the average load moved to the long path, which shards it (its deg entry set to (1, 0, 1)): it would
    be the step's critical path (large C, e.g. with full recompute, or fewer documents than pipelines)."""
    avg = (float(short_cost.sum()) + sum(deg[int(i)][0] * cm.doc_time_estimate_s(seqs.lengths[i], deg[int(i)][0])
                                         for i in long_idx)) / cm.setup.hdp
    heavy = short_cost > avg
    if not heavy.any():
        return long_idx, short_idx, short_cost
    deg.update({int(i): (1, 0.0, 1) for i in short_idx[heavy]})
    return np.concatenate([long_idx, short_idx[heavy]]), short_idx[~heavy], short_cost[~heavy]


EXACT_SCORING_MAX_UNITS = 600  # above this, candidates are compared on the fitted estimate (speed)


def _regrouped(seqs: SeqTable, longs: list[tuple[float, int, int, float, int]], cm: CostModel,
               degree: Callable[[int], int]) -> list[tuple[float, int, int, float, int]] | None:
    """`longs` with each unit's degree D raised to degree(D) (at most the mesh) and priced there, or
    None when no degree changes: Alg. 2's layouts that leave fewer holes between gangs (see the callers)."""
    hdp = cm.setup.hdp
    moved = [k for k, (_, _, d, _, _) in enumerate(longs) if d < min(hdp, degree(d))]
    if not moved:
        return None
    lengths = [int(seqs.lengths[longs[k][1]]) for k in moved]
    fits = [fit_degree(s, min(hdp, degree(longs[k][2])), cm, longs[k][3], max_slices=longs[k][4])
            for s, k in zip(lengths, moved)]
    times = _unit_times_s(cm, [[s] for s in lengths], [fd for fd, _, _ in fits], [fr for _, fr, _ in fits],
                          [cm.setup.mesh.group_spans_domains(fd) for fd, _, _ in fits])
    out = list(longs)
    for k, (fd, fr, fn), c in zip(moved, fits, times):
        out[k] = (c, longs[k][1], fd, fr, fn)
    out.sort(key=lambda x: (-x[0] * x[2], -x[0]))  # the order _long_units gives
    return out


def _layout_candidates(seqs: SeqTable, longs: list[tuple[float, int, int, float, int]],
                       cm: CostModel) -> list[list[tuple[float, int, int, float, int]]]:
    """Two more sets of long units for DP-Balance. A gang starts when the busiest of its ranks is free,
    so the others idle until then; odd degrees on a power-of-two mesh leave such holes everywhere
    (32 GPUs, 32M tokens: hdp 1,260 s against dcp's 1,173 s). (a) Units wider than half the mesh,
    which never run side by side, take the whole mesh (three 2M-token units on 30 of 32 ranks);
    (b) every degree rounded up to a power of two as well (dcp's aligned groups tile the mesh);
    (c) those degrees doubled: many equal gangs run in waves, and a last partial wave of long gangs
    outlasts the shorts beside it (prolong-like, 256 GPUs: 85 64K-token units on 4 ranks, 2.6 s each;
    on 8 ranks they take 1.3 s, the granularity dcp had)."""
    hdp = cm.setup.hdp
    out = []
    wide = _regrouped(seqs, longs, cm, lambda d: hdp if 2 * d > hdp else d)
    if wide is not None:
        out.append(wide)
    pow2 = _regrouped(seqs, wide or longs, cm, lambda d: 1 << (d - 1).bit_length())
    if pow2 is not None:
        out.append(pow2)
    doubled = _regrouped(seqs, pow2 or wide or longs, cm, lambda d: 2 * d)
    if doubled is not None:
        out.append(doubled)
    return out


def _finish_bound(longs: list[tuple[float, int, int, float, int]], short_cost: np.ndarray, hdp: int) -> float:
    """A lower bound on DP-Balance's estimated finish: no unit ends before its own time, and the
    busiest rank carries at least the mean load (less a margin for rounding in the sums)."""
    longest = max((c for c, *_ in longs), default=0.0)
    return max(longest, (sum(c * d for c, _, d, _, _ in longs) + float(short_cost.sum())) / hdp * (1 - 1e-9))


def _replay_finish(drafts: list[Draft], cm: CostModel, hdp: int) -> float:
    """Finish time of drafts run in planned order with exact unit costs (what the simulator will say)."""
    free = np.zeros(hdp)
    ordered = sorted(drafts, key=lambda d: (d.sort_key, d.ranks[0], len(d.ranks)))
    for d, cost in zip(ordered, _draft_times_s(ordered, cm)):
        idx = list(d.ranks)
        free[idx] = free[idx].max() + cost
    return float(free.max())


def _dp_balance(seqs: SeqTable, short_idx: np.ndarray, short_cost: np.ndarray,
                longs: list[tuple[float, int, int, float, int]], cm: CostModel,
                opt: PlanOptions, cutoff_s: float = math.inf) -> tuple[list[Draft], np.ndarray] | None:
    """DP-Balance placement; returns the drafts and the planned finish time of every rank, or None
    when, once the long units are placed, the finish provably cannot be below `cutoff_s`."""
    hdp = cm.setup.hdp
    per_domain = cm.setup.mesh.hdp_per_domain
    gamma = cm.unit_overhead_s
    t = np.zeros(hdp)
    drafts: list[Draft] = []
    t_max = 0.0  # loads only grow: the running maximum saves a pass over all ranks per unit
    domains = DomainLoads(t, per_domain)  # node_local_ranks, kept sorted per domain across units
    for c, i, d, r, _ in longs:
        ranks = domains.choose(d, opt.hdp.delta * t_max)
        idx = list(ranks)
        start = domains.start(idx)
        domains.assign(idx, start + c)
        t_max = max(t_max, start + c)
        drafts.append(Draft(ranks=ranks, pieces=[seqs.piece(i)], offload_ratio=r, sort_key=start))
    # Shorts only add load: the finish is at least the current maximum and the final mean (a margin
    # absorbs rounding in the sum), so a candidate that cannot reach the cutoff stops here.
    if max(t_max, (float(t.sum()) + float(short_cost.sum())) / hdp * (1 - 1e-9)) >= cutoff_s:
        return None
    # Short sequences, longest first, to the most-lagging rank's open bin (LPT over ranks).
    # Python lists and scalars: this loop runs once per short sequence (tens of thousands).
    C = cm.capacity_tokens
    loads = t.tolist()
    heap = [(x, r) for r, x in enumerate(loads)]
    heapq.heapify(heap)
    open_bin: dict[int, Draft] = {}
    room = [0] * hdp
    order = np.argsort(-short_cost, kind="stable")
    picked = short_idx[order]
    for seq, s, cost in zip(seqs.ids[picked].tolist(), seqs.lengths[picked].tolist(), short_cost[order].tolist()):
        r = heap[0][1]  # keys (load, rank) are unique: the least is the one a pop would return
        b = open_bin.get(r)
        if b is None or room[r] < s:
            b = Draft(ranks=(r,), pieces=[], sort_key=loads[r])
            drafts.append(b)
            open_bin[r] = b
            room[r] = C
            loads[r] += gamma
        b.pieces.append(Piece(seq, 0, s))
        room[r] -= s
        loads[r] += cost
        heapq.heapreplace(heap, (loads[r], r))
    return drafts, np.array(loads)


def _plan_pp_short_caps(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    """PP-Balance over candidates: long units at Alg. 2's degrees or capped against the fill and drain;
    short documents in C-token bins and, when those give a pipeline fewer than 4p micro-batches, also in
    smaller bins (every pipeline m ∈ {1, p, 2p} micro-batches' worth; capped also 4p, documents larger than
    a bin then sharded as long units): few C-token bins leave pipelines idle (8 documents of 4K tokens made
    one bin on one of two pipelines) and the 1F1B fill and drain, (p − 1)·max t, unhidden; with balanced_bins
    the best two again with bins of equal time. The fastest simulated plan that fits HBM is kept (the least
    peak when none fits)."""
    C = cm.capacity_tokens
    lengths = np.asarray(batch.lengths_tokens, dtype=np.int64)
    short = lengths[lengths <= C]
    hdp, p = cm.setup.hdp, cm.pp
    # (bin tokens, capped): long units at Alg. 2's balance degrees, or capped against the fill and drain
    cands = [(None, False)] + ([(None, True)] if (lengths > C).any() else [])
    if short.size and math.ceil(int(short.sum()) / C) < 4 * hdp * p:  # under 4p micro-batches per pipeline
        # Capped, documents longer than the bin go to the long path and get their degree there too (16
        # pipelines of 8 stages, C = 290K: one 263K-token document alone on a pipeline set a 5 s slice).
        # (uncapped bins at the LPT makespan: at the mean, 8 documents of a 4K step made 2 full bins and a 74-token
        # third, a micro-batch more on one of two pipelines)
        caps = {(lpt_makespan(short, hdp * m), False) for m in (1, p, 2 * p)}
        caps |= {(math.ceil(int(short.sum()) / (hdp * m)), True) for m in (1, p, 2 * p, 4 * p)}
        cands += sorted(c for c in caps if c[0] < C)
    # Candidates of large steps are compared at one chunk count (a simulation takes seconds there) and the
    # best get the search over v; small steps search v for every candidate.
    pinned = (opt.hdp.pp_v is not None or len(cands) == 1
              or len(batch.lengths_tokens) <= NEVER_SLOWER_MAX_SEQUENCES)
    screen = opt if pinned else replace(opt, hdp=replace(opt.hdp, pp_v=1))
    screened = []

    def screen_one(cap: int | None, capped: bool, balanced: bool) -> None:
        try:
            step = _plan_pp_balance(batch, cm, screen, short_cap=cap, capped=capped, balanced=balanced)
        except PlanError:  # co-scheduled lists deadlock at every interleaving: keep the plans that simulate
            if (cap, capped, balanced) == (None, False, False):
                raise
            return
        # pinned: the plan as it will be written; else by time alone (whether a plan fits HBM changes with v)
        key = _pp_key(step, cm) if pinned else (False, step.predicted.step_time_s)
        screened.append((key, len(screened), step, cap, capped, balanced))
        screened.sort(key=lambda x: x[:2])  # ties: the earlier candidate

    for cap, capped in cands:
        screen_one(cap, capped, False)
    if opt.hdp.balanced_bins:  # the two best bin sizes again with bins of equal time
        for *_, cap, capped, _ in screened[:2]:
            screen_one(cap, capped, True)
    if pinned:
        return screened[0][2]
    # The v search for: Alg. 2's plan (the first candidate: the plan before the others existed), the two fastest
    # best-fit candidates at one chunk count and an equal-time one among the two fastest overall (their order, and
    # whether they fit HBM, can change with v; the best-fit ones keep the plan balanced_bins=False gives).
    first = [x for x in screened if x[3:] == (None, False, False)]
    finals = {x[1]: x for x in first + [x for x in screened if not x[-1]][:2] + [x for x in screened[:2] if x[-1]][:1]}
    plans = [_plan_pp_balance(batch, cm, opt, short_cap=cap, capped=capped, balanced=balanced)
             for *_, cap, capped, balanced in sorted(finals.values(), key=lambda x: x[:2])]
    return min(plans, key=lambda st: _pp_key(st, cm))


def _pp_key(step: Step, cm: CostModel) -> tuple[bool, float]:
    """Order of PP-Balance candidates (fits_first)."""
    return fits_first(step.predicted.step_time_s, max(step.predicted.peak_memory_bytes), cm.budget.hbm_bytes)


PP_DEGREE_STEPS = 8  # with PP, degrees tried per long unit: D_min, then doublings up to the mesh


def _pp_capped_units(seqs: SeqTable, long_idx: np.ndarray, deg: dict[int, tuple[int, float, int]], cm: CostModel,
                     short_work_s: float, short_peak_s: float, sched: str) -> list[tuple[float, int, int, float, int]]:
    """(stage time, seq index, D, r, n) per long sequence, degrees chosen against the pipeline fill and drain.

    Under 1F1B a step takes about the mean stage load plus (p − 1) × the largest slice a pipeline runs,
    so a long unit on few pipelines (a 400K-token sequence on 2 of 32 pipelines: 25 s stages, 47 s of
    bubbles) costs every pipeline it shares a schedule with; a higher D shrinks the slice ~1/D at about
    the same rank-time area (less offload too). For a cap P on slice time each unit takes the smallest
    tried degree whose largest slice is ≤ P (the mesh when none is); P is the candidate with the least
    estimate max(mean load, longest unit) + (p − 1) · max(P, the largest short bin)."""
    hdp, p = cm.setup.hdp, cm.pp
    mesh = cm.setup.mesh
    keys = [int(i) for i in long_idx]
    if not keys:
        return []
    tries: list[tuple[int, int, float, int]] = []  # (row, D, r, n) per unit and degree tried
    for row, i in enumerate(keys):
        d, r, n = deg[i]
        seen = set()
        for k in range(PP_DEGREE_STEPS):
            want = min(hdp, d << k) if k else d
            # unsliced where memory allows: a sliced unit also holds fp32 dK/dV beside the other
            # micro-batches in flight, and pads its round's bins to its slice count
            fd, fr, fn = fit_degree(int(seqs.lengths[i]), want, cm, r, max_slices=1)
            if fd > hdp:
                fd, fr, fn = fit_degree(int(seqs.lengths[i]), want, cm, r, max_slices=n)
            if fd > hdp:
                break
            if fd in seen:
                continue
            seen.add(fd)
            tries.append((row, fd, fr, fn))
            if fd == hdp:
                break
    times = np.array(_unit_times_s(cm, [[int(seqs.lengths[keys[t[0]]])] for t in tries], [t[1] for t in tries],
                                   [t[2] for t in tries], [mesh.group_spans_domains(t[1]) for t in tries]))
    rows = np.array([t[0] for t in tries])
    degrees = np.array([t[1] for t in tries], dtype=float)
    peaks = times * np.array([_slice_peak(t[3], sched) for t in tries])
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # tries are grouped by row, degrees ascending
    widest = np.r_[starts[1:], len(tries)] - 1
    best: tuple[float, np.ndarray] | None = None
    for cap in np.unique(peaks):
        # per unit: the first (smallest) degree whose slice fits the cap, else its last (widest) one
        first = np.minimum.reduceat(np.where(peaks <= cap, np.arange(len(tries)), len(tries)), starts)
        pick = np.where(first < len(tries), first, widest)
        mean = (short_work_s + float((degrees[pick] * times[pick]).sum())) / hdp
        est = max(mean, float(times[pick].max())) + (p - 1) * max(float(peaks[pick].max()), short_peak_s)
        if best is None or est < best[0]:
            best = (est, pick)
    out = [(float(times[j]), keys[rows[j]], int(degrees[j]), tries[j][2], tries[j][3]) for j in best[1]]
    out.sort(key=lambda x: (-x[0] * x[2], -x[0]))  # largest rank-time area first, as _long_units
    return out


BALANCED_PACK_SCAN = 32  # least-loaded bins a document tries before the best fit among all bins with room


def cost_balanced_pack(lengths: np.ndarray, costs: np.ndarray, order: np.ndarray, capacity: int,
                       n_bins: int) -> list[list[int]]:
    """Bins of about equal time under the token cap: n_bins bins (more only when a document fits none), each
    document (index into lengths and costs, taken in `order`, longest first) to the bin of least cost with
    room among the BALANCED_PACK_SCAN least loaded, else to the fullest bin it fits (near-full bins would
    make a least-cost search scan them all). Best-fit bins hold equal tokens, and their times differ with
    Σl² (attention); under 1F1B uneven micro-batches leave their difference idle on every stage. DistCA's
    observation: micro-batches balance only when both Σl (memory, linear layers) and Σl² (attention) match;
    the token cap holds the first, the least-cost choice the second."""
    import bisect

    load = [0.0] * n_bins
    room = [capacity] * n_bins
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    heap = [(0.0, b) for b in range(n_bins)]  # (load, bin), lazily refreshed
    rooms = [(capacity, b) for b in range(n_bins)]  # (room, bin), sorted
    for i in order:
        s, c = int(lengths[i]), float(costs[i])
        seen, b = [], None
        while heap and len(seen) < BALANCED_PACK_SCAN:
            x = heapq.heappop(heap)
            if x[0] != load[x[1]]:  # stale entry
                continue
            seen.append(x)
            if room[x[1]] >= s:
                b = x[1]
                break
        for x in seen:
            if x[1] != b:
                heapq.heappush(heap, x)
        if b is None:
            k = bisect.bisect_left(rooms, (s, -1))
            if k < len(rooms):
                b = rooms[k][1]
            else:  # no bin has room: open one
                b = len(bins)
                bins.append([])
                load.append(0.0)
                room.append(capacity)
                rooms.insert(bisect.bisect_left(rooms, (capacity, b)), (capacity, b))
        rooms.pop(bisect.bisect_left(rooms, (room[b], b)))
        bins[b].append(int(i))
        room[b] -= s
        load[b] += c
        bisect.insort(rooms, (room[b], b))
        heapq.heappush(heap, (load[b], b))
    return [b for b in bins if b]


def _plan_pp_balance(batch: GlobalBatch, cm: CostModel, opt: PlanOptions, naive: bool = False,
                     short_cap: int | None = None, capped: bool = False, balanced: bool = False) -> Step:
    """PP-Balance: pipelines as ranks, 1F1B estimate Σt + (p−1)·max t, sharded units slot-aligned.
    naive=True is Alg. 1 under PP: the same slot alignment (without it 1F1B lists deadlock), but
    memory-minimal degrees, pipelines taken in index order, bins dealt round-robin, no slicing.
    short_cap: tokens per bin of short documents (C when None); capped: long units' degrees capped against the
    fill and drain (_pp_capped_units); balanced: bins of equal time instead of best-fit (cost_balanced_pack)."""
    hdp = cm.setup.hdp
    p = cm.pp
    mesh = cm.setup.mesh
    seqs = SeqTable.of(batch)
    sliced = opt.hdp.pp_schedule != "1f1b" and not naive
    long_idx, short_idx, deg = _split(seqs, cm, opt.offload, opt.hdp.max_slices if sliced else 1)
    C = cm.capacity_tokens
    short_cost = cm.doc_time_estimate_s(seqs.lengths[short_idx])
    gamma = cm.unit_overhead_s
    if not naive:
        long_idx, short_idx, short_cost = _shard_heavy(seqs, long_idx, short_idx, short_cost, deg, cm)
    if capped and short_cap is not None:  # documents longer than a bin: sharded or alone, as the cap decides
        big = seqs.lengths[short_idx] > short_cap
        deg.update({int(i): (1, 0.0, 1) for i in short_idx[big]})
        long_idx, short_idx, short_cost = np.concatenate([long_idx, short_idx[big]]), short_idx[~big], short_cost[~big]
    n_bins = max(1, int(np.ceil(seqs.lengths[short_idx].sum() / C)))
    sched = opt.hdp.pp_schedule if sliced else "1f1b"
    order = short_idx[np.argsort(-seqs.lengths[short_idx], kind="stable")]
    bins = best_fit_pack(seqs.lengths, order, short_cap or C)
    if balanced:
        costs = np.zeros(len(seqs.lengths))
        costs[short_idx] = short_cost
        bins = cost_balanced_pack(seqs.lengths, costs, order, short_cap or C, len(bins))
    cost_of = dict(zip(short_idx.tolist(), short_cost.tolist()))
    bin_cost = [gamma + sum(cost_of[i] for i in b) for b in bins]
    if capped:
        longs = _pp_capped_units(seqs, long_idx, deg, cm, float(short_cost.sum()) + n_bins * gamma,
                                 max(bin_cost, default=0.0), sched)
    elif naive:
        keys = [int(i) for i in long_idx]
        times = _unit_times_s(cm, [[int(seqs.lengths[i])] for i in keys], [deg[i][0] for i in keys],
                              [deg[i][1] for i in keys], [mesh.group_spans_domains(deg[i][0]) for i in keys])
        longs = sorted(((c, i, *deg[i]) for i, c in zip(keys, times)), key=lambda x: -int(seqs.lengths[x[1]]))
    else:
        longs = [(c / (1 + (p - 1) * _slice_peak(n, sched)), i, d, r, n)  # back to the stage time
                 for c, i, d, r, n in _long_units(seqs, _long_base(seqs, long_idx, deg, cm, sched), cm,
                                                  float(short_cost.sum()) + n_bins * gamma, pp_schedule=sched)]
    total = np.zeros(hdp)  # Σ t_μ per pipeline (per stage)
    worst = np.zeros(hdp)  # max t_μ per pipeline
    count = np.zeros(hdp, dtype=int)  # micro-batch slots used per pipeline
    drafts: list[Draft] = []

    def est(r: np.ndarray) -> np.ndarray:
        return total[r] + (p - 1) * worst[r]

    def put(ranks: tuple[int, ...], pieces, r: float, c: float, n: int = 1) -> None:
        idx = list(ranks)
        drafts.append(Draft(ranks=ranks, pieces=pieces, offload_ratio=r, sort_key=float(count[idx].max()), slices=n))
        total[idx] += c
        worst[idx] = np.maximum(worst[idx], c * _slice_peak(n, sched))
        count[idx] = count[idx].max() + 1

    queue = [int(k) for k in np.argsort(-np.array(bin_cost), kind="stable")]

    def put_bin(r: int, n: int = 1) -> None:
        k = queue.pop(0)
        put((r,), [seqs.piece(i) for i in bins[k]], 0.0, bin_cost[k], n)

    # Sharded units in rounds: all pipelines of the lowest slot level take the round's units; the
    # level's pipelines left over take a bin each, so the level stays aligned for the next round.
    pending = list(longs)
    while pending:
        level = int(count.min())
        free = np.flatnonzero(count == level)
        left, chosen = [], []
        for c, i, d, r, n in pending:
            if d <= len(free):
                if naive:
                    ranks = tuple(int(x) for x in free[:d])
                else:
                    per_domain = mesh.hdp_per_domain if len(free) == hdp else len(free) + 1
                    local = node_local_ranks(est(free), d, per_domain, 0.0)
                    ranks = tuple(sorted(int(free[j]) for j in local))
                chosen.append((ranks, i, r, c))
                free = np.setdiff1d(free, ranks)
            else:
                left.append((c, i, d, r, n))
        # Every unit of a round takes the round's largest slice count, padding bins included: member
        # pipelines of later shared units then have identical slice sequences, hence identical op order.
        n_round = max((n for c, i, d, r, n in pending if any(i == x[1] for x in chosen)), default=1)
        for ranks, i, r, c in chosen:
            put(ranks, [seqs.piece(i)], r, c, n_round)
        placed = bool(chosen)
        pending = left
        for r in (free if naive else free[np.argsort(est(free), kind="stable")]):
            if not queue:
                break
            put_bin(int(r), n_round)
            placed = True
        if not placed and pending:  # no bins left to realign: place unaligned; the simulator checks it
            c, i, d, r, n = pending.pop(0)
            ranks = tuple(sorted(int(x) for x in np.argsort(est(np.arange(hdp)), kind="stable")[:d]))
            put(ranks, [seqs.piece(i)], r, c, n)
    # Remaining bins, costliest first, to the pipeline with the smallest 1F1B estimate.
    while queue:
        put_bin(int(np.argmin(count)) if naive else int(np.argmin(est(np.arange(hdp)))))
    sliced_any = any(d.slices > 1 for d in drafts)
    section = PipelineSection(opt.hdp.pp_schedule if sliced_any else "1f1b",
                              max_chunks=opt.hdp.redistribute_max_chunks)
    if naive:
        return finalize(batch, drafts, cm, hdp, pipeline=section)
    return _fastest_chunking(batch, drafts, cm, hdp, section, opt.hdp.pp_v)


MAX_CHUNKS_PER_STAGE = 8  # interleaving depth tried by PP-Balance (deeper adds P2P hops for little gain)


def chunk_candidates(layers_per_stage: int, pinned: int | None = None, max_v: int | None = None) -> list[int]:
    """Model chunks per stage to try: v = 1 and the three smallest divisors of the stage's layers up
    to MAX_CHUNKS_PER_STAGE (a chunk holds whole layers) and to `max_v` (⌊L/pp⌋ where stages are uneven: every
    chunk of the pipeline needs a layer); only `pinned` when given."""
    top = min(layers_per_stage, MAX_CHUNKS_PER_STAGE, max_v or layers_per_stage)
    if pinned is not None:
        if pinned < 1 or layers_per_stage % pinned or pinned > (max_v or layers_per_stage):
            raise PlanError(f"pp_v = {pinned} must divide the {layers_per_stage} layers of a pipeline stage"
                            + (f" and be at most {max_v}, so that each of the pp x v chunks gets a layer"
                               if max_v and max_v < layers_per_stage else ""))
        return [pinned]
    return [1] + [d for d in range(2, top + 1) if layers_per_stage % d == 0][:3]


def _fastest_chunking(batch: GlobalBatch, drafts: list[Draft], cm: CostModel, hdp: int, section: PipelineSection,
                      pinned: int | None) -> Step:
    """Simulate the step for each chunk count v (interleaving, SlimPipe's n·v slice-chunks) with the
    section as given (one simulation each) and finalise the fastest whose simulated peak memory fits
    HBM (v = 1 when none does) with its schedule variants. Slice counts stay those memory chose (the fewest that
    fit): each slice runs its GEMMs and kernels at its own tokens (planner.simulate.pipelined.sliced_pass_s), so
    more slices than memory needs cost time, and the search does not try them."""
    candidates = chunk_candidates(cm.layers_per_stage, pinned, cm.model.layers // cm.pp)

    def section_for(v: int) -> PipelineSection:
        sched = section.schedule if section.schedule != "1f1b" or v == 1 else "interleaved"
        return replace(section, schedule=sched, v=v)

    if len(candidates) == 1:
        return finalize(batch, drafts, cm, hdp, pipeline=section_for(candidates[0]))
    best: tuple | None = None
    for v in candidates:
        try:
            step = finalize(batch, drafts, cm, hdp, pipeline=section_for(v), variants=False)
        except PlanError:
            if v == 1:
                raise
            continue  # pipelines sharing units disagree on this interleaving (a deadlock): skip it
        fits = max(step.predicted.peak_memory_bytes) <= cm.budget.hbm_bytes
        key = (not fits, step.predicted.step_time_s if fits else float(v != 1))  # none fits: v = 1
        if best is None or key < best[0]:
            best = (key, v, step)
    if section.schedule != "sliced-redistributed":  # no variants to settle: the step is final
        return best[2]
    return finalize(batch, drafts, cm, hdp, pipeline=section_for(best[1]))
