"""Pipeline schedules: per-stage op lists (1F1B, interleaved, sliced) and the event engine."""

from planner.schedule.pipeline import (
    PipeOp, SCHEDULES, ScheduleError, check_schedule, closed_form_bubble, consumer, dependency, group_size,
    mirror_chunks, mirror_pairs, run_ops, section_weights, simulate_uniform, slice_share, stage_ops,
    step_op_lists)

__all__ = [
    'PipeOp', 'SCHEDULES', 'ScheduleError', 'check_schedule', 'closed_form_bubble', 'consumer', 'dependency',
    'group_size', 'mirror_chunks', 'mirror_pairs', 'run_ops', 'section_weights', 'simulate_uniform',
    'slice_share', 'stage_ops', 'step_op_lists']
