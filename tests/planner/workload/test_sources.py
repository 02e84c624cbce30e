"""Length sources: every reader on small files, the Megatron .idx reader on a file written by the
public format, the synthetic families against their published facts, describe_lengths and the
`meshplan lengths describe` command."""

from __future__ import annotations

import gzip
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from planner.workload import (FAMILIES, IDX_MAGIC, SourceError, SyntheticSource, describe_lengths, format_tokens,
                             lengths_source, open_source, parse_tokens, split_at_context)

K, M = 1024, 1024 * 1024
REPO = Path(__file__).resolve().parents[3]


# -- token sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [("256K", 262144), ("2M", 2097152), ("32m", 33554432), ("1G", 1 << 30),
                                          (" 4k ", 4096), ("1.5M", 1572864), ("1000", 1000), (7, 7)])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["0", "-1K", "abc", "1.5", "", "K", "1e400", True])
def test_parse_tokens_rejects(text):
    with pytest.raises(SourceError, match="token count"):
        parse_tokens(text)


@given(st.integers(1, 1 << 40))
def test_format_tokens_round_trips(n):
    assert parse_tokens(format_tokens(n)) == n


# -- readers -------------------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["lengths.txt", "lengths.txt.gz", "lengths"])
def test_text_reader(tmp_path, name):
    src = open_source(str(write(tmp_path / name, "# doc lengths\n12\n\n  40 \n7\n")))
    assert src.sample().tolist() == [12, 40, 7]
    assert src.sample(2).tolist() == [12, 40]
    assert src.steps is None and src.name.endswith(name)


