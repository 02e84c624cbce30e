"""What-if sweeps, the capacity search and reports: a sweep interrupted mid-way resumes to the same
table with no point lost, duplicated or recomputed; infeasible points keep a row with a reason; the
capacity search is monotone in GPU count and target; plots and reports are written and non-empty.
Small cases (1M tokens per step, 8-64 GPUs) keep each test to seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from planner.api import PlanRequest, build_cost_model, make_plan
from planner.report import memory_breakdown, plot_plan, replace_section, write_sweep_report
from planner.simulate import simulate_step
from planner.studies import (SWEEP_COLUMNS, ByteScaleGrid, Config, Journal, LayoutRules, Point, SweepSpec, Target,
                            capacity_search, journal_path, per_doubling_slowdown, read_table, run_sweep)

K, M = 1024, 1024 * 1024
SPEC = SweepSpec(models=("llama-7b",), gpus=(8, 16), contexts_tokens=(32 * K, 128 * K), lengths=("byted-like",),
                 strategies=("static", "hdp-naive", "hdp"), steps=1, tokens_per_step=M)
TIMING = ["planning_s"]  # wall-clock columns differ between runs by nature


class Interrupt(Exception):
    pass


def stop_after(k: int):
    seen = []

    def on_point(point, row):
        seen.append(point.key)
        if len(seen) == k:
            raise Interrupt

    return on_point


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns=TIMING).reset_index(drop=True),
                                  b.drop(columns=TIMING).reset_index(drop=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted sweep."""
    return run_sweep(SPEC.points(), tmp_path_factory.mktemp("ref") / "sweep.csv")


