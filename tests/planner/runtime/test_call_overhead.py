"""The executor's cost per attention call (planner/runtime/call_overhead.py): what PackedAttention spends on a
packed bin's documents beyond the attention table's SDPA calls, and what the cost model does with it."""

import pytest
import torch

from costmodel.specs import Setup, TrainingSpec
from costmodel.timing import CostModel
from planner.api import load_cluster, load_model
from planner.runtime.call_overhead import DOC_TOKENS, DOCS, attention_call_overhead
from profiles.table import load_profile


def test_packed_attention_costs_more_per_document_than_the_tables_calls():
    """The runtime path does the table's SDPA calls plus a split, views and a cat each way: a positive cost per
    call, far below a millisecond on any CPU; the constant says what it was measured on."""
    threads = torch.get_num_threads()
    c = attention_call_overhead(4, 2, 16, rounds=10)
    assert torch.get_num_threads() == threads
    assert c["unit"] == "s" and 0 < c["value"] < 1e-3
    assert f"{DOCS} documents of {DOC_TOKENS} tokens (4/2 heads, head dim 16)" in c["source"]


def test_cost_model_charges_it_per_document_each_way():
    """A packed unit of n documents costs n x the constant more per layer in the forward and in the backward (one
    process per core: share 1)."""
    p = load_profile("local-cpu.measured")
    p.constants.pop("attn_call_overhead_s", None)
    setup = Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(1))
    base = CostModel(setup, p)
    p.constants["attn_call_overhead_s"] = {"value": 20e-6, "unit": "s", "source": "test"}
    with_call = CostModel(setup, p)
    docs = [16] * 10
    a, b = base.unit_cost(docs), with_call.unit_cost(docs)
    layers = base.layers_per_stage
    assert b.fwd_s - a.fwd_s == pytest.approx(10 * layers * 20e-6 * with_call.compute_share, rel=1e-6)
    assert b.bwd_s - a.bwd_s == pytest.approx(10 * layers * 20e-6 * with_call.compute_share, rel=1e-6)


def test_a_sliced_units_sources_cost_more_than_the_tables_blocks():
    """SlicedAttention per K/V source beyond the table's SDPA calls on the same blocks, forward and backward: a fixed
    part and one per token and head, none below 0, below 10 ms a source at the longer slice on any CPU; the
    constants name the slice lengths."""
    from planner.runtime.call_overhead import SOURCE_SLICES, SOURCE_TOKENS, attention_source_overhead

    got = attention_source_overhead(4, 2, 16, rounds=8)
    for way in ("fwd", "bwd"):
        fixed, per = got[f"attn_source_{way}_s"], got[f"attn_source_token_{way}_s"]
        assert fixed["unit"] == "s" and per["unit"] == "s/(token·head)"
        assert fixed["value"] >= 0 and per["value"] >= 0
        assert fixed["value"] + per["value"] * SOURCE_TOKENS[1] * 4 < 1e-2
        assert f"{SOURCE_SLICES} slices" in fixed["source"]
        assert f"at {SOURCE_TOKENS[0]} and {SOURCE_TOKENS[1]} tokens a slice" in fixed["source"]


def test_cost_model_charges_each_source_of_a_sliced_unit():
    """n slices make n(n + 1)/2 sources a layer and member, forward and backward: each the fixed part plus the part
    per token and head (times the compute share); one slice, or no constants: nothing. A sliced stage op carries
    them with its attention; a sliced CP unit's ring steps, which its whole price carries, are taken back out (the
    executor runs its attention as sources)."""
    from planner.plan import Piece, PipelineSection, Predicted, Sequence, Step, Unit
    from planner.simulate import simulate_step
    from planner.simulate.pipelined import slice_sources_s
    from planner.simulate.step import unit_costs

    p = load_profile("local-cpu.measured")
    for k in list(p.constants):
        if k.startswith(("attn_source", "attn_ring_step")):
            del p.constants[k]
    setup = Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(4), TrainingSpec(dtype="fp32", pp=2))
    base = CostModel(setup, p, compute_share=1.0)
    consts = {"attn_source_fwd_s": 2e-4, "attn_source_token_fwd_s": 1e-7, "attn_source_bwd_s": 1e-4,
              "attn_source_token_bwd_s": 2e-7, "attn_ring_step_fwd_s": 5e-5, "attn_ring_step_bwd_s": 6e-5}
    for k, v in consts.items():
        p.constants[k] = {"value": v, "unit": "s", "source": "test"}
    cm = CostModel(setup, p, compute_share=1.0)
    heads = cm.heads_per_rank
    assert base.slice_sources_s(725, 4, "fwd") == 0.0 and cm.slice_sources_s(725, 1, "fwd") == 0.0
    assert cm.slice_sources_s(725, 4, "fwd") == pytest.approx(10 * (2e-4 + 1e-7 * 725 * heads))
    assert cm.slice_sources_s(725, 4, "bwd") == pytest.approx(10 * (1e-4 + 2e-7 * 725 * heads))
    one = Unit(0, (0,), (Piece(0, 0, 2900),), slices=4)
    step = Step(0, 2900, [Sequence(0, 2900)], [one], {0: [0]}, Predicted(0.0, 0.0, [], []),
                pipeline=PipelineSection(schedule="sliced"))
    mid = unit_costs(step, cm)[0][0]
    layers = cm.layers_per_stage
    for f, way in ((True, "fwd"), (False, "bwd")):
        assert slice_sources_s(cm, mid, one, f) == pytest.approx(layers * cm.slice_sources_s(725, 4, way))

    def passes(model, s):
        ops = simulate_step(s, model).ops
        return [sum(o.end_s - o.start_s for o in ops if o.stage == 0 and o.kind.startswith(k)) for k in ("fwd", "bwd")]

    (f0, b0), (f1, b1) = passes(base, step), passes(cm, step)
    assert f1 - f0 == pytest.approx(slice_sources_s(cm, mid, one, True))
    assert b1 - b0 == pytest.approx(slice_sources_s(cm, mid, one, False))
    # two members (a sliced CP unit): each member's slices are sources; the ring steps its whole price has go
    two = Unit(0, (0, 1), (Piece(0, 0, 2900),), slices=4)
    mid2 = CostModel(setup, p, compute_share=1.0).unit_cost([2900], degree=2, with_head=False)
    assert slice_sources_s(cm, mid2, two, True) == pytest.approx(layers * 2 * (
        cm.slice_sources_s(mid2.tokens_per_rank / 4, 4, "fwd") - 5e-5))


