"""bench/kernel_breakdown.py: the comparison half runs anywhere, on the H200 records kept in bench/data; the CPU
half measures a small unit here."""

import json
from pathlib import Path

import pytest

from bench.kernel_breakdown import kernel_class, main, parse_case, priced

DATA = Path(__file__).resolve().parents[2] / "bench" / "data" / "h200-2026-12-04" / "breakdown.json"


def test_kernels_are_classed_by_their_names():
    assert kernel_class("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "gemm"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>") == \
        "elementwise"


def test_cases_parse_and_bad_ones_say_how_to_write_them():
    name, spec, docs = parse_case("x:llama3-8b:4:packed4096:300")
    assert name == "x" and spec.layers == 4 and sum(docs) == 4096 and len(docs) > 1
    with pytest.raises(SystemExit, match="NAME:MODEL:LAYERS"):
        parse_case("x:llama3-8b")


def test_recorded_units_are_priced_per_class(capsys):
    records = json.loads(DATA.read_text())
    one = next(r for r in records if r["case"] == "l8b-32k-1doc")
    p = priced(one, "h200-sxm.analytic")
    assert p["wall"][0] == pytest.approx(p["attention"][0] + p["rest"][0]) and p["wall"][1] > p["wall"][0]
    main(["--from", str(DATA), "--profile", "h200-sxm.analytic"])
    out = capsys.readouterr().out
    assert out.count("| l8b-32k-1doc |") == 2 and "GPU busy" in out


def test_a_cpu_unit_is_measured_per_operator_class_and_priced_on_a_cpu_profile(capsys):
    pytest.importorskip("torch")
    from bench.kernel_breakdown import compare, cpu_op_class, measure

    assert cpu_op_class("_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert cpu_op_class("addmm") == "gemm" and cpu_op_class("silu_backward") == "elementwise"
    name, spec, docs = parse_case("t:tiny:2:packed96:30")
    rec = measure(name, spec, docs, "cpu")
    for phase in ("fwd", "bwd"):
        assert all(v > 0 for v in rec["phases"][phase]["by_class_s"].values()) and rec["phases"][phase]["kernels"] > 0
    assert rec["device"].startswith("cpu") and rec["fwd_s"] > 0 and rec["bwd_s"] > 0
    p = priced(rec, "local-cpu.measured")  # fp32, one rank on its node: the whole core
    assert p["wall"][0] == pytest.approx(p["attention"][0] + p["rest"][0])
    compare([rec], ["local-cpu.measured"])
    assert "operators / wall" in capsys.readouterr().out