def test_interrupted_sweep_resumes_to_the_same_table(tmp_path, reference):
    points = SPEC.points()
    out = tmp_path / "sweep.csv"
    with pytest.raises(Interrupt):
        run_sweep(points, out, on_point=stop_after(5))
    journal = journal_path(out)
    assert len(Journal(journal).load()) == 5
    partial = read_table(out)
    assert len(partial) == 5 and partial["key"].is_unique  # the table of finished points is written too
    with journal.open("a") as f:  # a kill in the middle of a write leaves a torn line
        f.write('{"key": "llama-7b|torn')
    computed = []
    res = run_sweep(points, out, on_point=lambda p, r: computed.append(p.key))
    assert res.reused == 5 and res.computed == len(points) - 5  # finished points are not recomputed
    assert len(computed) == len(points) and len(set(computed)) == len(points)
    assert list(res.table["key"]) == [p.key for p in points]  # sweep order, each point once
    same(res.table, reference.table)
    same(read_table(out), reference.table)
    same(read_table(out.with_suffix(".parquet")), reference.table)
    rows = [json.loads(x) for x in journal.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    assert sorted(r["key"] for r in rows) == sorted(p.key for p in points)  # no duplicate journal entries
    again = run_sweep(points, out)
    assert again.computed == 0 and again.reused == len(points)


def test_parallel_sweep_matches_serial(tmp_path, reference):
    res = run_sweep(SPEC.points(), tmp_path / "sweep.parquet", workers=2)
    same(res.table, reference.table)
    assert (tmp_path / "sweep.csv").exists() and (tmp_path / "sweep.parquet").exists()


def test_interrupted_parallel_sweep_resumes(tmp_path, reference):
    out = tmp_path / "sweep.csv"
    with pytest.raises(Interrupt):
        run_sweep(SPEC.points(), out, workers=2, on_point=stop_after(4))
    done = len(Journal(journal_path(out)).load())
    assert done >= 4  # rows of configs that finished are journaled one by one
    res = run_sweep(SPEC.points(), out, workers=2)
    assert res.reused == done and res.computed == len(SPEC.points()) - done
    same(res.table, reference.table)


def test_table_columns_speedups_and_static_reference(reference):
    df = reference.table
    assert list(df.columns) == list(SWEEP_COLUMNS)
    assert df["feasible"].all() and df["key"].is_unique
    static = df[df["strategy"] == "static"]
    assert (static["speedup_vs_static"] == 1.0).all()
    for _, r in df.iterrows():  # every speedup is against the same config's static plan
        s = static[static["key"] == r["key"].rsplit("|", 1)[0] + "|static"].iloc[0]
        assert r["speedup_vs_static"] == pytest.approx(s["step_time_s"] / r["step_time_s"])
        assert r["mfu_unhalved"] > r["mfu"] > 0
        assert r["lower_bound_s"] <= r["step_time_s"] * (1 + 1e-9)


def test_speedup_without_static_in_the_sweep(tmp_path, reference):
    spec = SweepSpec(**{**SPEC.__dict__, "strategies": ("hdp",)})
    df = run_sweep(spec.points(), tmp_path / "hdp.csv").table
    ref = reference.table[reference.table["strategy"] == "hdp"]
    assert list(df["speedup_vs_static"]) == pytest.approx(list(ref["speedup_vs_static"]))


def test_infeasible_points_keep_a_row_with_the_reason(tmp_path):
    pts = [Point(Config("llama-70b", "dgx-h100", 8, 1, 1, 32 * K, "byted-like", M, 1), "hdp"),  # states do not fit
           Point(Config("llama-7b", "dgx-h100", 8, 3, 1, 32 * K, "byted-like", M, 1), "hdp"),  # tp must divide
           Point(Config("llama-7b", "dgx-h100", 8, 1, 1, 2 * M, "byted-like", 2 * M, 1, recompute="none"), "static")]
    df = run_sweep(pts, tmp_path / "bad.csv").table
    assert len(df) == 3 and not df["feasible"].any()
    assert all(isinstance(r, str) and r and "\n" not in r for r in df["reason"])
    assert "do" in df["reason"][0] and "tp=3" in df["reason"][1]
    assert df[["tokens_per_s", "speedup_vs_static"]].isna().all().all()


def test_a_planner_bug_marks_its_point_not_the_sweep(tmp_path, monkeypatch):
    from planner.strategies import STRATEGIES

    def boom(batch, cm, opt):
        raise IndexError("index 4 is out of bounds")

    monkeypatch.setitem(STRATEGIES, "hdp-naive", boom)
    df = run_sweep(SPEC.points()[:3], tmp_path / "s.csv").table
    bad = df[df["strategy"] == "hdp-naive"].iloc[0]
    assert not bad["feasible"] and bad["reason"] == "planner error (IndexError): index 4 is out of bounds"
    assert df[df["strategy"] != "hdp-naive"]["feasible"].all()


def test_unknown_inputs_fail_before_planning(tmp_path):
    from costmodel.specs import SpecError
    from planner.plan import PlanError
    from planner.workload import SourceError

    with pytest.raises(SpecError):
        run_sweep(SweepSpec(models=("no-such-model",)).points(), tmp_path / "x.csv")
    with pytest.raises(PlanError):
        run_sweep(SweepSpec(strategies=("nope",)).points(), tmp_path / "x.csv")
    with pytest.raises(SourceError):
        run_sweep(SweepSpec(lengths=("no-such-source",)).points(), tmp_path / "x.csv")
    assert not (tmp_path / "x.journal.jsonl").exists()


# ---- capacity search ------------------------------------------------------------------------------
RULES = LayoutRules(tps=(1, 2), pps=(1, 2), max_gpus=64)
CASE = dict(lengths="byted-like", tokens_per_step=M, steps=1)


@pytest.fixture(scope="module")
def exhaustive():
    """Every count and layout of RULES planned (no pruning, no early stop): llama-13b at 512K, which
    the smallest counts cannot hold."""
    return capacity_search("llama-13b", 512 * K, Target("tokens_per_s", 1.0), rules=RULES, exhaustive=True, **CASE)


def test_capacity_feasibility_is_monotone_in_gpus(exhaustive):
    t = exhaustive.table
    assert sorted(t["gpus"].unique()) == [8, 16, 32, 64]
    assert (~t["feasible"].astype(bool)).any() and t["feasible"].astype(bool).any()  # the case has both
    for (tp, pp), g in t.groupby(["tp", "pp"]):
        ok = g.sort_values("gpus")["feasible"].astype(bool).tolist()
        assert ok == sorted(ok), f"tp{tp} pp{pp}: feasible at fewer GPUs but not at more: {ok}"


def test_capacity_answer_is_the_smallest_count_and_monotone_in_the_target(exhaustive):
    t = exhaustive.table
    good = t[t["feasible"].astype(bool) & t["fits_hbm"].astype(bool)]
    rates = sorted(good["tokens_per_s"])
    answers = []
    for q in (0.1, 0.5, 0.9):
        target = Target("tokens_per_s", float(pd.Series(rates).quantile(q)))
        res = capacity_search("llama-13b", 512 * K, target, rules=RULES, **CASE)
        meeting = good[good["tokens_per_s"] >= target.value]
        assert res.answer is not None and res.answer["gpus"] == meeting["gpus"].min()  # pruning loses nothing
        assert res.answer["tokens_per_s"] >= target.value
        assert all(target.met(r) for r in res.runners_up)
        assert all(r["gpus"] >= res.answer["gpus"] for r in res.runners_up)
        answers.append(res.answer["gpus"])
    assert answers == sorted(answers)  # a harder target never needs fewer GPUs
    unreachable = capacity_search("llama-13b", 512 * K, Target("tokens_per_s", 1e12), rules=RULES, **CASE)
    assert unreachable.answer is None and set(unreachable.table["status"]) == {"pruned", "infeasible"}


def test_capacity_targets_step_time_and_mfu(exhaustive):
    good = exhaustive.table[exhaustive.table["status"] == "meets"]
    best = good.loc[good["step_time_s"].idxmin()]
    res = capacity_search("llama-13b", 512 * K, Target("step_time_s", float(best["step_time_s"]) * 1.01),
                          rules=RULES, **CASE)
    assert res.answer["step_time_s"] <= best["step_time_s"] * 1.01 and res.answer["gpus"] <= best["gpus"]
    res = capacity_search("llama-13b", 512 * K, Target("mfu", 0.05), rules=RULES, **CASE)
    assert res.answer is not None and res.answer["mfu"] >= 0.05


def test_capacity_search_in_parallel_gives_the_same_rows(exhaustive):
    par = capacity_search("llama-13b", 512 * K, Target("tokens_per_s", 1.0), rules=RULES, exhaustive=True,
                          workers=2, **CASE)
    cols = ["gpus", "tp", "pp", "status", "tokens_per_s"]
    pd.testing.assert_frame_equal(par.table[cols], exhaustive.table[cols])
    assert par.answer["key"] == exhaustive.answer["key"]


def test_layout_rules_are_the_same_at_every_count():
    rules = LayoutRules()
    counts = rules.gpu_counts("dgx-h100")
    assert counts[0] == 8 and all(b == 2 * a for a, b in zip(counts, counts[1:])) and counts[-1] == 16384
    prev: set = set()
    for g in counts[:6]:
        lay = set(rules.layouts("llama-7b", "dgx-h100", g))
        assert prev <= lay  # a layout allowed at G is allowed at 2G
        assert all(8 % tp == 0 and 32 % pp == 0 and g % (tp * pp) == 0 for tp, pp in lay)
        prev = lay


def first_meeting_count(table: pd.DataFrame) -> int:
    return int(table[table["status"] == "meets"]["gpus"].min())


def test_capacity_stops_at_the_first_count_that_meets(exhaustive, monkeypatch):
    """The smallest count that meets the target ends the search: no larger count is planned (or even bounded)."""
    import planner.studies.whatif as wf

    t = exhaustive.table
    g0 = first_meeting_count(t)
    assert g0 < t["gpus"].max()  # the case has larger counts the search must not touch
    target = Target("tokens_per_s", float(t[(t["gpus"] == g0) & (t["status"] == "meets")]["tokens_per_s"].min()))
    planned, progress = [], []
    evaluate = wf.evaluate_point
    monkeypatch.setattr(wf, "evaluate_point", lambda p, *a: planned.append(p.config) or evaluate(p, *a))
    res = capacity_search("llama-13b", 512 * K, target, rules=RULES, on_progress=progress.append, **CASE)
    every = sum(len(RULES.layouts("llama-13b", "dgx-h100", g)) for g in RULES.gpu_counts("dgx-h100"))
    assert all(p.total == every and 0 <= p.count_done <= p.count_total > 0 for p in progress)  # totals known
    assert [p.done for p in progress] == sorted(p.done for p in progress) and progress[-1].done == len(res.table)
    assert res.answer["gpus"] == g0 and planned and max(c.gpus for c in planned) == g0
    assert res.table["gpus"].max() == g0 and res.planned == len(planned)
    at = res.table[res.table["gpus"] == g0]
    assert (at["status"] == "meets").sum() == 1  # the first layout meeting it ends the count...
    assert set(at["status"]) <= {"meets", "misses", "over-hbm", "infeasible", "pruned", "skipped"}
    assert len(res.not_planned()) == (at["status"] == "skipped").sum()  # ...the others are reported unplanned
    for g, rows in res.table[res.table["gpus"] < g0].groupby("gpus"):  # every smaller count was decided
        assert len(rows) == len(RULES.layouts("llama-13b", "dgx-h100", g)) and "meets" not in set(rows["status"])


def test_capacity_best_layout_matches_the_exhaustive_search(exhaustive):
    t = exhaustive.table
    g0 = first_meeting_count(t)
    target = Target("tokens_per_s", float(t[(t["gpus"] == g0) & (t["status"] == "meets")]["tokens_per_s"].min()))
    res = capacity_search("llama-13b", 512 * K, target, rules=RULES, best_layout=True, **CASE)
    best = t[(t["gpus"] == g0) & (t["status"] == "meets")]["tokens_per_s"].max()
    assert res.answer["gpus"] == g0 and res.answer["tokens_per_s"] == pytest.approx(best, rel=1e-12)
    assert not len(res.not_planned()) and set(res.table["gpus"]) == set(t[t["gpus"] <= g0]["gpus"])


def test_capacity_journal_resumes_without_planning(tmp_path, exhaustive):
    t = exhaustive.table
    target = Target("tokens_per_s", float(t[t["status"] == "meets"]["tokens_per_s"].median()))
    journal = tmp_path / "cap.journal.jsonl"
    first = capacity_search("llama-13b", 512 * K, target, rules=RULES, journal=journal, **CASE)
    assert first.planned > 0 and first.reused == 0
    assert len(Journal(journal).load()) == first.planned  # every planned layout, once
    again = capacity_search("llama-13b", 512 * K, target, rules=RULES, journal=journal, workers=2, **CASE)
    assert again.planned == 0 and again.reused == first.planned  # nothing new planned
    assert again.answer["key"] == first.answer["key"]
    cols = ["gpus", "tp", "pp", "status", "tokens_per_s"]
    pd.testing.assert_frame_equal(again.table[cols], first.table[cols])


def test_capacity_ctrl_c_in_the_cli_keeps_the_journal_and_exits_130(tmp_path, monkeypatch):
    """A KeyboardInterrupt while planning: exit 130, one line saying how to resume, finished layouts journaled;
    the same command then resumes from them."""
    from typer.testing import CliRunner

    import planner.studies.whatif as wf
    from cli import app

    args = ["whatif", "capacity", "--model", "llama-7b", "--context", "128K", "--target-tokens-per-s", "1G",
            "--tokens-per-step", "1M", "--steps", "1", "--max-gpus", "16", "--tp", "1,2", "--pp", "1",
            "--workers", "1", "--table", str(tmp_path / "cap.csv")]
    evaluate, calls = wf.evaluate_point, []

    def interrupted_on_the_second(point, *a):
        calls.append(point)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(point, *a)

    monkeypatch.setattr(wf, "evaluate_point", interrupted_on_the_second)
    monkeypatch.setattr(wf, "layout_bound", lambda *a, **k: wf.LayoutBound(1e-9, math.inf, math.inf))  # plan all
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output and "cap.journal.jsonl" in r.output and "Traceback" not in r.output
    assert len(Journal(tmp_path / "cap.journal.jsonl").load()) == 1
    monkeypatch.setattr(wf, "evaluate_point", evaluate)
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 1, r.output  # 1G tokens/s is out of reach: no answer
    d = json.loads(r.stdout)
    assert d["reused"] == 1 and d["planned"] == d["tried"] - 1


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    """Live (not zombie) descendants of a process, from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found.update(kids)
        todo.extend(kids)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_capacity_sigint_stops_planning_workers_at_once(tmp_path):
    """Ctrl-C (SIGINT to the process group) while two workers plan 2,048-GPU layouts (minutes each): exit 130
    with one line, and no worker left behind. Limits are generous: the point is seconds, not minutes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-c", "from cli import app; app()", "whatif", "capacity", "--model", "llama-7b",
           "--context", "1M", "--target-tokens-per-s", "2M", "--min-gpus", "2048", "--max-gpus", "2048",
           "--best-layout", "--workers", "2", "--table", str(tmp_path / "cap.csv")]
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen(cmd, cwd=root, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_descendants(proc.pid)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(4)  # bounds done, layouts being planned
        workers = _descendants(proc.pid)
        assert proc.poll() is None and len(workers) >= 2
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and time.monotonic() - sent < 30
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted:")
        deadline = time.monotonic() + 10  # the resource tracker may take a moment after its parent
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)], "processes left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_capacity_target_takes_suffixes(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    base = ["whatif", "capacity", "--model", "llama-7b", "--context", "128K", "--tokens-per-step", "1M", "--steps",
            "1", "--max-gpus", "16", "--tp", "1", "--pp", "1", "--json", "--table", str(tmp_path / "cap.csv")]
    for text, value in (("2K", 2048), ("1.5K", 1536), ("2e3", 2000), ("2000", 2000)):
        r = CliRunner().invoke(app, [*base, "--target-tokens-per-s", text])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["target"]["value"] == value
    r = CliRunner().invoke(app, [*base, "--target-tokens-per-s", "2X"])
    assert r.exit_code == 2 and "--target-tokens-per-s" in r.output and "K = 1024" in r.output


