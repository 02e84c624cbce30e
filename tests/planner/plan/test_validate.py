"""validate(): one test per rule. Each builds a small valid plan, breaks exactly that rule and checks
that the PlanError names it; the last tests run validate on planned steps."""

import dataclasses

import numpy as np
import pytest

from planner.plan import Mesh, Piece, PipelineSection, Plan, PlanError, Predicted, Sequence, Step, Unit, validate

replace = dataclasses.replace


def plan_of(pp: int = 1, **meta) -> Plan:
    """Two HDP ranks: sequence 0 (10 tokens) sharded over both, sequence 1 (6 tokens) packed on rank 1."""
    units = [Unit(0, (0, 1), (Piece(0, 0, 10),), tokens_per_rank=6), Unit(1, (1,), (Piece(1, 0, 6),))]
    step = Step(0, 16, [Sequence(0, 10), Sequence(1, 6)], units, {0: [0], 1: [0, 1]},
                Predicted(1.0, 0.5, [1.0, 1.0], [1e9, 1e9]), PipelineSection() if pp > 1 else None)
    return Plan(meta=dict(meta), mesh=Mesh(2 * pp, 1, pp, 2), steps=[step])


def with_step(plan: Plan, **changes) -> Plan:
    return replace(plan, steps=[replace(plan.steps[0], **changes)])


def with_unit(plan: Plan, i: int, **changes) -> Plan:
    units = list(plan.steps[0].units)
    units[i] = replace(units[i], **changes)
    return with_step(plan, units=units)


def rejects(plan: Plan, match: str, **kwargs) -> None:
    with pytest.raises(PlanError, match=match):
        validate(plan, **kwargs)


def test_the_valid_plans_pass():
    validate(plan_of())
    validate(plan_of(pp=2, layers_per_stage=4), capacity_tokens=100)


def test_mesh_world_size_is_the_product():
    rejects(replace(plan_of(), mesh=Mesh(3, 1, 1, 2)), r"world_size 3 != tp 1 × pp 1 × hdp 2")


def test_plan_has_steps():
    rejects(replace(plan_of(), steps=[]), "no steps")


def test_predicted_lists_have_one_entry_per_hdp_rank():
    p = plan_of()
    rejects(with_step(p, predicted=replace(p.steps[0].predicted, per_rank_busy_s=[1.0])), "per-rank lists")


def test_sequence_ids_are_distinct():
    rejects(with_step(plan_of(), sequences=[Sequence(0, 10), Sequence(0, 6)]), "duplicate sequence ids")


def test_sequence_lengths_are_positive():
    rejects(with_step(plan_of(), sequences=[Sequence(0, 10), Sequence(1, 0)], global_tokens=10),
            "lengths must be positive")


def test_global_tokens_is_the_sum_of_lengths():
    rejects(with_step(plan_of(), global_tokens=15), "global_tokens 15 != sum of sequence lengths 16")


def test_unit_ids_are_distinct():
    rejects(with_unit(plan_of(), 1, id=0), "duplicate unit ids")


def test_unit_ranks_are_non_empty_and_distinct():
    rejects(with_unit(plan_of(), 0, hdp_ranks=(0, 0)), "hdp_ranks must be non-empty and distinct")


def test_unit_ranks_are_in_the_mesh():
    rejects(with_unit(plan_of(), 1, hdp_ranks=(2,)), r"HDP rank 2 out of range \[0, 2\)")


def test_unit_has_pieces():
    rejects(with_unit(plan_of(), 1, pieces=()), "has no pieces")


def test_pieces_name_known_sequences():
    rejects(with_unit(plan_of(), 1, pieces=(Piece(7, 0, 6),)), "unknown sequence 7")


def test_pieces_lie_inside_their_sequence():
    rejects(with_unit(plan_of(), 1, pieces=(Piece(1, 0, 8),)), r"piece \[0, 8\) outside sequence 1")


def test_offload_ratio_is_a_share():
    rejects(with_unit(plan_of(), 1, offload_ratio=1.5), r"offload_ratio 1.5 outside \[0, 1\]")


def test_slices_hold_at_least_one_token():
    rejects(with_unit(plan_of(), 1, slices=7), r"slices must be in \[1, 6\]")


def test_tokens_per_rank_follows_zigzag():
    rejects(with_unit(plan_of(), 0, tokens_per_rank=5), r"tokens_per_rank 5 != 6 \(zigzag over 2 ranks\)")


def test_units_fit_the_capacity():
    rejects(plan_of(), "exceed the capacity of 5 tokens", capacity_tokens=5)
    validate(plan_of(), capacity_tokens=6)
    validate(replace(plan_of(), meta={"capacity_tokens": 6}))  # C from meta when not given


def test_predicted_unit_time_is_finite():
    rejects(with_unit(plan_of(), 1, predicted_time_s=float("nan")), "predicted_time_s must be finite")


@pytest.mark.parametrize("pieces,kind", [((Piece(0, 0, 4), Piece(0, 5, 10)), "gap at token 4"),
                                         ((Piece(0, 0, 6), Piece(0, 5, 10)), "overlap at token 5"),
                                         ((Piece(0, 0, 9),), "covers 9 of 10 tokens")])
