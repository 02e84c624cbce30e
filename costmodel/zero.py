"""ZeRO-3 / FSDP2 (`fully_shard`): parameters, gradients and optimizer states sharded over the d HDP ranks of a
stage. Each decoder layer's parameters are all-gathered before its forward and again before its backward (FSDP2's
default reshard_after_forward=True), its gradients reduce-scattered after its backward; the root module (embedding,
final norm, LM head) is gathered once per pass and kept until its backward (FSDP2 never reshards the root after
forward). Every HDP rank of the stage joins every collective, so a step runs in rounds (planner.simulate.rounds).

Pure formulas: sizes from the specs, collective times from the profile's tables (docs/COSTMODEL.md "ZeRO-3")."""

from __future__ import annotations

from dataclasses import dataclass

from costmodel.specs import DTYPE_BYTES, Setup
from profiles.table import Profile

# FSDP2 prefetches one layer ahead: the running layer's parameters and the next one's are gathered at once
INFLIGHT_LAYERS = 2


def layer_params_per_rank(setup: Setup) -> float:
    """One decoder layer's parameters on one TP rank: P_layer / t (what each all-gather rebuilds)."""
    return setup.model.layer_params() / setup.training.tp


def root_params_per_rank(setup: Setup) -> float:
    """The root module's parameters on one TP rank (pp = 1): embedding (+ positions), final norm, LM head."""
    m = setup.model
    return (m.input_embedding_params() + m.head_params()) / setup.training.tp


def inflight_bytes(setup: Setup) -> float:
    """Unsharded bytes a ZeRO-3 rank holds besides its shards: the parameters of INFLIGHT_LAYERS gathered layers
    and of the root, and the unsharded gradients of one layer (until its reduce-scatter) and of the root (until
    the round's end), in the gradient dtype. 0 below stage 3."""
    tr = setup.training
    if tr.zero_stage < 3:
        return 0.0
    # the largest layer kind's where the layers differ: a peak, not the mean
    layer = max(kind.layer_params() for _, kind in setup.model.layer_kinds()) / tr.tp
    root = root_params_per_rank(setup)
    return ((INFLIGHT_LAYERS * layer + root) * DTYPE_BYTES[tr.dtype]
            + (layer + root) * DTYPE_BYTES[tr.grad_dtype])


@dataclass(frozen=True)
class RoundCollectives:
    """Times of one round's ZeRO-3 collectives over the d HDP ranks of a stage (one per TP rank, over the d
    ranks holding the same TP shard), nccl-tests convention: S is the full (gathered) buffer, and each rank
    moves (d - 1)/d · S (REFERENCE 7.5, 7.6)."""

    layer_gather_s: float  # all-gather of one layer's parameters, S = P_layer/t · b_param
    layer_reduce_scatter_s: float  # reduce-scatter of one layer's gradients, S = P_layer/t · b_grad
    root_gather_s: float  # the root's parameters, once per round before the forward
    root_reduce_scatter_s: float  # the root's gradients, once per round after the backward


def round_collectives(setup: Setup, profile: Profile) -> RoundCollectives:
    """Collective times of a round from the profile's all-gather and reduce-scatter tables; inter-domain when the
    stage's HDP ranks span NVLink domains (costmodel.mesh)."""
    d, tr = setup.hdp, setup.training
    scope = "inter" if setup.mesh.group_spans_domains(d) else "intra"
    pb, gb = DTYPE_BYTES[tr.dtype], DTYPE_BYTES[tr.grad_dtype]

    def t(op: str, params: float, b: int) -> float:
        return float(profile.collective_time_s(op, params * b, d, scope, tr.tp))  # one group per TP rank

    layer, root = layer_params_per_rank(setup), root_params_per_rank(setup)
    return RoundCollectives(t("all_gather", layer, pb), t("reduce_scatter", layer, gb),
                            t("all_gather", root, pb), t("reduce_scatter", root, gb))


def forward_pass_s(layer_s: float, gather_s: float, layers: int) -> float:
    """A round's forward over `layers` layers, each taking `layer_s` on the round's slowest rank: the first
    layer's gather is exposed, each later one is prefetched under the previous layer's compute (FSDP2's implicit
    forward prefetch, one collective stream); every rank waits for each gather, so a layer starts on all ranks
    together: g + (l - 1)·max(c, g) + c."""
    return gather_s + (layers - 1) * max(layer_s, gather_s) + layer_s


def backward_pass_s(layer_s: float, gather_s: float, reduce_scatter_s: float, layers: int,
                    lead_s: float = 0.0) -> float:
    """A round's backward over `layers` layers (processed last to first), each taking `layer_s` on the slowest
    rank. While layer j computes, the collective stream reduce-scatters layer j - 1's gradients (the previous one
    processed) and prefetches layer j + 1's parameters (FSDP2's backward prefetch); the two share the links, so
    they add. The first gather hides under `lead_s` (the LM head's compute before the first layer's backward),
    the last reduce-scatter is exposed: max(0, g - lead) + max(c, g) + (l - 2)·max(c, g + r) + max(c, r) + r
    (l ≥ 2), max(0, g - lead) + c + r (l = 1)."""
    first = max(0.0, gather_s - lead_s)
    if layers == 1:
        return first + layer_s + reduce_scatter_s
    return (first + max(layer_s, gather_s) + (layers - 2) * max(layer_s, gather_s + reduce_scatter_s)
            + max(layer_s, reduce_scatter_s) + reduce_scatter_s)


def round_time_s(fwd_layer_s: float, bwd_layer_s: float, head_s: float, layers: int, c: RoundCollectives) -> float:
    """One round: the root's gather, the forward, the head (forward + backward, the slowest rank's), the backward,
    the root's reduce-scatter. Per-layer times are the slowest member's (an empty rank: 0)."""
    return (c.root_gather_s + forward_pass_s(fwd_layer_s, c.layer_gather_s, layers) + head_s
            + backward_pass_s(bwd_layer_s, c.layer_gather_s, c.layer_reduce_scatter_s, layers, head_s)
            + c.root_reduce_scatter_s)
