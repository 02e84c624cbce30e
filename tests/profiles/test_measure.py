"""profiles/measure: each micro-benchmark on CPU in seconds, the collective worker under torchrun
(gloo), resume, corrupt files, the fingerprint, comparison, merging a table into a profile, and the
shipped measured profile."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from profiles.measure import (CPU_PASSES, MeasureConfig, MeasureError, TimingConfig, attention_points,  # noqa: E402
                              cold_copies, collective_cases, collective_timing, collector_paused, cpu_model_name,
                              gemm_points, host_copy_points, in_passes, last_level_cache_bytes, memory_points,
                              plan_config, time_op)
from profiles.measure import runner  # noqa: E402
from profiles.measure.attention import measure_attention  # noqa: E402
from profiles.measure.gemm import measure_gemm  # noqa: E402
from profiles.measure.host_copy import measure_host_copy  # noqa: E402
from profiles.measure.memory import measure_memory  # noqa: E402
from profiles.table import Profile, ProfileError, load_profile  # noqa: E402

FAST = TimingConfig(warmup=1, repeats=5, min_repeats=3, budget_s=0.2)


def tiny_cfg(**kw):
    """The quick CPU plan, shrunk so each benchmark runs in a second or two."""
    base = plan_config("cpu", quick=True, nproc=2, max_bytes=16 * 2**20)
    return dataclasses.replace(base, timing=FAST, **kw)


def positive_finite(df: pd.DataFrame) -> bool:
    t = df["time_s"].to_numpy(float)
    return len(t) > 0 and bool(np.isfinite(t).all() and (t > 0).all())


@pytest.fixture(autouse=True)
def quick_concurrency(monkeypatch, request):
    """run_profile measures the concurrency slowdowns (tens of seconds of spawned processes); the runner tests take
    fixed ones, test_concurrency_slowdowns_measured runs the real probe."""
    if request.node.name != "test_concurrency_slowdowns_measured":
        from profiles.measure import concurrency
        monkeypatch.setattr(concurrency, "measure_concurrency",
                            lambda cores: {"cores_busy_slowdown": 1.1, "cores_shared_slowdown": 2.2})


@pytest.fixture(autouse=True)
def quick_wake(monkeypatch, request):
    """run_profile with the collective table measures what a meeting costs on busy cores (torchrun jobs); the
    runner tests take fixed ones (QUICK_MEETINGS_S; one rank a core only where there are two cores for a pair), the
    test_meetings_are_measured_* tests run the real worker."""
    if not request.node.name.startswith("test_meetings_are_measured_"):
        from profiles.measure import wake
        monkeypatch.setattr(wake, "measure_meetings_s", lambda cores: {
            k: v for k, v in QUICK_MEETINGS_S.items() if k == 2 or min(int(cores), 2) >= 2})


QUICK_MEETINGS_S = {2: {2e-3: 3e-3, 20e-3: 5e-3}, 1: {2e-3: 1e-3, 20e-3: 1e-3}}  # ranks a core -> segment -> meeting


@pytest.fixture(autouse=True)
def one_thread():
    """Benchmarks run single-threaded as in run_profile; restore torch's setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- micro-benchmarks -------------------------------------------------------------------------------

def test_time_op_repeats_and_setup_outside_window():
    calls = []
    samples = time_op(lambda arg: calls.append(arg), FAST, setup=lambda: time.sleep(0.01) or "x")
    assert 3 <= len(samples) <= 5 and all(s < 0.005 for s in samples)  # the 10 ms setup is not timed
    assert calls == ["x"] * (1 + len(samples))


def test_collector_paused_while_timed_and_restored():
    seen = []
    time_op(lambda _: seen.append(gc.isenabled()), FAST, setup=lambda: seen.append(gc.isenabled()))
    assert seen and not any(seen)  # setup (a collective's barrier) and the timed calls alike
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a caller's own choice is kept
    finally:
        gc.enable()


def test_cpu_collectives_take_enough_repeats_for_their_mean():
    # gloo's heavy tail (docs/COSTMODEL.md): a row's mean needs tens of repeats; big messages keep the byte budget
    for quick in (True, False):
        cfg = plan_config("cpu", quick=quick, nproc=4)
        assert collective_timing(cfg, 4096).repeats >= 60
        assert collective_timing(cfg, 1 << 30).repeats == cfg.coll_timing.min_repeats


def test_gemm_positive_and_grows_with_m():
    cfg = tiny_cfg(gemm_tokens=(64, 256, 2048), model_shapes=(("t.o", 256, 256),), gemm_generic_edges=(64, 256),
                   gemm_generic_nk=128)
    pts = gemm_points(cfg)
    df = measure_gemm(cfg, pts)
    assert positive_finite(df) and len(df) == len(pts)
    s = df[(df.n == 256) & (df.k == 256)].set_index("m")["time_s"]
    assert s[2048] > s[64] * 4  # 32x the FLOPs
    cube = df[(df.m == df.n) & (df.n == df.k)].set_index("m")["time_s"]
    assert cube[256] > cube[64]


def test_gemm_points_keep_two_m_per_model_shape_past_the_cap():
    cfg = tiny_cfg(gemm_flop_cap=1.0, model_shapes=(("big.qkv", 12288, 4096),))
    ms = sorted(p.m for p in gemm_points(cfg) if (p.n, p.k) == (12288, 4096))
    assert ms == list(cfg.gemm_tokens[:2])


