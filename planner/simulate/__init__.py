"""Step simulation: flat and pipelined timelines, memory, lower bounds, predicted vs measured."""

from planner.simulate.bounds import lower_bound_s, total_compute_s
from planner.simulate.simulator import (
    OpTiming, StepSimulation, chrome_metadata, compare_measured, inflight_weights, simulate_plan, simulate_step,
    static_memory_parts, unit_costs)

__all__ = [
    'OpTiming', 'StepSimulation', 'chrome_metadata', 'compare_measured', 'inflight_weights', 'lower_bound_s',
    'simulate_plan', 'simulate_step', 'static_memory_parts', 'total_compute_s', 'unit_costs']
