"""Step simulation: a plan step on the cost model (step), flat (pp = 1) and pipelined timelines with
mirror pairing (flat, pipelined), ranks sharing a CPU node's cores in the flat timeline (cores), memory
(memory), the result and its trace (timeline), lower bounds (bounds), predicted vs measured (measured)."""

from planner.simulate.bounds import lower_bound_s, total_compute_s
from planner.simulate.measured import MeasuredComparison, compare_measured, read_measured_trace
from planner.simulate.memory import activation_bytes, inflight_weights, static_memory_bytes, static_memory_parts
from planner.simulate.step import simulate_plan, simulate_step, unit_costs
from planner.simulate.timeline import OpTiming, StepSimulation, chrome_metadata

__all__ = [
    'MeasuredComparison', 'OpTiming', 'StepSimulation', 'activation_bytes', 'chrome_metadata', 'compare_measured',
    'inflight_weights', 'lower_bound_s', 'read_measured_trace', 'simulate_plan', 'simulate_step', 'static_memory_bytes',
    'static_memory_parts', 'total_compute_s', 'unit_costs']
