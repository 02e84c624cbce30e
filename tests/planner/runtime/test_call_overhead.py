"""The executor's cost per attention call (planner/runtime/call_overhead.py): what PackedAttention spends on a
packed bin's documents beyond the attention table's SDPA calls, and what the cost model does with it."""

import pytest
import torch

from costmodel.specs import Setup
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
