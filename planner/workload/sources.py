"""Length sources: where the planner's document lengths (in tokens) come from.

Three kinds, one interface (:class:`LengthSource`):

- recorded lengths read from a file: a text file of integers (optionally ``.gz``), a CSV / TSV,
  Parquet or JSONL table (a chosen column, optionally a step column), or a Megatron indexed
  dataset's ``.idx`` file, so users plan the very data they train on;
- the named real sample ``wikipedia`` (1M Wikipedia lengths shipped in planner/workload/data);
- seeded synthetic families (``byted-like``, ``github-like``, ``lognormal:median=600,sigma=1.2``,
  ``longalign-like``, ``prolong-like``), each a mixture of simple laws tuned to published facts
  (REFERENCE §9). Every family carries those facts as :class:`Fact` values with the tolerance we
  hold it to; the tests check them on a large seeded sample.

:func:`open_source` turns a spec string into a source; :func:`describe_lengths` buckets lengths by
powers of two with the share of samples, tokens and attention FLOPs (∝ s²) in each bucket.
Bad input raises :class:`SourceError` with one line naming the file and the line or row.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Union

import numpy as np
import pandas as pd

K_TOKENS = 1024
M_TOKENS = 1024 * K_TOKENS
G_TOKENS = 1024 * M_TOKENS
# A single document of 1G tokens is not training data: larger values are bytes, characters or a
# misread column, so they are rejected rather than planned.
MAX_LENGTH_TOKENS = G_TOKENS
DEFAULT_SAMPLES = 1_000_000  # synthetic sample size for `describe` (enough for 0.05% facts)
BLOCK_DOCUMENTS = 1 << 16  # synthetic streams are drawn in fixed blocks, so prefixes are stable
# Column names tried, in order, when a table has several columns and none was chosen.
LENGTH_COLUMNS = ("length", "lengths", "len", "seq_len", "seqlen", "sequence_length", "num_tokens",
                  "n_tokens", "tokens", "token_count")


class SourceError(ValueError):
    """A length source is missing, unreadable or holds a bad value; the message names the file and
    the line or row."""


# -- token sizes -------------------------------------------------------------------------------

_SUFFIX = {"": 1, "K": K_TOKENS, "M": M_TOKENS, "G": G_TOKENS}


def parse_tokens(text: str | int) -> int:
    """A positive token count with an optional binary suffix: "256K" -> 262144 (K = 1024, M = 1024²,
    G = 1024³); "1.5M" is allowed when it names a whole number of tokens."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value: float = int(text)
    else:
        s = str(text).strip().upper().replace("_", "")
        unit = s[-1:] if s[-1:] in ("K", "M", "G") else ""
        try:
            value = float(s[: len(s) - len(unit)]) * _SUFFIX[unit]
        except ValueError:
            value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        raise SourceError(f"cannot read token count {text!r}: use a positive integer with an optional "
                          "K, M or G suffix (K = 1024), e.g. 256K")
    return int(value)


