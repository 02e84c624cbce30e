"""Token counts: K/M/G suffixes read and written back."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planner.workload import SourceError, format_tokens, parse_tokens


@pytest.mark.parametrize("text, tokens", [("256K", 262144), ("2M", 2097152), ("32m", 33554432), ("1G", 1 << 30),
                                          (" 4k ", 4096), ("1.5M", 1572864), ("1000", 1000), (7, 7)])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["0", "-1K", "abc", "1.5", "", "K", "1e400", True])
def test_parse_tokens_rejects(text):
    with pytest.raises(SourceError, match="token count"):
        parse_tokens(text)


@given(st.integers(1, 1 << 40))
def test_format_tokens_round_trips(n):
    assert parse_tokens(format_tokens(n)) == n
