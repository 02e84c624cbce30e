"""What planning one step returns: the Step and, from an exact strategy, its solver's report; and the
plan's meta["solver"], built from those reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner.plan import Step


class SolverWarning(UserWarning):
    """The exact solver gave no plan: the warm start (or, without one, the heuristic's plan) was used."""


@dataclass(frozen=True)
class SolverInfo:
    """What the solver did for one step."""

    name: str  # backend: cbc | highs | cpsat
    status: str  # optimal | feasible (time limit, incumbent kept) | fallback (heuristic plan used)
    seconds: float  # wall time of the whole strategy call (model, warm start, solve, finalize)
    gap: float | None  # (written plan's simulated makespan − bound) / that makespan, ≥ 0 (before the gradient sync)
    objective_s: float | None  # model step time of the partition written: makespan + gradient sync
    bound_s: float | None  # best proven lower bound on objective_s within the model
    simulated_s: float | None  # step time of the emitted plan, from the simulator
    hdp_s: float | None  # step time of the `hdp` plan (the warm start's seed) on the same batch
    items: int = 0  # sequences or buckets in the model
    groups: int = 0  # candidate groups
    variables: int = 0
    note: str = ""  # why a fallback happened, or why the warm start was kept
    bound_from: str = ""  # what proved bound_s: area (or slowest member), configuration LP, integer
    #                       configurations, or solver
    written: str = "solver"  # whose plan the step holds: solver (its partition), warm start, or hdp
    backend_error: str = ""  # the backend's failure (exception, crash), when it failed; the warm start was kept

    def to_meta(self) -> dict:
        """Per-step record for the plan's meta (no wall times: plans stay byte-identical when optimal)."""
        d = dataclasses.asdict(self)
        d.pop("seconds")
        d.pop("bound_from")  # depends on which proof finished first: kept out of the (deterministic) plan
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass(frozen=True)
class StepOutcome:
    """One planned step, with the solver's report where an exact strategy planned it."""

    step: Step
    solver: SolverInfo | None = None  # None: a heuristic planned the step


def solver_meta(reports: list[SolverInfo], strategy: str, seconds: float) -> dict:
    """meta["solver"] of a plan: heuristics report themselves; solver steps give their worst status and gap."""
    if not reports:
        return {"name": strategy, "status": "heuristic", "seconds": round(seconds, 6), "gap": None}
    worst = max(reports, key=lambda r: ("optimal", "feasible", "fallback").index(r.status))
    gaps = [r.gap for r in reports if r.gap is not None]
    return {"name": reports[0].name, "status": worst.status, "seconds": round(seconds, 6),
            "gap": round(max(gaps), 9) if gaps else None, "steps": [r.to_meta() for r in reports]}