def test_attention_fwd_bwd_positive_grows_and_derates():
    cfg = tiny_cfg(attn_heads=(2, 1), attn_head_dims=(64,), attn_lengths=(64, 512), attn_pack_tokens=512,
                   attn_docmask_lengths=(64,))
    pts = attention_points(cfg)
    assert {(p.layout, p.direction) for p in pts} == {("varlen", "fwd"), ("varlen", "bwd"), ("docmask", "fwd"),
                                                     ("docmask", "bwd")}
    # varlen with and without the causal mask (a ring step's full rectangles), the document mask causal only
    assert {(p.layout, p.causal) for p in pts} == {("varlen", True), ("varlen", False), ("docmask", True)}
    df = measure_attention(cfg, pts)
    assert positive_finite(df) and set(df["impl"]) == {"sdpa_loop", "sdpa", "sdpa_docmask"}
    v = df[df.layout == "varlen"]
    for d in ("fwd", "bwd"):
        for causal in (True, False):
            s = v[(v.direction == d) & (v.causal == causal)].set_index("doc_len")["time_s"]
            assert s[512] > s[64]  # same 512 tokens per call, 8x the attention work
    # the cost model's lookup reads only varlen rows: docmask rows (T^2 work) must not move it
    prof = _profile({"attention": df})
    only = _profile({"attention": v.drop(columns=["layout"])})
    for d in ("fwd", "bwd"):
        kw = dict(heads=2, head_dim=64, direction=d, dtype="fp32")
        assert prof.attention_time_s([64, 512], **kw) == pytest.approx(only.attention_time_s([64, 512], **kw))


def test_passes_interleave_and_keep_each_points_fastest():
    times = {("a", 0): 3.0, ("b", 0): 1.0, ("a", 1): 2.0, ("b", 1): 5.0, ("a", 2): 4.0, ("b", 2): 0.5}
    calls: list[str] = []
    done: list[tuple] = []
    progress: list[float] = []

    def time_point(p: str) -> tuple[float, str]:
        t = times[(p, sum(c == p for c in calls))]
        calls.append(p)
        return t, f"{p}@{t}"

    best = in_passes(["a", "b"], 3, time_point, lambda i, t, d: done.append((i, t, d)), progress.append)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # alternately ascending and descending
    assert best == [(2.0, "a@2.0"), (0.5, "b@0.5")]  # each point's fastest pass, with its detail
    assert done == [(0, 2.0, "a@2.0"), (1, 0.5, "b@0.5")] and progress[-1] == 1.0  # final rows, after every pass
    done.clear()
    in_passes(["a"], 1, lambda p: (1.0, None), lambda i, t, d: done.append(len(done)))
    assert done == [0]  # one pass: each row as soon as it is timed
    assert plan_config("cpu", quick=True, nproc=2).passes == CPU_PASSES > 1
    assert plan_config("cuda", quick=True, nproc=2).passes == 1


def test_host_copy_memcpy_grows_with_size():
    cfg = tiny_cfg(copy_sizes=(4096, 2**20, 16 * 2**20))
    df = measure_host_copy(cfg, host_copy_points(cfg))
    assert positive_finite(df) and set(df["direction"]) == {"memcpy"}
    s = df.set_index("bytes")["time_s"]
    assert s[16 * 2**20] > s[4096]


def test_memory_points_plan():
    quick = plan_config("cpu", quick=True, nproc=4)
    assert quick.mem_sizes[0] == 4096 and quick.mem_sizes[-1] == 256 * 2**20  # past a CPU's L3
    assert all(b == 2 * a for a, b in zip(quick.mem_sizes, quick.mem_sizes[1:]))
    pts = memory_points(quick)
    assert [p.nbytes for p in pts] == list(quick.mem_sizes) and {p.dtype for p in pts} == {"fp32"}
    full = plan_config("cuda", quick=False, nproc=8)
    assert full.mem_sizes[-1] == 2**30 and full.mem_rounds > quick.mem_rounds
    assert {p.dtype for p in memory_points(full)} == {"bf16"}
    # --max-bytes and the memory available cap the grid; the plan survives the partial file's JSON
    assert plan_config("cpu", quick=True, nproc=4, max_bytes=2**20).mem_sizes[-1] == 2**20
    assert plan_config("cpu", quick=False, nproc=4, mem_cap_bytes=3 * 2**20).mem_sizes[-1] == 2**21
    assert MeasureConfig.from_key(json.loads(json.dumps(full.key()))) == full


def test_memory_kernel_minimum_over_passes_grows_with_bytes():
    cfg = tiny_cfg(mem_sizes=(4096, 2**20, 16 * 2**20), mem_rounds=3, mem_timing=FAST)
    rows, fractions = [], []
    df = measure_memory(cfg, memory_points(cfg), on_point=rows.append, on_progress=fractions.append)
    assert positive_finite(df) and list(df["bytes"]) == [4096, 2**20, 16 * 2**20]  # fp32: whole elements
    assert (df["time_s"] <= df["median_s"]).all()  # the minimum over every pass, the median beside it
    assert [tuple(r) for r in df.itertuples(index=False)] == rows
    assert len(fractions) == 3 * 3 and fractions[-1] == 1.0
    s = df.set_index("bytes")["time_s"]
    assert s[16 * 2**20] > 4 * s[2**20] and s[2**20] > s[4096]
    prof = _profile({"memory": df[["bytes", "time_s"]]})
    assert prof.memory_time_s(2**30) > prof.memory_time_s(2**20) > 0


