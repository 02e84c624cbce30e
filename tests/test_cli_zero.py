"""`--zero` on `meshplan plan` and `meshplan whatif`: recorded in the plan, swept, and refused in one line."""

import json

from typer.testing import CliRunner

from cli import app
from planner.plan import Plan
from planner.plan.validate import unit_rounds

TINY = ["--model", "tiny", "--cluster", "local-cpu", "--gpus", "4", "--tokens-per-step", "16K", "--max-context", "4K"]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_plan_records_zero3_and_writes_rounds(tmp_path):
    out = tmp_path / "z3.json"
    r = run("plan", *TINY, "--zero", "3", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "zero=3" in r.stdout
    plan = Plan.from_dict(json.loads(out.read_text()))
    assert plan.meta["training"]["zero_stage"] == 3
    assert unit_rounds(plan.steps[0])  # aligned rounds (validate ran on write)
    assert plan.steps[0].predicted.breakdown["grad_sync"] == 0.0


def test_zero3_with_pipelining_and_out_of_range_stages_are_one_line(tmp_path):
    r = run("plan", *TINY, "--pp", "2", "--zero", "3", "--out", str(tmp_path / "p.json"))
    assert r.exit_code != 0 and "zero_stage 3 with pp=2 is not modelled" in r.output
    assert "Traceback" not in r.output
    r = run("whatif", "--zero", "1,4", "--out", str(tmp_path / "s.csv"))
    assert r.exit_code != 0 and "--zero must be 0, 1, 2 or 3, got '4'" in r.output


def test_whatif_sweeps_zero_stages(tmp_path):
    out = tmp_path / "s.csv"
    r = run("whatif", "--model", "tiny", "--cluster", "local-cpu", "--gpus", "4", "--context", "4K",
            "--tokens-per-step", "16K", "--steps", "1", "--strategies", "hdp", "--zero", "1,3", "--out", str(out),
            "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [(x["zero_stage"], x["feasible"]) for x in rows] == [(1, True), (3, True)]
    assert rows[1]["key"].endswith("|zero3|hdp") and "zero" not in rows[0]["key"]


def test_replay_refuses_a_zero3_plan_before_starting(tmp_path):
    """The replay has no FSDP: it would time whole-parameter ranks against a plan priced with per-layer gathers."""
    import pytest

    from planner.plan import PlanError
    from planner.runtime.launch import preflight

    out = tmp_path / "z3.json"
    assert run("plan", *TINY, "--zero", "3", "--out", str(out)).exit_code == 0
    with pytest.raises(PlanError, match="a ZeRO-3 plan .* plan with --zero 1 or 2 to replay"):
        preflight(out, 4)
