"""What-if sweeps: a sweep interrupted mid-way resumes to the same table with no point lost, duplicated or
recomputed; infeasible points keep a row with a reason; speedups are against the same config's static plan.
Small cases (1M tokens per step, 8-16 GPUs) keep each test to seconds."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from planner.studies import SWEEP_COLUMNS, Config, Journal, Point, SweepSpec, journal_path, read_table, run_sweep
from profiles.table import ProfileError

K, M = 1024, 1024 * 1024
SPEC = SweepSpec(models=("llama-7b",), gpus=(8, 16), contexts_tokens=(32 * K, 128 * K), lengths=("byted-like",),
                 strategies=("static", "hdp-naive", "hdp"), steps=1, tokens_per_step=M)
TIMING = ["planning_s"]  # wall-clock columns differ between runs by nature


class Interrupt(Exception):
    pass


def stop_after(k: int):
    seen = []

    def on_point(point, row):
        seen.append(point.key)
        if len(seen) == k:
            raise Interrupt

    return on_point


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns=TIMING).reset_index(drop=True),
                                  b.drop(columns=TIMING).reset_index(drop=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted sweep."""
    return run_sweep(SPEC.points(), tmp_path_factory.mktemp("ref") / "sweep.csv")


def test_interrupted_sweep_resumes_to_the_same_table(tmp_path, reference):
    points = SPEC.points()
    out = tmp_path / "sweep.csv"
    with pytest.raises(Interrupt):
        run_sweep(points, out, on_point=stop_after(5))
    journal = journal_path(out)
    assert len(Journal(journal).load()) == 5
    partial = read_table(out)
    assert len(partial) == 5 and partial["key"].is_unique  # the table of finished points is written too
    with journal.open("a") as f:  # a kill in the middle of a write leaves a torn line
        f.write('{"key": "llama-7b|torn')
    computed = []
    res = run_sweep(points, out, on_point=lambda p, r: computed.append(p.key))
    assert res.reused == 5 and res.computed == len(points) - 5  # finished points are not recomputed
    assert len(computed) == len(points) and len(set(computed)) == len(points)
    assert list(res.table["key"]) == [p.key for p in points]  # sweep order, each point once
    same(res.table, reference.table)
    same(read_table(out), reference.table)
    same(read_table(out.with_suffix(".parquet")), reference.table)
    rows = [json.loads(x) for x in journal.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    assert sorted(r["key"] for r in rows) == sorted(p.key for p in points)  # no duplicate journal entries
    again = run_sweep(points, out)
    assert again.computed == 0 and again.reused == len(points)


def test_parallel_sweep_matches_serial(tmp_path, reference):
    res = run_sweep(SPEC.points(), tmp_path / "sweep.parquet", workers=2)
    same(res.table, reference.table)
    assert (tmp_path / "sweep.csv").exists() and (tmp_path / "sweep.parquet").exists()


def test_interrupted_parallel_sweep_resumes(tmp_path, reference):
    out = tmp_path / "sweep.csv"
    with pytest.raises(Interrupt):
        run_sweep(SPEC.points(), out, workers=2, on_point=stop_after(4))
    done = len(Journal(journal_path(out)).load())
    assert done >= 4  # rows of configs that finished are journaled one by one
    res = run_sweep(SPEC.points(), out, workers=2)
    assert res.reused == done and res.computed == len(SPEC.points()) - done
    same(res.table, reference.table)


def test_table_columns_speedups_and_static_reference(reference):
    df = reference.table
    assert list(df.columns) == list(SWEEP_COLUMNS)
    assert df["feasible"].all() and df["key"].is_unique
    static = df[df["strategy"] == "static"]
    assert (static["speedup_vs_static"] == 1.0).all()
    for _, r in df.iterrows():  # every speedup is against the same config's static plan
        s = static[static["key"] == r["key"].rsplit("|", 1)[0] + "|static"].iloc[0]
        assert r["speedup_vs_static"] == pytest.approx(s["step_time_s"] / r["step_time_s"])
        assert r["mfu_unhalved"] > r["mfu"] > 0
        assert r["lower_bound_s"] <= r["step_time_s"] * (1 + 1e-9)


def test_speedup_without_static_in_the_sweep(tmp_path, reference):
    spec = SweepSpec(**{**SPEC.__dict__, "strategies": ("hdp",)})
    df = run_sweep(spec.points(), tmp_path / "hdp.csv").table
    ref = reference.table[reference.table["strategy"] == "hdp"]
    assert list(df["speedup_vs_static"]) == pytest.approx(list(ref["speedup_vs_static"]))


def test_infeasible_points_keep_a_row_with_the_reason(tmp_path):
    pts = [Point(Config("llama-70b", "dgx-h100", 8, 1, 1, 32 * K, "byted-like", M, 1), "hdp"),  # states do not fit
           Point(Config("llama-7b", "dgx-h100", 8, 3, 1, 32 * K, "byted-like", M, 1), "hdp"),  # tp must divide
           Point(Config("llama-7b", "dgx-h100", 8, 1, 1, 2 * M, "byted-like", 2 * M, 1, recompute="none"), "static")]
    df = run_sweep(pts, tmp_path / "bad.csv").table
    assert len(df) == 3 and not df["feasible"].any()
    assert all(isinstance(r, str) and r and "\n" not in r for r in df["reason"])
    assert "do" in df["reason"][0] and "tp=3" in df["reason"][1]
    assert df[["tokens_per_s", "speedup_vs_static"]].isna().all().all()


def test_a_planner_bug_marks_its_point_not_the_sweep(tmp_path, monkeypatch):
    from planner.strategies import STRATEGIES

    def boom(batch, cm, opt):
        raise IndexError("index 4 is out of bounds")

    monkeypatch.setitem(STRATEGIES, "hdp-naive", boom)
    df = run_sweep(SPEC.points()[:3], tmp_path / "s.csv").table
    bad = df[df["strategy"] == "hdp-naive"].iloc[0]
    assert not bad["feasible"] and bad["reason"] == "planner error (IndexError): index 4 is out of bounds"
    assert df[df["strategy"] != "hdp-naive"]["feasible"].all()


def test_attention_kernels_are_configs_of_their_own(tmp_path):
    """A sweep over attention kernels: each kernel its own config (key, row, static reference); FlashAttention-2's
    published rates over the H100 table's FlashAttention-3 make every plan slower; a table written before the
    column reads as the profile's own kernel; a kernel the cluster's profile has no rate for fails before planning."""
    spec = SweepSpec(models=("llama-7b",), gpus=(8,), contexts_tokens=(128 * K,), strategies=("static", "hdp"),
                     steps=1, tokens_per_step=M, attention_kernels=("flash", "fa2"))
    df = run_sweep(spec.points(), tmp_path / "k.csv").table
    assert list(df["attention_kernel"]) == ["flash", "flash", "fa2", "fa2"] and df["key"].is_unique
    assert "attn" not in df["key"][0] and df["key"][3].endswith("|attn-fa2|hdp")  # flash keys as before
    flash, fa2 = df[df["attention_kernel"] == "flash"], df[df["attention_kernel"] == "fa2"]
    assert (fa2["step_time_s"].to_numpy() > flash["step_time_s"].to_numpy()).all()
    assert fa2["speedup_vs_static"].iloc[1] == pytest.approx(fa2["step_time_s"].iloc[0] / fa2["step_time_s"].iloc[1])
    old = tmp_path / "old.csv"
    df.drop(columns=["attention_kernel"]).to_csv(old, index=False)
    assert list(read_table(old)["attention_kernel"]) == ["flash"] * 4
    with pytest.raises(ProfileError, match="no published rate for attention kernel 'fa3'"):
        run_sweep(SweepSpec(clusters=("dgx-a100",), attention_kernels=("fa3",)).points(), tmp_path / "a.csv")
    assert not (tmp_path / "a.journal.jsonl").exists()


def test_loss_and_gradient_accumulation_are_every_configs(tmp_path):
    """A sweep's loss and gradient accumulation go into every config's key, row and cost model; Megatron without the
    fused accumulation (an add a micro-batch) is slower, the defaults keep their keys; older tables read the defaults;
    a value the cost model has no kernel for fails before planning."""
    spec = SweepSpec(models=("llama-7b",), gpus=(8,), contexts_tokens=(64 * K,), strategies=("static",), steps=1,
                     tokens_per_step=M)
    base = run_sweep(spec.points(), tmp_path / "a.csv").table
    other = dataclasses.replace(spec, loss="in_place", grad_accumulation="add")
    df = run_sweep(other.points(), tmp_path / "b.csv").table
    assert "loss" not in base["key"][0] and df["key"][0].endswith("|loss-in_place|acc-add|static")
    assert (df["loss"][0], df["grad_accumulation"][0]) == ("in_place", "add")
    assert other.configs()[0].request().loss == "in_place" and other.configs()[0].request().grad_accumulation == "add"
    assert df["step_time_s"][0] > base["step_time_s"][0]
    old = tmp_path / "old.csv"
    base.drop(columns=["loss", "grad_accumulation"]).to_csv(old, index=False)
    assert (read_table(old)["loss"][0], read_table(old)["grad_accumulation"][0]) == ("online", "fused")
    from planner.plan import PlanError

    with pytest.raises(PlanError, match="loss must be one of online, in_place, fp32, got 'chunked'"):
        run_sweep(dataclasses.replace(spec, loss="chunked").points(), tmp_path / "c.csv")
    with pytest.raises(PlanError, match="gradient accumulation 'add' with ZeRO-2 is not modelled"):
        run_sweep(dataclasses.replace(other, zero_stages=(1, 2)).points(), tmp_path / "c.csv")
    assert not (tmp_path / "c.journal.jsonl").exists()


def test_unknown_inputs_fail_before_planning(tmp_path):
    from costmodel.specs import SpecError
    from planner.plan import PlanError
    from planner.workload import SourceError

    with pytest.raises(SpecError):
        run_sweep(SweepSpec(models=("no-such-model",)).points(), tmp_path / "x.csv")
    with pytest.raises(PlanError):
        run_sweep(SweepSpec(strategies=("nope",)).points(), tmp_path / "x.csv")
    with pytest.raises(SourceError):
        run_sweep(SweepSpec(lengths=("no-such-source",)).points(), tmp_path / "x.csv")
    assert not (tmp_path / "x.journal.jsonl").exists()


def test_training_flags_are_every_configs(tmp_path):
    """A sweep's training flags (precision, MoE dispatch, overlaps) go into every config's key, row, request and cost
    model; the defaults keep their keys; the row's label parses back to the flags (the report re-plans from it); flags
    no layout can train with, and fp8 on a GPU without fp8 tensor cores, fail before planning."""
    from planner.plan import PlanError
    from planner.studies import TrainingFlags

    spec = SweepSpec(models=("llama-7b",), gpus=(8,), contexts_tokens=(32 * K,), strategies=("static",), steps=1,
                     tokens_per_step=M)
    base = run_sweep(spec.points(), tmp_path / "a.csv").table
    flags = TrainingFlags(dtype="fp8", fp8_recipe="tensorwise", overlap_grad_reduce=True)
    df = run_sweep(dataclasses.replace(spec, flags=flags).points(), tmp_path / "b.csv").table
    assert base["training"][0] == "" and "dtype" not in base["key"][0]
    assert df["key"][0].endswith("|dtype-fp8|fp8_recipe-tensorwise|overlap_grad_reduce-True|static")
    assert df["training"][0] == "dtype fp8, fp8_recipe tensorwise, overlap_grad_reduce"
    assert TrainingFlags.parse(df["training"][0]) == flags and TrainingFlags.parse("") == TrainingFlags()
    req = dataclasses.replace(spec, flags=flags).configs()[0].request()
    assert (req.dtype, req.fp8_recipe, req.overlap_grad_reduce) == ("fp8", "tensorwise", True)
    assert df["recompute"][0] == base["recompute"][0] and df["step_time_s"][0] < base["step_time_s"][0]  # fp8 GEMMs
    assert read_table(tmp_path / "b.csv")["training"][0] == df["training"][0]
    old = tmp_path / "old.csv"
    base.drop(columns=["training", "ep"]).to_csv(old, index=False)
    assert (read_table(old)["training"][0], read_table(old)["ep"][0]) == ("", 1)
    with pytest.raises(PlanError, match="unknown flag 'dtyp'"):
        TrainingFlags.parse("dtyp fp8")
    with pytest.raises(PlanError, match="mtp_layers cannot be 'two'"):
        TrainingFlags.parse("mtp_layers two")
    with pytest.raises(PlanError, match="moe_dispatcher must be one of alltoall, flex"):
        TrainingFlags(moe_dispatcher="deepep")
    # one type per field: the key and label do not depend on how a number was written
    assert TrainingFlags(moe_capacity_factor=2).changed() == {"moe_capacity_factor": 2.0}
    assert TrainingFlags(moe_grouped_gemm=1).label == "moe_grouped_gemm"
    off = TrainingFlags(sequence_parallel=False)  # a switch on by default reads as "name False" when off
    assert off.label == "sequence_parallel False" and TrainingFlags.parse(off.label) == off
    assert dataclasses.replace(spec, flags=off).configs()[0].request().sequence_parallel is False
    with pytest.raises(PlanError, match="overlap_grad_reduce cannot be 'yes'"):
        TrainingFlags.parse("overlap_grad_reduce yes")
    with pytest.raises(PlanError, match="no layout of the study trains with moe_grouped_gemm: llama-7b is dense"):
        run_sweep(dataclasses.replace(spec, flags=TrainingFlags(moe_grouped_gemm=True)).points(), tmp_path / "c.csv")
    # a layout the model does not take fails without the flags too: its rows say so, the flags are not blamed
    odd = SweepSpec(models=("mistral-8x7b",), gpus=(8,), tps=(4,), ep=3, contexts_tokens=(32 * K,),
                    strategies=("static",), steps=1, tokens_per_step=M, flags=TrainingFlags(dtype="fp8"))
    row = run_sweep(odd.points(), tmp_path / "d.csv").table.iloc[0]
    assert not row["feasible"] and "ep=3 must divide tp=4" in row["reason"]
    with pytest.raises(PlanError, match="no layout of the study trains with ep_comm_overlap: ep_comm_overlap needs"):
        run_sweep(dataclasses.replace(spec, flags=TrainingFlags(ep_comm_overlap=True)).points(), tmp_path / "c.csv")
    with pytest.raises(PlanError, match="dtype fp8: no cluster of the study has fp8 GEMMs"):
        run_sweep(dataclasses.replace(spec, clusters=("dgx-a100",), flags=flags).points(), tmp_path / "c.csv")
    assert not (tmp_path / "c.journal.jsonl").exists()
