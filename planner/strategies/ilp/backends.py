"""The MILP / CP-SAT backends (CBC, HiGHS, CP-SAT), each in its own process where they clash.

Solver libraries write to the process's stdout from C (HiGHS prints its banner when the first Highs object
is built), which would corrupt `meshplan plan --json`: every solver call runs with file descriptor 1 sent
to /dev/null, or with MESHPLAN_SOLVER_LOG=1 to stderr together with the backend's own log."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
PRESOLVE_S_PER_NONZERO = 3e-5  # HiGHS's presolve does not watch the clock: 1.9 s for 190K nonzeros, 7.1 s for
#                               256K under load, on this project's shared 2-core machine (measured, issue 21)
log = logging.getLogger(__name__)
LOG_ENV = "MESHPLAN_SOLVER_LOG"  # set to 1: the MILP backends log their search to stderr (default: silent)


def solver_log() -> bool:
    """Whether the user asked for the backends' logs (MESHPLAN_SOLVER_LOG=1)."""
    return os.environ.get(LOG_ENV, "") not in ("", "0")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:  # no C library to open by name (e.g. Windows): Python's own flush has to do
        return None


def _flush_c_stdio() -> None:
    with contextlib.suppress(AttributeError, TypeError):
        if _libc() is not None:
            _libc().fflush(None)  # C-level buffers: written before fd 1 moves back


