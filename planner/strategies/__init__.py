"""Strategies: functions (batch, cost model, options) -> Step sharing one cost model and simulator.

  options.py   PlanOptions: the shared knobs and each strategy's own options (StaticOptions, ...)
  common.py    drafting shared by the strategies: unit drafts, packing, rank sets, finalize
  static.py dcp.py hdp.py ilp/   the strategies, each with its options dataclass
  outcome.py   StepOutcome (a step and its solver report), SolverInfo, the plan's meta["solver"]
  registry.py  the strategies by name; run_strategy returns a StepOutcome for any of them
"""

from __future__ import annotations

from planner.strategies.dcp import DcpOptions
from planner.strategies.hdp import PP_SCHEDULES, HdpOptions, PpSchedule
from planner.strategies.ilp import SOLVERS, IlpOptions, Solver
from planner.strategies.options import PlanOptions
from planner.strategies.outcome import SolverInfo, SolverWarning, StepOutcome, solver_meta
from planner.strategies.registry import HEURISTICS, STRATEGIES, StrategyFn, get_strategy, run_strategy
from planner.strategies.static import StaticOptions

__all__ = ["HEURISTICS", "PP_SCHEDULES", "SOLVERS", "STRATEGIES", "DcpOptions", "HdpOptions", "IlpOptions",
           "PlanOptions", "PpSchedule", "Solver", "SolverInfo", "SolverWarning", "StaticOptions", "StepOutcome",
           "StrategyFn", "get_strategy", "run_strategy", "solver_meta"]
