"""Analytic profiles: the shipped files match their generator (within libm rounding, not drift)."""

import json
import math

import numpy as np
import pytest

from profiles import analytic
from profiles.table import ProfileError, load_profile


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


@pytest.mark.parametrize("name", ["h100-sxm", "a100-sxm-80gb", "a100-sxm-80gb-opa", "h200-sxm", "h800-sxm"])
def test_shipped_analytic_matches_generator(name):
    shipped = load_profile(f"{name}.analytic")
    assert_close(shipped.content_dict(), analytic.build(analytic.GPUS[name]).content_dict())
    assert all(c["source"] for c in shipped.constants.values())


def test_omni_path_a100_differs_from_the_dgx_a100_only_between_nodes():
    # Jean Zay (BLOOM): 4 x 100 Gb/s per 8 GPUs, a quarter of the DGX A100's 8 x 200 Gb/s per GPU
    dgx, opa = load_profile("a100-sxm-80gb.analytic"), load_profile("a100-sxm-80gb-opa.analytic")
    for name in ("gemm", "attention", "memory", "host_copy"):
        assert dgx.tables[name].equals(opa.tables[name]), name
    big = 16 * 2**30
    assert opa.collective_time_s("all_reduce", big, 8, "intra") == dgx.collective_time_s("all_reduce", big, 8, "intra")
    inter = [p.collective_time_s("all_reduce", big, 64, "inter") for p in (opa, dgx)]
    assert inter[0] / inter[1] == pytest.approx(4.0, rel=0.05)


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


def test_interleaved_groups_across_nodes_share_the_nics_by_hand():
    """A DP group of a TP-8 mesh holds one GPU per node: its collective runs on that GPU's NIC alone (busbw =
    NIC line rate x efficiency), while a group of whole nodes spreads over all eight NICs."""
    p, h = load_profile("h100-sxm.analytic"), analytic.H100
    s = 16 * 2**30  # at 16 GiB per NIC the size shape is 1
    nic = h.nic.value * analytic.NIC_EFF.value
    f = analytic.bus_factor("all_reduce", 16)
    assert float(p.collective_time_s("all_reduce", s, 16, "inter", 8)) == pytest.approx(s * f / nic)
    # the same 16 GPUs as two whole nodes: F(16)·8 NICs / F(2) per node, capped by NVLink
    whole = min(h.ar_plateau_intra.value, f * 8 * nic / analytic.bus_factor("all_reduce", 2))
    assert float(p.collective_time_s("all_reduce", s, 16, "inter")) == pytest.approx(s * f / whole)
    # tp 2: four members per node, four NICs per group
    four = f * 4 * nic / analytic.bus_factor("all_reduce", 4)
    assert float(p.collective_time_s("all_reduce", s, 16, "inter", 2)) == pytest.approx(s * f / four)
    # GB200: a group per TP rank of 8 holds 9 GPUs of each 72-GPU rack
    gb = load_profile("gb200.analytic")
    assert 8 in analytic.concurrent_groups(72) and 5 not in analytic.concurrent_groups(72)
    t = float(gb.collective_time_s("reduce_scatter", s, 18, "inter", 8))
    fr = analytic.bus_factor("reduce_scatter", 18)
    plateau = min(analytic.GB200.ar_plateau_intra.value,
                  fr * 9 * analytic.GB200.nic.value * analytic.NIC_EFF.value / analytic.bus_factor("reduce_scatter", 2))
    assert t == pytest.approx(s * fr / plateau)


@pytest.mark.parametrize("name, fwd, bwd", [("h100-sxm.analytic", 497 / 648, 474 / 561),
                                            ("a100-sxm-80gb.analytic", 324 / 370, 291 / 322)])
def test_head_dim_64_runs_at_the_table_kernels_published_share_of_128(name, fwd, bwd):
    """FA3 paper Figs. 5-6 (H100, 16K): FA3 hd64 497 / 474 TFLOP/s forward non-causal / backward against hd128's
    648 / 561; FA2 324 / 291 against 370 / 322 (A100's FA2 table borrows FA2's H100 ratio)."""
    from profiles.table import attention_flops

    p = load_profile(name)
    for direction, causal, x in (("fwd", False, fwd), ("fwd", True, fwd), ("bwd", True, bwd)):
        rate = {hd: float(attention_flops(16384, 32, hd, causal, direction)) / float(p.attention_time_s(
            16384, heads=32, head_dim=hd, causal=causal, direction=direction)) for hd in (64, 128)}
        assert rate[64] / rate[128] == pytest.approx(x)


