"""Profile tables: interpolation, JSON round trip, corruption, lookups, required tables."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from profiles import analytic
from profiles.table import (Fingerprint, Profile, ProfileError, attention_flops, load_profile, loglog_interp,
                            profile_names)


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
    assert np.all(np.diff(g) >= 0) and np.all(np.diff(g[1:]) > 0)  # 256 and 1024 rows: one wave of tiles each
    a = p.attention_time_s(np.array([512, 4096, 65536]), heads=32, head_dim=128)
    assert np.all(np.diff(a) > 0)
    c = p.collective_time_s("all_reduce", np.array([2**10, 2**20, 2**30]), 8)
    assert np.all(np.diff(c) > 0)
    # busbw never exceeds the published plateau
    busbw = 2**30 * 2 * 7 / 8 / p.collective_time_s("all_reduce", 2**30, 8)
    assert busbw <= 466e9
    assert set(profile_names()) >= {"h100-sxm.analytic", "a100-sxm-80gb.analytic"}


def test_a_whole_short_document_costs_the_attention_grids_smallest_length():
    p = load_profile("h100-sxm.analytic")  # its attention grid starts at 128 tokens
    kw = dict(heads=32, head_dim=128)
    floor = float(p.attention_time_s(128, **kw))
    whole = p.attention_time_s(np.array([8, 64, 128, 256]), per_document=True, **kw)
    assert whole[:3] == pytest.approx([floor] * 3) and whole[3] > floor
    assert p.attention_time_s(256, per_document=True, **kw) == pytest.approx(p.attention_time_s(256, **kw))
    # a sharded document's blocks keep the rate: 64 tokens are a quarter of 128's causal FLOPs
    assert float(p.attention_time_s(64, **kw)) == pytest.approx(floor / 4, rel=0.05)
    assert float(p.attention_time_s(0, per_document=True, **kw)) == 0.0


def test_require_tables_names_the_empty_ones():
    fp = Fingerprint(name="part", device="d", source="measured", created="2026-01-01")
    p = Profile(fp, {"gemm": pd.DataFrame([(1, 1, 1, "fp32", 1e-6)], columns=["m", "n", "k", "dtype", "time_s"])})
    p.require_tables(("gemm",))
    with pytest.raises(ProfileError, match="'part' has no rows in table.s. attention, collective, host_copy"):
        p.require_tables()


def test_attention_rate_between_measured_head_dims_is_interpolated():
    p = load_profile("h100-sxm.analytic")  # rows at head dims 64 and 128
    assert sorted(set(p.tables["attention"]["head_dim"])) == [64, 128]

    def rate(d: int) -> float:
        return float(attention_flops(8192, 32, d, True, "fwd") / p.attention_time_s(8192, heads=32, head_dim=d))

    r64, r96, r128 = rate(64), rate(96), rate(128)
    assert r64 < r96 < r128  # not the nearest dim's rate: a 96-dim head sits between
    w = math.log(96 / 64) / math.log(128 / 64)
    assert r96 == pytest.approx(math.exp((1 - w) * math.log(r64) + w * math.log(r128)))
    assert rate(32) == pytest.approx(r64) and rate(256) == pytest.approx(r128)  # no extrapolation outside


def test_concurrent_groups_use_their_rows_else_a_group_alone():
    fp = Fingerprint(name="conc", device="d", source="measured", created="2026-01-01")
    rows = [("all_reduce", "intra", 2, c, s, s / bw) for c, bw in ((1, 4e9), (2, 1e9)) for s in (2**20, 2**24)]
    cols = ["op", "scope", "group_size", "concurrent_groups", "bytes", "time_s"]
    p = Profile(fp, {"collective": pd.DataFrame(rows, columns=cols)})
    assert float(p.collective_time_s("all_reduce", 2**22, 2)) == pytest.approx(2**22 / 4e9)
    assert float(p.collective_time_s("all_reduce", 2**22, 2, "intra", 2)) == pytest.approx(2**22 / 1e9)
    # no rows for 4 groups at once: priced as one group alone (and 'inter' falls back to the intra rows)
    assert float(p.collective_time_s("all_reduce", 2**22, 2, "inter", 4)) == pytest.approx(2**22 / 4e9)


def test_a_collectives_host_cpu_is_read_from_its_column_log_log_in_bytes():
    fp = Fingerprint(name="cpu", device="cpu", source="measured", created="2026-01-01")
    rows = [("send_recv", "intra", g, c, s, 1e-3, cpu) for g in (2, 4) for c, k in ((1, 1.0), (2, 3.0))
            for s, cpu in ((1_000, 1e-4 * k * g), (1_000_000, 1e-3 * k * g))]
    cols = ["op", "scope", "group_size", "concurrent_groups", "bytes", "time_s", "cpu_s"]
    p = Profile(fp, {"collective": pd.DataFrame(rows, columns=cols)})
    assert float(p.collective_cpu_s("send_recv", 1_000, 2)) == pytest.approx(2e-4)
    assert float(p.collective_cpu_s("send_recv", 10**4.5, 2)) == pytest.approx(2 * 10**-3.5)  # log-log between
    assert float(p.collective_cpu_s("send_recv", 1e8, 2)) == pytest.approx(2e-3)  # held beyond the rows
    assert float(p.collective_cpu_s("send_recv", 1_000, 2, "intra", 2)) == pytest.approx(6e-4)  # two rings at once
    assert float(p.collective_cpu_s("send_recv", 1_000, 3)) == pytest.approx(2e-4)  # the largest group up to 3
    assert float(p.collective_cpu_s("send_recv", 1_000, 8, "inter", 4)) == pytest.approx(4e-4)  # intra, one ring
    bare = Profile(fp, {"collective": pd.DataFrame([r[:-1] for r in rows], columns=cols[:-1])})
    assert float(bare.collective_cpu_s("send_recv", 1_000, 2)) == 0.0  # a profile measured before the column
    assert float(load_profile("h100-sxm.analytic").collective_cpu_s("send_recv", 1e6, 2)) == 0.0


def _lookups(p: Profile) -> np.ndarray:
    """One of each lookup the cost model makes, on a profile's tables."""
    sizes = np.array([1e3, 1e5, 1e7])
    return np.concatenate([
        p.gemm_time_s(np.array([64.0, 512.0, 4096.0]), 128, 64),  # a measured table's own (n, k) series
        p.gemm_time_s(np.array([100.0, 3000.0]), 1000, 700),  # the time-vs-FLOPs curve
        p.attention_time_s(np.array([100.0, 2000.0]), heads=8, head_dim=96, direction="bwd"),
        p.collective_time_s("all_reduce", sizes, 2), p.collective_time_s("send_recv", sizes, 2),
        p.collective_cpu_s("send_recv", sizes, 2), p.host_copy_time_s(sizes, "d2h"),
        p.memory_time_s(sizes)])


