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


def test_a_sliced_forward_costs_more_per_source_than_the_tables_blocks():
    """SlicedAttention's forward per K/V source: the table's block calls plus a merge, copies and the sources
    function's Python: positive, below 10 ms on any CPU; the constant names its slice length."""
    from planner.runtime.call_overhead import SOURCE_SLICES, SOURCE_TOKENS, attention_source_overhead

    got = attention_source_overhead(4, 2, 16, rounds=10)
    c = got["attn_source_fwd_s"]
    assert c["unit"] == "s" and 0 < c["value"] < 1e-2 and got["attn_source_tokens"]["value"] == SOURCE_TOKENS
    assert f"{SOURCE_SLICES} slices of {SOURCE_TOKENS} tokens" in c["source"]


def test_cost_model_charges_each_source_of_a_sliced_forward():
    """n slices make n(n + 1)/2 sources a layer, forward only: at the constant's slice length the constant each
    (times the compute share), longer slices add their merges' bytes; one slice, or no constant: nothing. A sliced
    stage op's forward carries them with its attention."""
    from planner.plan import Piece, PipelineSection, Predicted, Sequence, Step, Unit
    from planner.simulate import simulate_step
    from planner.simulate.pipelined import slice_sources_s
    from planner.simulate.step import unit_costs

    p = load_profile("local-cpu.measured")
    p.constants.pop("attn_source_fwd_s", None)
    setup = Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(2), TrainingSpec(dtype="fp32", pp=2))
    base = CostModel(setup, p, compute_share=1.0)
    p.constants["attn_source_fwd_s"] = {"value": 2e-4, "unit": "s", "source": "test"}
    p.constants["attn_source_tokens"] = {"value": 128.0, "unit": "tokens", "source": "test"}
    cm = CostModel(setup, p, compute_share=1.0)
    assert base.slice_sources_fwd_s(128, 4) == 0.0 and cm.slice_sources_fwd_s(128, 1) == 0.0
    assert cm.slice_sources_fwd_s(128, 4) == pytest.approx(10 * 2e-4)
    assert cm.slice_sources_fwd_s(725, 4) > cm.slice_sources_fwd_s(128, 4)
    step = Step(0, 2900, [Sequence(0, 2900)], [Unit(0, (0,), (Piece(0, 0, 2900),), slices=4)], {0: [0]},
                Predicted(0.0, 0.0, [], []), pipeline=PipelineSection(schedule="sliced"))
    added = slice_sources_s(cm, unit_costs(step, cm)[0][0], 4)
    assert added == pytest.approx(cm.layers_per_stage * cm.slice_sources_fwd_s(725, 4))

    def passes(model):
        ops = simulate_step(step, model).ops
        return [sum(o.end_s - o.start_s for o in ops if o.stage == 0 and o.kind.startswith(k)) for k in ("fwd", "bwd")]

    (f0, b0), (f1, b1) = passes(base), passes(cm)
    assert f1 - f0 == pytest.approx(added) and b1 == pytest.approx(b0)
