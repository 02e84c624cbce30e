"""Calibration: traces made from a profile with known physical parameters (the base profile's tables scaled,
overheads added) are fitted starting from the base profile; the fit recovers the parameters and the error
on held-out plans falls. Errors in the inputs are one line and write nothing."""

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from costmodel.timing import CostModel
from planner.api import PlanRequest, cost_model_for_plan, make_plan
from planner.simulate.measured import predicted_cpu_s, predicted_units_s
from planner.simulate.step import simulate_step, unit_costs
from planner.studies import Physical, calibrate, calibrated_profile
from planner.studies.calibrate import (CPU_BASIS, OVERHEADS, PARAMS, PRIOR_WIDTH, SCALED_TABLES, WALL_BASIS,
                                       _jacobian, fit, load_pair, nnls, prior_widths)
from planner.plan import PlanError
from planner.plan.stream import load_plan
from planner.studies.machine_check import accuracy
from profiles.table import load_profile

# a measured CPU profile (2-core AVX2 EPYC) on which these plans are dominated by GEMMs, attention and the layer
# overhead, the parameters the fit must recover (an AVX-512 host's faster GEMMs leave them a minor share)
BASE = str(Path(__file__).resolve().parents[2] / "data" / "epyc-avx2.measured.json")
TRUE = Physical(gemm=1.3, attention=0.8, memory=2.0, collective=1.5, layer_overhead_s=2e-3,
                attn_call_overhead_s=1e-4)
# Plans whose parts vary independently: packed documents (attention calls per unit vary), ring units (P2P),
# TP (collectives), two pipeline stages, another length distribution.
CASES = {"static": dict(gpus=2, strategy="static"), "ring": dict(gpus=2, strategy="hdp"),
         "tp": dict(gpus=2, tp=2, strategy="static"), "pp": dict(gpus=4, pp=2, strategy="hdp"),
         "github": dict(gpus=4, strategy="hdp", lengths="github-like")}


def synthetic_trace(plan, plan_path, profile, noise: float = 0.0, seed: int = 0) -> dict:
    """The trace a replay would write if the hardware ran exactly as `profile` prices it (measured schema;
    one record per unit and stage: the fit takes the mean over ranks), times optionally jittered."""
    cm = CostModel(cost_model_for_plan(plan, BASE).setup, profile)
    rng = np.random.default_rng(seed)
    jitter = lambda: float(np.exp(rng.normal(0.0, noise))) if noise else 1.0  # noqa: E731
    steps = []
    for i, st in enumerate(plan.steps):
        costs, took = unit_costs(st, cm), predicted_units_s(st, cm)  # pp = 1: as the schedule ran each unit
        units = []
        for u in st.units:
            for stage in range(cm.pp):
                c = costs[u.id][1 if stage == cm.pp - 1 else 0]
                x = took[(u.id, stage)] / c.total_s
                units.append({"unit": u.id, "stage": stage, "degree": u.degree, "rank": 0,
                              "fwd_s": c.fwd_s * x * jitter(), "bwd_s": c.bwd_s * x * jitter()})
        steps.append({"step": i, "plan_step": st.step, "units": units, "ranks": [],
                      "step_time_s": simulate_step(st, cm).step_time_s})
    meta = {"plan_sha256": hashlib.sha256(plan_path.read_bytes()).hexdigest(), "device_name": "synthetic"}
    return {"schema": "meshplan.measured/1", "complete": True, "meta": meta, "steps": steps}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibrate")
    out = {}
    for i, (name, case) in enumerate(CASES.items()):
        case = dict(case)
        strategy = case.pop("strategy")
        req = PlanRequest(model="tiny", cluster="local-cpu", tokens_per_step=8192, max_context_tokens=4096, steps=2,
                          seed=i, **case)
        path = d / f"{name}.json"
        plan = make_plan(req, strategy)
        plan.save(path)
        out[name] = (plan, path)
    return d, out


