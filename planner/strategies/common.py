"""Building blocks every strategy shares: unit drafts, best-fit packing, rank-set choice,
and `finalize`, which numbers units, orders them deadlock-free, prices them with the cost model
and simulates the step. A strategy only decides *which* units exist and roughly *when*."""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass

import numpy as np

from costmodel.memory import (min_degree, offload_allowed, offload_lower_bound, offload_ratio_for_tokens,
                              offload_ratio_max, sliced_capacity_tokens)
from costmodel.timing import CostModel
from planner.workload import GlobalBatch
from planner.plan import Piece, PipelineSection, PlanError, Predicted, Sequence, Step, Unit, zigzag_tokens_per_rank
from planner.simulate import inflight_weights, simulate_step
from planner.simulate.step import price_units_of
from planner.strategies.cp_kinds import choose_cp_kinds
from planner.strategies.rounds import round_layouts


@dataclass
class Draft:
    """A unit before numbering: which ranks, which pieces, the planned start for ordering."""

    ranks: tuple[int, ...]
    pieces: list[Piece]
    offload_ratio: float = 0.0
    sort_key: float = 0.0  # planned start (strategy estimate) or round index; ids follow it
    slices: int = 1  # pipeline slices (PP only)

    @property
    def lengths(self) -> list[int]:
        return [p.tokens for p in self.pieces]


@dataclass
class SeqTable:
    """The step's sequences as arrays (planning touches thousands of them)."""

    ids: np.ndarray  # int64
    lengths: np.ndarray  # int64 tokens

    @classmethod
    def of(cls, batch: GlobalBatch) -> "SeqTable":
        return cls(np.asarray(batch.seq_ids, dtype=np.int64), np.asarray(batch.lengths_tokens, dtype=np.int64))

    def piece(self, i: int) -> Piece:
        return Piece(int(self.ids[i]), 0, int(self.lengths[i]))


def check_fits(s_max: int, cm: CostModel, hdp: int, offload: bool, max_slices: int = 1) -> None:
    """A sequence longer than the mesh can hold, after the offload and slicing the strategy may use,
    is a clear PlanError that says how many ranks it would need."""
    need = long_degree(s_max, cm, offload, max_slices)[0]
    if need > hdp:
        how = "with offload" if offload and offload_allowed(cm.setup.training.recompute) else "without offload"
        raise PlanError(f"a {s_max}-token sequence needs {need} HDP ranks at C = {cm.capacity_tokens} tokens/rank "
                        f"({how}), but the mesh has {hdp}; add GPUs, raise tp/pp, change --recompute, or lower "
                        "--max-context")


def slice_capacity(cm: CostModel, slices: int) -> float:
    """Tokens per rank a unit of `slices` pipeline slices may hold on this cost model's mesh."""
    return sliced_capacity_tokens(cm.capacity_tokens, cm.pp, slices, cm.dkv_ratio)


def ratio_for_tokens(tokens_per_rank: int, cm: CostModel, slices: int = 1) -> float | None:
    """Smallest offload ratio that fits the padded per-rank tokens of a unit of `slices` slices
    (costmodel.memory.offload_ratio_for_tokens); None when even r = 1 is not enough."""
    return offload_ratio_for_tokens(tokens_per_rank, slice_capacity(cm, slices), cm.layers_per_stage)


def fit_degree(s: int, d: int, cm: CostModel, r_cap: float, pow2: bool = False,
               max_slices: int = 1) -> tuple[int, float, int]:
    """Raise d until the zigzag-padded per-rank share fits with an offload ratio ≤ r_cap and some
    slice count ≤ max_slices; returns (d, smallest such r, smallest such n). pow2 keeps d a power of
    two (Megatron's aligned groups)."""
    while True:
        tokens = zigzag_tokens_per_rank([s], d)
        n = 1
        while True:
            r = ratio_for_tokens(tokens, cm, n)
            if r is not None and r <= r_cap + 1e-12:
                return d, r, n
            if n >= max_slices:
                break
            n = min(max_slices, n * 2)
        d = d * 2 if pow2 else d + 1


