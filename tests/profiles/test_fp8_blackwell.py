"""fp8 training (fp8 GEMM tables, `--dtype fp8`) and the Blackwell systems (B200, GB200 NVL72 with its 72-GPU
NVLink domain): hand-computed formulas, refusals in one line, plans produced, validated and simulated."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel.elementwise import FP8_CAST_BYTES, fp8_cast_kernels
from costmodel.memory import fp8_state_bytes
from costmodel.presets import load_cluster, load_model
from costmodel.specs import ClusterSpec, Setup, SpecError, TrainingSpec
from costmodel.timing import _TOKEN_GRID, CostModel, gemm_shapes
from planner.api import PlanRequest, build_cost_model, make_plan
from planner.plan import Plan, validate
from planner.simulate import simulate_step
from profiles import analytic
from profiles.table import Profile, ProfileError, load_profile
from tests.profiles.test_analytic import assert_close


@pytest.mark.parametrize("name", ["b200", "gb200"])
def test_shipped_blackwell_profiles_match_generator(name):
    shipped = load_profile(f"{name}.analytic")
    assert_close(shipped.content_dict(), analytic.build(analytic.GPUS[name]).content_dict())
    assert all(c["source"] for c in shipped.constants.values())


def test_fp8_rows_only_on_fp8_gpus():
    for name, g in analytic.GPUS.items():
        dtypes = set(analytic.build(g).tables["gemm"]["dtype"])
        assert dtypes == ({"bf16"} if name.startswith("a100-sxm-80gb") else {"bf16", "fp8"}), name
    a100 = analytic.build(analytic.A100)  # no fp8 or domain constants: its shipped file keeps its sha256
    assert not {"peak_fp8_flops", "gemm_large_fp8_flops", "nvlink_domain_gpus"} & set(a100.constants)


def test_fp8_gemm_time_hand_computed():
    """H100 fp8, m = n = k = 65536 (above the grid: the top point's rate held). Top point 32768³:
    t = (F + x_half) / R_fp8 (Hopper's sustained fp8 rate, 1,226.3 TFLOP/s), x_half = 6.31e9 × 1979/989 (Hopper's
    measured half-efficiency work); the query pads to whole 128×256 tiles in whole waves of 132 SMs: 512·256 =
    131072 tiles -> 993 waves = 131076 tiles."""
    p = load_profile("h100-sxm.analytic")
    f_top = 2.0 * 32768**3
    t_top = (f_top + 6.31e9 * 1979 / 989) / 1226.3e12
    f_padded = 131076 * 128 * 256 * 2.0 * 65536
    assert float(p.gemm_time_s(65536, 65536, 65536, "fp8")) == pytest.approx(t_top * f_padded / f_top, rel=1e-9)
    # the same GEMM in bf16: the sustained bf16 rate and x_half = 6.31e9 (989 peak)
    t_bf16 = (f_top + 6.31e9) / 673.3e12 * f_padded / f_top
    assert float(p.gemm_time_s(65536, 65536, 65536, "bf16")) == pytest.approx(t_bf16, rel=1e-9)


def test_blackwell_peaks_from_datasheets():
    gb = load_profile("gb200.analytic")
    assert gb.constant("peak_bf16_flops") == pytest.approx(360e15 / 2 / 72)  # 2.5 PFLOP/s dense per GPU
    assert gb.constant("peak_fp8_flops") == pytest.approx(5e15)
    assert gb.constant("hbm") == pytest.approx(8e12 * 0.88)  # 576 TB/s / 72 at the achieved fraction
    b = load_profile("b200.analytic")
    assert (b.constant("peak_bf16_flops"), b.constant("peak_fp8_flops")) == (2250e12, 4500e12)
    # fp8 sustained: the bf16 MAMF fraction x Hopper's fp8 / bf16 MAMF fractions x the H200's fp8 sustained / MAMF
    assert b.constant("gemm_large_fp8_flops") == pytest.approx(
        4500e12 * 1745 / 2250 * (1453.4 / 1979) / (794.5 / 989) * 1226.3 / 1453.4, rel=1e-3)


def test_fp8_cast_kernels_hand_computed():
    """llama-7b (h 4096, 32 query and 8 KV heads of 128, f 11008), tp=1: forward casts the inputs of QKV (h),
    O (n_q·d_h), gate/up (h) and down (f); backward the output gradients of QKV (n_q·d_h + 2·n_kv·d_h), O (h),
    gate/up (2f) and down (h); 4 B per element each."""
    m = load_model("llama-7b")
    widths = {g.label: (g.k * g.rows_per_token, g.n * g.rows_per_token) for g in gemm_shapes(m)[:-1]}
    fwd = sum(k.bytes_per_item for k in fp8_cast_kernels(widths, "fwd"))
    bwd = sum(k.bytes_per_item for k in fp8_cast_kernels(widths, "bwd"))
    assert FP8_CAST_BYTES == 4
    assert fwd == (4096 + 4096 + 4096 + 11008) * 4
    assert bwd == (4096 + 2 * 1024 + 4096 + 2 * 11008 + 4096) * 4


def _cost_model(dtype: str, cluster: str = "dgx-h100", gpus: int = 8, profile: str | None = None) -> CostModel:
    c = load_cluster(cluster).with_gpus(gpus)
    return CostModel(Setup(load_model("llama-7b"), c, TrainingSpec(dtype=dtype)), load_profile(profile or c.profile))


def test_fp8_cost_model_prices_layer_gemms_in_fp8_and_the_rest_in_bf16():
    bf16, fp8 = _cost_model("bf16"), _cost_model("fp8")
    p = fp8.profile
    x = _TOKEN_GRID[150]
    *layer, head = gemm_shapes(fp8.model)
    want = sum(float(p.gemm_time_s(x * g.rows_per_token, g.n, g.k, "fp8")) for g in layer)
    assert float(fp8.gemm_layer_fwd_s(x)) == pytest.approx(want, rel=1e-9)
    assert float(fp8.gemm_layer_fwd_s(x)) < 0.6 * float(bf16.gemm_layer_fwd_s(x))
    for curve in ("gemm_head", "attn_fwd", "attn_bwd", "mem_head_fwd"):  # LM head, attention, loss: bf16
        assert float(fp8._lookup(curve, x)) == float(bf16._lookup(curve, x)), curve
    casts = fp8_cast_kernels({g.label: (g.k * g.rows_per_token, g.n * g.rows_per_token) for g in layer}, "fwd")
    extra = sum(float(p.memory_time_s(x * k.bytes_per_item)) for k in casts)
    assert float(fp8._lookup("mem_layer_fwd", x) - bf16._lookup("mem_layer_fwd", x)) == pytest.approx(extra, rel=1e-6)
    # bf16 weights and communication; the states gain the cached fp8 weights and scaling state; the activations keep
    # the GEMM inputs TE saves in fp8 (costmodel/memory.py), 2h + f - q less per token and layer at tp 1
    assert bf16.budget.activation_bytes_per_token - fp8.budget.activation_bytes_per_token == 32 * (4096 + 11008)
    assert fp8.budget.states_bytes == pytest.approx(bf16.budget.states_bytes + fp8_state_bytes(fp8.setup), rel=1e-12)
    assert fp8.budget.capacity_tokens < bf16.budget.capacity_tokens
    assert fp8.peak_flops() == bf16.peak_flops() == 989e12  # MFU stays against the bf16 peak


def test_fp8_refused_without_an_fp8_gemm_table():
    with pytest.raises(ProfileError, match="--dtype fp8: profile 'a100-sxm-80gb.analytic' has no fp8 GEMM table") as e:
        _cost_model("fp8", cluster="dgx-a100")
    assert "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="no fp8 GEMM table"):
        build_cost_model(PlanRequest(cluster="dgx-a100", gpus=8, dtype="fp8"))
    with pytest.raises(SpecError, match='dtype: expected one of "bf16", "fp16", "fp32", "fp8", got "fp4"'):
        TrainingSpec(dtype="fp4")


def test_fp8_h100_plan_produced_validated_simulated():
    req = PlanRequest(cluster="dgx-h100", gpus=16, lengths="byted-like", dtype="fp8", max_context_tokens=2**18)
    plan = make_plan(req, "hdp")
    assert plan.meta["training"]["dtype"] == "fp8"
    validate(Plan.from_dict(plan.to_dict()))
    cm = build_cost_model(req)
    sim = simulate_step(plan.steps[0], cm)
    assert math.isfinite(sim.step_time_s) and sim.step_time_s > 0
    bf16 = make_plan(dataclasses.replace(req, dtype="bf16"), "hdp")
    assert plan.steps[0].predicted.step_time_s < bf16.steps[0].predicted.step_time_s


def test_fp8_rows_leave_bf16_plans_unchanged():
    """The shipped H100 profile gained fp8 rows and constants: a bf16 plan on it is the plan on the profile
    without them, step for step."""
    shipped = load_profile("h100-sxm.analytic")
    gemm = shipped.tables["gemm"]
    old = Profile(dataclasses.replace(shipped.fingerprint, sha256=""),
                  {**shipped.tables, "gemm": gemm[gemm["dtype"] == "bf16"].reset_index(drop=True)},
                  {k: v for k, v in shipped.constants.items() if "fp8" not in k})
    req = PlanRequest(cluster="dgx-h100", gpus=16, lengths="byted-like", max_context_tokens=2**18)
    a = make_plan(req, "hdp", cm=CostModel(build_cost_model(req).setup, old))
    b = make_plan(req, "hdp")
    assert a.to_dict()["steps"] == b.to_dict()["steps"]


@settings(max_examples=6, deadline=None)
@given(case=st.sampled_from([("dgx-h100", 16), ("hgx-h200", 8), ("dgx-b200", 16), ("gb200-nvl72", 72),
                             ("gb200-nvl72", 144)]), seed=st.integers(0, 1000), tp=st.sampled_from([1, 2]))
def test_fp8_plans_stay_valid(case, seed, tp):
    """fp8 plans on every fp8 system (HGX nodes and NVL72 racks, with and without TP) validate and predict finite
    step times."""
    cluster, gpus = case
    req = PlanRequest(cluster=cluster, gpus=gpus, tp=tp, lengths="github-like", dtype="fp8", seed=seed,
                      max_context_tokens=2**18)
    plan = make_plan(req, "hdp")
    validate(plan)
    assert all(math.isfinite(s.predicted.step_time_s) for s in plan.steps)


def test_domain_defaults_to_a_node_and_stays_out_of_existing_presets():
    h100 = load_cluster("dgx-h100")
    assert h100.gpus_per_domain is None and h100.domain_gpus == 8 and "gpus_per_domain" not in h100.to_dict()
    assert ClusterSpec.from_dict(h100.to_dict()) == h100
    with pytest.raises(SpecError, match=r"gpus_per_domain \(70\) must be a multiple of gpus_per_node \(4\)"):
        dataclasses.replace(load_cluster("gb200-nvl72"), gpus_per_domain=70)


def test_gb200_nvl72_domain_local_groups():
    """A 64-GPU unit inside one NVL72 rack is NVLink-local; on 8-GPU DGX B200 nodes it crosses nodes."""
    gb = Setup(load_model("llama-7b"), load_cluster("gb200-nvl72").with_gpus(144), TrainingSpec())
    assert gb.cluster.nodes == 36 and gb.mesh.gpus_per_domain == 72
    assert not gb.mesh.spans_domains(list(range(64))) and not gb.mesh.group_spans_domains(72)
    assert gb.mesh.spans_domains(list(range(64, 80))) and gb.mesh.group_spans_domains(73)
    b200 = Setup(load_model("llama-7b"), load_cluster("dgx-b200").with_gpus(64), TrainingSpec())
    assert b200.mesh.spans_domains(list(range(64)))
    tp8 = Setup(load_model("llama-7b"), load_cluster("gb200-nvl72").with_gpus(144), TrainingSpec(tp=8))
    assert tp8.mesh.hdp_per_domain == 9  # TP groups span compute trays inside the rack
    # the ring of a 64-rank unit is priced over NVLink inside the rack
    cm = CostModel(gb, load_profile("gb200.analytic"))
    lengths = np.full(1, 2**20)
    intra = cm.price_units(lengths, np.array([0]), degree=64, inter_node=gb.mesh.spans_domains(list(range(64))))
    inter = cm.price_units(lengths, np.array([0]), degree=64, inter_node=True)
    assert intra.ring_comm_s[0] < inter.ring_comm_s[0]


def test_gb200_plan_places_units_inside_racks():
    req = PlanRequest(cluster="gb200-nvl72", gpus=144, lengths="byted-like", dtype="fp8")
    plan = make_plan(req, "hdp")
    validate(plan)
    cm = build_cost_model(req)
    assert math.isfinite(simulate_step(plan.steps[0], cm).step_time_s)
    sizes = [len(u.hdp_ranks) for u in plan.steps[0].units]
    assert max(sizes) > 8  # groups beyond one 4-GPU tray (and beyond an 8-GPU HGX node)
    assert all(not cm.setup.mesh.spans_domains(sorted(u.hdp_ranks)) for u in plan.steps[0].units
               if len(u.hdp_ranks) <= 72)


def test_fp8_gemm_measurement_path():
    """`meshplan profile` times fp8 GEMMs with torch._scaled_mm (GPUs only in a profile run; the call itself is
    checked here on the CPU), beside a main dtype, on 16-aligned shapes."""
    pytest.importorskip("torch")
    from profiles.measure import GemmPoint, MeasureError, TimingConfig, gemm_points, plan_config
    from profiles.measure.gemm import fp8_supported, time_gemm

    if not fp8_supported("cpu"):
        pytest.skip("this torch has no fp8 GEMM")
    assert time_gemm(GemmPoint(32, 16, 64, "fp8"), TimingConfig(1, 2, 2, float("inf")), "cpu") > 0
    cfg = plan_config("cuda", quick=True, nproc=1, dtypes=("fp8", "bf16"), model_shapes=(("m.x", 4104, 4096),))
    assert cfg.main_dtype == "bf16"
    fp8 = [p for p in gemm_points(cfg) if p.dtype == "fp8"]
    assert fp8 and all(p.m % 16 == 0 and p.n % 16 == 0 and p.k % 16 == 0 for p in fp8)
    assert any(p.n == 4104 for p in gemm_points(cfg) if p.dtype == "bf16") and not any(p.n == 4104 for p in fp8)
    with pytest.raises(MeasureError, match="fp8 GEMMs are measured beside a main dtype"):
        plan_config("cuda", quick=True, nproc=1, dtypes=("fp8",))