def test_memory_table_through_the_runner(tmp_path):
    req = _small_request(tmp_path, ops=("memory",))
    seen = []
    res = runner.run_profile(req, progress=lambda t, d, n, r: seen.append((t, d, n)))
    p = Profile.load(req.out)
    n = len(plan_config("cpu", quick=True, nproc=2, max_bytes=2**20).mem_sizes)
    assert len(p.tables["memory"]) == n and positive_finite(p.tables["memory"])
    assert p.tables["memory"]["bytes"].max() == 2**20  # --max-bytes
    assert seen[-1] == ("memory", n, n) and res.seconds["memory"] > 0
    assert "Memory: y = x + 1" in p.fingerprint.notes and "load average at its start" in p.fingerprint.notes
    assert all(p.tables[t].empty for t in ("gemm", "attention", "collective", "host_copy"))
    # each slow elementwise kind measured against the table's kernel (profiles/measure/memory.py)
    kinds = {k: v["value"] for k, v in p.constants.items() if k.startswith("memory_kind_")}
    assert set(kinds) == {f"memory_kind_{k}" for k in ("mixed", "broadcast", "softmax", "strided")}
    assert all(0 < v < 10 for v in kinds.values()) and p.memory_kind_ratio("strided") == kinds["memory_kind_strided"]


def test_merge_tables_adds_memory_and_keeps_the_rest(tmp_path):
    base = load_profile("local-cpu.measured")
    mem = pd.DataFrame({"bytes": [4096, 2**20], "time_s": [3e-6, 5e-5]})
    kind = {"memory_kind_strided": {"value": 0.4, "unit": "x table bandwidth", "source": "new run"}}
    measured = Profile(dataclasses.replace(base.fingerprint, notes="new run", sha256=""), {"memory": mem},
                       constants={**kind, "host_probe_s": {"value": 1.0}})
    merged = runner.merge_tables(base, measured, ("memory",), "Memory added on 2026-12-03.")
    assert merged.tables["memory"].equals(mem) and merged.fingerprint.notes.endswith(" Memory added on 2026-12-03.")
    for name in ("gemm", "attention", "collective", "host_copy"):
        assert merged.tables[name].equals(base.tables[name]), name
    # the memory table's kinds come with it; every other constant is the base's
    assert merged.constants == {**base.constants, **kind} and merged.fits == base.fits
    fp, fp0 = merged.fingerprint, base.fingerprint
    assert (fp.name, fp.device, fp.created, fp.versions) == (fp0.name, fp0.device, fp0.created, fp0.versions)
    merged.save(tmp_path / "m.json")
    loaded = Profile.load(tmp_path / "m.json")  # the sha256 was recomputed: it loads
    assert loaded.fingerprint.sha256 == merged.fingerprint.sha256 != base.fingerprint.sha256
    assert loaded.memory_time_s(2**20) == pytest.approx(5e-5)
    other = Profile(dataclasses.replace(measured.fingerprint, device="cpu: elsewhere"), {"memory": mem})
    with pytest.raises(MeasureError, match="devices differ"):
        runner.merge_tables(base, other, ("memory",), "x")
    with pytest.raises(MeasureError, match="no rows in gemm"):
        runner.merge_tables(base, measured, ("gemm",), "x")
    with pytest.raises(MeasureError, match="unknown table"):
        runner.merge_tables(base, measured, ("flops",), "x")


def test_plan_collective_cases_groups_and_concurrency():
    cfg = plan_config("cpu", quick=False, nproc=4, max_bytes=2**20)
    cases = collective_cases(cfg, 4)
    combos = {(c.op, c.group_size, c.concurrent_groups) for c in cases}
    assert ("all_reduce", 2, 2) in combos and ("send_recv", 3, 1) in combos and ("all_to_all", 4, 1) in combos
    assert len(cases) == 5 * 4 * len(cfg.coll_sizes)  # g=2 alone and x2, g=3, g=4
    assert cfg.coll_sizes[0] == 1024 and cfg.coll_sizes[-1] == 2**20


def test_bad_requests_are_measure_errors(tmp_path):
    with pytest.raises(MeasureError, match="--ops"):
        runner.ProfileRequest(out=tmp_path / "x.json", ops=("gemm", "flops"))
    with pytest.raises(MeasureError, match="max-bytes"):
        runner.ProfileRequest(out=tmp_path / "x.json", max_bytes=10)
    assert issubclass(MeasureError, ProfileError)


# -- collectives under torchrun ----------------------------------------------------------------------

def test_a_collective_row_is_the_mean_of_its_repeats():
    """Gloo on a shared host: most calls 0.4 ms, one in five a scheduler tick later; a step that makes many calls pays
    the mean, which the row keeps (a median would say 0.4 ms)."""
    from profiles.measure.collectives import row_time_s

    assert row_time_s([4e-4] * 8 + [4.4e-3] * 2) == pytest.approx(1.2e-3)


@pytest.mark.torchrun
def test_collectives_two_gloo_ranks():
    cfg = plan_config("cpu", quick=True, nproc=2, max_bytes=16 * 2**20)
    t0 = time.perf_counter()
    seen = []
    df = runner.run_collectives(cfg, on_progress=lambda d, n: seen.append((d, n)), check=True)
    assert time.perf_counter() - t0 < 60
    assert positive_finite(df) and len(df) == len(collective_cases(cfg, 2)) == seen[-1][1]
    assert set(df["op"]) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"}
    assert set(df["scope"]) == {"intra"} and set(df["group_size"]) == {2}
    assert set(df[df.op != "send_recv"]["impl"]) == {"native"}
    for op, sub in df.groupby("op"):
        s = sub.set_index("bytes")["time_s"]
        assert s.iloc[-1] > s.iloc[:2].min(), op  # 16 MiB takes longer than 1-4 KiB (robust to a stall)
    assert np.allclose(df["algbw_bytes_per_s"], df["bytes"] / df["time_s"])
    prof = _profile({"collective": df})
    assert prof.collective_time_s("send_recv", 2**20, 2) > 0
    # each row's host CPU: a member's process time per call (not the repeats' sum: gloo's threads wait, they do not
    # spin, so a call's CPU stays within a few of its wall times)
    assert (df["cpu_s"] > 0).all() and (df["cpu_s"] < 4 * df["time_s"] + 1e-3).all()
    assert prof.collective_cpu_s("send_recv", 2**20, 2) > 0