@pytest.mark.parametrize("args", [
    ["capacity", "--min-gpus", "128", "--max-gpus", "64"],
    ["capacity", "--min-gpus", "0"],
    ["capacity", "--max-gpus", "-8"],
    ["capacity", "--min-gpus", "9", "--max-gpus", "12"],
    ["capacity", "--tp", "0"],
    ["capacity", "--pp", ","],
    ["capacity", "--tp", "3"],
    ["capacity", "--context", "0"],
    ["capacity", "--tokens-per-step", "-1M"],
    ["capacity", "--target-tokens-per-s", "0"],
    ["capacity", "--target-tokens-per-s", "inf"],
    ["capacity", "--target-step-time", "-1"],
    ["capacity", "--target-mfu", "150"],
    ["--gpus", "0"],
    ["--gpus", ""],
    ["--tp", "2,0"],
    ["--context", "1M,-1"],
    ["--tokens-per-step", "0"],
])
def test_whatif_bad_numbers_are_one_line_errors(tmp_path, args):
    from typer.testing import CliRunner

    from cli import app

    if args[0] == "capacity":
        target = [] if any(a.startswith("--target") for a in args) else ["--target-tokens-per-s", "1M"]
        argv = ["whatif", "capacity", "--model", "llama-7b", "--context", "128K", *target, *args[1:]]
        if "--context" in args[1:]:
            argv = ["whatif", "capacity", "--model", "llama-7b", *target, *args[1:]]
    else:
        argv = ["whatif", *args]
    r = CliRunner().invoke(app, [*argv, "--table" if args[0] == "capacity" else "--out", str(tmp_path / "t.csv")])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.strip().startswith("error:")
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "t.journal.jsonl").exists()


