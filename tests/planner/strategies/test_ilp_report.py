"""What the exact solver reports (issue 21): solver libraries keep off stdout (`--json` stays JSON), a
crashed backend is reported in meta["solver"] and the warm start written, long sequences are priced one by
one, and the plan written is never slower (simulated) than hdp's, with the figures of the plan written."""

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from planner.api import PlanRequest, make_plan
from planner.strategies import STRATEGIES, IlpOptions, PlanOptions, SolverWarning, ilp
from planner.strategies.ilp import backends
from tests.planner.strategies.test_ilp import batch_of, cost_model, solve

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_plan_json_with_the_ilp_is_json(tmp_path, solver):
    """A fresh process: HiGHS prints its banner from C when the first Highs object is built, once per
    process, past any Python-level capture."""
    cmd = [sys.executable, "-c", "from cli import app; app()", "plan", "--gpus", "16", "--tokens-per-step", "1M",
           "--max-context", "128K", "--compare", "static,ilp", "--strategy", "ilp", "--solver", solver,
           "--time-limit", "2", "--json", "--out", str(tmp_path / "plan.json")]
    env = {k: v for k, v in os.environ.items() if k != backends.LOG_ENV}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["strategy"] == "ilp" and (tmp_path / "plan.json").exists()


def test_native_solver_output_goes_to_devnull_or_to_stderr_when_asked(capfd, monkeypatch):
    monkeypatch.delenv(backends.LOG_ENV, raising=False)
    with backends.solver_stdout():
        os.write(1, b"banner\n")  # as C code writes: below sys.stdout
    assert capfd.readouterr() == ("", "")
    monkeypatch.setenv(backends.LOG_ENV, "1")
    with backends.solver_stdout():
        os.write(1, b"search log\n")
    print("ours")
    assert capfd.readouterr() == ("ours\n", "search log\n")


def _leave_a_gap(monkeypatch):
    """No configuration phase closes the gap, so the backend runs (as in test_ilp)."""
    monkeypatch.setattr(ilp, "config_bound", lambda items, tab, hdp, C, lo, hi, deadline, engine, rounds=None:
                        ilp.ConfigBound(bound_s=lo, columns=[]))
    monkeypatch.setattr(ilp, "pool_partition", lambda cl, items, tab, hdp, C, lo, hi, deadline: (None, lo))
    monkeypatch.setattr(ilp, "integer_search", lambda cl, items, tab, hdp, C, lo, hi, deadline: (lo, None))


def test_a_crashed_backend_is_reported_and_the_warm_start_written(monkeypatch):
    def crash(lm, x0, limit_s, effort=None):
        raise RuntimeError("the solver died on signal 11")

    monkeypatch.setitem(ilp.BACKENDS, "highs", crash)
    _leave_a_gap(monkeypatch)
    req = PlanRequest(gpus=4, capacity_tokens=4096, recompute="none", lengths="byted-like", tokens_per_step=2**16,
                      max_context_tokens=2**14, options=PlanOptions(offload=False, ilp=IlpOptions(time_limit_s=5)))
    with pytest.warns(SolverWarning, match=r"highs failed \(RuntimeError: the solver died on signal 11\)"):
        plan = make_plan(req, "ilp")  # validated, so written
    meta = plan.meta["solver"]
    assert meta["status"] == "feasible" and plan.steps[0].units
    note = meta["steps"][0]["note"]
    assert "highs failed (RuntimeError: the solver died on signal 11)" in note and "kept the warm start" in note
    assert meta["steps"][0]["backend_error"] == "RuntimeError: the solver died on signal 11"
    assert meta["steps"][0]["written"] in ("warm start", "hdp")  # never the crashed solver's
    assert meta["steps"][0]["simulated_s"] == pytest.approx(plan.steps[0].predicted.step_time_s)