def write_traces(plans, profile, noise: float = 0.0, tag: str = "") -> list:
    d, ps = plans
    pairs = []
    for i, (name, (plan, path)) in enumerate(ps.items()):
        trace = d / f"{name}{tag}.trace.json"
        trace.write_text(json.dumps(synthetic_trace(plan, path, profile, noise, seed=i)))
        pairs.append((path, trace))
    return pairs


@pytest.fixture(scope="module")
def exact(plans):
    return write_traces(plans, calibrated_profile(load_profile(BASE), TRUE))


@pytest.fixture(scope="module")
def fitted(exact):
    # no prior: the fit alone recovers the truth in two Gauss-Newton steps; under the default prior (weighed by the
    # rows' spread, which falls to 0 as the fit closes in) it takes about eight, as test_named_holdout shows
    return calibrate(exact, BASE, prior_width=math.inf)


def test_fit_recovers_the_parameters_that_made_the_traces(fitted):
    res = fitted
    for p in res.params:
        assert p.status == "fitted", p
        assert p.fitted == pytest.approx(getattr(TRUE, p.name), rel=1e-6), p.name
    assert res.holdout == "leave-one-plan-out" and len(res.held_out) == len(CASES)
    # each plan predicted by a fit on the others: no worse than before, and better overall
    assert res.held_out_all.unit_median_before > 0.05
    assert res.held_out_all.unit_median_after < 0.01 * res.held_out_all.unit_median_before
    assert res.held_out_all.step_median_after < res.held_out_all.step_median_before
    assert res.fitted_all.unit_max_after < 1e-6 and res.rms_rel_err < 1e-6
    for e in res.held_out:
        assert e.plan not in e.fitted_on and len(e.fitted_on) == len(CASES) - 1


def test_written_profile_records_what_it_was_fitted_on(exact, fitted, tmp_path):
    path = fitted.profile.save(tmp_path / "fitted.json")
    prof = load_profile(str(path))  # the sha256 checks out
    fp = prof.fingerprint
    assert fp.name == f"{load_profile(BASE).fingerprint.name}.calibrated" and fp.source == "measured"
    assert fp.device == load_profile(BASE).fingerprint.device
    assert load_profile(BASE).fingerprint.sha256 in fp.notes
    for plan, trace in exact:
        assert str(plan) in fp.notes and str(trace) in fp.notes
    for k in ("layer_overhead_s", "attn_call_overhead_s"):
        assert prof.constants[k]["value"] == pytest.approx(getattr(TRUE, k), rel=1e-6)
        assert "meshplan calibrate" in prof.constants[k]["source"]
    assert "tiny" in prof.fits  # the base's T(s) fits, refitted on the new tables
    base = load_profile(BASE)
    assert np.allclose(prof.tables["gemm"]["time_s"], base.tables["gemm"]["time_s"] * TRUE.gemm, rtol=1e-6)
    assert np.array_equal(prof.tables["host_copy"]["time_s"], base.tables["host_copy"]["time_s"])


def test_noisy_traces_recover_the_dominant_parameters(plans):
    true = calibrated_profile(load_profile(BASE), TRUE)
    res = calibrate(write_traces(plans, true, noise=0.02, tag=".noisy"), BASE)
    fitted = {p.name: p for p in res.params}
    for k in ("gemm", "attention", "layer_overhead_s"):  # well determined by these five plans (each one observation
        assert fitted[k].std_err < 0.2 * getattr(TRUE, k), k  # in the standard errors), and within the error the
        assert abs(fitted[k].fitted - getattr(TRUE, k)) < 3 * fitted[k].std_err, k  # fit reports (how close
        # depends on the plans the strategy makes)
    for p in res.params:  # the rest: within its reported error, or kept at the base with the reason
        if p.status == "fitted":
            assert p.std_err is None or abs(p.fitted - getattr(TRUE, p.name)) < 3 * p.std_err, p
        else:
            assert p.status == "kept at base" and p.note and p.fitted == p.base, p
    assert res.held_out_all.unit_median_after < 0.5 * res.held_out_all.unit_median_before
    assert 0.005 < res.rms_rel_err < 0.05  # the 2% jitter is left, nothing more


