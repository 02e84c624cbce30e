"""What a step trains on: length readers, synthetic families, sources, global batches."""

from planner.workload.batch import (GlobalBatch, RepeatedRecordingWarning, global_batches)
from planner.workload.sources import (
    DEFAULT_SAMPLES, FAMILIES, IDX_MAGIC, SourceError, SyntheticSource, describe_lengths, format_tokens,
    lengths_source, open_source, parse_tokens, plot_description, split_at_context)

__all__ = [
    'DEFAULT_SAMPLES', 'FAMILIES', 'GlobalBatch', 'IDX_MAGIC', 'RepeatedRecordingWarning', 'SourceError',
    'SyntheticSource', 'describe_lengths', 'format_tokens', 'global_batches', 'lengths_source', 'open_source',
    'parse_tokens', 'plot_description', 'split_at_context']