@pytest.mark.torchrun
def test_p2p_rings_on_rank_subsets_three_ranks(tmp_path):
    """--check verifies every P2P algorithm against hand-computed results on the whole world and on a
    2-rank subset with the third rank idle; the 2-rank cases then run as subset rings."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m",
           "profiles.measure.collectives", "--out", str(out), "--quick", "--max-bytes", "4096",
           "--ops", "all_reduce,reduce_scatter", "--check"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                                  "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    df = pd.DataFrame(d["rows"], columns=d["columns"])
    assert set(zip(df.group_size, df.impl)) == {(2, "p2p_ring"), (3, "native")}
    assert set(df[df.group_size == 3]["bytes"]) == {1020, 4092}  # whole elements divisible by 3
    assert positive_finite(df)


# -- runner: fingerprint, resume, corruption ---------------------------------------------------------

def _profile(tables: dict) -> Profile:
    from profiles.table import Fingerprint
    return Profile(Fingerprint(name="t", device="cpu: test", source="measured", created="2026-01-01"), dict(tables))


def _small_request(tmp_path, ops=("gemm", "host_copy")):
    return runner.ProfileRequest(out=tmp_path / "m.measured.json", quick=True, ops=ops, max_bytes=2**20,
                                 nproc=2, device="cpu")


def test_fingerprint_records_device_and_measured_peak(tmp_path):
    res = runner.run_profile(_small_request(tmp_path))
    p = Profile.load(tmp_path / "m.measured.json")
    assert p.constant("cores_per_node") == len(os.sched_getaffinity(0))  # ranks beyond it share cores
    assert p.constant("cores_shared_slowdown") == 2.2  # the fixture's (quick_concurrency)
    # the host probe before and after the tables (a replay's is compared with it): one call takes milliseconds
    assert 1e-4 < p.constant("host_probe_s") < 1 and "before the tables" in p.constants["host_probe_s"]["source"]
    # other processes' load over the run (Linux): cores, never negative
    assert p.constant("host_other_cores") >= 0 and p.constants["host_other_cores"]["unit"] == "cores"
    fp = p.fingerprint
    assert fp.source == "measured" and fp.name == "m.measured"
    assert fp.device.startswith("cpu: ") and cpu_model_name() in fp.device
    assert fp.versions["torch"] == torch.__version__ and fp.versions["cuda"] == "none"
    assert fp.created[:4].isdigit() and fp.sha256 == p.compute_sha256()
    # The peak is the best rate of the main dtype: fp32 on most CPUs, bf16 where bf16 is fast (AMX,
    # AVX512-BF16); either way the dtype the cost model and the attention table use.
    main = runner.main_dtype(p)
    assert main in ("fp32", "bf16") and f"main dtype {main}" in fp.notes
    peak = p.constants["peak_bf16_flops"]
    g = p.tables["gemm"][p.tables["gemm"]["dtype"] == main]
    assert peak["value"] == pytest.approx((2 * g.m * g.n * g.k / g.time_s).max())
    assert peak["source"].startswith("measured") and f" {main} GEMM" in peak["source"]
    assert not (tmp_path / "m.measured.json.partial").exists()
    assert res.seconds["gemm"] > 0 and res.resumed == []


def test_resume_skips_finished_tables(tmp_path, monkeypatch):
    real = runner.measure_table
    calls = []

    def crash_on_host_copy(name, cfg, tick, **kw):
        calls.append(name)
        if name == "host_copy":
            raise KeyboardInterrupt  # the user pressed Ctrl-C after the GEMM table finished
        return real(name, cfg, tick, **kw)

    monkeypatch.setattr(runner, "measure_table", crash_on_host_copy)
    req = _small_request(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run_profile(req)
    partial = runner.partial_path(req.out)
    assert partial.exists() and not req.out.exists()
    assert set(json.loads(partial.read_text())["tables"]) == {"gemm"}

    calls.clear()
    monkeypatch.setattr(runner, "measure_table",
                        lambda name, cfg, tick, **kw: calls.append(name) or real(name, cfg, tick, **kw))
    res = runner.run_profile(req)
    assert calls == ["host_copy"] and res.resumed == ["gemm"]
    assert len(res.profile.tables["gemm"]) > 0 and not partial.exists()
    assert Profile.load(req.out).content_dict() == res.profile.content_dict()


def test_partial_from_another_plan_is_not_reused(tmp_path, monkeypatch):
    req = _small_request(tmp_path, ops=("host_copy",))
    plan = plan_config("cpu", quick=True, nproc=2).key()
    runner._write_partial(runner.partial_path(req.out), {"request": "something else"}, runner.PartialState(
        plan=plan, dtype_note="", tables={"host_copy": {"columns": ["direction", "pinned", "bytes", "time_s"],
                                                        "rows": [["memcpy", False, 4096, 123.0]], "seconds": 1}}))
    res = runner.run_profile(req)
    assert res.resumed == [] and res.profile.tables["host_copy"]["time_s"].max() < 1.0


def test_truncated_or_corrupt_profile_is_a_clear_error(tmp_path):
    good = tmp_path / "p.json"
    load_profile("local-cpu.measured").save(good)
    text = good.read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(ProfileError, match="truncated or corrupt"):
        Profile.load(tmp_path / "trunc.json")
    d = json.loads(text)
    d["tables"]["gemm"]["rows"][0][-1] *= 2  # a hand edit
    (tmp_path / "edited.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="sha256 mismatch"):
        Profile.load(tmp_path / "edited.json")
    res = subprocess.run([sys.executable, "-m", "cli", "profile", "--compare", str(tmp_path / "trunc.json"),
                          "h100-sxm.analytic"], capture_output=True, text=True)
    assert res.returncode == 2 and "truncated or corrupt" in res.stderr and "Traceback" not in res.stderr


# -- the shipped profile and --compare --------------------------------------------------------------------

def test_shipped_cpu_profile_is_complete():
    p = load_profile("local-cpu.measured")
    fp = p.fingerprint
    assert fp.source == "measured" and fp.device.startswith("cpu: ") and fp.notes.startswith("meshplan profile")
    for name in ("gemm", "attention", "collective", "host_copy", "memory"):
        assert positive_finite(p.tables[name]), name
    p.require_tables()  # every table a CostModel needs
    assert p.memory_time_s(2**28) > 100 * p.memory_time_s(4096) > 0
    assert set(p.tables["attention"]["head_dim"]) >= {16, 64, 128}  # tiny's head dim measured, not scaled
    assert p.constant("cores_per_node") >= 1 and p.constant("cores_shared_slowdown") >= 2.0
    assert {"alpha1_s_per_token2", "beta1_s_per_token", "gamma_s"} <= set(p.fits["tiny"])
    assert p.constant("peak_bf16_flops") > 0
    assert set(p.tables["collective"]["op"]) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                                                  "send_recv"}
    # lookups the cost model makes on it work and grow with size
    t = p.attention_time_s([256, 2048], heads=4, head_dim=16, direction="bwd", dtype="fp32")
    assert math.isfinite(t[1]) and t[1] > t[0]
    assert p.collective_time_s("all_reduce", 2**24, 4) > p.collective_time_s("all_reduce", 2**10, 4)


def test_compare_measured_with_analytic():
    cmp = {c.table: c for c in runner.compare_profiles(load_profile("local-cpu.measured"),
                                                       load_profile("h100-sxm.analytic"))}
    assert set(cmp) == {"gemm", "attention", "collective", "host_copy", "memory"}
    assert len(cmp["memory"].rows) > 0 and cmp["memory"].summary["at_largest"].iloc[0] > 10  # DRAM vs HBM
    g = cmp["gemm"]
    assert len(g.rows) > 0 and (g.rows["ratio"] > 1).all()  # a CPU core vs an H100
    cpu_dtypes = set(load_profile("local-cpu.measured").tables["gemm"]["dtype"])
    assert ("dtype" in g.note) == ("bf16" not in cpu_dtypes)  # rows of other dtypes compared: said so
    assert len(cmp["collective"].rows) > 0 and (cmp["collective"].summary["n"] > 0).all()
    # comparing a profile with itself gives ratio 1 everywhere
    same = runner.compare_profiles(load_profile("local-cpu.measured"), load_profile("local-cpu.measured"))
    for c in same:
        assert np.allclose(c.rows["ratio"], 1.0), c.table
    res = subprocess.run([sys.executable, "-m", "cli", "profile", "--compare", "local-cpu.measured",
                          "h100-sxm.analytic"], capture_output=True, text=True)
    assert res.returncode == 0 and "gemm" in res.stdout and "collective" in res.stdout
    assert "constants: A, B, A/B" in res.stdout and "peak_bf16_flops" in res.stdout


def test_compare_constants_side_by_side():
    cpu, h200 = load_profile("local-cpu.measured"), load_profile("h200-sxm.measured")
    c = runner.compare_constants(h200, cpu).set_index("constant")
    assert set(c.index) == set(h200.constants) | set(cpu.constants)
    peak = c.loc["peak_bf16_flops"]
    assert peak["ratio"] == pytest.approx(peak["a"] / peak["b"]) and peak["ratio"] > 100  # an H200 vs two CPU cores
    gpu = load_profile("h100-sxm.analytic")  # an analytic GPU's constants the CPU profile lacks (the SM count, ...)
    only = sorted(set(gpu.constants) - set(cpu.constants))[0]
    kind = runner.compare_constants(gpu, cpu).set_index("constant").loc[only]  # no ratio
    assert kind["a"] == gpu.constants[only]["value"] and np.isnan(kind["b"])
    assert np.isnan(kind["ratio"])
    same = runner.compare_constants(cpu, cpu)
    assert (same["a"] == same["b"]).all() and (same.loc[same["b"] != 0, "ratio"] == 1.0).all()


def test_cli_profile_needs_out_or_compare():
    res = subprocess.run([sys.executable, "-m", "cli", "profile"], capture_output=True, text=True)
    assert res.returncode == 2 and "--out" in res.stderr
    res = subprocess.run([sys.executable, "-m", "cli", "profile", "--out", "x.json", "--ops", "flops"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--ops" in res.stderr and "Traceback" not in res.stderr


# -- a CPU with fast bf16, Ctrl-C and resume, --json: on synthetic timings (seconds, any CPU) ---------

class FakeBench:
    """Synthetic timings in place of the micro-benchmarks: GEMM and attention at a fixed rate per dtype
    (bf16 `bf16_speedup` x fp32, so the dtype probe sees a fast-bf16 CPU when it is > 0.25), copies and
    collectives at a fixed bandwidth. `interrupt_at_attention` raises KeyboardInterrupt (Ctrl-C) before
    the attention point of that index, between two points as a real Ctrl-C would land."""

    def __init__(self, monkeypatch, bf16_speedup: float, interrupt_at_attention: int | None = None):
        from profiles.measure import attention as attn_mod, gemm as gemm_mod, host_copy as copy_mod, memory as mem_mod
        from profiles.table import attention_flops
        self.rate = {"fp32": 5e10, "bf16": 5e10 * bf16_speedup}
        self.attention_calls = 0
        self.interrupt_at = interrupt_at_attention

        def time_gemm(p, timing, device):
            return 2.0 * p.m * p.n * p.k / self.rate[p.dtype] + 1e-6

        def time_attention(p, cfg):
            if self.interrupt_at is not None and self.attention_calls == self.interrupt_at:
                raise KeyboardInterrupt
            self.attention_calls += 1
            fl = float(attention_flops(p.doc_len, p.heads, p.head_dim, p.causal, p.direction)) * p.docs
            return fl / (0.5 * self.rate[p.dtype] * min(1.0, p.doc_len / 1024)) + 1e-6, "fake"

        def run_collectives(cfg, ops=None, on_progress=None, check=False):
            rows = [(c.op, "intra", c.group_size, c.concurrent_groups, c.nbytes, 2e-5 + c.nbytes / 5e9)
                    for c in collective_cases(cfg, cfg.nproc)]
            return pd.DataFrame(rows, columns=["op", "scope", "group_size", "concurrent_groups", "bytes", "time_s"])

        monkeypatch.setattr(gemm_mod, "time_gemm", time_gemm)
        monkeypatch.setattr(attn_mod, "time_attention", time_attention)
        monkeypatch.setattr(copy_mod, "time_copy", lambda p, cfg: 1e-6 + p.nbytes / 1e10)

        def measure_memory(cfg, points, on_point=None, on_progress=None):
            rows = [(p.nbytes, 4e-6 + p.nbytes / 2e10, 5e-6 + p.nbytes / 2e10) for p in points]
            for row in rows:
                if on_point:
                    on_point(row)
            if on_progress:
                on_progress(1.0)
            return pd.DataFrame(rows, columns=mem_mod.COLUMNS)

        monkeypatch.setattr(mem_mod, "measure_memory", measure_memory)
        monkeypatch.setattr(runner, "run_collectives", run_collectives)


def test_fast_bf16_cpu_measures_attention_in_bf16_and_fp32(tmp_path, monkeypatch):
    """On a CPU whose bf16 GEMMs are fast the main dtype is bf16: attention (fwd and bwd) is planned and measured
    in bf16, the dtype the cost model looks up for bf16 plans, and in fp32, the CPU replay's default, so the profile
    prices plans of either (an fp32 plan failed: 'no fp32 attention fwd table')."""
    FakeBench(monkeypatch, bf16_speedup=4.0)
    dtypes, note = runner.choose_dtypes("cpu")
    assert dtypes[0] == "bf16" and "fp32" in dtypes
    req = runner.ProfileRequest(out=tmp_path / "my.json", quick=True, nproc=4, device="cpu")
    cfg = runner.build_config(req, "cpu", dtypes)
    assert cfg.main_dtype == "bf16"
    pts = attention_points(cfg)
    assert {p.dtype for p in pts} == {"bf16", "fp32"} and {p.direction for p in pts} == {"fwd", "bwd"}
    assert plan_config("cuda", quick=True, nproc=8).attention_dtypes == ("bf16",)  # GPUs: the main dtype alone
    # whatever order dtypes are given in, the main one comes first
    assert plan_config("cpu", quick=True, nproc=4, dtypes=("fp32", "bf16")).main_dtype == "bf16"

    from costmodel.presets import load_model
    from costmodel.specs import TrainingSpec
    from costmodel.timing import fit_layer_time

    def add_fits(p):
        p.fits["tiny"] = fit_layer_time(load_model("tiny"), TrainingSpec(dtype=runner.main_dtype(p)), p)

    res = runner.run_profile(req, post=add_fits)
    p = Profile.load(req.out)
    assert runner.main_dtype(p) == "bf16" and set(p.tables["attention"]["dtype"]) == {"bf16", "fp32"}
    assert set(p.tables["gemm"]["dtype"]) == {"bf16", "fp32"} and "bf16" in p.constants["peak_bf16_flops"]["source"]
    assert p.fits["tiny"]["alpha1_s_per_token2"] >= 0 and res.profile.fits == p.fits
    from planner.api import PlanRequest, build_cost_model
    cm = build_cost_model(PlanRequest(model="tiny", cluster="local-cpu", gpus=4, profile=str(req.out),
                                      max_context_tokens=4096))
    assert cm.dtype == "bf16" and float(cm.attn_bwd_s(2048)) > float(cm.attn_fwd_s(2048)) > 0
    fp32 = build_cost_model(PlanRequest(model="tiny", cluster="local-cpu", gpus=4, profile=str(req.out),
                                        max_context_tokens=4096, dtype="fp32"))
    assert fp32.dtype == "fp32" and float(fp32.attn_fwd_s(2048)) > 0


def test_slow_bf16_cpu_profiles_fp32_only(monkeypatch):
    FakeBench(monkeypatch, bf16_speedup=0.01)  # emulated bf16 (AVX2): ~100x below fp32
    dtypes, note = runner.choose_dtypes("cpu")
    assert dtypes == ("fp32",) and "not profiled" in note


def test_interrupted_profile_resumes_into_a_usable_profile(tmp_path, monkeypatch):
    """Ctrl-C mid-table: one line saying how to resume, exit 130, nothing at --out, every measured point
    kept; the same command then measures only the rest and writes a complete profile with its fits."""
    from typer.testing import CliRunner

    from cli import app
    import profiles.measure

    monkeypatch.setattr(profiles.measure, "CPU_PASSES", 1)  # one pass: rows as they come (GPU's; several: at the end)
    out = tmp_path / "my.json"
    args = ["profile", "--quick", "--out", str(out), "--nproc", "2", "--device", "cpu"]
    bench = FakeBench(monkeypatch, bf16_speedup=0.01, interrupt_at_attention=5)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130, res.output
    lines = [ln for ln in res.output.splitlines() if "rerun the same command to resume" in ln]
    assert len(lines) == 1 and "my.json.partial" in lines[0] and "Traceback" not in res.output
    assert not out.exists()
    part = json.loads(runner.partial_path(out).read_text())
    assert set(part["tables"]) == {"gemm"} and part["in_progress"]["table"] == "attention"
    first_rows = part["in_progress"]["rows"]
    assert len(first_rows) == 5

    bench.interrupt_at, bench.attention_calls = None, 0
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    n_attn = len(attention_points(runner.MeasureConfig.from_key(part["plan"])))
    assert bench.attention_calls == n_attn - 5  # the 5 saved points are not measured again
    assert summary["tables"]["gemm"]["resumed"] and summary["fits"] == ["tiny"]
    p = Profile.load(out)
    assert len(p.tables["attention"]) == n_attn and not runner.partial_path(out).exists()
    assert p.tables["attention"].iloc[:5].values.tolist() == first_rows
    assert {"alpha1_s_per_token2", "beta1_s_per_token", "gamma_s"} <= set(p.fits["tiny"])
    assert all(len(p.tables[t]) for t in ("gemm", "attention", "collective", "host_copy", "memory"))
    # with the collective table: the fixture's meetings (quick_wake) less the table's send/recv of the message,
    # through fit_wake
    from profiles.measure.wake import MESSAGE_BYTES, fit_wake
    sent = float(p.collective_time_s("send_recv", MESSAGE_BYTES, 2))
    for k, name in ((2, "cores_shared"), (1, "cores_busy")):
        if k == 1 and p.constant("cores_per_node") < 2:  # one rank a core needs two cores for a pair
            assert f"{name}_wake_s" not in p.constants
            continue
        short, long = (max(0.0, QUICK_MEETINGS_S[k][t] - sent) for t in (2e-3, 20e-3))
        plateau, half = fit_wake((2e-3, short), (20e-3, long))
        assert (p.constant(f"{name}_wake_s"), p.constant(f"{name}_wake_half_s")) == pytest.approx((plateau, half))


def test_interrupt_before_any_table_leaves_the_plan_to_resume(tmp_path, monkeypatch):
    FakeBench(monkeypatch, bf16_speedup=0.01, interrupt_at_attention=0)
    req = runner.ProfileRequest(out=tmp_path / "m.json", quick=True, ops=("attention",), device="cpu")
    with pytest.raises(KeyboardInterrupt):
        runner.run_profile(req)
    assert not req.out.exists() and runner.partial_path(req.out).exists()
    assert "rerun the same command to resume" in runner.resume_hint(req.out)


def test_cli_profile_estimate_and_compare_json():
    from typer.testing import CliRunner

    from cli import app
    res = CliRunner().invoke(app, ["profile", "--quick", "--estimate", "local-cpu.measured", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["device"] == "cpu" and d["tables"]["attention"]["points"] > 0
    assert d["tables"]["memory"]["points"] > 0 and d["tables"]["memory"]["seconds"] > 0
    assert d["total_s"] == pytest.approx(sum(t["seconds"] for t in d["tables"].values()))
    res = CliRunner().invoke(app, ["profile", "--compare", "local-cpu.measured", "h100-sxm.analytic", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["a"]["name"] == "local-cpu.measured" and d["b"]["source"] == "analytic"
    gemm = next(t for t in d["tables"] if t["table"] == "gemm")
    assert gemm["summary"] and gemm["summary"][0]["geomean"] > 1  # a CPU core is slower than an H100
    peak = next(c for c in d["constants"] if c["constant"] == "peak_bf16_flops")
    assert 0 < peak["ratio"] < 1 and peak["unit"] == "FLOP/s"


def test_attention_measured_at_the_models_head_dims():
    cfg = plan_config("cpu", quick=True, nproc=2, model_head_dims=(16, 128))
    assert cfg.attn_head_dims == (16, 64, 128)
    dims = {p.head_dim for p in attention_points(cfg)}
    assert dims == {16, 64, 128}
    assert plan_config("cuda", quick=True, nproc=8, model_head_dims=(96,)).attn_head_dims == (64, 96, 128)


def test_cpu_benchmarks_read_operands_from_memory():
    llc = last_level_cache_bytes("cpu")
    assert llc >= 2**20
    # small operands: enough copies to span twice the cache (capped); large ones stream past it: one
    assert cold_copies(2**20, "cpu") == min(64, -(-2 * llc // 2**20))
    assert cold_copies(4 * llc, "cpu") == 1 and cold_copies(2**10, "cuda") == 1


def test_concurrency_slowdowns_measured():
    """Probe processes pinned to one core: two of them share it, so the last ends about twice as late as one alone;
    with k other busy processes on that core (k + 2)/(k + 1) as late, so the median of interleaved rounds' ratios is
    held to 1.15 (k up to 5: a loaded CI host). The measured constants are finite and no less than no contention."""
    from profiles.measure.concurrency import ProbePool, measure_concurrency
    cpu = sorted(os.sched_getaffinity(0))[:1]
    with ProbePool(cpu, 2) as pool:
        ratios = [pool.wall_s(2, 4) / pool.wall_s(1, 4) for _ in range(5)]
    assert statistics.median(ratios) > 1.15, ratios
    out = measure_concurrency(1, repeats=2, rounds=1)
    assert set(out) == {"cores_busy_slowdown", "cores_shared_slowdown"}
    assert all(math.isfinite(v) for v in out.values()) and out["cores_shared_slowdown"] >= 2.0


def test_a_meeting_costs_the_median_of_its_rounds_extra_time_less_the_tables_transfer():
    """Per round: the segments with their meetings less the segments alone, per meeting; the median over rounds, 0 at
    the least. The profile keeps each meeting less what the collective table charges its transfer, 0 at the least,
    per ranks a core, as plateau · t / (t + half) through the short and the long segment's."""
    from profiles.measure.wake import meeting_s, syncs_of, wake_constants

    both, segments = [0.130, 0.200, 0.140], [0.100, 0.110, 0.100]
    assert meeting_s(both, segments, syncs=12) == pytest.approx(0.040 / 12)  # rounds: 30, 90 and 40 ms extra
    assert meeting_s([0.1], [0.11], syncs=12) == 0.0
    assert (syncs_of(2e-3), syncs_of(20e-3), syncs_of(1.0)) == (40, 4, 4)
    # two ranks a core: 1 and 2 ms beyond the transfer after 2 and 20 ms; r = 1/2, half = 2·20·(1/2) / (10 - 2) ms
    consts = wake_constants({2: {2e-3: 2e-3, 20e-3: 3e-3}, 1: {2e-3: 0.5e-3, 20e-3: 0.5e-3}}, 1e-3)
    assert consts["cores_shared_wake_half_s"]["value"] == pytest.approx(2.5e-3)
    assert consts["cores_shared_wake_s"]["value"] == pytest.approx(2e-3 * 22.5 / 20)
    assert consts["cores_busy_wake_s"]["value"] == consts["cores_busy_wake_half_s"]["value"] == 0.0
    assert "1 rank(s) a core: 0.00 ms after 2 ms" in consts["cores_busy_wake_s"]["source"]