def slow_pipeline_traces(plans, factor: float, noise: float = 0.0, tag: str = "") -> list:
    """Traces made from TRUE with the pipeline plan's units all `factor` times slower: a mechanism the cost model
    lacks."""
    pairs = write_traces(plans, calibrated_profile(load_profile(BASE), TRUE), noise=noise, tag=tag)
    trace = dict(pairs)[plans[1]["pp"][1]]
    doc = json.loads(trace.read_text())
    for st in doc["steps"]:
        for u in st["units"]:
            u["fwd_s"], u["bwd_s"] = factor * u["fwd_s"], factor * u["bwd_s"]
    trace.write_text(json.dumps(doc))
    return pairs


def test_a_plan_no_parameter_explains_moves_the_shared_fit_little(plans):
    """One plan's units all 60% slower than the true parameters price them (a mechanism the cost model lacks, as
    a CPU pipeline's short units were): weighed like the other plans and robustly, the fit on four plans still
    prices the other three within 6% per unit and predicts the plan held out within 5%; the slow plan keeps its
    error. (Plain least squares, each row alike, spread it: the other three 8-20% off, the held-out plan 12% off.
    Since the pipeline's units are priced as the shared-core schedule runs them, the fit gave 0.9-5.2% and 3.3%
    held out, against 0.6-4.4% and 2.7% with the stage prices. Since standard errors count plans, not rows, the slow
    plan's spread leaves GEMMs too loose to move: 1.2-3.9% and 4.1% held out.)
    The collectives are not asserted: on this profile's busy cores the slow plan's ring transfers are priced
    exposed, so its 60% weighs on them too, and the fit keeps them at the base as too loose to tell. No prior: the
    two weights alone (the prior, weighed against the rows' spread, holds the tables nearer the base here)."""
    pairs = slow_pipeline_traces(plans, 1.6, tag=".outlier")
    _, ps = plans
    res = calibrate(pairs, BASE, holdout=[ps["static"][1]], prior_width=math.inf)
    for e in res.fitted:
        if e.plan == str(ps["pp"][1]):
            assert e.unit_median_after > 0.3  # its 60% stays where it is, not spread over the shared parameters
        else:
            assert e.unit_median_after < 0.06, e
    assert res.held_out_all.unit_median_after < 0.05


def waiting_traces(plans, wait_s: float, plan: str, cpu: bool) -> list:
    """Traces made from TRUE in which every unit of `plan` also waited `wait_s` in its forward (for a core another
    rank held: wall time, no CPU), with each unit's own-thread CPU as TRUE prices it (`cpu`) or without it."""
    true = calibrated_profile(load_profile(BASE), TRUE)
    pairs = write_traces(plans, true, tag=f".wait{wait_s:g}.{plan}.{int(cpu)}")
    for plan_path, trace in pairs:
        doc, p = json.loads(trace.read_text()), load_plan(plan_path)
        cm = CostModel(cost_model_for_plan(p, BASE).setup, true)
        steps = {s.step: s for s in p.steps}
        for st in doc["steps"]:
            priced = predicted_cpu_s(steps[st["plan_step"]], cm)
            for u in st["units"]:
                if cpu:
                    u.update(thread_cpu_s=priced[(u["unit"], u["stage"])], helper_cpu_s=0.0)
                    doc["meta"]["cpu_threads"] = 1  # the compute on the rank's own thread, as replays run it
                if plan_path == plans[1][plan][1]:
                    u["fwd_s"] += wait_s
        trace.write_text(json.dumps(doc))
    return pairs


