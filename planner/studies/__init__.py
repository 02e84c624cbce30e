"""What-if studies: sweeps and their journal, capacity search, the ByteScale reproduction."""

from planner.studies.whatif import (
    BYTESCALE_CLAIMS, BYTESCALE_LAYOUT_NOTE, BYTESCALE_PANELS, BYTESCALE_TOKENS_PER_STEP, ByteScaleGrid, Config,
    Journal, LayoutRules, MFU_CONVENTION, Point, SWEEP_COLUMNS, SweepSpec, Target, batches_of, capacity_search,
    cost_model_of, default_bytescale_table, default_capacity_table, journal_path, json_row, options_for,
    per_doubling_slowdown, progress_bar, read_table, run_sweep, write_table)

__all__ = [
    'BYTESCALE_CLAIMS', 'BYTESCALE_LAYOUT_NOTE', 'BYTESCALE_PANELS', 'BYTESCALE_TOKENS_PER_STEP',
    'ByteScaleGrid', 'Config', 'Journal', 'LayoutRules', 'MFU_CONVENTION', 'Point', 'SWEEP_COLUMNS',
    'SweepSpec', 'Target', 'batches_of', 'capacity_search', 'cost_model_of', 'default_bytescale_table',
    'default_capacity_table', 'journal_path', 'json_row', 'options_for', 'per_doubling_slowdown',
    'progress_bar', 'read_table', 'run_sweep', 'write_table']
