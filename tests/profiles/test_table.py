"""Profile tables: interpolation, JSON round trip, corruption, analytic files match their generator."""

import json

import numpy as np
import pandas as pd
import pytest

from profiles import analytic
from profiles.table import Fingerprint, Profile, ProfileError, load_profile, loglog_interp, profile_names


def test_interp_exact_on_grid_and_monotone_between():
    xs = np.array([1.0, 10.0, 100.0, 1000.0])
    ys = np.array([2.0, 3.0, 30.0, 400.0])
    assert np.allclose(loglog_interp(xs, xs, ys), ys)
    q = np.geomspace(1, 1000, 500)
    v = loglog_interp(q, xs, ys)
    assert np.all(np.diff(v) >= 0)
    # extrapolation: floor below, proportional above
    assert loglog_interp(0.1, xs, ys, below="clamp") == pytest.approx(2.0)
    assert loglog_interp(2000, xs, ys, above="proportional") == pytest.approx(800.0)


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


def test_round_trip_exact(tmp_path):
    p = analytic.build(analytic.H100)
    path = p.save(tmp_path / "p.json")
    q = Profile.load(path)
    assert q.content_dict() == p.content_dict()
    assert q.fingerprint.sha256 == p.compute_sha256()
    assert path.read_text() == q.to_json()


def test_corrupt_and_truncated_profiles(tmp_path):
    text = analytic.build(analytic.A100).to_json()
    (tmp_path / "t.json").write_text(text[: len(text) // 2])
    with pytest.raises(ProfileError, match="truncated or corrupt"):
        Profile.load(tmp_path / "t.json")
    d = json.loads(text)
    d["tables"]["gemm"]["rows"][0][-1] *= 2
    (tmp_path / "e.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="sha256 mismatch"):
        Profile.load(tmp_path / "e.json")
    with pytest.raises(ProfileError, match="unknown profile"):
        load_profile("no-such-profile")


def test_negative_times_rejected():
    fp = Fingerprint(name="x", device="d", source="measured", created="2026-01-01")
    with pytest.raises(ProfileError, match="non-positive"):
        Profile(fp, {"gemm": pd.DataFrame([(1, 1, 1, "fp32", -1.0)], columns=["m", "n", "k", "dtype", "time_s"])})


def test_lookups_grow_with_size():
    p = load_profile("h100-sxm.analytic")
    g = p.gemm_time_s(np.array([256, 1024, 4096, 16384]), 4096, 4096)
    assert np.all(np.diff(g) > 0)
    a = p.attention_time_s(np.array([512, 4096, 65536]), heads=32, head_dim=128)
    assert np.all(np.diff(a) > 0)
    c = p.collective_time_s("all_reduce", np.array([2**10, 2**20, 2**30]), 8)
    assert np.all(np.diff(c) > 0)
    # busbw never exceeds the published plateau
    busbw = 2**30 * 2 * 7 / 8 / p.collective_time_s("all_reduce", 2**30, 8)
    assert busbw <= 466e9
    assert set(profile_names()) >= {"h100-sxm.analytic", "a100-sxm-80gb.analytic"}


# -- a plan finds its profile again; a profile of another device is a warning -----------------------

def _tiny_plan(profile: str):
    from planner.api import PlanRequest, make_plan
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, profile=profile, max_context_tokens=4096,
                      tokens_per_step=16384)
    return make_plan(req, "static")


def test_plan_records_profile_file_and_simulate_finds_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli import app
    from planner.api import cost_model_for_plan
    prof_path = tmp_path / "mine.json"
    load_profile("local-cpu.measured").save(prof_path)
    monkeypatch.chdir(tmp_path)  # a relative --profile, as a user types it
    plan = _tiny_plan("mine.json")
    ref = plan.meta["profile"]
    assert ref["path"] == str(prof_path.resolve()) and ref["sha256"] == load_profile(str(prof_path)).fingerprint.sha256
    plan.save(tmp_path / "plan.json")
    monkeypatch.chdir("/")  # simulate from elsewhere, without --profile
    assert cost_model_for_plan(plan).profile.fingerprint.sha256 == ref["sha256"]
    runner = CliRunner()
    res = runner.invoke(app, ["simulate", str(tmp_path / "plan.json"), "--json"])
    assert res.exit_code == 0, res.output
    # the file edited since: a one-line error naming --profile
    p = load_profile(str(prof_path))
    p.constants["peak_bf16_flops"] = {**p.constants["peak_bf16_flops"], "value": 1.0}
    p.save(prof_path)
    with pytest.raises(ProfileError, match="changed since the plan was made.*--profile"):
        cost_model_for_plan(plan)
    assert cost_model_for_plan(plan, str(prof_path)).profile.constant("peak_bf16_flops") == 1.0
    # the file gone
    prof_path.unlink()
    res = runner.invoke(app, ["simulate", str(tmp_path / "plan.json")])
    assert res.exit_code == 2 and "is gone" in res.output and "--profile" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_plan_with_a_shipped_profile_records_no_path():
    from planner.api import cost_model_for_plan
    plan = _tiny_plan("local-cpu.measured")
    assert "path" not in plan.meta["profile"] and plan.meta["profile"]["name"] == "local-cpu.measured"
    assert cost_model_for_plan(plan).profile.fingerprint.name == "local-cpu.measured"


@pytest.mark.parametrize("cluster,profile,warns", [
    ("dgx-h100", "local-cpu.measured", True),  # the CPU profile for H100s
    ("dgx-h100", "a100-sxm-80gb.analytic", True),  # another GPU's
    ("dgx-h100", "h100-sxm.analytic", False),
    ("local-cpu", "local-cpu.measured", False),
    ("local-cpu", "h100-sxm.analytic", True),
])
def test_profile_of_another_device_warns(cluster, profile, warns):
    import warnings

    from planner.api import PlanRequest, build_cost_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = build_cost_model(PlanRequest(model="tiny", cluster=cluster, gpus=4, profile=profile,
                                          max_context_tokens=4096))
    msgs = [str(w.message) for w in caught if "describes" in str(w.message)]
    assert cm.profile.fingerprint.name == profile  # a warning, never an error
    assert len(msgs) == (1 if warns else 0), msgs
    if warns:
        assert profile in msgs[0] and cm.setup.cluster.gpu in msgs[0]


def test_device_kind_names():
    from planner.api import _device_kind
    assert _device_kind("NVIDIA H100 80GB HBM3 (host cpu: Intel(R) Xeon(R) Platinum 8480+, 224 cores)") == "h100"
    assert _device_kind("NVIDIA A100-SXM4-80GB") == "a100" and _device_kind("AMD Instinct MI300X") == "mi300x"
    assert _device_kind("cpu: AMD EPYC 9654 (2 cores)") == "cpu" and _device_kind("CPU (gloo)") == "cpu"
    assert _device_kind("my accelerator") is None


def test_require_tables_names_the_empty_ones():
    fp = Fingerprint(name="part", device="d", source="measured", created="2026-01-01")
    p = Profile(fp, {"gemm": pd.DataFrame([(1, 1, 1, "fp32", 1e-6)], columns=["m", "n", "k", "dtype", "time_s"])})
    p.require_tables(("gemm",))
    with pytest.raises(ProfileError, match="'part' has no rows in table.s. attention, collective, host_copy"):
        p.require_tables()