def test_compute_is_fitted_to_the_threads_cpu_where_the_traces_have_it(plans):
    """Every unit of one plan waits 3 ms for a core in its forward (a scheduler slice: wall time, no CPU). Fitted to
    the wall, the tables and overheads take the wait in whatever mix fits it (GEMMs kept at the base, memory x9.4),
    and the ring plan held out is priced 2.5% off per unit; fitted to the units' own-thread CPU (what replays on a
    CPU record), the compute parameters come out near TRUE's and it is priced within 0.1%. Memory moves a few
    percent of these units' CPU, hence the looser bound on it."""
    _, ps = plans
    runs = {cpu: calibrate(waiting_traces(plans, 3e-3, "github", cpu=cpu), BASE, holdout=[ps["ring"][1]],
                           prior_width=math.inf) for cpu in (False, True)}
    walls, cpus = runs[False], runs[True]
    assert walls.held_out_all.unit_median_after > 0.01
    assert cpus.held_out_all.unit_median_after < 0.1 * walls.held_out_all.unit_median_after
    fitted = {p.name: p for p in cpus.params}
    assert all(p.status == "fitted" for p in cpus.params)
    for k, rel in (("attention", 0.01), ("layer_overhead_s", 0.02), ("attn_call_overhead_s", 0.05), ("gemm", 0.05),
                   ("collective", 0.02), ("memory", 0.2)):
        assert fitted[k].fitted == pytest.approx(getattr(TRUE, k), rel=rel), k
    assert cpus.basis == CPU_BASIS and walls.basis == WALL_BASIS
    # the units' CPU errors are reported where the traces have it, and JSON carries no NaN where they do not
    assert cpus.held_out_all.unit_cpu_median_after < 0.001 < cpus.held_out_all.unit_cpu_median_before
    assert math.isnan(walls.held_out_all.unit_cpu_median_after)
    assert json.loads(json.dumps(walls.to_dict(), allow_nan=False))["held_out_all"]["unit_cpu_median_after"] is None


def test_the_cpu_fit_needs_every_plans_compute_on_one_thread(plans):
    """CPU traces: the table says what the compute was fitted to and gives each plan's units' CPU error. A trace whose
    ranks ran torch on four threads (its own thread's CPU is part of the compute) puts the whole fit on wall time, as
    GPU traces are, and reports no CPU error for that plan."""
    _, ps = plans
    pairs = waiting_traces(plans, 0.0, "github", cpu=True)
    r = cli(*(f"{p}:{t}" for p, t in pairs), "--profile", BASE, "--out", pairs[0][1].with_suffix(".fit.json"),
            "--holdout", ps["ring"][1], "--prior-width", "inf")
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert f"fitted to {CPU_BASIS}" in out and "unit CPU median" in out, out
    threads = dict(pairs)[ps["tp"][1]]
    doc = json.loads(threads.read_text())
    doc["meta"]["cpu_threads"] = 4
    threads.write_text(json.dumps(doc))
    res = calibrate(pairs, BASE, holdout=[ps["ring"][1]], prior_width=math.inf)
    assert res.basis == WALL_BASIS
    cpu = {Path(e.plan).stem: e.unit_cpu_median_before for e in res.fitted}
    assert math.isnan(cpu["tp"]) and all(math.isfinite(v) for k, v in cpu.items() if k != "tp"), cpu


def test_the_prior_holds_a_table_the_traces_move_only_with_others(plans):
    """The pipeline plan's units 30% slower than the true parameters price them, 2% noise, the TP plan held out.
    Without a prior the fit explains the pipeline's 30% with GEMMs at more than twice the truth (x1.3), a
    direction the other plans barely see; under the default prior (measured base: log-multiplier sd 0.5) the GEMM
    table stays at the base, and the parameters the plans pin down are fitted as before."""
    pairs = slow_pipeline_traces(plans, 1.3, noise=0.02, tag=".slowpp")
    _, ps = plans
    free = calibrate(pairs, BASE, holdout=[ps["tp"][1]], prior_width=math.inf)
    held = calibrate(pairs, BASE, holdout=[ps["tp"][1]])
    assert held.prior_width == PRIOR_WIDTH["measured"] and free.prior_width == math.inf
    gemm = lambda res: next(p for p in res.params if p.name == "gemm")  # noqa: E731
    assert gemm(free).fitted > 2.0 and gemm(free).status == "fitted"
    assert abs(gemm(held).fitted - 1.0) < 0.1
    for res in (free, held):
        attention = next(p for p in res.params if p.name == "attention")
        assert attention.status == "fitted" and abs(attention.fitted - TRUE.attention) < 0.1
    assert held.held_out_all.step_median_after < held.held_out_all.step_median_before
    assert "N(0, 0.5²)" in held.profile.fingerprint.notes and "no prior" in free.profile.fingerprint.notes
    assert held.to_dict()["prior_width"] == 0.5 and free.to_dict()["prior_width"] is None  # JSON has no inf