def test_layout_rules_reject_min_above_max():
    from planner.plan import PlanError

    with pytest.raises(PlanError, match="min GPUs 128 is larger than max GPUs 64"):
        LayoutRules(min_gpus=128, max_gpus=64)
    with pytest.raises(PlanError, match="MFU"):
        Target("mfu", 1.5)


# ---- plots and reports ---------------------------------------------------------------------------
def nonempty(path) -> bool:
    return path.exists() and path.stat().st_size > 1000


def test_sweep_report_is_written(tmp_path, reference):
    md = write_sweep_report(reference.table, tmp_path / "rep")
    html = (tmp_path / "rep" / "report.html").read_text()
    figs = sorted((tmp_path / "rep" / "figures").iterdir())
    names = {f.name for f in figs}
    for stem in ("throughput_vs_context", "speedup_hdp", "speedup_hdp-naive", "gantt_static", "memory_hdp"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    assert all(nonempty(f) for f in figs)
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figs if f.suffix == ".png")
    text = md.read_text()
    assert "figures/throughput_vs_context.png" in text and "causal attention halved" in text
    assert html.count("data:image/png;base64,") == text.count("![")  # every figure embedded


@pytest.mark.parametrize("pp", [1, 2])
def test_plan_gantt_and_memory(tmp_path, pp):
    req = PlanRequest(model="llama-7b", gpus=16, pp=pp, tokens_per_step=M, max_context_tokens=128 * K, steps=1)
    cm = build_cost_model(req)
    plan = make_plan(req, "hdp", cm)
    figs = plot_plan(plan, cm, gantt=tmp_path / "g.png", memory=tmp_path / "m")
    assert [p.name for p in figs.gantt + figs.memory] == ["g.png", "g.svg", "m.png", "m.svg"]
    assert all(nonempty(p) for p in figs.gantt + figs.memory)
    mem = memory_breakdown(plan.steps[0], simulate_step(plan.steps[0], cm), cm)
    assert len(mem) == (cm.setup.hdp if pp == 1 else pp)
    # The parts, fragmentation reserve included, add up to the simulator's peak.
    total = mem.sum(axis=1)
    peak = figs.simulation.peak_memory_bytes
    if pp == 1:
        assert list(total) == pytest.approx(peak, rel=1e-9)
    else:
        assert total.max() == pytest.approx(max(peak), rel=1e-9)


