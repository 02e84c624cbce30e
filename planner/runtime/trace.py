"""Measured trace of a replay: per rank and unit forward/backward wall times, communication
waits and memory; per rank and step the gradient sync and optimizer.

Crash-safe: with --trace, each rank appends its records to its own part, TRACE.rankR.jsonl (one JSON
line per unit and per step, line-buffered, so a killed process loses at most the line it was writing),
and keeps none in memory. Once every rank finished, each reads its part back, rank 0 merges them into
the trace JSON (`complete: true`; `meshplan simulate --measured` reads it) and a Chrome trace
(chrome://tracing, Perfetto) beside it, both written atomically, and the ranks remove their parts. A
run that dies leaves its parts and no trace JSON; `merge_partial_traces` builds an incomplete one
(`complete: false`) from them for inspection.

On CPU, meta `host_probe` holds the host probe's time (profiles/measure/probe.py, rank 0 alone, the others at a
barrier) before and after the steps: how fast the host computed around the replay, which `meshplan simulate
--measured` sets beside the profile's. A one-node CPU replay also records, per step, the cores other processes kept
busy (`other_cores`: the node's CPU time from /proc/stat less every rank's, profiles/measure/hostload.py) and the
hypervisor's steal (`steal_cores`): load the probe, alone on one core, cannot see.

Times are host wall clock. On GPU the executor synchronises the device at phase boundaries, so a
phase's time includes its kernels; P2P waits on NCCL only make the stream wait and read ~0."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from profiles.measure.hostload import other_cores

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
    ulysses: int = 1  # the unit's head-split (Ulysses) degree
    cp: str = "ring"  # the context-parallel kind it ran (the unit's own, else the replay's --cp)
    tp_wait_s: float = 0.0  # of fwd+bwd, time in TP all-reduces (tp > 1: transfers and the wait for the group)
    # CPU time over the unit's forward and backward (CpuUse; absent from traces before it): this rank's own thread,
    # its compute and Python whatever it waited for, and the process's other threads (gloo's transport and work
    # threads; on GPU also autograd's device thread, which launches the backward)
    thread_cpu_s: float = 0.0
    helper_cpu_s: float = 0.0
    # pp > 1: the unit's ops on this rank, [kind "F"/"B", slice, chunk, start_s, dur_s, thread_cpu_s] (its forward
    # and backward are not contiguous there: other micro-batches run between them; traces before the op's CPU: 5)
    ops: list[list] = field(default_factory=list)

    @property
    def end_s(self) -> float:
        if self.ops:
            return max(o[3] + o[4] for o in self.ops)
        return self.start_s + self.fwd_s + self.bwd_s


@dataclass
class CpuUse:
    """CPU time over timed spans: the calling thread's (a rank runs its forward on it, and on CPU autograd's
    backward too) and the process's other threads' (process time less the thread's). Where ranks time-slice the cores,
    wall time stretches and CPU time does not: the thread's CPU is the unit's work, and the helpers' is CPU that
    competed with it (gloo's loop thread moving ring and pipeline transfers: up to 30 ms a 2-rank ring unit on a
    2-core host, docs/BENCHMARKS.md)."""

    thread_s: float = 0.0
    helpers_s: float = 0.0

    @staticmethod
    def mark() -> tuple[float, float]:
        return time.thread_time(), time.process_time()

    def add_since(self, mark: tuple[float, float]) -> float:
        """Add the span since `mark`; returns its own-thread CPU."""
        thread, process = time.thread_time() - mark[0], time.process_time() - mark[1]
        self.thread_s += thread
        self.helpers_s += max(0.0, process - thread)
        return thread


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
    # rank 0 of a one-node CPU replay: every process's CPU time on the node during its step, and the hypervisor's
    # steal (profiles/measure/hostload.py); None elsewhere
    node_cpu_s: float | None = None
    node_steal_s: float | None = None
    gc_s: float = 0.0  # of wall_s, Python's cyclic garbage collector (planner/runtime/collector.py)


@dataclass
class PlanningRecord:
    """Plan-ahead (rank 0): the planning of one replay iteration, in a background thread while the
    iteration before it ran, and what of it the run waited for."""

    step: int  # the replay iteration planned
    start_s: float  # wall-clock start, seconds since the run's origin
    plan_s: float  # planning (the planner API), the replay's checks and cutting every rank's part
    wait_s: float  # how long iteration `step` waited for its plan: the planning not hidden behind the step before
    send_s: float  # validating and sending each rank its part of the step (exposed too)
    sent_bytes: int  # pickled parts sent to the other ranks

    @property
    def hidden_s(self) -> float:
        return max(0.0, self.plan_s - self.wait_s)


@dataclass
class RankTrace:
    """Everything one rank measured; gathered to rank 0 at the end of the run."""

    rank: int
    clock_offset_s: float  # this rank's wall clock at its perf_counter() zero, for aligning ranks
    prewarm_s: float = 0.0  # P2P warm-up of the pairs each step meets first (before the step, not part of it)
    prewarm_pairs: int = 0  # peers this rank set up a P2P connection with (each once)
    units: list[UnitRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    planning: list[PlanningRecord] = field(default_factory=list)  # plan-ahead, rank 0


def align_clocks(ranks: list[RankTrace]) -> None:
    """Per-rank perf_counter times -> one wall clock, zero at the earliest step start (or plan-ahead's first
    planning, before it)."""
    starts = [t.clock_offset_s + min(s.start_s for s in [*t.steps, *t.planning]) for t in ranks if t.steps]
    origin = min(starts, default=min((t.clock_offset_s for t in ranks), default=0.0))
    for t in ranks:
        shift = t.clock_offset_s - origin
        for u in t.units:
            u.start_s += shift
            for o in u.ops:
                o[3] += shift
        for s in t.steps:
            s.start_s += shift
        for p in t.planning:
            p.start_s += shift


def _step_load(ranks: list[dict[str, Any]], complete: bool) -> dict[str, float]:
    """Other processes' cores during a step (rank 0's window; the node's CPU time less every rank's) and the
    hypervisor's steal, when rank 0 read the node's counters (a one-node CPU replay) and every rank reported (a
    dead run's step may lack some: their CPU time would count as other load)."""
    first = ranks[0] if ranks else {}
    if not complete or first.get("rank") != 0 or first.get("node_cpu_s") is None:
        return {}
    wall = first["wall_s"]
    return {"other_cores": other_cores(first["node_cpu_s"], sum(r["cpu_s"] for r in ranks), wall),
            "steal_cores": first["node_steal_s"] / wall if wall > 0 else 0.0}


def build_trace(meta: dict[str, Any], ranks: list[RankTrace], predicted_step_s: dict[int, float],
                complete: bool = True) -> dict[str, Any]:
    """The measured-trace JSON document: per step, per-rank records and the step time (slowest
    rank, as a collective-bound step is). Incomplete (from a dead run's parts): a step may lack
    ranks, and one no rank finished has no step time or loss."""
    steps: dict[int, dict[str, Any]] = {}
    for rt in ranks:
        for s in rt.steps:
            e = steps.setdefault(s.step, {"step": s.step, "plan_step": s.plan_step, "ranks": [], "units": []})
            e["ranks"].append(asdict(s))
        for u in rt.units:
            e = steps.setdefault(u.step, {"step": u.step, "plan_step": u.plan_step, "ranks": [], "units": []})
            e["units"].append({**asdict(u), "end_s": u.end_s})
    planning = {p.step: p for rt in ranks for p in rt.planning}
    out = []
    for k in sorted(steps):
        e = steps[k]
        e["ranks"].sort(key=lambda r: r["rank"])
        e["units"].sort(key=lambda u: (u["rank"], u["start_s"]))
        e["step_time_s"] = max((r["wall_s"] for r in e["ranks"]), default=None)
        e["loss"] = sum(r["loss"] for r in e["ranks"]) if e["ranks"] else None
        e["predicted_step_time_s"] = predicted_step_s.get(e["plan_step"])
        e.update(_step_load(e["ranks"], complete))
        if k in planning:
            e["planning"] = asdict(planning[k])
        out.append(e)
    meta = {**meta, "prewarm_s": max((rt.prewarm_s for rt in ranks), default=0.0),
            "prewarm_pairs": sum(rt.prewarm_pairs for rt in ranks) // 2}  # both ends count a pair
    if planning:
        meta["plan_ahead"] = plan_ahead_summary(list(planning.values()))
    return {"schema": TRACE_SCHEMA, "complete": complete, "meta": meta, "steps": out}


def plan_ahead_summary(records: list[PlanningRecord]) -> dict[str, Any]:
    """How much planning the steps hid: over the iterations planned while another ran (all but the
    first, whose planning nothing can hide), planning seconds, the seconds the run waited for them,
    and the hidden share; plus the first iteration's planning and the per-step send."""
    ahead = [p for p in records if p.step > min(r.step for r in records)]
    plan_s, wait_s = sum(p.plan_s for p in ahead), sum(p.wait_s for p in ahead)
    return {"steps_planned_ahead": len(ahead), "plan_s": plan_s, "exposed_s": wait_s,
            "hidden_fraction": (1.0 - wait_s / plan_s) if plan_s > 0 else None,
            "first_plan_s": min(records, key=lambda r: r.step).plan_s,
            "send_s": sum(p.send_s for p in records) / len(records),
            "sent_bytes": sum(p.sent_bytes for p in records) // len(records)}


# -- per-rank parts -------------------------------------------------------------------------------

_PART = re.compile(r"\.rank(\d+)\.jsonl$")


def part_path(path: Path, rank: int) -> Path:
    """trace.json -> trace.rank3.jsonl: rank 3's records, appended as the run goes."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}.jsonl")


def part_paths(path: Path) -> list[Path]:
    """The parts beside `path`, by rank."""
    path = Path(path)
    found = [(int(m[1]), p) for p in path.parent.glob(f"{path.stem}.rank*.jsonl")
             if (m := _PART.search(p.name)) and p.name == part_path(path, int(m[1])).name]
    return [p for _, p in sorted(found)]


class TraceLog:
    """One rank's records as it makes them: appended to its part (one JSON line each, line-buffered)
    when the run writes a trace, else kept in memory (rank 0 still prints the step lines)."""

    def __init__(self, path: Path | None, rank: int, clock_offset_s: float) -> None:
        self.rank = rank
        self.path = part_path(path, rank) if path is not None else None
        self._mem = RankTrace(rank, clock_offset_s)
        self._file = open(self.path, "w", buffering=1) if self.path is not None else None
        self._line({"kind": "rank", "rank": rank, "clock_offset_s": clock_offset_s})

    def _line(self, obj: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(obj, allow_nan=False) + "\n")

    def unit(self, rec: UnitRecord) -> None:
        if self._file is None:
            self._mem.units.append(rec)
        self._line({"kind": "unit", **asdict(rec)})

    def step(self, rec: StepRecord) -> None:
        if self._file is None:
            self._mem.steps.append(rec)
        self._line({"kind": "step", **asdict(rec)})

    def planning(self, rec: PlanningRecord) -> None:
        if self._file is None:
            self._mem.planning.append(rec)
        self._line({"kind": "planning", **asdict(rec)})

    def warmup(self, seconds: float, pairs: int) -> None:
        self._mem.prewarm_s += seconds
        self._mem.prewarm_pairs += pairs
        if pairs:
            self._line({"kind": "warmup", "s": seconds, "pairs": pairs})

    def failed(self, message: str) -> None:
        """The rank's error, last line of its part (best effort: the process ends right after)."""
        try:
            self._line({"kind": "failed", "error": message})
        except (OSError, ValueError):
            pass

    def finish(self) -> RankTrace:
        """Every record of this rank (its part read back: it holds none in memory)."""
        if self._file is None:
            return self._mem
        self._line({"kind": "end"})
        self._file.close()
        return read_part(self.path)[0]

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_part(path: Path) -> tuple[RankTrace, str | None]:
    """A part's records and how it ended: "end" (the rank finished), its error ("failed: ..."), or
    None (cut short: the rank was killed; a half-written last line is skipped)."""
    rt: RankTrace | None = None
    ended = None
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a killed process was writing
        kind = rec.pop("kind", None)
        if kind == "rank":
            rt = RankTrace(rec["rank"], rec["clock_offset_s"])
        elif rt is None:
            raise ValueError(f"{path}: not a trace part (no rank line first)")
        elif kind == "unit":
            rt.units.append(UnitRecord(**rec))
        elif kind == "step":
            rt.steps.append(StepRecord(**rec))
        elif kind == "planning":
            rt.planning.append(PlanningRecord(**rec))
        elif kind == "warmup":
            rt.prewarm_s += rec["s"]
            rt.prewarm_pairs += rec["pairs"]
        elif kind == "end":
            ended = "end"
        elif kind == "failed":
            ended = f"failed: {rec['error']}"
    if rt is None:
        raise ValueError(f"{path}: empty trace part (its rank died before writing a record)")
    return rt, ended


def merge_partial_traces(path: Path) -> dict[str, Any]:
    """An incomplete trace (`complete: false`) from the parts a dead run left beside `path`, for
    inspection: meta names each part and how it ended (see read_part)."""
    parts = part_paths(path)
    if not parts:
        raise FileNotFoundError(f"{path}: no trace parts ({part_path(path, 0).name}, ...) beside it")
    ranks, ends = [], {}
    for p in parts:
        rt, ended = read_part(p)
        ranks.append(rt)
        ends[p.name] = ended
    align_clocks(ranks)
    return build_trace({"parts": ends}, ranks, {}, complete=False)


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
    if any("planning" in s for s in doc["steps"]):
        threads[(0, 2)] = "plan-ahead (background thread)"
    for s in doc["steps"]:
        for u in s["units"]:
            args = {k: u[k] for k in ("unit", "degree", "tokens", "comm_wait_s", "tp_wait_s", "sent_bytes",
                                      "offloaded_bytes", "predicted_time_s", "ulysses", "cp", "thread_cpu_s",
                                      "helper_cpu_s")
                    if k in u}  # older traces lack tp_wait_s, ulysses, cp and the CPU times
            if u.get("ops"):  # pipelined: one slice per op
                for kind, j, c, t, dur, *cpu in u["ops"]:
                    name = f"unit {u['unit']} {'fwd' if kind == 'F' else 'bwd'}" + \
                        (f" s{j}" if u["slices"] > 1 else "") + (f" c{c}" if c else "")
                    ev.append({"ph": "X", "pid": u["rank"], "tid": 0, "name": name,
                               "cat": "forward" if kind == "F" else "backward", "ts": t * us, "dur": dur * us,
                               "args": {**args, "stage": u["stage"], **({"op_thread_cpu_s": cpu[0]} if cpu else {})}})
                continue
            ev.append({"ph": "X", "pid": u["rank"], "tid": 0, "name": f"unit {u['unit']} fwd", "cat": "forward",
                       "ts": u["start_s"] * us, "dur": u["fwd_s"] * us, "args": args})
            ev.append({"ph": "X", "pid": u["rank"], "tid": 0, "name": f"unit {u['unit']} bwd", "cat": "backward",
                       "ts": (u["start_s"] + u["fwd_s"]) * us, "dur": u["bwd_s"] * us, "args": args})
        if "planning" in s:  # the step's plan, made while the step before ran (rank 0's background thread)
            p = s["planning"]
            ev.append({"ph": "X", "pid": 0, "tid": 2, "name": f"plan step {s['step']}", "cat": "planning",
                       "ts": p["start_s"] * us, "dur": p["plan_s"] * us,
                       "args": {k: p[k] for k in ("wait_s", "send_s", "sent_bytes")}})
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
    """A trace or parts left by an earlier run must not pass for this run's if this one fails (each
    rank truncates its own part; this removes those of ranks this run may not have)."""
    for p in (Path(path), chrome_path(Path(path)), *part_paths(path)):
        p.unlink(missing_ok=True)