def test_prior_widths_follow_how_the_base_was_obtained():
    measured, analytic = load_profile(BASE), load_profile("h100-sxm.analytic")
    tables = [PARAMS.index(k) for k in SCALED_TABLES]
    overheads = [PARAMS.index(k) for k in OVERHEADS]
    assert (prior_widths(measured)[tables] == PRIOR_WIDTH["measured"]).all()
    assert (prior_widths(analytic)[tables] == PRIOR_WIDTH["analytic"]).all()
    assert PRIOR_WIDTH["analytic"] > PRIOR_WIDTH["measured"]  # published rates are known less well than timed ones
    assert (prior_widths(analytic, 0.2)[tables] == 0.2).all()
    assert np.isinf(prior_widths(measured)[overheads]).all()  # overheads: bounded at 0, no prior
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(PlanError, match="prior width"):
            prior_widths(measured, bad)


def test_named_holdout_is_left_out_of_the_written_fit(plans, exact):
    held, said = exact[-1][0], []
    res = calibrate(exact, BASE, holdout=[held],  # the default prior: exact traces leave it no weight
                    progress=lambda *a: said.append(a))
    plans_fitted = len({p for p, _ in exact}) - 1
    assert said == [(f"fitting the profile on {plans_fitted} plans", 0, 1), ("done", 1, 1)]  # one fit, no folds
    assert res.holdout == "named" and res.prior_width == PRIOR_WIDTH["measured"]
    assert [e.plan for e in res.held_out] == [str(held)]
    assert str(held) not in [e.plan for e in res.fitted]
    assert str(held) not in res.profile.constants["layer_overhead_s"]["source"]
    assert res.held_out[0].unit_median_after < 1e-6 < res.held_out[0].unit_median_before


def test_leave_one_plan_out_reports_each_fit(exact):
    said, two = [], exact[:2]
    calibrate(two, BASE, prior_width=math.inf, progress=lambda *a: said.append(a))
    folds = [(f"predicting {p.name} from the other plans", i, 3) for i, (p, _) in enumerate(two, start=1)]
    assert said == [("fitting the profile on 2 plans", 0, 3), *folds, ("done", 3, 3)]


def test_a_part_no_trace_exercises_stays_at_the_base(plans, exact):
    # two plans of packed documents on two ranks each (no TP collective, no ring transfer); the second of other
    # lengths
    d, _ = plans
    req = PlanRequest(model="tiny", cluster="local-cpu", tokens_per_step=8192, max_context_tokens=4096, steps=2,
                      seed=7, gpus=2, lengths="github-like")
    path, trace = d / "static-github.json", d / "static-github.trace.json"
    plan = make_plan(req, "static")
    plan.save(path)
    trace.write_text(json.dumps(synthetic_trace(plan, path, calibrated_profile(load_profile(BASE), TRUE))))
    res = calibrate([exact[0], (path, trace)], BASE)
    coll = next(p for p in res.params if p.name == "collective")
    assert coll.status == "not identifiable from these traces" and coll.fitted == 1.0 and coll.std_err is None
    assert next(p for p in res.params if p.name == "attention").fitted == pytest.approx(TRUE.attention, rel=1e-3)
    assert res.rms_rel_err < 0.005


