"""Length files: every reader on small files, the Megatron .idx reader on a file written by the
public format, and errors that name the file and the line or row."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from planner.workload import IDX_MAGIC, SourceError, open_source


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
