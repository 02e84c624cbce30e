"""The strategies by name: functions (batch, cost model, options) -> Step sharing one cost model and
simulator, and `run_strategy`, which also returns an exact strategy's solver report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from costmodel.timing import CostModel
from planner.plan import PlanError, Step
from planner.strategies import dcp, hdp, ilp, static
from planner.strategies.common import with_cp_kinds
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
    """Strategy `name`, choosing each unit's context-parallel kind afterwards when the options ask for it."""
    try:
        fn = STRATEGIES[name]
    except KeyError:
        raise PlanError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}") from None

    def planned(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
        return _cp_kinds_applied(fn(batch, cm, opt), batch, cm, opt)

    return planned


def _cp_kinds_applied(step: Step, batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    """The step with each sharded unit's CP kind chosen from opt.cp_kinds (planner.strategies.cp_kinds); the
    step itself when no kind beyond the plan-wide one is allowed."""
    if not set(opt.cp_kinds) - {cm.setup.training.cp}:
        return step
    return with_cp_kinds(batch, step, cm, tuple(opt.cp_kinds))


def run_strategy(name: str, batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> StepOutcome:
    """One step planned by strategy `name`, with its solver's report where it is an exact strategy (the report
    is of the partition; per-unit CP kinds, when asked for, are chosen after it)."""
    solved = _SOLVED.get(name)
    if solved is not None:
        out = solved(batch, cm, opt)
        return dataclasses.replace(out, step=_cp_kinds_applied(out.step, batch, cm, opt))
    return StepOutcome(get_strategy(name)(batch, cm, opt))
