"""How the CLI prints: nothing a user reads or types is cut (tables, help), user text is never
taken for markup, output paths are checked before planning, the fastest plan is written unless a
strategy is forced, and anything unexpected is one line, never a traceback."""

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

import cli
from cli import app
from costmodel.presets import cluster_names, model_names
from costmodel.specs import SpecError
from planner.api import Comparison, PlanRequest, Summary
from planner.plan import Plan, PlanError
from profiles.table import Profile, load_profile, profile_names

TINY = ["--model", "tiny", "--cluster", "local-cpu", "--gpus", "4", "--tokens-per-step", "16K", "--max-context", "4K"]


def run(*args: str, **env: str):
    return CliRunner(env=env or None).invoke(app, list(args))


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- tables and help are never cut ---------------------------------------------------------------

def test_presets_in_a_pipe_shows_every_name_whole():
    r = run("presets")
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    lines = r.stdout.splitlines()
    for name in model_names() + cluster_names() + profile_names():
        assert any(name in line for line in lines), name  # what `meshplan presets | grep NAME` finds
    assert any("llama3-405b" in line and "405.85" in line for line in lines)


def test_presets_in_an_80_column_terminal_keeps_names_whole(monkeypatch):
    terminal = Console(width=80, force_terminal=True, color_system=None, record=True)
    monkeypatch.setattr(cli, "out", terminal)
    assert run("presets").exit_code == 0
    text = terminal.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for name in model_names() + cluster_names() + profile_names():
        assert name in text, name


