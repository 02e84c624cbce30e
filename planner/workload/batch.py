"""Global batches: the sequences of each training step, cut from a length source.

A stream of documents is cut into steps by a token budget (e.g. 32M tokens a step), in stream
order (DESIGN: no cross-step reordering by default). Documents longer than the max context are
first cut into max-context pieces (each piece becomes its own sequence; the batch reports how many
documents were cut). A step takes pieces while they fit its budget; the first piece that does not
fit opens the next step, so every step holds more than budget − max context tokens and at most the
budget, and the concatenated steps are exactly a prefix of the piece stream: every token is kept
once. A recording (file) shorter than the steps need repeats from the start, and a
:class:`RepeatedRecordingWarning` says so in one line. Sources with a step column (tables) give their
own steps instead of a budget.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from planner.workload.errors import SourceError
from planner.workload.sources import LengthSource, RecordedSource, open_source, split_at_context


class RepeatedRecordingWarning(UserWarning):
    """A recorded length file holds fewer tokens than the planned steps take, so it repeats."""


@dataclass(frozen=True, eq=False)
class GlobalBatch:
    """The sequences of one training step."""

    step: int  # step number (0, 1, ... or the source's own step values)
    lengths_tokens: np.ndarray  # int64 [sequences]: tokens of each sequence, stream order, read-only
    seq_ids: np.ndarray  # int64 [sequences]: id of each sequence, unique in the step (0..n-1)
    max_context_tokens: int  # no sequence is longer; longer documents were cut into pieces
    split_documents: int  # documents (with a piece in this step) that were cut at the max context
    source: str  # name of the length source (its spec)

    def __post_init__(self) -> None:
        for field in ("lengths_tokens", "seq_ids"):
            arr = np.array(getattr(self, field), dtype=np.int64)  # private copy, then frozen
            arr.setflags(write=False)
            object.__setattr__(self, field, arr)
        s = self.lengths_tokens
        if s.ndim != 1 or s.shape != self.seq_ids.shape:
            raise SourceError(f"step {self.step}: need one sequence id per length")
        if s.size and (s.min() < 1 or s.max() > self.max_context_tokens):
            raise SourceError(f"step {self.step}: lengths must lie in [1, {self.max_context_tokens}] tokens")
        if np.unique(self.seq_ids).size != self.seq_ids.size:
            raise SourceError(f"step {self.step}: sequence ids are not unique")

    @property
    def total_tokens(self) -> int:
        """Tokens in the step (the loss normaliser)."""
        return int(self.lengths_tokens.sum())

    def __len__(self) -> int:
        return int(self.lengths_tokens.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GlobalBatch):
            return NotImplemented
        return (self.step, self.max_context_tokens, self.split_documents, self.source) == (
            other.step, other.max_context_tokens, other.split_documents, other.source) and np.array_equal(
            self.lengths_tokens, other.lengths_tokens) and np.array_equal(self.seq_ids, other.seq_ids)

    __hash__ = None  # type: ignore[assignment]  # holds arrays; equality is by value


def _batch(step: int, documents: np.ndarray, max_context_tokens: int, source: str) -> GlobalBatch:
    """One step from whole documents: cut at the max context, ids 0..n-1."""
    pieces = split_at_context(documents, max_context_tokens)
    return GlobalBatch(step, pieces.lengths_tokens, np.arange(pieces.lengths_tokens.size), max_context_tokens,
                       pieces.split_documents, source)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise SourceError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def global_batches(source: str | LengthSource, *, tokens_per_step: int, max_context_tokens: int, steps: int,
                   seed: int) -> list[GlobalBatch]:
    """The first `steps` global batches of `source` (a spec string or a source object).

    Budgeted sources: each step holds at most tokens_per_step tokens (and more than
    tokens_per_step − max_context_tokens); recorded files repeat from the start when they run out.
    Sources with a step column: their first `steps` steps in increasing step order, rows in file
    order; tokens_per_step is not applied. Same arguments and seed -> identical batches, and a
    shorter run's batches are a prefix of a longer one's.
    """
    src = open_source(source) if isinstance(source, str) else source
    budget = _positive_int("tokens per step", tokens_per_step)
    max_context = _positive_int("max context", max_context_tokens)
    n_steps = _positive_int("steps", steps)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SourceError(f"seed must be a non-negative integer, got {seed!r}")
    if max_context > budget:
        raise SourceError(f"max context ({max_context:,} tokens) exceeds the tokens per step ({budget:,}): "
                          "a step must hold at least one full-length sequence")
    if src.steps is not None:
        return _own_steps(src, n_steps, max_context)
    return _budgeted_steps(src, budget, max_context, n_steps, int(seed))


def _own_steps(src: LengthSource, n_steps: int, max_context: int) -> list[GlobalBatch]:
    lengths = src.sample()
    step_of = np.asarray(src.steps)
    order = np.argsort(step_of, kind="stable")  # stable: file order inside a step
    values, starts = np.unique(step_of[order], return_index=True)
    if n_steps > values.size:
        raise SourceError(f"{src.name}: its step column holds {values.size} steps; asked for {n_steps}")
    ends = np.append(starts[1:], order.size)
    return [_batch(int(values[i]), lengths[order[starts[i]:ends[i]]], max_context, src.name)
            for i in range(n_steps)]


def _budgeted_steps(src: LengthSource, budget: int, max_context: int, n_steps: int, seed: int) -> list[GlobalBatch]:
    # Draw until the stream holds more than n_steps budgets: each step takes at most one budget, so the
    # last step then always meets a piece that does not fit and is complete.
    blocks, total = [], 0
    for block in src.documents(seed):
        blocks.append(block)
        total += int(block.sum())
        if total > n_steps * budget:
            break
    pieces = split_at_context(np.concatenate(blocks), max_context)
    cumulative = np.cumsum(pieces.lengths_tokens)
    batches, start, used = [], 0, 0
    for step in range(n_steps):
        # Greedy in stream order: the longest run of pieces that fits the budget (≥ 1, as piece ≤ budget).
        end = int(np.searchsorted(cumulative, used + budget, side="right"))
        doc = pieces.document[start:end]
        split_documents = np.unique(doc[pieces.split[start:end]]).size
        batches.append(GlobalBatch(step, pieces.lengths_tokens[start:end], np.arange(end - start), max_context,
                                   split_documents, src.name))
        start, used = end, int(cumulative[end - 1])
    if isinstance(src, RecordedSource):
        _note_repeats(src, used, budget, n_steps)
    return batches


def _note_repeats(src: RecordedSource, used_tokens: int, budget: int, n_steps: int) -> None:
    """One line when the steps took more tokens than the recording holds (it was repeated)."""
    recorded = int(src.lengths_tokens.sum())
    if used_tokens <= recorded:
        return
    steps = (f"{n_steps} steps of up to {budget:,} tokens take" if n_steps > 1
             else f"a step of up to {budget:,} tokens takes")
    documents = f"{src.lengths_tokens.size:,} document" + ("s" if src.lengths_tokens.size > 1 else "")
    warnings.warn(f"{src.name} holds {documents} / {recorded:,} tokens; {steps} "
                  f"{used_tokens:,}, so the recording repeats from the start "
                  f"({used_tokens / recorded:.1f} passes); give a longer file or a smaller --tokens-per-step to plan "
                  "each document once", RepeatedRecordingWarning, stacklevel=4)
