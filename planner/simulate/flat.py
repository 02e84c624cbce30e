"""pp = 1: every HDP rank runs its units in plan order; a shared unit starts when all of its ranks
are free (co-scheduling, REFERENCE 2.4); then one gradient sync and the optimizer step."""

from __future__ import annotations

from itertools import chain, islice, repeat
from operator import lt
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from costmodel.timing import CostModel, UnitCost
from planner.plan import PlanError, Step
from planner.simulate.cores import run_shared
from planner.simulate.memory import (activation_bytes, mtp_activation_bytes, recompute_working_bytes,
                                     static_memory_bytes)
from planner.simulate.timeline import OpTiming, StepSimulation

if TYPE_CHECKING:
    from planner.simulate.step import StepCosts


def _topological_units(step: Step) -> list[int]:
    """Units in an order consistent with every rank's order (Kahn); a cycle is a deadlock."""
    if all(all(map(lt, ids, islice(ids, 1, None))) for ids in step.order.values()):
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


def _run_units(ranks: list[tuple[int, ...]], total_s: list[float], hdp: int) -> tuple[list[float], list[float]]:
    """(start of each unit, when each rank is free at the end): units in run order, each starting when
    its busiest rank is free. The only sequential part of the simulation; scalar Python on lists (most
    units are one-rank bins)."""
    free = [0.0] * hdp
    starts = []
    for rs, t in zip(ranks, total_s):
        if len(rs) == 1:
            r = rs[0]
            start = free[r]
            free[r] = start + t
        else:
            start = max(map(free.__getitem__, rs))
            end = start + t
            for r in rs:
                free[r] = end
        starts.append(start)
    return starts, free


def simulate_flat(step: Step, cm: CostModel, costs: StepCosts, hdp: int, lb: float) -> StepSimulation:
    """Each unit starts when all of its ranks are free, in an order every rank's order agrees with.
    Per-rank sums run over (unit, rank) pairs in run order with np.bincount, which adds in input order:
    the same sums, bit for bit, as accumulating unit after unit."""
    units = {u.id: u for u in step.units}
    run = [units[uid] for uid in _topological_units(step)]
    row = {uid: k for k, uid in enumerate(costs.ids)}
    rows = np.fromiter((row[u.id] for u in run), np.int64, len(run))
    c = costs.last
    ranks = [u.hdp_ranks for u in run]
    degree = np.fromiter(map(len, ranks), np.int64, len(run))
    member = np.fromiter(chain.from_iterable(ranks), np.int64, int(degree.sum()))  # (unit, rank) pairs, run order

    def per_rank_sum(per_unit: np.ndarray) -> np.ndarray:
        return np.bincount(member, weights=np.repeat(per_unit[rows], degree), minlength=hdp)

    total = c.total_s
    compute = UnitCost.compute_s.fget(c)
    if cm.shares_cores:  # CPU: ranks that wait or are done leave their cores to the others (simulate/cores.py)
        starts, ends, free_list = run_shared(ranks, total[rows], compute[rows], hdp, cm)
        x = np.divide(np.array(ends) - np.array(starts), total[rows], out=np.ones(len(run)), where=total[rows] > 0)
        stretch = np.ones(len(total))
        stretch[rows] = x  # each unit's time over its price: its parts scale alike
    else:
        starts, free_list = _run_units(ranks, total[rows].tolist(), hdp)
        ends, stretch = (np.array(starts) + total[rows]).tolist(), None
    free = np.array(free_list)
    scaled = (lambda a: a) if stretch is None else (lambda a: a * stretch)
    busy = per_rank_sum(scaled(total))
    # UnitCost's parts are plain sums of its fields: evaluated on the batch's arrays, the same formulas.
    parts = {"compute": per_rank_sum(scaled(compute)),
             "ring_exposed": per_rank_sum(scaled(UnitCost.ring_exposed_s.fget(c))),
             "tp_comm": per_rank_sum(scaled(UnitCost.tp_comm_s.fget(c))),
             "offload_exposed": per_rank_sum(scaled(UnitCost.offload_exposed_s.fget(c)))}
    # activation_bytes and activation_factor are arithmetic only: per unit on arrays, the same figures
    tokens = c.tokens_per_rank[rows]  # a unit's peak: what it keeps, and full recompute's layer during its backward
    act = (activation_bytes(tokens, np.fromiter((u.offload_ratio for u in run), float, len(run)), cm)
           + mtp_activation_bytes(tokens, cm) + recompute_working_bytes(tokens, cm))
    peak_act = np.zeros(hdp)
    np.maximum.at(peak_act, member, np.repeat(act, degree))
    ops = list(map(OpTiming, (u.id for u in run), ranks, repeat(0), repeat("unit"), starts, ends))
    finish = float(free.max()) if run else 0.0
    total_sync = cm.grad_sync_s(hdp)
    last_bwd = 0.0  # the window an overlapped gradient reduce hides under: the last backward of the last rank
    if run:
        on_last = np.flatnonzero(member == int(np.argmax(free)))  # its (unit, rank) pairs
        if len(on_last):
            unit_k = np.repeat(np.arange(len(run)), degree)[on_last[-1]]
            last_bwd = float(UnitCost.bwd_s.fget(c)[rows[unit_k]])
    sync = cm.exposed_grad_sync_s(hdp, last_bwd)
    optimizer_s = cm.optimizer_step_s(hdp)
    step_time = finish + sync + optimizer_s
    idle = finish - busy
    mem = static_memory_bytes(cm) + peak_act
    bd = {k: float(v.mean()) for k, v in parts.items()}
    bd.update(idle=float(idle.mean()), grad_sync=sync, grad_sync_hidden=total_sync - sync,
              optimizer=optimizer_s, bubble=0.0)
    return StepSimulation(step.step, hdp, step_time, lb, sync + optimizer_s, busy.tolist(), idle.tolist(), mem.tolist(),
                          bd, ops, tp=cm.tp)
