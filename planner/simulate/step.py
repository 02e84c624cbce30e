"""Discrete-event simulation of one plan step (`simulate_step`): flat when pp = 1, pipelined
otherwise. Unit costs come from the cost model, never from the plan's own figures, so a plan can be
re-simulated on another profile."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from costmodel.timing import CostModel, UnitCost, UnitCosts
from planner.plan import Piece, Plan, PlanError, Step
from planner.simulate.bounds import lower_bound_s
from planner.simulate.flat import simulate_flat
from planner.simulate.pipelined import simulate_pipelined
from planner.simulate.timeline import StepSimulation


class StepCosts(Mapping[int, tuple[UnitCost, UnitCost]]):
    """Unit id -> (middle-stage cost, last-stage cost) of a step's units (equal when pp = 1), held as
    the arrays `CostModel.price_units` returns (row k: unit ids[k]). A large step has ~10^4 units: the
    flat simulator and finalize read the arrays, and UnitCost objects are made, all at once, only
    when a caller looks one up."""

    def __init__(self, ids: list[int], mid: UnitCosts, last: UnitCosts) -> None:
        self.ids = ids
        self.mid = mid
        self.last = last
        self._objects: dict[int, tuple[UnitCost, UnitCost]] | None = None

    def _all(self) -> dict[int, tuple[UnitCost, UnitCost]]:
        if self._objects is None:
            last = self.last.units()
            mid = self.mid.units() if self.mid is not self.last else last
            self._objects = dict(zip(self.ids, zip(mid, last)))
        return self._objects

    def __getitem__(self, uid: int) -> tuple[UnitCost, UnitCost]:
        return self._all()[uid]

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def price_units_of(ids: list[int], ranks: Sequence[Sequence[int]], pieces: Sequence[Sequence[Piece]],
                   offload_ratio: Sequence[float], cm: CostModel) -> StepCosts:
    """Price units given as parallel lists (id, sorted HDP ranks, pieces, offload ratio) in one batch:
    `unit_costs` of a step, and finalize's pricing before it builds the step's Unit objects."""
    n = len(ids)
    counts = np.fromiter(map(len, pieces), np.int64, n)
    lengths = np.fromiter((p.end - p.start for ps in pieces for p in ps), float, int(counts.sum()))  # Piece.tokens
    offsets = np.cumsum(counts) - counts
    degree = np.fromiter(map(len, ranks), np.int64, n)
    ratio = np.fromiter(offload_ratio, float, n)
    inter = np.fromiter(map(cm.setup.mesh.spans_domains, ranks), bool, n)
    last = cm.price_units(lengths, offsets, degree, ratio, inter, with_head=True)
    mid = cm.price_units(lengths, offsets, degree, ratio, inter, with_head=False) if cm.pp > 1 else last
    return StepCosts(list(ids), mid, last)


def unit_costs(step: Step, cm: CostModel) -> StepCosts:
    """(middle-stage cost, last-stage cost) per unit; equal when pp = 1. All units priced in one batch."""
    units = step.units
    return price_units_of([u.id for u in units], [u.hdp_ranks for u in units], [u.pieces for u in units],
                          [u.offload_ratio for u in units], cm)


def simulate_step(step: Step, cm: CostModel, costs: StepCosts | None = None) -> StepSimulation:
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