def long_degree(s: int, cm: CostModel, offload: bool, max_slices: int = 1,
                r_max: float | None = None) -> tuple[int, float, int]:
    """ByteScale's (D, r) for a sequence, plus SlimPipe's slice count n with PP: the smallest D
    reachable with an offload ratio whose copies hide under compute (r ≤ r_max, and only if r_max
    clears Eq. 3's lower bound) and n ≤ max_slices; then the smallest r and n that reach it
    (REFERENCE 2.5, 6, decisions 9 and 20). Short sequences (s ≤ C) get (1, 0, 1). `r_max`: offload_r_max(s)
    when the caller priced it in a batch."""
    C, l = cm.capacity_tokens, cm.layers_per_stage
    if s <= C:
        return 1, 0.0, 1
    r_cap = 0.0
    if offload and l > 2 and offload_allowed(cm.setup.training.recompute):
        r_max = offload_r_max(s, cm) if r_max is None else r_max
        if r_max >= offload_lower_bound(s, C, l):
            r_cap = r_max
    n_max = max_slices if cm.pp > 1 else 1
    d_start = max(1, min_degree(s, int(slice_capacity(cm, n_max)), r_cap, l))
    return fit_degree(s, d_start, cm, r_cap, max_slices=n_max)


def offload_r_max(s: int, cm: CostModel) -> float:
    """costmodel.memory.offload_ratio_max of one layer's activations of an s-token sequence."""
    return offload_r_maxes(np.array([s]), cm)[0]


def offload_r_maxes(lengths: np.ndarray, cm: CostModel) -> list[float]:
    """offload_r_max of many sequences, each lookup done for all of them at once."""
    s = np.asarray(lengths, dtype=np.int64)
    act = s * cm.a_tok
    fwd = (cm.gemm_layer_fwd_s(s) + cm.doc_attn_s(s, "fwd")).tolist()
    d2h, h2d = cm.host_copy_s(act, "d2h").tolist(), cm.host_copy_s(act, "h2d").tolist()
    return [offload_ratio_max(f, a, x, y) for f, a, x, y in zip(fwd, act.tolist(), d2h, h2d)]


