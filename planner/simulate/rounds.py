"""ZeRO-3 (pp = 1): the step runs in rounds (FlexSP's model, REFERENCE §4). Round r of an HDP rank is the r-th
unit of its order (planner.plan.validate.unit_rounds); inside a round every rank of the stage joins each layer's
parameter all-gather and gradient reduce-scatter, so a layer starts on all ranks together and the round takes its
slowest member's per-layer time plus what the collectives leave exposed (costmodel.zero.round_time_s). A rank with
no unit in a round still joins its collectives (an empty pass). Step = Σ rounds + the optimizer step on the shard;
no gradient all-reduce at the end (each round's reduce-scatters did it)."""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from costmodel.timing import CostModel, UnitCost
from costmodel.zero import round_collectives, round_time_s
from planner.plan import Step
from planner.plan.validate import unit_rounds
from planner.simulate.memory import activation_bytes, recompute_working_bytes, static_memory_bytes
from planner.simulate.timeline import OpTiming, StepSimulation

if TYPE_CHECKING:
    from planner.simulate.step import StepCosts


def round_times_s(rounds: np.ndarray, fwd_layer_s: np.ndarray, bwd_layer_s: np.ndarray, head_s: np.ndarray,
                  cm: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """(time of each round, its collectives' exposed part) for units in rounds `rounds` with per-layer forward and
    backward times and head times (each round takes the largest of its units' per term)."""
    n = int(rounds.max()) + 1 if len(rounds) else 0
    f, b, h = np.zeros(n), np.zeros(n), np.zeros(n)
    np.maximum.at(f, rounds, fwd_layer_s)
    np.maximum.at(b, rounds, bwd_layer_s)
    np.maximum.at(h, rounds, head_s)
    coll, l = round_collectives(cm.setup, cm.profile), cm.layers_per_stage
    total = np.array([round_time_s(fr, br, hr, l, coll) for fr, br, hr in zip(f.tolist(), b.tolist(), h.tolist())])
    return total, total - (l * (f + b) + h)


def simulate_rounds(step: Step, cm: CostModel, costs: StepCosts, hdp: int, lb: float) -> StepSimulation:
    """Rounds one after another; per rank, busy = its units' times + every round's exposed collectives."""
    rounds_of = unit_rounds(step)
    units = sorted(step.units, key=lambda u: (rounds_of[u.id], u.id))
    row = {uid: k for k, uid in enumerate(costs.ids)}
    rows = np.fromiter((row[u.id] for u in units), np.int64, len(units))
    rounds = np.fromiter((rounds_of[u.id] for u in units), np.int64, len(units))
    c, l = costs.last, cm.layers_per_stage
    head = (c.head_fwd_s + c.head_bwd_s)[rows]
    fwd_layer = (UnitCost.fwd_s.fget(c) - c.head_fwd_s)[rows] / l
    bwd_layer = (UnitCost.bwd_s.fget(c) - c.head_bwd_s)[rows] / l
    round_s, exposed_s = round_times_s(rounds, fwd_layer, bwd_layer, head, cm)
    round_start = np.concatenate([[0.0], np.cumsum(round_s)[:-1]])
    ranks = [u.hdp_ranks for u in units]
    degree = np.fromiter(map(len, ranks), np.int64, len(units))
    member = np.fromiter(chain.from_iterable(ranks), np.int64, int(degree.sum()))

    def per_rank_sum(per_unit: np.ndarray) -> np.ndarray:
        return np.bincount(member, weights=np.repeat(per_unit[rows], degree), minlength=hdp)

    total = c.total_s
    finish = float(round_s.sum())
    zero3_exposed = float(exposed_s.sum())
    busy = per_rank_sum(total) + zero3_exposed  # every rank waits on every round's collectives
    parts = {"compute": per_rank_sum(UnitCost.compute_s.fget(c)),
             "ring_exposed": per_rank_sum(UnitCost.ring_exposed_s.fget(c)),
             "tp_comm": per_rank_sum(UnitCost.tp_comm_s.fget(c)),
             "offload_exposed": per_rank_sum(UnitCost.offload_exposed_s.fget(c))}
    tokens = c.tokens_per_rank[rows]  # a unit's peak: what it keeps, and full recompute's layer during its backward
    act = (activation_bytes(tokens, np.fromiter((u.offload_ratio for u in units), float, len(units)), cm)
           + recompute_working_bytes(tokens, cm))
    peak_act = np.zeros(hdp)
    np.maximum.at(peak_act, member, np.repeat(act, degree))
    starts = round_start[rounds]
    ends = starts + total[rows] + exposed_s[rounds]
    ops = [OpTiming(u.id, u.hdp_ranks, 0, "unit", s, e) for u, s, e in zip(units, starts.tolist(), ends.tolist())]
    optimizer_s = cm.optimizer_step_s(hdp)
    sync = cm.exposed_grad_sync_s(hdp, 0.0)  # 0: the rounds' reduce-scatters synchronised the gradients
    idle = finish - busy
    mem = static_memory_bytes(cm) + peak_act
    bd = {k: float(v.mean()) for k, v in parts.items()}
    bd.update(zero3_exposed=zero3_exposed, idle=float(idle.mean()), grad_sync=sync, grad_sync_hidden=0.0,
              optimizer=optimizer_s, bubble=0.0)
    return StepSimulation(step.step, hdp, finish + sync + optimizer_s, lb, sync + optimizer_s, busy.tolist(),
                          idle.tolist(), mem.tolist(), bd, ops, tp=cm.tp)