@contextlib.contextmanager
def solver_stdout() -> Iterator[None]:
    """Send what native solver code prints to stdout (fd 1) to /dev/null, or to stderr when solver_log();
    never to stdout, which carries the CLI's JSON."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing to protect
        yield
        return
    target = os.dup(2) if solver_log() else os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 1)
    try:
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(target)


def new_highs(log: bool = False):
    """A highspy.Highs with its banner and log silenced (log: the search log, to stderr; see solver_stdout)."""
    import highspy

    with solver_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", bool(log))
    return h


# ---- deterministic work limits -----------------------------------------------------------------------

NODE_NNZ_PER_S = 2e5  # branch-and-bound nodes × model nonzeros one core gets through per second, at the low end (HiGHS
#                       at load 2: the MILP 6.8e5, a configuration cover MIP 1e5, issue 18)


@dataclass(frozen=True)
class Effort:
    """Deterministic work limits (IlpOptions.deterministic): a search stops at these counts, never at a measured
    time, so one instance gives one plan whether the machine is idle or loaded; time limits stay, as the outer
    guard only. Sized from seconds of an idle core (nominal_s), converted once by fixed rates."""

    nominal_s: float  # the seconds of an idle core this work is sized for (size checks use it, not the time left)

    def nodes(self, nonzeros: int) -> int:
        """Branch-and-bound nodes (HiGHS, CBC, SCIP) for a model of this many nonzeros."""
        return max(1, int(NODE_NNZ_PER_S * self.nominal_s / max(1, nonzeros)))

    def limit_highs(self, h, nonzeros: int) -> None:
        """A node limit, and no sub-MIP heuristics (RINS, RENS): they make the root, which no node limit
        bounds, take seconds (a third of a 6 s solve, issue 18)."""
        h.setOptionValue("mip_max_nodes", self.nodes(nonzeros))
        h.setOptionValue("mip_heuristic_run_rins", False)
        h.setOptionValue("mip_heuristic_run_rens", False)


# ---- backends ---------------------------------------------------------------------------------------

@dataclass
class Solution:
    status: str  # optimal | feasible | infeasible | none (no solution by the limit) | error (the backend failed)
    x: np.ndarray | None
    objective: float | None  # makespan (s)
    bound: float | None
    note: str = ""  # why there is no solution, where known (for error: what failed, one line)
    clock: bool = False  # it ran to its time limit (a deterministic work limit did not stop it first)


def _solve_highs(lm: LinearModel, x0: np.ndarray | None, limit_s: float, effort: Effort | None = None) -> Solution:
    import highspy

    deadline = time.perf_counter() + limit_s  # building the model counts against the limit too
    h = new_highs(log=solver_log())
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
    # it would outlast the limit (the simplex watches the clock); deterministic: the nominal time, not the time left
    if PRESOLVE_S_PER_NONZERO * len(a.value_) > (limit_s if effort is None else effort.nominal_s):
        h.setOptionValue("presolve", "off")
    if effort is not None:
        effort.limit_highs(h, len(a.value_))
    if x0 is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(map(float, x0))
        sol.value_valid = True
        h.setSolution(sol)
    h.setOptionValue("time_limit", max(0.05, deadline - time.perf_counter()))

    def stop_at_deadline(e) -> None:  # HiGHS checks its time limit only between nodes and heuristics
        if time.perf_counter() > deadline:
            e.interrupt()

    h.cbMipInterrupt.subscribe(stop_at_deadline)
    h.cbSimplexInterrupt.subscribe(stop_at_deadline)
    h.run()
    st = h.getModelStatus()
    info = h.getInfo()
    log.debug("highs: %s, returned %+.2f s from its deadline (%.0f nodes)", st, time.perf_counter() - deadline,
              info.mip_node_count)
    if st == highspy.HighsModelStatus.kInfeasible:
        return Solution("infeasible", None, None, None)
    if info.primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
        return Solution("none", None, None, None)
    x = np.array(h.getSolution().col_value)
    return Solution("optimal" if st == highspy.HighsModelStatus.kOptimal else "feasible", x,
                    float(info.objective_function_value), float(info.mip_dual_bound))


def _solve_cbc(lm: LinearModel, x0: np.ndarray | None, limit_s: float, effort: Effort | None = None) -> Solution:
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
        verbose = solver_log()  # pulp: a log file replaces the console log
        solver = pulp.COIN_CMD(path=cbcbox.cbc_bin_path(), msg=verbose, timeLimit=round(max(0.05, left), 2),
                               gapRel=REL_GAP, warmStart=x0 is not None, logPath=None if verbose else str(log),
                               threads=1, maxNodes=None if effort is None else effort.nodes(
                                   sum(len(r[0]) for r in lm.rows)))
        solver.tmpDir = tmp  # pulp's MPS and solution files: gone with tmp even when CBC exits abnormally
        try:
            prob.solve(solver)
        except pulp.PulpSolverError as e:  # the CBC binary exited abnormally (it can crash mid-search)
            return Solution("error", None, None, None, note=_one_line(f"CBC exited abnormally: {e}", log))
        text = log.read_text() if log.exists() else ""
        if prob.status == pulp.LpStatusInfeasible:
            return Solution("infeasible", None, None, None)
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            if text and prob.status == pulp.LpStatusNotSolved and "time limit" not in text.lower():
                return Solution("error", None, None, None, note=_one_line("CBC stopped without a status", log))
            return Solution("none", None, None, None)
    x = np.array([var.value() or 0.0 for var in v])
    obj = float(x[lm.objective])
    m = re.search(r"Lower bound:\s*([-0-9.eE+]+)", text)
    optimal = "Optimal solution found" in text or prob.sol_status == pulp.LpSolutionOptimal and not m
    bound = float(m.group(1)) if m else (obj if optimal else None)
    return Solution("optimal" if optimal else "feasible", x, obj, bound)


def _one_line(what: str, log: Path | None = None) -> str:
    """what, and the last line of the backend's log when there is one, as one line."""
    tail = ""
    if log is not None and log.exists():
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
        tail = f" (log: {lines[-1]})" if lines else ""
    return " ".join((what + tail).split())


def _solve_cpsat(lm: LinearModel, x0: np.ndarray | None, limit_s: float, effort: Effort | None = None) -> Solution:
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
    s.parameters.log_search_progress = solver_log()  # to stdout, which solver_stdout sends to stderr
    if effort is not None:  # its own work measure; interleaved workers make the parallel search deterministic
        s.parameters.max_deterministic_time = effort.nominal_s
        s.parameters.interleave_search = True
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


