"""Discrete-event simulation of one plan step.

pp = 1: every HDP rank runs its units in plan order; a shared unit starts when all of its ranks
are free (co-scheduling, REFERENCE 2.4); then one gradient sync. pp > 1: every HDP rank is a
pipeline whose stages run a 1F1B op list; a unit's forward on stage s waits for stage s−1 plus the
activation transfer, its backward for stage s+1; a shared unit's op starts when every member
pipeline's stage is free. Unit costs come from the cost model, never from the plan's own figures,
so a plan can be re-simulated on another profile."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from costmodel.memory import activation_factor, model_state_bytes
from costmodel.timing import CostModel, UnitCost
from planner.bounds import lower_bound_s
from planner.plan import Plan, PlanError, Predicted, Step


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
    grad_sync_s: float
    per_rank_busy_s: list[float]  # compute + exposed comm per HDP rank (per pipeline: its busiest stage)
    per_rank_idle_s: list[float]  # waiting for co-scheduled partners, bubbles, and the end of the step
    peak_memory_bytes: list[float]  # per HDP rank (max over its stages)
    breakdown: dict[str, float]  # seconds, summed over ranks ÷ ranks (stage-averaged with PP)
    ops: list[OpTiming] = field(default_factory=list)

    def predicted(self) -> Predicted:
        return Predicted(step_time_s=self.step_time_s, lower_bound_s=self.lower_bound_s,
                         per_rank_busy_s=[round(x, 9) for x in self.per_rank_busy_s],
                         peak_memory_bytes=[float(round(x)) for x in self.peak_memory_bytes],
                         breakdown={k: round(v, 9) for k, v in self.breakdown.items()})

    def chrome_trace(self) -> dict:
        """Chrome / Perfetto trace: one process per pipeline stage, one thread per HDP rank."""
        ev = []
        for op in self.ops:
            for r in op.ranks:
                ev.append({"name": f"u{op.unit} {op.kind}", "ph": "X", "pid": op.stage, "tid": r,
                           "ts": op.start_s * 1e6, "dur": (op.end_s - op.start_s) * 1e6,
                           "args": {"unit": op.unit, "ranks": len(op.ranks)}})
        t_sync = self.step_time_s - self.grad_sync_s
        for r in range(self.hdp):
            ev.append({"name": "grad sync", "ph": "X", "pid": 0, "tid": r, "ts": t_sync * 1e6,
                       "dur": self.grad_sync_s * 1e6})
        meta = [{"name": "process_name", "ph": "M", "pid": s, "args": {"name": f"stage {s}"}}
                for s in sorted({op.stage for op in self.ops} | {0})]
        return {"traceEvents": meta + ev, "displayTimeUnit": "ms"}

    def write_trace(self, path: str | Path) -> Path:
        from profiles.table import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.chrome_trace()))
        return Path(path)


def unit_costs(step: Step, cm: CostModel) -> dict[int, tuple[UnitCost, UnitCost]]:
    """(middle-stage cost, last-stage cost) per unit; equal when pp = 1."""
    per_node = cm.setup.hdp_per_node
    out = {}
    for u in step.units:
        lengths = [p.tokens for p in u.pieces]
        inter = u.hdp_ranks[0] // per_node != u.hdp_ranks[-1] // per_node
        last = cm.unit_cost(lengths, u.degree, u.offload_ratio, inter, with_head=True)
        mid = cm.unit_cost(lengths, u.degree, u.offload_ratio, inter, with_head=False) if cm.pp > 1 else last
        out[u.id] = (mid, last)
    return out


def _activation_bytes(u_tokens: int, offload: float, cm: CostModel) -> float:
    return u_tokens * cm.layers_per_stage * cm.a_tok * activation_factor(offload, cm.layers_per_stage)


def simulate_step(step: Step, cm: CostModel) -> StepSimulation:
    hdp = cm.setup.hdp
    if any(r >= hdp for u in step.units for r in u.hdp_ranks):
        raise PlanError(f"step {step.step}: plan uses HDP ranks beyond the mesh's {hdp}")
    costs = unit_costs(step, cm)
    lb = lower_bound_s(np.array([q.length for q in step.sequences]), cm, hdp)
    sync = cm.grad_sync_s(hdp)
    if cm.pp == 1:
        return _simulate_flat(step, cm, costs, hdp, lb, sync)
    return _simulate_pipelined(step, cm, costs, hdp, lb, sync)


def _topological_units(step: Step) -> list[int]:
    """Units in an order consistent with every rank's order (Kahn); a cycle is a deadlock."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(u.id for u in step.units)
    for ids in step.order.values():
        g.add_edges_from(zip(ids, ids[1:]))
    try:
        return list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        raise PlanError(f"step {step.step}: unit orders contain a cycle (deadlock)") from None


