"""Pipeline depths that do not divide the layers (Llama 3 405B's 126 layers on 16 stages, DeepSeek-V3's 61 on 8):
every stage priced as the busiest, ⌈L/pp⌉ layers; chunk counts that leave a chunk without a layer refused."""

import dataclasses

import pytest

from costmodel.memory import memory_budget, model_state_bytes, params_per_rank
from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel
from planner.plan import PlanError
from planner.strategies.hdp import chunk_candidates
from profiles.table import load_profile

_PROFILE = load_profile("h100-sxm.analytic")


def test_uneven_stages_priced_as_the_busiest():
    m = load_model("llama3-405b")  # 126 layers
    cluster = load_cluster("dgx-h100").with_gpus(1024)
    training = TrainingSpec(tp=8, pp=16)
    uneven, even = (Setup(x, cluster, training) for x in (m, dataclasses.replace(m, layers=128)))
    assert uneven.layers_per_stage == even.layers_per_stage == 8
    assert params_per_rank(uneven) == params_per_rank(even)  # a stage of 8 layers and the embedding or the head
    assert model_state_bytes(uneven) == model_state_bytes(even)
    # stage 0 keeps 16 micro-batches of its 8 layers in flight under 1F1B: 128 layers' activations, not 126
    assert memory_budget(uneven).capacity_tokens == memory_budget(even).capacity_tokens
    a, b = (CostModel(s, _PROFILE).unit_cost([8192, 4096]) for s in (uneven, even))
    assert a.total_s == pytest.approx(b.total_s, rel=1e-12)
    assert Setup(m, load_cluster("dgx-h100").with_gpus(576), TrainingSpec(tp=8, pp=9)).layers_per_stage == 14
    with pytest.raises(SpecError, match="pp=127 exceeds the 126 layers of llama3-405b"):
        Setup(m, load_cluster("dgx-h100").with_gpus(1016), TrainingSpec(tp=8, pp=127))


def test_layout_search_tries_uneven_depths():
    # DeepSeek-V3 (61 layers, a prime) on 512 H100s: only pp = 1 or 61 divided it; pp = 2..32 are tried now
    with pytest.raises(SpecError, match="does not fit") as e:
        CostModel(Setup(load_model("deepseek-v3"), load_cluster("dgx-h100").with_gpus(64), TrainingSpec(tp=8, ep=8)),
                  _PROFILE)
    assert "pp=61" not in str(e.value) and "the fewest GPUs that fit are" in str(e.value)


def test_chunks_need_a_layer_each():
    assert chunk_candidates(2, max_v=1) == [1] and chunk_candidates(8, max_v=7) == [1, 2, 4]
    with pytest.raises(PlanError, match="pp_v = 2 must divide the 2 layers of a pipeline stage and be at most 1"):
        chunk_candidates(2, pinned=2, max_v=1)


def test_sliced_pipeline_plans_stay_above_their_bound():
    """A sliced sequence runs on the pipeline's stages at once: its critical path is not pp stage times. DeepSeek-V3
    on 16 stages of 4 layers (the busiest of 61 over 16) at a small C slices its long documents; every strategy's
    step stays at or above its lower bound."""
    from planner.api import PlanRequest, make_plan

    req = PlanRequest(model="deepseek-v3", cluster="dgx-h100", gpus=1024, tp=8, ep=8, pp=16, max_context_tokens=32768,
                      steps=1)
    for name in ("static", "hdp"):
        step = make_plan(req, name).steps[0]
        assert step.predicted.step_time_s >= step.predicted.lower_bound_s * (1 - 1e-9), name
    assert any(u.slices > 1 for u in step.units)
