"""Sweep reports: report.md and report.html with every figure, `meshplan report` on sweep tables (and the
files it refuses), and the whatif CLI end to end from a sweep to its report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from planner.report import write_sweep_report
from planner.studies import SweepSpec, read_table, run_sweep, write_table

K, M = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> pd.DataFrame:
    """A small sweep table with every strategy a report draws (static, hdp-naive, hdp)."""
    spec = SweepSpec(models=("llama-7b",), gpus=(8,), contexts_tokens=(32 * K, 128 * K), lengths=("byted-like",),
                     strategies=("static", "hdp-naive", "hdp"), steps=1, tokens_per_step=M)
    return run_sweep(spec.points(), tmp_path_factory.mktemp("sweep") / "sweep.csv").table


def nonempty(path) -> bool:
    return path.exists() and path.stat().st_size > 1000


def test_sweep_report_is_written(tmp_path, sweep):
    md = write_sweep_report(sweep, tmp_path / "rep")
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


def test_report_rejects_files_that_are_not_sweep_tables(tmp_path, sweep):
    from typer.testing import CliRunner

    from cli import app

    why = {"empty.csv": "empty file", "text.parquet": "not a readable Parquet file", "other.csv": "missing",
           "binary.csv": "", "header-only.csv": "no rows", "bad-gpus.csv": "'gpus'"}
    for name, path in _bad_tables(tmp_path, sweep).items():
        with pytest.raises(OSError, match=str(path)) as e:
            read_table(path)
        assert why[name] in str(e.value) and "\n" not in str(e.value)
        r = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "rep")])
        assert r.exit_code == 2 and r.output.startswith("error:") and name in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()  # nothing half-written


def test_report_json_lists_what_it_wrote(tmp_path, sweep):
    from typer.testing import CliRunner

    from cli import app

    csv, _ = write_table(sweep, tmp_path / "s.csv")
    r = CliRunner().invoke(app, ["report", str(csv), "--out", str(tmp_path / "rep"), "--no-example", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    written = [Path(p) for p in d["written"]]
    assert d["kind"] == "sweep" and written[:2] == [tmp_path / "rep" / "report.md", tmp_path / "rep" / "report.html"]
    assert all(p.exists() for p in written) and any(p.suffix == ".png" for p in written)
