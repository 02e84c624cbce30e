"""The strategies by name: functions (batch, cost model, options) -> Step sharing one cost model and
simulator, and `run_strategy`, which also returns an exact strategy's solver report."""

from __future__ import annotations

from collections.abc import Callable

from costmodel.timing import CostModel
from planner.plan import PlanError, Step
from planner.strategies import dcp, hdp, ilp, static
from planner.strategies.options import PlanOptions
from planner.strategies.outcome import StepOutcome
from planner.workload import GlobalBatch

StrategyFn = Callable[[GlobalBatch, CostModel, PlanOptions], Step]

STRATEGIES: dict[str, StrategyFn] = {
    "static": static.plan_step,
    "dcp": dcp.plan_step,
    "hdp-naive": hdp.plan_naive,
    "hdp": hdp.plan_balance,
    "ilp": ilp.plan_step,  # exact: MILP (CBC, HiGHS) or CP-SAT; PlanOptions.ilp
}

# The fast heuristics: what `meshplan plan` compares by default (ilp runs when asked for).
HEURISTICS: tuple[str, ...] = ("static", "dcp", "hdp-naive", "hdp")

# Exact strategies: the same planning, returning the solver's report with the step.
_SOLVED: dict[str, Callable[[GlobalBatch, CostModel, PlanOptions], StepOutcome]] = {"ilp": ilp.solve_step}


def get_strategy(name: str) -> StrategyFn:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PlanError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}") from None


def run_strategy(name: str, batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> StepOutcome:
    """One step planned by strategy `name`, with its solver's report where it is an exact strategy."""
    solved = _SOLVED.get(name)
    if solved is not None:
        return solved(batch, cm, opt)
    return StepOutcome(get_strategy(name)(batch, cm, opt))
