"""Analytic GEMM shape losses: whole tiles in whole waves over the SMs on the generic curve; measured tables as
they are."""

import numpy as np
import pytest
import pandas as pd

from profiles import analytic
from profiles.table import Fingerprint, Profile, load_profile, loglog_interp, quantised_gemm_flops


def flops_curve(p: Profile, flops) -> np.ndarray:
    xs, ys = p._gemm_generic("bf16")
    return loglog_interp(np.asarray(flops, float), xs, ys, below="clamp", above="proportional")


def test_analytic_profiles_carry_sms_and_tile_with_sources():
    for g, sms in ((analytic.H100, 132), (analytic.A100, 108), (analytic.H200, 132), (analytic.H800, 132)):
        c = analytic.build(g).constants
        assert c["gemm_sms"]["value"] == sms
        assert {c["gemm_tile_m"]["value"], c["gemm_tile_n"]["value"]} == {128, 256}
        assert all(c[k]["source"] for k in ("gemm_sms", "gemm_tile_m", "gemm_tile_n"))


def test_full_waves_cost_the_curve_and_one_more_tile_costs_a_wave():
    p = load_profile("h100-sxm.analytic")
    m, n, k = 128 * 33, 256 * 4, 4096  # 132 tiles of 128x256: exactly one wave
    assert p.gemm_time_s(m, n, k) == flops_curve(p, 2.0 * m * n * k)
    # one more row: 136 tiles either way round, a second wave that does the work of a full one
    assert p.gemm_time_s(m + 1, n, k) == flops_curve(p, 2 * 132 * 128 * 256 * 2.0 * k)
    # the transposed tile where it pads less: 44 x 3 = 132 tiles of 256x128, against 88 x 2 of 128x256
    assert p.gemm_time_s(256 * 44, 128 * 3, k) == flops_curve(p, 2.0 * 256 * 44 * 128 * 3 * k)


def test_quantised_time_never_beats_the_curve_and_is_vectorised():
    p = load_profile("a100-sxm-80gb.analytic")
    m = np.unique(np.round(np.geomspace(1, 2**25, 200)))
    for n, k in ((4096, 4096), (1536, 4096), (11008, 4096), (32000, 8192)):
        t = p.gemm_time_s(m, n, k)
        assert t.shape == m.shape
        assert np.all(t >= flops_curve(p, 2.0 * m * n * k) * (1 - 1e-12))
        assert np.all(np.diff(t) >= 0)  # more rows never take less time


def test_exact_analytic_series_takes_the_quantised_curve_too():
    p = load_profile("h100-sxm.analytic")  # its table holds an (n, k) = (4096, 4096) series
    m = 4096 + 128  # 33 x 16 = 528 tiles: 4 waves of 132, exactly full
    assert p.gemm_time_s(m, 4096, 4096) == flops_curve(p, 2.0 * m * 4096 * 4096)
    assert p.gemm_time_s(4096 + 129, 4096, 4096) > p.gemm_time_s(m, 4096, 4096) * 1.2


def test_measured_profile_is_looked_up_as_it_is():
    fp = Fingerprint(name="meas", device="d", source="measured", created="2026-01-01")
    rows = [(m, n, k, "bf16", 2.0 * m * n * k / 5e14 + 5e-6) for m in (256, 1024, 4096) for n, k in ((4096, 4096),
                                                                                                  (512, 512))]
    p = Profile(fp, {"gemm": pd.DataFrame(rows, columns=["m", "n", "k", "dtype", "time_s"])})
    m = np.array([300.0, 1500.0, 4000.0])
    exact = p.gemm_time_s(m, 4096, 4096)
    assert np.allclose(exact, loglog_interp(m, [256, 1024, 4096], [r[-1] for r in rows[0::2]]))
    assert np.array_equal(p.gemm_time_s(m, 1000, 1000), flops_curve(p, 2.0 * m * 1000 * 1000))


