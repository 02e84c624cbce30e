"""Pipeline schedules: validity, closed-form bubbles, slicing imbalance and redistribution."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel.slicing import mirror_exchange_bytes, mirror_exchange_exposed_s, stages_inter_node
from planner.api import PlanRequest, build_cost_model
from planner.workload import GlobalBatch
from planner.schedule import (PipeOp, ScheduleError, check_schedule, closed_form_bubble, dependency, group_size,
                              mirror_chunks, mirror_pairs, run_ops, simulate_uniform, stage_ops)
from planner.plan import Mesh, Piece, Plan, PlanError, Predicted, Sequence, Step, Unit, validate, zigzag_tokens_per_rank
from planner.simulate import simulate_step
from planner.strategies import STRATEGIES, PlanOptions
from planner.strategies.hdp import chunk_candidates


@pytest.mark.parametrize("p,m,n,v", [(2, 1, 1, 1), (4, 8, 1, 1), (8, 16, 1, 1), (4, 8, 1, 2), (8, 16, 1, 4),
                                     (4, 8, 4, 1), (8, 4, 16, 1), (8, 16, 16, 1), (3, 5, 7, 1), (16, 32, 1, 1),
                                     # sliced and interleaved (SlimPipe): n·v slice-chunks per micro-batch
                                     (8, 16, 16, 5), (8, 4, 16, 5), (8, 4, 32, 5), (4, 8, 4, 2), (3, 5, 7, 2),
                                     (8, 4, 4, 2), (16, 8, 32, 5)])
def test_schedules_valid_and_bubbles_match_closed_forms(p, m, n, v):
    check_schedule(p, [n] * m, v)
    _, bubble = simulate_uniform(p, m, n, v)
    assert bubble == pytest.approx(closed_form_bubble(p, m, n, v), rel=0.01)


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


def test_out_of_order_list_is_a_deadlock():
    lists = {("a", 0): [("x", PipeOp("F", 0)), ("y", PipeOp("F", 1))],
             ("b", 0): [("y", PipeOp("F", 1)), ("x", PipeOp("F", 0))]}
    with pytest.raises(ScheduleError, match="deadlock"):
        run_ops(lists, lambda k: None, lambda k: 1.0, lambda k: 0.0)


def test_uniform_slices_imbalance_and_redistribution():
    # SlimPipe Fig. 3 setting: p = 8, m = 4, n = 16. Uniform token slices of attention-bound work cost
    # (2j + 1)/n; every stage inherits the costliest slice in flight, so the bubble exceeds the closed
    # form. Mirror pairing moves whole K/V chunks between the ops of a schedule step: it removes part
    # of that bubble (paired by schedule position, the ops are not exactly simultaneous in the event
    # simulation); evened slices are the bound.
    p, m, n = 8, 4, 16
    _, even = simulate_uniform(p, m, n)
    _, uneven = simulate_uniform(p, m, n, attn_share=1.0)
    _, paired = simulate_uniform(p, m, n, attn_share=1.0, redistribute=True)
    _, clipped = simulate_uniform(p, m, n, attn_share=1.0, redistribute=True, max_chunks=2)
    _, off = simulate_uniform(p, m, n, attn_share=1.0, redistribute=True, max_chunks=0)
    assert even == pytest.approx(closed_form_bubble(p, m, n), rel=0.01)
    assert uneven > 1.5 * even
    assert even < paired < clipped < uneven  # a threshold leaves part of the imbalance
    assert off == pytest.approx(uneven)
    # with interleaving too (SlimPipe n = 16, v = 5)
    _, uneven5 = simulate_uniform(p, m, n, 5, attn_share=1.0)
    _, paired5 = simulate_uniform(p, m, n, 5, attn_share=1.0, redistribute=True)
    assert closed_form_bubble(p, m, n, 5) < paired5 < 0.5 * uneven5


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


def test_mirror_exchange_bytes_and_exposure_by_hand():
    cm = _pp_cost_model()  # llama-7b: h = 4096, 32 heads, h_kv = 1024 (GQA 8), bf16, tp = 1
    q, lse, kv = 1000 * 4096 * 2, 1000 * 32 * 4, 3 * 1000 * 2 * 1024 * 2
    assert mirror_exchange_bytes(1000, 3, cm.model, 1, 2, "F") == (q + kv, q + lse)
    assert mirror_exchange_bytes(1000, 3, cm.model, 1, 2, "B") == (3 * q + lse + kv, q + kv)
    # the light partner waits for its input beyond its own attention; the heavy one then waits for the
    # borrowed result: ready at max(1, 0.5) + 1.5 + 0.5 = 3 while it kept 4 − 1.5 = 2.5
    assert mirror_exchange_exposed_s(1.0, 0.5, 4.0, 0.5, 1.5) == pytest.approx((0.5, 0.5))
    assert mirror_exchange_exposed_s(0.1, 0.1, 4.0, 2.0, 0.9) == (0.0, 0.0)  # hidden under attention
    # 64 GPUs, pp 4: 16 HDP ranks of 1 GPU per stage, 8 GPUs a node: stages are 2 nodes apart
    assert stages_inter_node(cm.setup, 0, 1, 0) and not stages_inter_node(cm.setup, 1, 1, 3)


def _cp_step(cm, s: int, m: int, slices: int, schedule: str, v: int = 1, **section) -> Step:
    """m micro-batches of one s-token sequence, each sharded over every HDP rank."""
    hdp = cm.setup.hdp
    units = [Unit(id=i, hdp_ranks=tuple(range(hdp)), pieces=(Piece(i, 0, s),), slices=slices,
                  tokens_per_rank=zigzag_tokens_per_rank([s], hdp)) for i in range(m)]
    return Step(step=0, global_tokens=s * m, sequences=[Sequence(i, s) for i in range(m)], units=units,
                order={r: list(range(m)) for r in range(hdp)}, predicted=Predicted(0.0, 0.0, [0.0] * hdp, [0.0] * hdp),
                pipeline={"schedule": schedule, "v": v, **section})


def test_redistribution_moves_work_and_pays_its_transfers():
    cm = _pp_cost_model()
    # 256K over 16 ranks in 32 slices and 2 chunks (512 tokens per rank and slice): the transfers show
    # (exposed seconds > 0) but paired ops, run as rendezvous, still shorten the step
    plain = simulate_step(_cp_step(cm, 262_144, 4, 32, "sliced", 2), cm)
    paired = simulate_step(_cp_step(cm, 262_144, 4, 32, "sliced-redistributed", 2), cm)
    assert paired.step_time_s < 0.99 * plain.step_time_s
    assert paired.breakdown["pp_exchange"] > 0 and plain.breakdown["pp_exchange"] == 0
    off = simulate_step(_cp_step(cm, 262_144, 4, 32, "sliced-redistributed", 2, max_chunks=0), cm)
    assert off.step_time_s == pytest.approx(plain.step_time_s)
    # v = 1 (Seq1F1B warm-up): SlimPipe's pairing does not apply, nothing moves
    one = simulate_step(_cp_step(cm, 262_144, 4, 32, "sliced-redistributed"), cm)
    assert one.step_time_s == pytest.approx(simulate_step(_cp_step(cm, 262_144, 4, 32, "sliced"), cm).step_time_s)
    # short slices across nodes: a chunk's attention is worth less than moving it, so nothing moves
    short_plain = simulate_step(_cp_step(cm, 16_384, 4, 16, "sliced", 2), cm)
    short = simulate_step(_cp_step(cm, 16_384, 4, 16, "sliced-redistributed", 2), cm)
    assert short.step_time_s == pytest.approx(short_plain.step_time_s)
    # sliced and interleaved plans simulate; memory shrinks with n·v as SlimPipe's formula says
    mem = {nv: max(simulate_step(_cp_step(cm, 1_048_576, 4, *nv[:1], "sliced", nv[1]), cm).peak_memory_bytes)
           for nv in ((16, 1), (16, 2), (16, 4))}
    assert mem[(16, 4)] < mem[(16, 2)] <= mem[(16, 1)]


def _pp_cost_model():
    return build_cost_model(PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=64, tp=1, pp=4,
                                        capacity_tokens=8192, recompute="none"))


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(500, 60_000), min_size=1, max_size=30), seed=st.integers(0, 3))
def test_redistribution_never_increases_simulated_time(lengths, seed):
    # The planner keeps redistribution for a step only where it does not slow it down.
    cm = _pp_cost_model()
    a = np.asarray(lengths, dtype=np.int64)
    b = GlobalBatch(step=0, lengths_tokens=a, seq_ids=np.arange(len(a), dtype=np.int64),
                    max_context_tokens=int(a.max()), split_documents=0, source="t")
    step = STRATEGIES["hdp"](b, cm, PlanOptions(pp_schedule="sliced-redistributed", seed=seed))
    chosen = simulate_step(step, cm).step_time_s
    assert chosen == pytest.approx(step.predicted.step_time_s)
    plain = simulate_step(dataclasses.replace(step, pipeline={**step.pipeline, "schedule": "sliced"}), cm).step_time_s
    assert chosen <= plain * (1 + 1e-9)


def test_sliced_plans_slice_long_sequences_only_and_fit_memory():
    cm = _pp_cost_model()
    a = np.array([200_000, 60_000] + [1500] * 200, dtype=np.int64)
    b = GlobalBatch(step=0, lengths_tokens=a, seq_ids=np.arange(len(a), dtype=np.int64),
                    max_context_tokens=int(a.max()), split_documents=0, source="t")
    step = STRATEGIES["hdp"](b, cm, PlanOptions())
    long_units = [u for u in step.units if u.tokens > cm.capacity_tokens]
    assert any(u.slices > 1 for u in long_units)
    assert step.pipeline["schedule"] in ("sliced-redistributed", "sliced")
    one = STRATEGIES["hdp"](b, cm, PlanOptions(pp_schedule="1f1b"))
    assert all(u.slices == 1 for u in one.units)
    # slicing lets a long sequence use fewer ranks than unsliced 1F1B needs
    deg = {u.pieces[0].seq: u.degree for u in step.units if u.degree > 1}
    deg1 = {u.pieces[0].seq: u.degree for u in one.units if u.degree > 1}
    assert deg.get(0, 1) <= deg1.get(0, 1)
    sim = simulate_step(step, cm)
    assert max(sim.peak_memory_bytes) <= cm.setup.cluster.gpu_memory_bytes


def _batch(lengths) -> GlobalBatch:
    a = np.asarray(lengths, dtype=np.int64)
    return GlobalBatch(step=0, lengths_tokens=a, seq_ids=np.arange(len(a), dtype=np.int64),
                       max_context_tokens=int(a.max()), split_documents=0, source="t")


def test_chunk_candidates_divide_the_stage():
    assert chunk_candidates(5) == [1, 5] and chunk_candidates(8) == [1, 2, 4, 8]
    assert chunk_candidates(20) == [1, 2, 4, 5] and chunk_candidates(1) == [1]
    assert chunk_candidates(8, pinned=2) == [2]
    with pytest.raises(PlanError, match="must divide"):
        chunk_candidates(8, pinned=3)


@pytest.mark.parametrize("lengths", [[60_000, 30_000, 20_000, 9000] + [3000] * 50,
                                     [200_000, 60_000] + [1500] * 200])
def test_pp_balance_keeps_the_fastest_chunking_that_fits(lengths):
    cm = _pp_cost_model()
    b = _batch(lengths)
    auto = STRATEGIES["hdp"](b, cm, PlanOptions())
    pinned = {v: STRATEGIES["hdp"](b, cm, PlanOptions(pp_v=v)) for v in chunk_candidates(cm.layers_per_stage)}
    fits = {v: s for v, s in pinned.items() if max(s.predicted.peak_memory_bytes) <= cm.budget.hbm_bytes}
    best = min(fits.values(), key=lambda s: s.predicted.step_time_s) if fits else pinned[1]
    assert auto.pipeline["v"] == best.pipeline["v"]
    assert auto.predicted.step_time_s == pytest.approx(best.predicted.step_time_s)
    validate(Plan(meta={"capacity_tokens": cm.capacity_tokens, "layers_per_stage": cm.layers_per_stage},
                  mesh=Mesh(cm.setup.cluster.world_size, cm.tp, cm.pp, cm.setup.hdp), steps=[auto]))
    assert simulate_step(auto, cm).step_time_s == pytest.approx(auto.predicted.step_time_s)


def test_rendezvous_pairs_start_together_and_heavy_waits_for_light():
    lists = {"a": [("h0", PipeOp("F", 0)), ("h", PipeOp("F", 1))], "b": [("l", PipeOp("F", 1))]}
    dur = {"h0": 2.0, "h": 1.0, "l": 3.0}
    runs = {r.key: r for r in run_ops(lists, lambda k: None, dur.__getitem__, lambda k: 0.0, pairs=[("h", "l")])}
    assert runs["h"].start_s == runs["l"].start_s == 2.0  # the light op waits for its partner
    assert runs["h"].end_s == runs["l"].end_s == 5.0  # the heavy one merges the light one's result
    # a pair that cannot meet (each waits on the other through the schedule) runs alone, solo-timed
    lists = {"a": [("x", PipeOp("F", 0)), ("y", PipeOp("F", 1))], "b": [("z", PipeOp("F", 0))]}
    broken = []
    runs = {r.key: r for r in run_ops(lists, lambda k: "y" if k == "z" else None, lambda k: 1.0, lambda k: 0.0,
                                      pairs=[("x", "z")], solo=lambda k: 2.0, broken=broken)}
    assert broken == ["x"] and runs["z"].start_s == runs["y"].end_s == 3.0 and runs["z"].end_s == 5.0


def test_mirror_pairing_with_rendezvous_what_limits_the_removal():
    # SlimPipe's pairs exchange Q/O and K/V layer by layer, so paired ops run together (a rendezvous).
    p, m, n = 8, 4, 16
    # 1) The lockstep itself is free: with even slices, forcing every pair of the SlimPipe schedule
    #    (v = 5: warm-up n·v + 2(p − r − 1)) to start together leaves the closed-form bubble.
    v = 5
    lists = {(0, s): [((s, op), op) for op in stage_ops(p, s, [n] * m, v)] for s in range(p)}
    pairs = mirror_pairs([[op for _, op in lists[(0, s)]] for s in range(p)], lambda s, op: 1.0)
    broken = []
    runs = run_ops(lists, lambda k: dependency(k[1], k[0], p, v, n - 1), lambda k: (1.0 if k[1].kind == "F" else 2.0),
                   lambda k: 0.0, pairs=pairs, broken=broken)
    total = max(r.end_s for r in runs)
    busy0 = sum(r.end_s - r.start_s for r in runs if (0, 0) in r.resources)
    assert not broken and 1 - busy0 / total == pytest.approx(closed_form_bubble(p, m, n, v), rel=1e-6)
    # 2) With uneven (attention-bound) slices the rendezvous keeps each pair's residual (whole chunks:
    #    an odd slice gap leaves half a chunk, a gap of 1 moves nothing) and the unequal pair sums of
    #    steps that wrap across a micro-batch or slice group; free-running ops smooth them over time,
    #    so the free model is optimistic: 0.102 vs 0.067 (closed form 0.021).
    free = simulate_uniform(p, m, n, v, attn_share=1.0, redistribute=True)[1]
    rdv = simulate_uniform(p, m, n, v, attn_share=1.0, redistribute=True, rendezvous=True)[1]
    uneven = simulate_uniform(p, m, n, v, attn_share=1.0)[1]
    assert free == pytest.approx(0.0675, abs=2e-3) and rdv == pytest.approx(0.102, abs=3e-3)
    assert closed_form_bubble(p, m, n, v) < free < rdv < uneven
    # 3) v = 1 uses Seq1F1B's warm-up (n + p − r − 2), not SlimPipe's (n + 2(p − r − 1)): forward pairs
    #    (stage r at position t − r) then lie p − 1 − 2r iterations apart and cannot meet their backward
    #    pairs, so the rendezvous breaks pairs and is worse than no pairing.
    lists1 = {(0, s): [((s, op), op) for op in stage_ops(p, s, [n] * m)] for s in range(p)}
    pairs1 = mirror_pairs([[op for _, op in lists1[(0, s)]] for s in range(p)], lambda s, op: float(op.slice))
    broken1 = []
    run_ops(lists1, lambda k: dependency(k[1], k[0], p, 1, n - 1), lambda k: 1.0, lambda k: 0.0, pairs=pairs1,
            broken=broken1)
    assert broken1
    assert (simulate_uniform(p, m, n, attn_share=1.0, redistribute=True, rendezvous=True)[1]
            > simulate_uniform(p, m, n, attn_share=1.0)[1])