def best_fit_pack(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item (index into lengths, taken in `order`) goes to the open bin with
    the least room that still fits it, else opens a bin. O(n log n) with a sorted list of rooms."""
    import bisect

    rooms: list[tuple[int, int]] = []  # (room, bin index), sorted
    bins: list[list[int]] = []
    for i in order:
        s = int(lengths[i])
        k = bisect.bisect_left(rooms, (s, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
            bins[b].append(int(i))
            if room - s > 0:
                bisect.insort(rooms, (room - s, b))
        else:
            bins.append([int(i)])
            if capacity - s > 0:
                bisect.insort(rooms, (capacity - s, len(bins) - 1))
    return bins


def lpt_makespan(lengths: np.ndarray, bins: int) -> int:
    """The fullest bin's tokens when the items go longest first to the emptiest of `bins` bins (LPT): a bin size at
    which they pack into about that many bins, where the mean (sum / bins) leaves a remainder for one more."""
    import heapq

    loads = [0] * max(1, bins)
    for s in sorted((int(x) for x in lengths), reverse=True):
        heapq.heapreplace(loads, loads[0] + s)
    return max(loads)


def least_loaded(loads: np.ndarray, d: int) -> np.ndarray:
    """The d least-loaded ranks, ties to the lowest index (the set `argsort(loads, kind="stable")[:d]`
    picks), unsorted; O(n) by partition instead of a full sort (planners ask this per unit)."""
    if d >= len(loads):
        return np.arange(len(loads))
    v = np.partition(loads, d - 1)[d - 1]  # the d-th smallest load: all below it, then ties by index
    below = np.flatnonzero(loads < v)
    return np.concatenate([below, np.flatnonzero(loads == v)[: d - len(below)]])


def node_local_ranks(loads: np.ndarray, d: int, per_node: int, slack_s: float) -> tuple[int, ...]:
    """The d least-loaded ranks, moved inside one node (or onto whole contiguous nodes) when that
    delays the unit's start by at most `slack_s` (REFERENCE decision 3: prefer one node)."""
    return DomainLoads(np.asarray(loads, dtype=float), per_node).choose(d, slack_s)


class DomainLoads:
    """Per-rank loads kept for `node_local_ranks`'s choice unit after unit (DP-Balance asks it per long
    unit): a heap of (load, rank) over all ranks answers "the d least-loaded, ties to the lowest index"
    in O(d log n), and per node (NVLink domain) its loads sorted plus, for each j, a heap over nodes of
    their j-th smallest load answers "the node where d ranks start earliest" in O(log nodes). Heaps are
    lazy: `assign` pushes fresh entries and stale ones are dropped when they surface: a rank's entry is stale
    once its version is older, a node's entry (value, node) in heap j once the node's j-th smallest load is
    another value (so `assign` pushes only the positions whose value changed, about 5 of 8).
    Nodes are whole blocks of `per_node` ranks from rank 0; a remainder belongs to none. `loads` (a
    float array) is updated in place."""

    def __init__(self, loads: np.ndarray, per_node: int) -> None:
        n = len(loads)
        self.loads = loads
        self.per_node = per_node
        self.nodes = n // per_node if n > per_node else 0  # the one-node choice needs more than one node
        self._load: list[float] = loads.tolist()
        self._ver = [0] * n  # an entry (load, rank, version) is current while its version is the rank's
        self._heap = sorted(zip(self._load, range(n), self._ver))  # a sorted list is a heap
        self._node_sorted: list[list[tuple[float, int]]] = []  # per node: (load, rank), ascending
        self._node_heaps: list[list[tuple[float, int]]] = [[] for _ in range(per_node if self.nodes else 0)]
        for k in range(self.nodes):
            self._node_sorted.append(sorted(zip(self._load[k * per_node:(k + 1) * per_node],
                                                range(k * per_node, (k + 1) * per_node))))
        for j, heap in enumerate(self._node_heaps):
            heap.extend((ns[j][0], k) for k, ns in enumerate(self._node_sorted))
            heapq.heapify(heap)

    def assign(self, ranks: list[int], load: float) -> None:
        """Set the load of `ranks` (a unit placed on them runs until `load`)."""
        self.loads[ranks] = load
        per, loads, ver, heap, push = self.per_node, self._load, self._ver, self._heap, heapq.heappush
        touched = set()
        for r in ranks:
            loads[r] = load
            ver[r] += 1
            push(heap, (load, r, ver[r]))
            if r // per < self.nodes:
                touched.add(r // per)
        for k in touched:
            old = self._node_sorted[k]
            ns = sorted(zip(loads[k * per:(k + 1) * per], range(k * per, (k + 1) * per)))
            self._node_sorted[k] = ns
            for j, node_heap in enumerate(self._node_heaps):
                if ns[j][0] != old[j][0]:
                    push(node_heap, (ns[j][0], k))

    def start(self, ranks: list[int]) -> float:
        """When a unit on `ranks` can start: their largest load."""
        return max(self._load[r] for r in ranks)

    def _top(self) -> tuple[float, int, int]:
        heap, ver = self._heap, self._ver
        while heap[0][2] != ver[heap[0][1]]:
            heapq.heappop(heap)
        return heap[0]

    def least(self, d: int) -> list[int]:
        """The d least-loaded ranks, ties to the lowest index (`least_loaded`), in (load, rank) order."""
        if 4 * d > len(self._load):  # most of the heap: one partition is cheaper
            return least_loaded(self.loads, d).tolist()
        heap, ver, out = self._heap, self._ver, []
        while len(out) < d:
            e = heapq.heappop(heap)
            if e[2] == ver[e[1]]:
                out.append(e)
        for e in out:
            heapq.heappush(heap, e)
        return [r for _, r, _ in out]

    def _best_node(self, d: int) -> tuple[float, int]:
        """(the d-th smallest load in node k, k), least first, ties to the lowest k."""
        heap, ns = self._node_heaps[d - 1], self._node_sorted
        while heap[0][0] != ns[heap[0][1]][d - 1][0]:
            heapq.heappop(heap)
        return heap[0]

    def choose(self, d: int, slack_s: float) -> tuple[int, ...]:
        """The d least-loaded ranks, moved inside one node (or onto whole contiguous nodes) when that
        delays the unit's start by at most `slack_s` (REFERENCE decision 3: prefer one node); sorted."""
        per_node, n = self.per_node, len(self._load)
        best = None
        if d <= per_node and self.nodes:
            start, k = self._best_node(d)  # start time if the unit stays in node k
            # The global start is at least the least load: within the slack of that, the node wins unseen.
            if start > self._top()[0] + slack_s:
                best = self.least(d)
            if best is None or start <= max(self._load[r] for r in best) + slack_s:
                return tuple(sorted(r for _, r in self._node_sorted[k][:d]))
        if best is None:
            best = self.least(d)
        if d > per_node and d % per_node == 0 and n > d:
            best_start = max(self._load[r] for r in best)
            nodes_needed = d // per_node
            nodes = n // per_node
            node_max = self.loads[: nodes * per_node].reshape(nodes, per_node).max(axis=1)
            win = np.lib.stride_tricks.sliding_window_view(node_max, nodes_needed).max(axis=1)  # start per window
            k = int(np.argmin(win))
            if win[k] <= best_start + slack_s:
                return tuple(range(k * per_node, (k + nodes_needed) * per_node))
        return tuple(sorted(best))


def finalize(batch: GlobalBatch, drafts: list[Draft], cm: CostModel, hdp: int,
             pipeline: PipelineSection | None = None, variants: bool = True, rounds_formed: bool = False,
             cp_kinds: tuple[str, ...] = (), repack: bool = False) -> Step:
    """Number drafts by planned start (ties: lowest rank), order every rank by increasing id — a
    total order, hence deadlock-free (REFERENCE decision 10) — price each unit and simulate. ZeRO-3: the
    drafts are first laid out in rounds (planner.strategies.rounds; `repack`: the strategy's one-rank bins
    may be re-packed and its one-document units re-degreed), each layout simulated, the fastest kept."""
    if cm.setup.training.zero_stage == 3 and not rounds_formed:
        steps = [finalize(batch, layout, cm, hdp, pipeline, variants, rounds_formed=True, cp_kinds=cp_kinds)
                 for layout in round_layouts(drafts, cm, hdp, repack)]
        return min(steps, key=lambda st: fits_first(st.predicted.step_time_s, max(st.predicted.peak_memory_bytes),
                                                    cm.budget.hbm_bytes))
    drafts = sorted(drafts, key=lambda d: (d.sort_key, d.ranks[0], len(d.ranks)))
    ids = list(range(len(drafts)))
    ranks = [tuple(sorted(d.ranks)) for d in drafts]
    pieces = [tuple(d.pieces) for d in drafts]
    ratios = [math.ceil(d.offload_ratio * 1e6) / 1e6 for d in drafts]
    # Price every unit once, before the units exist: the plan records each unit's time and per-rank tokens
    # (price_units' zigzag count), and the simulations below reuse the prices.
    # cp_kinds (PlanOptions.cp_kinds): each sharded unit's context-parallel kind, chosen by its price
    kinds = choose_cp_kinds(ranks, pieces, ratios, cm, cp_kinds) if cp_kinds else ()
    costs = price_units_of(ids, ranks, pieces, ratios, cm, *kinds)
    units = list(map(Unit, ids, ranks, pieces, ratios, (d.slices for d in drafts),  # Unit's fields, in order
                     costs.last.total_s.tolist(), costs.last.tokens_per_rank.tolist(), *kinds))
    order: dict[int, list[int]] = {r: [] for r in range(hdp)}
    for uid, rs in zip(ids, ranks):
        for r in rs:
            order[r].append(uid)
    step = Step(step=batch.step, global_tokens=int(np.sum(batch.lengths_tokens)),
                sequences=list(map(Sequence, np.asarray(batch.seq_ids, dtype=np.int64).tolist(),
                                   np.asarray(batch.lengths_tokens, dtype=np.int64).tolist())),
                units=units, order=order,
                pipeline=(pipeline or PipelineSection()) if cm.pp > 1 else None,
                predicted=Predicted(step_time_s=0.0, lower_bound_s=0.0, per_rank_busy_s=[0.0] * hdp,
                                    peak_memory_bytes=[0.0] * hdp))
    if step.pipeline is None:
        sim = simulate_step(step, cm, costs)
    else:
        step, sim = _best_schedule(step, cm, costs, inflight_weights(step, cm, costs), variants)
    step.predicted = sim.predicted()
    return step


def with_cp_kinds(batch: GlobalBatch, step: Step, cm: CostModel, cp_kinds: tuple[str, ...]) -> Step:
    """A planned step through finalize again, each unit's context-parallel kind chosen from `cp_kinds`
    (PlanOptions.cp_kinds; planner.strategies.registry applies it to every strategy): the same units, ranks,
    slices and order (ids kept as sort keys), then priced and simulated afresh."""
    # finalize rounds ratios up to 1e-6; less than that below a recorded ratio rounds back to the same value
    drafts = [Draft(u.hdp_ranks, list(u.pieces), u.offload_ratio - 1e-9 if u.offload_ratio else 0.0, float(u.id),
                    u.slices) for u in step.units]
    pipeline = dataclasses.replace(step.pipeline, weights=None) if step.pipeline is not None else None
    return finalize(batch, drafts, cm, len(step.order), pipeline, variants=False, rounds_formed=True,
                    cp_kinds=cp_kinds)


def _best_schedule(step: Step, cm: CostModel, costs, weights: dict[int, float], variants: bool = True):
    """The step's pipeline section, settled by simulation: a token-weighted (memory-faithful) 1F1B
    in-flight budget, or the count-based one where pipelines sharing units disagree on the weighted
    order (a deadlock; the count-based lists always agree, shared units sitting at the same positions
    after the same slice counts). With "sliced-redistributed" and `variants`, plain "sliced" is tried
    too: the transfers only pay off when slices are uneven enough (SlimPipe's threshold, per step).
    Keeps the fastest variant whose peak memory fits HBM (else the least memory)."""
    base = dataclasses.replace(step.pipeline, weights=None)
    plans = [base]
    if variants and base.schedule == "sliced-redistributed":  # plain first: it wins ties
        plans.insert(0, dataclasses.replace(base, schedule="sliced"))
    hbm = cm.budget.hbm_bytes
    best = None
    for sec in plans:
        sim = None
        for cand in (dataclasses.replace(step, pipeline=dataclasses.replace(sec, weights=weights)),
                     dataclasses.replace(step, pipeline=sec)):
            try:
                sim = simulate_step(cand, cm, costs)
                break
            except PlanError:
                if cand.pipeline is sec:
                    raise
        key = fits_first(sim.step_time_s, max(sim.peak_memory_bytes), hbm)
        if best is None or key < best[0]:
            best = (key, cand, sim)
    return best[1], best[2]


def fits_first(time_s: float, peak_bytes: float, hbm_bytes: float) -> tuple[bool, float]:
    """Sort key of candidate plans: those that fit HBM first, by time; the others by their peak (least first)."""
    fits = peak_bytes <= hbm_bytes
    return not fits, time_s if fits else peak_bytes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
