"""The plan file: typed schema (mesh, steps, units, orders, pipeline section) and validate()."""

from planner.plan.schema import (
    Mesh, Piece, Plan, PlanError, Predicted, Sequence, Step, Unit, validate, zigzag_tokens_per_rank)

__all__ = [
    'Mesh', 'Piece', 'Plan', 'PlanError', 'Predicted', 'Sequence', 'Step', 'Unit', 'validate',
    'zigzag_tokens_per_rank']
