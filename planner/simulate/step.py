"""Discrete-event simulation of one plan step (`simulate_step`): flat when pp = 1, pipelined
otherwise. Unit costs come from the cost model, never from the plan's own figures, so a plan can be
re-simulated on another profile."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import repeat

import numpy as np

from costmodel.specs import ContextParallel, SpecError
from costmodel.timing import CostModel, UnitCost, UnitCosts
from planner.plan import Piece, Plan, PlanError, Step
from planner.simulate.bounds import lower_bound_s
from planner.simulate.flat import simulate_flat
from planner.simulate.pipelined import simulate_pipelined
from planner.simulate.rounds import simulate_rounds
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


def ulysses_groups_span_domains(ranks: Sequence[int], ulysses: int, cm: CostModel) -> bool:
    """Whether any Ulysses group of a unit (consecutive runs of `ulysses` of its sorted ranks) crosses a domain:
    its all-to-alls are then priced on the inter-domain table."""
    spans = cm.setup.mesh.spans_domains
    return ulysses > 1 and any(spans(ranks[k:k + ulysses]) for k in range(0, len(ranks), ulysses))


def price_units_of(ids: list[int], ranks: Sequence[Sequence[int]], pieces: Sequence[Sequence[Piece]],
                   offload_ratio: Sequence[float], cm: CostModel, ulysses: Sequence[int] | None = None,
                   cp: Sequence[ContextParallel | None] | None = None) -> StepCosts:
    """Price units given as parallel lists (id, sorted HDP ranks, pieces, offload ratio; head-split degree and
    CP kind, default 1 and the plan's) in one batch: `unit_costs` of a step, and finalize's pricing before it
    builds the step's Unit objects: the one place a unit's fields become its price."""
    n = len(ids)
    counts = np.fromiter(map(len, pieces), np.int64, n)
    lengths = np.fromiter((p.end - p.start for ps in pieces for p in ps), float, int(counts.sum()))  # Piece.tokens
    offsets = np.cumsum(counts) - counts
    degree = np.fromiter(map(len, ranks), np.int64, n)
    ratio = np.fromiter(offload_ratio, float, n)
    inter = np.fromiter(map(cm.setup.mesh.spans_domains, ranks), bool, n)
    u = np.ones(n, np.int64) if ulysses is None else np.fromiter(ulysses, np.int64, n)
    u_inter = None
    if (u != 1).any():
        for uid, d, g in zip(ids, degree.tolist(), u.tolist()):
            if g != 1:
                try:
                    cm.check_ulysses(g, d)
                except SpecError as e:
                    raise PlanError(f"unit {uid}: {e}") from None
        u_inter = np.fromiter(map(ulysses_groups_span_domains, ranks, u.tolist(), repeat(cm)), bool, n)
    if cp is not None and all(k is None for k in cp):
        cp = None  # every unit the plan's kind: one answer for all
    kw = dict(ulysses=u, cp=cp, ulysses_inter=u_inter)
    last = cm.price_units(lengths, offsets, degree, ratio, inter, with_head=True, **kw)
    mid = cm.price_units(lengths, offsets, degree, ratio, inter, with_head=False, **kw) if cm.pp > 1 else last
    return StepCosts(list(ids), mid, last)


def unit_costs(step: Step, cm: CostModel) -> StepCosts:
    """(middle-stage cost, last-stage cost) per unit; equal when pp = 1. All units priced in one batch."""
    units = step.units
    return price_units_of([u.id for u in units], [u.hdp_ranks for u in units], [u.pieces for u in units],
                          [u.offload_ratio for u in units], cm, [u.ulysses for u in units], [u.cp for u in units])


def slice_costs(step: Step, cm: CostModel) -> StepCosts | None:
    """Each sliced unit's (middle, last)-stage cost at one slice's tokens: every document's n-th, rounded up (the
    runtime's slice j holds the j-th part of each); what a sliced pipeline op runs n times
    (`planner.simulate.pipelined.sliced_pass_s`). None when no unit is sliced."""
    sliced = [u for u in step.units if u.slices > 1]
    if not sliced:
        return None
    pieces = [tuple(Piece(p.seq, 0, -(-p.tokens // u.slices)) for p in u.pieces) for u in sliced]
    return price_units_of([u.id for u in sliced], [u.hdp_ranks for u in sliced], pieces,
                          [u.offload_ratio for u in sliced], cm, [u.ulysses for u in sliced], [u.cp for u in sliced])


def simulate_step(step: Step, cm: CostModel, costs: StepCosts | None = None) -> StepSimulation:
    """Simulate one step; `costs` (from `unit_costs`) may be passed in when the caller priced the units."""
    hdp = cm.setup.hdp
    if any(r >= hdp for u in step.units for r in u.hdp_ranks):
        raise PlanError(f"step {step.step}: plan uses HDP ranks beyond the mesh's {hdp}")
    costs = costs if costs is not None else unit_costs(step, cm)
    # a step with units of other CP kinds is bounded over every kind (one without them: over the plan-wide one)
    kinds = any(u.ulysses > 1 or u.cp is not None for u in step.units)
    longest = max(step.sequences, key=lambda q: q.length).id if step.sequences else None
    lb = lower_bound_s(np.array([q.length for q in step.sequences]), cm, hdp, kinds,  # is the longest one sliced?
                       sliced=any(u.slices > 1 and any(p.seq == longest for p in u.pieces) for u in step.units))
    if cm.setup.training.zero_stage == 3:  # pp = 1 (TrainingSpec refuses pp > 1): rounds
        return simulate_rounds(step, cm, costs, hdp, lb)
    if cm.pp == 1:
        return simulate_flat(step, cm, costs, hdp, lb)
    return simulate_pipelined(step, cm, costs, hdp, lb, slice_costs(step, cm))


def simulate_plan(plan: Plan, cm: CostModel) -> list[StepSimulation]:
    """Every step of a plan whose mesh matches the cost model's."""
    if plan.mesh.hdp != cm.setup.hdp or plan.mesh.pp != cm.pp or plan.mesh.tp != cm.tp:
        raise PlanError(f"plan mesh (tp {plan.mesh.tp}, pp {plan.mesh.pp}, hdp {plan.mesh.hdp}) does not match the "
                        f"cost model's (tp {cm.tp}, pp {cm.pp}, hdp {cm.setup.hdp})")
    return [simulate_step(s, cm) for s in plan.steps]