def test_a_ring_step_costs_more_than_the_attention_it_is_priced_as():
    """RingAttention's host work per step beyond the SDPA calls the cost model prices: a fixed part and one per
    token and head, forward and backward, none below 0 (a CPU whose smaller block calls run faster than the priced
    ones may measure none) and below 10 ms a step at the longer length on any CPU."""
    from planner.runtime.call_overhead import RING_TOKENS, ring_step_overhead

    got = ring_step_overhead(4, 2, 16, rounds=8)
    for way in ("fwd", "bwd"):
        fixed, per = got[f"attn_ring_step_{way}_s"]["value"], got[f"attn_ring_step_token_{way}_s"]["value"]
        assert fixed >= 0 and per >= 0
        assert fixed + per * RING_TOKENS[1] * 4 < 1e-2
        assert f"at {RING_TOKENS[0]} and {RING_TOKENS[1]} tokens a member" in got[f"attn_ring_step_{way}_s"]["source"]


def test_cost_model_charges_each_ring_step_its_host_work():
    """A ring unit over d members runs d steps a layer and direction: each costs the fixed part plus the part per
    token and head a member holds (times the compute share), with the attention (a recompute replays it); packed and
    all-gather units pay none, nor does a profile without the constants."""
    def bare():  # the shipped profile without its own ring-step constants
        prof = load_profile("local-cpu.measured")
        for k in [k for k in prof.constants if k.startswith("attn_ring_step")]:
            del prof.constants[k]
        return prof

    p = bare()
    setup = Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(2), TrainingSpec(dtype="fp32"))
    base = CostModel(setup, p, compute_share=1.5)
    consts = {"attn_ring_step_fwd_s": 1e-4, "attn_ring_step_bwd_s": 2e-4, "attn_ring_step_token_fwd_s": 1e-7,
              "attn_ring_step_token_bwd_s": 3e-7}
    for k, v in consts.items():
        p.constants[k] = {"value": v, "unit": "s", "source": "test"}
    cm = CostModel(setup, p, compute_share=1.5)
    docs, layers, heads = [2900], cm.layers_per_stage, cm.heads_per_rank
    a, b = base.unit_cost(docs, degree=2), cm.unit_cost(docs, degree=2)
    tokens = a.tokens_per_rank
    assert b.attn_fwd_compute_s - a.attn_fwd_compute_s == pytest.approx(
        layers * 2 * 1.5 * (1e-4 + 1e-7 * tokens * heads))
    assert b.attn_bwd_compute_s - a.attn_bwd_compute_s == pytest.approx(
        layers * 2 * 1.5 * (2e-4 + 3e-7 * tokens * heads))
    assert b.fwd_compute_s - a.fwd_compute_s == pytest.approx(b.attn_fwd_compute_s - a.attn_fwd_compute_s)
    assert cm.unit_cost(docs).fwd_s == base.unit_cost(docs).fwd_s  # packed: no ring
    assert cm.unit_cost(docs, degree=2, cp="allgather").fwd_s == base.unit_cost(docs, degree=2, cp="allgather").fwd_s
    full = Setup(setup.model, setup.cluster, TrainingSpec(dtype="fp32", recompute="full"))
    rec_a = CostModel(full, bare(), compute_share=1.5).unit_cost(docs, degree=2)
    rec_b = CostModel(full, p, compute_share=1.5).unit_cost(docs, degree=2)
    assert rec_b.bwd_compute_s - rec_a.bwd_compute_s == pytest.approx(
        layers * 2 * 1.5 * (2e-4 + 3e-7 * tokens * heads + 1e-4 + 1e-7 * tokens * heads))
