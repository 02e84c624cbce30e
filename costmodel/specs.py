"""Typed, validated descriptions of what is trained (ModelSpec), where (ClusterSpec) and how
(TrainingSpec). Values only: no cost formulas live here (see flops.py, memory.py, timing.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class SpecError(ValueError):
    """A spec value is missing, out of range or inconsistent; the message says which and how to fix it."""


def _positive(name: str, value: float, owner: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise SpecError(f"{owner}: {name} must be a positive number, got {value!r}")


def _from_fields(cls, d: Any, what: str, derived: set[str]):
    """Build a spec dataclass from a dict: unknown or missing fields are one clear SpecError
    (derived fields that to_dict adds are accepted and ignored)."""
    if not isinstance(d, dict):
        raise SpecError(f"{what}: expected a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known - derived
    if unknown:
        raise SpecError(f"{what}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{what}: missing field(s) {missing}")
    return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (Llama / Mixtral / Qwen family: RMSNorm, RoPE, GQA, SwiGLU)."""

    name: str  # preset or file name
    layers: int  # decoder layers L
    hidden: int  # model width h
    heads: int  # query heads n_q
    kv_heads: int  # key/value heads n_kv (GQA groups)
    head_dim: int  # d_h; n_q * d_h need not equal h (it does for every preset)
    ffn: int  # SwiGLU inner width f (per expert for MoE)
    vocab: int  # vocabulary V
    tied_embeddings: bool = False  # input embedding shared with the LM head
    experts: int = 1  # MoE experts E (1 = dense)
    top_k: int = 1  # experts per token k
    qkv_bias: bool = False  # Qwen2-style bias on Q, K, V projections
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        owner = f"model {self.name!r}"
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "experts", "top_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"{owner}: {f} must be a positive integer, got {v!r}")
        if self.heads % self.kv_heads:
            raise SpecError(f"{owner}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.top_k > self.experts:
            raise SpecError(f"{owner}: top_k ({self.top_k}) cannot exceed experts ({self.experts})")

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

    # -- parameter counts ------------------------------------------------------------------
    def attention_params(self) -> int:
        """Q, K, V, O projections (+ QKV bias) of one layer."""
        qkv = self.hidden * (self.q_width + 2 * self.kv_width)
        bias = (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        return qkv + bias + self.q_width * self.hidden

    def expert_params(self) -> int:
        """One SwiGLU MLP (gate, up, down)."""
        return 3 * self.hidden * self.ffn

    def layer_params(self, active: bool = False) -> int:
        """One decoder layer: attention, MLP (all experts, or top_k when active), router, 2 norms."""
        n_mlp = self.top_k if active else self.experts
        router = self.hidden * self.experts if self.is_moe else 0
        return self.attention_params() + n_mlp * self.expert_params() + router + 2 * self.hidden

    def embedding_params(self) -> int:
        """Input embedding plus LM head (once when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        """Total parameters."""
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden

    @property
    def active_parameters(self) -> int:
        """Parameters touched per token (top_k experts)."""
        return self.layers * self.layer_params(active=True) + self.embedding_params() + self.hidden

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parameters"] = self.parameters
        d["active_parameters"] = self.active_parameters
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return _from_fields(cls, d, "model spec", derived={"parameters", "active_parameters"})

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelSpec":
        """Read a HuggingFace `config.json` (Llama, Mistral, Mixtral, Qwen2 architectures)."""
        from profiles.table import read_json

        p = Path(path)
        cfg = read_json(p, "HuggingFace config", SpecError)
        if not isinstance(cfg, dict):
            raise SpecError(f"{p}: expected a JSON object")
        need = ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in need if k not in cfg]
        if missing:
            raise SpecError(f"{p}: not a decoder config, missing {missing}")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        arch = ",".join(cfg.get("architectures") or [cfg.get("model_type", "?")])
        experts = int(cfg.get("num_local_experts", cfg.get("num_experts", 1)) or 1)
        return cls(
            name=p.parent.name if p.name == "config.json" else p.stem,
            layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn=int(cfg.get("moe_intermediate_size") if experts > 1 and cfg.get("moe_intermediate_size")
                    else cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            experts=experts,
            top_k=int(cfg.get("num_experts_per_tok", 1) or 1) if experts > 1 else 1,
            qkv_bias=bool(cfg.get("attention_bias", False)) or "Qwen2" in arch,
            source=f"HuggingFace config {p} ({arch})",
        )


@dataclass(frozen=True)
class ClusterSpec:
    """Homogeneous nodes of GPUs: NVLink-class links inside a node, a NIC per GPU between nodes."""

    name: str  # preset name
    gpu: str  # device name, e.g. "H100 SXM"
    nodes: int  # node count
    gpus_per_node: int  # GPUs (ranks) per node
    gpu_memory_bytes: int  # HBM per GPU
    host_memory_bytes: int  # host DRAM per node
    intra_node_bw_bytes_per_s: float  # scale-up bandwidth per GPU per direction [spec]
    inter_node_bw_bytes_per_s: float  # scale-out bandwidth per GPU per direction (NIC rate)
    host_link_bw_bytes_per_s: float  # GPU<->host bandwidth per GPU (PCIe), per direction
    profile: str  # default profile name in profiles/data
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        owner = f"cluster {self.name!r}"
        for f in ("nodes", "gpus_per_node"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"{owner}: {f} must be a positive integer, got {v!r}")
        for f in ("gpu_memory_bytes", "host_memory_bytes", "intra_node_bw_bytes_per_s",
                  "inter_node_bw_bytes_per_s", "host_link_bw_bytes_per_s"):
            _positive(f, getattr(self, f), owner)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def with_gpus(self, gpus: int) -> "ClusterSpec":
        """The same cluster resized to `gpus` GPUs (whole nodes, or one partial node)."""
        if not isinstance(gpus, int) or gpus <= 0:
            raise SpecError(f"cluster {self.name!r}: GPU count must be a positive integer, got {gpus!r}")
        if gpus <= self.gpus_per_node:
            return dataclasses.replace(self, nodes=1, gpus_per_node=gpus)
        if gpus % self.gpus_per_node:
            raise SpecError(f"cluster {self.name!r}: {gpus} GPUs is not a whole number of "
                            f"{self.gpus_per_node}-GPU nodes; use a multiple of {self.gpus_per_node}")
        return dataclasses.replace(self, nodes=gpus // self.gpus_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["world_size"] = self.world_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClusterSpec":
        return _from_fields(cls, d, "cluster spec", derived={"world_size"})


Recompute = Literal["none", "selective", "full"]
DType = Literal["bf16", "fp16", "fp32"]

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class TrainingSpec:
    """How the model is trained: precision, model parallelism, optimizer sharding, recompute."""

    dtype: DType = "bf16"  # activation and parameter dtype
    tp: int = 1  # tensor-parallel degree (with sequence parallelism)
    pp: int = 1  # pipeline-parallel degree
    zero_stage: int = 1  # 0: replicated optimizer; 1: distributed optimizer (ZeRO-1) over HDP ranks
    recompute: Recompute = "none"  # activation recomputation policy
    grad_dtype: DType = "fp32"  # gradient accumulation / reduction dtype (Megatron: fp32 grads)
    ctx_overhead_bytes: int = 3 * 2**30  # CUDA context + NCCL buffers per GPU (REFERENCE 2.1: 1-3 GB)
    frag_fraction: float = 0.10  # HBM lost to fragmentation (REFERENCE 2.1: 5-10%)
    fused_loss: bool = True  # fused online-softmax cross-entropy: no full fp32 logits (ByteScale §7)
    capacity_tokens: int | None = None  # per-rank token capacity C override (else derived from memory)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES or self.grad_dtype not in DTYPE_BYTES:
            raise SpecError(f"training: dtype must be one of {sorted(DTYPE_BYTES)}, "
                            f"got {self.dtype!r}/{self.grad_dtype!r}")
        for f in ("tp", "pp"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"training: {f} must be a positive integer, got {v!r}")
        if self.zero_stage not in (0, 1):
            raise SpecError(f"training: zero_stage must be 0 or 1 (distributed optimizer), got {self.zero_stage!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise SpecError(f"training: recompute must be none, selective or full, got {self.recompute!r}")
        if not 0 <= self.frag_fraction < 0.5:
            raise SpecError(f"training: frag_fraction must be in [0, 0.5), got {self.frag_fraction!r}")
        if self.ctx_overhead_bytes < 0:
            raise SpecError("training: ctx_overhead_bytes must be >= 0")
        if self.capacity_tokens is not None and self.capacity_tokens <= 0:
            raise SpecError(f"training: capacity_tokens must be positive, got {self.capacity_tokens!r}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def check_against(self, model: ModelSpec, cluster: ClusterSpec) -> None:
        """Raise SpecError if the parallel layout does not fit the model or cluster."""
        if model.heads % self.tp or model.kv_heads % self.tp and self.tp % model.kv_heads:
            raise SpecError(f"tp={self.tp} must divide the {model.heads} query heads of {model.name} "
                            f"(and divide or be a multiple of its {model.kv_heads} KV heads)")
        if self.tp > cluster.gpus_per_node:
            raise SpecError(f"tp={self.tp} exceeds the {cluster.gpus_per_node} GPUs of a node; "
                            "TP must stay inside one NVLink domain")
        if cluster.gpus_per_node % self.tp:
            raise SpecError(f"tp={self.tp} must divide the {cluster.gpus_per_node} GPUs per node")
        if model.layers % self.pp:
            raise SpecError(f"pp={self.pp} must divide the {model.layers} layers of {model.name}")
        if cluster.world_size % (self.tp * self.pp):
            raise SpecError(f"world size {cluster.world_size} is not divisible by tp*pp = {self.tp * self.pp}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Setup:
    """Everything the cost model needs besides the profile: model, cluster, training."""

    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec = field(default_factory=TrainingSpec)

    def __post_init__(self) -> None:
        self.training.check_against(self.model, self.cluster)

    @property
    def hdp(self) -> int:
        """HDP ranks per pipeline stage: world / (tp * pp)."""
        return self.cluster.world_size // (self.training.tp * self.training.pp)

    @property
    def hdp_per_node(self) -> int:
        """HDP ranks (TP groups) per node."""
        return max(1, self.cluster.gpus_per_node // self.training.tp)

    def hdp_node(self, hdp_rank: int) -> int:
        """Node index of an HDP rank (global rank = stage*hdp*tp + hdp_rank*tp + tp_rank)."""
        return (hdp_rank * self.training.tp) // self.cluster.gpus_per_node
