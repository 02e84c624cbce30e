"""Crash-safe traces (each rank appends its records to TRACE.rankR.jsonl as it goes; rank 0 merges them
at the end) and the per-step P2P warm-up (only the pairs of the steps run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.plan import Mesh, Piece, Plan, PlanError, Predicted, Sequence, Step, Unit, validate, zigzag_tokens_per_rank
from planner.runtime.trace import (StepRecord, TraceLog, UnitRecord, merge_partial_traces, part_path, part_paths,
                                   read_part)
from planner.simulate.measured import compare_measured, read_measured_trace

# the fields of a complete trace, as the replay wrote them before the parts existed
TOP = {"complete", "meta", "schema", "steps"}
META = {"backend", "cp_impl", "cpu_threads", "created", "device", "device_name", "dtype", "gc_frozen_objects",
        "host_probe", "lr", "model",
        "optimizer", "plan", "plan_model", "plan_sha256", "prewarm_s", "recompute", "ring_kernel", "seed", "steps",
        "tokens", "torch", "world_size"}
STEP = {"loss", "plan_step", "predicted_step_time_s", "ranks", "step", "step_time_s", "units"}
LOAD = {"other_cores", "steal_cores"}  # a one-node CPU replay's (Linux): other processes' load during the step
RANK = {"cpu_s", "grad_sync_s", "hdp_rank", "loss", "optimizer_s", "plan_step", "rank", "start_s", "step",
        "step_loss", "units_s", "wall_s", "node_cpu_s", "node_steal_s", "gc_s"}
UNIT = {"bwd_s", "comm_wait_s", "degree", "end_s", "fwd_s", "hdp_rank", "offload_ratio", "offloaded_bytes", "ops",
        "peak_memory_bytes", "plan_step", "predicted_time_s", "rank", "saved_bytes", "sent_bytes", "slices", "stage",
        "start_s", "step", "tokens", "unit", "ulysses", "cp", "tp_wait_s", "thread_cpu_s", "helper_cpu_s"}


def _unit(step: int, rank: int) -> UnitRecord:
    return UnitRecord(step=step, plan_step=step, rank=rank, hdp_rank=rank, unit=0, degree=2, tokens=8, start_s=1.0,
                      fwd_s=0.1, bwd_s=0.2, comm_wait_s=0.0, sent_bytes=4, saved_bytes=8, offloaded_bytes=0,
                      offload_ratio=0.0, peak_memory_bytes=1, predicted_time_s=0.3)


def _step(step: int, rank: int) -> StepRecord:
    return StepRecord(step=step, plan_step=step, rank=rank, hdp_rank=rank, start_s=1.0, units_s=0.3, grad_sync_s=0.1,
                      optimizer_s=0.1, wall_s=0.5, cpu_s=0.5, loss=1.0, step_loss=2.0)


def test_parts_are_appended_as_records_come_and_a_cut_part_still_reads(tmp_path):
    trace = tmp_path / "trace.json"
    logs = [TraceLog(trace, r, 100.0 + r) for r in (0, 1)]
    for r, log in enumerate(logs):
        log.warmup(0.01, 1)
        log.unit(_unit(0, r))
        log.step(_step(0, r))
    assert part_paths(trace) == [part_path(trace, 0), part_path(trace, 1)] == [tmp_path / "trace.rank0.jsonl",
                                                                                tmp_path / "trace.rank1.jsonl"]
    logs[0].unit(_unit(1, 0))  # rank 0 is in step 1 ...
    with part_path(trace, 0).open("a") as f:
        f.write('{"kind": "unit", "step": 1, "pl')  # ... and killed in the middle of a line
    rt, ended = read_part(part_path(trace, 0))  # on disk already: nothing waits in a buffer
    assert ended is None and len(rt.units) == 2 and len(rt.steps) == 1 and rt.prewarm_pairs == 1
    logs[1].failed("rank 1 stopped")
    doc = merge_partial_traces(trace)
    assert doc["complete"] is False and doc["meta"]["parts"] == {"trace.rank0.jsonl": None,
                                                                 "trace.rank1.jsonl": "failed: rank 1 stopped"}
    assert [(s["step"], len(s["ranks"]), len(s["units"]), s["step_time_s"]) for s in doc["steps"]] == \
        [(0, 2, 2, 0.5), (1, 0, 1, None)]
    assert doc["meta"]["prewarm_pairs"] == 1
    with pytest.raises(PlanError, match=r"trace.json: no complete trace: .*2 per-rank partial traces "
                                        r"\(trace.rank0.jsonl, \.\.\.\).*merge_partial_traces"):
        read_measured_trace(trace)
    with pytest.raises(PlanError, match=r"incomplete \(the replay did not finish; merged from its partial traces "
                                        r"trace.rank0.jsonl, trace.rank1.jsonl\)"):
        compare_measured(None, None, doc)
    done = logs[1].finish()  # a rank that finished reads its whole part back
    assert [s.step for s in done.steps] == [0] and done.clock_offset_s == 101.0
    logs[1].remove()
    assert part_paths(trace) == [part_path(trace, 0)]
    with pytest.raises(PlanError, match=r"no such trace \(nor partial traces other.rank0.jsonl"):
        read_measured_trace(tmp_path / "other.json")


# -- torchrun -------------------------------------------------------------------------------------

TIMEOUT_S = 180


def _make_step(step: int, seqs: dict[int, int], units: list[tuple], order: dict[int, list[int]]) -> Step:
    """units: (id, hdp_ranks, seq) with the whole sequence as the unit's one piece."""
    return Step(step=step, global_tokens=sum(seqs.values()), sequences=[Sequence(i, n) for i, n in seqs.items()],
                units=[Unit(id=i, hdp_ranks=tuple(r), pieces=(Piece(q, 0, seqs[q]),), offload_ratio=0.0,
                            tokens_per_rank=zigzag_tokens_per_rank([seqs[q]], len(r))) for i, r, q in units],
                order=order, predicted=Predicted(1.0, 0.5, [0.5] * 3, [1e6] * 3))


