"""planner.api and profiles: a plan finds its profile again; a profile of another device is a warning."""

import pytest

from profiles.table import ProfileError, load_profile


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



def test_a_cpu_profile_of_another_host_warns(monkeypatch):
    # a CPU cluster's ranks run on this host: a measured profile of another CPU or core count, or of the same name
    # with other vector kernels, says so, in plan and when a plan is re-priced on its recorded profile; the same CPU
    # says nothing
    import warnings

    import planner.api as api
    from profiles.table import load_profile
    from planner.api import PlanRequest, build_cost_model, cost_model_for_plan, make_plan

    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=2, max_context_tokens=4096, steps=1)

    def caught(fn) -> list[str]:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            fn()
        return [str(w.message) for w in ws if "this host" in str(w.message)]

    shipped = load_profile("local-cpu.measured").fingerprint
    measured_on, isa = shipped.device, shipped.versions["cpu_capability"]
    monkeypatch.setattr(api, "cpu_device_name", lambda: measured_on)
    monkeypatch.setattr(api, "cpu_vector_isa", lambda: isa)
    assert caught(lambda: build_cost_model(req)) == []
    plan = make_plan(req, "static")
    assert caught(lambda: cost_model_for_plan(plan)) == []
    monkeypatch.setattr(api, "cpu_device_name", lambda: "cpu: Some Other CPU (64 cores)")
    msgs = caught(lambda: build_cost_model(req))
    assert len(msgs) == 1 and "local-cpu.measured" in msgs[0] and "Some Other CPU (64 cores)" in msgs[0]
    assert len(caught(lambda: cost_model_for_plan(plan))) == 1
    # the same name, other vector units (a virtual CPU's model name hides its generation)
    monkeypatch.setattr(api, "cpu_device_name", lambda: measured_on)
    other = "AVX2" if isa != "AVX2" else "AVX512"
    monkeypatch.setattr(api, "cpu_vector_isa", lambda: other)
    msgs = caught(lambda: build_cost_model(req))
    assert len(msgs) == 1 and f"torch's {isa} CPU kernels, this host runs {other} ones" in msgs[0]
    monkeypatch.setattr(api, "cpu_vector_isa", lambda: None)  # flags unknown: the name decides
    assert caught(lambda: build_cost_model(req)) == []

def test_device_kind_names():
    from planner.api import device_kind
    assert device_kind("NVIDIA H100 80GB HBM3 (host cpu: Intel(R) Xeon(R) Platinum 8480+, 224 cores)") == "h100"
    assert device_kind("NVIDIA A100-SXM4-80GB") == "a100" and device_kind("AMD Instinct MI300X") == "mi300x"
    assert device_kind("cpu: AMD EPYC 9654 (2 cores)") == "cpu" and device_kind("CPU (gloo)") == "cpu"
    assert device_kind("my accelerator") is None


def _small_comparison(**kw):
    from planner.api import PlanRequest, compare

    kw = {"model": "tiny", "cluster": "local-cpu", "gpus": 4, "lengths": "examples/lengths.txt",
          "max_context_tokens": 4096, **kw}
    return compare(PlanRequest(**kw), ["static", "hdp"])


def test_a_plan_over_hbm_is_never_chosen():
    """Issue 21: a plan whose simulated peak exceeds HBM is not written: the fastest plan that fits is
    chosen, a forced one that does not fit is refused, and so is a case where none fits."""
    import dataclasses

    from planner.plan import PlanError

    res = _small_comparison()
    assert all(x.fits_hbm for x in res.summaries)
    fastest = res.chosen().strategy
    res.summaries = [dataclasses.replace(x, fits_hbm=x.strategy != fastest) for x in res.summaries]
    other = next(x.strategy for x in res.summaries if x.strategy != fastest)
    assert res.chosen().strategy == other
    assert "over HBM: " + fastest in res.chosen().reason
    with pytest.raises(PlanError, match=f"{fastest} .* GB over the .* GB HBM"):
        res.chosen(fastest)
    res.summaries = [dataclasses.replace(x, fits_hbm=False) for x in res.summaries]
    with pytest.raises(PlanError, match="no plan written"):
        res.chosen()


def test_capacity_beyond_memory_writes_no_plan():
    """C forced far above what the memory model allows: every strategy's simulated peak is over HBM."""
    from planner.plan import PlanError

    res = _small_comparison(model="llama-7b", cluster="dgx-h100", gpus=8, lengths="byted-like", capacity_tokens=1 << 20,
                            tokens_per_step=1 << 21, max_context_tokens=1 << 18)
    assert not any(x.fits_hbm for x in res.summaries)
    with pytest.raises(PlanError, match="no plan written: static .* GB, hdp .* GB over the"):
        res.chosen()


def test_one_chunking_skips_an_interleaving_some_step_cannot_run():
    """A run places its layers once, so every step is re-planned at each v some step chose; a v at which a step's
    pipelines deadlock (a PlanError) is skipped, not fatal (ByteScale's LLaMA-70B byted-like 512K point failed so:
    step 1 chose v = 5, at which step 0's shared units deadlock). No v left: the last error."""
    import dataclasses

    from planner.api import PlanRequest, _one_chunking, build_cost_model, make_batches
    from planner.plan import PlanError
    from planner.strategies import get_strategy

    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, pp=2, max_context_tokens=4096, tokens_per_step=16384,
                      steps=2)
    cm = build_cost_model(req)
    batches = make_batches(req, cm)
    real = get_strategy("hdp")
    tried = []

    def flaky(batch, cm_, options):
        tried.append((batch.step, options.hdp.pp_v))
        if options.hdp.pp_v == 2 and batch.step == 0:
            raise PlanError("step 0: pipeline schedule deadlocks")
        return real(batch, cm_, options)

    steps = _one_chunking(flaky, batches, cm, req.options, {1, 2})
    assert [st.chunks_per_stage for st in steps] == [1, 1] and (0, 2) in tried
    with pytest.raises(PlanError, match="deadlocks"):
        _one_chunking(flaky, batches[:1], cm, dataclasses.replace(req.options), {2})
