"""The workload package's one error type."""


class SourceError(ValueError):
    """A length source is missing, unreadable or holds a bad value; the message names the file and
    the line or row."""