def format_tokens(n: int) -> str:
    """Inverse of parse_tokens for display: 262144 -> "256K"; other counts print as integers."""
    for unit, size in (("G", G_TOKENS), ("M", M_TOKENS), ("K", K_TOKENS)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# -- validation shared by every reader ------------------------------------------------------------

def _checked_lengths(values: np.ndarray, where: Callable[[int], str], origin: str,
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
    return _checked_lengths(values, lambda i: f"{path}: line {i + 1 if line_no is None else line_no[i]}", str(path),
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
class _Table:
    """What a table file gives: lengths, optional steps and the column the lengths came from."""

    lengths_tokens: np.ndarray
    steps: np.ndarray | None
    column: str


def _table_from_frame(frame: pd.DataFrame, path: Path, column: str | None, step_column: str | None,
                      where: Callable[[int], str]) -> _Table:
    frame.columns = columns = [str(c) for c in frame.columns]
    col = _pick_column(columns, column, path)
    lengths = _column_integers(frame[col], lambda i: f"{where(i)} (column {col!r})")
    lengths = _checked_lengths(lengths, lambda i: f"{where(i)} (column {col!r})", str(path),
                               lambda i: frame[col].iloc[i])
    steps = None
    if step_column is not None:
        sc = _pick_column(columns, step_column, path)
        steps = _column_integers(frame[sc], lambda i: f"{where(i)} (column {sc!r})")
        neg = np.flatnonzero(steps < 0)
        if neg.size:
            raise SourceError(f"{where(int(neg[0]))} (column {sc!r}): step {int(steps[neg[0]])} is negative")
        steps.setflags(write=False)
    return _Table(lengths, steps, col)


def read_csv_lengths(path: Path, column: str | None = None, step_column: str | None = None) -> _Table:
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


def read_parquet_lengths(path: Path, column: str | None = None, step_column: str | None = None) -> _Table:
    """A Parquet table; rows are numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        frame = pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None
    return _table_from_frame(frame, path, column, step_column, lambda i: f"{path}: row {i + 1}")


def read_jsonl_lengths(path: Path, column: str | None = None, step_column: str | None = None) -> _Table:
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


def read_megatron_idx(path: Path) -> np.ndarray:
    """Document lengths (tokens) from a Megatron ``.idx`` header: each document's length is the sum of
    its sequences' lengths between consecutive document indices."""
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
    doc_index = np.fromfile(path, dtype="<i8", count=doc_count, offset=IDX_HEADER_BYTES + 12 * seq_count)
    neg = np.flatnonzero(seq_lengths < 0)
    if neg.size:
        raise SourceError(f"{path}: sequence {int(neg[0])}: length {int(seq_lengths[neg[0]])} is negative")
    broken = np.flatnonzero((doc_index[1:] < doc_index[:-1]) | (doc_index[1:] > seq_count)) + 1
    if doc_index[0] < 0 or broken.size:
        i = 0 if doc_index[0] < 0 else int(broken[0])
        raise SourceError(f"{path}: document index {i} ({int(doc_index[i])}) is out of order or past the "
                          f"{seq_count:,} sequences")
    cumulative = np.concatenate(([0], np.cumsum(seq_lengths, dtype=np.int64)))
    lengths = cumulative[doc_index[1:]] - cumulative[doc_index[:-1]]
    return _checked_lengths(lengths, lambda i: f"{path}: document {i}", str(path))


# -- the source interface ------------------------------------------------------------------------

class LengthSource(Protocol):
    """Anything the planner can draw document lengths from."""

    name: str  # the spec it was opened from, canonical for synthetic families (the input's identity in plans)

    @property
    def steps(self) -> np.ndarray | None:
        """Step of each recorded document when the source fixes its own steps, else None."""

    def sample(self, n: int | None = None, seed: int = 0) -> np.ndarray:
        """n document lengths (int64 tokens) for description; None = the source's default."""

    def documents(self, seed: int) -> Iterator[np.ndarray]:
        """The endless document stream batches are cut from, in blocks of int64 lengths."""


@dataclass(frozen=True, eq=False)
class RecordedSource:
    """Lengths recorded from real data (a file, the shipped Wikipedia sample or an array), kept in
    their recorded order."""

    name: str  # spec as given: a path, "wikipedia", or a caller's label
    lengths_tokens: np.ndarray  # int64 [documents], read-only
    steps: np.ndarray | None = None  # int64 [documents] step of each document (step column), or None
    column: str | None = None  # table column the lengths came from

    def sample(self, n: int | None = None, seed: int = 0) -> np.ndarray:
        """The first n recorded lengths (all when n is None); recorded data is not resampled, so the
        seed is unused."""
        if n is not None and n < 1:
            raise SourceError(f"{self.name}: samples must be ≥ 1, got {n}")
        return self.lengths_tokens if n is None else self.lengths_tokens[: int(n)]

    def documents(self, seed: int) -> Iterator[np.ndarray]:
        """The recording in order, then again from the start (a new epoch) when it runs out; the order
        is the data order, so the seed is unused (DESIGN: no cross-step reordering by default)."""
        while True:
            yield self.lengths_tokens


def lengths_source(lengths_tokens: Any, *, name: str = "lengths", steps: Any = None) -> RecordedSource:
    """A RecordedSource from an in-memory sequence of lengths (and optionally one step per length)."""
    values = np.asarray(lengths_tokens)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise SourceError(f"{name}: lengths must be a one-dimensional sequence of integers")
    lengths = _checked_lengths(values, lambda i: f"{name}: entry {i}", name)
    step_arr = None
    if steps is not None:
        step_arr = np.array(steps, dtype=np.int64)
        if step_arr.shape != lengths.shape or (step_arr < 0).any():
            raise SourceError(f"{name}: steps must be one non-negative integer per length")
        step_arr.setflags(write=False)
    return RecordedSource(name, lengths, step_arr)


# -- synthetic families --------------------------------------------------------------------------

def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


@dataclass(frozen=True)
class LogNormal:
    """Log-normal lengths truncated to [lo_tokens, hi_tokens) (redrawn outside)."""

    median_tokens: float  # exp(μ)
    sigma: float  # σ of ln length
    lo_tokens: float = 1.0
    hi_tokens: float = float(MAX_LENGTH_TOKENS)

    def _z(self, x: float, shift: float = 0.0) -> float:
        return (math.log(x) - math.log(self.median_tokens) - shift) / self.sigma

    def _mass(self, shift: float = 0.0) -> float:
        return _phi(self._z(self.hi_tokens, shift)) - _phi(self._z(self.lo_tokens, shift))

    def cdf(self, x: float) -> float:
        """Share of samples below x: Φ((ln x − μ)/σ), renormalised to the truncation."""
        x = min(max(x, self.lo_tokens), self.hi_tokens)
        return (_phi(self._z(x)) - _phi(self._z(self.lo_tokens))) / self._mass()

    def token_cdf(self, x: float) -> float:
        """Share of tokens in samples below x: the token-weighted law is log-normal with μ + σ²."""
        s2 = self.sigma ** 2
        x = min(max(x, self.lo_tokens), self.hi_tokens)
        return (_phi(self._z(x, s2)) - _phi(self._z(self.lo_tokens, s2))) / self._mass(s2)

    def mean_tokens(self) -> float:
        return self.median_tokens * math.exp(self.sigma ** 2 / 2) * self._mass(self.sigma ** 2) / self._mass()

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self._mass() < 1e-3:  # rejection would spin; say which parameters are impossible
            raise SourceError(f"log-normal median={self.median_tokens:g}, sigma={self.sigma:g} puts under 0.1% "
                              f"of samples in [{self.lo_tokens:g}, {self.hi_tokens:g}) tokens")
        mu = math.log(self.median_tokens)
        x = rng.lognormal(mu, self.sigma, n)
        bad = (x < self.lo_tokens) | (x >= self.hi_tokens)
        while bad.any():
            x[bad] = rng.lognormal(mu, self.sigma, int(bad.sum()))
            bad = (x < self.lo_tokens) | (x >= self.hi_tokens)
        return x


@dataclass(frozen=True)
class PowerLaw:
    """Density ∝ s^-(alpha+1) on [lo_tokens, hi_tokens); alpha = 0 is log-uniform."""

    lo_tokens: float
    hi_tokens: float
    alpha: float

    def mean_tokens(self) -> float:
        lo, hi, a = self.lo_tokens, self.hi_tokens, self.alpha
        if a == 0:
            return (hi - lo) / math.log(hi / lo)
        if a == 1:
            return math.log(hi / lo) / (1 / lo - 1 / hi)
        return a / (a - 1) * (lo ** (1 - a) - hi ** (1 - a)) / (lo ** -a - hi ** -a)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random(n)  # inverse CDF
        lo, hi, a = self.lo_tokens, self.hi_tokens, self.alpha
        if a == 0:
            return lo * (hi / lo) ** u
        return (lo ** -a - u * (lo ** -a - hi ** -a)) ** (-1.0 / a)


@dataclass(frozen=True)
class Fixed:
    """Every sample exactly `tokens` long (e.g. documents concatenated to fill a window)."""

    tokens: int

    def mean_tokens(self) -> float:
        return float(self.tokens)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, float(self.tokens))


Component = Union[LogNormal, PowerLaw, Fixed]


@dataclass(frozen=True)
class Mixture:
    """Each sample comes from a component picked with its share of samples; lengths are floored to
    whole tokens, so [lo, hi) laws give integers in [lo, hi − 1]."""

    parts: tuple[tuple[float, Component], ...]  # (share of samples, component)

    @staticmethod
    def by_token_share(parts: tuple[tuple[float, Component], ...]) -> "Mixture":
        """Mixture whose components carry the given shares of tokens: sample weight ∝ share / mean."""
        raw = [(share / c.mean_tokens(), c) for share, c in parts]
        total = sum(w for w, _ in raw)
        return Mixture(tuple((w / total, c) for w, c in raw))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        weights = np.array([w for w, _ in self.parts])
        which = rng.choice(len(self.parts), size=n, p=weights / weights.sum())
        x = np.empty(n)
        for j, (_, component) in enumerate(self.parts):
            mask = which == j
            x[mask] = component.draw(rng, int(mask.sum()))
        return np.maximum(np.floor(x), 1).astype(np.int64)


@dataclass(frozen=True)
class Fact:
    """A published statistic a synthetic family reproduces: the share of samples (or of tokens) in
    lengths lo_tokens ≤ s ≤ hi_tokens lies in [low, high]."""

    claim: str  # the statistic as published, e.g. "≈80% of samples ≤ 4K"
    ref: str  # where it is published
    weight: Literal["samples", "tokens"]
    lo_tokens: int
    hi_tokens: int  # inclusive
    low: float  # accepted share range (the tolerance we hold the family to)
    high: float

    def measure(self, lengths_tokens: np.ndarray) -> float:
        s = np.asarray(lengths_tokens, dtype=np.int64)
        inside = (s >= self.lo_tokens) & (s <= self.hi_tokens)
        if self.weight == "samples":
            return float(inside.mean())
        return float(s[inside].sum() / s.sum())

    def holds(self, lengths_tokens: np.ndarray) -> bool:
        return self.low <= self.measure(lengths_tokens) <= self.high


def _about(claim: str, ref: str, weight: Literal["samples", "tokens"], lo: int, hi: int, target: float,
           tol: float) -> Fact:
    return Fact(claim, ref, weight, lo, hi, max(target - tol, 0.0), min(target + tol, 1.0))


_NO_LIMIT = 2 * MAX_LENGTH_TOKENS  # upper end of fact ranges with no upper bound


@dataclass(frozen=True)
class SyntheticSource:
    """A seeded synthetic length distribution: a mixture of simple laws and the facts it meets."""

    name: str  # canonical spec, e.g. "lognormal:median=600,sigma=1.2"
    mixture: Mixture
    facts: tuple[Fact, ...]
    summary: str  # one line: what it models

    @property
    def steps(self) -> None:
        return None  # synthetic streams are cut into steps by a token budget

    def _block(self, seed: int, index: int) -> np.ndarray:
        # Each block has its own generator, so a stream's prefix does not depend on how much is drawn.
        return self.mixture.draw(np.random.default_rng([seed, index]), BLOCK_DOCUMENTS)

    def sample(self, n: int | None = None, seed: int = 0) -> np.ndarray:
        """n lengths (DEFAULT_SAMPLES when None): the first n of documents(seed)."""
        n = DEFAULT_SAMPLES if n is None else int(n)
        if n < 1 or seed < 0:
            raise SourceError(f"{self.name}: samples must be ≥ 1 and seed ≥ 0 (got {n}, {seed})")
        blocks = [self._block(seed, i) for i in range(-(-n // BLOCK_DOCUMENTS))]
        return np.concatenate(blocks)[:n]

    def documents(self, seed: int) -> Iterator[np.ndarray]:
        if seed < 0:
            raise SourceError(f"{self.name}: seed must be ≥ 0, got {seed}")
        for i in count():
            yield self._block(seed, i)


BYTESCALE = "ByteScale §3.1, Fig. 4"
DE_VRIES = "de Vries (harmdevries.com)"


def byted_like() -> SyntheticSource:
    """ByteScale's production ("Byted") pre-training mix, up to 2M tokens.

    Published facts met (REFERENCE §9) [ByteScale §3.1, Fig. 4], with our tolerances:
      ≈80% of samples ≤ 4K (±1 pp); the 1% of samples ≥ 128K (±0.1 pp) carry 44.3% of tokens
      (±1.5 pp); 0.05% of samples (±0.01 pp) are at 2M and carry 12.1% of tokens (±1.5 pp); 37% of
      tokens are in samples > 256K (±1.5 pp). Mean ≈ 8.67K tokens (= 0.05% · 2M / 12.1%).
    Shape [assumption]: 84.6% web-like log-normal (median 600, σ 1.2, < 128K); 14.4% power law on
    [4K, 128K) (α 0.365, sets the 55.7% of tokens below 128K); 0.33% log-uniform on [128K, 256K)
    (7.3% of tokens); 0.62% power law on [256K, 2M) (α 3.94, 24.9% of tokens); 0.05% at exactly 2M.
    The weights and exponents were solved from the facts above with the closed-form means.
    Not met: the tentative per-bucket token shares (2M 12.1, 1M 9.7, 512K 7.3, 256K 8.8,
    128K 6.4%) [unverified figure decoding]: they imply only 0.68% of samples ≥ 128K, not 1%.
    """
    mixture = Mixture((
        (0.846309, LogNormal(600, 1.2, hi_tokens=128 * K_TOKENS)),
        (0.143691, PowerLaw(4 * K_TOKENS, 128 * K_TOKENS, 0.36539)),
        (0.0033454, PowerLaw(128 * K_TOKENS, 256 * K_TOKENS, 0.0)),
        (0.0061546, PowerLaw(256 * K_TOKENS, 2 * M_TOKENS, 3.94085)),
        (0.0005, Fixed(2 * M_TOKENS)),
    ))
    facts = (
        _about("≈80% of samples ≤ 4K", BYTESCALE, "samples", 1, 4 * K_TOKENS, 0.80, 0.01),
        _about("1% of samples ≥ 128K", BYTESCALE, "samples", 128 * K_TOKENS, _NO_LIMIT, 0.01, 0.001),
        _about("samples ≥ 128K carry 44.3% of tokens", BYTESCALE, "tokens", 128 * K_TOKENS, _NO_LIMIT, 0.443, 0.015),
        _about("0.05% of samples at 2M", BYTESCALE, "samples", 2 * M_TOKENS, 2 * M_TOKENS, 0.0005, 0.0001),
        _about("samples at 2M carry 12.1% of tokens", BYTESCALE, "tokens", 2 * M_TOKENS, 2 * M_TOKENS, 0.121, 0.015),
        _about("37% of tokens in samples > 256K", BYTESCALE, "tokens", 256 * K_TOKENS + 1, _NO_LIMIT, 0.37, 0.015),
    )
    return SyntheticSource("byted-like", mixture, facts, "ByteScale production pre-training mix up to 2M")


def github_like() -> SyntheticSource:
    """ByteScale's GitHub (code) mix: short files with a heavy tail of long repository documents.

    Published facts met (REFERENCE §9): 16.2% of tokens in samples > 128K (±1.5 pp) and 9.8% in
    samples > 256K (±1.5 pp) [ByteScale §3.1]; over ~80% of code documents shorter than 2K
    (accepted 80–90%) [de Vries].
    Shape [assumption]: code-like log-normal (median 400, σ 1.6, < 128K; REFERENCE §9 table) plus
    a power law on [128K, 2M) (α 1.516, so 9.8/16.2 of its tokens lie above 256K) carrying 16.2%
    of tokens (≈0.09% of samples). The median is not published; only the tail is pinned.
    """
    mixture = Mixture.by_token_share((
        (0.838, LogNormal(400, 1.6, hi_tokens=128 * K_TOKENS)),
        (0.162, PowerLaw(128 * K_TOKENS, 2 * M_TOKENS, 1.51551)),
    ))
    facts = (
        _about("16.2% of tokens in samples > 128K", BYTESCALE, "tokens", 128 * K_TOKENS + 1, _NO_LIMIT, 0.162, 0.015),
        _about("9.8% of tokens in samples > 256K", BYTESCALE, "tokens", 256 * K_TOKENS + 1, _NO_LIMIT, 0.098, 0.015),
        Fact("over ~80% of documents < 2K", DE_VRIES, "samples", 1, 2 * K_TOKENS - 1, 0.80, 0.90),
    )
    return SyntheticSource("github-like", mixture, facts, "ByteScale GitHub code mix")


def lognormal(median_tokens: int = 600, sigma: float = 1.2, max_tokens: int = MAX_LENGTH_TOKENS) -> SyntheticSource:
    """Log-normal lengths (spec "lognormal:median=600,sigma=1.2,max=2M"): median `median_tokens`,
    σ `sigma` of ln length, truncated below `max_tokens`
    (default: the web-like set of REFERENCE §9, which meets de Vries' "over ~80% of documents
    < 2K" with 84.7%).

    Facts met are the closed forms of REFERENCE §9 (truncation included): samples ≤ L =
    Φ((ln L − μ)/σ) for L = the median (50%) and L = 2K (±0.5 pp); tokens in samples ≤ 2K =
    Φ((ln L − μ − σ²)/σ) (±1 pp). Lengths are floored to whole tokens, so "≤ L" is "< L + 1".
    """
    median, max_ = median_tokens, max_tokens
    if not (median >= 1 and 0 < sigma <= 10 and median < max_ <= MAX_LENGTH_TOKENS):
        raise SourceError(f"lognormal: need median ≥ 1, 0 < sigma ≤ 10 and median < max ≤ "
                          f"{format_tokens(MAX_LENGTH_TOKENS)} (got median={median}, sigma={sigma}, max={max_})")
    law = LogNormal(float(median), float(sigma), hi_tokens=float(max_))
    ref = "REFERENCE §9 closed forms"
    facts = (
        _about(f"50% of samples ≤ the median {median}", ref, "samples", 1, median, law.cdf(median + 1), 0.005),
        _about(f"samples ≤ 2K: Φ((ln 2K − μ)/σ) = {law.cdf(2 * K_TOKENS + 1):.1%}", ref, "samples", 1,
               2 * K_TOKENS, law.cdf(2 * K_TOKENS + 1), 0.005),
        _about(f"tokens in samples ≤ 2K: Φ((ln 2K − μ − σ²)/σ) = {law.token_cdf(2 * K_TOKENS + 1):.1%}", ref,
               "tokens", 1, 2 * K_TOKENS, law.token_cdf(2 * K_TOKENS + 1), 0.01),
    )
    name = f"lognormal:median={median},sigma={sigma:g}" + ("" if max_ == MAX_LENGTH_TOKENS else f",max={max_}")
    return SyntheticSource(name, Mixture(((1.0, law),)), facts, f"log-normal, median {median}, σ {sigma:g}")


LONGALIGN = "LongAlign-10k (arXiv 2401.18058)"


def longalign_like(long_share: float = 0.5) -> SyntheticSource:
    """A LongAlign-style SFT mix: LongAlign-10k's long instructions (8K–64K tokens) mixed with short
    ShareGPT chats.

    Published facts met (REFERENCE §9) [LongAlign; dataset card]: the long part spans 8K–64K tokens,
    so `long_share` of samples (default 50% [assumption: equal counts], ±1 pp) lie in [8K, 64K]
    and none is longer than 64K.
    Shape [assumption]: log-uniform on [8K, 64K) for the long part; ShareGPT-like log-normal
    (median 500, σ 1.0, < 8K) for the chats.
    """
    if not 0 < long_share < 1:
        raise SourceError(f"longalign-like: long_share must be in (0, 1), got {long_share}")
    mixture = Mixture((
        (1 - long_share, LogNormal(500, 1.0, hi_tokens=8 * K_TOKENS)),
        (long_share, PowerLaw(8 * K_TOKENS, 64 * K_TOKENS, 0.0)),
    ))
    facts = (
        _about(f"{long_share:.0%} of samples are 8K–64K long instructions", LONGALIGN, "samples",
               8 * K_TOKENS, 64 * K_TOKENS, long_share, 0.01),
        Fact("no sample longer than 64K", LONGALIGN, "samples", 64 * K_TOKENS + 1, _NO_LIMIT, 0.0, 0.0),
    )
    name = "longalign-like" + ("" if long_share == 0.5 else f":long_share={long_share:g}")
    return SyntheticSource(name, mixture, facts, "LongAlign-10k long SFT + ShareGPT chats")


PROLONG = "ProLong (arXiv 2410.02660) [unverified %]"


def prolong_like(pack_tokens: int = 64 * K_TOKENS) -> SyntheticSource:
    """A ProLong-style continued pre-training mix: code repositories, books and textbooks
    concatenated to fill the packing window, plus short data.

    Published facts met (REFERENCE §9) [ProLong; percentages unverified]: 63% of tokens
    (30% code repos + 30% books + 3% textbooks, ±1 pp) are in documents of exactly the packing
    length (64K in the first stage, `pack=512K` for the second); the rest is short data; no
    document exceeds the window.
    Shape [assumption]: short data web-like log-normal (median 600, σ 1.2, < pack).
    """
    pack = pack_tokens
    if pack < 4 * K_TOKENS:
        raise SourceError(f"prolong-like: pack must be at least 4K tokens, got {pack}")
    mixture = Mixture.by_token_share((
        (0.37, LogNormal(600, 1.2, hi_tokens=pack)),
        (0.63, Fixed(pack)),
    ))
    facts = (
        _about(f"63% of tokens in documents packed to {format_tokens(pack)}", PROLONG, "tokens", pack, pack,
               0.63, 0.01),
        Fact(f"no document longer than {format_tokens(pack)}", PROLONG, "samples", pack + 1, _NO_LIMIT, 0.0, 0.0),
    )
    name = "prolong-like" + ("" if pack == 64 * K_TOKENS else f":pack={format_tokens(pack)}")
    return SyntheticSource(name, mixture, facts, f"ProLong continued pre-training mix packed at {format_tokens(pack)}")


# family name -> (constructor, {spec parameter: (keyword argument, parser)})
FAMILIES: dict[str, tuple[Callable[..., SyntheticSource], dict[str, tuple[str, Callable[[str], Any]]]]] = {
    "byted-like": (byted_like, {}),
    "github-like": (github_like, {}),
    "lognormal": (lognormal, {"median": ("median_tokens", parse_tokens), "sigma": ("sigma", float),
                              "max": ("max_tokens", parse_tokens)}),
    "longalign-like": (longalign_like, {"long_share": ("long_share", float)}),
    "prolong-like": (prolong_like, {"pack": ("pack_tokens", parse_tokens)}),
}


def _synthetic(spec: str) -> SyntheticSource:
    family, _, params = spec.partition(":")
    make, parsers = FAMILIES[family]
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in parsers:
            known = ", ".join(parsers) or "none"
            raise SourceError(f"{family}: cannot read parameter {item!r} (parameters: {known}; e.g. "
                              "lognormal:median=600,sigma=1.2)")
        keyword, parse = parsers[key]
        try:
            kwargs[keyword] = parse(value.strip())
        except ValueError as e:  # SourceError from parse_tokens is a ValueError too
            raise SourceError(f"{family}: parameter {key}={value.strip()!r} is not a valid number") from e
    return make(**kwargs)


# -- opening a spec ------------------------------------------------------------------------------

WIKIPEDIA = "wikipedia"


@lru_cache(maxsize=1)
def _wikipedia() -> RecordedSource:
    path = Path(str(resources.files("planner.workload").joinpath("data", "wikipedia_lengths.txt.gz")))
    return RecordedSource(WIKIPEDIA, read_text_lengths(path))


def source_names() -> list[str]:
    """Named sources: the real Wikipedia sample and the synthetic families."""
    return [WIKIPEDIA, *FAMILIES]


def open_source(spec: str, *, column: str | None = None, step_column: str | None = None) -> LengthSource:
    """A length source from a spec: "wikipedia", a synthetic family ("byted-like",
    "lognormal:median=600,sigma=1.2", ...) or a file path (.txt[.gz], .csv[.gz], .tsv, .parquet,
    .jsonl[.gz], Megatron .idx). `column` and `step_column` choose table columns."""
    spec = spec.strip()
    if spec == WIKIPEDIA or spec.partition(":")[0] in FAMILIES:  # names win; read such a file as ./name
        if column is not None or step_column is not None:
            raise SourceError(f"{spec}: --column and --step-column apply to table files only")
        return _wikipedia() if spec == WIKIPEDIA else _synthetic(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"{spec}: no such file, and not a named source ({', '.join(source_names())})")
    if path.is_dir():
        raise SourceError(f"{spec}: is a directory; give a lengths file")
    kinds = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = kinds[-1] if kinds else ""
    readers: dict[str, Callable[..., _Table]] = {
        ".csv": read_csv_lengths, ".tsv": read_csv_lengths, ".parquet": read_parquet_lengths,
        ".pq": read_parquet_lengths, ".jsonl": read_jsonl_lengths, ".ndjson": read_jsonl_lengths,
    }
    if kind in readers:
        table = readers[kind](path, column, step_column)
        return RecordedSource(spec, table.lengths_tokens, table.steps, table.column)
    if column is not None or step_column is not None:
        raise SourceError(f"{spec}: --column and --step-column apply to CSV, Parquet and JSONL files only")
    if kind == ".idx":
        return RecordedSource(spec, read_megatron_idx(path))
    return RecordedSource(spec, read_text_lengths(path))


# -- splitting and description -------------------------------------------------------------------

@dataclass(frozen=True)
class Pieces:
    """Documents cut into pieces of at most a max context, in stream order."""

    lengths_tokens: np.ndarray  # int64 [pieces]
    document: np.ndarray  # int64 [pieces]: index of the document each piece comes from
    split: np.ndarray  # bool [pieces]: the piece's document was cut (it was longer than the max)
    split_documents: int  # how many documents were cut


def split_at_context(lengths_tokens: np.ndarray, max_context_tokens: int) -> Pieces:
    """Cut each document longer than max_context_tokens into full max-context pieces followed by the
    remainder; shorter documents pass whole. Tokens are conserved piece by piece."""
    s = np.asarray(lengths_tokens, dtype=np.int64)
    if max_context_tokens < 1:
        raise SourceError(f"max context must be ≥ 1 token, got {max_context_tokens}")
    n_pieces = -(-s // max_context_tokens)
    document = np.repeat(np.arange(s.size, dtype=np.int64), n_pieces)
    pieces = np.full(document.size, max_context_tokens, dtype=np.int64)
    pieces[np.cumsum(n_pieces) - 1] = s - (n_pieces - 1) * max_context_tokens
    was_split = n_pieces > 1
    return Pieces(pieces, document, was_split[document], int(was_split.sum()))


def describe_lengths(lengths_tokens: Any, max_context_tokens: int | None = None) -> dict[str, Any]:
    """Per power-of-two bucket lo < s ≤ hi (hi = 2^k; the first bucket is 0 < s ≤ 1), the share of
    samples, of tokens and of attention FLOPs (∝ s², one document at a time), after cutting documents
    longer than max_context_tokens into pieces. Buckets run from the shortest to the longest length,
    empty ones included. Returns {"buckets": [{"lo", "hi", "samples_share", "tokens_share",
    "attn_flops_share"}, ...], "count", "tokens"} (count = sequences after cutting)."""
    s = np.asarray(lengths_tokens)
    if s.ndim != 1 or (s.size and s.dtype.kind not in "iu"):
        raise SourceError("lengths must be a one-dimensional sequence of integers")
    s = _checked_lengths(s, lambda i: f"lengths entry {i}", "lengths")
    if max_context_tokens is not None:
        s = split_at_context(s, max_context_tokens).lengths_tokens
    # bucket k holds 2^(k-1) < s ≤ 2^k, i.e. k = bit_length(s - 1); frexp gives it exactly.
    k = np.frexp((s - 1).astype(np.float64))[1].astype(np.int64)
    lo_k, hi_k = int(k.min()), int(k.max())
    k -= lo_k
    size = hi_k - lo_k + 1
    sf = s.astype(np.float64)
    samples = np.bincount(k, minlength=size) / s.size
    tokens = np.bincount(k, weights=sf, minlength=size)
    flops = np.bincount(k, weights=sf * sf, minlength=size)
    buckets = [{"lo": 0 if j == 0 else 1 << (j - 1), "hi": 1 << j, "samples_share": float(samples[i]),
                "tokens_share": float(tokens[i] / tokens.sum()), "attn_flops_share": float(flops[i] / flops.sum())}
               for i, j in enumerate(range(lo_k, hi_k + 1))]
    return {"buckets": buckets, "count": int(s.size), "tokens": int(s.sum())}


def plot_description(description: dict[str, Any], path: str | Path, *, title: str) -> None:
    """Write a PNG with three bar charts per bucket: share of samples, of tokens, of attention FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = description["buckets"]
    labels = [format_tokens(b["hi"]) for b in buckets]
    x = np.arange(len(buckets))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * len(buckets) + 2), 8), sharex=True)
    for ax, key, label in zip(axes, ("samples_share", "tokens_share", "attn_flops_share"),
                              ("samples", "tokens", "attention FLOPs (∝ s²)")):
        ax.bar(x, [100 * b[key] for b in buckets], color="tab:blue")
        ax.set_ylabel(f"% of {label}")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, labels, rotation=60)
    axes[-1].set_xlabel("bucket upper bound (tokens; bucket = (hi/2, hi])")
    fig.suptitle(f"{title}: {description['count']:,} sequences, {description['tokens']:,} tokens")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise SourceError(f"{path}: cannot write the plot: {e.strerror or e}") from None
    finally:
        plt.close(fig)
