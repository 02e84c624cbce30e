"""The MILP / CP-SAT backends (CBC, HiGHS, CP-SAT), each in its own process where they clash."""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from planner.strategies.ilp.model import LinearModel

Solver = Literal["cbc", "highs", "cpsat"]  # MILP by CBC or HiGHS, or CP-SAT: the one list of backend names
SOLVERS: tuple[Solver, ...] = get_args(Solver)
CHILD_GRACE_S = 30.0  # a solver process that outlives its limit by this much is killed (no solution)
REL_GAP = 1e-4  # every backend stops once proven within 0.01% of the optimum
CPSAT_TICKS = 10**6  # CP-SAT needs integer times: the makespan bound is cut into this many ticks
PULP_IO_SHARE = 0.05  # of CBC's limit, kept for pulp writing the MPS and mst files and reading the solution


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
    import cbcbox
    import pulp

    deadline = time.perf_counter() + limit_s  # pulp's modelling and files count against the limit too
    prob = pulp.LpProblem("meshplan_step", pulp.LpMinimize)
    v = [prob.add_variable(f"v{j}", lowBound=lm.lb[j], upBound=None if math.isinf(lm.ub[j]) else lm.ub[j],
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
        # CBC from the cbcbox wheel (pulp[cbc]): pulp's own bundled binary (PULP_CBC_CMD) is deprecated.
        solver = pulp.COIN_CMD(path=cbcbox.cbc_bin_path(), msg=False, timeLimit=round(max(0.05, left), 2),
                               gapRel=REL_GAP, warmStart=x0 is not None, logPath=str(log), threads=1)
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


Backend = Callable[[LinearModel, np.ndarray | None, float], Solution]  # (model, warm start, limit_s)
BACKENDS: dict[Solver, Backend] = {"cbc": _solve_cbc, "highs": _solve_highs, "cpsat": _solve_cpsat}
assert tuple(BACKENDS) == SOLVERS  # one backend per solver name


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
        entry = "import sys; from planner.strategies.ilp.backends import solve_job; solve_job(*sys.argv[1:])"
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