def test_the_wake_up_curve_runs_through_both_measured_points():
    """fit_wake: plateau · t / (t + half) through (t_s, w_s) and (t_l, w_l); no growth from short to long: flat at
    their mean; a short wake near 0 caps half at t_l (a curve that levels off, not a line)."""
    from profiles.measure.wake import fit_wake

    plateau, half = fit_wake((2e-3, 2e-3), (20e-3, 4e-3))
    for t, w in ((2e-3, 2e-3), (20e-3, 4e-3)):
        assert plateau * t / (t + half) == pytest.approx(w)
    assert fit_wake((2e-3, 3e-3), (20e-3, 2e-3)) == pytest.approx((2.5e-3, 0.0))
    assert fit_wake((2e-3, 0.0), (20e-3, 4e-3)) == pytest.approx((8e-3, 20e-3))


@pytest.mark.torchrun
def test_meetings_are_measured_on_busy_cores():
    """The worker runs under torchrun on 2c ranks pinned to c cores (here 1 core, 2 ranks: quick; one rank a core
    needs two cores for a pair) and gives a finite meeting cost of at least 0."""
    from profiles.measure.wake import SEGMENTS_S, measure_meetings_s

    t0 = time.perf_counter()
    m = measure_meetings_s(1, rounds=3)
    assert set(m) == {2} and set(m[2]) == set(SEGMENTS_S) and all(0.0 <= v < 0.1 for v in m[2].values())
    assert time.perf_counter() - t0 < 120


