"""Pipeline op lists: validity of every schedule (1F1B, interleaved, sliced, mixed), SlimPipe's
groups and warm-up, and mirror pairing on one pipeline."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.schedule import (check_schedule, chunk_gradient_shares, chunk_last_backwards, dependency, group_size,
                              mirror_chunks, mirror_pairs, run_ops, slice_attention_share, slice_share, stage_ops)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 6), slices=st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_mixed_slice_counts_give_valid_schedules(p, slices):
    check_schedule(p, slices)
    for s in range(p):  # forward slices in order, backward reversed, each op once
        ops = stage_ops(p, s, slices)
        assert len(ops) == 2 * sum(slices)


def test_interleaved_slices_run_in_groups_with_slimpipe_warmup():
    assert [group_size(n, p) for n, p in ((16, 8), (16, 5), (7, 3), (64, 16), (12, 5))] == [8, 8, 7, 16, 6]
    p, m, n, v = 4, 3, 6, 2
    for r in range(p):
        ops = stage_ops(p, r, [n] * m, v)
        first_b = next(i for i, op in enumerate(ops) if op.kind == "B")
        assert first_b == n * v + 2 * (p - r - 1)  # SlimPipe: n·v + 2(p − r − 1) slice-chunks in flight
    fwd = [(op.slice, op.chunk) for op in stage_ops(p, 0, [n] * m, v) if op.kind == "F" and op.mb == 0]
    assert fwd == [(j, c) for c in range(v) for j in range(6)]  # one group of 6 (smallest divisor ≥ 4)
    fwd8 = [(op.slice, op.chunk) for op in stage_ops(p, 0, [8], v) if op.kind == "F"]
    assert fwd8[:8] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]  # groups of 4
    bwd8 = [(op.slice, op.chunk) for op in stage_ops(p, 0, [8], v) if op.kind == "B"]
    assert bwd8[:8] == [(7, 1), (6, 1), (5, 1), (4, 1), (7, 0), (6, 0), (5, 0), (4, 0)]  # reversed per chunk
    # Megatron (n = 1): 2(p − r − 1) + (v − 1)p + 1 chunks in flight
    assert next(i for i, op in enumerate(stage_ops(4, 1, [1] * 8, 3)) if op.kind == "B") == 2 * 2 + 2 * 4 + 1


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 6), v=st.integers(2, 4), slices=st.lists(st.sampled_from([1, 1, 2, 3, 4, 6, 8, 12]), min_size=1,
                                                                  max_size=9),
       weights=st.none() | st.lists(st.sampled_from([0.1, 0.5, 1.0, 4.0]), min_size=9, max_size=9),
       seed=st.integers(0, 10**6))
def test_mixed_interleaved_schedules_are_valid(p, v, slices, weights, seed):
    # some micro-batches sliced, some not, with v chunks; token-weighted budgets let the last stage pause
    check_schedule(p, slices, v)
    w = None if weights is None else weights[:len(slices)]
    lists = {(0, s): [((s, op), op) for op in stage_ops(p, s, slices, v, weights=w)] for s in range(p)}
    rng = np.random.default_rng(seed)
    times = {key: float(rng.uniform(0.1, 2.0)) for ops in lists.values() for key, _ in ops}
    last = {mb: n - 1 for mb, n in enumerate(slices)}
    run_ops(lists, lambda key: dependency(key[1], key[0], p, v, last[key[1].mb]), times.__getitem__, lambda key: 0.0)


def test_mirror_pairs_balance_a_contiguous_run():
    # one micro-batch of 8 slices on 4 stages: in a steady forward step the stages hold slices j+3, j+2,
    # j+1, j (stage 0 leads); pairs are (j+3, j) and (j+2, j+1), heavy first, all with the same sum.
    p, n = 4, 8
    lists = [stage_ops(p, s, [n]) for s in range(p)]
    pairs = mirror_pairs(lists, lambda s, op: float(2 * op.slice + 1))
    fwd = [(hi, lo) for hi, lo in pairs if hi[1].kind == "F"]
    assert len(fwd) == 2 * (n - p + 1)  # fill and drain steps (some stage idle) are left alone
    for (sh, hi), (sl, lo) in fwd:
        assert hi.slice > lo.slice and sh < sl
    sums = {}
    for (sh, hi), (sl, lo) in fwd:
        sums.setdefault(hi.slice + sh, set()).add(hi.slice + lo.slice)  # slice + stage = the step
    assert all(len(s) == 1 for s in sums.values())
    assert {(hi[1].slice - lo[1].slice) for hi, lo in fwd} == {3, 1}
    # ops that cannot move (None) stay out
    assert mirror_pairs(lists, lambda s, op: None) == []
    assert mirror_chunks(7.0, 1.0, 1.0, 100) == 3 and mirror_chunks(7.0, 1.0, 1.0, 2) == 2
    assert mirror_chunks(1.0, 7.0, 1.0, 100) == 0


def test_chunk_last_backwards_are_the_windows_each_chunks_gradients_reduce_under():
    # interleaved, p = 2, v = 2, 4 micro-batches of 1 s forward / 2 s backward per stage (0.5 / 1 s per chunk): the
    # step ends on stage 0 with chunk 0's last backward; chunk 1's last backward there ran 3 ops earlier
    p, v = 2, 2
    lists = {s: [((s, op), op) for op in stage_ops(p, s, [1] * 4, v)] for s in range(p)}
    runs = run_ops(lists, lambda k: dependency(k[1], k[0], p, v, 0), lambda k: 0.5 if k[1].kind == "F" else 1.0,
                   lambda k: 0.0)
    windows = sorted(chunk_last_backwards(runs), key=lambda w: w[1])
    assert len(windows) == v and windows[-1] == (-1.0, 0.0)
    assert windows[0][1] - windows[0][0] == 1.0 and windows[0][1] <= -1.0  # ended before the last one started
    one = [((0, op), op) for op in stage_ops(1, 0, [1] * 3, 1)]
    flat = run_ops({0: one}, lambda k: None, lambda k: 1.0 if k[1].kind == "F" else 2.0, lambda k: 0.0)
    assert chunk_last_backwards(flat) == [(-2.0, 0.0)]  # 1F1B: the last backward alone
    assert chunk_last_backwards([]) == [(0.0, 0.0)]
    # in chunk order, with each chunk's share of its stage's gradients: stage 0 ends the step, its chunk 0 holds a
    # quarter of the stage's parameters and chunk 1 three quarters (stage 1's counts do not matter)
    assert chunk_last_backwards(runs)[0] == (-1.0, 0.0)  # chunk 0 ends the step
    assert chunk_gradient_shares(runs, [[1, 3], [2, 2]]) == [0.25, 0.75]
    assert chunk_gradient_shares(runs, [[0, 0], [2, 2]]) == [0.5, 0.5] and chunk_gradient_shares([], [[1]]) == [1.0]


@pytest.mark.parametrize("n", [1, 2, 4, 7])
@pytest.mark.parametrize("r", [0.9, 1.0, 1.14, 2.0, 3.0])
def test_a_slices_attention_is_its_own_causal_block_and_one_full_block_per_cached_slice(n, r):
    shares = [slice_attention_share(j, n, r) for j in range(n)]
    assert sum(shares) == pytest.approx(1.0)
    # each cached slice adds one full block, r times the own causal block
    assert all(b - a == pytest.approx(r * shares[0]) for a, b in zip(shares, shares[1:]))
    if r == 2.0:  # equal rates per FLOP: the causal area's (2j + 1)/n² [REFERENCE §6]
        assert shares == pytest.approx([(2 * j + 1) / n**2 for j in range(n)])
    if r == 1.0:  # a block costs the same with or without the mask (an unfused kernel; a K/V source's host work)
        assert shares == pytest.approx([(j + 1) / (n * (n + 1) / 2) for j in range(n)])
    assert sum(slice_share(j, n, 0.25, r) for j in range(n)) == pytest.approx(1.0)
    assert slice_share(0, n, 0.25, r) == pytest.approx(0.75 / n + 0.25 * shares[0])
