"""Typed, validated descriptions of what is trained (ModelSpec), where (ClusterSpec) and how
(TrainingSpec). Values only: no cost formulas live here (see flops.py, memory.py, timing.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from profiles.typed_json import Reader, at_least, positive, within

if TYPE_CHECKING:  # costmodel.mesh imports SpecError from here
    from costmodel.mesh import MeshLayout


class SpecError(ValueError):
    """A spec value is missing, out of range or inconsistent; the message says which and how to fix it."""


# Cross-field rules, shared by ModelSpec and HFConfig (each names its own fields). Each field is
# given as (name, value); `owner` prefixes the message ("" where the caller adds the file).
def _check_multiple(owner: str, big: tuple[str, int], small: tuple[str, int], hint: str = "") -> None:
    """Raise unless big's value is a multiple of small's."""
    if big[1] % small[1]:
        raise SpecError(f"{owner}{': ' if owner else ''}{big[0]} ({big[1]}) must be a multiple of "
                        f"{small[0]} ({small[1]}){hint}")


def _check_at_most(owner: str, a: tuple[str, int], b: tuple[str, int]) -> None:
    """Raise unless a's value <= b's."""
    if a[1] > b[1]:
        raise SpecError(f"{owner}{': ' if owner else ''}{a[0]} ({a[1]}) cannot exceed {b[0]} ({b[1]})")


NormKind = Literal["rmsnorm", "layernorm"]
MlpKind = Literal["swiglu", "gelu", "relu2"]  # relu2: squared ReLU (Primer, Nemotron-4), ungated
PositionKind = Literal["rope", "learned", "alibi"]


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer: the Llama / Mixtral / Qwen block (RMSNorm, RoPE, GQA, SwiGLU) by default,
    or the GPT block of Megatron's published runs (LayerNorm, learned positions, GeLU MLP, biases, dropout)
    through the block fields below, whose defaults are the Llama block."""

    DERIVED_KEYS: ClassVar[tuple[str, ...]] = ("parameters", "active_parameters")  # to_dict adds; read ignores

    name: str  # preset or file name
    layers: int = field(metadata=positive())  # decoder layers L
    hidden: int = field(metadata=positive())  # model width h
    heads: int = field(metadata=positive())  # query heads n_q
    kv_heads: int = field(metadata=positive())  # key/value heads n_kv (GQA groups)
    head_dim: int = field(metadata=positive())  # d_h; n_q * d_h need not equal h (it does for every preset)
    ffn: int = field(metadata=positive())  # SwiGLU inner width f (per expert for MoE)
    vocab: int = field(metadata=positive())  # vocabulary V
    tied_embeddings: bool = False  # input embedding shared with the LM head
    experts: int = field(default=1, metadata=positive())  # MoE experts E (1 = dense)
    top_k: int = field(default=1, metadata=positive())  # experts per token k
    # a shared expert beside the routed ones (Qwen1.5/2-MoE): a dense MLP of this width every token runs, parallel
    # like the attention (Megatron-core's SharedExpertMLP); 0: none
    shared_expert_ffn: int = field(default=0, metadata=at_least(0))
    qkv_bias: bool = False  # Qwen2-style bias on Q, K, V projections
    # -- block kind (defaults: the Llama block) --
    norm: NormKind = "rmsnorm"  # rmsnorm (a weight of h) or layernorm (weight and bias, 2h)
    mlp: MlpKind = "swiglu"  # swiglu (gate, up, down), or ungated (up, down): gelu (GPT, ffn = 4h) or relu2
    linear_bias: bool = False  # a bias on every linear of the layer (QKV, output, MLP): GPT-2/3, Megatron GPT
    # rope (no parameters), learned (a max_positions x h table) or alibi (BLOOM: a fixed per-head linear bias added
    # to the attention scores, no parameters)
    position: PositionKind = "rope"
    max_positions: int = field(default=0, metadata=at_least(0))  # rows of the learned position table
    dropout: bool = False  # dropout after attention and MLP (saves a 1-byte mask each, Korthikanti 2022)
    # sliding-window attention (Mistral 7B v0.1, Gemma 2 and 3, GPT-OSS): in a windowed layer each query attends
    # its `sliding_window` nearest keys, itself included; 0: full causal attention in every layer
    sliding_window: int = field(default=0, metadata=at_least(0))
    full_attention_layers: int = field(default=0, metadata=at_least(0))  # layers that keep full attention
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        owner = f"model {self.name!r}"
        Reader(owner, SpecError).check(self)
        _check_multiple(owner, ("heads", self.heads), ("kv_heads", self.kv_heads))
        _check_at_most(owner, ("top_k", self.top_k), ("experts", self.experts))
        if self.shared_expert_ffn and not self.is_moe:
            raise SpecError(f"{owner}: shared_expert_ffn ({self.shared_expert_ffn}) needs routed experts (experts > "
                            "1); a dense model's MLP is ffn")
        if (self.position == "learned") != (self.max_positions > 0):
            raise SpecError(f"{owner}: max_positions ({self.max_positions}) must be > 0 exactly when position is "
                            f"learned (position is {self.position!r})")
        if self.full_attention_layers and not self.sliding_window:
            raise SpecError(f"{owner}: full_attention_layers ({self.full_attention_layers}) needs a sliding_window "
                            "(the other layers' window); set sliding_window or drop full_attention_layers")
        _check_at_most(owner, ("full_attention_layers", self.full_attention_layers), ("layers", self.layers))

    # -- derived widths --------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        """n_q * d_h: width of the query projection output."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """h_kv = n_kv * d_h: width of K (and of V)."""
        return self.kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    @property
    def mlp_width_per_token(self) -> int:
        """MLP width one token's work spans: its top-k experts' (the dense MLP's) and the shared expert's."""
        return self.ffn * self.top_k + self.shared_expert_ffn

    @property
    def windowed_fraction(self) -> float:
        """Share of the layers with sliding-window attention (0 without a window)."""
        return (self.layers - self.full_attention_layers) / self.layers if self.sliding_window else 0.0

    # -- parameter counts ------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        """The MLP multiplies two projections (SwiGLU) rather than activating one (GeLU, squared ReLU)."""
        return self.mlp == "swiglu"

    @property
    def mlp_matrices(self) -> int:
        """h x f weight matrices of one MLP: gate, up, down (SwiGLU) or up, down (ungated)."""
        return 3 if self.gated else 2

    @property
    def norm_params(self) -> int:
        """Parameters of one norm: a weight (RMSNorm) or a weight and a bias (LayerNorm)."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def attention_params(self) -> int:
        """Q, K, V, O projections (+ QKV bias, + output bias with linear_bias) of one layer."""
        qkv = self.hidden * (self.q_width + 2 * self.kv_width)
        bias = (self.q_width + 2 * self.kv_width) if self.qkv_bias or self.linear_bias else 0
        out_bias = self.hidden if self.linear_bias else 0
        return qkv + bias + self.q_width * self.hidden + out_bias

    def expert_params(self, ffn: int | None = None) -> int:
        """One MLP of width `ffn` (default: an expert's, the dense MLP's): its matrices (+ the up and down biases
        with linear_bias)."""
        f = self.ffn if ffn is None else ffn
        bias = (f * (self.mlp_matrices - 1) + self.hidden) if self.linear_bias and f else 0
        return self.mlp_matrices * self.hidden * f + bias

    def layer_params(self, active: bool = False) -> int:
        """One decoder layer: attention, MLP (all experts, or top_k when active; the shared expert), router, 2
        norms."""
        n_mlp = self.top_k if active else self.experts
        router = self.hidden * self.experts if self.is_moe else 0
        shared = self.expert_params(self.shared_expert_ffn)
        return self.attention_params() + n_mlp * self.expert_params() + shared + router + 2 * self.norm_params

    def input_embedding_params(self) -> int:
        """Token embedding (+ the learned position table): what the first pipeline stage holds."""
        return (self.vocab + self.max_positions) * self.hidden

    def head_params(self) -> int:
        """Final norm plus LM head (no head matrix when tied): what the last pipeline stage holds."""
        return self.norm_params + (0 if self.tied_embeddings else self.vocab * self.hidden)

    def embedding_params(self) -> int:
        """Input embedding (with positions) plus LM head (once when tied)."""
        return self.input_embedding_params() + self.head_params() - self.norm_params

    @property
    def parameters(self) -> int:
        """Total parameters."""
        return self.layers * self.layer_params() + self.input_embedding_params() + self.head_params()

    @property
    def active_parameters(self) -> int:
        """Parameters touched per token (top_k experts)."""
        return self.layers * self.layer_params(active=True) + self.input_embedding_params() + self.head_params()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parameters"] = self.parameters
        d["active_parameters"] = self.active_parameters
        return d

    @classmethod
    def from_dict(cls, d: Any, origin: str = "model spec") -> "ModelSpec":
        """From a spec JSON object; `origin` (the file) heads every error message."""
        return Reader(origin, SpecError).build(cls, d)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelSpec":
        """Read a HuggingFace `config.json` (Llama, Mistral, Mixtral, Qwen2 architectures)."""
        from profiles.table import read_json

        p = Path(path)
        cfg = HFConfig.from_dict(read_json(p, "HuggingFace config", SpecError), str(p))
        return cfg.model_spec(name=p.parent.name if p.name == "config.json" else p.stem,
                              source=f"HuggingFace config {p} ({cfg.architecture})")


@dataclass(frozen=True)
class HFConfig:
    """The keys of a HuggingFace decoder `config.json` that a ModelSpec needs, typed. Other keys
    (rope, dtype, ...) are ignored; null stands for an absent optional key."""

    num_hidden_layers: int = field(metadata=positive())
    hidden_size: int = field(metadata=positive())
    num_attention_heads: int = field(metadata=positive())
    intermediate_size: int = field(metadata=positive())
    vocab_size: int = field(metadata=positive())
    num_key_value_heads: int | None = field(default=None, metadata=positive())  # None: = heads (MHA)
    head_dim: int | None = field(default=None, metadata=positive())  # None: hidden / heads
    num_local_experts: int | None = field(default=None, metadata=at_least(0))  # Mixtral; 0 or 1: dense
    num_experts: int | None = field(default=None, metadata=at_least(0))  # Qwen-MoE spelling
    num_experts_per_tok: int | None = field(default=None, metadata=positive())
    moe_intermediate_size: int | None = field(default=None, metadata=positive())  # per-expert width
    shared_expert_intermediate_size: int | None = field(default=None, metadata=at_least(0))  # Qwen2-MoE
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    architectures: list[str] | None = None
    model_type: str | None = None
    # sliding-window attention: the window; Qwen2's use_sliding_window false turns it off; which layers keep full
    # attention: layer_types ("full_attention" / "sliding_attention"), else every sliding_window_pattern-th
    # (Gemma 3), else every second for Gemma 2, else none (Mistral)
    sliding_window: int | None = field(default=None, metadata=positive())
    use_sliding_window: bool | None = None
    sliding_window_pattern: int | None = field(default=None, metadata=positive())
    layer_types: list[str] | None = None
    max_window_layers: int | None = field(default=None, metadata=at_least(0))  # Qwen: layers below it are full

    def __post_init__(self) -> None:
        if self.head_dim is None:
            _check_multiple("", ("hidden_size", self.hidden_size), ("num_attention_heads", self.num_attention_heads),
                            hint="; give head_dim if the heads are not hidden_size / num_attention_heads wide")
        if self.num_key_value_heads is not None:
            _check_multiple("", ("num_attention_heads", self.num_attention_heads),
                            ("num_key_value_heads", self.num_key_value_heads))
        if self.experts > 1 and self.num_experts_per_tok is not None:
            _check_at_most("", ("num_experts_per_tok", self.num_experts_per_tok),
                           ("num_local_experts" if self.num_local_experts else "num_experts", self.experts))

    @classmethod
    def from_dict(cls, d: Any, origin: str) -> "HFConfig":
        need = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in need if k not in d] if isinstance(d, dict) else []
        if missing:
            raise SpecError(f"{origin}: not a decoder config, missing {missing}")
        kind = d.get("model_type") or ""
        if "sliding_window" not in d and (kind == "mistral" or kind.startswith("qwen") and d.get("use_sliding_window")):
            d = {**d, "sliding_window": 4096}  # transformers' MistralConfig and Qwen2Config default
        return Reader(origin, SpecError).build(cls, d, ignore_unknown=True)

    @property
    def experts(self) -> int:
        n = self.num_local_experts if self.num_local_experts is not None else self.num_experts
        return n or 1

    @property
    def architecture(self) -> str:
        return ",".join(self.architectures or [self.model_type or "?"])

    def attention_window(self) -> tuple[int, int]:
        """(sliding_window, full_attention_layers) of the ModelSpec; (0, 0): full attention everywhere. Qwen's
        configs carry a window that only use_sliding_window turns on (transformers' default off), and then only for
        the layers from max_window_layers on (default 28)."""
        qwen = (self.model_type or "").startswith("qwen")
        if not self.sliding_window or self.use_sliding_window is False or (qwen and not self.use_sliding_window):
            return 0, 0
        layers = self.num_hidden_layers
        if self.layer_types is not None:
            full = sum(t == "full_attention" for t in self.layer_types)
        elif qwen:
            full = min(layers, 28 if self.max_window_layers is None else self.max_window_layers)
        elif self.sliding_window_pattern:
            full = layers // self.sliding_window_pattern
        else:
            full = layers // 2 if self.model_type == "gemma2" else 0
        return (0, 0) if full >= layers else (self.sliding_window, full)

    def model_spec(self, name: str, source: str) -> ModelSpec:
        moe = self.experts > 1
        window, full_layers = self.attention_window()
        return ModelSpec(
            name=name, layers=self.num_hidden_layers, hidden=self.hidden_size, heads=self.num_attention_heads,
            kv_heads=self.num_key_value_heads or self.num_attention_heads,
            head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
            ffn=self.moe_intermediate_size if moe and self.moe_intermediate_size else self.intermediate_size,
            vocab=self.vocab_size, tied_embeddings=self.tie_word_embeddings, experts=self.experts,
            top_k=(self.num_experts_per_tok or 1) if moe else 1,
            shared_expert_ffn=(self.shared_expert_intermediate_size or 0) if moe else 0,
            qkv_bias=self.attention_bias or "Qwen2" in self.architecture,
            sliding_window=window, full_attention_layers=full_layers, source=source)


@dataclass(frozen=True)
class ClusterSpec:
    """Homogeneous nodes of GPUs: NVLink-class links inside a node, a NIC per GPU between nodes."""

    DERIVED_KEYS: ClassVar[tuple[str, ...]] = ("world_size",)  # to_dict adds; read ignores

    name: str  # preset name
    gpu: str  # device name, e.g. "H100 SXM"
    nodes: int = field(metadata=positive())  # node count
    gpus_per_node: int = field(metadata=positive())  # GPUs (ranks) per node
    gpu_memory_bytes: int = field(metadata=positive())  # HBM per GPU
    host_memory_bytes: int = field(metadata=positive())  # host DRAM per node
    intra_node_bw_bytes_per_s: float = field(metadata=positive())  # scale-up bandwidth per GPU per direction [spec]
    inter_node_bw_bytes_per_s: float = field(metadata=positive())  # scale-out bandwidth per GPU per direction (NIC)
    host_link_bw_bytes_per_s: float = field(metadata=positive())  # GPU<->host bandwidth per GPU (PCIe), per direction
    profile: str  # default profile name in profiles/data
    source: str = ""  # where the numbers come from
    # GPUs joined by NVLink-class links (the mesh's domain), a multiple of gpus_per_node: 72 on a GB200 NVL72 rack
    # of 4-GPU trays. None: one node (every HGX/DGX preset); left out of to_dict then, so their plans stay as they were
    gpus_per_domain: int | None = field(default=None, metadata=positive())

    def __post_init__(self) -> None:
        Reader(f"cluster {self.name!r}", SpecError).check(self)
        if self.gpus_per_domain is not None and self.gpus_per_domain % self.gpus_per_node:
            raise SpecError(f"cluster {self.name!r}: gpus_per_domain ({self.gpus_per_domain}) must be a multiple of "
                            f"gpus_per_node ({self.gpus_per_node}): an NVLink domain holds whole nodes")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def domain_gpus(self) -> int:
        """GPUs per NVLink domain: gpus_per_domain, or one node."""
        return self.gpus_per_node if self.gpus_per_domain is None else self.gpus_per_domain

    def with_gpus(self, gpus: int) -> "ClusterSpec":
        """The same cluster resized to `gpus` GPUs (whole nodes, or one partial node)."""
        if not isinstance(gpus, int) or gpus <= 0:
            raise SpecError(f"cluster {self.name!r}: GPU count must be a positive integer, got {gpus!r}")
        if gpus <= self.gpus_per_node:  # a part of one node: one domain
            return dataclasses.replace(self, nodes=1, gpus_per_node=gpus, gpus_per_domain=None)
        if gpus % self.gpus_per_node:
            raise SpecError(f"cluster {self.name!r}: {gpus} GPUs is not a whole number of "
                            f"{self.gpus_per_node}-GPU nodes; use a multiple of {self.gpus_per_node}")
        return dataclasses.replace(self, nodes=gpus // self.gpus_per_node)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.gpus_per_domain is None:
            del d["gpus_per_domain"]
        d["world_size"] = self.world_size
        return d

    @classmethod
    def from_dict(cls, d: Any, origin: str = "cluster spec") -> "ClusterSpec":
        """From a spec JSON object; `origin` (the file) heads every error message."""
        return Reader(origin, SpecError).build(cls, d)


Recompute = Literal["none", "selective", "full"]
# flash: the profile's fused attention as its table holds it; a named generation (fa2, fa3, cudnn-2024): that kernel
# at its published rate over the table's (Profile.attention_kernel_time_x; analytic profiles); unfused: materialised
# scores (QKᵀ, softmax, PV)
AttentionKernel = Literal["flash", "fa2", "fa3", "cudnn-2024", "unfused"]
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
# The memory-bound kernels between GEMMs: fused as Megatron-LM / Transformer Engine run them, or eager PyTorch (one
# kernel per tensor op, unfused loss: planner/runtime, HF transformers without torch.compile), costmodel.elementwise
Kernels = Literal["fused", "eager"]
KERNELS: tuple[str, ...] = get_args(Kernels)
# Context parallelism: a ring passing K/V blocks under the attention (overlapped), or K/V all-gathered before
# attention and dK/dV reduce-scattered after it (Llama 3's form: exposed, simpler to mask)
ContextParallel = Literal["ring", "allgather"]
RECOMPUTE_POLICIES: tuple[Recompute, ...] = get_args(Recompute)  # least recompute (most memory) first
AUTO_RECOMPUTE = "auto"  # a request's choice: the least recompute that fits its max context (planner.api)
RECOMPUTE_CHOICES = (AUTO_RECOMPUTE, *RECOMPUTE_POLICIES)  # what a request (--recompute) may ask for

DType = Literal["bf16", "fp16", "fp32"]  # a storage dtype (gradients)
# The training precision: a storage dtype, or fp8 (Transformer Engine's recipe, docs/COSTMODEL.md "fp8"): the
# linear layers' GEMMs in fp8, attention, activations, communication and the model weights in bf16
TrainDType = Literal["bf16", "fp16", "fp32", "fp8"]
TRAIN_DTYPES: tuple[str, ...] = get_args(TrainDType)  # what a request (--dtype) may ask for

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 2}  # bytes stored per element (fp8: bf16)
# fp8 scaling recipes as Megatron-LM's --fp8-recipe names them (Transformer Engine's DelayedScaling,
# Float8CurrentScaling, MXFP8BlockScaling); docs/COSTMODEL.md "fp8 training"
Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8"]
FP8_RECIPES: tuple[str, ...] = get_args(Fp8Recipe)  # what a request (--fp8-recipe) may ask for


def check_recompute(choice: str) -> None:
    """Raise SpecError unless `choice` is one of RECOMPUTE_CHOICES."""
    if choice not in RECOMPUTE_CHOICES:
        *head, last = RECOMPUTE_CHOICES
        raise SpecError(f"--recompute must be {', '.join(head)} or {last}, got {choice!r}")


@dataclass(frozen=True)
class TrainingSpec:
    """How the model is trained: precision, model parallelism, optimizer sharding, recompute."""

    dtype: TrainDType = "bf16"  # activation and parameter dtype (fp8: fp8 GEMMs, bf16 storage)
    tp: int = field(default=1, metadata=positive())  # tensor-parallel degree
    pp: int = field(default=1, metadata=positive())  # pipeline-parallel degree
    # 0: replicated optimizer; 1: distributed optimizer (ZeRO-1) over HDP ranks; 2: gradients sharded too
    # (ZeRO-2, FSDP's SHARD_GRAD_OP): the same reduce-scatter + all-gather per step, less memory; 3: parameters
    # sharded too (ZeRO-3, FSDP2's fully_shard): per-layer all-gathers and gradient reduce-scatters every round
    # (costmodel.zero, planner.simulate.rounds), pp = 1 only
    zero_stage: int = field(default=1, metadata=within(0, 3))
    recompute: Recompute = "none"  # activation recomputation policy
    grad_dtype: DType = "fp32"  # gradient accumulation / reduction dtype (Megatron: fp32 grads)
    # CUDA context + NCCL buffers per GPU (REFERENCE 2.1: 1-3 GB)
    ctx_overhead_bytes: int = field(default=3 * 2**30, metadata=at_least(0))
    # HBM lost to fragmentation (REFERENCE 2.1: 5-10%)
    frag_fraction: float = field(default=0.10, metadata=within(0, 0.5, hi_open=True))
    fused_loss: bool = True  # fused online-softmax cross-entropy: no full fp32 logits (ByteScale §7)
    # Megatron sequence parallelism with TP: norms, dropout and residuals run on s/t tokens per rank; without
    # it they run replicated on all s tokens (the TP collectives move the same bytes either way)
    sequence_parallel: bool = True
    attention_kernel: AttentionKernel = "flash"
    kernels: Kernels = "fused"  # elementwise kernels fused (Megatron) or eager PyTorch ops (meshplan's replay)
    cp: ContextParallel = "ring"
    # Megatron-core DDP's overlap_grad_reduce (default off there too): bucketed gradient reduce-scatter under
    # the backward, only the last bucket exposed
    overlap_grad_reduce: bool = False
    # Megatron-core DDP's overlap_param_gather (default off there too): the distributed optimizer's parameter
    # all-gather runs under the next step's forward, only its first bucket exposed
    overlap_param_gather: bool = False
    # Megatron-core's tp_comm_overlap (Transformer Engine userbuffers, default off there too): each TP all-gather
    # and reduce-scatter runs chunk by chunk under the GEMM it feeds or drains (docs/COSTMODEL.md "TP overlap")
    tp_comm_overlap: bool = False
    # fp8 scaling recipe; None: Transformer Engine's default for the GPU (costmodel.memory.fp8_recipe)
    fp8_recipe: Fp8Recipe | None = None
    # Megatron-LM's --fp8-param-gather (NeMo's fp8_params; Megatron-Bridge's recipes turn it on): the fp8 GEMMs'
    # weights live in fp8 with their transposed copy, no bf16 copy, and the distributed optimizer gathers them in fp8
    fp8_param_gather: bool = False
    # per-rank token capacity C override (else derived from memory)
    capacity_tokens: int | None = field(default=None, metadata=positive())
    # MoE expert parallelism (costmodel.moe): ep ranks hold E/ep experts each, every expert's columns split over
    # etp ranks. Folded into the TP group by default (etp None: etp = tp/ep, ep | tp), the only ranks that run in
    # lockstep under HDP; ep = 1: all experts on every TP rank, split over tp
    ep: int = field(default=1, metadata=positive())
    # Megatron-core's expert_tensor_parallel_size; given, the expert group of ep·etp ranks may span
    # expert_groups = ep·etp/tp TP groups of a stage (Megatron's EP drawn from DP): a layout whose DP ranks run
    # every micro-batch in lockstep (published runs, `meshplan validate`), which HDP plans refuse
    etp: int | None = field(default=None, metadata=positive())
    # token-routing imbalance: the busiest expert's tokens over the mean (1 = perfectly balanced); scales the
    # busiest rank's expert GEMMs, dispatched activations and all-to-all bytes
    moe_capacity_factor: float = field(default=1.0, metadata=at_least(1.0))
    moe_grouped_gemm: bool = False  # a rank's local experts in one grouped GEMM (else one GEMM per expert)

    # to_dict writes these only when set, so plans that do not use them stay as they were
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ("ep", "etp", "moe_capacity_factor", "moe_grouped_gemm", "kernels",
                                                "overlap_param_gather", "tp_comm_overlap", "fp8_recipe",
                                                "fp8_param_gather")

    def __post_init__(self) -> None:
        Reader("training", SpecError).check(self)
        if self.etp is None and self.ep > self.tp:
            raise SpecError(f"ep={self.ep} exceeds tp={self.tp}: expert parallelism is folded into the TP group, the "
                            "only ranks that run in lockstep under HDP (expert groups beyond it would span HDP ranks "
                            "that run different units); use --ep at most --tp, or raise --tp")
        if self.etp is None and self.tp % self.ep:
            raise SpecError(f"ep={self.ep} must divide tp={self.tp} (the TP group splits into ep expert groups of "
                            f"tp/ep ranks); use a divisor of {self.tp}")
        if self.etp is not None and self.ep == 1 and self.etp > self.tp:
            raise SpecError(f"etp={self.etp} over tp={self.tp} with ep=1: an expert group wider than the TP group "
                            "dispatches by all-to-all, ep > 1; raise ep or set etp at most tp")
        if self.etp is not None and (self.ep * self.etp) % self.tp:
            raise SpecError(f"ep={self.ep} x etp={self.etp} must be a multiple of tp={self.tp}: an expert group of "
                            "ep·etp ranks holds whole TP groups (Megatron-core's MoE parallel folding)")
        if self.fp8_recipe is not None and self.dtype != "fp8":
            raise SpecError(f"fp8_recipe {self.fp8_recipe!r} applies to dtype fp8 only (this run is {self.dtype}); "
                            "drop it or train in fp8")
        if self.fp8_param_gather and (self.dtype != "fp8" or self.zero_stage not in (1, 2)):
            raise SpecError("fp8_param_gather needs dtype fp8 and the distributed optimizer (zero_stage 1 or 2), which "
                            f"gathers the fp8 weights (this run: dtype {self.dtype}, zero_stage {self.zero_stage}); "
                            "drop it or train in fp8 with --zero 1")
        if self.tp_comm_overlap and self.tp > 1 and not self.sequence_parallel:
            raise SpecError("tp_comm_overlap needs sequence parallelism (Transformer Engine overlaps the SP "
                            "all-gathers and reduce-scatters; Megatron-core turns it off without SP); enable "
                            "sequence_parallel or drop tp_comm_overlap")
        if self.zero_stage == 3 and self.expert_groups > 1:
            raise SpecError(f"zero_stage 3 with an expert group over {self.expert_groups} TP groups (ep={self.ep}, "
                            f"etp={self.etp}) is not modelled; use --zero 1 or 2, or fold EP into TP (drop etp)")
        if self.zero_stage == 3 and self.pp > 1:
            raise SpecError(f"zero_stage 3 with pp={self.pp} is not modelled (per-layer gathers across pipeline "
                            "stages); use pp=1 with --zero 3, or --zero 1/2 with pipelining")

    @classmethod
    def from_dict(cls, d: Any, origin: str = "training") -> "TrainingSpec":
        """From a JSON object (a plan's meta.training); `origin` heads every error message."""
        return Reader(origin, SpecError).build(cls, d)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def expert_tp(self) -> int:
        """Ranks splitting one expert's columns: etp as given, else tp/ep (EP folded into the TP group)."""
        return self.etp if self.etp is not None else self.tp // self.ep

    @property
    def expert_ranks(self) -> int:
        """Ranks of one expert group, ep·etp: they hold all E experts between them."""
        return self.ep * self.expert_tp

    @property
    def expert_groups(self) -> int:
        """TP groups of a stage one expert group of ep·etp ranks spans (1: folded into the TP group)."""
        return self.expert_ranks // self.tp

    @property
    def loss_fused(self) -> bool:
        """Whether the loss runs fused over logit chunks: eager kernels (meshplan's replay) materialise every
        logit of a unit, whatever fused_loss says (an H200 replay: 114 GB peak for 32K tokens of a 128K vocabulary,
        where Megatron's layer and an 8K chunk priced 65 GB)."""
        return self.fused_loss and self.kernels != "eager"

    def check_against(self, model: ModelSpec, cluster: ClusterSpec) -> None:
        """Raise SpecError if the parallel layout does not fit the model or cluster."""
        if model.heads % self.tp or model.kv_heads % self.tp and self.tp % model.kv_heads:
            raise SpecError(f"tp={self.tp} must divide the {model.heads} query heads of {model.name} "
                            f"(and divide or be a multiple of its {model.kv_heads} KV heads)")
        if model.layers % self.pp:
            raise SpecError(f"pp={self.pp} must divide the {model.layers} layers of {model.name}")
        if not model.is_moe and (self.ep > 1 or self.moe_capacity_factor != 1.0 or self.moe_grouped_gemm):
            raise SpecError(f"{model.name} is dense (one MLP): --ep, --moe-capacity-factor and --moe-grouped-gemm "
                            "apply to MoE models only; leave them at their defaults")
        if model.experts % self.ep:
            raise SpecError(f"ep={self.ep} must divide the {model.experts} experts of {model.name}")
        if not model.is_moe and self.etp is not None:
            raise SpecError(f"{model.name} is dense (one MLP): etp applies to MoE models only; drop it")
        if self.ep > 1 and self.tp > 1 and not self.sequence_parallel:
            raise SpecError(f"ep={self.ep} needs sequence parallelism: the all-to-all dispatches each TP rank's s/tp "
                            "tokens (Megatron requires it with MoE and TP); enable sequence_parallel")
        mesh = self.mesh_on(cluster)
        if cluster.domain_gpus % self.expert_tp:
            raise SpecError(f"etp={self.expert_tp} must divide the {cluster.domain_gpus} GPUs of an NVLink domain (the "
                            "expert tensor-parallel collectives stay inside one); use a divisor of it")
        if mesh.hdp % self.expert_groups:
            raise SpecError(f"an expert group of ep={self.ep} x etp={self.expert_tp} ranks spans "
                            f"{self.expert_groups} TP groups, which must divide the {mesh.hdp} DP x CP ranks of a "
                            f"stage ({cluster.world_size} GPUs at tp={self.tp}, pp={self.pp}); change ep, etp or the "
                            "GPUs")

    def mesh_on(self, cluster: ClusterSpec) -> MeshLayout:
        """This layout on the cluster's GPUs; SpecError if TP or PP does not fit them."""
        from costmodel.mesh import MeshLayout

        return MeshLayout.of_world(cluster.world_size, self.tp, self.pp, cluster.domain_gpus)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in self.OPTIONAL_KEYS:
            if d[k] == getattr(TrainingSpec, k):
                del d[k]
        return d


@dataclass(frozen=True)
class Setup:
    """Everything the cost model needs besides the profile: model, cluster, training."""

    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec = field(default_factory=TrainingSpec)

    def __post_init__(self) -> None:
        self.training.check_against(self.model, self.cluster)

    @cached_property
    def mesh(self) -> MeshLayout:
        """Where each rank sits: tp × pp × hdp on the cluster's nodes."""
        return self.training.mesh_on(self.cluster)

    @property
    def hdp(self) -> int:
        """HDP ranks per pipeline stage: world / (tp * pp)."""
        return self.mesh.hdp