def test_cbc_exiting_abnormally_is_an_error_with_its_reason(tmp_path, monkeypatch):
    import cbcbox

    fake = tmp_path / "cbc"
    fake.write_text("#!/bin/sh\nkill -SEGV $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(cbcbox, "cbc_bin_path", lambda: str(fake))
    scratch = tmp_path / "tmp"  # where pulp and tempfile write: nothing may be left there
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    items, tab, hdp, C = _model([6000, 6000, 6000])
    sol = ilp.solve("cbc", ilp.build_model(items, tab, hdp, C).lm, None, 5)
    assert sol.status == "error" and sol.x is None and sol.note.startswith("CBC exited abnormally")
    assert "\n" not in sol.note
    assert list(scratch.iterdir()) == []  # pulp's MPS file went with the solver's temporary directory


def _model(lengths, gpus=4):
    cm = cost_model(gpus)
    seqs = ilp.SeqTable.of(batch_of(lengths))
    price = ilp.Pricer(cm)
    items = ilp.make_items(seqs, cm, 16, price)
    return items, ilp.make_table(items, seqs, cm, PlanOptions(offload=False), price), cm.setup.hdp, cm.capacity_tokens


def test_long_sequences_are_priced_one_by_one():
    """60 distinct long lengths (more than the 48 that used to be bucketed into 16 classes): one exact
    item each, so the model prices every long sequence as the simulator does."""
    rng = np.random.default_rng(4)
    long = 4096 + np.unique(rng.integers(500, 40000, 200))[:60]
    lengths = np.concatenate([long, rng.integers(100, 4000, 40)])
    items, tab, _, _ = _model(lengths, gpus=16)
    exact = {int(items.max_len[i]) for i in range(len(items.count)) if items.members[i].size == 1}
    assert set(long.tolist()) <= exact
    step, info, _ = solve(lengths, gpus=16, time_limit_s=3)
    assert info.simulated_s == step.predicted.step_time_s <= info.hdp_s
    if "wrote hdp's plan" not in info.note:  # the partition's plan: simulated within 1% of its objective
        assert info.simulated_s == pytest.approx(info.objective_s, rel=0.01)


def test_the_plan_written_is_never_slower_than_hdp():
    """Three 6K sequences on 4 ranks (C = 4096): a static partition cannot beat hdp, which re-groups ranks
    mid-step; hdp's plan is written, and the report says so, with its simulated time and gap."""
    lengths = [6000, 6000, 6000]
    step, info, cm = solve(lengths)
    hdp = STRATEGIES["hdp"](batch_of(lengths), cm, PlanOptions(offload=False))
    assert info.hdp_s < info.objective_s  # the case is what it claims
    assert step.predicted.step_time_s == info.simulated_s == hdp.predicted.step_time_s
    assert "wrote hdp's plan" in info.note and info.gap == 0.0


def test_no_milp_when_it_cannot_fit_the_time_left(monkeypatch):
    """A model too big to build and presolve in the time left is not built: the incumbent of the warm
    start and configuration phases is written, and the report says why."""
    monkeypatch.setattr(ilp, "MILP_S_PER_VAR", 1e6)
    monkeypatch.setitem(ilp.BACKENDS, "highs", lambda *a: pytest.fail("the MILP ran"))
    _leave_a_gap(monkeypatch)
    step, info, _ = solve([7000, 5000, 9000, 1000, 800], time_limit_s=2)
    assert info.status == "feasible" and step.units and "no time left for the MILP" in info.note


def test_a_late_backend_has_its_lateness_kept_back(monkeypatch):
    """Issue 21: HiGHS can return after its own limit; the most a backend was late in this process is kept
    back from its next limits (at most 10% of each), so later steps hold the time limit. A fake clock."""
    now = [0.0]
    got = []

    def late_backend(backend, lm, x0, limit_s, effort):
        got.append(limit_s)
        now[0] += limit_s + 0.4  # returns 0.4 s after its limit
        return ilp.Solution("none", None, None, None)

    monkeypatch.setattr(backends.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(backends, "_solve", late_backend)
    monkeypatch.setattr(backends, "_late_s", {})
    for limit in (10.0, 10.0, 2.0):
        backends.solve("highs", backends.LinearModel(), None, limit)
    assert got == pytest.approx([10.0, 9.6, 1.8])  # 0.4 s kept back; capped at 10% of a 2 s limit
