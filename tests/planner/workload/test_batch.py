"""Global batches: cutting a document stream into steps by a token budget conserves every token, is
deterministic by seed, cuts long documents at the max context and reports it; sources with a step
column keep their own steps."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.workload import GlobalBatch, RepeatedRecordingWarning, global_batches
from planner.workload import SourceError, lengths_source, open_source, split_at_context

K, M = 1024, 1024 * 1024


def check_budget_invariants(batches: list[GlobalBatch], stream: np.ndarray, budget: int, max_context: int) -> None:
    """The steps are, in order, exactly a prefix of the stream cut at the max context; each fills
    its budget greedily (the next piece would not fit)."""
    pieces = split_at_context(stream, max_context).lengths_tokens
    taken = np.concatenate([b.lengths_tokens for b in batches])
    assert np.array_equal(taken, pieces[: taken.size])  # every token kept once, in stream order
    ends = np.cumsum([len(b) for b in batches])
    for b, end in zip(batches, ends):
        assert b.total_tokens <= budget < b.total_tokens + pieces[end]
        assert b.lengths_tokens.max() <= max_context and b.max_context_tokens == max_context
        assert np.array_equal(b.seq_ids, np.arange(len(b)))
    assert [b.step for b in batches] == list(range(len(batches)))


def test_synthetic_steps_conserve_tokens_and_are_deterministic():
    kwargs = dict(tokens_per_step=8 * M, max_context_tokens=256 * K, steps=6)
    batches = global_batches("byted-like", seed=3, **kwargs)
    stream = open_source("byted-like").sample(200_000, seed=3)  # sample(n, seed) = the stream's first n
    check_budget_invariants(batches, stream, 8 * M, 256 * K)
    assert sum(b.split_documents for b in batches) > 0 and all(b.source == "byted-like" for b in batches)
    assert batches == global_batches("byted-like", seed=3, **kwargs)
    assert batches != global_batches("byted-like", seed=4, **kwargs)
    assert batches[:2] == global_batches("byted-like", seed=3, **{**kwargs, "steps": 2})  # prefix-stable


def test_split_documents_hand_computed():
    # Pieces at max context 4: [4 4 2] [3] [4 4 2], then the recording repeats (a new epoch).
    src = lengths_source([10, 3, 10], name="three")
    with pytest.warns(RepeatedRecordingWarning, match=r"three holds 3 documents / 23 tokens; 4 steps of up to 8 "
                                                      r"tokens take 27, so the recording repeats .*\(1\.2 passes\)"):
        batches = global_batches(src, tokens_per_step=8, max_context_tokens=4, steps=4, seed=0)
    assert [b.lengths_tokens.tolist() for b in batches] == [[4, 4], [2, 3], [4, 4], [2, 4]]
    assert [b.split_documents for b in batches] == [1, 1, 1, 2]
    assert [b.total_tokens for b in batches] == [8, 5, 8, 6]


@given(lengths=st.lists(st.integers(1, 5000), min_size=1, max_size=30), budget=st.integers(1, 20_000),
       context_fraction=st.floats(0.01, 1.0), steps=st.integers(1, 8), seed=st.integers(0, 2 ** 32))
@settings(max_examples=80, deadline=None)
def test_recorded_steps_conserve_every_token(lengths, budget, context_fraction, steps, seed):
    max_context = max(1, int(budget * context_fraction))
    src = lengths_source(lengths)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = global_batches(src, tokens_per_step=budget, max_context_tokens=max_context, steps=steps, seed=seed)
    assert len(batches) == steps
    repeated = sum(b.total_tokens for b in batches) > sum(lengths)  # a warning exactly when the file repeats
    assert [w.category for w in caught] == ([RepeatedRecordingWarning] if repeated else [])
    stream = np.tile(lengths, steps * budget // sum(lengths) + 2)  # recordings repeat when they run out
    check_budget_invariants(batches, stream, budget, max_context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepeatedRecordingWarning)
        assert batches == global_batches(src, tokens_per_step=budget, max_context_tokens=max_context, steps=steps,
                                         seed=seed)


def test_source_with_a_step_column_keeps_its_steps(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text("length,step\n100,3\n70,1\n9000,3\n20,1\n5,7\n")
    src = open_source(str(path), step_column="step")
    batches = global_batches(src, tokens_per_step=1 * M, max_context_tokens=4 * K, steps=2, seed=0)
    assert [b.step for b in batches] == [1, 3]
    assert [b.lengths_tokens.tolist() for b in batches] == [[70, 20], [100, 4096, 4096, 808]]
    assert [b.split_documents for b in batches] == [0, 1]
    with pytest.raises(SourceError, match="its step column holds 3 steps; asked for 4"):
        global_batches(src, tokens_per_step=1 * M, max_context_tokens=4 * K, steps=4, seed=0)


def test_spec_string_source():
    batches = global_batches("wikipedia", tokens_per_step=32 * M, max_context_tokens=32 * K, steps=2, seed=0)
    wiki = open_source("wikipedia").sample()
    check_budget_invariants(batches, wiki, 32 * M, 32 * K)
    assert batches[0].source == "wikipedia"


@pytest.mark.parametrize("kwargs, message", [
    ({"max_context_tokens": 64 * K, "tokens_per_step": 32 * K}, "exceeds the tokens per step"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"tokens_per_step": 1.5}, "tokens per step must be a positive integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_bad_arguments(kwargs, message):
    args = {"tokens_per_step": 1 * M, "max_context_tokens": 32 * K, "steps": 2, "seed": 0, **kwargs}
    with pytest.raises(SourceError, match=message):
        global_batches("lognormal", **args)


def test_global_batch_is_a_checked_value():
    b = GlobalBatch(0, np.array([3, 5]), np.array([0, 1]), 8, 0, "x")
    assert b.total_tokens == 8 and len(b) == 2 and not b.lengths_tokens.flags.writeable
    with pytest.raises(SourceError, match=r"lengths must lie in \[1, 4\]"):
        GlobalBatch(0, np.array([3, 5]), np.array([0, 1]), 4, 0, "x")
    with pytest.raises(SourceError, match="not unique"):
        GlobalBatch(0, np.array([3, 5]), np.array([1, 1]), 8, 0, "x")
    with pytest.raises(SourceError, match="one sequence id per length"):
        GlobalBatch(0, np.array([3, 5]), np.array([0]), 8, 0, "x")


def test_a_recording_long_enough_is_not_repeated_and_says_nothing():
    src = lengths_source([10, 3, 10], name="three")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        global_batches(src, tokens_per_step=23, max_context_tokens=10, steps=1, seed=0)  # takes all 23, once
        global_batches("byted-like", tokens_per_step=8 * M, max_context_tokens=256 * K, steps=3, seed=0)
    with pytest.warns(RepeatedRecordingWarning, match="a step of up to 24 tokens takes 24"):
        global_batches(src, tokens_per_step=24, max_context_tokens=1, steps=1, seed=0)  # 1-token pieces: 24 > 23


# -- the default budget ("auto") -----------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "lengths.txt"


def test_auto_budget_is_one_micro_batch_per_rank():
    """auto: hdp × min(C, max context) tokens; a step holds more than that minus one max context."""
    from planner.api import PlanRequest, build_cost_model, make_batches, step_tokens

    tiny = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, lengths=str(EXAMPLE), max_context_tokens=4 * K)
    assert tiny.tokens_per_step is None and step_tokens(tiny) == 4 * 4 * K  # C (163K) > the context
    (batch,) = make_batches(tiny)
    assert 3 * 4 * K < batch.total_tokens <= 4 * 4 * K
    big = PlanRequest()  # LLaMA-7B on 64 H100s at 2M context: C < the context
    cm = build_cost_model(big)
    assert step_tokens(big, cm) == 64 * cm.capacity_tokens and 2 * M < step_tokens(big, cm) < 32 * M
    assert step_tokens(PlanRequest(tokens_per_step=32 * M), cm) == 32 * M  # an explicit budget is kept
    small = PlanRequest(gpus=8, max_context_tokens=2 * M, capacity_tokens=1000, recompute="full")
    assert step_tokens(small) == 2 * M  # never less than one max-context sequence


def test_plan_records_the_budget_and_the_cli_says_when_a_file_repeats(tmp_path, monkeypatch, capsys):
    from cli import app

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        app(["plan", "--model", "tiny", "--cluster", "local-cpu", "--gpus", "4", "--lengths", str(EXAMPLE),
             "--max-context", "4K", "--steps", "5", "--compare", "hdp", "--strategy", "hdp", "--out", "p.json"],
            prog_name="meshplan")
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert exit_.value.code in (0, None), err
    assert "lengths.txt holds 64 documents / 54,232 tokens; 5 steps of up to 16,384 tokens take" in err, err
    assert "so the recording repeats from the start" in err
    import json

    assert json.loads((tmp_path / "p.json").read_text())["meta"]["options"]["tokens_per_step"] == 16 * K
