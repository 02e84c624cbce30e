"""Memory of a simulated rank: the static parts it holds whatever it runs, the activations a unit
keeps (offload applied), and the pipeline section's in-flight weights derived from them."""

from __future__ import annotations

from costmodel.memory import activation_factor, model_state_bytes
from costmodel.timing import CostModel, UnitCost
from planner.plan import Step


def activation_bytes(u_tokens: int, offload: float, cm: CostModel) -> float:
    """Activations a rank keeps for a unit of `u_tokens` tokens per rank over its stage's layers, after offload."""
    return u_tokens * cm.layers_per_stage * cm.a_tok * activation_factor(offload, cm.layers_per_stage)


def mtp_activation_bytes(u_tokens, cm: CostModel):
    """The multi-token-prediction depths' layers on the last stage (no offload): their activations for a unit of
    `u_tokens` tokens per rank (0 without MTP). Arrays broadcast."""
    return u_tokens * cm.setup.training.mtp_layers * cm.a_tok


def recompute_working_bytes(u_tokens, cm: CostModel):
    """Full recompute (or Megatron-core's recompute modules): what a rank rebuilds of one layer at a time while a
    unit of `u_tokens` tokens per rank runs its backward (0 without it); C's formula counts it too
    (costmodel.memory.recompute_working_bytes_per_token). Arrays broadcast."""
    return u_tokens * cm.budget.recompute_working_bytes_per_token


def static_memory_parts(cm: CostModel, stage: int | None = None) -> dict[str, float]:
    """Bytes a rank of `stage` (None: the largest) holds whatever it runs: model states, the loss-head
    peak, CUDA context + NCCL buffers, and the fragmentation reserve. The one definition behind the
    simulated peak memory (so peak <= HBM means "fits", as C is derived) and the memory figure."""
    b = cm.budget
    return {"states": model_state_bytes(cm.setup, stage), "logits": b.logits_bytes, "context": b.ctx_bytes,
            "fragmentation": b.frag_bytes}


def static_memory_bytes(cm: CostModel, stage: int | None = None) -> float:
    """The sum of `static_memory_parts`."""
    return sum(static_memory_parts(cm, stage).values())


def inflight_weights(step: Step, cm: CostModel, costs: dict[int, tuple[UnitCost, UnitCost]]) -> dict[int, float]:
    """The pipeline section's "weights": each unit's resident activations per stage (offload applied) ÷
    a C-token micro-batch's, so the 1F1B in-flight budget is memory-faithful (rounded: the plan file
    holds exactly what the simulator and the runtime expand)."""
    full = activation_bytes(cm.capacity_tokens, 0.0, cm)
    return {u.id: round(max(activation_bytes(costs[u.id][0].tokens_per_rank, u.offload_ratio, cm) / full, 1e-6), 6)
            for u in step.units}
