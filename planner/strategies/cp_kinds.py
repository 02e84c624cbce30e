"""Context-parallel kind per sharded unit (issue 17): ring, all-gather, Ulysses (head split over all members)
or 2D (USP / LoongTrain head-first: Ulysses inside groups of u consecutive members, ring or all-gather across
the groups). `finalize` asks `choose_cp_kinds` for every unit when a plan request allows more than the
plan-wide kind (PlanOptions.cp_kinds, `meshplan plan --cp-kinds`): each unit keeps the fastest candidate whose
memory fits, the plan-wide kind always among them, so a unit is never slower than under that kind alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from costmodel.memory import allgather_cp_working_bytes
from costmodel.specs import ContextParallel
from costmodel.timing import CostModel
from planner.plan import Piece, PlanError
from planner.simulate.memory import activation_bytes
from planner.simulate.step import price_units_of, ulysses_groups_span_domains

CpKind = Literal["ring", "allgather", "ulysses", "2d"]
CP_KINDS: tuple[str, ...] = get_args(CpKind)
AUTO = "auto"  # every kind


def parse_cp_kinds(text: str) -> tuple[str, ...]:
    """`--cp-kinds` text: 'auto' or comma-separated kinds -> a tuple in CP_KINDS order; PlanError otherwise."""
    names = [k.strip().lower() for k in text.split(",") if k.strip()]
    if names == [AUTO]:
        return CP_KINDS
    wrong = [k for k in names if k not in CP_KINDS]
    if wrong or not names:
        raise PlanError(f"--cp-kinds must be {AUTO} or a comma-separated subset of {','.join(CP_KINDS)}, "
                        f"got {text!r}")
    return tuple(k for k in CP_KINDS if k in names)


def candidates(ranks: Sequence[int], cm: CostModel, kinds: Sequence[str]) -> list[tuple[int, ContextParallel | None]]:
    """(ulysses degree, CP kind; None = the plan-wide kind) a unit on `ranks` may run, the plan-wide kind first.
    Ulysses and 2D degrees must divide the KV heads per TP rank (CostModel.max_ulysses); 2D takes the power-of-two
    u strictly between 1 and the degree whose groups each stay inside one NVLink domain, with each allowed kind
    (or the plan-wide one) across the groups."""
    d, plan_kind = len(ranks), cm.setup.training.cp
    out: list[tuple[int, ContextParallel | None]] = [(1, None)]
    if d == 1:
        return out
    across: list[ContextParallel | None] = [None] + [k for k in ("ring", "allgather") if k in kinds and k != plan_kind]
    out += [(1, k) for k in across[1:]]
    if "ulysses" in kinds and cm.max_ulysses % d == 0:
        out.append((d, None))
    if "2d" in kinds:
        u = 2
        while u < d:
            if d % u == 0 and cm.max_ulysses % u == 0 and not ulysses_groups_span_domains(ranks, u, cm):
                out += [(u, k) for k in across]
            u *= 2
    return out


def choose_cp_kinds(ranks: Sequence[tuple[int, ...]], pieces: Sequence[Sequence[Piece]],
                    offload_ratio: Sequence[float], cm: CostModel,
                    kinds: Sequence[str]) -> tuple[list[int], list[ContextParallel | None]]:
    """Per unit, the (ulysses degree, CP kind) of least predicted time (`price_units_of`, the simulator's
    prices) among `candidates` whose memory fits; ties go to the earlier candidate (the plan-wide kind first).
    Memory: saved activations are the same under every kind (an all-to-all moves, not copies: Transformer
    Engine keeps O in token layout), so only all-gather differs: its gathered K/V and fp32 dK/dV must fit beside
    the unit's activations in the activation budget (C tokens). The plan-wide kind is kept even when it would
    not: it is what the strategy planned."""
    cands = [candidates(r, cm, kinds) for r in ranks]
    out_u, out_cp = [1] * len(cands), [None] * len(cands)
    choice = [k for k, cs in enumerate(cands) if len(cs) > 1]  # packed units have nothing to choose
    owner = np.repeat(np.asarray(choice, np.int64), [len(cands[k]) for k in choice])
    flat = [c for k in choice for c in cands[k]]
    if not flat:
        return out_u, out_cp
    costs = price_units_of(list(range(len(flat))), [ranks[k] for k in owner], [pieces[k] for k in owner],
                           [offload_ratio[k] for k in owner], cm, [u for u, _ in flat], [k for _, k in flat])
    time_s = costs.last.total_s
    plan_ag = cm.setup.training.cp == "allgather"
    degree = np.fromiter((len(ranks[k]) for k in owner), np.int64, len(flat))
    ulysses = np.fromiter((u for u, _ in flat), np.int64, len(flat))
    ag = np.array([(k == "allgather") or (k is None and plan_ag) for _, k in flat], bool) & (ulysses < degree)
    is_plan = np.array([k is None and u == 1 for u, k in flat], bool)
    if (ag & ~is_plan).any():
        tokens = costs.last.tokens_per_rank
        budget = cm.capacity_tokens * cm.layers_per_stage * cm.a_tok
        resident = activation_bytes(tokens, np.asarray([offload_ratio[k] for k in owner], float), cm)
        working = allgather_cp_working_bytes(cm.model, cm.tp, cm.bytes_per_elem, tokens * degree, ulysses)
        time_s = np.where(ag & ~is_plan & (resident + working > budget), np.inf, time_s)
    start = 0
    for k in choice:
        n = len(cands[k])
        best = start + int(np.argmin(time_s[start:start + n]))  # argmin: the first of equal times
        out_u[k], out_cp[k] = flat[best]
        start += n
    return out_u, out_cp
