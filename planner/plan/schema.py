"""The execution plan: typed dataclasses and their JSON reading and writing.

The plan is the contract between the planner, the simulator and the runtime (DESIGN.md, "The
plan file"). Every plan written must pass `planner.plan.validate`; the runtime validates again
before it runs. This module needs no torch and no strategy code."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from costmodel.mesh import MeshLayout
from costmodel.specs import ClusterSpec, ContextParallel, ModelSpec, TrainingSpec
from profiles.typed_json import Reader, at_least, positive, show, within

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan is malformed, inconsistent or cannot be built; the message says what and where."""


@dataclass(frozen=True)
class Mesh:
    """world = tp × pp × hdp; an HDP rank is one TP group (one pipeline when pp > 1)."""

    world_size: int = field(metadata=positive())  # total ranks (GPUs or processes)
    tp: int = field(metadata=positive())  # tensor-parallel degree
    pp: int = field(metadata=positive())  # pipeline stages
    hdp: int = field(metadata=positive())  # HDP ranks per stage

    @cached_property
    def layout(self) -> MeshLayout:
        """The rank arithmetic of this mesh. A plan does not record the cluster's nodes, so the only
        domain it can name is a TP group; ask domain questions of the planning Setup's mesh instead."""
        return MeshLayout(tp=self.tp, pp=self.pp, hdp=self.hdp, gpus_per_domain=self.tp)

    def global_rank(self, stage: int, hdp_rank: int, tp_rank: int = 0) -> int:
        return self.layout.global_rank(stage, hdp_rank, tp_rank)

    def coordinates(self, global_rank: int) -> tuple[int, int, int]:
        """(stage, hdp_rank, tp_rank) of a global rank."""
        return self.layout.coordinates(global_rank)


