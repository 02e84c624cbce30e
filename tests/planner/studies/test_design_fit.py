"""The sustained GEMM rates of the GPUs nobody measured here (A100, GB200) are the fits to their design sets: each
stated fraction is where the design set's mean |log error| is least, and no held-out set can be fitted to."""

import pytest

from planner.studies import design_fit
from profiles import analytic


@pytest.mark.parametrize("gpu, x, set_name", [
    (analytic.A100_MAMF, analytic.A100_GEMM_X, "korthikanti2022"),
    (analytic.GB200_STATED, analytic.GB200_GEMM_X, "megatron_bridge_gb200_2025"),
])
def test_fitted_fraction_is_the_design_sets_least_error(gpu, x, set_name):
    at = design_fit.gemm_rate_loss(gpu, x.value, set_name)
    for step in (-0.01, 0.01):
        assert at <= design_fit.gemm_rate_loss(gpu, x.value + step, set_name)
    assert at < design_fit.gemm_rate_loss(gpu, 1.0, set_name)  # the stated rate fits worse
    assert set_name in x.source


def test_golden_section_finds_a_known_minimum(monkeypatch):
    monkeypatch.setattr(design_fit, "gemm_rate_loss", lambda gpu, x, set_name: (x - 0.913) ** 2)
    assert design_fit.fit_gemm_rate_x(analytic.A100_MAMF, "korthikanti2022") == pytest.approx(0.913, abs=1e-3)
    # a minimum at the search's edge is found there
    monkeypatch.setattr(design_fit, "gemm_rate_loss", lambda gpu, x, set_name: x)
    assert design_fit.fit_gemm_rate_x(analytic.A100_MAMF, "korthikanti2022", lo=0.8) == pytest.approx(0.8, abs=1e-3)


def test_held_out_sets_are_never_fitted():
    with pytest.raises(ValueError, match="'narayanan2021' is held out"):
        design_fit.gemm_rate_loss(analytic.A100_MAMF, 0.9, "narayanan2021")


def test_rate_fraction_scales_both_dtypes_and_says_so():
    x = analytic.Const(0.5, "x", "a test")
    g = analytic.with_gemm_rate_x(analytic.H100, x)
    assert g.gemm_large.value == analytic.H100.gemm_large.value / 2
    assert g.gemm_large_fp8.value == analytic.H100.gemm_large_fp8.value / 2
    assert g.gemm_large.source.endswith("x 0.5: a test")
    assert analytic.with_gemm_rate_x(analytic.A100_MAMF, x).gemm_large_fp8 is None