def _three_rank_plan(path: Path) -> None:
    """Step 0 shares a unit over HDP ranks (0, 1), step 1 over (1, 2): one new pair per step."""
    st0 = _make_step(0, {0: 40, 1: 30}, [(0, [0, 1], 0), (1, [2], 1)], {0: [0], 1: [0], 2: [1]})
    st1 = _make_step(1, {2: 36, 3: 20}, [(0, [1, 2], 2), (1, [0], 3)], {0: [1], 1: [0], 2: [0]})
    plan = Plan(meta={"model": "tiny", "strategy": "hand-built"}, mesh=Mesh(3, 1, 1, 3), steps=[st0, st1])
    validate(plan)
    plan.save(path)


def _env() -> dict[str, str]:
    """This environment without a surrounding torchrun's rank variables, one thread per rank."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=_env())


@pytest.mark.torchrun
def test_finished_replay_merges_its_parts_and_warms_only_the_pairs_of_the_steps_run(tmp_path):
    pytest.importorskip("torch")
    _three_rank_plan(tmp_path / "plan.json")
    res = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "planner.runtime",
                "plan.json", "--steps", "1", "--trace", "trace.json"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "trace.json").read_text())
    assert set(doc) == TOP and doc["complete"] is True and META <= set(doc["meta"])
    assert [set(s) for s in doc["steps"]] == [STEP | LOAD]
    ranks = doc["steps"][0]["ranks"]
    assert all(set(r) == RANK for r in ranks) and len(ranks) == 3
    # rank 0 read the node's CPU time around its step (every process's, ours too); only rank 0 holds it
    assert ranks[0]["node_cpu_s"] > 0 and ranks[1]["node_cpu_s"] is None
    assert doc["steps"][0]["other_cores"] >= 0 and doc["steps"][0]["steal_cores"] >= 0
    assert all(set(u) == UNIT for u in doc["steps"][0]["units"]) and len(doc["steps"][0]["units"]) == 3
    assert doc["meta"]["prewarm_pairs"] == 1  # step 0's pair (0, 1); not step 1's (1, 2)
    assert (tmp_path / "trace.chrome.json").is_file() and part_paths(tmp_path / "trace.json") == []


@pytest.mark.torchrun
def test_killed_replay_leaves_readable_parts_and_no_trace(tmp_path):
    pytest.importorskip("torch")
    _three_rank_plan(tmp_path / "plan.json")
    (tmp_path / "trace.json").write_text('{"stale": true}\n')  # an earlier run's
    res = _run(["-c", "from cli import app; app()", "replay", "plan.json", "--nproc", "3", "--trace", "trace.json",
                "--inject-failure", "0:1:kill"], tmp_path)  # rank 0's unit 1 is in step 1
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "rank 0 was killed by SIGKILL in step 1" in last, res.stderr[-3000:]
    assert last.endswith("(partial traces: trace.rank*.jsonl)"), last
    assert not (tmp_path / "trace.json").exists() and not (tmp_path / "trace.chrome.json").exists()
    assert len(part_paths(tmp_path / "trace.json")) == 3
    doc = merge_partial_traces(tmp_path / "trace.json")
    assert doc["complete"] is False and doc["meta"]["parts"]["trace.rank0.jsonl"] is None  # killed: no last word
    s0 = doc["steps"][0]
    assert s0["step"] == 0 and len(s0["ranks"]) == 3 and len(s0["units"]) == 3  # step 0 whole on every rank
    assert doc["meta"]["prewarm_pairs"] == 2  # step 1's warm-up ran before the kill
    with pytest.raises(PlanError, match="no complete trace: the replay did not finish"):
        read_measured_trace(tmp_path / "trace.json")
