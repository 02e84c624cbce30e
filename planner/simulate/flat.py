"""pp = 1: every HDP rank runs its units in plan order; a shared unit starts when all of its ranks
are free (co-scheduling, REFERENCE 2.4); then one gradient sync and the optimizer step."""

from __future__ import annotations

import networkx as nx
import numpy as np

from costmodel.timing import CostModel, UnitCost
from planner.plan import PlanError, Step
from planner.simulate.memory import activation_bytes, static_memory_bytes
from planner.simulate.timeline import OpTiming, StepSimulation


def _topological_units(step: Step) -> list[int]:
    """Units in an order consistent with every rank's order (Kahn); a cycle is a deadlock."""
    if all(a < b for ids in step.order.values() for a, b in zip(ids, ids[1:])):
        # Every rank runs increasing ids (what finalize writes): the lexicographical order is the sorted one.
        return sorted(u.id for u in step.units)
    g = nx.DiGraph()
    g.add_nodes_from(u.id for u in step.units)
    for ids in step.order.values():
        g.add_edges_from(zip(ids, ids[1:]))
    try:
        return list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        raise PlanError(f"step {step.step}: unit orders contain a cycle (deadlock)") from None


def simulate_flat(step: Step, cm: CostModel, costs: dict[int, tuple[UnitCost, UnitCost]], hdp: int,
                  lb: float) -> StepSimulation:
    """Each unit starts when all of its ranks are free, in an order every rank's order agrees with."""
    units = {u.id: u for u in step.units}
    free = np.zeros(hdp)
    busy = np.zeros(hdp)
    parts = {"compute": np.zeros(hdp), "ring_exposed": np.zeros(hdp), "tp_comm": np.zeros(hdp),
             "offload_exposed": np.zeros(hdp)}
    peak_act = np.zeros(hdp)
    last_bwd = np.zeros(hdp)  # each rank's last backward: the window an overlapped gradient reduce hides under
    ops = []
    for uid in _topological_units(step):
        u = units[uid]
        c = costs[uid][1]
        r = np.array(u.hdp_ranks)
        start = float(free[r].max())
        end = start + c.total_s
        free[r] = end
        busy[r] += c.total_s
        last_bwd[r] = c.bwd_s
        parts["compute"][r] += c.compute_s
        parts["ring_exposed"][r] += c.ring_exposed_s
        parts["tp_comm"][r] += c.tp_comm_s
        parts["offload_exposed"][r] += c.offload_exposed_s
        peak_act[r] = np.maximum(peak_act[r], activation_bytes(c.tokens_per_rank, u.offload_ratio, cm))
        ops.append(OpTiming(uid, u.hdp_ranks, 0, "unit", start, end))
    finish = float(free.max()) if len(step.units) else 0.0
    total_sync = cm.grad_sync_s(hdp)
    sync = cm.exposed_grad_sync_s(hdp, float(last_bwd[int(np.argmax(free))]) if len(step.units) else 0.0)
    optimizer_s = cm.optimizer_step_s(hdp)
    step_time = finish + sync + optimizer_s
    idle = finish - busy
    mem = static_memory_bytes(cm) + peak_act
    bd = {k: float(v.mean()) for k, v in parts.items()}
    bd.update(idle=float(idle.mean()), grad_sync=sync, grad_sync_hidden=total_sync - sync,
              optimizer=optimizer_s, bubble=0.0)
    return StepSimulation(step.step, hdp, step_time, lb, sync + optimizer_s, busy.tolist(), idle.tolist(), mem.tolist(),
                          bd, ops, tp=cm.tp)
