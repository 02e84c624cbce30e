"""Analytic profiles: the shipped files match their generator (within libm rounding, not drift)."""

import json

import pytest

from profiles import analytic
from profiles.table import load_profile


def assert_close(a, b, rel=1e-9, where="profile"):
    """Same structure, keys and strings; numbers equal within `rel` (the generator's log/exp may
    round differently by an ulp on another CPU or libm, which must not fail; drift must)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        assert a == pytest.approx(b, rel=rel, abs=0), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], rel, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rel, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", ["h100-sxm", "a100-sxm-80gb", "h200-sxm", "h800-sxm"])
def test_shipped_analytic_matches_generator(name):
    shipped = load_profile(f"{name}.analytic")
    assert_close(shipped.content_dict(), analytic.build(analytic.GPUS[name]).content_dict())
    assert all(c["source"] for c in shipped.constants.values())


def test_analytic_comparison_tolerates_rounding_but_not_drift():
    d = analytic.build(analytic.H100).content_dict()
    e = json.loads(json.dumps(d))
    row = e["tables"]["gemm"]["rows"][0]
    row[-1] *= 1 + 2e-16  # an ulp of libm rounding
    assert_close(d, e)
    row[-1] *= 1 + 1e-6  # a real change in the generator or the shipped file
    with pytest.raises(AssertionError):
        assert_close(d, e)
    e = json.loads(json.dumps(d))
    e["fingerprint"]["device"] += "x"
    with pytest.raises(AssertionError):
        assert_close(d, e)