def test_presets_json_lists_every_preset():
    r = run("presets", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [m["name"] for m in d["models"]] == model_names()
    assert [c["name"] for c in d["clusters"]] == cluster_names()
    assert [p["name"] for p in d["profiles"]] == profile_names()
    assert d["models"][0]["parameters"] > 0 and d["clusters"][0]["profile"] and d["profiles"][0]["sha256"]


@pytest.mark.parametrize("width", [120, 80, 50])
def test_tables_fold_rather_than_ellipsise_in_a_narrow_terminal(width):
    cells = ("hdp-naive *", "1166.23", "3.92", "12,345,678", "26.5%", "2.92x", "1134.45", "1000.03", "141.0", "12.34")
    t = cli.Table(title="predicted per step (mean over steps)")
    for header in ("strategy", "step time (s)", "/ lower bound", "tokens/s", "MFU", "speedup vs static",
                   "busiest rank (s)", "idlest rank (s)", "peak mem (GB)", "plan time (s)"):
        t.add_column(header, justify="right")
    t.add_row(*cells)
    console = Console(width=width, force_terminal=True, color_system=None, record=True)
    console.print(t)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    if width >= 80:  # headers wrap and borders go before any value is folded
        assert all(c in text for c in cells), text


def test_implicit_columns_fold_too():
    t = cli.Table(show_header=False)
    t.add_row("key", "x" * 200)
    console = Console(width=60, force_terminal=True, color_system=None, record=True)
    console.print(t)
    text = console.export_text()
    assert "…" not in text and text.count("x") == 200


def test_help_shows_full_option_names_at_80_columns_and_takes_h():
    for args in (["plan", "--help"], ["plan", "-h"]):
        r = run(*args, COLUMNS="80")
        assert r.exit_code == 0, r.output
        assert "--redistribute-max-chunks" in r.stdout and "--tokens-per-step" in r.stdout
        assert "…" not in r.stdout and max(len(line) for line in r.stdout.splitlines()) <= 80
    for args in (["-h"], ["presets", "-h"], ["presets", "show", "-h"], ["whatif", "capacity", "-h"],
                 ["lengths", "describe", "-h"], ["simulate", "-h"]):
        r = run(*args, COLUMNS="80")
        assert r.exit_code == 0 and r.stdout.startswith("Usage: "), (args, r.output)
    root = one_line(run("--help", COLUMNS="80").stdout)
    assert "--install-completion" in root and "--show-completion" in root
    assert "Sequence-length sources: files, the Wikipedia sample, synthetic families." in root  # not cut with ...


# ---- user text is never markup -------------------------------------------------------------------

def test_error_messages_are_not_markup(monkeypatch):
    from planner.runtime import launch

    monkeypatch.setattr(launch, "find_spec", lambda name: None)  # replay without torch: the install hint
    r = run("replay", "p.json", "--nproc", "1")
    assert r.exit_code == 2 and "pip install 'meshplan[runtime]'" in r.stderr, r.output
    r = run("simulate", "no[bold]such.json")
    assert r.exit_code == 2 and "no[bold]such.json" in r.stderr and "Traceback" not in r.output, r.output


# ---- plan: the fastest plan, output paths checked first, nothing half-written ------------------------

def test_plan_writes_the_fastest_and_says_so(tmp_path):
    out = tmp_path / "plan[bold].json"
    r = run("plan", *TINY, "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    fastest = min(d["summary"], key=lambda x: x["step_time_s"])["strategy"]  # ties: the first compared
    assert d["strategy"] == fastest and d["reason"].startswith("fastest of static, dcp, hdp-naive, hdp")
    assert Plan.load(out).meta["strategy"] == fastest
    r = run("plan", *TINY, "--out", str(out), "--strategy", "hdp-naive")
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout and "hdp-naive *" in r.stdout
    assert f"wrote {out}: hdp-naive, as requested" in one_line(r.stdout)  # the file name is not markup
    assert Plan.load(out).meta["strategy"] == "hdp-naive"


def _summary(strategy: str, step_time_s: float) -> Summary:
    return Summary(strategy=strategy, step_time_s=step_time_s, lower_bound_s=1.0, tokens_per_s=1.0, mfu=0.1,
                   mfu_unhalved=0.2, speedup_vs_static=None, busiest_rank_s=1.0, idlest_rank_s=0.5,
                   peak_memory_bytes=1.0, planning_s=0.1, fits_hbm=True)


def test_comparison_chooses_the_fastest_unless_forced():
    times = {"static": 1500.0, "dcp": 1166.0, "hdp-naive": 1400.0, "hdp": 1253.0}
    res = Comparison(plans={n: None for n in times}, summaries=[_summary(n, t) for n, t in times.items()],
                     failures={"ilp": "solver missing"}, cost_model=None, batches=[])
    c = res.chosen()
    assert c.strategy == "dcp" and c.reason == "fastest of static, dcp, hdp-naive, hdp (1,166 s vs hdp 1,253 s)"
    c = res.chosen("hdp")
    assert c.strategy == "hdp" and c.reason == "as requested (1,253 s; dcp 1,166 s)"
    with pytest.raises(PlanError, match="strategy ilp could not plan this case: solver missing"):
        res.chosen("ilp")
    with pytest.raises(PlanError, match="no strategy could plan this case: ilp: solver missing"):
        Comparison(plans={}, summaries=[], failures={"ilp": "solver missing"}, cost_model=None, batches=[]).chosen()


@pytest.mark.parametrize("cmd", ["plan", "simulate"])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, cmd):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "plan.json"
    head = ["plan", *TINY, "--out", str(out)] if cmd == "plan" else ["simulate", str(tmp_path / "missing.json")]
    r = run(*head, "--trace", str(tmp_path / "afile" / "t.json"))
    assert r.exit_code == 2 and "--trace" in r.stderr and "is a file, not a folder" in r.stderr, r.output
    r = run(*head, "--trace", str(tmp_path))
    assert r.exit_code == 2 and "is a folder" in r.stderr, r.output
    assert not out.exists()


def test_a_failed_trace_write_leaves_no_plan(tmp_path, monkeypatch):
    from planner.simulate import StepSimulation

    def disk_full(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(StepSimulation, "write_trace", disk_full)
    out = tmp_path / "plan.json"
    r = run("plan", *TINY, "--out", str(out), "--trace", str(tmp_path / "t.json"))
    assert r.exit_code == 2 and "No space left on device" in r.stderr, r.output
    assert not out.exists()


def test_simulate_measured_sets_the_units_cpu_beside_their_priced_compute(tmp_path):
    """A trace with the units' CPU: `simulate --measured` prints each unit's own-thread CPU, its error against the
    priced compute and its other threads' CPU; a trace without them keeps the five columns."""
    from planner.api import cost_model_for_plan
    from planner.simulate import simulate_step
    from planner.simulate.measured import predicted_cpu_s, predicted_units_s

    r = run("plan", *TINY, "--out", str(tmp_path / "plan.json"))
    assert r.exit_code == 0, r.output
    plan = Plan.load(tmp_path / "plan.json")
    cm = cost_model_for_plan(plan)
    step = plan.steps[0]
    took, cpu = predicted_units_s(step, cm, simulate_step(step, cm)), predicted_cpu_s(step, cm)
    units = [{"unit": u.id, "stage": 0, "fwd_s": took[(u.id, 0)], "bwd_s": 0.0, "thread_cpu_s": 2 * cpu[(u.id, 0)],
              "helper_cpu_s": 0.004} for u in step.units]
    doc = {"schema": "meshplan.measured/1", "complete": True, "meta": {},
           "steps": [{"step": 0, "plan_step": step.step, "units": units, "step_time_s": 1.0}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    r = run("simulate", str(tmp_path / "plan.json"), "--measured", str(tmp_path / "t.json"))
    assert r.exit_code == 0, r.output
    assert "own CPU (s)" in r.stdout and "-50.0%" in r.stdout and "0.0040" in r.stdout
    assert "median |CPU error| per unit: 50.0%" in r.stdout
    r = run("simulate", str(tmp_path / "plan.json"), "--measured", str(tmp_path / "t.json"), "--plot",
            str(tmp_path / "m.png"))
    assert r.exit_code == 0 and "wrote" in r.stdout, r.output
    svg = (tmp_path / "m.svg").read_text()  # steps, units and their CPU, each a strip
    assert (tmp_path / "m.png").exists() and all(g in svg for g in ("steps", "units", "own CPU"))
    r = run("simulate", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "m2.png"))
    assert r.exit_code == 2 and "--measured" in r.stderr and not (tmp_path / "m2.png").exists(), r.output
    for u in units:
        del u["thread_cpu_s"], u["helper_cpu_s"]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    r = run("simulate", str(tmp_path / "plan.json"), "--measured", str(tmp_path / "t.json"))
    assert r.exit_code == 0 and "own CPU" not in r.stdout and "CPU error" not in r.stdout, r.output


# ---- choices: one list in the library, one line for a value outside it ------------------------------

@pytest.mark.parametrize("cmd", ["plan", "whatif"])
def test_recompute_policies_come_from_the_cost_model(cmd):
    r = run(cmd, "--recompute", "bogus")
    assert r.exit_code == 2, r.output
    assert r.stderr == "error: --recompute must be auto, none, selective or full, got 'bogus'\n"
    assert "none | selective | full | auto (least that fits the context)." in one_line(run(cmd, "--help").stdout)


def test_a_plan_request_checks_its_recompute_choice():
    with pytest.raises(SpecError, match="--recompute must be auto, none, selective or full, got 'most'"):
        PlanRequest(recompute="most")


def test_solver_names_come_from_the_backends():
    r = run("plan", *TINY, "--solver", "gurobi")
    assert r.exit_code == 2 and r.stderr == "error: --solver must be cbc, highs or cpsat, got 'gurobi'\n", r.output
    assert "ilp: solver backend, cbc, highs or cpsat." in one_line(run("plan", "--help").stdout)


def test_plan_takes_the_loss_kernel_and_gradient_accumulation_into_its_training(tmp_path):
    out = tmp_path / "p.json"
    r = run("plan", *TINY, "--loss", "in_place", "--out", str(out), "--strategy", "static", "--compare", "static")
    assert r.exit_code == 0, r.output
    assert Plan.load(out).meta["training"]["loss"] == "in_place"
    r = run("plan", *TINY, "--loss", "chunked", "--out", str(tmp_path / "q.json"))
    assert r.exit_code == 2 and r.stderr == "error: --loss must be online, in_place or fp32, got 'chunked'\n"
    r = run("plan", *TINY, "--grad-accumulation", "cast_add", "--out", str(out), "--strategy", "static",
            "--compare", "static")
    assert r.exit_code == 0 and Plan.load(out).meta["training"]["grad_accumulation"] == "cast_add", r.output
    r = run("plan", *TINY, "--grad-accumulation", "add", "--zero", "2", "--out", str(tmp_path / "q.json"))
    assert r.exit_code == 2 and "grad_accumulation 'add' with zero_stage 2 is not modelled" in r.stderr
    assert "\n" not in r.stderr.strip() and not (tmp_path / "q.json").exists()
    for cmd in (("whatif", "--out", str(tmp_path / "w.csv")),
                ("whatif", "capacity", "--model", "tiny", "--context", "4K", "--target-step-time", "1")):
        r = run(*cmd, "--loss", "in_place", "--grad-accumulation", "sum")
        assert r.exit_code == 2 and r.stderr == "error: --grad-accumulation must be fused, add or cast_add, got 'sum'\n"
    assert not (tmp_path / "w.csv").exists()


def test_plan_without_sequence_parallelism_prices_what_the_replay_runs(tmp_path):
    """--no-sequence-parallel reaches the plan's training spec (the replay's TP; the replay warns otherwise), and
    the norms and residuals that then run replicated make the same units dearer."""
    times = {}
    for flag, sp in (("--sequence-parallel", True), ("--no-sequence-parallel", False)):
        out = tmp_path / f"{sp}.json"
        r = run("plan", *TINY, "--tp", "2", "--kernels", "eager", flag, "--out", str(out),
                "--strategy", "static", "--compare", "static")
        assert r.exit_code == 0, r.output
        plan = Plan.load(out)
        assert plan.meta["training"]["sequence_parallel"] is sp
        times[sp] = sum(u.predicted_time_s for u in plan.steps[0].units)
    assert times[False] > times[True]


# ---- profile: the cost model's GEMM shapes are measured, each model gets its T(s) fit ----------------

def _fake_run_profile(monkeypatch, profile: Profile, seen: dict) -> None:
    """run_profile without measuring: record the request, let `post` fit `profile`."""
    from profiles.measure import runner

    def fake(req, post=None, on_note=None, progress=None):
        seen["shapes"] = req.model_shapes
        post(profile)
        return runner.RunResult(profile=profile, seconds={})

    monkeypatch.setattr(runner, "run_profile", fake)


def test_profile_measures_the_cost_models_gemm_shapes_and_fits_each_model(tmp_path, monkeypatch):
    seen: dict = {}
    p = load_profile("local-cpu.measured")
    p.fits.clear()
    _fake_run_profile(monkeypatch, p, seen)
    r = run("profile", "--out", str(tmp_path / "p.json"), "--models", "tiny", "--json")
    assert r.exit_code == 0, r.output
    # tiny: hidden 64, 4 query heads and 2 KV heads of 16, ffn 128, vocab 256; TP 2 (divides the KV heads; 4 and 8
    # do not) adds the one shape tp 1 lacks, its output projection's (k = 32)
    assert seen["shapes"] == (("tiny.qkv", 128, 64), ("tiny.o", 64, 64), ("tiny.gate_up", 256, 64),
                              ("tiny.down", 64, 128), ("tiny.lm_head", 256, 64), ("tiny.o.tp2", 64, 32))
    assert json.loads(r.stdout)["fits"] == ["tiny"] and p.fits["tiny"]["alpha1_s_per_token2"] >= 0
    assert r.stderr == ""
    # on CPU the executor's cost per attention call, per sliced K/V source and per ring step are measured too, at
    # tiny's heads
    c = p.constants["attn_call_overhead_s"]
    assert c["unit"] == "s" and 0 < c["value"] < 1e-3 and "4/2 heads, head dim 16" in c["source"]
    for kind in ("source", "ring_step"):
        for way in ("fwd", "bwd"):
            fixed, per_token = p.constants[f"attn_{kind}_{way}_s"], p.constants[f"attn_{kind}_token_{way}_s"]
            assert fixed["value"] >= 0 and per_token["value"] >= 0 and fixed["value"] + per_token["value"] > 0
            assert "4/2 heads, head dim 16" in fixed["source"] and per_token["unit"] == "s/(token·head)"
    load_profile(p.save(tmp_path / "again.json"))  # constants the profile schema reads back


def _fake_glue(monkeypatch) -> None:
    """The sliced-source and ring-step glue constants without timing them (the test above times them)."""
    from planner.runtime import call_overhead

    for kind, fn in (("source", "attention_source_overhead"), ("ring_step", "ring_step_overhead")):
        monkeypatch.setattr(call_overhead, fn, lambda *_a, _k=kind, **_kw: {
            f"attn_{_k}_{way}_s": {"value": 1e-4, "unit": "s", "source": "test"} for way in ("fwd", "bwd")})


def test_profile_whose_attention_call_cost_fails_is_written_with_a_note(tmp_path, monkeypatch):
    from planner.runtime import call_overhead

    def broken(*_a, **_k):
        raise RuntimeError("no SDPA here")

    monkeypatch.setattr(call_overhead, "attention_call_overhead", broken)
    _fake_glue(monkeypatch)
    p = load_profile("local-cpu.measured")
    p.fits.clear()
    for k in [k for k in p.constants if k.startswith("attn_")]:  # measured after the tables, by the CLI
        p.constants.pop(k)
    _fake_run_profile(monkeypatch, p, {})
    r = run("profile", "--out", str(tmp_path / "p.json"), "--models", "tiny")
    assert r.exit_code == 0, r.output
    assert "note: no attention call cost measured (RuntimeError: no SDPA here)" in one_line(r.stderr)
    assert "attn_call_overhead_s" not in p.constants and p.fits["tiny"]
    for k in ("attn_source_fwd_s", "attn_ring_step_bwd_s"):  # the others still taken
        assert p.constants[k]["source"] == "test", k


def test_profile_of_a_gpu_leaves_the_attention_call_cost_to_calibrate(tmp_path, monkeypatch):
    p = load_profile("h200-sxm.measured")
    p.fits.clear()
    _fake_run_profile(monkeypatch, p, {})
    r = run("profile", "--out", str(tmp_path / "p.json"), "--models", "tiny", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fits"] == ["tiny"] and "attn_call_overhead_s" not in p.constants
    assert "attn_source_fwd_s" not in p.constants and "attn_ring_step_fwd_s" not in p.constants


def test_profile_notes_a_model_it_cannot_fit_and_goes_on(tmp_path, monkeypatch):
    p = load_profile("local-cpu.measured")
    p.fits.clear()
    p.constants.pop("attn_call_overhead_s", None)  # measured after the tables, by the CLI
    p.tables["attention"] = p.tables["attention"].iloc[:0]  # measured with --ops gemm: no attention rows
    _fake_run_profile(monkeypatch, p, {})
    r = run("profile", "--out", str(tmp_path / "p.json"), "--models", "tiny,llama-7b")
    assert r.exit_code == 0, r.output
    notes = one_line(r.stderr)
    assert notes.count("note: ") == 2 and "error" not in notes, notes
    for name in ("tiny", "llama-7b"):
        assert f"note: no T(s) fit for {name}: profile 'local-cpu.measured' has no rows in table(s) attention" in notes
    assert "fits: none" in r.stdout and p.fits == {} and "attn_call_overhead_s" not in p.constants


def test_profile_without_a_gemm_table_is_written_with_notes(tmp_path, monkeypatch):
    p = load_profile("local-cpu.measured")
    p.fits.clear()
    p.tables["gemm"] = p.tables["gemm"].iloc[:0]  # measured with --ops host_copy: no dtype to fit in
    p.constants.pop("peak_bf16_flops", None)
    _fake_run_profile(monkeypatch, p, {})
    monkeypatch.setattr("planner.runtime.call_overhead.attention_call_overhead", lambda *_a, **_k: 1e-5)
    _fake_glue(monkeypatch)
    r = run("profile", "--out", str(tmp_path / "p.json"), "--models", "tiny")
    assert r.exit_code == 0, r.output
    assert "note: no T(s) fit for tiny: profile 'local-cpu.measured' has no GEMM table" in one_line(r.stderr)
    assert "peak (measured) none (no GEMM table); fits: none" in one_line(r.stdout)


# ---- anything unexpected: one line ---------------------------------------------------------------

def _boom():
    raise ZeroDivisionError("boom")


def test_internal_errors_are_one_line(monkeypatch):
    monkeypatch.setattr(cli, "model_names", _boom)
    r = run("presets")
    assert r.exit_code == 3, r.output
    assert r.stderr == ("error: internal error: ZeroDivisionError: boom (rerun with MESHPLAN_DEBUG=1 for the "
                        "traceback)\n")
    r = run("presets", MESHPLAN_DEBUG="1")
    assert r.exit_code == 3 and "Traceback" in r.stderr and "ZeroDivisionError: boom" in r.stderr


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "model_names", interrupted)
    r = run("presets")
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted", r.output


def test_user_errors_through_app_call_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        app(["simulate", str(tmp_path / "none.json")], prog_name="meshplan")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")



def test_validate_prints_each_case_and_the_mape():
    r = run("validate", "--set", "korthikanti2022")
    assert r.exit_code == 0, r.output
    assert "22B layer, SP + selective: backward" in r.output and "1T, SP + selective" in r.output
    assert "MAPE" in r.output and "a100-sxm-80gb.analytic" in r.output and "design set" in r.output
    assert "memory per GPU" in r.output and "6 of 6 published runs fit" in r.output
    assert "6 with the planner's" in r.output
    j = run("validate", "--json", "--profile", "h100-sxm.analytic", "--set", "korthikanti2022")
    d = json.loads(j.output)["sets"][0]
    assert d["profile"] == "h100-sxm.analytic" and len(d["rows"]) == 12 and not d["held_out"]
    assert len(d["memory"]) == 6 and all(m["peak_bytes"] == pytest.approx(sum(m["parts"].values()))
                                         for m in d["memory"])
    assert all(m["headroom_bytes"] == pytest.approx(m["hbm_bytes"] - m["allocated_bytes"] - m["parts"]["context"])
               and m["fits"] == (m["headroom_bytes"] >= 0) for m in d["memory"])
    assert d["mape"] == pytest.approx(sum(abs(x["error"]) for x in d["rows"]) / 12)


def test_validate_draws_the_cases_and_the_memory_of_every_set_asked(tmp_path):
    r = run("validate", "--set", "korthikanti2022", "--set", "bloom2022", "--plot", str(tmp_path / "v.png"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v.png").stat().st_size > 0 and (tmp_path / "v.svg").stat().st_size > 0
    svg = (tmp_path / "v.svg").read_text()
    assert "korthikanti2022" in svg and "bloom2022" in svg and "memory needed / GPU memory" in svg
    r = run("validate", "--set", "bloom2022", "--plot", str(tmp_path))
    assert r.exit_code == 2 and "--plot" in r.stderr and "is a folder" in r.stderr, r.output
    (tmp_path / "w.svg").mkdir()  # the SVG's place is taken: refused before any work, the PNG not written either
    r = run("validate", "--set", "bloom2022", "--plot", str(tmp_path / "w.png"))
    assert r.exit_code == 2 and "w.svg: is a folder" in r.stderr and not (tmp_path / "w.png").exists(), r.output
    r = run("validate", "--set", "bloom2022", "--plot", str(tmp_path / "v.pdf"))
    assert r.exit_code == 2 and ".png, .svg or neither" in r.stderr, r.output
    r = run("validate", "--set", "bloom2022", "--json", "--plot", str(tmp_path / "j"))  # stdout stays one JSON line
    assert r.exit_code == 0 and json.loads(r.stdout)["sets"][0]["name"] == "bloom2022" and not r.stderr, r.output
    assert (tmp_path / "j.png").exists() and (tmp_path / "j.svg").exists()


def test_validate_sums_held_out_errors_by_kind_of_run():
    out = run("validate", "--set", "torchtitan_a100_2024", "--set", "bloom2022").output
    assert "held-out rows by kind of run" in out and "FSDP" in out and "1F1B PP" in out
    assert "held-out rows" not in run("validate", "--set", "bloom2022").output  # one set: no table


def test_validate_every_set_by_default_with_the_held_out_ones_marked():
    d = json.loads(run("validate", "--json").output)
    assert [s["name"] for s in d["sets"]] == ["korthikanti2022", "narayanan2021", "llama3_2024",
                                              "megatron_bridge2025", "nemo2024", "nemo_longseq2024",
                                              "torchtitan_a100_2024", "megatron_bridge_b200_2025",
                                              "megatron_bridge_gb200_2025", "bloom2022", "flashattention2_2023",
                                              "megatron_bridge_moe2025", "megatron_bridge_cuda_graphs2026",
                                              "llmfoundry_mpt2023"]
    # Korthikanti's errors shaped the terms, the Blackwell rows the Blackwell GEMM rates: not held out
    assert [s["held_out"] for s in d["sets"]] == [False, True, True, True, True, True, True, False, False, True, True,
                                                  True, True, True]
    assert d["sets"][2]["profile"] == "h100-sxm.analytic"  # each set on its cluster's profile
    assert d["sets"][8]["profile"] == "gb200.analytic"
    assert d["sets"][9]["profile"] == "a100-sxm-80gb-opa.analytic"  # BLOOM's Omni-Path cluster
    # the held-out rows' error by GPU, sequence length and layout: every held-out row counted once per facet
    held = sum(len(s["rows"]) for s in d["sets"] if s["held_out"])
    assert {f: sum(g["rows"] for g in d["held_out_by"][f]) for f in ("gpu", "sequence", "layout", "model")} == \
        {"gpu": held, "sequence": held, "layout": held, "model": held}
    r = run("validate", "--set", "no-such-set")
    assert r.exit_code == 2 and "unknown calibration set 'no-such-set'" in one_line(r.output)


def test_validate_prices_your_own_set_from_a_file(tmp_path, monkeypatch):
    from importlib import resources

    # a packaged set's JSON as a user would write it, its cluster and model given as files beside it
    data = json.loads(resources.files("planner.studies").joinpath("data", "torchtitan_a100_2024.json").read_text())
    presets = resources.files("costmodel.presets")
    (tmp_path / "my-cluster.json").write_text(presets.joinpath("clusters", f"{data['cluster']}.json").read_text())
    case = data["iteration_cases"][0]
    (tmp_path / "my-model.json").write_text(presets.joinpath("models", f"{case['model']}.json").read_text())
    mine = {**data, "cluster": "my-cluster.json", "iteration_cases": [{**case, "model": "my-model.json"}]}
    (tmp_path / "runs.json").write_text(json.dumps(mine))
    d = json.loads(run("validate", "--json", "--set", str(tmp_path / "runs.json")).output)["sets"][0]
    packaged = json.loads(run("validate", "--json", "--set", "torchtitan_a100_2024").output)["sets"][0]
    assert d["name"] == str(tmp_path / "runs.json") and d["held_out"] and len(d["rows"]) == 1
    assert d["rows"][0]["predicted"] == pytest.approx(packaged["rows"][0]["predicted"])
    assert d["rows"][0]["published"] == pytest.approx(packaged["rows"][0]["published"])
    # bad files: one line each, exit 2
    r = run("validate", "--set", str(tmp_path / "missing.json"))
    assert r.exit_code == 2 and "cannot read calibration set" in one_line(r.output)
    (tmp_path / "empty.json").write_text(json.dumps({**mine, "iteration_cases": []}))
    r = run("validate", "--set", str(tmp_path / "empty.json"))
    assert r.exit_code == 2 and "no layer_cases or iteration_cases" in one_line(r.output)
    (tmp_path / "typo.json").write_text(json.dumps({**mine, "iteration_cases": [{**case, "gpus": -8}]}))
    r = run("validate", "--set", str(tmp_path / "typo.json"))
    assert r.exit_code == 2 and "gpus" in one_line(r.output)
    # read afresh on every call, its files beside it whatever the working directory
    from planner.studies.validation import validate_cost_model
    faster = {**mine, "iteration_cases": [{**mine["iteration_cases"][0], "tokens_per_s_per_gpu": 2 * case[
        "tokens_per_s_per_gpu"]}]}
    (tmp_path / "runs.json").write_text(json.dumps(faster))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "my-cluster.json").write_text("not json")  # a same-named file in the working directory is not read
    monkeypatch.chdir(other)
    rep = validate_cost_model(None, "../runs.json")
    assert rep.rows[0].published == pytest.approx(packaged["rows"][0]["published"] / 2)
    (tmp_path / "nomodel.json").write_text(json.dumps({**mine, "iteration_cases": [{**case, "model": "x.json"}]}))
    r = run("validate", "--set", str(tmp_path / "nomodel.json"))
    assert r.exit_code == 2 and str(tmp_path / "x.json") in one_line(r.output)


def test_validate_prices_the_own_set_example_of_the_docs(tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "COSTMODEL.md").read_text()
    example = re.search(r"\*\*Your own measurements\*\*.*?```json\n(.*?)```", text, re.S).group(1)
    (tmp_path / "runs.json").write_text(example)
    d = json.loads(run("validate", "--json", "--set", str(tmp_path / "runs.json")).output)["sets"][0]
    packaged = json.loads(run("validate", "--json", "--set", "megatron_bridge2025").output)["sets"][0]
    assert d["rows"][0]["predicted"] == pytest.approx(packaged["rows"][0]["predicted"])


def test_validate_prices_every_run_with_the_attention_kernel_asked_for():
    d = json.loads(run("validate", "--json", "--set", "nemo_longseq2024", "--attention-kernel", "fa3").output)
    own = json.loads(run("validate", "--json", "--set", "nemo_longseq2024").output)
    assert d["sets"][0]["attention_kernel"] == "fa3" and own["sets"][0]["attention_kernel"] is None
    # the set's runs ran FlashAttention-2; FA3 is faster: every run predicted faster, the 1M-token one
    # (attention-bound) most
    faster = [a["predicted"] / b["predicted"] for a, b in zip(d["sets"][0]["rows"], own["sets"][0]["rows"])]
    assert all(x < 1 for x in faster) and faster[-1] == min(faster)
    r = run("validate", "--set", "korthikanti2022", "--attention-kernel", "fa3")  # A100: FA3 needs Hopper
    assert r.exit_code == 2 and "no published rate for attention kernel 'fa3'" in one_line(r.output)
    r = run("validate", "--attention-kernel", "fa9")
    assert r.exit_code == 2 and "--attention-kernel must be" in one_line(r.output)


def test_validate_breakdown_shows_where_each_prediction_goes():
    r = run("validate", "--set", "nemo_longseq2024", "--breakdown")
    assert r.exit_code == 0, r.output
    table = r.output.split("where the predicted time goes")[1].split("memory per GPU")[0]
    row = next(line for line in table.splitlines() if "1024K" in line)  # attention-bound: attention is most of it
    shares = [float(x) for x in row.split("│")[3:-1]]
    assert shares[1] == max(shares) > 90 and sum(shares) == pytest.approx(100, abs=0.5)
    d = json.loads(run("validate", "--set", "nemo_longseq2024", "--json").output)
    assert d["sets"][0]["rows"][-1]["parts"]["attention"] > 0.9 * d["sets"][0]["rows"][-1]["predicted"]


def test_whatif_sweeps_and_searches_with_the_attention_kernels_asked_for(tmp_path):
    out, small = tmp_path / "s.csv", ["--model", "llama-7b", "--gpus", "8", "--context", "32K", "--steps", "1",
                                      "--tokens-per-step", "1M"]
    r = run("whatif", *small, "--strategies", "hdp", "--attention-kernel", "flash,fa2", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [x["attention_kernel"] for x in rows] == ["flash", "fa2"] and rows[1]["step_time_s"] > rows[0]["step_time_s"]
    r = run("report", str(out), "--out", str(tmp_path / "rep"), "--no-example")
    assert r.exit_code == 0 and "hdp (fa2 attention)" in (tmp_path / "rep" / "report.md").read_text()
    r = run("whatif", "capacity", *small[:2], "--context", "32K", "--steps", "1", "--tokens-per-step", "1M",
            "--target-tokens-per-s", "1000", "--max-gpus", "8", "--tp", "1", "--pp", "1", "--attention-kernel", "fa2",
            "--table", str(tmp_path / "cap.csv"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["attention_kernel"] == "fa2" and "attn-fa2" in (tmp_path / "cap.csv").read_text()
    r = run("whatif", *small, "--cluster", "dgx-a100", "--attention-kernel", "fa3", "--out", str(tmp_path / "a.csv"))
    assert r.exit_code == 2 and "no published rate for attention kernel 'fa3'" in one_line(r.output)
    r = run("whatif", "--attention-kernel", "flash,fa9", "--out", str(tmp_path / "b.csv"))
    assert r.exit_code == 2 and "--attention-kernel must be" in one_line(r.output)
    assert not (tmp_path / "a.journal.jsonl").exists() and not (tmp_path / "b.csv").exists()


def test_whatif_sweeps_and_searches_with_megatron_recompute_modules(tmp_path):
    out, small = tmp_path / "s.csv", ["--model", "llama-7b", "--gpus", "8", "--context", "32K", "--steps", "1",
                                      "--tokens-per-step", "1M"]
    r = run("whatif", *small, "--strategies", "hdp", "--recompute", "selective", "--out", str(out), "--json")
    base = json.loads(r.stdout)["rows"][0]
    r = run("whatif", *small, "--strategies", "hdp", "--recompute", "selective", "--recompute-modules", "mlp",
            "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["rows"][-1]
    # the mlp module frees a dense MLP's activations (more tokens a rank) and replays its forward (slower per token)
    assert row["recompute_modules"] == "mlp" and row["key"].endswith("|rcm-mlp|hdp")
    assert row["capacity_tokens"] > base["capacity_tokens"] and base["recompute_modules"] == ""
    r = run("whatif", "capacity", *small[:2], "--context", "32K", "--steps", "1", "--tokens-per-step", "1M",
            "--target-tokens-per-s", "1000", "--max-gpus", "8", "--tp", "1", "--pp", "1", "--recompute", "selective",
            "--recompute-modules", "core_attn", "--table", str(tmp_path / "cap.csv"), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["recompute"] == "selective" and d["recompute_modules"] == "core_attn"
    assert d["answer"]["recompute"] == "selective" and d["answer"]["recompute_modules"] == "core_attn"
    assert "rcm-core_attn" in (tmp_path / "cap.csv").read_text()
    r = run("whatif", "capacity", "--model", "tiny", "--context", "4K", "--target-step-time", "1", "--recompute",
            "some")
    assert r.exit_code == 2 and "--recompute must be" in one_line(r.output)
    r = run("whatif", *small, "--recompute", "full", "--recompute-modules", "mlp", "--out", str(tmp_path / "b.csv"))
    assert r.exit_code == 2 and "apply to the selective policy" in one_line(r.output)
    r = run("whatif", *small, "--recompute-modules", "mlp,attn", "--out", str(tmp_path / "b.csv"))
    assert r.exit_code == 2 and "--recompute-modules must be" in one_line(r.output)
    assert not (tmp_path / "b.csv").exists()


def test_plan_records_its_attention_kernel_and_refuses_one_a_measured_profile_lacks(tmp_path):
    out = tmp_path / "p.json"
    r = run("plan", "--gpus", "8", "--compare", "static", "--attention-kernel", "fa2", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["meta"]["training"]["attention_kernel"] == "fa2"
    r = run("plan", "--gpus", "8", "--compare", "static", "--profile", "h200-sxm.measured", "--attention-kernel",
            "fa2", "--out", str(tmp_path / "q.json"))
    assert r.exit_code == 2 and "prices only the attention kernel it holds" in one_line(r.output)
    assert not (tmp_path / "q.json").exists()


def test_validate_unknown_profile_is_one_line():
    r = run("validate", "--profile", "no-such-profile")
    assert r.exit_code == 2 and "unknown profile 'no-such-profile'" in one_line(r.output)


def test_replay_refuses_the_cuda_flash_kernel_on_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the kernel may run")
    out = tmp_path / "p.json"
    assert run("plan", *TINY, "--out", str(out)).exit_code == 0
    r = run("replay", str(out), "--nproc", "4", "--ring-kernel", "flash-cuda")
    assert r.exit_code == 2 and "flash-cuda runs on CUDA devices" in one_line(r.stderr), r.output


def test_plan_takes_megatron_overlap_and_fp8_recipe_flags(tmp_path):
    out = tmp_path / "o.json"
    r = run("plan", "--model", "llama3-70b", "--gpus", "64", "--tp", "4", "--pp", "8", "--dtype", "fp8",
            "--fp8-recipe", "tensorwise", "--tp-comm-overlap", "--overlap-grad-reduce", "--overlap-param-gather",
            "--fp8-param-gather", "--max-context", "8K", "--compare", "hdp", "--out", str(out))
    assert r.exit_code == 0, r.output
    tr = json.loads(out.read_text())["meta"]["training"]
    assert (tr["fp8_recipe"], tr["tp_comm_overlap"], tr["overlap_grad_reduce"], tr["overlap_param_gather"],
            tr["fp8_param_gather"]) == ("tensorwise", True, True, True, True)
    no_zero = run("plan", "--dtype", "fp8", "--fp8-param-gather", "--zero", "0", "--out", str(tmp_path / "z.json"))
    assert no_zero.exit_code == 2 and "fp8_param_gather needs dtype fp8 and the distributed optimizer" in one_line(
        no_zero.output)
    bad = run("plan", "--fp8-recipe", "e4m3", "--out", str(tmp_path / "x.json"))
    assert bad.exit_code == 2 and "--fp8-recipe must be delayed, tensorwise or mxfp8" in one_line(bad.output)
    bf16 = run("plan", "--fp8-recipe", "tensorwise", "--out", str(tmp_path / "y.json"))
    assert bf16.exit_code == 2 and "applies to dtype fp8 only" in one_line(bf16.output)
    assert not any((tmp_path / f).exists() for f in ("x.json", "y.json", "z.json"))


def test_whatif_sweeps_and_searches_with_training_flags(tmp_path):
    """The what-if commands take plan's training flags (one definition each): an MoE sweep in fp8 over DeepEP with the
    EP overlap prices them (its row and key say so, the report's labels too), capacity reports them; a flag no layout
    trains with fails in one line before planning."""
    out, small = tmp_path / "s.csv", ["--model", "qwen3-30b-a3b", "--gpus", "64", "--tp", "8", "--ep", "8",
                                      "--context", "32K", "--steps", "1", "--tokens-per-step", "1M"]
    r = run("whatif", *small, "--strategies", "hdp", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    base = json.loads(r.stdout)["rows"][0]
    r = run("whatif", *small, "--strategies", "hdp", "--dtype", "fp8", "--moe-grouped-gemm", "--ep-comm-overlap",
            "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["rows"][-1]
    assert row["training"] == "dtype fp8, moe_grouped_gemm, ep_comm_overlap" and row["ep"] == 8
    assert row["key"].endswith("|ep8|dtype-fp8|moe_grouped_gemm-True|ep_comm_overlap-True|hdp")
    assert row["step_time_s"] < base["step_time_s"]
    r = run("report", str(out), "--out", str(tmp_path / "rep"), "--no-example")
    assert r.exit_code == 0 and "hdp (dtype fp8, moe_grouped_gemm, ep_comm_overlap)" in (
        tmp_path / "rep" / "report.md").read_text()
    from planner.studies import read_table

    old = tmp_path / "old.csv"  # a table from before the ep column: its keys name the EP degree
    read_table(out).drop(columns=["ep", "training"]).to_csv(old, index=False)
    assert set(read_table(old)["ep"]) == {8} and set(read_table(old)["training"]) == {""}
    r = run("whatif", "capacity", "--model", "llama-7b", "--context", "32K", "--steps", "1", "--tokens-per-step",
            "1M", "--target-tokens-per-s", "1000", "--max-gpus", "8", "--tp", "1", "--pp", "1", "--dtype", "fp8",
            "--fp8-recipe", "tensorwise", "--table", str(tmp_path / "cap.csv"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["training"] == {"dtype": "fp8", "fp8_recipe": "tensorwise"}
    assert "dtype-fp8|fp8_recipe-tensorwise" in (tmp_path / "cap.csv").read_text()
    r = run("whatif", *small[:2], "--gpus", "8", "--context", "32K", "--ep-comm-overlap", "--out",
            str(tmp_path / "b.csv"))
    assert r.exit_code == 2 and "no layout of the study trains with ep_comm_overlap" in one_line(r.output)
    r = run("whatif", "--dtype", "fp9", "--out", str(tmp_path / "b.csv"))
    assert r.exit_code == 2 and r.stderr == "error: --dtype must be bf16, fp16, fp32 or fp8, got 'fp9'\n"
    assert not (tmp_path / "b.csv").exists() and not (tmp_path / "b.journal.jsonl").exists()
