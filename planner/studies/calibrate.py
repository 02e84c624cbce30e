"""Calibration: fit a profile's physical parameters to measured replay traces (`meshplan calibrate`).

The parameters are physical, shared by every case: one time multiplier per table the cost model reads
(GEMM: 1/efficiency; attention: 1/efficiency; memory: 1/bandwidth, its launch floor included; collective and
P2P: 1/bandwidth) and the two fixed costs the cost model adds (`layer_overhead_s` per layer and direction,
`attn_call_overhead_s` per attention call). Host copies are not fitted (replay measures no offload wait apart).

How a measured time depends on them is taken from the cost model itself, not re-derived here: each (plan,
unit, stage), forward and backward together, is priced on the profile at the current parameters and on one
profile per parameter being fitted, nudged, which gives a Jacobian; bounded least squares on relative error (rows
divided by the measured time; each plan weighed alike, each row robustly; each table's multiplier under a log-normal
prior around the base) then moves the parameters, and the step is repeated where the model is not linear in them
(exposed ring transfers and offload copies are a max of compute and transfer) and until the parameters and the
robust weights settle. Each fitted profile is written the way the Jacobian priced it (`calibrated_profile`), so the
fit and the written profile agree by construction.

Where the traces record each unit's own-thread CPU (CPU replays, one torch thread a rank), the compute parameters are
fitted to that CPU against the priced compute and the collectives to the wall times (`fit_plans`): waits for peers and
for cores take wall time and no CPU.

Error before and after is reported on plans the fit did not see (leave-one-plan-out, or named plans held
out), unit by unit and step by step (`planner.simulate.measured.compare_measured`), and on the fitted ones."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from costmodel.timing import CostModel
from planner.plan import Plan, PlanError, validate
from planner.plan.stream import load_plan, plan_fingerprint
from planner.runtime.launch import pricing_differences
from planner.simulate.measured import compare_measured, predicted_cpu_s, predicted_units_s, warm_steps
from profiles.table import Profile, load_profile, read_json

SCALED_TABLES = ("gemm", "attention", "memory", "collective")  # tables whose time_s the fit multiplies
OVERHEADS = ("layer_overhead_s", "attn_call_overhead_s")  # the cost model's additive constants (absent: 0)
PARAMS = SCALED_TABLES + OVERHEADS
PARAM_MEANING = {
    "gemm": "GEMM table time (1 / efficiency)",
    "attention": "attention table time (1 / efficiency)",
    "memory": "memory table time (1 / bandwidth, launch floor included)",
    "collective": "collective and P2P table time (1 / bandwidth)",
    "layer_overhead_s": "fixed cost per layer forward (backward 2x), s",
    "attn_call_overhead_s": "fixed cost per attention call (document x ring step), s",
}
MIN_SCALE = 1e-3  # a table 1000x faster than its base is a failed fit, not hardware: the lower bound
_NUDGE_SCALE = 1e-3  # relative nudge of a multiplier for the Jacobian
_NUDGE_OVERHEAD_S = 1e-4  # absolute nudge of an overhead
_STEP_SETTLED = 1e-3  # a relinearisation that moves no parameter by more than this (relative) ends the fit
_NOT_IDENTIFIABLE = "not identifiable from these traces"
_UNDETERMINED = "kept at base"


@dataclass(frozen=True)
class Physical:
    """Parameter values: table-time multipliers relative to the base profile, overheads in seconds."""

    gemm: float = 1.0
    attention: float = 1.0
    memory: float = 1.0
    collective: float = 1.0
    layer_overhead_s: float = 0.0
    attn_call_overhead_s: float = 0.0

    @classmethod
    def of_profile(cls, profile: Profile) -> "Physical":
        """The base point: multipliers 1, the overheads the profile carries (absent: 0, as the cost model reads)."""
        return cls(**{k: float(profile.constants.get(k, {}).get("value", 0.0)) for k in OVERHEADS})

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, k) for k in PARAMS], float)

    @classmethod
    def from_vector(cls, x: np.ndarray) -> "Physical":
        return cls(**{k: float(v) for k, v in zip(PARAMS, x)})


def calibrated_profile(base: Profile, p: Physical, *, name: str | None = None, notes: str | None = None,
                       overhead_source: str = "meshplan calibrate") -> Profile:
    """`base` with each scaled table's time_s multiplied by its parameter (host_copy kept), the achievable
    memory bandwidth `hbm` (GEMMs' memory-side bound, analytic profiles) divided by the memory multiplier, and
    the two overhead constants set. Fits (T(s) per model) are left out: they describe the base tables."""
    constants = copy.deepcopy(base.constants)
    if "hbm" in constants:
        constants["hbm"]["value"] = float(constants["hbm"]["value"]) / p.memory
    for k in OVERHEADS:
        constants[k] = {"value": float(getattr(p, k)), "unit": "s", "source": overhead_source}
    fp = dataclasses.replace(base.fingerprint, sha256="", name=name or base.fingerprint.name,
                             notes=base.fingerprint.notes if notes is None else notes)
    return base.with_times_scaled({t: getattr(p, t) for t in SCALED_TABLES}, fingerprint=fp, constants=constants,
                                  fits={})


# ---- inputs: (plan, trace) pairs -------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One measured time the fit explains: a unit's forward plus backward on one pipeline stage, the median over
    the trace's replay iterations of the mean over the unit's ranks (ranks of a unit run in lockstep). Not the two
    directions apart: a member that waits for a peer (a ring step, a TP collective, a pipeline hand-off) books the
    wait in whichever direction it falls, and ranks sharing cores move time between them, while every parameter
    scales both directions alike; the sum is what the parameters explain (docs/COSTMODEL.md, Calibration)."""

    plan_step: int
    unit: int
    stage: int
    measured_s: float
    thread_cpu_s: float | None = None  # the same statistic of the members' own-thread CPU, where the trace has it


@dataclass(frozen=True)
class TracePair:
    """A measured trace and the plan it replayed."""

    plan_path: Path
    trace_path: Path
    plan: Plan
    trace: dict
    rows: tuple[Row, ...]


def read_trace(path: Path) -> dict:
    """A `meshplan replay --trace` JSON; missing, corrupt, not a trace or cut short: one line."""
    doc = read_json(path, "measured trace", PlanError)
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("meshplan.measured/"):
        raise PlanError(f"{path}: not a measured trace (expected the JSON written by `meshplan replay --trace`)")
    if not doc.get("complete"):
        raise PlanError(f"{path}: measured trace is incomplete (the replay did not finish); replay it again")
    if not doc.get("steps"):
        raise PlanError(f"{path}: measured trace has no steps")
    return doc


def _one_thread(trace: dict) -> bool:
    """Whether a rank's compute is its own thread's CPU: torch ran it on one thread (the replay's default)."""
    return (trace.get("meta") or {}).get("cpu_threads") == 1


def trace_rows(plan: Plan, trace: dict, origin: str) -> tuple[Row, ...]:
    """The trace's rows, after checking that every (plan step, unit, degree, stage) it names is the plan's."""
    steps = {s.step: s for s in plan.steps}
    one_thread = _one_thread(trace)
    per: dict[tuple[int, int, int], dict[int, list[tuple[float, float | None]]]] = {}
    for st in warm_steps(trace):  # a plan step's cold first replay left out when it was replayed again
        ps = st.get("plan_step")
        if ps not in steps:
            raise PlanError(f"{origin}: trace replays plan step {ps}, which the plan does not have; pair each trace "
                            "with the plan it replayed")
        units = {u.id: u for u in steps[ps].units}
        for u in st.get("units", []):
            uid, stage = int(u["unit"]), int(u.get("stage", 0))
            if uid not in units or int(u.get("degree", units[uid].degree)) != units[uid].degree \
                    or not 0 <= stage < plan.mesh.pp:
                raise PlanError(f"{origin}: trace unit {uid} (stage {stage}) of plan step {ps} is not in the plan; "
                                "pair each trace with the plan it replayed")
            per.setdefault((ps, uid, stage), {}).setdefault(int(st["step"]), []).append(
                (float(u["fwd_s"]) + float(u["bwd_s"]), u.get("thread_cpu_s") if one_thread else None))
    rows = []
    for (ps, uid, stage), by_iter in sorted(per.items()):
        t = float(np.median([np.mean([w for w, _ in v]) for v in by_iter.values()]))  # per iteration: mean over ranks
        cpus = [[c for _, c in v] for v in by_iter.values()]
        cpu = float(np.median([np.mean(c) for c in cpus])) if all(None not in c for c in cpus) else None
        rows += [Row(ps, uid, stage, t, cpu if cpu and cpu > 0 else None)] if t > 0 else []
    if not rows:
        raise PlanError(f"{origin}: trace has no unit with a positive time")
    return tuple(rows)


def load_pair(plan_path: Path, trace_path: Path) -> TracePair:
    """A (plan, trace) pair, checked: missing files, a trace of another plan or cut short, one line each."""
    plan_path, trace_path = Path(plan_path), Path(trace_path)
    plan = load_plan(plan_path)
    validate(plan)
    trace = read_trace(trace_path)
    sha = (trace.get("meta") or {}).get("plan_sha256")
    if sha and sha != plan_fingerprint(plan_path):
        raise PlanError(f"{trace_path}: trace replayed another plan than {plan_path} (its recorded plan sha256 "
                        f"differs); pair each trace with the plan it replayed")
    for why in pricing_differences(plan):  # the fit would take the difference for the hardware's
        warnings.warn(f"{plan_path}: {why}, or the fit takes what the plan did not price for the hardware's")
    return TracePair(plan_path, trace_path, plan, trace, trace_rows(plan, trace, str(trace_path)))


# ---- pricing -----------------------------------------------------------------------------------------
class _PlanGroup:
    """One plan and its traces, priced on profiles at any parameter point (cached per point)."""

    def __init__(self, name: str, pairs: list[TracePair], profile_ref: str, base: Profile):
        from planner.api import cost_model_for_plan  # the cost model the plan was made with, on profile_ref

        self.name, self.pairs, self.base = name, pairs, base
        self.plan = pairs[0].plan
        self.setup = cost_model_for_plan(self.plan, profile_ref).setup
        self.rows = [r for p in pairs for r in p.rows]
        self.measured = np.array([r.measured_s for r in self.rows])
        self._cms: dict[tuple[float, ...], CostModel] = {}
        self._pred: dict[tuple, np.ndarray] = {}

    def cost_model(self, p: Physical) -> CostModel:
        key = tuple(p.vector())
        if key not in self._cms:
            if len(self._cms) > 16:  # Jacobian nudges are used once: keep memory flat
                self._cms.clear()
            self._cms[key] = CostModel(self.setup, calibrated_profile(self.base, p))
        return self._cms[key]

    def _priced(self, p: Physical, price) -> np.ndarray | None:
        """Every row at `p` as `price(step, cost model)` gives each (unit, stage) of a plan step (cached per point and
        pricing); None where it prices none."""
        key = (price.__name__,) + tuple(p.vector())
        if key not in self._pred:
            cm = self.cost_model(p)
            steps = {s.step: s for s in self.plan.steps}
            pred = {ps: price(steps[ps], cm) for ps in {r.plan_step for r in self.rows}}
            if any(v is None for v in pred.values()):
                return None
            self._pred[key] = np.array([pred[r.plan_step][(r.unit, r.stage)] for r in self.rows])
        return self._pred[key]

    def predict(self, p: Physical) -> np.ndarray:
        """Predicted time of every row at `p`."""
        return self._priced(p, predicted_units_s)

    def jacobian(self, p: Physical, cols: Sequence[int]) -> np.ndarray:
        return _jacobian(self.predict, p, cols)

    def predict_cpu(self, p: Physical) -> np.ndarray | None:
        """Each row's priced compute as a member's own-thread CPU at `p` (`predicted_cpu_s`); None off a CPU
        profile with cores."""
        return self._priced(p, predicted_cpu_s)

    def cpu_rows(self) -> "_CpuRows | None":
        """The plan's rows as its members' own-thread CPU, where every row's trace has it and the profile prices it
        (a CPU profile with cores); else None."""
        if any(r.thread_cpu_s is None for r in self.rows) or self.predict_cpu(Physical.of_profile(self.base)) is None:
            return None
        return _CpuRows(self)

    def errors(self, p: Physical) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Relative errors (predicted / measured − 1) per unit and per step over the plan's traces, and of the units'
        own-thread CPU where the profile prices it and the trace's ranks computed on one thread (`_one_thread`; else
        none), cold replays left out as the fit leaves them out (`warm_steps`)."""
        cm = self.cost_model(p)
        units, steps, cpu = [], [], []
        for pair in self.pairs:
            c = compare_measured(self.plan, cm, pair.trace)
            warm = {s["step"] for s in warm_steps(pair.trace)}
            units += [u["rel_err"] for u in c.units if u["step"] in warm]
            cpu += [u["cpu_err"] for u in c.units if u["step"] in warm and "cpu_err" in u] if _one_thread(pair.trace) \
                else []
            steps += [s["rel_err"] for s in c.steps if s["step"] in warm]
        return np.array(units, float), np.array(steps, float), np.array(cpu, float)


class _CpuRows:
    """A plan's rows as own-thread CPU: the time a member's thread computed, against the compute the cost model
    prices (`predicted_cpu_s`). Waits for peers, for a core another rank holds (time slices) and for transfers take
    wall time and no CPU, so these rows tell the compute parameters from what scheduling did to the wall."""

    def __init__(self, group: _PlanGroup):
        self.name, self.rows = group.name, group.rows
        self.measured = np.array([r.thread_cpu_s for r in group.rows], float)
        self._group = group

    def predict(self, p: Physical) -> np.ndarray:
        return self._group.predict_cpu(p)

    def jacobian(self, p: Physical, cols: Sequence[int]) -> np.ndarray:
        return _jacobian(self.predict, p, cols)


def _jacobian(predict: Callable[[Physical], np.ndarray], p: Physical, cols: Sequence[int]) -> np.ndarray:
    """d(predicted row time) / d(parameter) for the parameters `cols` (PARAMS indices), by one nudged profile each;
    the other columns 0 (held parameters cost no pricing)."""
    x0, t0 = p.vector(), predict(p)
    jac = np.zeros((len(t0), len(PARAMS)))
    for j in cols:
        step = x0[j] * _NUDGE_SCALE if PARAMS[j] in SCALED_TABLES else _NUDGE_OVERHEAD_S
        x = x0.copy()
        x[j] += step
        jac[:, j] = (predict(Physical.from_vector(x)) - t0) / step
    return jac


# ---- the fit -------------------------------------------------------------------------------------------
def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """min ||a x − b|| subject to x ≥ 0 (Lawson–Hanson active set)."""
    n = a.shape[1]
    x, free = np.zeros(n), np.zeros(n, bool)
    tol = 1e-12 * max(1.0, float(np.abs(a).max(initial=0.0)))
    for _ in range(max_iter):
        w = a.T @ (b - a @ x)
        if free.all() or w[~free].max(initial=-np.inf) <= tol:
            break
        free[np.argmax(np.where(free, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            if (z[free] > 0).all():
                x = z
                break
            neg = free & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            free &= x > tol
    return x


WALL_BASIS, CPU_BASIS = "wall time", "own-thread CPU, collectives to wall time"  # what a fit's rows were (fit_plans)


@dataclass(frozen=True)
class Fit:
    """Parameters fitted on some plans."""

    point: Physical
    fitted: tuple[str, ...]  # parameters the fit moved (the others stay at the start point)
    std_err: dict[str, float]  # one standard error per fitted parameter off its bound (a linearised estimate)
    at_bound: tuple[str, ...]  # overheads fitted at 0
    not_identifiable: tuple[str, ...]  # no row depends on them, or only together with the others
    undetermined: dict[str, str]  # kept at the start: why (the traces pin them down too loosely, or a table
    # would have to run MIN_SCALE times its base time)
    plans: tuple[str, ...]
    rows: int
    iterations: int
    rms_rel_err: float  # root mean square of the rows' relative error after the fit (wall time)
    basis: str = WALL_BASIS  # what the compute parameters were fitted to (fit_plans)


MAX_REL_STD_ERR = 0.5  # a parameter known to worse than ±50% (one standard error) is kept at its start value
ROBUST_SCALE = 0.1  # relative error up to which a row counts fully (robust_weights): replays' own spread, 5-10%
_LB = np.array([MIN_SCALE if k in SCALED_TABLES else 0.0 for k in PARAMS])
# How far a table's time may be from the base's before any trace is seen: the standard deviation of log(multiplier).
# A measured table was timed on the hardware, under other load, caches and concurrency than a training step
# (0.5: within x1.65 at one standard deviation); an analytic one holds published rates (1: within x2.7). Without
# it, parameters the traces move only together run off along the direction they share (docs/COSTMODEL.md,
# Calibration).
PRIOR_WIDTH = {"measured": 0.5, "analytic": 1.0}


def prior_widths(base: Profile, width: float | None = None) -> np.ndarray:
    """Each parameter's prior width: `width` (default PRIOR_WIDTH by how the base was obtained) for the tables'
    multipliers, none (inf) for the overheads, which start at the base's value and are bounded at 0 instead."""
    w = PRIOR_WIDTH[base.fingerprint.source] if width is None else float(width)
    if not w > 0:
        raise PlanError(f"prior width {w:g}: must be above 0 (inf fits without a prior)")
    return np.array([w if k in SCALED_TABLES else np.inf for k in PARAMS])


