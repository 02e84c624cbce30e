"""Megatron-core's selective recompute by module (TransformerConfig.recompute_modules, `--recompute-modules`, as
megatron-core 0.14-0.16 run it; docs/COSTMODEL.md "Recompute modules"): per layer kind, the saved activations each
module frees against recompute none, and what the backward replays for it.

Normal checkpointing (core_attn, mlp, moe, shared_experts) keeps the module's input and reruns its whole forward,
communication included; output-discarding checkpointing (layernorm, moe_act, mla_up_proj) frees an output that the
next module saved and reruns only what made it. Transformer Engine's GPT layer specs fuse a norm into the linear
after it wherever they can (both norms of a dense layer, the input norm of an MoE layer): those are not modules,
so `layernorm` frees MoE layers' pre-MLP norm and MLA's input norm only. `mlp` leaves MoE layers alone, `moe`
holds moe_act and shared_experts, and a module a layer does not have does nothing (as in Megatron-core). Pure
functions of the specs; costmodel.memory and costmodel.timing call them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from costmodel.elementwise import MemKernel, layer_kernels
from costmodel.moe import ExpertLayout, moe_activation_bytes_per_token, moe_kernels
from costmodel.specs import ModelSpec, mean_over_layers


def effective_modules(model: ModelSpec, modules: Iterable[str]) -> frozenset[str]:
    """The modules that act on a layer of `model` (one layer kind, ModelSpec.layer_kinds)."""
    mods = set(modules)
    mods -= {"mlp"} if model.is_moe else {"moe", "moe_act", "shared_experts"}
    if "moe" in mods:  # inside the checkpointed layer
        mods -= {"moe_act", "shared_experts"}
    if not model.shared_expert_ffn:
        mods.discard("shared_experts")
    if not model.is_mla:
        mods.discard("mla_up_proj")
    if not (model.is_moe or model.is_mla):  # both norms fused into the linears after them
        mods.discard("layernorm")
    return frozenset(mods)


def _mlp_inner_bytes(ffn: float, gated: bool, scale: float, fp8: bool) -> float:
    """What an MLP of width `ffn` saves per token inside it: its first GEMM's output (SwiGLU's gate and up, 2f; an
    ungated MLP's f) and the activation's output, the down projection's input (its fp8 cast under fp8: 1 B)."""
    return (2.0 if gated else 1.0) * ffn * 2.0 * scale + ffn * (1.0 if fp8 else 2.0 * scale)


@mean_over_layers
def freed_bytes_per_token(model: ModelSpec, tp: int, modules: Iterable[str], dtype_bytes: int = 2,
                          sequence_parallel: bool = True, experts: ExpertLayout | None = None,
                          fp8: bool = False) -> float:
    """Saved bytes per token per layer on one rank that the modules free, against costmodel.memory's count for
    recompute none (the mean layer's where some layers are dense). A GEMM input kept for the weight gradient is 2 B
    (bf16) or its fp8 cast, 1 B; replicated terms (a norm's output) are split over tp under sequence parallelism.
    What the backward rebuilds of them one layer at a time is `working_bytes_per_token`."""
    mods = effective_modules(model, modules)
    scale = dtype_bytes / 2.0
    rep = tp if sequence_parallel else 1
    h = model.hidden
    gemm_in = 1.0 if fp8 else 2.0 * scale
    lay = experts or ExpertLayout(tp=tp, sequence_parallel=sequence_parallel)
    freed = 0.0
    if fp8 and "core_attn" in mods:  # the core's bf16 output, kept beside the projection's fp8 cast of it
        freed += 2.0 * scale * model.attn_out_width / tp
    if fp8 and model.shared_expert_ffn and {"layernorm", "moe", "shared_experts"} & mods:
        freed += h / rep  # a shared expert's own fp8 copy of its input (once, whichever module frees it)
    if "layernorm" in mods:
        if model.is_moe:  # the pre-MLP norm's output, which the router keeps in bf16
            freed += 2.0 * scale * h / rep
        if model.is_mla:  # the input norm's output, the latents' down projections' input
            freed += gemm_in * h / rep
    if "mlp" in mods:  # all but the MLP's input: the fused norm's output, the GEMM's and the activation's outputs
        freed += gemm_in * h / rep + _mlp_inner_bytes(model.ffn, model.gated, scale, fp8) / tp
    if "moe" in mods:  # all but the layer's input (the pre-MLP norm's output)
        freed += (_mlp_inner_bytes(model.mlp_width_per_token, model.gated, scale, fp8) / tp
                  + moe_activation_bytes_per_token(model, lay, "none", dtype_bytes, fp8))
    if "moe_act" in mods:  # the routed experts' activation output (fp8: the bf16 tensor fc2 then saves is freed)
        routed = model.top_k * model.ffn / tp
        freed += routed * (1.0 if fp8 else 2.0 * scale) + routed * (lay.capacity_factor - 1.0) * 2.0 * scale
    if "shared_experts" in mods:
        freed += _mlp_inner_bytes(model.shared_expert_ffn, model.gated, scale, fp8) / tp
    if "mla_up_proj" in mods:  # Q, K and V after the up projections and RoPE; the latents' norm outputs
        freed += (2.0 * scale * (model.q_width + 2.0 * model.kv_width) / tp
                  + 2.0 * scale * (model.q_lora_rank + model.kv_lora_rank) / rep)
    return freed


