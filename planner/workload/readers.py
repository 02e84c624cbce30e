"""Recorded lengths read from files, so users plan the very data they train on.

A text file of integers (optionally ``.gz``), a CSV / TSV, Parquet or JSONL table (a chosen column,
optionally a step column), or a Megatron indexed dataset's ``.idx`` file. Bad input raises
:class:`SourceError` with one line naming the file and the line or row.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from planner.workload.errors import SourceError
from planner.workload.tokens import MAX_LENGTH_TOKENS, format_tokens

# Column names tried, in order, when a table has several columns and none was chosen.
LENGTH_COLUMNS = ("length", "lengths", "len", "seq_len", "seqlen", "sequence_length", "num_tokens",
                  "n_tokens", "tokens", "token_count")


# -- validation shared by every reader ------------------------------------------------------------

def checked_lengths(values: np.ndarray, where: Callable[[int], str], origin: str,
                    shown: Callable[[int], object] | None = None) -> np.ndarray:
    """int64, read-only copy of `values` after the range checks; `where(i)` names entry i
    (e.g. "data.txt: line 7") and `shown(i)` its value as written, for the error message."""
    if values.size == 0:
        raise SourceError(f"{origin}: no lengths found")
    lengths = np.asarray(values, dtype=np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > MAX_LENGTH_TOKENS))
    if bad.size:
        i = int(bad[0])
        why = ("is not a positive length" if lengths[i] < 1 else
               f"is absurdly large (limit {format_tokens(MAX_LENGTH_TOKENS)} = {MAX_LENGTH_TOKENS:,} tokens)")
        raise SourceError(f"{where(i)}: {shown(i) if shown else int(lengths[i])} {why}")
    lengths = lengths.copy()
    lengths.setflags(write=False)
    return lengths


def _as_number(v: Any) -> float:
    """A table cell as a float; NaN for anything that is not a number (booleans included)."""
    if isinstance(v, (bool, np.bool_)):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _column_integers(values: pd.Series, where: Callable[[int], str]) -> np.ndarray:
    """Integers of a table column; a missing, boolean, non-numeric or fractional entry raises with
    its row. Huge values are clamped to ±2^62 so the range check, not an overflow, reports them."""
    raw = values.to_numpy()
    if raw.dtype.kind in "iu":
        return np.minimum(raw, 2 ** 62).astype(np.int64)
    # Integral floats are fine (a column with a gap elsewhere reads as float); fractions are not.
    arr = raw.astype(np.float64) if raw.dtype.kind == "f" else np.array([_as_number(v) for v in raw], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.floor(arr)))
    if bad.size:
        v = raw[int(bad[0])]
        v = v.item() if isinstance(v, np.generic) else v  # repr as written: 2.5, not np.float64(2.5)
        missing = v is None or (pd.api.types.is_scalar(v) and pd.isna(v) and not isinstance(v, str))
        raise SourceError(f"{where(int(bad[0]))}: " + ("missing value" if missing else f"{v!r} is not an integer"))
    return np.clip(arr, -(2.0 ** 62), 2.0 ** 62).astype(np.int64)


# -- readers -------------------------------------------------------------------------------------

def _unreadable(path: Path, e: Exception) -> SourceError:
    """One line from a library's read error (OS errors give their strerror, others their first line)."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return SourceError(f"{path}: cannot read: {reason}")


def _read_text(path: Path) -> str:
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{path}: cannot read: not a UTF-8 text file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise _unreadable(path, e) from None


def read_text_lengths(path: Path) -> np.ndarray:
    """One integer a line; blank lines and lines starting with '#' are skipped."""
    lines = _read_text(path).splitlines()
    try:  # fast path: a clean file converts in one vectorised call
        values = np.array(lines, dtype=np.int64)
        line_no = None
    except (ValueError, OverflowError):
        kept = [(i, s) for i, s in ((i, line.strip()) for i, line in enumerate(lines)) if s and s[0] != "#"]
        line_no = np.array([i + 1 for i, _ in kept], dtype=np.int64)
        parsed = []
        for i, s in kept:
            try:
                v = int(s)
            except ValueError:
                raise SourceError(f"{path}: line {i + 1}: {s!r} is not an integer") from None
            parsed.append(max(min(v, 2 ** 62), -(2 ** 62)))  # clamp so int64 holds it; range check names it
        values = np.array(parsed, dtype=np.int64)
    return checked_lengths(values, lambda i: f"{path}: line {i + 1 if line_no is None else line_no[i]}", str(path),
                            lambda i: lines[i if line_no is None else line_no[i] - 1].strip())


