"""Strategies: functions (batch, cost model, options) -> Step sharing one cost model and simulator."""

from __future__ import annotations

from typing import Callable

from costmodel.timing import CostModel
from planner.workload import GlobalBatch
from planner.plan import PlanError, Step
from planner.strategies import dcp, hdp, ilp, static
from planner.strategies.common import PlanOptions

StrategyFn = Callable[[GlobalBatch, CostModel, PlanOptions], Step]

STRATEGIES: dict[str, StrategyFn] = {
    "static": static.plan_step,
    "dcp": dcp.plan_step,
    "hdp-naive": hdp.plan_naive,
    "hdp": hdp.plan_balance,
    "ilp": ilp.plan_step,  # exact: MILP (CBC, HiGHS) or CP-SAT; PlanOptions.solver, time_limit_s
}


# The fast heuristics: what `meshplan plan` compares by default (ilp runs when asked for).
HEURISTICS: tuple[str, ...] = ("static", "dcp", "hdp-naive", "hdp")


def get_strategy(name: str) -> StrategyFn:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PlanError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}") from None


__all__ = ["HEURISTICS", "STRATEGIES", "PlanOptions", "get_strategy"]
