"""Where each rank sits: the tp × pp × hdp layout of a job on NVLink domains (DESIGN.md, "Mesh").

The one home of global rank ↔ (stage, HDP rank, TP rank) and of every "does this cross a domain?"
answer. A domain is the set of GPUs joined by NVLink-class links: a node on HGX/DGX clusters, a rack of
72 GPUs on a GB200 NVL72 (ClusterSpec.gpus_per_domain)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from costmodel.specs import SpecError
from profiles.typed_json import Reader, positive


@dataclass(frozen=True)
class MeshLayout:
    """world = tp × pp × hdp. Global rank of (stage, hdp_rank, tp_rank) = stage·(hdp·tp) + hdp_rank·tp
    + tp_rank: a TP group is consecutive ranks, so are the HDP ranks of a stage, and a domain holds
    consecutive HDP ranks. Validated on construction; every other size is derived here."""

    tp: int = field(metadata=positive())  # tensor-parallel degree: GPUs per HDP rank
    pp: int = field(metadata=positive())  # pipeline stages
    hdp: int = field(metadata=positive())  # HDP ranks (TP groups) per stage
    gpus_per_domain: int = field(metadata=positive())  # GPUs per NVLink domain (a node, or an NVL72 rack)

    def __post_init__(self) -> None:
        Reader("mesh", SpecError).check(self)
        if self.tp > self.gpus_per_domain:
            raise SpecError(f"tp={self.tp} exceeds the {self.gpus_per_domain} GPUs of a node; "
                            "TP must stay inside one NVLink domain")
        if self.gpus_per_domain % self.tp:
            raise SpecError(f"tp={self.tp} must divide the {self.gpus_per_domain} GPUs per node")

    @classmethod
    def of_world(cls, world_size: int, tp: int, pp: int, gpus_per_domain: int) -> "MeshLayout":
        """The layout of `world_size` GPUs cut into TP groups and pipeline stages."""
        # TP is checked against the domain first (hdp ≥ 1 only so that it can be built), then the world
        layout = cls(tp=tp, pp=pp, hdp=max(1, world_size // (tp * pp)), gpus_per_domain=gpus_per_domain)
        if world_size % (tp * pp):
            raise SpecError(f"world size {world_size} is not divisible by tp*pp = {tp * pp}")
        return layout

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.hdp

    @property
    def stage_size(self) -> int:
        """GPUs of one pipeline stage: hdp·tp."""
        return self.hdp * self.tp

    @property
    def hdp_per_domain(self) -> int:
        """HDP ranks (whole TP groups) per domain."""
        return self.gpus_per_domain // self.tp

    # ---- rank arithmetic ------------------------------------------------------------------------
    def global_rank(self, stage: int, hdp_rank: int, tp_rank: int = 0) -> int:
        return stage * self.stage_size + hdp_rank * self.tp + tp_rank

    def coordinates(self, global_rank: int) -> tuple[int, int, int]:
        """(stage, hdp_rank, tp_rank) of a global rank: the inverse of `global_rank`."""
        if not 0 <= global_rank < self.world_size:
            raise SpecError(f"global rank {global_rank} is outside the mesh of {self.world_size} ranks")
        stage, rest = divmod(global_rank, self.stage_size)
        hdp_rank, tp_rank = divmod(rest, self.tp)
        return stage, hdp_rank, tp_rank

    def domain_of(self, global_rank: int) -> int:
        return global_rank // self.gpus_per_domain

    # ---- does communication cross domains? -------------------------------------------------------
    # HDP-rank answers count domains from stage 0's placement (hdp_rank // hdp_per_domain): exact for
    # every stage when the stage size (hdp·tp) is a multiple or a divisor of the domain size.
    def spans_domains(self, hdp_ranks: Sequence[int]) -> bool:
        """Whether a unit's HDP ranks (sorted, one stage) lie in more than one domain."""
        if not len(hdp_ranks):
            return False
        return hdp_ranks[0] // self.hdp_per_domain != hdp_ranks[-1] // self.hdp_per_domain

    def group_spans_domains(self, degree: int) -> bool:
        """Whether a group of `degree` HDP ranks cannot fit in one domain."""
        return degree > self.hdp_per_domain

    def stages_in_different_domains(self, stage_a: int, stage_b: int, hdp_rank: int) -> bool:
        """Whether HDP rank `hdp_rank`'s GPUs of two stages sit in different domains."""
        return (self.domain_of(self.global_rank(stage_a, hdp_rank))
                != self.domain_of(self.global_rank(stage_b, hdp_rank)))

    @property
    def adjacent_stages_in_different_domains(self) -> bool:
        """Whether a pipeline's neighbouring stages sit in different domains: when a stage fills at
        least one domain."""
        return self.stage_size >= self.gpus_per_domain
