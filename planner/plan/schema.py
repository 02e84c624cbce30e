"""The execution plan: dataclasses, JSON (de)serialisation and validate().

The plan is the contract between the planner, the simulator and the runtime (DESIGN.md, "The
plan file"). Every plan written must pass `validate`; the runtime validates again before it runs.
This module needs no torch and no strategy code."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import networkx as nx

from costmodel.memory import activation_factor, sliced_capacity_tokens
from costmodel.specs import ClusterSpec, ModelSpec, TrainingSpec
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

    def global_rank(self, stage: int, hdp_rank: int, tp_rank: int = 0) -> int:
        return stage * (self.hdp * self.tp) + hdp_rank * self.tp + tp_rank


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

    @property
    def degree(self) -> int:
        return len(self.hdp_ranks)

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


@dataclass
class Step:
    step: int = field(metadata=at_least(0))
    global_tokens: int = field(metadata=at_least(0))  # loss normaliser: every token of the step
    sequences: list[Sequence]
    units: list[Unit]
    order: dict[int, list[int]]  # HDP rank -> unit ids in execution order
    predicted: Predicted
    pipeline: dict[str, Any] | None = None  # schedule description when pp > 1


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
                **({"pipeline": s.pipeline} if s.pipeline is not None else {}),
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
        read.build(PlanMeta, plan.meta, "meta")
        for i, st in enumerate(plan.steps):
            if st.pipeline is not None:
                read.build(PipelineSection, st.pipeline, f"steps[{i}].pipeline")
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


@dataclass(frozen=True)
class PipelineSection:
    """Types of a step's `pipeline` section (pp > 1); check_pipeline checks its meaning."""

    schedule: str = "1f1b"
    v: int = field(default=1, metadata=at_least(1))
    weights: dict[int, float] | None = field(default=None, metadata=positive())  # unit id -> in-flight weight
    max_chunks: int = field(default=0, metadata=at_least(0))


def zigzag_tokens_per_rank(lengths: list[int] | tuple[int, ...], degree: int) -> int:
    """Tokens one member holds when each document is padded to a multiple of 2N and cut into 2N
    chunks, of which every rank keeps two (REFERENCE 2.3). Packed bins (N = 1) carry no padding."""
    if degree == 1:
        return int(sum(lengths))
    return int(sum(2 * math.ceil(s / (2 * degree)) for s in lengths))


def validate(plan: Plan, *, capacity_tokens: int | None = None, layers_per_stage: int | None = None) -> None:
    """Raise PlanError unless every contract check of DESIGN.md holds.

    capacity_tokens / layers_per_stage default to meta["capacity_tokens"] / meta["layers_per_stage"];
    a unit's tokens per rank must fit C after offload: tokens·(2 + (1 − r)(l − 2))/l ≤ C (Eq. 3's budget)."""
    m = plan.mesh
    if min(m.world_size, m.tp, m.pp, m.hdp) <= 0 or m.world_size != m.tp * m.pp * m.hdp:
        raise PlanError(f"mesh: world_size {m.world_size} != tp {m.tp} × pp {m.pp} × hdp {m.hdp}")
    cap = capacity_tokens if capacity_tokens is not None else plan.meta.get("capacity_tokens")
    lay = layers_per_stage if layers_per_stage is not None else plan.meta.get("layers_per_stage")
    if not plan.steps:
        raise PlanError("plan has no steps")
    for st in plan.steps:
        where = f"step {st.step}"
        # First, so that a mesh of absurd size fails here rather than in per-rank loops below.
        if len(st.predicted.per_rank_busy_s) != m.hdp or len(st.predicted.peak_memory_bytes) != m.hdp:
            raise PlanError(f"{where}: predicted per-rank lists must have {m.hdp} entries (mesh.hdp)")
        seq_len = {q.id: q.length for q in st.sequences}
        if len(seq_len) != len(st.sequences):
            raise PlanError(f"{where}: duplicate sequence ids")
        if any(q.length <= 0 for q in st.sequences):
            raise PlanError(f"{where}: sequence lengths must be positive")
        if st.global_tokens != sum(seq_len.values()):
            raise PlanError(f"{where}: global_tokens {st.global_tokens} != sum of sequence lengths "
                            f"{sum(seq_len.values())}")
        # Each token of each sequence lies in exactly one piece.
        pieces: dict[int, list[tuple[int, int]]] = {q: [] for q in seq_len}
        ids = [u.id for u in st.units]
        if len(set(ids)) != len(ids):
            raise PlanError(f"{where}: duplicate unit ids")
        members: dict[int, set[int]] = {r: set() for r in range(m.hdp)}
        for u in st.units:
            uw = f"{where} unit {u.id}"
            if not u.hdp_ranks or len(set(u.hdp_ranks)) != len(u.hdp_ranks):
                raise PlanError(f"{uw}: hdp_ranks must be non-empty and distinct")
            for r in u.hdp_ranks:
                if not 0 <= r < m.hdp:
                    raise PlanError(f"{uw}: HDP rank {r} out of range [0, {m.hdp})")
                members[r].add(u.id)
            if not u.pieces:
                raise PlanError(f"{uw}: has no pieces")
            for p in u.pieces:
                if p.seq not in seq_len:
                    raise PlanError(f"{uw}: unknown sequence {p.seq}")
                if not 0 <= p.start < p.end <= seq_len[p.seq]:
                    raise PlanError(f"{uw}: piece [{p.start}, {p.end}) outside sequence {p.seq} of "
                                    f"length {seq_len[p.seq]}")
                pieces[p.seq].append((p.start, p.end))
            if not 0.0 <= u.offload_ratio <= 1.0:
                raise PlanError(f"{uw}: offload_ratio {u.offload_ratio} outside [0, 1]")
            if not 1 <= u.slices <= max(1, u.tokens):
                raise PlanError(f"{uw}: slices must be in [1, {u.tokens}] (a slice holds at least one token), "
                                f"got {u.slices}")
            need = zigzag_tokens_per_rank([p.tokens for p in u.pieces], u.degree)
            if u.tokens_per_rank and u.tokens_per_rank != need:
                raise PlanError(f"{uw}: tokens_per_rank {u.tokens_per_rank} != {need} (zigzag over "
                                f"{u.degree} ranks)")
            if cap:
                eff = need * activation_factor(u.offload_ratio, lay or 1)
                limit = sliced_capacity_tokens(cap, m.pp, u.slices, plan.meta.get("dkv_activation_ratio", 0.0))
                if eff > limit * (1 + 1e-9):
                    raise PlanError(f"{uw}: {need} tokens per rank (offload {u.offload_ratio:.2f}, {u.slices} "
                                    f"slice(s)) exceed the capacity of {limit:.0f} tokens (C = {cap})")
            if not math.isfinite(u.predicted_time_s) or u.predicted_time_s < 0:
                raise PlanError(f"{uw}: predicted_time_s must be finite and >= 0")
        for q, iv in pieces.items():
            iv.sort()
            pos = 0
            for a, b in iv:
                if a != pos:
                    kind = "overlap" if a < pos else "gap"
                    raise PlanError(f"{where}: sequence {q} has a {kind} at token {min(a, pos)} "
                                    "(each token must lie in exactly one piece)")
                pos = b
            if pos != seq_len[q]:
                raise PlanError(f"{where}: sequence {q} covers {pos} of {seq_len[q]} tokens")
        # Orders mention exactly the units a rank belongs to, once each.
        for r in range(m.hdp):
            got = st.order.get(r, [])
            if len(got) != len(set(got)) or set(got) != members[r]:
                raise PlanError(f"{where}: order of HDP rank {r} lists {sorted(got)[:8]}... but the rank "
                                f"belongs to units {sorted(members[r])[:8]}...")
        extra = set(st.order) - set(range(m.hdp))
        if extra:
            raise PlanError(f"{where}: order names HDP ranks {sorted(extra)} outside [0, {m.hdp})")
        check_deadlock_free(st)
        if m.pp > 1:
            check_pipeline(st, m.pp, m.hdp, lay)
        pr = st.predicted
        vals = [pr.step_time_s, pr.lower_bound_s, *pr.per_rank_busy_s, *pr.peak_memory_bytes, *pr.breakdown.values()]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise PlanError(f"{where}: predicted figures must be finite numbers")