def test_hopper_profiles_price_each_published_attention_kernel_over_their_own():
    """FlashAttention-3's paper (Figs. 5-6, H100, hd128): causal forward 616 / 539 / 335 and backward 561 / 516 / 322
    TFLOP/s for FA3 / cuDNN (July 2024) / FA2 at 16K, causal forward 292 / 315 / 191 at 512 and 423 / 410 / 260 at
    1K; the H100 table is FA3's. Between the paper's lengths the ratio is interpolated in log length, held beyond."""
    p = load_profile("h100-sxm.analytic")
    lengths = np.array([16384.0, 2**20])
    fa3 = p.attention_kernel_time_x("fa3", lengths)
    assert {d: list(v) for d, v in fa3.items()} == {"fwd": [1.0, 1.0], "bwd": [1.0, 1.0]}
    for kernel, fwd, bwd in (("fa2", 335, 322), ("cudnn-2024", 539, 516)):
        x = p.attention_kernel_time_x(kernel, lengths)
        assert x["fwd"] == pytest.approx([616 / fwd] * 2) and x["bwd"] == pytest.approx([561 / bwd] * 2)
    short = p.attention_kernel_time_x("cudnn-2024", np.array([128.0, 512.0, math.sqrt(512 * 1024), 1024.0]))
    assert short["fwd"] == pytest.approx([292 / 315, 292 / 315, (292 / 315 + 423 / 410) / 2, 423 / 410])
    assert p.attention_kernel_time_x("fa2", 512.0)["fwd"] == pytest.approx(292 / 191)  # vs 1.84 at 16K
    # A100's table is FlashAttention-2's; FA3 needs Hopper, and a measured profile holds what it measured
    assert load_profile("a100-sxm-80gb.analytic").attention_kernel_time_x("fa2", 512.0)["bwd"] == 1.0
    with pytest.raises(ProfileError, match="no published rate for attention kernel 'fa3'.*knows fa1, fa1-triton, fa2"):
        load_profile("a100-sxm-80gb.analytic").attention_kernel_time_x("fa3", 512.0)
    with pytest.raises(ProfileError, match="no published rate for attention kernel 'fa1'.*knows cudnn-2024, fa2, fa3"):
        p.attention_kernel_time_x("fa1", 512.0)  # the FA2 paper compared FA1 with FA2 on the A100 only


def test_a100_prices_the_kernels_flashattention_2_replaced_by_its_papers_ratios():
    """FA2 paper §4.1 (A100): FA2 'around 2x faster than FlashAttention', '1.3-1.5x faster than FlashAttention in
    Triton in the forward pass and around 2x faster in the backward pass', at every length; both A100 profiles."""
    for name in ("a100-sxm-80gb.analytic", "a100-sxm-80gb-opa.analytic"):
        p = load_profile(name)
        lengths = np.array([512.0, 8192.0, 2**17])
        for kernel, fwd, bwd in (("fa1", 2.0, 2.0), ("fa1-triton", 1.4, 2.0)):
            x = p.attention_kernel_time_x(kernel, lengths)
            assert x["fwd"] == pytest.approx([fwd] * 3) and x["bwd"] == pytest.approx([bwd] * 3)
    with pytest.raises(ProfileError, match="prices only the attention kernel it holds.*--attention-kernel flash"):
        load_profile("h200-sxm.measured").attention_kernel_time_x("fa2", 512.0)


def test_saturation_fit_recovers_its_parameters_and_blackwell_attention_is_cudnns_measured_curve():
    """fit_saturation on points of a known curve gives its plateau and s_half back; the Blackwell tables hold the
    fit of cudnn-frontend's B200 benchmark (causal forward 855.7 at 4K ... 1,419 at 32K TFLOP/s)."""
    lengths = (4096, 8192, 16384, 32768, 65536, 131072)
    plateau, s_half = analytic.fit_saturation(lengths, tuple(1500 * s / (s + 2000) for s in lengths))
    assert plateau == pytest.approx(1500, rel=1e-3) and s_half == pytest.approx(2000, rel=0.01)
    b200 = load_profile("b200.analytic")
    for key in ("fwd_causal", "bwd"):
        assert b200.constant(f"attn_s_half_{key}") > 4 * analytic.S_HALF[key].value  # ramps far slower than FA3
    p = b200.constant("attn_plateau_fwd_causal") * 2250
    h = b200.constant("attn_s_half_fwd_causal")
    for s, measured in zip(lengths, (855.7, 1171.3, 1332.4, 1419.0, 1382.3, 1355.4)):
        assert p * s / (s + h) == pytest.approx(measured, rel=0.08)