def test_cli_sweep_capacity_and_report(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    run = CliRunner().invoke
    out = tmp_path / "s.csv"
    r = run(app, ["whatif", "--model", "llama-7b", "--cluster", "dgx-h100", "--gpus", "8,16", "--context", "32K",
                  "--lengths", "byted-like", "--strategies", "static,hdp", "--tokens-per-step", "1M", "--steps", "1",
                  "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["computed"] == 4 and len(d["rows"]) == 4 and out.exists() and out.with_suffix(".parquet").exists()
    r = run(app, ["whatif", "capacity", "--model", "llama-7b", "--context", "128K", "--target-tokens-per-s", "1000",
                  "--tokens-per-step", "1M", "--steps", "1", "--max-gpus", "16", "--tp", "1", "--pp", "1", "--json",
                  "--table", str(tmp_path / "cap.csv")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["answer"]["gpus"] == 8
    r = run(app, ["whatif", "capacity", "--model", "llama-7b", "--context", "128K"])
    assert r.exit_code == 2 and "exactly one" in r.output
    plan = tmp_path / "p.json"
    assert run(app, ["plan", "--gpus", "8", "--tokens-per-step", "1M", "--max-context", "64K", "--compare", "hdp",
                     "--out", str(plan), "--json"]).exit_code == 0
    r = run(app, ["report", str(plan), "--gantt", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert nonempty(tmp_path / "g.png") and nonempty(tmp_path / "g.svg")
    r = run(app, ["report", str(out), "--out", str(tmp_path / "rep"), "--no-example"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.html").exists()


def _bad_tables(tmp_path, table: pd.DataFrame) -> dict:
    bad = table.astype(object)
    bad.loc[bad.index[0], "gpus"] = "many"
    files = {"empty.csv": b"", "text.parquet": b"key,model\n1,2\n", "other.csv": b"a,b\n1,2\n",
             "binary.csv": bytes(range(256)) * 4, "header-only.csv": table.head(0).to_csv(index=False).encode(),
             "bad-gpus.csv": bad.to_csv(index=False).encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_report_rejects_files_that_are_not_sweep_tables(tmp_path, reference):
    from typer.testing import CliRunner

    from cli import app

    why = {"empty.csv": "empty file", "text.parquet": "not a readable Parquet file", "other.csv": "missing",
           "binary.csv": "", "header-only.csv": "no rows", "bad-gpus.csv": "'gpus'"}
    for name, path in _bad_tables(tmp_path, reference.table).items():
        with pytest.raises(OSError, match=str(path)) as e:
            read_table(path)
        assert why[name] in str(e.value) and "\n" not in str(e.value)
        r = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "rep")])
        assert r.exit_code == 2 and r.output.startswith("error:") and name in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()  # nothing half-written


def test_report_json_lists_what_it_wrote(tmp_path, reference):
    from typer.testing import CliRunner

    from cli import app
    from planner.studies import write_table

    csv, _ = write_table(reference.table, tmp_path / "s.csv")
    r = CliRunner().invoke(app, ["report", str(csv), "--out", str(tmp_path / "rep"), "--no-example", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    written = [Path(p) for p in d["written"]]
    assert d["kind"] == "sweep" and written[:2] == [tmp_path / "rep" / "report.md", tmp_path / "rep" / "report.html"]
    assert all(p.exists() for p in written) and any(p.suffix == ".png" for p in written)


# ---- ByteScale reproduction -------------------------------------------------------------------------
def test_bytescale_grid_and_section_regeneration(tmp_path):
    grid = ByteScaleGrid()
    layouts = {p.model: p.layouts[-1] for p in grid.panels}
    pts = grid.points(layouts)
    assert len(pts) == 6 * 4 * 2 * 3 and len({p.key for p in pts}) == len(pts)
    gpus = {p.config.model: p.config.gpus for p in pts}
    assert gpus["llama-7b"] == 1024 and gpus["mistral-8x22b"] == 12288
    small = ByteScaleGrid(gpu_scale=1 / 64).points(layouts)
    assert all(p.config.gpus % 8 == 0 and p.config.gpus % (p.config.tp * p.config.pp) == 0 for p in small)
    tune = grid.tuning_points()
    assert all(p.strategy == "static" and p.config.context_tokens == 2 * M for p in tune)
    doc = tmp_path / "REPRODUCTION.md"
    doc.write_text("# Reproduction\n\n## Other\n\nkeep me\n")
    replace_section(doc, "bytescale", "## ByteScale\n\nfirst")
    replace_section(doc, "bytescale", "## ByteScale\n\nsecond")
    text = doc.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count("<!-- bytescale:begin -->") == 1 and text.count("<!-- bytescale:end -->") == 1


def test_bytescale_reproduction_end_to_end_small(tmp_path):
    """The regenerating command on a tiny grid: layout tuning, the grid, and the section."""
    from planner.report import reproduce_bytescale
    from planner.studies import BYTESCALE_PANELS

    panels = tuple(p for p in BYTESCALE_PANELS if p.model == "llama-7b")
    grid = ByteScaleGrid(gpu_scale=1 / 64, tokens_per_step=M, steps=1, panels=panels,
                         contexts_tokens=(64 * K, 128 * K))
    doc = tmp_path / "R.md"
    rep = reproduce_bytescale(doc, grid, table=tmp_path / "t.csv")
    assert rep.layouts["llama-7b"] in panels[0].layouts and len(rep.table) == 2 * 2 * 3
    text = doc.read_text()
    assert "## ByteScale" in text and "7.89x" in text and "| llama-7b | 1,024 | 16 |" in text
    again = reproduce_bytescale(doc, grid, table=tmp_path / "t.csv")
    assert again.computed == 0


def test_per_doubling_slowdown():
    df = pd.DataFrame({"model": "m", "lengths": "l", "strategy": "static", "feasible": True,
                       "context_tokens": [256 * K, 512 * K, M, 2 * M], "step_time_s": [1.0, 2.0, 4.0, 8.0]})
    assert per_doubling_slowdown(df)["per_doubling"].iloc[0] == pytest.approx(2.0)
