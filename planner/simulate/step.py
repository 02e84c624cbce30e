"""Discrete-event simulation of one plan step (`simulate_step`): flat when pp = 1, pipelined
otherwise. Unit costs come from the cost model, never from the plan's own figures, so a plan can be
re-simulated on another profile."""

from __future__ import annotations

import numpy as np

from costmodel.timing import CostModel, UnitCost
from planner.plan import Plan, PlanError, Step
from planner.simulate.bounds import lower_bound_s
from planner.simulate.flat import simulate_flat
from planner.simulate.pipelined import simulate_pipelined
from planner.simulate.timeline import StepSimulation


def unit_costs(step: Step, cm: CostModel) -> dict[int, tuple[UnitCost, UnitCost]]:
    """(middle-stage cost, last-stage cost) per unit; equal when pp = 1. All units priced in one batch."""
    units = step.units
    if not units:
        return {}
    counts = np.fromiter((len(u.pieces) for u in units), np.int64, len(units))
    lengths = np.fromiter((p.tokens for u in units for p in u.pieces), float, int(counts.sum()))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    degree = np.fromiter((u.degree for u in units), np.int64, len(units))
    ratio = np.fromiter((u.offload_ratio for u in units), float, len(units))
    inter = np.fromiter((cm.setup.mesh.spans_domains(u.hdp_ranks) for u in units), bool, len(units))
    last = cm.price_units(lengths, offsets, degree, ratio, inter, with_head=True).units()
    mid = cm.price_units(lengths, offsets, degree, ratio, inter, with_head=False).units() if cm.pp > 1 else last
    return {u.id: (m, t) for u, m, t in zip(units, mid, last)}


def simulate_step(step: Step, cm: CostModel,
                  costs: dict[int, tuple[UnitCost, UnitCost]] | None = None) -> StepSimulation:
    """Simulate one step; `costs` (from `unit_costs`) may be passed in when the caller priced the units."""
    hdp = cm.setup.hdp
    if any(r >= hdp for u in step.units for r in u.hdp_ranks):
        raise PlanError(f"step {step.step}: plan uses HDP ranks beyond the mesh's {hdp}")
    costs = costs if costs is not None else unit_costs(step, cm)
    lb = lower_bound_s(np.array([q.length for q in step.sequences]), cm, hdp)
    if cm.pp == 1:
        return simulate_flat(step, cm, costs, hdp, lb)
    return simulate_pipelined(step, cm, costs, hdp, lb)


def simulate_plan(plan: Plan, cm: CostModel) -> list[StepSimulation]:
    """Every step of a plan whose mesh matches the cost model's."""
    if plan.mesh.hdp != cm.setup.hdp or plan.mesh.pp != cm.pp or plan.mesh.tp != cm.tp:
        raise PlanError(f"plan mesh (tp {plan.mesh.tp}, pp {plan.mesh.pp}, hdp {plan.mesh.hdp}) does not match the "
                        f"cost model's (tp {cm.tp}, pp {cm.pp}, hdp {cm.setup.hdp})")
    return [simulate_step(s, cm) for s in plan.steps]
