"""`static`: a Megatron-style static DP×CP mesh (REFERENCE §1, ByteScale §3).

CP is the smallest degree dividing the HDP ranks whose C·CP tokens hold the longest sequence
(or the user's), DP = hdp / CP. Documents are best-fit packed into rows of C·CP tokens; every
row is sharded over its CP group with per-document zigzag ring attention, short documents
included; each DP group runs the same number of micro-batches (rows balanced by tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from costmodel.timing import CostModel
from planner.workload import GlobalBatch
from planner.plan import PlanError, Step, zigzag_tokens_per_rank
from planner.strategies.common import Draft, SeqTable, best_fit_pack, ceil_div, finalize

if TYPE_CHECKING:  # the container imports this module for StaticOptions
    from planner.strategies.options import PlanOptions


@dataclass(frozen=True)
class StaticOptions:
    """Knobs of the static mesh."""

    cp: int | None = None  # CP degree (None = the smallest that holds the longest sequence)


def static_cp_degree(s_max: int, capacity: int, hdp: int, requested: int | None = None) -> int:
    if requested is not None:
        if requested < 1 or hdp % requested:
            raise PlanError(f"static CP degree {requested} must divide the {hdp} HDP ranks")
        if zigzag_tokens_per_rank([s_max], requested) > capacity:
            raise PlanError(f"static CP degree {requested} holds {requested * capacity} tokens per row, less than "
                            f"the longest sequence ({s_max}); use at least {ceil_div(s_max, capacity)}")
        return requested
    need = ceil_div(s_max, capacity)
    for cp in range(need, hdp + 1):
        if hdp % cp == 0 and zigzag_tokens_per_rank([s_max], cp) <= capacity:
            return cp
    raise PlanError(f"static mesh: a {s_max}-token sequence needs CP >= {need} at C = {capacity} tokens/rank, "
                    f"but only {hdp} HDP ranks exist; add GPUs or use recompute")


def plan_step(batch: GlobalBatch, cm: CostModel, opt: PlanOptions) -> Step:
    hdp = cm.setup.hdp
    seqs = SeqTable.of(batch)
    C = cm.capacity_tokens
    cp = static_cp_degree(int(seqs.lengths.max()), C, hdp, opt.static.cp)
    dp = hdp // cp
    # Rows hold C tokens per rank after per-document zigzag padding to a multiple of 2·CP.
    padded = 2 * cp * -(-seqs.lengths // (2 * cp))
    order = np.argsort(-seqs.lengths, kind="stable")
    rows = best_fit_pack(padded, order, C * cp)
    # Equal micro-batch counts: rows to DP groups by least tokens, at most ceil(M/DP) each.
    per_group = ceil_div(len(rows), dp)
    tokens = np.zeros(dp)
    count = np.zeros(dp, dtype=int)
    drafts = []
    for b in sorted(rows, key=lambda b: -int(seqs.lengths[b].sum())):
        open_g = np.flatnonzero(count < per_group)
        g = int(open_g[np.argmin(tokens[open_g])])
        drafts.append(Draft(ranks=tuple(range(g * cp, (g + 1) * cp)), pieces=[seqs.piece(i) for i in b],
                            sort_key=float(count[g])))
        tokens[g] += seqs.lengths[b].sum()
        count[g] += 1
    return finalize(batch, drafts, cm, hdp)