@pytest.mark.torchrun
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one rank a core needs two cores for a pair")
def test_meetings_are_measured_at_one_and_two_ranks_a_core():
    """With two cores the worker runs twice, on 4 ranks and on 2 (one a core, one pair), each a finite meeting of at
    least 0."""
    from profiles.measure.wake import SEGMENTS_S, measure_meetings_s

    m = measure_meetings_s(2, rounds=1)
    assert set(m) == {1, 2} and all(set(by) == set(SEGMENTS_S) and 0.0 <= v < 0.1 for by in m.values()
                                    for v in by.values())


def test_the_hosts_vector_kernels_are_read_as_torch_picks_them(monkeypatch, tmp_path):
    """cpu_vector_isa reads /proc/cpuinfo's flags as ATen's dispatch does (AVX-512 VL, BW, DQ and FMA; AVX2 and
    FMA), honours ATEN_CPU_CAPABILITY, and says None without x86 flags; on this host it agrees with torch."""
    import builtins

    import profiles.measure as measure

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    if measure.cpu_vector_isa() is not None:
        assert measure.cpu_vector_isa() == torch.backends.cpu.get_cpu_capability()
    real_open = builtins.open

    def with_flags(flags: str | None):
        info = tmp_path / "cpuinfo"
        info.write_text("processor\t: 0\n" + (f"flags\t\t: {flags}\n" if flags is not None else ""))
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f,
                                                                             *a, **k))
        return measure.cpu_vector_isa()

    assert with_flags("fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl") == "AVX512"
    assert with_flags("fpu sse2 avx avx2 fma avx512f") == "AVX2"  # AVX-512 F alone: ATen keeps AVX2
    assert with_flags("fpu sse2 avx") == "DEFAULT" and with_flags(None) is None
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert with_flags("fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl") == "AVX2"
