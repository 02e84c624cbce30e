"""What a step trains on: length readers, synthetic families, sources, global batches."""

from planner.workload.batch import GlobalBatch, RepeatedRecordingWarning, global_batches
from planner.workload.errors import SourceError
from planner.workload.families import DEFAULT_SAMPLES, FAMILIES, Fact, SyntheticSource
from planner.workload.readers import IDX_MAGIC
from planner.workload.sources import (LengthSource, Pieces, RecordedSource, describe_lengths, lengths_source,
                                      open_source, source_names, split_at_context)
from planner.workload.tokens import K_TOKENS, M_TOKENS, MAX_LENGTH_TOKENS, format_tokens, parse_tokens

__all__ = [
    'DEFAULT_SAMPLES', 'FAMILIES', 'IDX_MAGIC', 'K_TOKENS', 'M_TOKENS', 'MAX_LENGTH_TOKENS', 'Fact', 'GlobalBatch',
    'LengthSource', 'Pieces', 'RecordedSource', 'RepeatedRecordingWarning', 'SourceError', 'SyntheticSource',
    'describe_lengths', 'format_tokens', 'global_batches', 'lengths_source', 'open_source', 'parse_tokens',
    'source_names', 'split_at_context']
