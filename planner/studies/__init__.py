"""What-if studies: sweeps and their journal, capacity search, the ByteScale reproduction.

- ``sweep.py``       points (config x strategy), their evaluation, the resumable sweep
- ``journal.py``     the row's columns, the journal of finished rows, the CSV / Parquet table
- ``fingerprint.py`` the planning code behind a row, the machine behind a timing
- ``workers.py``     worker processes that never outlive their use (Ctrl-C included)
- ``capacity.py``    the capacity search: smallest GPU count and layout meeting a target
- ``bytescale.py``   the ByteScale §8.2 reproduction: panels, grid, claims, its REPRODUCTION.md section
- ``validation.py``  the cost model against published measurements (data/: the calibration sets)
- ``calibrate.py``   a profile's physical parameters fitted to measured replay traces, judged on held-out plans
"""

from planner.api import BYTESCALE_TOKENS_PER_STEP
from planner.studies.bytescale import (
    BYTESCALE_CLAIMS, BYTESCALE_LAYOUT_NOTE, BYTESCALE_PANELS, BYTESCALE_STRATEGIES, ByteScaleGrid, ReproPanel,
    Reproduction, bytescale_markdown, default_bytescale_table, per_doubling_slowdown, replace_section,
    reproduce_bytescale)
from planner.studies.calibrate import Calibration, ParamFit, Physical, PlanErrors, calibrate, calibrated_profile
from planner.studies.capacity import (
    CAPACITY_STATUSES, CapacityProgress, CapacityResult, LayoutBound, LayoutRules, Target, capacity_search,
    default_capacity_table, layout_bound)
from planner.studies.fingerprint import code_fingerprint, machine_description
from planner.studies.journal import (
    MFU_CONVENTION, SWEEP_COLUMNS, Journal, journal_path, json_row, read_table, rows_to_frame, table_paths,
    variant_label, write_table)
from planner.studies.sweep import (
    POINT_ERRORS, STATIC_MESHES, Config, Point, SweepResult, SweepSpec, TrainingFlags, batches_of, check_inputs,
    cost_model_of, evaluate_point, options_for, run_sweep)
from planner.studies.validation import (
    CALIBRATION_SETS, FACETS, CalibrationSet, IterationCase, LayerCase, ValidationReport, ValidationRow, facet_errors,
    load_calibration_set, validate_cost_model)
from planner.studies.workers import stop_pool, worker_pool

__all__ = [
    'BYTESCALE_CLAIMS', 'BYTESCALE_LAYOUT_NOTE', 'BYTESCALE_PANELS', 'BYTESCALE_STRATEGIES',
    'BYTESCALE_TOKENS_PER_STEP', 'ByteScaleGrid', 'CALIBRATION_SETS', 'Calibration', 'ParamFit', 'Physical',
    'PlanErrors', 'calibrate', 'calibrated_profile', 'CAPACITY_STATUSES', 'CalibrationSet', 'CapacityProgress',
    'CapacityResult', 'Config', 'FACETS', 'IterationCase', 'Journal', 'LayerCase', 'LayoutBound', 'LayoutRules',
    'MFU_CONVENTION', 'POINT_ERRORS', 'Point', 'ReproPanel', 'Reproduction', 'STATIC_MESHES', 'SWEEP_COLUMNS',
    'SweepResult', 'SweepSpec', 'Target', 'TrainingFlags', 'ValidationReport', 'ValidationRow', 'batches_of',
    'bytescale_markdown',
    'capacity_search', 'check_inputs', 'code_fingerprint', 'cost_model_of', 'default_bytescale_table',
    'default_capacity_table', 'evaluate_point', 'facet_errors', 'journal_path', 'json_row', 'layout_bound',
    'load_calibration_set', 'machine_description', 'options_for', 'per_doubling_slowdown', 'read_table',
    'replace_section', 'reproduce_bytescale', 'rows_to_frame', 'run_sweep', 'stop_pool', 'table_paths',
    'validate_cost_model', 'variant_label', 'worker_pool', 'write_table']
