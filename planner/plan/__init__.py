"""The plan file: typed schema (mesh, steps, units, orders, pipeline section) and JSON I/O (schema),
and the contract checks every plan must pass (validate)."""

from planner.plan.schema import (
    DEFAULT_MAX_CHUNKS, Mesh, Piece, PipelineSection, Plan, PlanError, Predicted, Sequence, Step, Unit,
    zigzag_tokens_per_rank)
from planner.plan.validate import validate

__all__ = [
    'DEFAULT_MAX_CHUNKS', 'Mesh', 'Piece', 'PipelineSection', 'Plan', 'PlanError', 'Predicted', 'Sequence', 'Step',
    'Unit', 'validate', 'zigzag_tokens_per_rank']