def test_hopper_sustained_gemm_rates_are_the_measured_h200_medians():
    """The Hopper profiles' large-GEMM rates are the H200's measured GEMMs of >= 1 ms (their median), not the
    MAMF burst; A100's is its MAMF at the fraction fitted to its design set (tests/planner/studies/
    test_design_fit.py)."""
    measured = load_profile("h200-sxm.measured")
    for dtype, const in (("bf16", analytic.HOPPER_GEMM_SUSTAINED), ("fp8", analytic.HOPPER_GEMM_SUSTAINED_FP8)):
        assert const.value == pytest.approx(analytic.sustained_gemm_flops(measured, dtype), rel=1e-3)
    for g in (analytic.H100, analytic.H200, analytic.H800):
        assert g.gemm_large is analytic.HOPPER_GEMM_SUSTAINED
        assert g.gemm_large_fp8 is analytic.HOPPER_GEMM_SUSTAINED_FP8
    # the measured table's best shape is the MAMF: the sustained rate is lower by duration, not a slower board
    g = measured.tables["gemm"]
    best = (2.0 * g.m * g.n * g.k / g.time_s)[g.dtype == "bf16"].max()
    assert best > 1.1 * analytic.HOPPER_GEMM_SUSTAINED.value
    assert analytic.A100_MAMF.gemm_large.value == 271.2e12
    assert analytic.A100.gemm_large.value == pytest.approx(271.2e12 * analytic.A100_GEMM_X.value)
    assert analytic.A100.gemm_large_fp8 is None and "korthikanti2022" in analytic.A100.gemm_large.source
    with pytest.raises(ValueError, match="no bf16 GEMM of >= 10"):
        analytic.sustained_gemm_flops(measured, "bf16", min_s=10.0)


def test_blackwell_gemm_rates_carry_hoppers_measured_ratios():
    """No sustained or fp8 GEMM rate of Blackwell is published: the B200's bf16 MAMF fraction (1,745 / 2,250), fp8's
    scaled by Hopper's fp8 / bf16 MAMF fractions (1,453.4 / 1,979 over 794.5 / 989), both at the H200's measured
    sustained / MAMF (673.3 / 794.5 bf16, 1,226.3 / 1,453.4 fp8)."""
    bf16_x, fp8_x = 673.3 / 794.5, 1226.3 / 1453.4
    fp8_fraction = (1453.4 / 1979) / (794.5 / 989)
    for g, bf16_peak, fp8_peak in ((analytic.B200, 2250e12, 4500e12), (analytic.GB200_STATED, 2500e12, 5000e12)):
        assert g.gemm_large.value == pytest.approx(bf16_peak * 1745 / 2250 * bf16_x, rel=1e-3)
        assert g.gemm_large_fp8.value == pytest.approx(fp8_peak * 1745 / 2250 * fp8_fraction * fp8_x, rel=1e-3)
        assert "[assumption" in g.gemm_large.source and "[assumption" in g.gemm_large_fp8.source
    # GB200's runs: those rates at the fraction fitted to its design set, bf16 and fp8 alike
    x = analytic.GB200_GEMM_X.value
    assert analytic.GB200.gemm_large.value == pytest.approx(analytic.GB200_STATED.gemm_large.value * x)
    assert analytic.GB200.gemm_large_fp8.value == pytest.approx(analytic.GB200_STATED.gemm_large_fp8.value * x)


def test_hopper_memory_kinds_are_the_measured_h200_ones():
    """The Hopper analytic profiles carry the kinds measured on the H200 (same constants, values, every kind the
    cost model prices but the stream); the A100 and Blackwell ones the same ratios, their sources saying that they
    are assumed there, not measured."""
    from costmodel.elementwise import KINDS
    measured = load_profile("h200-sxm.measured")
    for name in ("h100-sxm", "h200-sxm", "h800-sxm"):
        p = load_profile(f"{name}.analytic")
        kinds = {k for k in p.constants if k.startswith("memory_kind_")}
        assert kinds == {f"memory_kind_{k}" for k in KINDS if k != "stream"}
        for k in kinds:
            assert p.constants[k]["value"] == measured.constants[k]["value"]
            assert "H200" in p.constants[k]["source"]
    for name in ("a100-sxm-80gb", "a100-sxm-80gb-opa", "b200", "gb200"):
        p = load_profile(f"{name}.analytic")
        for k in (f"memory_kind_{k}" for k in KINDS if k != "stream"):
            assert p.constants[k]["value"] == measured.constants[k]["value"]
            assert "[assumption: a kernel kind's bandwidth over a stream as measured on Hopper]" in p.constants[k][
                "source"]
        assert p.memory_kind_ratio("strided") == measured.memory_kind_ratio("strided") < 1.0