Backend = Callable[..., Solution]  # (model, warm start, limit_s, effort: Effort | None = None)
BACKENDS: dict[Solver, Backend] = {"cbc": _solve_cbc, "highs": _solve_highs, "cpsat": _solve_cpsat}
assert tuple(BACKENDS) == SOLVERS  # one backend per solver name


def run_backend(backend: str, lm: LinearModel, x0: np.ndarray | None, limit_s: float,
                effort: Effort | None = None) -> Solution:
    """One backend in this process, its stdout kept off ours; whatever it raises becomes an "error"
    Solution that says what failed (the caller keeps its warm start and reports it)."""
    try:
        with solver_stdout():
            return BACKENDS[backend](lm, x0, limit_s, effort)
    except Exception as e:  # a crashed backend must not lose the step: the warm start is still a plan
        return Solution("error", None, None, None, note=_one_line(f"{type(e).__name__}: {e}"))


CLOCK_EPS_S = 0.05  # a backend that returns this close to its limit is taken as stopped by it
LATE_MAX_SHARE = 0.1  # of a limit, at most, kept back for a backend's lateness seen before in this process
_late_s: dict[str, float] = {}  # per backend: the most it returned after its limit in this process


def solve(backend: str, lm: LinearModel, x0: np.ndarray | None, limit_s: float,
          effort: Effort | None = None) -> Solution:
    """Run a backend within limit_s. A backend returns a little after its own limit (HiGHS checks it between
    nodes and heuristics; under load up to ~1 s, issue 21), so the most it was late before in this process
    is kept back from its limit (at most LATE_MAX_SHARE of it): the steps of a plan after the first hold it."""
    t0 = time.perf_counter()
    keep = min(_late_s.get(backend, 0.0), LATE_MAX_SHARE * limit_s)
    sol = _solve(backend, lm, x0, limit_s - keep, effort)
    late = time.perf_counter() - t0 - (limit_s - keep)
    _late_s[backend] = max(_late_s.get(backend, 0.0), late)
    return dataclasses.replace(sol, clock=late > -CLOCK_EPS_S)


def _solve(backend: str, lm: LinearModel, x0: np.ndarray | None, limit_s: float, effort: Effort | None) -> Solution:
    """OR-Tools bundles its own HiGHS library, so highspy and CP-SAT cannot both load into one process
    (whichever comes second fails to link): then the backend runs in a fresh Python process, whose
    start-up counts against the time limit."""
    clash = {"cpsat": "highspy", "highs": "ortools"}.get(backend)
    if clash is None or not any(m.split(".")[0] == clash for m in list(sys.modules)):
        return run_backend(backend, lm, x0, limit_s, effort)
    import pickle
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "solution.pkl"
        job.write_bytes(pickle.dumps((backend, lm, x0, time.time() + limit_s, effort)))
        entry = "import sys; from planner.strategies.ilp.backends import solve_job; solve_job(*sys.argv[1:])"
        cmd = [sys.executable, "-c", entry, str(job), str(result)]
        try:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None if solver_log() else subprocess.PIPE,
                           timeout=limit_s + CHILD_GRACE_S, check=True)
            return pickle.loads(result.read_bytes())
        except subprocess.CalledProcessError as e:
            err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
            return Solution("error", None, None, None, note=_one_line(
                f"the {backend} process exited with status {e.returncode}" + (f": {err[-1]}" if err else "")))
        except subprocess.TimeoutExpired:
            return Solution("error", None, None, None,
                            note=f"the {backend} process outlived its {limit_s:.1f} s limit by {CHILD_GRACE_S:g} s")
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            return Solution("error", None, None, None,
                            note=_one_line(f"the {backend} process gave no solution: {type(e).__name__}: {e}"))


def solve_job(job: str, result: str) -> None:
    """Entry point of the separate solver process (see solve)."""
    import pickle

    backend, lm, x0, deadline, effort = pickle.loads(Path(job).read_bytes())
    Path(result).write_bytes(pickle.dumps(run_backend(backend, lm, x0, max(0.05, deadline - time.time()), effort)))
