"""Pipeline schedules: per-stage op lists (1F1B, interleaved, sliced) and mirror pairing (ops), the
discrete-event engine they run on (engine), and one uniform pipeline against its closed form (uniform)."""

from planner.schedule.engine import OpRun, ScheduleError, run_ops
from planner.schedule.ops import (
    SCHEDULES, OpKey, PipeOp, check_schedule, chunk_gradient_shares, chunk_last_backwards, consumer, dependency,
    group_size, inflight_budget, mirror_chunks, mirror_pairs, slice_attention_share, slice_share, stage_ops,
    step_op_lists)
from planner.schedule.uniform import closed_form_bubble, simulate_uniform

__all__ = [
    'OpKey', 'OpRun', 'PipeOp', 'SCHEDULES', 'ScheduleError', 'check_schedule', 'chunk_gradient_shares',
    'chunk_last_backwards',
    'closed_form_bubble', 'consumer',
    'dependency', 'group_size', 'inflight_budget', 'mirror_chunks', 'mirror_pairs', 'run_ops', 'simulate_uniform',
    'slice_attention_share', 'slice_share', 'stage_ops', 'step_op_lists']
