"""Lower bounds that grade plans (every plan reports step_time / lower_bound).

LB = max( total compute / (ranks) + gradient sync,
          longest single sequence at its best degree + gradient sync ).

Total compute charges every token's GEMMs, memory-bound kernels and TP collectives (never overlapped in
the cost model) at the rate of the largest unit a rank can hold (the most efficient it runs) and every
document's attention at its own length on one rank (the best attention rate it can get): no schedule
can do less work. Per-unit overheads, the LM head, the pipeline fill and drain and the ring are left
out, so a plan's step time over this bound includes them. The second term is the critical path of one
sequence: the fastest it can run over any number of ranks up to the mesh, through every pipeline stage one
after the other when it is not sliced (SlimPipe's slices overlap the stages: then one stage's time)."""

from __future__ import annotations

import numpy as np

from costmodel.memory import min_degree
from costmodel.timing import CostModel


def total_compute_s(lengths: np.ndarray, cm: CostModel) -> float:
    """Forward + backward work of all documents over all layers and stages, one rank's worth each: GEMMs,
    attention, memory-bound kernels and TP collectives, as CostModel.price_units charges them."""
    s = np.asarray(lengths, dtype=float)
    # The most tokens a rank can hold in one unit: C, or l/2·C with full offload (Eq. 3).
    c = float(cm.capacity_tokens) * max(1.0, cm.layers_per_stage / 2)
    policy = cm.setup.training.recompute
    rec = 2.0 if policy == "full" else 0.0
    per_token = (1.0 + rec / 2) * float(cm.gemm_layer_fwd_s(c)) + float(cm.gemm_layer_bwd_s(c))
    per_token += float(cm.memory_layer_s(c, recompute=policy != "none"))
    if cm.tp > 1 or cm.experts.all_to_all:  # a layer's exposed collectives, forward and backward (full recompute
        # replays the forward's), less what the EP overlap can hide at most
        per_token += float(sum(cm.layer_tp_comm_s(c))) - 2.0 * float(cm.ep_overlap_max_hidden_s(c))
    attn = cm.doc_attn_s(s, "fwd") * (1 + rec / 2) + cm.doc_attn_s(s, "bwd")
    layer = per_token / c * s.sum() + float(attn.sum())
    return cm.model.layers * layer


def best_single_unit_s(s: int, cm: CostModel, hdp: int, cp_kinds: bool = False, sliced: bool = False) -> float:
    """The fastest one sequence can run: its unit time without offload exposure (so a bound) minimised
    over every degree from the smallest feasible one (full offload) to the mesh: all integers up to
    2,048 candidates, else a fine geometric grid refined around its best point. `cp_kinds`: also over every
    context-parallel kind a unit may take (ring, all-gather, Ulysses and 2D with power-of-two head splits
    dividing the KV heads per TP rank, their all-to-alls priced inside a domain where the group fits one). With
    pp > 1 the unit passes every stage in turn (pp times its stage time), unless it may be `sliced`: its slices
    then run on the stages at once, and finely cut the critical path nears one stage's time (a bound)."""
    d_min = min(hdp, min_degree(s, cm.capacity_tokens, 1.0, cm.layers_per_stage))
    mesh = cm.setup.mesh

    def variants(d: int) -> list[tuple[int, int, str | None]]:  # (degree, ulysses, cp)
        out = [(d, 1, None)]
        if cp_kinds and d > 1:
            out += [(d, 1, "ring"), (d, 1, "allgather")]
            u = 2
            while u <= d:
                if d % u == 0 and cm.max_ulysses % u == 0:
                    out += [(d, u, "ring"), (d, u, "allgather")] if u < d else [(d, u, None)]
                u *= 2
        return out

    def t(degrees) -> list[float]:  # one unit of the sequence per degree and kind, priced in one batch
        per = [variants(int(d)) for d in degrees]
        vs = [v for vv in per for v in vv]
        ds = np.array([v[0] for v in vs])
        kw = dict(ulysses=np.array([v[1] for v in vs]), cp=[v[2] for v in vs],
                  ulysses_inter=np.array([mesh.group_spans_domains(v[1]) for v in vs], dtype=bool)) if cp_kinds else {}
        times = cm.price_units(np.full(len(vs), float(s)), np.arange(len(vs)), ds, 0.0,
                               np.array([mesh.group_spans_domains(int(d)) for d in ds], dtype=bool), **kw).total_s
        return np.minimum.reduceat(times, np.cumsum([0] + [len(vv) for vv in per])[:-1]).tolist()

    if hdp - d_min <= 2048:
        best = min(t(range(d_min, hdp + 1)))
    else:
        grid = np.unique(np.round(np.geomspace(d_min, hdp, 400)).astype(int))
        times = t(grid)
        k = int(np.argmin(times))
        lo, hi = int(grid[max(0, k - 1)]), int(grid[min(len(grid) - 1, k + 1)])
        best = min(min(times), *t(range(lo, hi + 1)))
    return best * cm.pp if cm.pp > 1 and not sliced else best


def lower_bound_s(lengths: np.ndarray, cm: CostModel, hdp: int, cp_kinds: bool = False, sliced: bool = True) -> float:
    """`cp_kinds`: the step may run units in other context-parallel kinds than the plan-wide one; `sliced`: its
    longest sequence may be cut into pipeline slices (False for a step whose unit of it is not)."""
    sync = cm.step_end_s(hdp)
    lengths = np.asarray(lengths)
    work = total_compute_s(lengths, cm) / (hdp * cm.pp) + sync
    longest = best_single_unit_s(int(lengths.max()), cm, hdp, cp_kinds, sliced) + sync if len(lengths) else 0.0
    return max(work, longest)