@pytest.mark.parametrize("name", ["local-cpu.measured", "h100-sxm.analytic"])
def test_a_profile_with_scaled_times_prices_as_one_built_from_its_tables(name):
    factors = {"gemm": 1.3, "attention": 0.8, "memory": 2.0, "collective": 1.5, "host_copy": 3.0}
    base = load_profile(name)
    early = base.with_times_scaled(factors)  # made before the base built any curve: it asks the base when priced
    got = _lookups(early)
    built = Profile.from_dict(json.loads(early.to_json()))  # the same tables, every curve built from them
    assert np.allclose(got, _lookups(built), rtol=1e-12, atol=0)
    assert np.allclose(_lookups(base.with_times_scaled(factors)), got, rtol=1e-12, atol=0)  # base's curves, rescaled
    twice = base.with_times_scaled({"gemm": 1.3, "attention": 2.0}).with_times_scaled(
        {"attention": 0.4, "memory": 2.0, "collective": 1.5, "host_copy": 3.0})  # the factors compose
    assert np.allclose(_lookups(twice), got, rtol=1e-12, atol=0)
    assert np.array_equal(_lookups(base), _lookups(load_profile(name)))  # the base is left as it was
    assert early.path is None
    assert np.allclose(early.tables["host_copy"]["time_s"], 3.0 * base.tables["host_copy"]["time_s"], rtol=1e-15)
    early.constants["x"] = {"value": 1.0}
    assert "x" not in base.constants  # its own constants
    for bad in ({"gemm": 0.0}, {"gemm": math.nan}, {"flops": 2.0}):
        with pytest.raises(ProfileError, match="cannot scale"):
            base.with_times_scaled(bad)
    fit = base.with_times_scaled(factors, fingerprint=Fingerprint("fit", "d", "measured", "2026-12-08"))
    with pytest.raises(ProfileError, match="profile 'fit' has no int4 GEMM table"):  # its own name, not its base's
        fit.gemm_time_s(1024.0, 1000, 700, dtype="int4")
