"""Opening sources: the shipped Wikipedia sample, in-memory lengths, column options; splitting at the
max context, describe_lengths and the `meshplan lengths describe` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from planner.workload import SourceError, describe_lengths, lengths_source, open_source, split_at_context

K = 1024
REPO = Path(__file__).resolve().parents[3]


def test_column_options_only_for_tables(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("5\n")
    with pytest.raises(SourceError, match="apply to CSV, Parquet and JSONL"):
        open_source(str(path), column="length")
    with pytest.raises(SourceError, match="table files only"):
        open_source("byted-like", column="length")


# -- the shipped Wikipedia sample ------------------------------------------------------------------

def test_wikipedia_matches_its_attribution():
    s = open_source("wikipedia").sample()
    # planner/workload/data/README.md and REFERENCE §9: 1M lengths, median 347, mean 1,014, max 1,823,777,
    # 89.6% ≤ 2K, 1,304 above 32K.
    assert s.size == 1_000_000 and np.median(s) == 347 and round(s.mean()) == 1014 and s.max() == 1_823_777
    assert abs((s <= 2 * K).mean() - 0.896) < 0.001 and (s > 32 * K).sum() == 1304
    assert not s.flags.writeable


def test_tour_example_file_is_the_start_of_the_wikipedia_sample():
    """examples/lengths.txt (README's tour): its comment header is skipped and its 64 lengths are the
    sample's first, as its attribution says."""
    example = open_source(str(REPO / "examples" / "lengths.txt")).sample()
    assert np.array_equal(example, open_source("wikipedia").sample(64))


# -- splitting and description -------------------------------------------------------------------

def test_describe_lengths_hand_computed():
    d = describe_lengths(np.array([1, 2, 3, 4, 5, 8]))
    assert d["count"] == 6 and d["tokens"] == 23
    assert [(b["lo"], b["hi"]) for b in d["buckets"]] == [(0, 1), (1, 2), (2, 4), (4, 8)]
    assert [b["samples_share"] for b in d["buckets"]] == pytest.approx([1 / 6, 1 / 6, 2 / 6, 2 / 6])
    assert [b["tokens_share"] for b in d["buckets"]] == pytest.approx([1 / 23, 2 / 23, 7 / 23, 13 / 23])
    assert [b["attn_flops_share"] for b in d["buckets"]] == pytest.approx([1 / 119, 4 / 119, 25 / 119, 89 / 119])


def test_describe_lengths_cuts_at_max_context():
    d = describe_lengths([10, 3], max_context_tokens=4)  # 10 -> 4 + 4 + 2
    assert d["count"] == 4 and d["tokens"] == 13
    assert [(b["lo"], b["hi"], b["samples_share"]) for b in d["buckets"]] == [(1, 2, 0.25), (2, 4, 0.75)]


@given(st.lists(st.integers(1, 1 << 22), min_size=1, max_size=60), st.one_of(st.none(), st.integers(1, 1 << 20)))
@settings(max_examples=60, deadline=None)
def test_describe_lengths_properties(lengths, max_context):
    d = describe_lengths(np.array(lengths), max_context)
    buckets = d["buckets"]
    assert d["tokens"] == sum(lengths)
    for key in ("samples_share", "tokens_share", "attn_flops_share"):
        assert sum(b[key] for b in buckets) == pytest.approx(1.0)
    for a, b in zip(buckets, buckets[1:]):
        assert b["lo"] == a["hi"] and b["hi"] == 2 * b["lo"]
    s = split_at_context(np.array(lengths), max_context).lengths_tokens if max_context else np.array(lengths)
    assert d["count"] == s.size and buckets[0]["lo"] < s.min() and s.max() <= buckets[-1]["hi"]
    for b in buckets:
        assert round(b["samples_share"] * s.size) == ((s > b["lo"]) & (s <= b["hi"])).sum()


@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=40), st.integers(1, 3000))
@settings(max_examples=80, deadline=None)
def test_split_at_context_conserves_each_document(lengths, max_context):
    p = split_at_context(np.array(lengths), max_context)
    assert np.bincount(p.document, weights=p.lengths_tokens).astype(int).tolist() == lengths
    assert p.lengths_tokens.min() >= 1 and p.lengths_tokens.max() <= max_context
    assert p.split_documents == sum(s > max_context for s in lengths)
    assert p.split.tolist() == [lengths[d] > max_context for d in p.document]


@pytest.mark.parametrize("bad", [[], [3, 0], [3, -1], [1.5, 2.0], [[1, 2]]])
def test_describe_lengths_rejects_bad_input(bad):
    with pytest.raises(SourceError):
        describe_lengths(np.array(bad))


def test_lengths_source_validates():
    assert lengths_source([3, 4], steps=[0, 0]).sample().tolist() == [3, 4]
    with pytest.raises(SourceError, match="entry 1: 0 is not a positive length"):
        lengths_source([3, 0])
    with pytest.raises(SourceError, match="one non-negative integer per length"):
        lengths_source([3, 4], steps=[0])


# -- the CLI -------------------------------------------------------------------------------------

def test_cli_describe_json_schema(tmp_path):
    r = CliRunner().invoke(cli.app, ["lengths", "describe", "lognormal", "--samples", "20000", "--seed", "3",
                                     "--max-context", "4K", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d) == {"buckets", "count", "tokens"} and d["count"] >= 20000
    assert all(set(b) == {"lo", "hi", "samples_share", "tokens_share", "attn_flops_share"} for b in d["buckets"])
    assert d["buckets"][-1]["hi"] == 4 * K and sum(b["tokens_share"] for b in d["buckets"]) == pytest.approx(1)
    assert d == describe_lengths(open_source("lognormal").sample(20000, 3), 4 * K)


def test_cli_describe_table_and_plot(tmp_path):
    lengths = tmp_path / "l.csv"
    lengths.write_text("id,len\n1,100\n2,5000\n3,300000\n")
    png = tmp_path / "out.png"
    r = CliRunner().invoke(cli.app, ["lengths", "describe", str(lengths), "--column", "len", "--max-context", "128K",
                                     "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "attn FLOPs %" in r.stdout and "1 documents longer than 128K" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("12\n-3\n")
    r = subprocess.run([sys.executable, "-m", "cli", "lengths", "describe", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {path}: line 2: -3 is not a positive length"]