def test_calibrated_profile_at_the_base_point_prices_as_the_base():
    base = load_profile("h100-sxm.analytic")
    same = calibrated_profile(base, Physical.of_profile(base))
    for t in base.tables:
        assert np.array_equal(same.tables[t]["time_s"].astype(float), base.tables[t]["time_s"].astype(float))
    fast = calibrated_profile(base, dataclasses.replace(Physical(), memory=0.5))
    assert fast.constant("hbm") == pytest.approx(2 * base.constant("hbm"))  # GEMMs' memory side moves with it
    assert Physical.from_vector(TRUE.vector()) == TRUE and len(PARAMS) == len(TRUE.vector())


def test_nnls_meets_its_optimality_conditions():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.normal(size=(30, 5)), rng.normal(size=30)
        x = nnls(a, b)
        w = a.T @ (b - a @ x)  # KKT: x >= 0, gradient <= 0 where x = 0, = 0 where x > 0
        assert (x >= 0).all() and (w[x == 0] <= 1e-9).all() and np.allclose(w[x > 0], 0, atol=1e-9)
    a = rng.normal(size=(10, 3))
    assert np.allclose(nnls(a, a @ np.array([1.0, 2.0, 3.0])), [1, 2, 3])


class _Affine:
    """A plan whose rows cost a fixed part plus a linear one in the parameters (a constant no parameter scales, as a
    profile's unscaled terms): t = c + A x, measured exactly at `truth`; counts its pricings."""

    name = "affine"

    def __init__(self, truth: Physical):
        rng = np.random.default_rng(5)
        self.c, self.a = rng.uniform(1e-3, 2e-3, 12), rng.uniform(0.0, 1e-3, (12, len(PARAMS)))
        self.a[:, len(SCALED_TABLES):] = rng.uniform(0.0, 3.0, (12, len(OVERHEADS)))
        self.measured = self.c + self.a @ truth.vector()
        self.rows, self.pricings = [None] * len(self.c), 0

    def predict(self, p: Physical) -> np.ndarray:
        self.pricings += 1
        return self.c + self.a @ p.vector()

    def jacobian(self, p: Physical, cols) -> np.ndarray:
        return _jacobian(self.predict, p, cols)


def test_a_subset_fit_prices_only_its_parameters_and_stops_when_the_linear_model_holds():
    truth = Physical(gemm=1.0, attention=1.3, memory=1.0, collective=0.7, layer_overhead_s=0.0,
                     attn_call_overhead_s=2e-4)
    group = _Affine(truth)
    f = fit([group], Physical(), only=("attention", "collective", "attn_call_overhead_s"))
    assert f.point.vector() == pytest.approx(truth.vector(), rel=1e-6, abs=1e-9)
    # one step lands on the truth (the model is linear), the next confirms it: the check compares the priced point
    # with t0 + J(x' - x), not J x', which a fixed part would never match (12 iterations)
    assert f.iterations == 2
    # each iteration prices the point (twice: once for the Jacobian; a plan caches it), one nudge per fitted
    # parameter and the new point, then the fit prices its result: 6 a step, not 9 with every parameter nudged
    assert group.pricings == 2 * (2 + 3 + 1) + 1


# ---- the command line ------------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(app, ["calibrate", *map(str, args)])