def test_each_token_lies_in_exactly_one_piece(pieces, kind):
    rejects(with_unit(plan_of(), 0, pieces=pieces, tokens_per_rank=0), f"sequence 0 .*{kind}")


def test_orders_list_exactly_the_units_of_each_rank():
    rejects(with_step(plan_of(), order={0: [0], 1: [0]}), "order of HDP rank 1 lists")


def test_orders_name_only_ranks_of_the_mesh():
    rejects(with_step(plan_of(), order={0: [0], 1: [0, 1], 5: []}), r"order names HDP ranks \[5\]")


def test_orders_are_deadlock_free():
    # a cycle through three ranks: each shared unit waits for one the next rank runs first
    units = [Unit(0, (0, 1), (Piece(0, 0, 10),)), Unit(1, (1, 2), (Piece(1, 0, 10),)),
             Unit(2, (0, 2), (Piece(2, 0, 10),))]
    cyc = Step(0, 30, [Sequence(i, 10) for i in range(3)], units, {0: [0, 2], 1: [1, 0], 2: [2, 1]},
               Predicted(1.0, 1.0, [0.0] * 3, [0.0] * 3))
    rejects(Plan(meta={}, mesh=Mesh(3, 1, 1, 3), steps=[cyc]), "orders deadlock")


def test_pipeline_schedule_is_known():
    rejects(with_step(plan_of(pp=2), pipeline=PipelineSection("2f2b")), "unknown schedule '2f2b'")


def test_pipeline_v_is_at_least_one():
    rejects(with_step(plan_of(pp=2), pipeline=PipelineSection(v=0)), "v must be an integer >= 1")


def test_pipeline_v_divides_the_layers_of_a_stage():
    rejects(with_step(plan_of(pp=2, layers_per_stage=4), pipeline=PipelineSection("interleaved", 3)),
            "v = 3 must divide the 4 layers")


def test_pipeline_chunks_each_get_a_layer():
    # 3 layers on 2 stages price 2 a stage (the busiest): v = 2 divides that, but 2 x 2 chunks need 4 layers
    plan = plan_of(pp=2, layers_per_stage=2, model_spec={"layers": 3})
    rejects(with_step(plan, pipeline=PipelineSection("interleaved", 2)), "pp × v = 2 × 2 chunks for 3 layers")
    validate(with_step(plan, pipeline=PipelineSection("interleaved", 1)))


def test_pipeline_max_chunks_is_not_negative():
    rejects(with_step(plan_of(pp=2), pipeline=PipelineSection("sliced-redistributed", max_chunks=-1)),
            "max_chunks must be an integer >= 0")


def test_pipeline_weights_cover_every_unit():
    rejects(with_step(plan_of(pp=2), pipeline=PipelineSection(weights={0: 1.0})),
            "weights must give every unit of the step a positive finite number")
    validate(with_step(plan_of(pp=2), pipeline=PipelineSection(weights={0: 1.0, 1: 0.5})))


def test_pipeline_op_lists_run_to_the_end():
    # shared units 2 and 1 run in the same order on both pipelines (the orders are deadlock-free), but
    # rank 0 runs unit 0 between them: 1F1B places unit 1's ops at other points of the two op lists
    units = [Unit(0, (0,), (Piece(0, 0, 10),), slices=4), Unit(1, (0, 1), (Piece(1, 0, 10),), slices=2),
             Unit(2, (0, 1), (Piece(2, 0, 10),))]
    step = Step(0, 30, [Sequence(i, 10) for i in range(3)], units, {0: [2, 0, 1], 1: [2, 1]},
                Predicted(1.0, 0.5, [1.0, 1.0], [1e9, 1e9]), PipelineSection(weights={0: 0.5, 1: 1.0, 2: 0.5}))
    rejects(Plan(meta={}, mesh=Mesh(6, 1, 3, 2), steps=[step]), "step 0 pipeline: pipeline schedule deadlocks")


def test_predicted_figures_are_finite():
    p = plan_of()
    rejects(with_step(p, predicted=replace(p.steps[0].predicted, step_time_s=float("inf"))),
            "predicted figures must be finite")


def test_validate_rejects_a_planned_step_missing_a_piece():
    from planner.api import PlanRequest, build_cost_model
    from planner.strategies import STRATEGIES, PlanOptions
    from planner.workload import GlobalBatch

    cm = build_cost_model(PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=8, capacity_tokens=4096,
                                      recompute="none"))
    lengths = np.array([5000, 3000, 200], dtype=np.int64)
    batch = GlobalBatch(step=0, lengths_tokens=lengths, seq_ids=np.arange(3, dtype=np.int64),
                        max_context_tokens=5000, split_documents=0, source="test")
    step = STRATEGIES["hdp"](batch, cm, PlanOptions())
    good = Plan(meta={"capacity_tokens": cm.capacity_tokens, "layers_per_stage": cm.layers_per_stage},
                mesh=Mesh(cm.setup.cluster.world_size, cm.tp, cm.pp, cm.setup.hdp), steps=[step])
    validate(good)
    rejects(with_unit(good, 0, pieces=good.steps[0].units[0].pieces[:-1] or ()), "piece|covers")