def working_bytes_per_token(model: ModelSpec, tp: int, modules: Iterable[str], dtype_bytes: int = 2,
                            sequence_parallel: bool = True, experts: ExpertLayout | None = None,
                            fp8: bool = False) -> float:
    """What the backward of one layer rebuilds at a time of what the modules freed, a peak beside the held layers'
    (as full recompute's one-layer working set): the largest layer kind's freed bytes per token on one rank."""
    return max(freed_bytes_per_token(kind, tp, modules, dtype_bytes, sequence_parallel, experts, fp8)
               for _, kind in model.layer_kinds())


@dataclass(frozen=True)
class Replay:
    """What the backward of one layer (one kind) replays of its forward under recompute modules."""

    gemms: frozenset[str]  # the forward GEMMs, by costmodel.timing.gemm_shapes label (their fp8 casts follow them)
    kernels: tuple[MemKernel, ...]  # memory-bound forward kernels, bytes per token on one rank
    attention: bool = False  # the attention core, with its context-parallel exchange
    mlp_pair: bool = False  # a dense MLP's TP collectives (SP's all-gather and reduce-scatter)
    experts_comm: bool = False  # an MoE layer's dispatch and combine, and its shared expert's TP pair
    shared_pair: bool = False  # a shared expert's TP pair alone
    latent_gather: bool = False  # MLA's latents all-gathered over TP for the up projections (SP)


def replay(model: ModelSpec, modules: Iterable[str], tp: int, sequence_parallel: bool, dtype_bytes: int,
           experts: ExpertLayout) -> Replay:
    """The forward work the modules replay in a layer of `model` (one layer kind)."""
    mods = effective_modules(model, modules)
    fwd = layer_kernels(model, tp, sequence_parallel, dtype_bytes, "fwd")
    norm = next(k for k in fwd if k.label == "norm")
    act = next(k for k in fwd if k.label == model.mlp)  # over the routed and shared widths together

    def act_of(width: float) -> MemKernel:
        return MemKernel(act.label, act.bytes_per_item * width / model.mlp_width_per_token)

    up = "gate_up" if model.gated else "up"
    shared = frozenset({f"shared_{up}", "shared_down"}) if model.shared_expert_ffn else frozenset()
    gemms: set[str] = set()
    kernels: list[MemKernel] = []
    if "layernorm" in mods:
        kernels += [norm] * (int(model.is_moe) + int(model.is_mla))
    if "mlp" in mods:
        gemms |= {up, "down"}
        kernels += [norm, act]
    if "moe" in mods:
        gemms |= {"router", up, "down"} | shared
        kernels += [act, *moe_kernels(model, experts, dtype_bytes, "fwd")]
    if "moe_act" in mods:
        kernels += [act_of(model.top_k * model.ffn),
                    *(k for k in moe_kernels(model, experts, dtype_bytes, "fwd") if k.label.endswith("_imbalance"))]
    if "shared_experts" in mods:
        gemms |= shared
        kernels.append(act_of(model.shared_expert_ffn))
    if "mla_up_proj" in mods:
        gemms |= {"q", "q_up", "kv_up"}
        kernels += [k for k in fwd if k.label in ("latent_norm", "rope")]
    return Replay(gemms=frozenset(gemms), kernels=tuple(kernels), attention="core_attn" in mods,
                  mlp_pair="mlp" in mods, experts_comm="moe" in mods, shared_pair="shared_experts" in mods,
                  latent_gather="mla_up_proj" in mods and sequence_parallel)