def test_cli_writes_the_profile_and_prints_json(exact, tmp_path):
    out = tmp_path / "cal.json"
    r = cli(*(f"{p}:{t}" for p, t in exact[:3]), "--profile", BASE, "--out", out, "--json", "--prior-width", "inf")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["prior_width"] is None  # no prior (JSON has no inf)
    assert doc["out"] == str(out) and doc["profile"]["name"] == f"{load_profile(BASE).fingerprint.name}.calibrated"
    assert {p["name"] for p in doc["params"]} == set(PARAMS) and len(doc["held_out"]) == 3
    assert load_profile(str(out)).fingerprint.name == f"{load_profile(BASE).fingerprint.name}.calibrated"
    r = cli(*(f"{p}:{t}" for p, t in exact[:2]), "--profile", BASE, "--out", tmp_path / "cal2.json", "--plot",
            tmp_path / "cal2.png")
    assert r.exit_code == 0 and "held-out" in r.stdout and "wrote" in r.stdout, r.output
    svg = (tmp_path / "cal2.svg").read_text()  # each plan held out and fitted on, per step and per unit
    assert (tmp_path / "cal2.png").exists() and "per step" in svg and "per unit" in svg and "(held-out)" in svg
    assert all(len(e["step_errors_before"]) == len(e["step_errors_after"]) > 0 for e in doc["held_out"])


def _fails(r, *words):
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    assert "Traceback" not in r.output and all(w in msg for w in words), msg


def test_cli_errors_are_one_line_and_write_nothing(exact, plans, tmp_path):
    out = tmp_path / "never.json"
    (p0, t0), (p1, t1) = exact[0], exact[1]
    args = ("--profile", BASE, "--out", out)
    _fails(cli(f"{p0}:{t0}", args[0], args[1], args[2], args[3]), "at least 2 plans")
    _fails(cli(f"{p0}:{t0}", f"{p0}:{t0}", *args), "at least 2 plans")  # two traces, one plan
    _fails(cli(f"{p0}:{t0}", f"{p1}", *args), "expected PLAN:TRACE")
    _fails(cli(f"{p0}:{t0}", f"{p1}:{tmp_path / 'missing.json'}", *args), "missing.json", "cannot read")
    _fails(cli(f"{p0}:{t0}", f"{p1}:{t0}", *args), "another plan")  # the trace of p0 paired with p1
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({**json.loads(t1.read_text()), "complete": False}))
    _fails(cli(f"{p0}:{t0}", f"{p1}:{cut}", *args), "incomplete")
    cut.write_text(t1.read_text()[:100])
    _fails(cli(f"{p0}:{t0}", f"{p1}:{cut}", *args), "truncated or corrupt")
    _fails(cli(f"{p0}:{t0}", f"{p1}:{t1}", *args, "--holdout", tmp_path / "other.json"), "not one of")
    _fails(cli(f"{p0}:{t0}", f"{p1}:{t1}", *args, "--holdout", p0, "--holdout", p1), "every plan")
    _fails(cli(f"{p0}:{t0}", f"{p1}:{t1}", *args, "--prior-width", "0"), "--prior-width 0", "above 0")
    _fails(cli(f"{p0}:{t0}", f"{p1}:{t1}", *args, "--plot", tmp_path), "--plot", "is a folder")
    assert not out.exists()


def test_a_trace_naming_units_the_plan_lacks_is_refused(exact, tmp_path):
    (p0, t0) = exact[0]
    doc = json.loads(t0.read_text())
    doc["meta"].pop("plan_sha256")
    doc["steps"][0]["units"][0]["unit"] = 999
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="not in the plan"):
        load_pair(p0, bad)


def test_a_row_is_a_units_forward_plus_backward_whichever_direction_a_wait_falls_in(exact, tmp_path):
    """Two members of a unit that book the same wait, one in its forward and one in its backward, give one row:
    the mean over ranks of forward + backward (the median over iterations)."""
    (p0, t0) = exact[0]
    doc = json.loads(t0.read_text())
    doc["meta"].pop("plan_sha256")
    for st in doc["steps"]:
        units = []
        for u in st["units"]:
            wait = 0.5 * u["fwd_s"]
            units += [dict(u, rank=0, fwd_s=u["fwd_s"] + wait), dict(u, rank=1, bwd_s=u["bwd_s"] + wait)]
        st["units"] = units
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(doc))
    base, waited = load_pair(p0, t0).rows, load_pair(p0, moved).rows
    assert [(r.plan_step, r.unit, r.stage) for r in waited] == [(r.plan_step, r.unit, r.stage) for r in base]
    units = {(st["plan_step"], u["unit"], u["stage"]): u for st in json.loads(t0.read_text())["steps"]
             for u in st["units"]}
    for r0, r1 in zip(base, waited):
        u = units[(r0.plan_step, r0.unit, r0.stage)]
        assert r0.measured_s == pytest.approx(u["fwd_s"] + u["bwd_s"])  # one replay iteration per plan step
        assert r1.measured_s == pytest.approx(r0.measured_s + 0.5 * u["fwd_s"])


