"""The simulated step: its ops on a timeline, per-rank busy and idle time, peak memory and the time
breakdown (what `simulate_step` returns), and its Chrome / Perfetto trace."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from costmodel.mesh import MeshLayout
from planner.plan import Predicted


@dataclass(frozen=True)
class OpTiming:
    """One simulated op: a unit's forward or backward on one stage (pp = 1: stage 0, whole unit)."""

    unit: int
    ranks: tuple[int, ...]
    stage: int
    kind: str  # "fwd", "bwd" or "unit" (pp = 1: forward + backward)
    start_s: float
    end_s: float


@dataclass
class StepSimulation:
    step: int
    hdp: int
    step_time_s: float
    lower_bound_s: float
    step_end_s: float  # gradient sync + optimizer step after the last backward
    per_rank_busy_s: list[float]  # compute + exposed comm per HDP rank (per pipeline: its busiest stage)
    per_rank_idle_s: list[float]  # waiting for co-scheduled partners, bubbles, and the end of the step
    peak_memory_bytes: list[float]  # per HDP rank (max over its stages), fragmentation reserve included
    breakdown: dict[str, float]  # seconds, summed over ranks ÷ ranks (stage-averaged with PP)
    ops: list[OpTiming] = field(default_factory=list)
    # pp > 1: per stage, the activation peak (KV cache, dK/dV accumulators included) of its busiest rank
    stage_activation_peak_bytes: list[float] = field(default_factory=list)
    tp: int = 1  # TP degree, to name an HDP rank's GPUs in the trace

    def predicted(self) -> Predicted:
        return Predicted(step_time_s=self.step_time_s, lower_bound_s=self.lower_bound_s,
                         per_rank_busy_s=[round(x, 9) for x in self.per_rank_busy_s],
                         peak_memory_bytes=[float(round(x)) for x in self.peak_memory_bytes],
                         breakdown={k: round(v, 9) for k, v in self.breakdown.items()})

    def chrome_trace(self) -> dict:
        """Chrome / Perfetto trace: one process per pipeline stage, one named thread per HDP rank."""
        stages = sorted({op.stage for op in self.ops} | {0})
        ev = []
        for op in self.ops:
            for r in op.ranks:
                ev.append({"name": f"u{op.unit} {op.kind}", "ph": "X", "pid": op.stage, "tid": r,
                           "ts": op.start_s * 1e6, "dur": (op.end_s - op.start_s) * 1e6,
                           "args": {"unit": op.unit, "ranks": len(op.ranks)}})
        t_sync = self.step_time_s - self.step_end_s
        for s in stages:  # every stage syncs and updates its own layers' parameters
            for r in range(self.hdp):
                ev.append({"name": "grad sync + optimizer", "ph": "X", "pid": s, "tid": r, "ts": t_sync * 1e6,
                           "dur": self.step_end_s * 1e6})
        procs = {s: f"stage {s}" if len(stages) > 1 else "HDP ranks" for s in stages}
        mesh = MeshLayout(tp=self.tp, pp=max(stages) + 1, hdp=self.hdp, gpus_per_domain=self.tp)  # ranks only
        threads = {(s, r): f"HDP rank {r} ({_global_ranks_text(mesh, s, r)})"
                   for s in stages for r in range(self.hdp)}
        return {"traceEvents": chrome_metadata(procs, threads) + ev, "displayTimeUnit": "ms"}

    def write_trace(self, path: str | Path) -> Path:
        from profiles.table import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.chrome_trace()))
        return Path(path)


def chrome_metadata(processes: dict[int, str], threads: dict[tuple[int, int], str]) -> list[dict]:
    """Chrome / Perfetto metadata ("M") events naming processes and threads (pid / (pid, tid) -> name),
    sorted by their ids rather than by name; the simulated and the measured trace both use it."""
    ev: list[dict] = []
    for pid, name in sorted(processes.items()):
        ev.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
        ev.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
    for (pid, tid), name in sorted(threads.items()):
        ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        ev.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    return ev


def _global_ranks_text(mesh: MeshLayout, stage: int, hdp_rank: int) -> str:
    """The GPUs of one HDP rank of one stage: a TP group is consecutive global ranks (costmodel.mesh)."""
    first, tp = mesh.global_rank(stage, hdp_rank), mesh.tp
    return f"global rank {first}" if tp == 1 else f"global ranks {first}-{first + tp - 1}, TP {tp}"