def _identifiable(a: np.ndarray, candidates: list[int]) -> list[int]:
    """Candidate columns, in PARAMS order, that add a direction the earlier ones do not span (a parameter whose
    rows all read 0, e.g. collective without TP or exposed ring, or one that only moves with others)."""
    keep: list[int] = []
    scale = np.linalg.norm(a, axis=0)
    for j in candidates:
        if scale[j] <= 1e-9 * np.sqrt(len(a)):
            continue
        trial = a[:, keep + [j]] / scale[keep + [j]]
        s = np.linalg.svd(trial, compute_uv=False)
        if s[-1] > 1e-6 * s[0]:
            keep.append(j)
    return keep


def robust_weights(rel_err: np.ndarray) -> np.ndarray:
    """Each row's weight under the soft-L1 loss 2δ²(√(1 + (r/δ)²) − 1) of its relative error r (iteratively
    reweighted least squares): 1 for rows within about δ, falling as δ/|r| beyond. A row that no parameter can
    explain (a mechanism the cost model lacks, or a host that slowed under one replay) then pulls the shared
    parameters with a bounded force instead of its square: in the CPU replays' leave-one-plan-out folds, pp = 2's
    short units, priced 57-74% over what they measured, drove attention to x0.72-0.76 and every held-out step to
    about -20% (docs/COSTMODEL.md, Calibration)."""
    return 1.0 / np.sqrt(1.0 + (rel_err / ROBUST_SCALE) ** 2)