def _simulate_flat(step, cm, costs, hdp, lb, sync) -> StepSimulation:
    units = {u.id: u for u in step.units}
    free = np.zeros(hdp)
    busy = np.zeros(hdp)
    parts = {"compute": np.zeros(hdp), "ring_exposed": np.zeros(hdp), "tp_comm": np.zeros(hdp),
             "offload_exposed": np.zeros(hdp)}
    peak_act = np.zeros(hdp)
    ops = []
    for uid in _topological_units(step):
        u = units[uid]
        c = costs[uid][1]
        r = np.array(u.hdp_ranks)
        start = float(free[r].max())
        end = start + c.total_s
        free[r] = end
        busy[r] += c.total_s
        parts["compute"][r] += c.compute_s
        parts["ring_exposed"][r] += c.ring_exposed_s
        parts["tp_comm"][r] += c.tp_comm_s
        parts["offload_exposed"][r] += c.offload_exposed_s
        peak_act[r] = np.maximum(peak_act[r], _activation_bytes(c.tokens_per_rank, u.offload_ratio, cm))
        ops.append(OpTiming(uid, u.hdp_ranks, 0, "unit", start, end))
    finish = float(free.max()) if len(step.units) else 0.0
    step_time = finish + sync
    idle = finish - busy
    mem = _static_memory(cm) + peak_act
    bd = {k: float(v.mean()) for k, v in parts.items()}
    bd.update(idle=float(idle.mean()), grad_sync=sync, bubble=0.0)
    return StepSimulation(step.step, hdp, step_time, lb, sync, busy.tolist(), idle.tolist(), mem.tolist(), bd, ops)


def _static_memory(cm: CostModel, stage: int | None = None) -> float:
    b = cm.budget
    return model_state_bytes(cm.setup, stage) + b.ctx_bytes + b.logits_bytes


def one_f_one_b(m: int, p: int, stage: int) -> list[tuple[str, int]]:
    """1F1B op list of one stage: min(p − s − 1, m) warm-up forwards, then alternate, then drain."""
    warm = min(p - stage - 1, m)
    ops = [("fwd", i) for i in range(warm)]
    f, b = warm, 0
    while f < m:
        ops.append(("fwd", f))
        f += 1
        ops.append(("bwd", b))
        b += 1
    ops += [("bwd", i) for i in range(b, m)]
    return ops


