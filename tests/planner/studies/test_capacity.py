"""The capacity search: monotone in GPU count and target, minimal, pruned soundly, journaled and resumable,
the same with workers; its CLI: Ctrl-C keeps the journal, targets take suffixes, bad numbers are one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from planner.studies import Journal, LayoutRules, Target, capacity_search

K, M = 1024, 1024 * 1024
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
    import planner.studies.capacity as capacity

    t = exhaustive.table
    g0 = first_meeting_count(t)
    assert g0 < t["gpus"].max()  # the case has larger counts the search must not touch
    target = Target("tokens_per_s", float(t[(t["gpus"] == g0) & (t["status"] == "meets")]["tokens_per_s"].min()))
    planned, progress = [], []
    evaluate = capacity.evaluate_point
    monkeypatch.setattr(capacity, "evaluate_point", lambda p, *a: planned.append(p.config) or evaluate(p, *a))
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


def test_layouts_planned_ahead_count_as_planned_not_reused(tmp_path, exhaustive, monkeypatch):
    """A layout a worker planned ahead of the one awaited is this run's work, not the journal's: here every task
    finishes before it is asked for (the order a 2-worker pool can produce), and the counts stay those of a
    serial run."""
    from planner.studies import capacity

    start = capacity._LayoutRunner.start

    def all_ahead(self, tasks):
        start(self, tasks)
        for key in list(self.queued):
            self.rows[key] = self.on_done(capacity._decide_layout(*self.queued.pop(key)))

    t = exhaustive.table
    target = Target("tokens_per_s", float(t[t["status"] == "meets"]["tokens_per_s"].median()))
    serial = capacity_search("llama-13b", 512 * K, target, rules=RULES, **CASE)
    monkeypatch.setattr(capacity._LayoutRunner, "start", all_ahead)
    ahead = capacity_search("llama-13b", 512 * K, target, rules=RULES, journal=tmp_path / "c.journal.jsonl", **CASE)
    assert ahead.reused == 0 and ahead.planned >= serial.planned > 0
    assert ahead.answer["key"] == serial.answer["key"]


def test_capacity_ctrl_c_in_the_cli_keeps_the_journal_and_exits_130(tmp_path, monkeypatch):
    """A KeyboardInterrupt while planning: exit 130, one line saying how to resume, finished layouts journaled;
    the same command then resumes from them."""
    from typer.testing import CliRunner

    import planner.studies.capacity as capacity
    from cli import app

    args = ["whatif", "capacity", "--model", "llama-7b", "--context", "128K", "--target-tokens-per-s", "1G",
            "--tokens-per-step", "1M", "--steps", "1", "--max-gpus", "16", "--tp", "1,2", "--pp", "1",
            "--workers", "1", "--table", str(tmp_path / "cap.csv")]
    evaluate, calls = capacity.evaluate_point, []

    def interrupted_on_the_second(point, *a):
        calls.append(point)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(point, *a)

    monkeypatch.setattr(capacity, "evaluate_point", interrupted_on_the_second)
    plan_all = lambda *a, **k: capacity.LayoutBound(1e-9, math.inf, math.inf)  # noqa: E731
    monkeypatch.setattr(capacity, "layout_bound", plan_all)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output and "cap.journal.jsonl" in r.output and "Traceback" not in r.output
    assert len(Journal(tmp_path / "cap.journal.jsonl").load()) == 1
    monkeypatch.setattr(capacity, "evaluate_point", evaluate)
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
    # A shell runs background jobs with SIGINT ignored, and an ignored signal stays ignored across exec: give the
    # CLI Python's own handler whatever this process inherited.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, cwd=root, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
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




def test_capacity_on_gb200_tries_tp_across_trays():
    """GB200 NVL72: 4-GPU trays, 72-GPU NVLink domains. tp = 8 spans two trays inside a rack (MeshLayout: TP divides
    the domain), so at 8 GPUs llama3-70b runs tp 8 (C = 21,344 tokens holds a 16K sequence on one HDP rank); within a
    tray (tp <= 4) the only 8-GPU fit, tp 4 pp 2 (C = 8,113), would need 2 HDP ranks of the 1 it has."""
    rules = LayoutRules(pps=(1, 2), max_gpus=16)
    assert (8, 1) in rules.layouts("llama3-70b", "gb200-nvl72", 8)
    assert all(72 % tp == 0 for g in (8, 16) for tp, _ in rules.layouts("llama3-70b", "gb200-nvl72", g))
    r = capacity_search("llama3-70b", 16 * K, Target("mfu", 0.01), cluster="gb200-nvl72", rules=rules,
                        lengths="byted-like", tokens_per_step=128 * K, steps=1)
    assert (r.answer["gpus"], r.answer["tp"], r.answer["pp"]) == (8, 8, 1)
    t = r.table
    assert set(t[(t["gpus"] == 8) & (t["tp"] <= 4)]["status"]) <= {"infeasible", "skipped"}
