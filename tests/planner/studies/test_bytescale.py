"""The ByteScale reproduction: the grid at the paper's GPU counts, its section regenerated in place, and the
regenerating command end to end on a tiny grid."""

from __future__ import annotations

import pandas as pd
import pytest

from planner.studies import BYTESCALE_PANELS, ByteScaleGrid, per_doubling_slowdown, replace_section, reproduce_bytescale

K, M = 1024, 1024 * 1024


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
