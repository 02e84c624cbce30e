"""validate(): the contract checks every plan written must pass (DESIGN.md, "The plan file"); the
runtime validates again before it runs. One check per rule, in the order validate() applies them,
so a plan with several faults always reports the same one first."""

from __future__ import annotations

import math

import networkx as nx

from costmodel.memory import activation_factor, sliced_capacity_tokens
from planner.plan.schema import Mesh, PipelineSection, Plan, PlanError, Step, Unit, zigzag_tokens_per_rank
from planner.schedule.engine import ScheduleError, run_ops
from planner.schedule.ops import SCHEDULES, dependency, step_op_lists


def validate(plan: Plan, *, capacity_tokens: int | None = None, layers_per_stage: int | None = None) -> None:
    """Raise PlanError unless every contract check of DESIGN.md holds.

    capacity_tokens / layers_per_stage default to meta["capacity_tokens"] / meta["layers_per_stage"];
    a unit's tokens per rank must fit C after offload: tokens·(2 + (1 − r)(l − 2))/l ≤ C (Eq. 3's budget)."""
    m = plan.mesh
    check_mesh(m)
    cap = capacity_tokens if capacity_tokens is not None else plan.meta.get("capacity_tokens")
    lay = layers_per_stage if layers_per_stage is not None else plan.meta.get("layers_per_stage")
    dkv = plan.meta.get("dkv_activation_ratio", 0.0)
    training = plan.meta.get("training")
    zero3 = isinstance(training, dict) and training.get("zero_stage") == 3
    if not plan.steps:
        raise PlanError("plan has no steps")
    for st in plan.steps:
        where = f"step {st.step}"
        # First, so that a mesh of absurd size fails here rather than in per-rank loops below.
        if len(st.predicted.per_rank_busy_s) != m.hdp or len(st.predicted.peak_memory_bytes) != m.hdp:
            raise PlanError(f"{where}: predicted per-rank lists must have {m.hdp} entries (mesh.hdp)")
        seq_len = check_sequences(st)
        ids = [u.id for u in st.units]
        if len(set(ids)) != len(ids):
            raise PlanError(f"{where}: duplicate unit ids")
        for u in st.units:
            check_unit(u, where, m, seq_len, cap, lay, dkv)
        check_coverage(st, seq_len)
        check_orders(st, m.hdp)
        check_deadlock_free(st)
        if zero3:
            unit_rounds(st)
        if m.pp > 1:
            check_pipeline(st, m.pp, m.hdp, lay, (plan.meta.get("model_spec") or {}).get("layers"))
        pr = st.predicted
        vals = [pr.step_time_s, pr.lower_bound_s, *pr.per_rank_busy_s, *pr.peak_memory_bytes, *pr.breakdown.values()]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            raise PlanError(f"{where}: predicted figures must be finite numbers")


def check_mesh(m: Mesh) -> None:
    """world_size = tp × pp × hdp, all positive."""
    if min(m.world_size, m.tp, m.pp, m.hdp) <= 0 or m.world_size != m.tp * m.pp * m.hdp:
        raise PlanError(f"mesh: world_size {m.world_size} != tp {m.tp} × pp {m.pp} × hdp {m.hdp}")


def check_sequences(st: Step) -> dict[int, int]:
    """Distinct ids, positive lengths, global_tokens their sum; returns sequence id -> length."""
    where = f"step {st.step}"
    seq_len = {q.id: q.length for q in st.sequences}
    if len(seq_len) != len(st.sequences):
        raise PlanError(f"{where}: duplicate sequence ids")
    if any(q.length <= 0 for q in st.sequences):
        raise PlanError(f"{where}: sequence lengths must be positive")
    if st.global_tokens != sum(seq_len.values()):
        raise PlanError(f"{where}: global_tokens {st.global_tokens} != sum of sequence lengths "
                        f"{sum(seq_len.values())}")
    return seq_len


def check_unit(u: Unit, where: str, m: Mesh, seq_len: dict[int, int], cap: int | None, lay: int | None,
               dkv_activation_ratio: float) -> None:
    """One unit: members in range, pieces inside their sequences, offload and slices in range,
    tokens_per_rank as zigzag says, tokens within the capacity C (when given), a finite predicted time."""
    uw = f"{where} unit {u.id}"
    if not u.hdp_ranks or len(set(u.hdp_ranks)) != len(u.hdp_ranks):
        raise PlanError(f"{uw}: hdp_ranks must be non-empty and distinct")
    for r in u.hdp_ranks:
        if not 0 <= r < m.hdp:
            raise PlanError(f"{uw}: HDP rank {r} out of range [0, {m.hdp})")
    if not u.pieces:
        raise PlanError(f"{uw}: has no pieces")
    for p in u.pieces:
        if p.seq not in seq_len:
            raise PlanError(f"{uw}: unknown sequence {p.seq}")
        if not 0 <= p.start < p.end <= seq_len[p.seq]:
            raise PlanError(f"{uw}: piece [{p.start}, {p.end}) outside sequence {p.seq} of "
                            f"length {seq_len[p.seq]}")
    if not 0.0 <= u.offload_ratio <= 1.0:
        raise PlanError(f"{uw}: offload_ratio {u.offload_ratio} outside [0, 1]")
    if not 1 <= u.slices <= max(1, u.tokens):
        raise PlanError(f"{uw}: slices must be in [1, {u.tokens}] (a slice holds at least one token), "
                        f"got {u.slices}")
    if u.degree % u.ulysses:
        raise PlanError(f"{uw}: ulysses degree {u.ulysses} must divide the unit's {u.degree} ranks")
    need = zigzag_tokens_per_rank([p.tokens for p in u.pieces], u.degree)
    if u.tokens_per_rank and u.tokens_per_rank != need:
        raise PlanError(f"{uw}: tokens_per_rank {u.tokens_per_rank} != {need} (zigzag over "
                        f"{u.degree} ranks)")
    if cap:
        eff = need * activation_factor(u.offload_ratio, lay or 1)
        limit = sliced_capacity_tokens(cap, m.pp, u.slices, dkv_activation_ratio)
        if eff > limit * (1 + 1e-9):
            raise PlanError(f"{uw}: {need} tokens per rank (offload {u.offload_ratio:.2f}, {u.slices} "
                            f"slice(s)) exceed the capacity of {limit:.0f} tokens (C = {cap})")
    if not math.isfinite(u.predicted_time_s) or u.predicted_time_s < 0:
        raise PlanError(f"{uw}: predicted_time_s must be finite and >= 0")


