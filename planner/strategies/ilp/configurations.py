"""Stronger bounds and incumbents: the configuration LP and the integer configuration model."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from planner.strategies.ilp.backends import PRESOLVE_S_PER_NONZERO, Effort, new_highs
from planner.strategies.ilp.model import Items, Table
from planner.strategies.ilp.partitions import Partition, fill_partition, group_time_s, improve, makespan_s

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

            self.h = new_highs()
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
        # deterministic work limits (IlpOptions.deterministic): column-generation rounds left, and the effort of
        # the small MIPs (cover, integer model); deadlines then only guard
        self.rounds_left: float = math.inf
        self.effort: Effort | None = None

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
        while time.perf_counter() < deadline and self.rounds_left > 0:
            self.rounds_left -= 1
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
                if time.perf_counter() > deadline:
                    return False, []  # a full round prices hundreds of sizes on big meshes: stop mid-round
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
                 engine: str, rounds: float = math.inf) -> ConfigBound:
    """Bisection on T in [lo, hi): the largest T the configuration LP refutes by the deadline, or within
    `rounds` column-generation rounds (lo when none). Every partition of the model then has makespan > that T."""
    cl = ConfigLP(items, tab, hdp, C, engine)
    cl.rounds_left = rounds
    out = ConfigBound(bound_s=lo, columns=[])
    while hi - lo > BISECT_TOL * hi and time.perf_counter() < deadline:
        mid = (lo + hi) / 2
        out.tested += 1
        if cl.refutes(mid, deadline):
            lo = mid
            out.refuted += 1
        elif time.perf_counter() < deadline and cl.rounds_left > 0:
            hi = mid
        else:
            break  # ran out of time or rounds: mid is neither refuted nor known to stand
    out.bound_s = lo
    out.columns = list(cl.pool.values())
    return out


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
                      [float(cl.hdp // int(d[k])) for k, _ in cols], limit_s, cl.effort)
    if x is None:
        return None
    return [(k, a, int(round(x[j]))) for j, (k, a) in enumerate(cols) if round(x[j]) >= 1]


def _small_mip(engine: str, cost: np.ndarray, entries: list, row_lo: np.ndarray, row_hi: np.ndarray, n_int: int,
               int_ub: list[float], limit_s: float, effort: Effort | None = None) -> tuple[np.ndarray | None, float]:
    """min cost·x, row_lo ≤ A x ≤ row_hi, x ≥ 0, the first n_int columns integer ≤ int_ub: HiGHS, or
    SCIP through OR-Tools (same library rule as MasterLP). (The best solution by the limit or None,
    the proven lower bound on the objective: inf when proven infeasible, −inf when unknown.) With an
    effort, a node limit stops it and limit_s only guards."""
    m = len(row_lo)
    nnz = sum(len(idx) for idx, _ in entries)
    if PRESOLVE_S_PER_NONZERO * nnz > (limit_s if effort is None else effort.nominal_s):
        return None, -math.inf  # it would outlast its limit before its first node: not run, nothing proven
    if engine == "highs":
        import highspy

        h = new_highs()
        h.setOptionValue("time_limit", max(0.01, float(limit_s)))
        h.setOptionValue("random_seed", 0)
        if effort is not None:
            effort.limit_highs(h, nnz)
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
                                                             highspy.HighsModelStatus.kTimeLimit,
                                                             highspy.HighsModelStatus.kSolutionLimit) else -math.inf
        if h.getInfo().primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
            return None, bound
        return np.array(h.getSolution().col_value), bound
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver("SCIP")
    s.SetTimeLimit(max(10, int(limit_s * 1000)))
    if effort is not None:
        s.SetSolverSpecificParametersAsString(f"limits/nodes = {effort.nodes(nnz)}\n")
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


def _mip_share(cl: ConfigLP) -> float:
    """Of the time left, what one small MIP may take: half (others follow it); with work limits all of it,
    since the time is then only a guard and must not bind first."""
    return 0.5 if cl.effort is None else 1.0


def pool_partition(cl: ConfigLP, items: Items, tab: Table, hdp: int, C: int, lo: float, hi: float,
                   deadline: float) -> tuple[Partition | None, float]:
    """Partitions from the configuration LP (price and round): at makespans bisected between the bound
    and the best makespan so far, the cheapest fractional cover is rounded (whole copies of its
    configurations, then fractional ones while ranks last), or covered in whole copies by cover_mip;
    fill_partition completes it and the local search polishes it. Returns the best partition that
    beats `hi` (or None) and the bound, raised where a makespan was refuted on the way."""
    best, best_s, proven = None, hi, lo
    while time.perf_counter() < deadline - 0.02 and cl.rounds_left > 0 and best_s - lo > BISECT_TOL * best_s:
        T = (lo + best_s) / 2
        refuted, cfg = cl.run(T, deadline, to_optimum=True)
        if refuted:
            lo = proven = T  # a proof like config_bound's: the bound rises
            continue
        if not cfg:
            break  # out of time
        found = []
        for p in (_round_cover(cfg, items, tab, hdp, C),
                  _mip_cover(cl, T, items, tab, hdp, C, _mip_share(cl) * (deadline - time.perf_counter()))):
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
                          [float(cl.hdp // int(d[k])) for k, _ in configs], limit_s, cl.effort)
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
        refuted, copies = integer_model(cl, mid, _mip_share(cl) * left)  # copies: (configurations, fluid members)
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