# -- real traces: one H200 (bench/data) -----------------------------------------------------------------------------

H200 = Path(__file__).resolve().parents[3] / "bench" / "data"


def _h200_accuracy(name: str, profile: str):
    d = H200 / "h200-2026-12-04b"
    return accuracy(name, "reference", load_plan(d / f"{name}.plan.json"),
                    profile, json.loads((d / f"{name}.trace.json").read_text()))


def test_h200_measured_profile_predicts_the_second_runs_steps_within_5_percent(tmp_path):
    """h200-sxm.measured with its elementwise kinds (memory_kind_*) prices the second H200 run's warm steps
    (bench/data/h200-2026-12-04b: Llama-3-8B, Qwen2.5-7B, Llama-3-70B and Qwen2.5-72B layers; short, Wikipedia and
    29K-42K-token documents) within 5%, and better than the same profile without the kinds (4-8% slow)."""
    base = load_profile("h200-sxm.measured")
    stream = dataclasses.replace(base, constants={k: v for k, v in base.constants.items()
                                                  if not k.startswith("memory_kind_")})
    stream.fingerprint = dataclasses.replace(base.fingerprint, sha256="")
    stream.save(tmp_path / "stream.json")
    with_kinds, without = [], []
    for name in ("l8b-packed", "qwen-long", "l70b", "q72wiki", "l8b-long"):
        a = _h200_accuracy(name, "h200-sxm.measured")
        assert len(a.steps) == 2 and a.step_mape < 0.05, (name, a.steps)
        with_kinds.append(a.step_mape)
        without.append(_h200_accuracy(name, str(tmp_path / "stream.json")).step_mape)
    assert np.mean(with_kinds) < 0.6 * np.mean(without)


def test_h200_calibration_predicts_plans_it_did_not_see_within_5_percent(tmp_path):
    """Fitted on the first H200 run's traces (bench/data/h200-2026-12-04, two plans held out as its README does), the
    profile prices the second run's new plans (Llama-3-70B and Qwen2.5-72B layers, Wikipedia lengths, 29K-42K-token
    documents) within 5% per warm step."""
    first = H200 / "h200-2026-12-04"
    names = ("gpu1-packed", "gpu1-long", "l8b", "l8b-packed", "qwen-long")
    cal = calibrate([(first / f"{n}.plan.json", first / f"{n}.trace.json") for n in names], "h200-sxm.measured",
                    holdout=[first / "l8b-packed.plan.json", first / "qwen-long.plan.json"])
    assert cal.basis == WALL_BASIS  # a GPU trace's host CPU is not its compute
    cal.profile.save(tmp_path / "fitted.json")
    for name in ("l70b", "q72wiki", "l8b-long"):
        fitted = _h200_accuracy(name, str(tmp_path / "fitted.json"))
        assert len(fitted.steps) == 2 and fitted.step_mape < 0.05, (name, fitted.steps)


def test_a_pair_priced_with_what_the_replay_does_not_run_is_warned_about(plans, exact):
    """A plan priced with fused kernels or (with TP) sequence parallelism prices what the replay does not run: the
    fit would take the difference for the hardware's, so loading its pair says which flag prices what runs."""
    path, trace = next((p, t) for p, t in exact if p.name == "tp.json")
    with pytest.warns(UserWarning) as seen:
        load_pair(path, trace)
    said = " ".join(str(w.message) for w in seen)
    assert "--kernels eager" in said and "--no-sequence-parallel" in said
