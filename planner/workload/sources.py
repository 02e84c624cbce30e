"""Length sources: where the planner's document lengths (in tokens) come from.

Three kinds, one interface (:class:`LengthSource`): recorded lengths read from a file
(planner/workload/readers.py); the named real sample ``wikipedia`` (1M Wikipedia lengths shipped in
planner/workload/data); seeded synthetic families (planner/workload/families.py).

:func:`open_source` turns a spec string into a source; :func:`describe_lengths` buckets lengths by
powers of two with the share of samples, tokens and attention FLOPs (∝ s²) in each bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from planner.workload.errors import SourceError
from planner.workload.families import FAMILIES, synthetic_source
from planner.workload.readers import TABLE_READERS, checked_lengths, read_megatron_idx, read_text_lengths


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
    lengths = checked_lengths(values, lambda i: f"{name}: entry {i}", name)
    step_arr = None
    if steps is not None:
        step_arr = np.array(steps, dtype=np.int64)
        if step_arr.shape != lengths.shape or (step_arr < 0).any():
            raise SourceError(f"{name}: steps must be one non-negative integer per length")
        step_arr.setflags(write=False)
    return RecordedSource(name, lengths, step_arr)


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
        return _wikipedia() if spec == WIKIPEDIA else synthetic_source(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"{spec}: no such file, and not a named source ({', '.join(source_names())})")
    if path.is_dir():
        raise SourceError(f"{spec}: is a directory; give a lengths file")
    kinds = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = kinds[-1] if kinds else ""
    if kind in TABLE_READERS:
        table = TABLE_READERS[kind](path, column, step_column)
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
    s = checked_lengths(s, lambda i: f"lengths entry {i}", "lengths")
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

