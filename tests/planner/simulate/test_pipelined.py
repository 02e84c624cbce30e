"""Pipelined step simulation: mirror pairing's exchange, what redistribution moves and what it costs."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel.slicing import mirror_exchange_bytes, mirror_exchange_exposed_s
from planner.api import PlanRequest, build_cost_model
from planner.plan import Piece, PipelineSection, Predicted, Sequence, Step, Unit, zigzag_tokens_per_rank
from planner.simulate import simulate_step
from planner.strategies import STRATEGIES, HdpOptions, PlanOptions
from planner.workload import GlobalBatch


def _pp_cost_model():
    return build_cost_model(PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=64, tp=1, pp=4,
                                        capacity_tokens=8192, recompute="none"))


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
    assert cm.setup.mesh.stages_in_different_domains(0, 1, 0)
    assert not cm.setup.mesh.stages_in_different_domains(1, 1, 3)


def _cp_step(cm, s: int, m: int, slices: int, schedule: str, v: int = 1, **section) -> Step:
    """m micro-batches of one s-token sequence, each sharded over every HDP rank."""
    hdp = cm.setup.hdp
    units = [Unit(id=i, hdp_ranks=tuple(range(hdp)), pieces=(Piece(i, 0, s),), slices=slices,
                  tokens_per_rank=zigzag_tokens_per_rank([s], hdp)) for i in range(m)]
    return Step(step=0, global_tokens=s * m, sequences=[Sequence(i, s) for i in range(m)], units=units,
                order={r: list(range(m)) for r in range(hdp)}, predicted=Predicted(0.0, 0.0, [0.0] * hdp, [0.0] * hdp),
                pipeline=PipelineSection(schedule, v, **section))


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


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(500, 60_000), min_size=1, max_size=30), seed=st.integers(0, 3))
def test_redistribution_never_increases_simulated_time(lengths, seed):
    # The planner keeps redistribution for a step only where it does not slow it down.
    cm = _pp_cost_model()
    a = np.asarray(lengths, dtype=np.int64)
    b = GlobalBatch(step=0, lengths_tokens=a, seq_ids=np.arange(len(a), dtype=np.int64),
                    max_context_tokens=int(a.max()), split_documents=0, source="t")
    step = STRATEGIES["hdp"](b, cm, PlanOptions(seed=seed, hdp=HdpOptions(pp_schedule="sliced-redistributed")))
    chosen = simulate_step(step, cm).step_time_s
    assert chosen == pytest.approx(step.predicted.step_time_s)
    plain_section = dataclasses.replace(step.pipeline, schedule="sliced")
    plain = simulate_step(dataclasses.replace(step, pipeline=plain_section), cm).step_time_s
    assert chosen <= plain * (1 + 1e-9)


def test_interleaved_chunks_reduce_their_gradients_as_their_last_backward_ends():
    # overlap_grad_reduce, v = 2: the chunk whose last backward ends first starts its reduce-scatter then, not
    # after the step's last backward (Megatron-core DDP's buckets per model chunk; the validation prices it the same)
    cm = build_cost_model(PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=64, tp=1, pp=4, capacity_tokens=8192,
                                      recompute="none", overlap_grad_reduce=True))
    sim = simulate_step(_cp_step(cm, 8192, 8, 1, "interleaved", 2), cm)
    hdp = cm.setup.hdp
    end = max(o.end_s for o in sim.ops)
    last = max((o for o in sim.ops if o.kind.startswith("bwd")), key=lambda o: o.end_s)
    windows = {}
    for o in sim.ops:
        if o.stage == last.stage and o.kind.startswith("bwd"):
            c = o.kind.split(" c")[1]
            if o.end_s - end >= windows.get(c, (0.0, -np.inf))[1]:
                windows[c] = (o.start_s - end, o.end_s - end)
    assert len(windows) == 2
    assert sim.breakdown["grad_sync"] == pytest.approx(cm.exposed_chunked_grad_sync_s(hdp, list(windows.values())))
    one_window = cm.exposed_grad_sync_s(hdp, last.end_s - last.start_s)
    assert sim.breakdown["grad_sync"] < one_window < cm.grad_sync_s(hdp)


def test_a_sliced_op_runs_the_rest_of_its_pass_once_per_slice_at_the_slices_tokens():
    """SlimPipe's slices keep the unit's causal attention area but run every other kernel once per slice, at the
    slice's tokens: a stage's slices of a unit add up to its attention plus n times the rest of one slice's pass,
    which per-call floors and small-m GEMM rates make more than the whole unit's (the replay's 4 slices of a
    2,899-token unit ran 1.23x its whole time on a CPU)."""
    from planner.simulate.pipelined import sliced_pass_s
    from planner.simulate.step import slice_costs, unit_costs

    cm = _pp_cost_model()
    step = _cp_step(cm, 8192, 4, 4, "sliced")
    sim = simulate_step(step, cm)
    whole, one = unit_costs(step, cm)[0][0], slice_costs(step, cm)[0][0]
    assert one.tokens_per_rank == whole.tokens_per_rank // 4
    fwd = [o.end_s - o.start_s for o in sim.ops if o.unit == 0 and o.stage == 0 and o.kind.startswith("fwd")]
    assert len(fwd) == 4 and sum(fwd) == pytest.approx(sliced_pass_s(whole, one, 4, True))
    rest = whole.fwd_s - whole.attn_fwd_compute_s
    assert sum(fwd) == pytest.approx(whole.attn_fwd_compute_s + 4 * (one.fwd_s - one.attn_fwd_compute_s))
    assert sum(fwd) > whole.attn_fwd_compute_s + rest  # the slices' floors and smaller GEMMs
    assert sliced_pass_s(whole, one, 1, False) == whole.bwd_s and slice_costs(_cp_step(cm, 8192, 4, 1, "1f1b"),
                                                                               cm) is None


def test_a_slices_attention_is_its_own_causal_block_and_a_full_block_per_cached_slice():
    """Slice j of n runs its own causal block and j full blocks of the cached slices' K/V, each at its kernel's rate
    (CostModel.slice_full_over_causal: the attention table's non-causal rows over its causal ones at the slice's
    length). The H100 profile's forward rates are FlashAttention's published causal and non-causal ones, slower
    per FLOP causal at 2,048 tokens, so the first slices take more than the causal area's (2j + 1)/n²; its backward
    has one rate per FLOP: (2j + 1)/n². The slices still add up to the pass (sliced_pass_s)."""
    from planner.simulate.pipelined import sliced_pass_s
    from planner.simulate.step import slice_costs, unit_costs

    cm = _pp_cost_model()
    n = 4
    step = _cp_step(cm, 8192, 1, n, "sliced")
    r_f, r_b = (cm.slice_full_over_causal([8192 // n], way) for way in ("fwd", "bwd"))
    assert 1.0 < r_f < 1.9 and r_b == pytest.approx(2.0)
    sim = simulate_step(step, cm)
    whole, one = unit_costs(step, cm)[0][0], slice_costs(step, cm)[0][0]
    for kind, r, attn in (("fwd", r_f, whole.attn_fwd_compute_s), ("bwd", r_b, whole.attn_bwd_compute_s)):
        took = {int(o.kind.split(" s")[1]): o.end_s - o.start_s for o in sim.ops
                if o.unit == 0 and o.stage == 0 and o.kind.startswith(kind)}
        d = [took[j] for j in range(n)]
        assert sum(d) == pytest.approx(sliced_pass_s(whole, one, n, kind == "fwd"))
        step_up = [b - a for a, b in zip(d, d[1:])]  # one more full block per slice
        assert step_up == pytest.approx([attn * r / (n + n * (n - 1) / 2 * r)] * (n - 1))
        rest = (sum(d) - attn) / n
        assert (d[0] - rest) == pytest.approx(attn / (n + n * (n - 1) / 2 * r))  # the own causal block
    assert (took[n - 1] - rest) / (took[0] - rest) == pytest.approx(2 * n - 1)  # backward: (2j + 1)/n²
    unfused = build_cost_model(PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=64, pp=4, capacity_tokens=8192,
                                           recompute="none", attention_kernel="unfused"))
    assert unfused.slice_full_over_causal([2048], "fwd") == 1.0  # the whole square computed either way


def test_a_sliced_units_stage_is_predicted_as_its_slices_run_it():
    """What `meshplan simulate --measured` and the calibration fit compare a replayed stage with: its slices' time
    (sliced_pass_s over both directions), the whole unit's price when unsliced."""
    from planner.simulate.measured import predicted_units_s
    from planner.simulate.pipelined import sliced_pass_s
    from planner.simulate.step import slice_costs, unit_costs

    cm = _pp_cost_model()
    step = _cp_step(cm, 8192, 4, 4, "sliced")
    got, costs, one = predicted_units_s(step, cm), unit_costs(step, cm), slice_costs(step, cm)
    for s in range(cm.pp):
        k = 1 if s == cm.pp - 1 else 0
        want = sum(sliced_pass_s(costs[0][k], one[0][k], 4, f) for f in (True, False))
        assert got[(0, s)] == pytest.approx(want) and want > costs[0][k].total_s
    plain = _cp_step(cm, 8192, 4, 1, "1f1b")
    assert predicted_units_s(plain, cm)[(0, 0)] == pytest.approx(unit_costs(plain, cm)[0][0].total_s)