@pytest.mark.parametrize("text, message", [
    ("12\n-3\n", r"line 2: -3 is not a positive length"),
    ("12\n\n0\n", r"line 3: 0 is not a positive length"),
    ("12\n4.5\n", r"line 2: '4.5' is not an integer"),
    ("12\nabc\n", r"line 2: 'abc' is not an integer"),
    ("5\n99999999999999999999\n", r"line 2: 99999999999999999999 is absurdly large"),
    ("5\n2000000000\n", r"line 2: 2000000000 is absurdly large"),
    ("", r"no lengths found"),
    ("# only a comment\n\n", r"no lengths found"),
])
def test_text_reader_errors_name_the_line(tmp_path, text, message):
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(SourceError, match=message) as e:
        open_source(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_files(tmp_path):
    cases = {
        tmp_path / "x.txt.gz": b"not gzip",
        tmp_path / "bin.txt": b"\xff\xfe\x00\x01",
        tmp_path / "t.parquet": b"not parquet",
    }
    for path, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(SourceError, match=rf"{path.name}: cannot read"):
            open_source(str(path))
    with pytest.raises(SourceError, match="no such file, and not a named source"):
        open_source(str(tmp_path / "missing.txt"))
    with pytest.raises(SourceError, match="is a directory"):
        open_source(str(tmp_path))


def test_csv_reader_picks_columns(tmp_path):
    path = write(tmp_path / "t.csv", "doc,length,step\na,10,0\nb,20,1\nc,30,0\n")
    src = open_source(str(path))  # "length" is a known name among several columns
    assert src.sample().tolist() == [10, 20, 30] and src.column == "length" and src.steps is None
    with pytest.raises(SourceError, match=r"t.csv: row 1 \(column 'step'\): 0 is not a positive length"):
        open_source(str(path), column="step")
    src = open_source(str(path), step_column="step")
    assert src.steps.tolist() == [0, 1, 0]
    tsv = write(tmp_path / "t.tsv.gz", "n_docs\tseqlen\n1\t5\n2\t6\n")
    assert open_source(str(tsv), column="seqlen").sample().tolist() == [5, 6]
    assert open_source(str(write(tmp_path / "headless.csv", "12\n40\n"))).sample().tolist() == [12, 40]


@pytest.mark.parametrize("text, kwargs, message", [
    ("a,length\n1,5\n2,\n", {}, r"row 2 \(column 'length'\): missing value"),
    ("length\n5\n2.5\n", {}, r"row 2 \(column 'length'\): 2.5 is not an integer"),
    ("length\n5\nlots\n", {}, r"row 2 \(column 'length'\): 'lots' is not an integer"),
    ("length\n5\n-1\n", {}, r"row 2 \(column 'length'\): -1 is not a positive length"),
    ("a,length\n1,5\n", {"column": "len"}, r"no column 'len'; columns: a, length"),
    ("a,b\n1,5\n", {}, r"which column holds the lengths\? pass --column"),
    ("length,step\n5,1\n6,x\n", {"step_column": "step"}, r"row 2 \(column 'step'\): 'x' is not an integer"),
    ("length,step\n5,-1\n", {"step_column": "step"}, r"row 1 \(column 'step'\): step -1 is negative"),
    ("length\n", {}, r"no lengths found"),
    ("", {}, r"no lengths found"),
])
def test_csv_errors_name_the_row(tmp_path, text, kwargs, message):
    path = write(tmp_path / "t.csv", text)
    with pytest.raises(SourceError, match=message) as e:
        open_source(str(path), **kwargs)
    assert str(path) in str(e.value)


def test_parquet_reader(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"seq_len": [100, 200, 300], "step": [2, 2, 5], "flag": [True, False, True]}).to_parquet(path)
    src = open_source(str(path), step_column="step")
    assert src.sample().tolist() == [100, 200, 300] and src.steps.tolist() == [2, 2, 5]
    with pytest.raises(SourceError, match=r"row 1 \(column 'flag'\): True is not an integer"):
        open_source(str(path), column="flag")
    gaps = tmp_path / "gaps.parquet"
    pd.DataFrame({"length": pd.array([4, None, 6], dtype="Int64")}).to_parquet(gaps)
    with pytest.raises(SourceError, match=r"gaps.parquet: row 2 \(column 'length'\): missing value"):
        open_source(str(gaps))


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_jsonl_reader(tmp_path, name):
    rows = [{"text_id": 1, "num_tokens": 9, "step": 0}, {"text_id": 2, "num_tokens": 11, "step": 1}]
    path = write(tmp_path / name, "\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = open_source(str(path), step_column="step")
    assert src.sample().tolist() == [9, 11] and src.steps.tolist() == [0, 1] and src.column == "num_tokens"


@pytest.mark.parametrize("text, message", [
    ('{"length": 4}\n{"length": "x"}\n', r"line 2 \(column 'length'\): 'x' is not an integer"),
    ('{"length": 4}\n\n{"length": null}\n', r"line 3 \(column 'length'\): missing value"),
    ('{"length": 4}\n{"length": true}\n', r"line 2 \(column 'length'\): True is not an integer"),
    ('{"length": 4}\n{"other": 4}\n', r"line 2: no field 'length'"),
    ('{"length": 4}\n{"length": 4\n', r"line 2: not valid JSON"),
    ('[4]\n', r"line 1: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(SourceError, match=message):
        open_source(str(write(tmp_path / "t.jsonl", text)))


def test_column_options_only_for_tables(tmp_path):
    path = write(tmp_path / "t.txt", "5\n")
    with pytest.raises(SourceError, match="apply to CSV, Parquet and JSONL"):
        open_source(str(path), column="length")
    with pytest.raises(SourceError, match="table files only"):
        open_source("byted-like", column="length")


# -- Megatron .idx -------------------------------------------------------------------------------

def write_idx(path: Path, documents: list[list[int]], *, magic: bytes = IDX_MAGIC, version: int = 1,
              dtype_code: int = 4, cut_bytes: int = 0) -> Path:
    """An index file by the public MMIDIDX layout: each document a list of sequence lengths."""
    seq_lengths = [s for doc in documents for s in doc]
    doc_index = np.cumsum([0] + [len(doc) for doc in documents])
    pointers = np.cumsum([0] + seq_lengths[:-1]) * 4 if seq_lengths else []
    data = (magic + struct.pack("<Q", version) + struct.pack("<B", dtype_code)
            + struct.pack("<Q", len(seq_lengths)) + struct.pack("<Q", len(doc_index))
            + np.asarray(seq_lengths, dtype="<i4").tobytes() + np.asarray(pointers, dtype="<i8").tobytes()
            + np.asarray(doc_index, dtype="<i8").tobytes())
    path.write_bytes(data[: len(data) - cut_bytes])
    return path


def test_megatron_idx_reader(tmp_path):
    documents = [[100], [30, 20, 7], [4096, 1], [5]]
    src = open_source(str(write_idx(tmp_path / "data_text_document.idx", documents)))
    assert src.sample().tolist() == [100, 57, 4097, 5]


@pytest.mark.parametrize("kwargs, documents, message", [
    ({"magic": b"NOTANIDX\x00"}, [[5]], "not a Megatron index file"),
    ({"version": 2}, [[5]], "version 2 is not supported"),
    ({"dtype_code": 9}, [[5]], "unknown token dtype code 9"),
    ({"cut_bytes": 8}, [[5], [6]], "truncated"),
    ({}, [[5], [], [6]], r"document 1: 0 is not a positive length"),
    ({}, [[5], [-4]], r"sequence 1: length -4 is negative"),
    ({}, [], "no lengths found"),
])
def test_megatron_idx_errors(tmp_path, kwargs, documents, message):
    with pytest.raises(SourceError, match=message):
        open_source(str(write_idx(tmp_path / "bad.idx", documents, **kwargs)))


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
    example = open_source(str(Path(__file__).resolve().parents[3] / "examples" / "lengths.txt")).sample()
    assert np.array_equal(example, open_source("wikipedia").sample(64))


# -- synthetic families --------------------------------------------------------------------------

def share(s: np.ndarray, lo: int, hi: float, weight: str) -> float:
    inside = (s >= lo) & (s <= hi)
    return float(inside.mean()) if weight == "samples" else float(s[inside].sum() / s.sum())


INF = math.inf
# The published facts (REFERENCE §9), written out here independently of the families' own Fact
# lists: (spec, weight, lo, hi inclusive, target, tolerance).
PUBLISHED = [
    ("byted-like", "samples", 1, 4 * K, 0.80, 0.01),  # ≈80% of samples ≤ 4K
    ("byted-like", "samples", 128 * K, INF, 0.01, 0.001),  # 1% of samples ≥ 128K ...
    ("byted-like", "tokens", 128 * K, INF, 0.443, 0.015),  # ... carry 44.3% of tokens
    ("byted-like", "samples", 2 * M, 2 * M, 0.0005, 0.0001),  # 0.05% of samples at 2M ...
    ("byted-like", "tokens", 2 * M, 2 * M, 0.121, 0.015),  # ... carry 12.1% of tokens
    ("byted-like", "tokens", 256 * K + 1, INF, 0.37, 0.015),  # 37% of tokens above 256K
    ("github-like", "tokens", 128 * K + 1, INF, 0.162, 0.015),
    ("github-like", "tokens", 256 * K + 1, INF, 0.098, 0.015),
    ("github-like", "samples", 1, 2 * K - 1, 0.85, 0.05),  # de Vries: over ~80% below 2K
    ("longalign-like", "samples", 8 * K, 64 * K, 0.50, 0.01),
    ("longalign-like", "samples", 64 * K + 1, INF, 0.0, 0.0),
    ("prolong-like", "tokens", 64 * K, 64 * K, 0.63, 0.01),
    ("prolong-like:pack=512K", "tokens", 512 * K, 512 * K, 0.63, 0.01),
    ("prolong-like:pack=512K", "samples", 512 * K + 1, INF, 0.0, 0.0),
]


@pytest.fixture(scope="module")
def big_samples():
    """1M seeded lengths per family (≈0.1 s each); shared by the fact tests."""
    cache: dict[str, np.ndarray] = {}

    def get(spec: str) -> np.ndarray:
        if spec not in cache:
            cache[spec] = open_source(spec).sample(1_000_000, seed=0)
        return cache[spec]
    return get


@pytest.mark.parametrize("spec, weight, lo, hi, target, tol", PUBLISHED)
def test_family_meets_published_fact(big_samples, spec, weight, lo, hi, target, tol):
    assert abs(share(big_samples(spec), lo, hi, weight) - target) <= tol


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("spec, median, sigma", [("lognormal", 600, 1.2), ("lognormal:median=1K,sigma=2", 1024, 2.0),
                                                 ("lognormal:median=400,sigma=1.6", 400, 1.6)])
def test_lognormal_closed_forms(big_samples, spec, median, sigma):
    s, mu = big_samples(spec), math.log(median)
    assert abs(np.median(s) / median - 1) < 0.01
    # Floored to whole tokens: "≤ 2K" is "< 2K + 1" before flooring.
    assert abs((s <= 2 * K).mean() - phi((math.log(2 * K + 1) - mu) / sigma)) < 0.005
    assert abs(share(s, 1, 2 * K, "tokens") - phi((math.log(2 * K + 1) - mu - sigma ** 2) / sigma)) < 0.015
    if sigma < 1.5:  # the mean converges fast enough to test only for the lighter tails
        assert abs(s.mean() / math.exp(mu + sigma ** 2 / 2) - 1) < 0.01


@pytest.mark.parametrize("spec", [*FAMILIES, "lognormal:median=1K,sigma=2,max=64K", "longalign-like:long_share=0.2",
                                  "prolong-like:pack=512K"])
def test_every_family_meets_its_documented_facts(big_samples, spec):
    src = open_source(spec)
    assert isinstance(src, SyntheticSource) and src.facts and src.name.startswith(spec.split(":")[0])
    s = big_samples(spec)
    for fact in src.facts:
        assert fact.holds(s), (fact.claim, fact.measure(s), fact.low, fact.high)
    assert "facts met" in FAMILIES[spec.split(":")[0]][0].__doc__.lower()  # documented in the docstring


def test_synthetic_sampling_is_seeded_and_prefix_stable():
    src = open_source("byted-like")
    a = src.sample(200_000, seed=7)
    assert np.array_equal(a, src.sample(200_000, seed=7))
    assert not np.array_equal(a, src.sample(200_000, seed=8))
    assert np.array_equal(src.sample(70_000, seed=7), a[:70_000])  # spans a block boundary
    first = next(src.documents(7))
    assert np.array_equal(first, a[: first.size])


@pytest.mark.parametrize("spec, message", [
    ("lognormal:sigma=-1", "0 < sigma"), ("lognormal:median=abc", "median='abc' is not a valid number"),
    ("lognormal:foo=1", "cannot read parameter 'foo=1'"), ("byted-like:x=1", "parameters: none"),
    ("longalign-like:long_share=1.5", "long_share must be in"), ("prolong-like:pack=1K", "at least 4K"),
    ("lognormal:median=2M,max=1M", "median < max"),
])
def test_bad_family_parameters(spec, message):
    with pytest.raises(SourceError, match=message):
        open_source(spec).sample(10)


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
    lengths = write(tmp_path / "l.csv", "id,len\n1,100\n2,5000\n3,300000\n")
    png = tmp_path / "out.png"
    r = CliRunner().invoke(cli.app, ["lengths", "describe", str(lengths), "--column", "len", "--max-context", "128K",
                                     "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "attn FLOPs %" in r.stdout and "1 documents longer than 128K" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path / "bad.txt", "12\n-3\n")
    r = subprocess.run([sys.executable, "-m", "cli", "lengths", "describe", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {path}: line 2: -3 is not a positive length"]
