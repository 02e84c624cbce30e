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
and for d = 1 its attention plus its tokens' share of a full C-token bin, γ being the bin's fixed cost
(model.BinPrice: exact for full bins). Groups are laid
out contiguously; sizes of a divisor chain of the node (1, 2, 4, 8 on 8-GPU nodes) never cross a
node boundary, other sizes are priced as if they did. So T + gradient sync is the step time the
simulator reports, up to bucketing (members of a bucket differ from its mean), bin packing (best
fit may need more bins than ⌈tokens/C⌉; the last bin of a rank is partial) and odd-sized groups that land
inside a node (cheaper).

Size reduction (REFERENCE 4.2): one exact item per distinct long length, and per the longest short
lengths up to EXACT_ITEMS; the other short sequences in `IlpOptions.buckets` classes cut by FlexSP's
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

Time. One deadline covers the call; by default each phase stops at its share of the time left, so the
plan depends on how busy the machine is. IlpOptions.deterministic replaces those shares by work limits
(column-generation rounds, branch-and-bound nodes, CP-SAT's deterministic time; backends.Effort) sized for
DET_SHARE of the limit on an idle core; the deadline then only guards, and the note names a phase it stopped.

A static partition cannot re-group ranks in the middle of a step (hdp can: a long unit on 16 ranks,
then bins on each), so on some batches hdp beats this "optimum"; the plan's meta reports both.

Where the parts live (this package; its SolverInfo report, per step, is in planner/strategies/outcome.py):
  model.py           items and DP buckets, cost tables (Pricer), area bound, pruning, the linear model
  partitions.py      Partition, greedy warm starts, local search, completion of partial partitions
  configurations.py  the configuration LP bound, pool partitions, the integer configuration model
  backends.py        CBC, HiGHS, CP-SAT; solve (and solve_job, the entry of a separate solver process)
  __init__.py        IlpOptions, solve_step / plan_step: from a solution to units, and the strategy itself
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from costmodel.timing import CostModel
from planner.workload import GlobalBatch
from planner.plan import PlanError, Step, zigzag_tokens_per_rank
from planner.strategies.common import (Draft, SeqTable, best_fit_pack, check_fits, finalize, long_degree,
                                       ratio_for_tokens)
from planner.strategies.hdp import plan_balance
from planner.strategies.ilp.backends import (BACKENDS, PRESOLVE_S_PER_NONZERO, REL_GAP, SOLVERS, Effort, Solution,
                                             Solver, solve, solve_job)
from planner.strategies.ilp.configurations import (BISECT_TOL, ConfigBound, ConfigLP, config_bound, enumerate_configs,
                                                   integer_model, integer_search, knapsack, lp_engine, pool_partition)
from planner.strategies.ilp.model import (Items, Pricer, StepModel, Table, area_bound_s, build_model, make_items,
                                          make_table, node_local_sizes, padding_buckets, prune)
from planner.strategies.ilp.partitions import Partition, fill_partition, makespan_s, partition_to_vector, warm_start
from planner.strategies.outcome import SolverInfo, SolverWarning, StepOutcome

if TYPE_CHECKING:  # the container imports this package for IlpOptions
    from planner.strategies.options import PlanOptions


@dataclass(frozen=True)
class IlpOptions:
    """Knobs of the exact strategy."""

    solver: Solver = "highs"  # MILP backend (CBC, HiGHS) or CP-SAT; the names are backends.SOLVERS
    time_limit_s: float = 10.0  # wall-clock budget per step; the best incumbent so far is kept
    buckets: int = 16  # length classes Q of FlexSP's DP bucketing of short sequences
    placement: Literal["hdp_any", "dcp_pow2"] = "hdp_any"  # rank groups of any size, or aligned powers of two
    # Work limits instead of time shares (column-generation rounds, branch-and-bound nodes, CP-SAT's deterministic
    # time), sized for DET_SHARE of the limit on an idle core: the same plan whether the machine is idle or
    # loaded, while the time limit, still the outer guard, does not bind first (the note says when it did).
    deterministic: bool = False


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
    ranks = layout(p.sizes, cm.setup.hdp, cm.setup.mesh.hdp_per_domain)
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

# One deadline, time_limit_s after the call starts, covers everything: hdp's plan, the model, the warm
# start, the phases, the MILP and writing the plan. Writing is reserved first (WRITE_RESERVE × what
# simulating the warm start took: the solver's plan is simulated once more); the three phases before
# the MILP take at most these shares of what is left each (they stop sooner once their bisection
# closes), so the MILP keeps at least half of it.
WARM_SHARE = 0.35  # of what is left after hdp and the model's items: the greedy warm starts (the incumbent that
#                   matters most where the MILP is too big to help)
BOUND_SHARE = 0.25  # the configuration-LP bound
POOL_SHARE = 0.1  # partitions assembled from its configurations
INT_SHARE = 0.15  # the integer configuration bound (and its partitions)
WRITE_RESERVE = 1.5  # × the warm start's simulation, kept for mapping and simulating the solver's plan
END_SLACK = 0.02  # of the limit, also reserved: backends return a little after their own limit (HiGHS ~0.05 s)
MIN_SOLVE_S = 0.05  # below this the MILP is not started: the incumbent stands
DET_SHARE = 0.4  # deterministic: the work limits are sized to take this share of the limit on an idle core
ROUND_CELLS_PER_S = 1.5e5  # column-generation rounds × items × group sizes (a round prices every size by a knapsack
#                            over the items) per second of an idle core, about (64 sizes × 86 items: 43 ms a round)
ROOT_S_PER_VAR = 1e-3  # HiGHS's root node (cuts, sub-MIP heuristics), which no node limit bounds and its time limit
#                        interrupts late, per assignment variable on an idle core, about (1,400 variables: 3.7 s at
#                        load 5, issue 18; 1,756: about 1.2 s idle, which overran a 1 s limit by 0.7-0.9 s); the MILP
#                        runs only where its share of the work (deterministic) or the time left covers it
SMALL_MIPS = 4  # deterministic: the integer phase's share is split over about this many MIPs (its bisection)
MILP_S_PER_VAR = 1e-5 + 5 * PRESOLVE_S_PER_NONZERO  # building the MILP (~9 µs per assignment variable) and
#                        HiGHS's presolve (about 5 nonzeros per variable)
log = logging.getLogger(__name__)


def model_bound_s(items: Items, tab: Table, hdp: int, C: int) -> float:
    """A bound valid for the whole model: the area bound, or the slowest member at its fastest size."""
    return max(area_bound_s(items, tab, hdp, C), float(np.min(tab.time_s, axis=1).max()))


def plan_step(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    """The `ilp` strategy as a plain strategy function (solve_step also returns the solver's report)."""
    return solve_step(batch, cm, opt).step


@dataclass
class _Clock:
    """The step's single deadline, and where the time went (logged at DEBUG: bench/ilp.py prints it)."""

    t0: float
    deadline: float
    last: float
    spent: dict[str, float]

    @classmethod
    def start(cls, limit_s: float) -> "_Clock":
        now = time.perf_counter()
        return cls(now, now + limit_s, now, {})

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.spent[name] = self.spent.get(name, 0.0) + now - self.last
        self.last = now

    def left(self, reserve_s: float = 0.0) -> float:
        return self.deadline - reserve_s - time.perf_counter()


def assignment_vars(tab: Table) -> int:
    """The MILP's assignment variables x_ig (its bulk): allowed (item, size) pairs × copies of the size."""
    return int((np.isfinite(tab.time_s).sum(axis=0) * tab.copies).sum())


def _key(p: Partition) -> tuple:
    return tuple(sorted((d, c.tobytes()) for d, c in zip(p.sizes, p.counts)))


def solve_step(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> StepOutcome:
    """The `ilp` strategy: solve the step's partition model, fall back to `hdp` without an incumbent;
    the outcome carries what the solver did (status, gap, bound) for the plan's meta["solver"].

    The plan written is the fastest, by the simulator, of the solver's partition, the warm start and
    hdp's plan (the model prices bucket members by their mean, so it can rank partitions wrongly);
    objective, simulated time and gap reported are those of the plan written."""
    clock = _Clock.start(opt.ilp.time_limit_s)
    solver = opt.ilp.solver
    if cm.pp > 1:
        raise PlanError("ilp models pp = 1 only; use --strategy hdp for pipelined meshes")
    if solver not in BACKENDS:
        raise PlanError(f"unknown solver {solver!r}; one of {', '.join(SOLVERS)}")
    hdp, C = cm.setup.hdp, cm.capacity_tokens
    seqs = SeqTable.of(batch)
    check_fits(int(seqs.lengths.max()), cm, hdp, opt.offload)
    heuristic = plan_balance(batch, cm, opt)
    clock.lap("hdp")
    sync = cm.step_end_s(hdp)
    hdp_s = heuristic.predicted.step_time_s
    price = Pricer(cm)
    items = make_items(seqs, cm, max(1, opt.ilp.buckets), price)
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
    clock.lap("items")
    det = opt.ilp.deterministic  # work limits bound each phase; its deadline (the call's) only guards
    clocked: list[str] = []  # deterministic: phases the clock stopped before their work limits

    def guard(name: str) -> None:
        if det and clock.left(reserve) <= 0:
            clocked.append(name)

    reserve = 0.0
    warm = warm_start(items, tab, hdp, C, hint, hdp_s - sync,
                      clock.deadline if det else time.perf_counter() + WARM_SHARE * clock.left())
    guard("warm start")
    clock.lap("warm start")
    written: dict[tuple, tuple[float, Step]] = {}  # by partition: model makespan (s), simulated plan

    def write(p: Partition) -> Step:
        if _key(p) not in written:
            step_ = finalize(batch, partition_drafts(p, items, seqs, cm, price), cm, hdp)
            written[_key(p)] = makespan_s(p, items, tab, C), step_
        return written[_key(p)][1]

    bound_from, incumbent, milp = "area", math.inf, True
    nominal = DET_SHARE * opt.ilp.time_limit_s  # deterministic: the idle-core seconds the work limits are sized for
    milp_share = 1.0 - (BOUND_SHARE + POOL_SHARE + INT_SHARE)
    if warm is not None:
        write(warm)  # the fallback plan if the solver fails, and the measure of what writing costs
        clock.lap("write")
        reserve = WRITE_RESERVE * clock.spent["write"] + END_SLACK * opt.ilp.time_limit_s
        incumbent = makespan_s(warm, items, tab, C)
        tab = prune(items, tab, hdp, C, incumbent)
        budget = nominal if det else max(0.0, clock.left(reserve))
        # A MILP that cannot get through its build and HiGHS's presolve in half the budget is not built:
        # the phases before it then share the whole budget.
        milp = budget > 2 * MILP_S_PER_VAR * assignment_vars(tab)
        scale = 1.0 if milp else 1.0 / (BOUND_SHARE + POOL_SHARE + INT_SHARE)
        engine = lp_engine(solver)

        def phase_end(share: float) -> float:
            end = clock.deadline - reserve
            return end if det else min(time.perf_counter() + scale * share * budget, end)

        def rounds(share: float) -> float:
            return ROUND_CELLS_PER_S * scale * share * budget / tab.time_s.size if det else math.inf

        if incumbent - floor > REL_GAP * incumbent:
            cb = config_bound(items, tab, hdp, C, floor, incumbent, phase_end(BOUND_SHARE), engine,
                              rounds(BOUND_SHARE))
            guard("configuration LP")
            if cb.bound_s > floor:
                floor, bound_from = cb.bound_s, "configuration LP"
            cl = ConfigLP(items, tab, hdp, C, engine)
            cl.rounds_left = rounds(POOL_SHARE)
            cl.effort = Effort(scale * INT_SHARE * budget / SMALL_MIPS) if det else None
            for k, a in cb.columns:
                cl.remember(k, a)
            for d, c in zip(warm.sizes, warm.counts):  # the warm start's groups are configurations too
                cl.remember(int(np.searchsorted(tab.sizes, d)), np.asarray(c, np.int64))
            clock.lap("configuration LP")

            def pool(tab_: Table, lo: float, hi: float, deadline: float):
                return pool_partition(cl, items, tab_, hdp, C, lo, hi, deadline)

            def integer(tab_: Table, lo: float, hi: float, deadline: float):
                raised, better = integer_search(cl, items, tab_, hdp, C, lo, hi, deadline)
                return better, raised

            # Each phase may raise the proven bound and return a better partition (the next one prunes on it).
            for name, share, phase in (("configuration LP", POOL_SHARE, pool),
                                       ("integer configurations", INT_SHARE, integer)):
                better, raised = phase(tab, floor, incumbent, phase_end(share))
                guard(name + " partitions")
                if raised > floor:
                    floor, bound_from = raised, name
                if better is not None:
                    warm, incumbent = better, makespan_s(better, items, tab, C)
                    tab = prune(items, tab, hdp, C, incumbent)
                clock.lap(name + " partitions")
    notes: list[str] = []
    n_x = assignment_vars(tab)
    size = dict(items=len(items.count), groups=int(tab.copies.sum()), variables=n_x)
    backend_error, solved = "", False  # solved: the partition is the MILP's or proven optimal (else the warm start)
    if warm is not None and incumbent - floor <= REL_GAP * incumbent:
        part, status, sol_bound = warm, "optimal", None  # the bound already proves the incumbent optimal
        solved = True
    elif warm is not None and (nominal * milp_share if det else clock.left(reserve)) < (
            (MILP_S_PER_VAR + ROOT_S_PER_VAR) * n_x + MIN_SOLVE_S):
        part, status, sol_bound = warm, "feasible", None
        why = (f"the MILP ({n_x} assignment variables) does not fit its share of the work limits "
               f"({nominal * milp_share:.2g} s of an idle core)" if det else
               f"no time left for the MILP ({n_x} assignment variables) in {opt.ilp.time_limit_s:g} s")
        notes.append(why + ": the best partition of the warm start and configuration phases stands")
    else:
        sm = build_model(items, tab, hdp, C, floor)
        x0 = partition_to_vector(warm, sm, items, tab, C) if warm is not None else None
        size = dict(items=len(items.count), groups=len(sm.group_size), variables=sm.lm.n)
        clock.lap("model")
        limit = clock.left(reserve)
        clock.spent["solver limit"] = limit
        sol = solve(solver, sm.lm, x0, max(MIN_SOLVE_S, limit), Effort(nominal * milp_share) if det else None)
        if det and sol.clock:
            clocked.append("the MILP")
        if sol.bound is not None and sol.bound > floor:
            bound_from = "solver"
        clock.lap("solver")
        if sol.status == "infeasible":
            raise PlanError(f"ilp ({solver}): no partition of the {hdp} HDP ranks holds this step's "
                            f"{len(seqs.ids)} sequences at C = {C} tokens/rank")
        notes += [sol.note] if sol.note and sol.x is not None else []
        if sol.status == "error":
            backend_error = sol.note
        if sol.x is None:
            why = (f"{solver} failed ({sol.note})" if sol.status == "error"
                   else f"{solver} found no solution in {limit:.1f} s" + (f" ({sol.note})" if sol.note else ""))
            if warm is None:
                note = why + "; using the hdp plan"
                warnings.warn(f"ilp step {batch.step}: {note}", SolverWarning, stacklevel=2)
                return StepOutcome(heuristic, SolverInfo(solver, "fallback", time.perf_counter() - clock.t0, None,
                                                         None, None, hdp_s, hdp_s, note=note, **size, written="hdp",
                                                         backend_error=backend_error))
            notes.append(why + "; kept the warm start")  # the warm start is an incumbent of the model
            warnings.warn(f"ilp step {batch.step}: {notes[-1]}", SolverWarning, stacklevel=2)
            part, status, sol_bound = warm, "feasible", None
        else:
            part, status, sol_bound = read_partition(sol.x, sm, len(items.count)), sol.status, sol.bound
            solved = True
    obj = makespan_s(part, items, tab, C)  # the solution's own makespan (CP-SAT's objective is in ticks)
    bound = min(obj, max(floor, sol_bound if sol_bound is not None else 0.0))
    # The plan written: the fastest simulated of the solver's partition, the warm start, hdp's plan.
    write(part)
    cands = sorted(((st.predicted.step_time_s, k != _key(part), span_, st) for k, (span_, st) in written.items()),
                   key=lambda c: c[:2])
    sim_s, not_solver, obj_written, step = cands[0]  # ties: the solver's partition
    if not_solver:
        notes.append(f"wrote the warm start ({sim_s:.4g} s simulated, model {obj_written + sync:.4g} s): the "
                     f"solver's partition simulates {written[_key(part)][1].predicted.step_time_s:.4g} s against "
                     f"its model objective {obj + sync:.4g} s")
    written_by = "solver" if solved and not not_solver else "warm start"
    if hdp_s < sim_s:
        notes.append(f"wrote hdp's plan: it simulates {hdp_s:.4g} s, the partition's plan {sim_s:.4g} s")
        sim_s, step, written_by = hdp_s, heuristic, "hdp"
    clock.lap("write")
    if clocked:
        notes.append(f"the clock stopped {', '.join(clocked)} before the work limits: this plan may differ on a less "
                     "loaded machine")
    log.debug("ilp step %d: %s; reserve %.2f s, ended %+.2f s from the deadline", batch.step,
              ", ".join(f"{k} {v:.2f} s" for k, v in clock.spent.items()), reserve, -clock.left())
    # The written plan's gap: its simulated makespan against the model's proven bound (hdp's plan may
    # re-group ranks mid-step and pass that bound: 0 then).
    span = sim_s - sync
    gap = max(0.0, (span - bound) / span) if span > 0 else 0.0
    return StepOutcome(step, SolverInfo(solver, status, time.perf_counter() - clock.t0, gap, obj_written + sync,
                                        bound + sync, sim_s, hdp_s, **size, note="; ".join(notes),
                                        bound_from=bound_from, written=written_by, backend_error=backend_error))


# plan_step, and what tests, bench/ilp.py and planner.api use from the package
__all__ = ["BACKENDS", "BISECT_TOL", "ConfigBound", "ConfigLP", "IlpOptions", "Pricer", "SOLVERS", "SeqTable",
           "Solution", "Solver", "area_bound_s", "build_model", "config_bound", "enumerate_configs", "fill_partition",
           "integer_model", "integer_search", "knapsack", "long_degree", "make_items", "make_table", "makespan_s",
           "padding_buckets", "plan_step", "pool_partition", "read_partition", "solve", "solve_job", "solve_step",
           "warm_start"]
