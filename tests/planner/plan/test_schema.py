"""The plan's JSON: a planned plan round-trips, the typed pipeline section reads and writes back
byte-identical, and a bad file fails with one line naming the JSON path."""

import dataclasses
import json

import pytest

from planner.api import PlanRequest, make_plan
from planner.plan import DEFAULT_MAX_CHUNKS, PipelineSection, Plan, PlanError, validate


def test_plan_json_round_trip(tmp_path):
    req = PlanRequest(gpus=16, tokens_per_step=2 * 2**20, max_context_tokens=256 * 1024)
    p = make_plan(req, "hdp")
    path = p.save(tmp_path / "p.json")
    q = Plan.load(path)
    assert q.to_dict() == p.to_dict()
    validate(q)
    (tmp_path / "t.json").write_text(path.read_text()[:100])
    with pytest.raises(PlanError, match="truncated or corrupt"):
        Plan.load(tmp_path / "t.json")


def test_a_plan_written_before_the_loss_field_reads_as_it_was(tmp_path):
    # plans of 2026-12-04 and before say fused_loss (true: the online loss, false: Megatron's fp32 one)
    from planner.api import cost_model_for_plan

    d = make_plan(PlanRequest(gpus=16, tokens_per_step=2 * 2**20, max_context_tokens=256 * 1024), "static").to_dict()
    assert "loss" not in d["meta"]["training"]  # the default is not written
    for old, loss in ((True, "online"), (False, "fp32")):
        d["meta"]["training"]["fused_loss"] = old
        (tmp_path / "old.json").write_text(json.dumps(d))
        q = Plan.load(tmp_path / "old.json")
        assert q.meta["training"]["loss"] == loss and "fused_loss" not in q.meta["training"]
        assert cost_model_for_plan(q).setup.training.loss == loss


@pytest.fixture(scope="module")
def pp_plan() -> Plan:
    """A sliced, redistributed PP plan (every key of the pipeline section present): hdp's plan with its
    weighted in-flight budget, the schedule named sliced-redistributed (only a label to this test)."""
    req = PlanRequest(model="llama-7b", gpus=32, pp=4, max_context_tokens=1024 * 1024)
    plan = make_plan(req, "hdp")
    step = plan.steps[0]
    assert step.pipeline.weights
    step.pipeline = dataclasses.replace(step.pipeline, schedule="sliced-redistributed")
    return plan


def test_pipeline_section_reads_typed_and_writes_back_byte_identical(pp_plan):
    text = pp_plan.to_json()
    sec = json.loads(text)["steps"][0]["pipeline"]
    assert list(sec) == ["schedule", "v", "max_chunks", "weights"]
    q = Plan.from_dict(json.loads(text))
    typed = q.steps[0].pipeline
    assert isinstance(typed, PipelineSection) and typed == pp_plan.steps[0].pipeline
    assert set(typed.weights) == {u.id for u in q.steps[0].units}  # unit ids: int keys
    assert q.to_json() == text


def test_pipeline_section_defaults_and_what_is_written():
    assert PipelineSection().to_dict() == {"schedule": "1f1b", "v": 1}
    assert PipelineSection().max_chunks == DEFAULT_MAX_CHUNKS
    # max_chunks only with the one schedule that reads it; weights keys as JSON strings
    assert PipelineSection("sliced", 2, {3: 0.5}, max_chunks=7).to_dict() == {
        "schedule": "sliced", "v": 2, "weights": {"3": 0.5}}
    assert PipelineSection("sliced-redistributed", 2, max_chunks=7).to_dict() == {
        "schedule": "sliced-redistributed", "v": 2, "max_chunks": 7}


@pytest.mark.parametrize("key,value,where", [("v", 1.0, "steps[0].pipeline.v"),
                                             ("max_chunks", -1, "steps[0].pipeline.max_chunks"),
                                             ("weights", {"x": 1.0}, "steps[0].pipeline.weights"),
                                             ("foo", 1, "steps[0].pipeline: unknown field")])
def test_a_bad_pipeline_section_fails_on_load_naming_its_path(pp_plan, key, value, where):
    d = json.loads(pp_plan.to_json())
    d["steps"][0]["pipeline"][key] = value
    with pytest.raises(PlanError, match=rf"^edited\.json: {where}".replace("[", r"\[").replace("]", r"\]")):
        Plan.from_dict(d, origin="edited.json")