def _simulate_pipelined(step, cm, costs, hdp, lb, sync) -> StepSimulation:
    """Event simulation over ops (unit, stage, kind). Each pipeline's stage runs its 1F1B list; an op
    is ready when its data dependency is done and it is next on every member pipeline's stage list."""
    p = cm.pp
    units = {u.id: u for u in step.units}
    lists: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for r in range(hdp):
        mbs = step.order.get(r, [])
        for s in range(p):
            lists[(r, s)] = [(k, mbs[i]) for k, i in one_f_one_b(len(mbs), p, s)]
    pos = {key: 0 for key in lists}
    free = {key: 0.0 for key in lists}
    done: dict[tuple[str, int, int], float] = {}
    busy = np.zeros((hdp, p))
    mem_now = np.zeros((hdp, p))
    mem_peak = np.zeros((hdp, p))
    parts = {"compute": 0.0, "ring_exposed": 0.0, "tp_comm": 0.0, "offload_exposed": 0.0}
    ops: list[OpTiming] = []
    remaining = sum(len(v) for v in lists.values())
    p2p = {uid: cm.pp_p2p_s(costs[uid][0].tokens_per_rank) for uid in units}
    progress = True
    while remaining and progress:
        progress = False
        for (r, s), lst in lists.items():
            i = pos[(r, s)]
            if i >= len(lst):
                continue
            kind, uid = lst[i]
            u = units[uid]
            if any(lists[(m, s)][pos[(m, s)]] != (kind, uid) if pos[(m, s)] < len(lists[(m, s)]) else True
                   for m in u.hdp_ranks):
                continue  # a member pipeline has not reached this op yet
            if kind == "fwd":
                dep = done.get(("fwd", uid, s - 1), None) if s > 0 else 0.0
                ready = None if dep is None else dep + (p2p[uid] if s > 0 else 0.0)
            else:
                dep = done.get(("bwd", uid, s + 1), None) if s < p - 1 else done.get(("fwd", uid, s))
                ready = None if dep is None else dep + (p2p[uid] if s < p - 1 else 0.0)
            if ready is None:
                continue
            c = costs[uid][1] if s == p - 1 else costs[uid][0]
            dur = c.fwd_s if kind == "fwd" else c.bwd_s
            start = max(ready, *(free[(m, s)] for m in u.hdp_ranks))
            end = start + dur
            act = _activation_bytes(c.tokens_per_rank, u.offload_ratio, cm)
            for m in u.hdp_ranks:
                free[(m, s)] = end
                pos[(m, s)] += 1
                busy[m, s] += dur
                mem_now[m, s] += act if kind == "fwd" else -act
                mem_peak[m, s] = max(mem_peak[m, s], mem_now[m, s])
            remaining -= len(u.hdp_ranks)
            done[(kind, uid, s)] = end
            share = len(u.hdp_ranks) / (hdp * p)
            if kind == "fwd":
                parts["compute"] += share * (c.fwd_compute_s + c.head_fwd_s)
                parts["ring_exposed"] += share * c.ring_exposed_fwd_s
                parts["tp_comm"] += share * c.tp_comm_fwd_s
                parts["offload_exposed"] += share * c.offload_exposed_fwd_s
            else:
                parts["compute"] += share * (c.bwd_compute_s + c.head_bwd_s)
                parts["ring_exposed"] += share * c.ring_exposed_bwd_s
                parts["tp_comm"] += share * c.tp_comm_bwd_s
                parts["offload_exposed"] += share * c.offload_exposed_bwd_s
            ops.append(OpTiming(uid, u.hdp_ranks, s, kind, start, end))
            progress = True
    if remaining:
        raise PlanError(f"step {step.step}: pipelined schedule deadlocks (shared units sit at different "
                        "1F1B positions in their member pipelines)")
    finish = max(free.values()) if free else 0.0
    static = np.array([_static_memory(cm, s) for s in range(p)])
    mem = (mem_peak + static[None, :]).max(axis=1)
    stage_busy = busy.max(axis=1)
    idle_all = finish - busy
    bd = dict(parts)
    bd.update(idle=float(idle_all.mean()), grad_sync=sync, bubble=float(idle_all.mean()))
    return StepSimulation(step.step, hdp, finish + sync, lb, sync, stage_busy.tolist(),
                          (finish - stage_busy).tolist(), mem.tolist(), bd, ops)


def simulate_plan(plan: Plan, cm: CostModel) -> list[StepSimulation]:
    if plan.mesh.hdp != cm.setup.hdp or plan.mesh.pp != cm.pp or plan.mesh.tp != cm.tp:
        raise PlanError(f"plan mesh (tp {plan.mesh.tp}, pp {plan.mesh.pp}, hdp {plan.mesh.hdp}) does not match the "
                        f"cost model's (tp {cm.tp}, pp {cm.pp}, hdp {cm.setup.hdp})")
    return [simulate_step(s, cm) for s in plan.steps]