def _pick_column(columns: list[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in columns:
            raise SourceError(f"{path}: no column {column!r}; columns: {', '.join(map(str, columns))}")
        return column
    if len(columns) == 1:
        return columns[0]
    for name in LENGTH_COLUMNS:
        if name in columns:
            return name
    raise SourceError(f"{path}: which column holds the lengths? pass --column (columns: "
                      f"{', '.join(map(str, columns))})")


@dataclass(frozen=True)
class Table:
    """What a table file gives: lengths, optional steps and the column the lengths came from."""

    lengths_tokens: np.ndarray
    steps: np.ndarray | None
    column: str


def _table_from_frame(frame: pd.DataFrame, path: Path, column: str | None, step_column: str | None,
                      where: Callable[[int], str]) -> Table:
    frame.columns = columns = [str(c) for c in frame.columns]
    col = _pick_column(columns, column, path)
    lengths = _column_integers(frame[col], lambda i: f"{where(i)} (column {col!r})")
    lengths = checked_lengths(lengths, lambda i: f"{where(i)} (column {col!r})", str(path),
                               lambda i: frame[col].iloc[i])
    steps = None
    if step_column is not None:
        sc = _pick_column(columns, step_column, path)
        steps = _column_integers(frame[sc], lambda i: f"{where(i)} (column {sc!r})")
        neg = np.flatnonzero(steps < 0)
        if neg.size:
            raise SourceError(f"{where(int(neg[0]))} (column {sc!r}): step {int(steps[neg[0]])} is negative")
        steps.setflags(write=False)
    return Table(lengths, steps, col)


def read_csv_lengths(path: Path, column: str | None = None, step_column: str | None = None) -> Table:
    """A CSV (or .tsv) table, with a header row unless the first row is all numbers; data rows are
    numbered from 1."""
    sep = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    try:
        frame = pd.read_csv(path, sep=sep, compression="infer")
        if not any(math.isnan(_as_number(c)) for c in frame.columns):  # an all-number "header" is data
            frame = pd.read_csv(path, sep=sep, compression="infer", header=None)
    except pd.errors.EmptyDataError:
        raise SourceError(f"{path}: no lengths found (empty file)") from None
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, gzip.BadGzipFile) as e:
        raise _unreadable(path, e) from None
    return _table_from_frame(frame, path, column, step_column, lambda i: f"{path}: row {i + 1}")


def read_parquet_lengths(path: Path, column: str | None = None, step_column: str | None = None) -> Table:
    """A Parquet table; rows are numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        frame = pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None
    return _table_from_frame(frame, path, column, step_column, lambda i: f"{path}: row {i + 1}")


def read_jsonl_lengths(path: Path, column: str | None = None, step_column: str | None = None) -> Table:
    """One JSON object a line (blank lines skipped); errors name the line."""
    rows: list[dict[str, Any]] = []
    line_no: list[int] = []
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: line {i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise SourceError(f"{path}: line {i + 1}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
        line_no.append(i + 1)
    if not rows:
        raise SourceError(f"{path}: no lengths found")
    keys = list(rows[0].keys())
    wanted = [_pick_column(keys, column, path)] + ([step_column] if step_column is not None else [])
    for key in wanted:
        for r, n in zip(rows, line_no):
            if key not in r:
                raise SourceError(f"{path}: line {n}: no field {key!r}")
    frame = pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=object) for k in wanted})
    return _table_from_frame(frame, path, wanted[0], step_column, lambda i: f"{path}: line {line_no[i]}")


# Megatron-LM indexed dataset index (.idx), public layout (megatron/core/datasets/indexed_dataset.py):
# magic, version <Q (1), dtype code <B, sequence count <Q, document count <Q, then int32 sequence
# lengths, int64 sequence pointers, int64 document indices (document i = sequences [d[i], d[i+1])).
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_HEADER_BYTES = len(IDX_MAGIC) + 8 + 1 + 8 + 8
IDX_DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32",
                   8: "uint16"}


@dataclass(frozen=True)
class MegatronIndex:
    """The arrays of a Megatron ``.idx`` file (the one reader of the format: lengths for planning, token
    pointers for the replay's token source)."""

    dtype: np.dtype  # token dtype of the matching .bin
    sequence_lengths: np.ndarray  # int32 [sequences]: tokens of each sequence
    sequence_pointers: np.ndarray  # int64 [sequences]: byte offset of each sequence in the .bin
    document_index: np.ndarray  # int64 [documents + 1]: document i = sequences [d[i], d[i+1])


def read_megatron_index(path: Path) -> MegatronIndex:
    """The header and arrays of a Megatron ``.idx`` file, checked (magic, version, dtype, sizes, order)."""
    try:
        size_bytes = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(IDX_HEADER_BYTES)
    except OSError as e:
        raise _unreadable(path, e) from None
    if len(header) < IDX_HEADER_BYTES or header[: len(IDX_MAGIC)] != IDX_MAGIC:
        raise SourceError(f"{path}: not a Megatron index file (expected magic {IDX_MAGIC!r})")
    (version,) = struct.unpack_from("<Q", header, len(IDX_MAGIC))
    dtype_code = header[len(IDX_MAGIC) + 8]
    seq_count, doc_count = struct.unpack_from("<QQ", header, len(IDX_MAGIC) + 9)
    if version != 1:
        raise SourceError(f"{path}: Megatron index version {version} is not supported (only 1)")
    if dtype_code not in IDX_DTYPE_CODES:
        raise SourceError(f"{path}: unknown token dtype code {dtype_code} in the header")
    need_bytes = IDX_HEADER_BYTES + 12 * seq_count + 8 * doc_count
    if size_bytes < need_bytes:
        raise SourceError(f"{path}: truncated: the header promises {seq_count:,} sequences and "
                          f"{doc_count:,} document indices ({need_bytes:,} bytes) but the file has {size_bytes:,}")
    if doc_count < 2:
        raise SourceError(f"{path}: no lengths found (the index holds no documents)")
    seq_lengths = np.fromfile(path, dtype="<i4", count=seq_count, offset=IDX_HEADER_BYTES)
    pointers = np.fromfile(path, dtype="<i8", count=seq_count, offset=IDX_HEADER_BYTES + 4 * seq_count)
    doc_index = np.fromfile(path, dtype="<i8", count=doc_count, offset=IDX_HEADER_BYTES + 12 * seq_count)
    neg = np.flatnonzero(seq_lengths < 0)
    if neg.size:
        raise SourceError(f"{path}: sequence {int(neg[0])}: length {int(seq_lengths[neg[0]])} is negative")
    broken = np.flatnonzero((doc_index[1:] < doc_index[:-1]) | (doc_index[1:] > seq_count)) + 1
    if doc_index[0] < 0 or broken.size:
        i = 0 if doc_index[0] < 0 else int(broken[0])
        raise SourceError(f"{path}: document index {i} ({int(doc_index[i])}) is out of order or past the "
                          f"{seq_count:,} sequences")
    return MegatronIndex(np.dtype(IDX_DTYPE_CODES[dtype_code]), seq_lengths, pointers, doc_index)


def read_megatron_idx(path: Path) -> np.ndarray:
    """Document lengths (tokens) from a Megatron ``.idx`` header: each document's length is the sum of
    its sequences' lengths between consecutive document indices."""
    index = read_megatron_index(path)
    cumulative = np.concatenate(([0], np.cumsum(index.sequence_lengths, dtype=np.int64)))
    lengths = cumulative[index.document_index[1:]] - cumulative[index.document_index[:-1]]
    return checked_lengths(lengths, lambda i: f"{path}: document {i}", str(path))


# Table readers by format suffix (".gz" aside); any other file is read as a Megatron .idx or as text.
TABLE_READERS: dict[str, Callable[[Path, str | None, str | None], Table]] = {
    ".csv": read_csv_lengths, ".tsv": read_csv_lengths, ".parquet": read_parquet_lengths,
    ".pq": read_parquet_lengths, ".jsonl": read_jsonl_lengths, ".ndjson": read_jsonl_lengths,
}
