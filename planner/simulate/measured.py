"""Predicted (this simulator) vs measured (a `meshplan replay --trace` file), unit by unit and step
by step: how far the cost model is from the hardware."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from costmodel.timing import CostModel, UnitCost
from planner.plan import PipelineSection, Plan, PlanError, Step
from planner.schedule import step_op_lists
from planner.simulate.pipelined import op_pricer, slice_sources_s, sliced_pass_s
from planner.simulate.step import simulate_step, slice_costs, unit_costs
from planner.simulate.timeline import StepSimulation


@dataclass(frozen=True)
class OtherLoad:
    """Cores other processes kept busy on the machine (profiles/measure/hostload.py): during the replay's steps and
    while its profile was measured. Ranks that fill the cores slow down by about (cores + other) / cores, which the
    host probe (one core) cannot see and the cost model does not predict."""

    replay_cores: float  # median over the replay's steps
    steal_cores: float  # the hypervisor's steal during them (median)
    profile_cores: float | None  # over the profile's run; None when the profile did not record it


@dataclass(frozen=True)
class MeasuredComparison:
    """Predicted (this simulator) vs measured (a `meshplan replay --trace` file)."""

    # per (replay step, unit): predicted_s, measured_s (mean over its ranks), rel_err; where the trace has them the
    # members' mean CPU (thread_cpu_s, helper_cpu_s), and on a CPU profile predicted_cpu_s and cpu_err
    units: list[dict]
    steps: list[dict]  # per replay step: predicted_s, measured_s, rel_err
    # CPU: the host probe's time around the replay over its time while the profile was measured (> 1: the host
    # computed slower, e.g. under other tenants' load); None when the profile or the trace lacks it. A diagnostic
    # beside the errors, never applied to them
    host_slowdown: float | None = None
    other_load: OtherLoad | None = None  # one-node CPU replays: other processes' load (a diagnostic, like the above)
    # pp > 1 on a CPU profile, traces with each op's CPU: per (replay step, unit, stage, kind, slice, chunk) the
    # members' mean own-thread CPU (thread_cpu_s), its priced compute (predicted_cpu_s) and cpu_err
    ops: list[dict] = field(default_factory=list)

    @property
    def median_abs_unit_err(self) -> float:
        return float(np.median([abs(u["rel_err"]) for u in self.units])) if self.units else float("nan")


def host_slowdown(cm: CostModel, trace: dict) -> float | None:
    """How much slower the host computed around the replay than while its profile was measured: the replay's host
    probe (mean of before and after its steps) over the profile's (profiles/measure/probe.py), one process alone
    both times. It tells a slower or faster host apart from a cost-model error (other tenants' load on a shared
    CPU moves it by tens of percent within the hour); it does not say how ranks sharing the cores slow each other
    (the profile's concurrency slowdowns)."""
    probe = (trace.get("meta") or {}).get("host_probe")
    ref = cm.profile.constants.get("host_probe_s")
    if not probe or not ref or float(ref["value"]) <= 0:
        return None
    return (float(probe["before_s"]) + float(probe["after_s"])) / 2 / float(ref["value"])


def other_load(cm: CostModel, trace: dict) -> OtherLoad | None:
    """Other processes' load during the replay (per-step `other_cores` of a one-node CPU trace) and during the
    profile (constant `host_other_cores`); None when the trace has no step that recorded it."""
    steps = [s for s in trace.get("steps", []) if s.get("other_cores") is not None]
    if not steps:
        return None
    ref = cm.profile.constants.get("host_other_cores")
    return OtherLoad(float(np.median([s["other_cores"] for s in steps])),
                     float(np.median([s.get("steal_cores", 0.0) for s in steps])),
                     float(ref["value"]) if ref else None)


def warm_steps(trace: dict) -> list[dict]:
    """The trace's steps less the cold ones: a plan step's first replay is left out when the trace replays that
    plan step again (the first pass over a step's shapes loads its kernels lazily and grows the allocator: on an
    H200, steps of 0.2-1.4 s took 2-8 s the first time); a plan step replayed once keeps its one replay."""
    steps = sorted(trace.get("steps", []), key=lambda s: s["step"])
    counts: dict[int, int] = {}
    for s in steps:
        counts[s["plan_step"]] = counts.get(s["plan_step"], 0) + 1
    seen: set[int] = set()
    kept = []
    for s in steps:
        first = s["plan_step"] not in seen
        seen.add(s["plan_step"])
        if not (first and counts[s["plan_step"]] > 1):
            kept.append(s)
    return kept


def read_measured_trace(path: Path) -> dict:
    """The JSON of a `meshplan replay --trace` file; a missing one (a run that died leaves only its
    per-rank parts) or a file cut short says so in one line."""
    from planner.runtime.trace import part_path, part_paths  # torch-free

    path = Path(path)
    if not path.is_file():
        parts = part_paths(path)
        if parts:
            raise PlanError(f"{path}: no complete trace: the replay did not finish; it left {len(parts)} per-rank "
                            f"partial traces ({parts[0].name}, ...), which "
                            "planner.runtime.trace.merge_partial_traces reads for inspection")
        raise PlanError(f"{path}: no such trace (nor partial traces {part_path(path, 0).name}, ...); write one with "
                        "`meshplan replay --trace`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: truncated or corrupt trace JSON (line {e.lineno}: {e.msg})") from None


def predicted_units_s(step: Step, cm: CostModel, sim: StepSimulation | None = None) -> dict[tuple[int, int], float]:
    """Each (unit, stage)'s predicted forward + backward time, what a replay's trace measures. pp = 1: the unit's time
    as the simulated schedule ran it, which on ranks sharing a CPU node's cores is shorter than its price while
    others idle (planner/simulate/cores.py) and equals it elsewhere; pp > 1: its stage's price (the last stage's with
    the head and loss), a sliced unit's as its slices run it (sliced_pass_s), and on ranks sharing CPU cores its ops'
    times in the simulated schedule. `sim`: the step's simulation when the caller has it."""
    if cm.pp == 1:
        sim = sim or simulate_step(step, cm)
        return {(op.unit, 0): op.end_s - op.start_s for op in sim.ops if op.kind == "unit"}
    if cm.shares_cores:  # its ops as the schedule ran them at the cores' share: the sum over slices and chunks
        out: dict[tuple[int, int], float] = {}
        for op in (sim or simulate_step(step, cm)).ops:
            out[(op.unit, op.stage)] = out.get((op.unit, op.stage), 0.0) + op.end_s - op.start_s
        return out
    return _stage_passes_s(step, cm, compute_only=False)


def _stage_passes_s(step: Step, cm: CostModel, compute_only: bool) -> dict[tuple[int, int], float]:
    """pp > 1: each (unit, stage)'s forward + backward price as its slices run it (sliced_pass_s; the last stage's
    with the head and loss), or its compute part alone."""
    costs, one = unit_costs(step, cm), slice_costs(step, cm) or {}
    out = {}
    for u in step.units:
        for s in range(cm.pp):
            k = 1 if s == cm.pp - 1 else 0
            whole, sliced = costs[u.id][k], one[u.id][k] if u.id in one else None
            out[(u.id, s)] = sum(sliced_pass_s(whole, sliced, u.slices, f, compute_only,
                                               slice_sources_s(cm, costs[u.id][0], u, f)) for f in (True, False))
    return out


def _cpu_x(cm: CostModel) -> float | None:
    """A rank's own-thread CPU per second of priced compute on a CPU profile with cores: the share of as many busy
    ranks as cores over the compute share the prices carry; None elsewhere."""
    cores = cm.profile.constants.get("cores_per_node", {}).get("value")
    if not cm.shares_cores or not cores:
        return None
    return cm.share_at(int(min(cores, cm.setup.cluster.gpus_per_node))) / cm.compute_share


def predicted_cpu_s(step: Step, cm: CostModel) -> dict[tuple[int, int], float] | None:
    """On a CPU profile with cores: each (unit, stage)'s priced compute (its exposed transfers and wake-ups left out)
    as the CPU time of a member's own thread; pp > 1, its stage's slices and chunks as the pipeline runs them. Units
    are priced with every rank of the node busy (compute_share); beyond one rank a core the ranks time-slice, which
    stretches wall time and not CPU time, while shared cache and memory bandwidth stretch both: the CPU is the
    compute at the share of as many busy ranks as cores. Set beside a replay's thread_cpu_s, it checks the compute
    prices whatever the scheduling and waits did. None elsewhere."""
    x = _cpu_x(cm)
    if x is None:
        return None
    if cm.pp > 1:
        return {key: c * x for key, c in _stage_passes_s(step, cm, compute_only=True).items()}
    costs = unit_costs(step, cm)
    return {(uid, 0): float(c) * x for uid, c in zip(costs.ids, UnitCost.compute_s.fget(costs.last))}


def predicted_op_cpu_s(step: Step, cm: CostModel) -> dict[tuple[int, int, str, int, int], float] | None:
    """pp > 1 on a CPU profile with cores: each pipeline op's priced compute (planner.simulate.pipelined.op_pricer:
    its slice's share, the attention by its blocks) as a member's own-thread CPU, at the share of as many busy ranks
    as cores (predicted_cpu_s), by (unit, stage, kind "F"/"B", slice, chunk): what a trace's ops record. None
    elsewhere."""
    x = _cpu_x(cm)
    if x is None or cm.pp == 1:
        return None
    units = {u.id: u for u in step.units}
    price = op_pricer(units, cm, unit_costs(step, cm), slice_costs(step, cm) or {},
                      (step.pipeline or PipelineSection()).v)
    return {(op.mb, s, op.kind, op.slice, op.chunk): price(s, op).slice_compute_s(op.slice, units[op.mb].slices) * x
            for (_, s), ops in step_op_lists(step, cm.pp, cm.setup.hdp).items() for op in ops}


def compare_measured(plan: Plan, cm: CostModel, trace: dict) -> MeasuredComparison:
    """Match a measured trace (schema meshplan.measured/1) to the plan's simulation, unit by unit and
    step by step. Relative error = predicted / measured − 1."""
    if not isinstance(trace, dict) or not str(trace.get("schema", "")).startswith("meshplan.measured/"):
        raise PlanError("not a measured trace (expected the JSON written by `meshplan replay --trace`)")
    if not trace.get("complete"):
        parts = ", ".join((trace.get("meta") or {}).get("parts") or ())
        raise PlanError("measured trace is incomplete (the replay did not finish" +
                        (f"; merged from its partial traces {parts})" if parts else ")"))
    sims = {s.step: simulate_step(s, cm) for s in plan.steps}
    cpu_preds = {s.step: predicted_cpu_s(s, cm) for s in plan.steps}  # once per plan step, as the simulations
    op_cpu = any(len(o) > 5 for st in trace.get("steps", []) for u in st["units"] for o in u.get("ops") or ())
    op_preds = {s.step: predicted_op_cpu_s(s, cm) for s in plan.steps} if op_cpu else {}  # traces with ops' CPU
    ops_out: list[dict] = []
    steps_by_id = {s.step: s for s in plan.steps}
    units_out, steps_out = [], []
    for st in trace.get("steps", []):
        ps = st["plan_step"]
        if ps not in steps_by_id:
            raise PlanError(f"measured trace replays plan step {ps}, which the plan does not have")
        predicted = predicted_units_s(steps_by_id[ps], cm, sims[ps])
        cpu_pred = cpu_preds[ps]
        # pp > 1: a rank measures its own stage's share (the last stage's includes the head and loss), its ops
        # interleaved with other micro-batches': the mean of the members' sums. pp = 1: the members run the unit in
        # lockstep, from the last one's start (an earlier member waits for it: the schedule's idle time, which the
        # simulation prices apart) to the last one's end.
        per_unit: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
        cpu: dict[tuple[int, int], list[tuple[float, float]]] = {}
        for u in st["units"]:
            key = (int(u["unit"]), int(u.get("stage", 0)))
            start, busy = float(u.get("start_s", 0.0)), float(u["fwd_s"]) + float(u["bwd_s"])
            per_unit.setdefault(key, []).append((start, busy, start + busy))
            if "thread_cpu_s" in u:  # traces before it: none
                cpu.setdefault(key, []).append((float(u["thread_cpu_s"]), float(u["helper_cpu_s"])))
        for (uid, stage), members in sorted(per_unit.items()):
            pred = predicted[(uid, stage)]
            start, busy, end = np.array(members).T
            meas = float(end.max() - start.max()) if cm.pp == 1 else float(busy.mean())
            row = {"step": st["step"], "unit": uid, "stage": stage, "predicted_s": pred, "measured_s": meas,
                   "rel_err": pred / meas - 1 if meas > 0 else float("inf")}
            if (uid, stage) in cpu:
                thread, helpers = np.array(cpu[(uid, stage)]).mean(axis=0)
                row.update(thread_cpu_s=float(thread), helper_cpu_s=float(helpers))
                if cpu_pred is not None and thread > 0:
                    row.update(predicted_cpu_s=cpu_pred[(uid, stage)],
                               cpu_err=cpu_pred[(uid, stage)] / float(thread) - 1)
            units_out.append(row)
        if op_preds.get(ps) is not None:
            ops_out += _op_rows(st, op_preds[ps])
        pred_step = sims[ps].step_time_s
        meas_step = float(st["step_time_s"])
        steps_out.append({"step": st["step"], "plan_step": ps, "predicted_s": pred_step, "measured_s": meas_step,
                          "rel_err": pred_step / meas_step - 1 if meas_step > 0 else float("inf")})
    return MeasuredComparison(units_out, steps_out, host_slowdown(cm, trace), other_load(cm, trace), ops_out)


def _op_rows(step_trace: dict, predicted: dict) -> list[dict]:
    """One replayed step's pipeline ops whose trace records their CPU: the members' mean against its price."""
    cpu: dict[tuple, list[float]] = {}
    for u in step_trace["units"]:
        for kind, j, c, _, _, *mine in u.get("ops") or ():
            if mine:
                cpu.setdefault((int(u["unit"]), int(u.get("stage", 0)), kind, int(j), int(c)), []).append(mine[0])
    rows = []
    for key, got in sorted(cpu.items()):
        thread = float(np.mean(got))
        if key in predicted and thread > 0:
            rows.append({"step": step_trace["step"], "unit": key[0], "stage": key[1], "kind": key[2], "slice": key[3],
                         "chunk": key[4], "thread_cpu_s": thread, "predicted_cpu_s": predicted[key],
                         "cpu_err": predicted[key] / thread - 1})
    return rows