def test_hopper_half_efficiency_work_is_the_fit_to_the_measured_h200():
    """The Hopper profiles' half-efficiency GEMM work is what fit_gemm_half_flops finds on the H200's measured GEMMs
    (a 41-point log grid); the other GPUs keep the shared assumption."""
    measured = load_profile("h200-sxm.measured")
    assert analytic.HOPPER_GEMM_HALF.value == pytest.approx(analytic.fit_gemm_half_flops(measured, analytic.H200),
                                                            rel=1e-3)
    for g in (analytic.H100, analytic.H200, analytic.H800):
        assert analytic.build(g).constants["gemm_half_flops"]["value"] == analytic.HOPPER_GEMM_HALF.value
    assert analytic.build(analytic.A100).constants["gemm_half_flops"]["value"] == 2e10
    # the fitted table prices the measured GEMMs within 12% (mean |log error|)
    h200 = load_profile("h200-sxm.analytic")
    g = measured.tables["gemm"]
    g = g[g["dtype"].isin(["bf16", "fp8"])]
    err = np.mean(np.abs(np.log([float(h200.gemm_time_s(r.m, r.n, r.k, r.dtype)) / r.time_s
                                 for r in g.itertuples()])))
    assert err < 0.12  # 50.6% mean |error| with 2e10 and no split-K


def test_split_k_fills_the_sms_under_one_wave():
    """512 x 2304 x 16384 on 132 SMs, 128x256 tiles: 4·9 = 36 tiles (the transpose 2·18, as many) fill a wave only
    with k split: min(132 // 36, 16384 // 256) = 3 slices, 108 blocks in one wave of 132: padded FLOPs = 132 blocks
    of 128·256·2·16384/3. A shape of one wave or more is not split: 4096 rows -> 288 tiles, 3 waves = 396."""
    f = quantised_gemm_flops(512, 2304, 16384, 132, 128, 256)
    assert float(f) == pytest.approx(132 * 128 * 256 * 2.0 * 16384 / 3)
    big = quantised_gemm_flops(4096, 2304, 16384, 132, 128, 256)
    assert float(big) == pytest.approx(396 * 128 * 256 * 2.0 * 16384)
    shallow = quantised_gemm_flops(512, 2304, 512, 132, 128, 256)  # k holds only 2 slices of 256
    assert float(shallow) == pytest.approx(132 * 128 * 256 * 2.0 * 512 / 2)


def test_a_weight_gradients_contraction_may_be_the_array():
    # wgrad: a fixed k x n weight contracted over a token count; the same GEMM as rows x n over k, element by element
    p = load_profile("a100-sxm-80gb.analytic")
    tokens = np.array([256.0, 3000.0, 65536.0])
    t = p.gemm_time_s(1536.0, 4608, tokens)
    assert t.shape == tokens.shape and np.all(np.diff(t) > 0)
    assert t == pytest.approx([float(p.gemm_time_s(1536.0, 4608, int(x))) for x in tokens])
    assert p.times_gemm_shapes and not load_profile("h200-sxm.measured").times_gemm_shapes


def test_memory_side_counts_each_operands_width_and_the_output_as_written():
    # a weight gradient over few rows is memory-bound: A and B read at the dtype's width (fp8 1 B), C written at 2 B
    # by default, or read and written at 4 + 4 B where the GEMM accumulates into an fp32 main gradient
    p = load_profile("h100-sxm.analytic")
    hbm = p.constant("hbm")
    m, n, k = 2880.0, 5760, 16
    assert float(p.gemm_time_s(m, n, k)) == pytest.approx(((m * k + k * n) * 2 + m * n * 2) / hbm)
    assert float(p.gemm_time_s(m, n, k, out_bytes=8.0)) == pytest.approx(((m * k + k * n) * 2 + m * n * 8) / hbm)
    assert float(p.gemm_time_s(m, n, k, "fp8")) == pytest.approx(((m * k + k * n) * 1 + m * n * 2) / hbm)
    big = 65536  # compute-bound: the output's width does not show
    assert float(p.gemm_time_s(m, n, big, out_bytes=8.0)) == float(p.gemm_time_s(m, n, big))
