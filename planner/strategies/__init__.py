"""Strategies: functions (batch, cost model, options) -> Step sharing one cost model and simulator."""

from __future__ import annotations

from typing import Callable

from costmodel.timing import CostModel
from planner.batch import GlobalBatch
from planner.plan import PlanError, Step
from planner.strategies import dcp, hdp, static
from planner.strategies.common import PlanOptions

StrategyFn = Callable[[GlobalBatch, CostModel, PlanOptions], Step]

STRATEGIES: dict[str, StrategyFn] = {
    "static": static.plan_step,
    "dcp": dcp.plan_step,
    "hdp-naive": hdp.plan_naive,
    "hdp": hdp.plan_balance,
}


def get_strategy(name: str) -> StrategyFn:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PlanError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "PlanOptions", "get_strategy"]
