"""`meshplan machine-check`: the CPU mode end to end (environment, quick profile, a two-rank gloo plan replayed
with --check and again for timing, predicted vs measured on the reference and the fresh profile), and its parts:
phase budgets, a child past its time ended with its process group, the --check verdict, profile completion,
bad input as one line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from planner.plan import Plan, validate
from planner.studies.machine_check import (MARGIN, Budget, ReplayCase, ReplayRun, build_profile, completed_profile,
                                           judge_replay, run_child)
from profiles.measure import plan_config
from profiles.table import Fingerprint, Profile, load_profile

runner = CliRunner()


@pytest.mark.torchrun
def test_cpu_mode_end_to_end(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "check"
    # the two-rank case alone keeps this test short: its --check replay, its timing replay (two torchrun jobs)
    res = runner.invoke(app, ["machine-check", "--out", str(out), "--device", "cpu", "--case", "cpu2-gloo",
                              "--steps", "4", "--budget-s", "600", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["ok"] and doc["device"] == "cpu" and doc["environment"]["versions"]["torch"]
    checks = {(c["phase"], c["name"]): c for c in doc["checks"]}
    assert all(c["status"] == "ok" for c in doc["checks"]), doc["checks"]
    for table in ("gemm", "attention", "memory", "host_copy"):
        assert ("profile", table) in checks
    assert "max rel grad err" in checks[("replay", "cpu2-gloo check")]["detail"]
    assert ("replay", "cpu2-gloo timing") in checks and ("replay", "cpu1 check+timing") not in checks
    roles = {a["role"]: a for a in doc["accuracy"] if a["case"] == "cpu2-gloo"}
    assert set(roles) == {"reference", "fresh"}
    for a in roles.values():
        assert a["units"] and a["steps"] and a["iterations"] == 2  # 4 replays of 2 plan steps, each's first cold
        assert 0 <= a["unit_mape"] < float("inf") and all(u["measured_s"] > 0 for u in a["units"])
    # the replay and both profiles (fresh, and the shipped reference since 2026-12-04) timed the host probe: the
    # ratios are reported (a profile without the probe gives None: tests/planner/simulate/test_measured.py)
    assert all(0.1 < a["host_slowdown"] < 10 for a in roles.values())

    fresh = load_profile(str(out / "profile.json"))
    assert fresh.fingerprint.source == "measured" and len(fresh.tables["gemm"]) and fresh.tables["collective"].empty
    assert "before the tables" in fresh.constants["host_probe_s"]["source"]
    assert 0 < fresh.constants["attn_call_overhead_s"]["value"] < 1e-3  # the executor's per-call cost, as on CPU
    predict = load_profile(str(out / "profile.predict.json"))  # completed with the reference's collectives
    assert len(predict.tables["collective"]) and "local-cpu.measured" in predict.fingerprint.notes
    plan = Plan.load(out / "plans" / "cpu2-gloo.json")
    validate(plan)
    assert plan.mesh.world_size == 2 and max(u.degree for s in plan.steps for u in s.units) == 2
    assert (out / "traces" / "cpu2-gloo.json").is_file()
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# meshplan machine-check: PASSED") and "unit MAPE" in summary
    assert doc["figures"] == [str(out / "accuracy.png"), str(out / "accuracy.svg")]  # the CLI draws them
    assert "cpu2-gloo units (fresh)" in (out / "accuracy.svg").read_text() and "- accuracy.png:" in summary
    assert json.loads((out / "machine_check.json").read_text())["ok"]


def test_phase_budgets_share_what_is_left():
    b = Budget(100.0)
    first = b.phase_s("profile")
    assert first == pytest.approx(100 * (1 - MARGIN) * 4 / 9, rel=1e-3)
    b.start -= first / 2  # the profile used half its share: the replays get the rest
    assert b.phase_s("replay") == pytest.approx(b.left_s()) and b.left_s() < 100 * (1 - MARGIN)
    b.start -= 1000
    assert b.phase_s("replay") == 0.0


def test_a_child_past_its_time_is_ended_with_its_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    rc, out = run_child([sys.executable, "-c", code], 3.0, tmp_path / "child.log")
    assert rc is None and out == ""
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10.0  # SIGTERM was sent; on a loaded machine the grandchild takes a moment to die
    while time.monotonic() < deadline:
        try:
            if "zombie" in Path(f"/proc/{pid}/status").read_text():  # ended, not yet reaped by its adopter
                return
        except FileNotFoundError:  # ended and reaped
            return
        time.sleep(0.05)
    pytest.fail(f"grandchild {pid} still runs 10 s after its group was ended")


def _run(tmp_path, dtype: str) -> ReplayRun:
    case = ReplayCase("x", "test", "cpu", dtype, "tiny", "local-cpu", 2, "hdp", "byted-like", 4096, 2048, 1024)
    return ReplayRun(case, "check", tmp_path / "plan.json", None, 1)


@pytest.mark.parametrize("dtype,grad_err,status", [("fp32", 1e-7, "ok"), ("fp32", 1e-3, "failed"),
                                                   ("bf16", 1e-2, "ok"), ("bf16", 5e-2, "failed")])
def test_check_verdict_uses_the_dtype_tolerance(tmp_path, dtype, grad_err, status):
    line = json.dumps({"check": {"max_rel_grad_err": grad_err, "loss_abs_err": 1e-8, "ranks": 2, "units": 3}})
    row = judge_replay(_run(tmp_path, dtype), 0, '{"step": {}}\n' + line + "\n", tmp_path / "log", 1.0, 10.0)
    assert row.status == status, row


def test_replay_that_timed_out_or_printed_no_check_fails(tmp_path):
    assert judge_replay(_run(tmp_path, "fp32"), None, "", tmp_path / "log", 9.0, 9.0).status == "failed"
    assert judge_replay(_run(tmp_path, "fp32"), 0, "", tmp_path / "log", 1.0, 9.0).status == "failed"
    (tmp_path / "log").write_text("error: rank 1 failed in step 0 unit 2\n")
    row = judge_replay(_run(tmp_path, "fp32"), 1, "", tmp_path / "log", 1.0, 9.0)
    assert row.status == "failed" and "rank 1 failed" in row.detail


def test_completed_profile_takes_only_missing_tables():
    ref = load_profile("local-cpu.measured")
    fresh = Profile(Fingerprint("f", "cpu: test", "measured", "2026-01-01"),
                    {"gemm": ref.tables["gemm"].assign(time_s=ref.tables["gemm"]["time_s"] * 2),
                     "collective": pd.DataFrame(columns=ref.tables["collective"].columns)},
                    constants={"peak_bf16_flops": {"value": 1.0, "unit": "FLOP/s", "source": "test"}})
    full = completed_profile(fresh, ref, "f.completed")
    assert (full.tables["gemm"]["time_s"] == 2 * ref.tables["gemm"]["time_s"]).all()
    assert len(full.tables["collective"]) == len(ref.tables["collective"])
    assert full.constants == fresh.constants and "collective" in full.fingerprint.notes
    full.require_tables()


def test_fresh_profile_takes_the_elementwise_kinds_measured_with_its_memory_table(tmp_path):
    """GPU: the profile child measures the kinds after the memory table (doc["memory_kinds"]); the fresh profile holds
    them as constants and the cost model prices eager kernels with them."""
    memory = {"points": 2, "budget_s": 7.0, "estimated_s": None, "cut": False, "error": None,
              "columns": ["bytes", "time_s"], "rows": [[4096, 3e-6], [2**20, 5e-5]], "seconds": 0.1}
    kinds = {"memory_kind_strided": {"value": 0.41, "unit": "x table bandwidth", "source": "test"}}
    doc = {"device": "cuda", "description": "NVIDIA H200", "versions": {}, "dtype_note": "bf16", "model": "m",
           "config": plan_config("cpu", quick=True, nproc=1).key(), "tables": {"memory": memory}}
    for with_kinds in (False, True):
        (tmp_path / "rows.json").write_text(json.dumps({**doc, **({"memory_kinds": kinds} if with_kinds else {})}))
        prof, _ = build_profile(tmp_path / "rows.json", "h200.machine-check")
        assert prof.memory_kind_ratio("strided") == (0.41 if with_kinds else 1.0)
        assert prof.memory_kind_ratio("broadcast") == 1.0
        assert ("Elementwise kinds" in prof.fingerprint.notes) == with_kinds


@pytest.mark.parametrize("args,says", [(["--device", "gpu"], "--device must be cpu or cuda"),
                                       (["--budget-s", "0"], "--budget-s must be a positive"),
                                       (["--steps", "1"], "--steps")])
def test_bad_input_is_one_line(tmp_path, args, says):
    res = runner.invoke(app, ["machine-check", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and says in res.output, res.output
    assert "Traceback" not in res.output


def test_out_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    res = runner.invoke(app, ["machine-check", "--out", str(f), "--device", "cpu"])
    assert res.exit_code == 2 and "is a file" in res.output


@pytest.mark.parametrize("gpus", [1, 8])
def test_gpu_cases_make_plans_the_executor_accepts(tmp_path, gpus):
    """The GPU path cannot run here: its model, cluster and plans are made and checked as the replay would
    (preflight, torch-free), on the H200 the next GPU loan has; the single-GPU machine gets a CPU gloo case."""
    from planner.runtime import preflight
    from planner.studies.machine_check import make_case_plan, replay_command, replay_cases, write_gpu_specs

    env = {"description": "NVIDIA H200 (host cpu: test, 16 cores)", "gpus": gpus, "device": "cuda"}
    model, cluster, preset = write_gpu_specs(tmp_path, env)
    assert preset == "hgx-h200"
    cases = replay_cases("cuda", gpus, str(model), str(cluster))
    names = [c.name for c in cases]
    assert names[:2] == ["gpu1-packed", "gpu1-long"]
    assert ("cpu2-gloo" in names) == (gpus == 1) and ("gpu8-hdp" in names) == ("gpu8-hdp-flash" in names) == (gpus == 8)
    for c in cases:
        profile = "h200-sxm.analytic" if c.device == "cuda" else "local-cpu.measured"
        plan = make_case_plan(c, profile, tmp_path / f"{c.name}.json", seed=0)
        assert plan.mesh.world_size == c.ranks and plan.mesh.tp == c.tp and len(plan.steps) == c.plan_steps
        preflight(tmp_path / f"{c.name}.json", c.ranks, c.model, dtype=c.dtype)
        cmd = replay_command(ReplayRun(c, "check", tmp_path / f"{c.name}.json", None, 2), 100.0)
        assert cmd[cmd.index("--device") + 1] == c.device and cmd[cmd.index("--dtype") + 1] == c.dtype
        assert cmd[cmd.index("--ring-kernel") + 1] == ("flash-cuda" if c.name.endswith("-flash") else "auto")
        if c.device == "cuda":
            assert c.dtype == "bf16" and len({u.id for s in plan.steps for u in s.units}) >= 1
    if gpus == 8:
        hdp = Plan.load(tmp_path / "gpu8-hdp.json")
        assert max(u.degree for s in hdp.steps for u in s.units) > 1  # context-parallel units over NCCL
