"""What-if sweeps, the capacity search and reports: a sweep interrupted mid-way resumes to the same
table with no point lost, duplicated or recomputed; infeasible points keep a row with a reason; the
capacity search is monotone in GPU count and target; plots and reports are written and non-empty.
Small cases (1M tokens per step, 8-64 GPUs) keep each test to seconds."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from planner.api import PlanRequest, build_cost_model, make_plan
from planner.report import memory_breakdown, plot_plan, replace_section, write_sweep_report
from planner.simulate import simulate_step
from planner.whatif import (SWEEP_COLUMNS, ByteScaleGrid, Config, Journal, LayoutRules, Point, SweepSpec, Target,
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
    from planner.sources import SourceError

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
    # Everything but the fragmentation allowance adds up to the simulator's peak.
    total = mem[["states", "activations", "logits", "ctx"]].sum(axis=1)
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
                  "--tokens-per-step", "1M", "--steps", "1", "--max-gpus", "16", "--tp", "1", "--pp", "1", "--json"])
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
    from planner.whatif import BYTESCALE_PANELS

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
