"""bench/fidelity.py: units' CPU errors are also reported by kind of unit."""

from bench.fidelity import SHORT_UNIT_TOKENS, UNIT_KINDS, unit_kind
from planner.plan.schema import Piece, Unit


def test_units_are_told_apart_by_ranks_then_tokens():
    ring = Unit(id=0, hdp_ranks=(0, 1), pieces=(Piece(0, 0, 8),))
    short = Unit(id=1, hdp_ranks=(0,), pieces=(Piece(1, 0, SHORT_UNIT_TOKENS - 1), Piece(2, 5, 6)))  # at the bound
    long = Unit(id=2, hdp_ranks=(0,), pieces=(Piece(1, 0, SHORT_UNIT_TOKENS), Piece(2, 5, 6)))
    assert [unit_kind(u) for u in (ring, short, long)] == list(UNIT_KINDS)