def plan_weights(groups: Sequence[_PlanGroup]) -> np.ndarray:
    """Each row's share of its plan, scaled to a mean of 1: every plan weighs the same in the fit, however many units
    and replays it has. A plan is one configuration; weighed by rows, the CPU replays' pp = 2 plan (five units a
    step, each stage a row) set the shared parameters for the other five."""
    n = sum(len(g.rows) for g in groups)
    return np.concatenate([np.full(len(g.rows), n / len(groups) / len(g.rows)) for g in groups])


def _spread(w: np.ndarray, rel_err: np.ndarray, n_params: int) -> float:
    """The rows' weighted variance of relative error, per degree of freedom left (s²)."""
    return float(w * rel_err @ rel_err) / max(len(rel_err) - n_params, 1)


def _prior_rows(x: np.ndarray, cols: list[int], width: np.ndarray, s2: float, n_rows: int, n_plans: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The prior's rows of the least squares, linearised at `x`: log(multiplier) ~ N(0, width²) for each fitted
    table with a finite width, against the data's rows read with their own spread (s², `_spread`) and as one
    observation per plan (a plan's rows share its host state and whatever mechanism the model lacks: they are
    not independent). Row j reads c·x'_j ≈ c·(x_j − x_j log x_j), the linearised c·x_j·log x'_j = 0, with
    c = √(s²·n_rows / n_plans) / (width_j·x_j). Traces the parameters explain exactly leave the prior no weight."""
    a = np.zeros((len(PARAMS), len(PARAMS)))
    b = np.zeros(len(PARAMS))
    for j in cols:
        if np.isfinite(width[j]):
            c = np.sqrt(s2 * n_rows / n_plans) / (width[j] * x[j])
            a[j, j], b[j] = c, c * (x[j] - x[j] * np.log(x[j]))
    keep = np.abs(a).sum(axis=1) > 0
    return a[keep], b[keep]


def _gauss_newton(groups: Sequence[_PlanGroup], start: np.ndarray, candidates: list[int], m: np.ndarray,
                  max_iter: int, width: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], int]:
    """Bounded least squares on relative error over the candidate parameters (the others held at `start`), each row
    weighted by its plan's share (`plan_weights`) and by `robust_weights` of its error at the current point, and
    relinearised until the point and the weights settle and the cost model at the new point agrees with the linear
    model. Returns the point, the last relative Jacobian, the rows' weights, the fitted columns, the iterations."""
    x = start.copy()
    a, cols, it = np.zeros((len(m), len(PARAMS))), [], 0
    per_plan = plan_weights(groups)
    w = per_plan
    for it in range(1, max_iter + 1):
        p = Physical.from_vector(x)
        t0 = np.concatenate([g.predict(p) for g in groups])
        w = per_plan * robust_weights(t0 / m - 1)
        jac = np.concatenate([g.jacobian(p, candidates) for g in groups])  # held parameters' columns 0
        a = jac / m[:, None]
        b = (m - t0 + jac @ x) / m  # relative: measured ≈ t0 + J (x' − x)  ⇔  J x' / m ≈ (m − t0 + J x) / m
        cols = _identifiable(a, candidates)
        fixed = [j for j in range(len(PARAMS)) if j not in cols]
        rhs = b - a[:, fixed] @ x[fixed] - a[:, cols] @ _LB[cols]
        sw = np.sqrt(w)[:, None]
        s2 = _spread(w, t0 / m - 1, len(cols))
        pa, pb = _prior_rows(x, cols, width, s2, len(m), len(groups))
        new = x.copy()
        new[cols] = _LB[cols] + nnls(np.vstack([a[:, cols] * sw, pa[:, cols]]),
                                     np.concatenate([rhs * sw[:, 0], pb - pa[:, cols] @ _LB[cols]]))
        lin = t0 + jac @ (new - x)  # what the linear model predicts at the new point
        # the step: each parameter's move relative to its value (an overhead's to at least its Jacobian nudge)
        step = np.max(np.abs(new - x)[cols] / np.maximum(np.abs(x[cols]), _NUDGE_OVERHEAD_S), initial=0.0)
        x = new
        exact = np.concatenate([g.predict(Physical.from_vector(x)) for g in groups])
        w_new = per_plan * robust_weights(exact / m - 1)
        settled = np.max(np.abs(w_new - w) / w) < 0.05  # weights within 5%
        if len(pa):  # and the spread the prior was weighed against, within 5% or with the prices no longer moving
            settled &= (abs(_spread(w_new, exact / m - 1, len(cols)) - s2) <= 0.05 * s2
                        or np.max(np.abs(exact - t0) / m) < 1e-6)
        if np.max(np.abs(exact - lin) / m) < 1e-6 and settled and step < _STEP_SETTLED:
            break
    return x, a, w, cols, it


def _std_errors(x: np.ndarray, a: np.ndarray, w: np.ndarray, resid: np.ndarray, off: list[int], width: np.ndarray,
                n_plans: int) -> tuple[dict[str, float], dict[str, float]]:
    """One standard error per parameter in `off` (fitted off its bound), linearised, from the traces alone and with
    the prior. A plan's rows count as one observation, as in the prior's weight: they share the plan's host state
    and whatever mechanism the model lacks, so n rows of P plans scale the rows' spread by n / P."""
    if not off or len(resid) <= len(off):
        return {}, {}
    s2 = _spread(w, resid, len(off))
    pa = _prior_rows(x, off, width, s2, len(resid), n_plans)[0][:, off]
    normal = (a[:, off] * w[:, None]).T @ a[:, off]
    sd = lambda prec: np.sqrt(np.maximum(np.diag(s2 * len(resid) / n_plans * np.linalg.pinv(prec)), 0.0))  # noqa
    names = [PARAMS[j] for j in off]
    return dict(zip(names, sd(normal).tolist())), dict(zip(names, sd(normal + pa.T @ pa).tolist()))


def fit(groups: Sequence[_PlanGroup | _CpuRows], start: Physical, max_iter: int = 12, width: np.ndarray | None = None,
        only: Sequence[str] | None = None, base: Physical | None = None) -> Fit:
    """Fit the parameters the traces determine (`only` of them; the others held at `start`): multipliers ≥ MIN_SCALE,
    overheads ≥ 0, each table's multiplier under the prior `width` (`prior_widths`; None: no prior). A multiplier
    driven to its bound, or a parameter whose standard error from the traces alone exceeds MAX_REL_STD_ERR of its
    value, is put back to `base` (default `start`; worst first) and the rest refitted: only what the measurements pin
    down moves. The standard errors reported are the prior's and the traces' together."""
    width = np.full(len(PARAMS), np.inf) if width is None else width
    m = np.concatenate([g.measured for g in groups])
    candidates = [PARAMS.index(k) for k in only] if only is not None else list(range(len(PARAMS)))
    undetermined: dict[str, str] = {}
    x = x0 = start.vector()
    back = x0 if base is None else base.vector()
    while True:  # each refit starts where the last one ended, the parameters put back at their start values
        x = np.where(np.isin(np.arange(len(PARAMS)), candidates), x, x0)
        for k in undetermined:  # put back at the base, not where an earlier pass (fit_plans) left them
            x[PARAMS.index(k)] = back[PARAMS.index(k)]
        x, a, w, cols, it = _gauss_newton(groups, x, candidates, m, max_iter, width)
        resid = np.concatenate([g.predict(Physical.from_vector(x)) for g in groups]) / m - 1
        bound = [j for j in cols if x[j] <= _LB[j] * (1 + 1e-9)]
        off = [j for j in cols if j not in bound]
        data, std = _std_errors(x, a, w, resid, off, width, len(groups))
        worst: tuple[float, int, str] | None = None
        for j in cols:
            k = PARAMS[j]
            if j in bound and k in SCALED_TABLES:
                why, score = f"fit ran to the bound {MIN_SCALE:g}x: the traces cannot tell it from the others", np.inf
            elif k in data and data[k] > MAX_REL_STD_ERR * x[j]:
                why, score = f"fitted {x[j]:.3g} ± {data[k]:.2g} by the traces alone: too loose to keep", data[k] / x[j]
            else:
                continue
            if worst is None or score > worst[0]:
                worst = (score, j, why)
        if worst is None:
            break
        candidates.remove(worst[1])
        undetermined[PARAMS[worst[1]]] = worst[2]
    ident = [j for j in candidates if j in cols]
    not_ident = tuple(PARAMS[j] for j in candidates if j not in cols)
    return Fit(Physical.from_vector(x), tuple(PARAMS[j] for j in ident), std,
               tuple(PARAMS[j] for j in bound), not_ident, undetermined, tuple(g.name for g in groups), len(m), it,
               float(np.sqrt(np.mean(resid ** 2))))


COMPUTE_PARAMS = ("gemm", "attention", "memory", "layer_overhead_s", "attn_call_overhead_s")  # what a thread computes


def fit_plans(groups: Sequence[_PlanGroup], start: Physical, width: np.ndarray | None = None) -> Fit:
    """The parameters `fit` determines from the plans' traces. Where every row has its members' own-thread CPU (CPU
    replays on a CPU profile), the compute parameters are fitted to that CPU (`_CpuRows`) and the collectives then
    to the wall times, the compute held: a short unit whose wall time waited a scheduler slice for a core would
    otherwise set a per-layer overhead the other plans pay (docs/COSTMODEL.md, Calibration). Elsewhere every
    parameter is fitted to the wall times."""
    cpu = [g.cpu_rows() for g in groups]
    if any(c is None for c in cpu):
        return fit(groups, start, width=width)
    point, iterations = start, 0
    for _ in range(2):  # again where the collectives moved: a TP head's, priced into its compute, at the fitted rate
        compute = fit(cpu, point, width=width, only=COMPUTE_PARAMS, base=start)
        wall = fit(groups, compute.point, width=width, only=("collective",), base=start)
        moved, point = wall.point.collective != point.collective, wall.point
        iterations += compute.iterations + wall.iterations
        if not moved:
            break
    return Fit(wall.point, compute.fitted + wall.fitted, {**compute.std_err, **wall.std_err},
               compute.at_bound + wall.at_bound, compute.not_identifiable + wall.not_identifiable,
               {**compute.undetermined, **wall.undetermined}, wall.plans, wall.rows, iterations, wall.rms_rel_err,
               basis=CPU_BASIS)


# ---- the study ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamFit:
    """One parameter: base and fitted value."""

    name: str
    meaning: str
    base: float
    fitted: float
    std_err: float | None  # None: not fitted, or an overhead fitted at 0
    status: str  # "fitted" | "not identifiable from these traces" | "kept at base"
    note: str = ""  # kept at base: why


@dataclass(frozen=True)
class PlanErrors:
    """Relative error (predicted / measured − 1) of one plan's traces, before and after the fit."""

    plan: str
    role: Literal["held-out", "fitted"]
    traces: int
    units: int  # (replay step, unit, stage) compared
    fitted_on: tuple[str, ...]  # the plans of the fit that predicted "after"
    unit_median_before: float  # median |error| per unit
    unit_max_before: float
    unit_median_after: float
    unit_max_after: float
    step_median_before: float  # median |error| per replay step
    step_max_before: float
    step_median_after: float
    step_max_after: float
    unit_errors_before: tuple[float, ...] = ()  # each (replay step, unit, stage)'s signed error (one plan's only)
    unit_errors_after: tuple[float, ...] = ()
    step_errors_before: tuple[float, ...] = ()  # each replay step's signed error
    step_errors_after: tuple[float, ...] = ()
    # the units' own-thread CPU against their priced compute (predicted_cpu_s), median |error|; nan where the traces
    # or the profile lack it (GPU)
    unit_cpu_median_before: float = float("nan")
    unit_cpu_median_after: float = float("nan")


def _plan_errors(plan: str, role, traces: int, fitted_on, before, after, signed: bool = True) -> PlanErrors:
    """A plan's error statistics, and with `signed` its errors themselves (pooled rows repeat the plans': not)."""
    (ub, sb, cb), (ua, sa, ca) = before, after
    stat = lambda e: (float(np.median(np.abs(e))), float(np.max(np.abs(e)))) if len(e) else (np.nan, np.nan)  # noqa
    each = (lambda e: tuple(float(x) for x in e)) if signed else (lambda e: ())
    return PlanErrors(plan, role, traces, len(ub), tuple(fitted_on), *stat(ub), *stat(ua), *stat(sb), *stat(sa),
                      each(ub), each(ua), each(sb), each(sa), stat(cb)[0], stat(ca)[0])


@dataclass(frozen=True)
class Calibration:
    """What `meshplan calibrate` fitted and how well it predicts plans it did not see."""

    base: str  # the base profile's name
    profile: Profile  # the fitted profile (on every plan but the named held-out ones)
    params: tuple[ParamFit, ...]
    holdout: Literal["leave-one-plan-out", "named"]
    held_out: tuple[PlanErrors, ...]
    fitted: tuple[PlanErrors, ...]  # the written profile on the plans it was fitted on
    held_out_all: PlanErrors  # every held-out plan together
    fitted_all: PlanErrors
    rows: int  # measured times the written profile was fitted on
    rms_rel_err: float  # their RMS relative error after the fit
    prior_width: float  # the tables' prior width, sd of log(multiplier) (inf: none)
    basis: str = WALL_BASIS  # what the written profile's compute parameters were fitted to (Fit.basis)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "profile"}
        d = {k: ([dataclasses.asdict(x) for x in v] if isinstance(v, tuple) else
                 dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in d.items()}
        d["profile"] = {"name": self.profile.fingerprint.name, "source": self.profile.fingerprint.source}
        return _finite(d)


def _finite(x):
    """`x` with every non-finite float (no CPU errors: nan; no prior: inf) as None: JSON has neither."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_finite(v) for v in x)
    return None if isinstance(x, float) and not np.isfinite(x) else x


def _pool(errors: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Plans' (unit, step, CPU) errors, each kind pooled."""
    return tuple(np.concatenate([e[i] for e in errors]) if errors else np.array([]) for i in range(3))


def _fits_for(profile: Profile, names: Sequence[str]) -> list[str]:
    """Recompute the T(s) fits of the base's models that are presets; one note per model dropped."""
    from costmodel.presets import load_model, model_names
    from costmodel.timing import fit_models

    presets = {n: load_model(n) for n in names if n in model_names()}
    return fit_models(profile, presets) + [f"T(s) fit of {n} dropped (not a preset model)"
                                           for n in names if n not in presets]


def calibrate(pairs: Sequence[tuple[Path, Path]], profile: str, holdout: Sequence[Path] = (),
              progress: Callable[[str, int, int], None] | None = None,
              prior_width: float | None = None) -> Calibration:
    """Fit `profile`'s physical parameters on (plan, trace) pairs. With `holdout` plans named, the profile is
    fitted on the others and judged on them; else every plan is judged by a fit on the other plans (leave one
    plan out) and the profile is fitted on all. Needs at least two plans. `prior_width`: the tables' multipliers'
    prior (`prior_widths`; default by how the base was obtained, inf for none). `progress(what, fits done, fits)`
    is called before each fit and once when all are done."""
    say = progress or (lambda _what, _done, _total: None)
    loaded = [load_pair(p, t) for p, t in pairs]
    by_plan: dict[Path, list[TracePair]] = {}
    for lp in loaded:
        by_plan.setdefault(lp.plan_path.resolve(), []).append(lp)
    if len(by_plan) < 2:
        raise PlanError(f"calibration needs traces of at least 2 plans (got {len(by_plan)}): errors are reported on "
                        "plans the fit did not see")
    held = {Path(h).resolve() for h in holdout}
    unknown = sorted(str(h) for h in holdout if Path(h).resolve() not in by_plan)
    if unknown:
        raise PlanError(f"--holdout {unknown[0]}: not one of the pairs' plans")
    if held and len(held) == len(by_plan):
        raise PlanError("--holdout names every plan: leave at least one to fit on")
    base = load_profile(profile)
    start = Physical.of_profile(base)
    groups = {k: _PlanGroup(str(v[0].plan_path), v, profile, base) for k, v in by_plan.items()}
    train = [g for k, g in groups.items() if k not in held]
    fits = 1 if held else 1 + len(groups)
    say(f"fitting the profile on {len(train)} plan{'s' if len(train) > 1 else ''}", 0, fits)
    width = prior_widths(base, prior_width)
    final = fit_plans(train, start, width=width)
    errs = {k: g.errors(start) for k, g in groups.items()}  # before: the base profile
    held_rows, held_pool_b, held_pool_a = [], [], []
    if held:
        for k in sorted(held, key=lambda k: groups[k].name):
            after = groups[k].errors(final.point)
            held_rows.append(_plan_errors(groups[k].name, "held-out", len(groups[k].pairs), final.plans, errs[k],
                                          after))
            held_pool_b.append(errs[k])
            held_pool_a.append(after)
    else:
        for i, (k, g) in enumerate(groups.items(), start=1):
            say(f"predicting {Path(g.name).name} from the other plans", i, fits)
            fold = fit_plans([o for j, o in groups.items() if j != k], start, width=width)
            after = g.errors(fold.point)
            held_rows.append(_plan_errors(g.name, "held-out", len(g.pairs), fold.plans, errs[k], after))
            held_pool_b.append(errs[k])
            held_pool_a.append(after)
    say("done", fits, fits)
    fit_rows, fit_pool_b, fit_pool_a = [], [], []
    for k, g in groups.items():
        if k in held:
            continue
        after = g.errors(final.point)
        fit_rows.append(_plan_errors(g.name, "fitted", len(g.pairs), final.plans, errs[k], after))
        fit_pool_b.append(errs[k])
        fit_pool_a.append(after)
    n_traces = lambda rows: sum(r.traces for r in rows)  # noqa: E731
    held_all = _plan_errors("all held-out", "held-out", n_traces(held_rows), (), _pool(held_pool_b),
                            _pool(held_pool_a), signed=False)
    fitted_all = _plan_errors("all fitted", "fitted", n_traces(fit_rows), final.plans, _pool(fit_pool_b),
                              _pool(fit_pool_a), signed=False)
    params = []
    for k in PARAMS:
        b, f = getattr(start, k), getattr(final.point, k)
        status = "fitted" if k in final.fitted else _NOT_IDENTIFIABLE if k in final.not_identifiable else \
            _UNDETERMINED
        params.append(ParamFit(k, PARAM_MEANING[k], b, f, final.std_err.get(k), status,
                               final.undetermined.get(k, "")))
    prior = float(width[PARAMS.index("gemm")])
    prof = _written_profile(base, final, [p for g in train for p in g.pairs], held_all, params, prior)
    return Calibration(base.fingerprint.name, prof, tuple(params), "named" if held else "leave-one-plan-out",
                       tuple(held_rows), tuple(fit_rows), held_all, fitted_all, final.rows, final.rms_rel_err, prior,
                       final.basis)


def _written_profile(base: Profile, final: Fit, pairs: list[TracePair], held_all: PlanErrors,
                     params: list[ParamFit], prior_width: float) -> Profile:
    """The fitted profile with a fingerprint that says what it was fitted on."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    fp = base.fingerprint
    name = fp.name if fp.name.endswith(".calibrated") else f"{fp.name}.calibrated"
    plans = sorted({str(p.plan_path) for p in pairs})
    def described(p: TracePair) -> str:  # the trace with where and when it was measured, when it says
        meta = p.trace.get("meta") or {}
        said = [str(meta[k]) for k in ("device_name", "created") if meta.get(k)]
        return f"{p.trace_path}" + (f" ({', '.join(said)})" if said else "")

    traces = ", ".join(described(p) for p in pairs)
    prior = (f"the tables' multipliers under the prior log(multiplier) ~ N(0, {prior_width:g}²)"
             if np.isfinite(prior_width) else "no prior on the tables")
    fitted = "; ".join(f"{x.name} {x.fitted:.4g}" + (f" ± {x.std_err:.2g}" if x.std_err is not None else "")
                       + ("" if x.status == "fitted" else f" ({x.status}{': ' + x.note if x.note else ''})")
                       for x in params)
    source = f"meshplan calibrate {now[:10]} on plans {', '.join(plans)}"
    notes = (f"Calibrated {now} by `meshplan calibrate` from {fp.name} (sha256 {fp.sha256}) on {len(pairs)} "
             f"trace(s) of {len(plans)} plan(s) ({', '.join(plans)}): {traces}. {final.rows} measured unit times "
             "(forward and backward, median over replay iterations), least squares on relative error (robust, "
             f"soft-L1; each plan weighed alike; {prior}; fitted to {final.basis}), RMS relative error "
             f"after {final.rms_rel_err:.1%}. Table-time multipliers (host_copy kept) and overheads: {fitted}. "
             f"Held-out median |error| per unit {held_all.unit_median_before:.1%} before, "
             f"{held_all.unit_median_after:.1%} after. "
             + ("Constants of the analytic generator other than hbm describe the base tables. "
                if fp.source == "analytic" else "") + f"Base notes: {fp.notes}")
    prof = calibrated_profile(base, final.point, name=name, notes=notes, overhead_source=source)
    prof.fingerprint = dataclasses.replace(prof.fingerprint, created=now)
    fit_notes = _fits_for(prof, sorted(base.fits))
    if fit_notes:
        prof.fingerprint = dataclasses.replace(prof.fingerprint,
                                               notes=prof.fingerprint.notes + " " + "; ".join(fit_notes))
    prof.fingerprint = dataclasses.replace(prof.fingerprint, sha256=prof.compute_sha256())
    return prof


__all__ = ["COMPUTE_PARAMS", "CPU_BASIS", "Calibration", "Fit", "OVERHEADS", "PARAMS", "PRIOR_WIDTH", "ParamFit",
           "Physical", "PlanErrors", "Row", "SCALED_TABLES", "TracePair", "WALL_BASIS", "calibrate",
           "calibrated_profile", "fit", "fit_plans", "load_pair", "nnls", "prior_widths", "read_trace", "trace_rows"]