def check_coverage(st: Step, seq_len: dict[int, int]) -> None:
    """Each token of each sequence lies in exactly one piece (pieces already checked by check_unit)."""
    pieces: dict[int, list[tuple[int, int]]] = {q: [] for q in seq_len}
    for u in st.units:
        for p in u.pieces:
            pieces[p.seq].append((p.start, p.end))
    for q, iv in pieces.items():
        iv.sort()
        pos = 0
        for a, b in iv:
            if a != pos:
                kind = "overlap" if a < pos else "gap"
                raise PlanError(f"step {st.step}: sequence {q} has a {kind} at token {min(a, pos)} "
                                "(each token must lie in exactly one piece)")
            pos = b
        if pos != seq_len[q]:
            raise PlanError(f"step {st.step}: sequence {q} covers {pos} of {seq_len[q]} tokens")


def check_orders(st: Step, hdp: int) -> None:
    """Orders mention exactly the units a rank belongs to, once each, and only ranks of the mesh."""
    where = f"step {st.step}"
    members: dict[int, set[int]] = {r: set() for r in range(hdp)}
    for u in st.units:
        for r in u.hdp_ranks:
            members[r].add(u.id)
    for r in range(hdp):
        got = st.order.get(r, [])
        if len(got) != len(set(got)) or set(got) != members[r]:
            raise PlanError(f"{where}: order of HDP rank {r} lists {sorted(got)[:8]}... but the rank "
                            f"belongs to units {sorted(members[r])[:8]}...")
    extra = set(st.order) - set(range(hdp))
    if extra:
        raise PlanError(f"{where}: order names HDP ranks {sorted(extra)} outside [0, {hdp})")


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


def check_pipeline(st: Step, pp: int, hdp: int, layers_per_stage: int | None = None, layers: int | None = None) -> None:
    """pp > 1: the step's pipeline section (absent: PipelineSection's defaults) is well formed and the op
    lists it expands to run to the end (a shared unit's op must head every member pipeline's list at
    once). With layers_per_stage, v (model chunks per stage, each of whole layers) must divide it; with the
    model's layers, each of the pp × v chunks must get one."""
    where = f"step {st.step} pipeline"
    sec = st.pipeline or PipelineSection()
    if sec.schedule not in SCHEDULES:
        raise PlanError(f"{where}: unknown schedule {sec.schedule!r}; one of {', '.join(SCHEDULES)}")
    v = sec.v
    if v < 1:
        raise PlanError(f"{where}: v must be an integer >= 1, got {v!r}")
    if layers_per_stage and layers_per_stage % v:
        raise PlanError(f"{where}: v = {v} must divide the {layers_per_stage} layers of a stage "
                        "(meta.layers_per_stage)")
    if isinstance(layers, int) and pp * v > layers:
        raise PlanError(f"{where}: pp × v = {pp} × {v} chunks for {layers} layers (meta.model_spec): each chunk "
                        "needs a layer")
    if sec.max_chunks < 0:
        raise PlanError(f"{where}: max_chunks must be an integer >= 0, got {sec.max_chunks!r}")
    slices = {u.id: u.slices for u in st.units}
    weights = sec.weights
    if weights is not None and (set(weights) != set(slices) or
                                not all(math.isfinite(w) and w > 0 for w in weights.values())):
        raise PlanError(f"{where}: weights must give every unit of the step a positive finite number")
    try:
        lists = step_op_lists(st, pp, hdp)
        last = {u: n - 1 for u, n in slices.items()}
        run_ops({k: [((k[1], op), None) for op in ops] for k, ops in lists.items()},
                lambda key: dependency(key[1], key[0], pp, v, last[key[1].mb]), lambda key: 1.0, lambda key: 0.0)
    except ScheduleError as e:
        raise PlanError(f"{where}: {e}") from None


def unit_rounds(st: Step) -> dict[int, int]:
    """ZeRO-3 plans run in rounds (every HDP rank joins each round's per-layer collectives): round r of a rank is
    the r-th unit of its order, so a unit shared by several ranks must stand at the same position in each
    member's order. Returns unit id -> round; PlanError naming the first misaligned unit."""
    first: dict[int, tuple[int, int]] = {}  # unit id -> (position, the first rank seen)
    for r, ids in sorted(st.order.items()):
        for k, uid in enumerate(ids):
            k0, r0 = first.setdefault(uid, (k, r))
            if k0 != k:
                raise PlanError(f"step {st.step}: zero_stage 3 runs in rounds, but unit {uid} is number {k0} in "
                                f"HDP rank {r0}'s order and number {k} in rank {r}'s; a shared unit must stand at "
                                "the same position in every member's order")
    return {uid: k for uid, (k, _) in first.items()}