@dataclass(frozen=True)
class Sequence:
    id: int  # unique in the step
    length: int = field(metadata=positive())  # tokens


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of sequence `seq`, placed in a unit."""

    seq: int  # sequence id
    start: int = field(metadata=at_least(0))  # first token
    end: int = field(metadata=positive())  # one past the last token

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Unit:
    """Work a set of HDP ranks runs together: a packed bin on one rank, or documents sharded
    zigzag (2N chunks per document) over N = len(hdp_ranks) ranks with ring attention."""

    id: int  # unique in the step; execution order on every rank is increasing id (deadlock-free)
    hdp_ranks: tuple[int, ...] = field(metadata=at_least(0))  # members, sorted
    pieces: tuple[Piece, ...]  # the documents (or document pieces) of this unit
    # share of saved activations offloaded to host (ByteScale Eq. 3)
    offload_ratio: float = field(default=0.0, metadata=within(0, 1))
    slices: int = field(default=1, metadata=at_least(1))  # pipeline slices per micro-batch (SlimPipe); 1 = unsliced
    # cost-model forward+backward time of this unit on its ranks
    predicted_time_s: float = field(default=0.0, metadata=at_least(0))
    tokens_per_rank: int = field(default=0, metadata=at_least(0))  # tokens each member holds (zigzag padding included)
    # Head-split (Ulysses) degree inside the unit: 1 = context parallel over all members; = degree: pure Ulysses
    # (all-to-all of Q/K/V and the output); in between: 2D (USP / LoongTrain head-first), Ulysses over consecutive
    # groups of this many members, context parallel across the groups. Written only when not 1.
    ulysses: int = field(default=1, metadata=positive())
    # this unit's context-parallel kind ("ring" | "allgather"); None: the plan's meta.training.cp. Written only when set.
    cp: ContextParallel | None = None

    @property
    def degree(self) -> int:
        return len(self.hdp_ranks)

    @property
    def ring_degree(self) -> int:
        """Members the context-parallel part spans (degree / ulysses): 1 for a pure Ulysses unit."""
        return len(self.hdp_ranks) // self.ulysses

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.pieces)


@dataclass
class Predicted:
    step_time_s: float = field(metadata=at_least(0))  # simulated step time
    lower_bound_s: float = field(metadata=at_least(0))  # planner/simulate/bounds.py
    per_rank_busy_s: list[float]  # compute + exposed comm per HDP rank
    peak_memory_bytes: list[float] = field(metadata=at_least(0))  # per HDP rank (per stage with PP: max over stages)
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds by category


DEFAULT_MAX_CHUNKS = 1000  # mirror pairing: most K/V chunks one pair moves (SlimPipe configs: 100-1000)


@dataclass(frozen=True)
class PipelineSection:
    """A step's pipeline schedule (pp > 1), the one home of its defaults: `planner.schedule.step_op_lists`
    expands it to the per-stage op lists the simulator times and the runtime executes; validate's
    check_pipeline checks its meaning. Written as the planner writes it: schedule, v, max_chunks (with
    "sliced-redistributed", the only schedule that reads it), weights where set."""

    schedule: str = "1f1b"  # one of planner.schedule.SCHEDULES
    v: int = field(default=1, metadata=at_least(1))  # model chunks per stage (interleaving depth); 1 = none
    # unit id -> in-flight weight of the 1F1B budget (its activations ÷ a C-token micro-batch's); None: count-based
    weights: dict[int, float] | None = field(default=None, metadata=positive())
    # mirror pairing ("sliced-redistributed"): most K/V chunks (one slice's each) a stage pair moves per op
    max_chunks: int = field(default=DEFAULT_MAX_CHUNKS, metadata=at_least(0))

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "v": self.v,
                **({"max_chunks": self.max_chunks} if self.schedule == "sliced-redistributed" else {}),
                **({"weights": {str(u): w for u, w in self.weights.items()}} if self.weights is not None else {})}


@dataclass
class Step:
    step: int = field(metadata=at_least(0))
    global_tokens: int = field(metadata=at_least(0))  # loss normaliser: every token of the step
    sequences: list[Sequence]
    units: list[Unit]
    order: dict[int, list[int]]  # HDP rank -> unit ids in execution order
    predicted: Predicted
    pipeline: PipelineSection | None = None  # pp > 1 only

    @property
    def chunks_per_stage(self) -> int:
        """Model chunks per pipeline stage (the section's v; 1 without a pipeline section)."""
        return 1 if self.pipeline is None else self.pipeline.v


@dataclass
class Plan:
    meta: dict[str, Any]
    mesh: Mesh
    steps: list[Step]
    schema_version: int = SCHEMA_VERSION

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def unit(u: Unit) -> dict[str, Any]:
            d = asdict(u)
            d["hdp_ranks"] = list(u.hdp_ranks)
            d["pieces"] = [asdict(p) for p in u.pieces]
            if u.ulysses == 1:  # the defaults are left out: plans without per-unit CP kinds keep their bytes
                del d["ulysses"]
            if u.cp is None:
                del d["cp"]
            return d

        return {
            "schema_version": self.schema_version,
            "meta": self.meta,
            "mesh": asdict(self.mesh),
            "steps": [{
                "step": s.step, "global_tokens": s.global_tokens,
                "sequences": [asdict(q) for q in s.sequences],
                "units": [unit(u) for u in s.units],
                "order": {str(r): list(ids) for r, ids in sorted(s.order.items())},
                "predicted": asdict(s.predicted),
                **({"pipeline": s.pipeline.to_dict()} if s.pipeline is not None else {}),
            } for s in self.steps],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        from profiles.table import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: Any, origin: str = "plan") -> "Plan":
        """A plan from its JSON object: every field typed (and the meta keys tools read), each error
        one line naming `origin` and the JSON path. Consistency checks are `validate`'s."""
        if not isinstance(d, dict):
            raise PlanError(f"{origin}: not a plan (expected a JSON object, got {show(d)})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise PlanError(f"{origin}: schema_version {show(d.get('schema_version'))} not supported (expected "
                            f"{SCHEMA_VERSION})")
        read = Reader(origin, PlanError)
        plan = read.build(cls, {"meta": {}, **d})
        if "training" in plan.meta:  # an older plan's keys read as today's
            plan.meta["training"] = TrainingSpec.upgraded(plan.meta["training"])
        read.build(PlanMeta, plan.meta, "meta")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        from profiles.table import read_json

        return cls.from_dict(read_json(path, "plan", PlanError), origin=str(path))


@dataclass(frozen=True)
class ProfileRef:
    """meta.profile: which profile a plan was made with."""

    JSON_EXTRA_KEYS: ClassVar[bool] = True  # other keys are allowed (and kept in meta as written)

    name: str
    source: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class PlanMeta:
    """Types of the meta keys that tools read back (meta stays a free dict; other keys are allowed).
    Checked by Plan.from_dict so an edited plan fails on load, naming the key, not later in a tool."""

    JSON_EXTRA_KEYS: ClassVar[bool] = True

    model: str | None = None
    cluster: str | None = None
    gpus: int | None = field(default=None, metadata=positive())
    strategy: str | None = None
    profile: ProfileRef | None = None
    model_spec: ModelSpec | None = None
    cluster_spec: ClusterSpec | None = None
    training: TrainingSpec | None = None
    solver: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    seed: int | None = None
    capacity_tokens: int | None = field(default=None, metadata=positive())
    layers_per_stage: int | None = field(default=None, metadata=positive())
    dkv_activation_ratio: float | None = field(default=None, metadata=at_least(0))
    split_documents: int | None = field(default=None, metadata=at_least(0))


def zigzag_tokens_per_rank(lengths: list[int] | tuple[int, ...], degree: int) -> int:
    """Tokens one member holds when each document is padded to a multiple of 2N and cut into 2N
    chunks, of which every rank keeps two (REFERENCE 2.3). Packed bins (N = 1) carry no padding."""
    if degree == 1:
        return int(sum(lengths))
    return int(sum(2 * math.ceil(s / (2 * degree)) for s in lengths))
