"""What a plan request tells the strategies: the knobs they share, then each strategy's own (one
frozen dataclass per strategy, defined beside it). Defaults follow REFERENCE §11."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.strategies.cp_kinds import CpKind
from planner.strategies.dcp import DcpOptions
from planner.strategies.hdp import HdpOptions
from planner.strategies.ilp import IlpOptions
from planner.strategies.static import StaticOptions


@dataclass(frozen=True)
class PlanOptions:
    """Every strategy's options in one value: what the CLI, planner.api and the studies pass around."""

    offload: bool = True  # selective activation offloading (hdp strategies and ilp; Eq. 3)
    seed: int = 0  # seed of the length source (recorded with the options in the plan's meta)
    # context-parallel kinds each sharded unit may take (planner.strategies.cp_kinds); () or only the plan-wide
    # kind (TrainingSpec.cp): every unit keeps it
    cp_kinds: tuple[CpKind, ...] = ()
    static: StaticOptions = field(default_factory=StaticOptions)
    dcp: DcpOptions = field(default_factory=DcpOptions)
    hdp: HdpOptions = field(default_factory=HdpOptions)  # also the warm start of ilp
    ilp: IlpOptions = field(default_factory=IlpOptions)
