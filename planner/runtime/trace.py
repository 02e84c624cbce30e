"""Measured trace of a replay: per rank and unit forward/backward wall times, communication
waits and memory; per rank and step the gradient sync and optimizer. Written by rank 0, only
after every rank finished, atomically: as JSON (`meshplan simulate --measured` reads it) and as a
Chrome trace (chrome://tracing, Perfetto) beside it.

Times are host wall clock. On GPU the executor synchronises the device at phase boundaries, so a
phase's time includes its kernels; P2P waits on NCCL only make the stream wait and read ~0."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TRACE_SCHEMA = "meshplan.measured/1"


@dataclass
class UnitRecord:
    """One unit as one rank ran it."""

    step: int  # replay iteration (0, 1, ...)
    plan_step: int  # the plan step it replays
    rank: int  # global rank
    hdp_rank: int
    unit: int  # unit id
    degree: int  # ranks sharing the unit
    tokens: int  # local tokens (zigzag padding included)
    start_s: float  # wall-clock start, seconds since the run's origin
    fwd_s: float  # forward (loss included) wall time
    bwd_s: float  # backward wall time
    comm_wait_s: float  # of fwd+bwd, time blocked waiting for P2P transfers
    sent_bytes: int  # P2P bytes this rank sent for the unit
    saved_bytes: int  # activation bytes autograd saved in forward (parameters excluded)
    offloaded_bytes: int  # of which moved to host memory
    offload_ratio: float  # the plan's ratio for the unit
    peak_memory_bytes: int  # CUDA: max allocated during the unit; CPU: process peak RSS so far
    predicted_time_s: float  # the plan's forward+backward prediction for the unit
    stage: int = 0  # pipeline stage (pp > 1)
    slices: int = 1  # the unit's pipeline slices
    # pp > 1: the unit's ops on this rank, [kind "F"/"B", slice, chunk, start_s, dur_s] (its forward
    # and backward are not contiguous there: other micro-batches run between them)
    ops: list[list] = field(default_factory=list)

    @property
    def end_s(self) -> float:
        if self.ops:
            return max(o[3] + o[4] for o in self.ops)
        return self.start_s + self.fwd_s + self.bwd_s


@dataclass
class StepRecord:
    """One replay iteration on one rank."""

    step: int
    plan_step: int
    rank: int
    hdp_rank: int
    start_s: float  # wall-clock start, seconds since the run's origin
    units_s: float  # all units, forward and backward
    grad_sync_s: float  # gradient all-reduce over the HDP ranks
    optimizer_s: float
    wall_s: float  # whole step on this rank (the --check reference excluded)
    cpu_s: float  # process CPU time of the step (all threads): work done, whatever else shares the cores
    loss: float  # this rank's share of the step loss (sums to the step loss)
    step_loss: float  # the step loss (all-reduced with the gradients)


@dataclass
class RankTrace:
    """Everything one rank measured; gathered to rank 0 at the end of the run."""

    rank: int
    clock_offset_s: float  # this rank's wall clock at its perf_counter() zero, for aligning ranks
    prewarm_s: float = 0.0  # P2P warm-up before step 0 (not part of any step)
    units: list[UnitRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)


def build_trace(meta: dict[str, Any], ranks: list[RankTrace], predicted_step_s: dict[int, float]) -> dict[str, Any]:
    """The measured-trace JSON document: per step, per-rank records and the step time (slowest
    rank, as a collective-bound step is)."""
    steps: dict[int, dict[str, Any]] = {}
    for rt in ranks:
        for s in rt.steps:
            e = steps.setdefault(s.step, {"step": s.step, "plan_step": s.plan_step, "ranks": [], "units": []})
            e["ranks"].append(asdict(s))
        for u in rt.units:
            steps[u.step]["units"].append({**asdict(u), "end_s": u.end_s})
    out = []
    for k in sorted(steps):
        e = steps[k]
        e["ranks"].sort(key=lambda r: r["rank"])
        e["units"].sort(key=lambda u: (u["rank"], u["start_s"]))
        e["step_time_s"] = max(r["wall_s"] for r in e["ranks"])
        e["loss"] = sum(r["loss"] for r in e["ranks"])
        e["predicted_step_time_s"] = predicted_step_s.get(e["plan_step"])
        out.append(e)
    meta = {**meta, "prewarm_s": max(rt.prewarm_s for rt in ranks)}
    return {"schema": TRACE_SCHEMA, "complete": True, "meta": meta, "steps": out}


def chrome_trace(doc: dict[str, Any]) -> dict[str, Any]:
    """Chrome trace events: one named process per rank (its HDP rank and stage), a thread of
    forward/backward/sync/optimizer slices and one of whole steps."""
    from planner.simulate import chrome_metadata  # the one naming helper (numpy behind it: rank 0, at the end)

    ev: list[dict[str, Any]] = []
    us = 1e6
    hdp_rank = {r["rank"]: r["hdp_rank"] for s in doc["steps"] for r in s["ranks"]}
    stage = {u["rank"]: u.get("stage", 0) for s in doc["steps"] for u in s["units"]}
    pipelined = any(stage.values())
    procs = {r: f"rank {r} (HDP rank {h}" + (f", stage {stage[r]})" if pipelined and r in stage else ")")
             for r, h in hdp_rank.items()}
    threads = {k: name for r in hdp_rank for k, name in (((r, 0), "units, grad sync, optimizer"), ((r, 1), "steps"))}
    for s in doc["steps"]:
        for u in s["units"]:
            args = {k: u[k] for k in ("unit", "degree", "tokens", "comm_wait_s", "sent_bytes", "offloaded_bytes",
                                      "predicted_time_s")}
            if u.get("ops"):  # pipelined: one slice per op
                for kind, j, c, t, dur in u["ops"]:
                    name = f"unit {u['unit']} {'fwd' if kind == 'F' else 'bwd'}" + \
                        (f" s{j}" if u["slices"] > 1 else "") + (f" c{c}" if c else "")
                    ev.append({"ph": "X", "pid": u["rank"], "tid": 0, "name": name,
                               "cat": "forward" if kind == "F" else "backward", "ts": t * us, "dur": dur * us,
                               "args": {**args, "stage": u["stage"]}})
                continue
            ev.append({"ph": "X", "pid": u["rank"], "tid": 0, "name": f"unit {u['unit']} fwd", "cat": "forward",
                       "ts": u["start_s"] * us, "dur": u["fwd_s"] * us, "args": args})
            ev.append({"ph": "X", "pid": u["rank"], "tid": 0, "name": f"unit {u['unit']} bwd", "cat": "backward",
                       "ts": (u["start_s"] + u["fwd_s"]) * us, "dur": u["bwd_s"] * us, "args": args})
        for r in s["ranks"]:
            t = r["start_s"] + r["units_s"]
            ev.append({"ph": "X", "pid": r["rank"], "tid": 0, "name": "grad sync", "cat": "comm",
                       "ts": t * us, "dur": r["grad_sync_s"] * us})
            ev.append({"ph": "X", "pid": r["rank"], "tid": 0, "name": "optimizer", "cat": "compute",
                       "ts": (t + r["grad_sync_s"]) * us, "dur": r["optimizer_s"] * us})
            ev.append({"ph": "X", "pid": r["rank"], "tid": 1, "name": f"step {s['step']}", "cat": "step",
                       "ts": r["start_s"] * us, "dur": r["wall_s"] * us})
    return {"traceEvents": chrome_metadata(procs, threads) + ev, "displayTimeUnit": "ms", "otherData": doc["meta"]}


def chrome_path(path: Path) -> Path:
    """trace.json -> trace.chrome.json."""
    return path.with_name(f"{path.stem}.chrome{path.suffix or '.json'}")


def write_trace(path: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    """Both files, each written atomically (never a half-written trace under the final name)."""
    from profiles.table import atomic_write_text  # pandas behind it: only rank 0, only at the end

    path = Path(path)
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    cp = chrome_path(path)
    atomic_write_text(cp, json.dumps(chrome_trace(doc), allow_nan=False) + "\n")
    return path, cp


def remove_stale(path: Path) -> None:
    """A trace left by an earlier run must not pass for this run's if this one fails."""
    for p in (Path(path), chrome_path(Path(path))):
        p.unlink(missing_ok=True)