def check_deadlock_free(st: Step) -> None:
    """The union of per-rank orders (edge u→v when a rank runs u right before v) must be acyclic:
    otherwise co-scheduled units wait on each other forever (REFERENCE 2.4)."""
    g = nx.DiGraph()
    g.add_nodes_from(u.id for u in st.units)
    for ids in st.order.values():
        g.add_edges_from(zip(ids, ids[1:]))
    if not nx.is_directed_acyclic_graph(g):
        cyc = nx.find_cycle(g)
        raise PlanError(f"step {st.step}: orders deadlock: units {[a for a, _ in cyc]} wait on each other in a cycle")


def check_pipeline(st: Step, pp: int, hdp: int, layers_per_stage: int | None = None) -> None:
    """pp > 1: the step's `pipeline` section is well formed and the op lists it expands to run to the
    end (a shared unit's op must head every member pipeline's list at once). With layers_per_stage,
    v (model chunks per stage, each of whole layers) must divide it."""
    from planner.schedule import SCHEDULES, ScheduleError, dependency, run_ops, section_weights, step_op_lists

    where = f"step {st.step} pipeline"
    sec = st.pipeline or {}
    if sec.get("schedule", "1f1b") not in SCHEDULES:
        raise PlanError(f"{where}: unknown schedule {sec.get('schedule')!r}; one of {', '.join(SCHEDULES)}")
    v = sec.get("v", 1)
    if not isinstance(v, int) or v < 1:
        raise PlanError(f"{where}: v must be an integer >= 1, got {v!r}")
    if layers_per_stage and layers_per_stage % v:
        raise PlanError(f"{where}: v = {v} must divide the {layers_per_stage} layers of a stage "
                        "(meta.layers_per_stage)")
    mc = sec.get("max_chunks", 0)
    if not isinstance(mc, int) or mc < 0:
        raise PlanError(f"{where}: max_chunks must be an integer >= 0, got {mc!r}")
    try:
        weights = section_weights(sec)
    except (AttributeError, TypeError, ValueError):
        raise PlanError(f"{where}: weights must map unit ids to numbers") from None
    slices = {u.id: u.slices for u in st.units}
    if weights is not None and (set(weights) != set(slices) or
                                not all(math.isfinite(w) and w > 0 for w in weights.values())):
        raise PlanError(f"{where}: weights must give every unit of the step a positive finite number")
    try:
        lists = step_op_lists(pp, {r: st.order.get(r, []) for r in range(hdp)}, slices, v, weights)
        last = {u: n - 1 for u, n in slices.items()}
        run_ops({k: [((k[1], op), None) for op in ops] for k, ops in lists.items()},
                lambda key: dependency(key[1], key[0], pp, v, last[key[1].mb]), lambda key: 1.0, lambda key: 0.0)
    except ScheduleError as e:
        raise PlanError(f"{where}: {e}") from None
