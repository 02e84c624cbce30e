"""Typed, validated descriptions of what is trained (ModelSpec), where (ClusterSpec) and how
(TrainingSpec). Values only: no cost formulas live here (see flops.py, memory.py, timing.py)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
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
    # node-limited routing (DeepSeek-V3's n_group / topk_group): the experts fall in expert_groups equal groups and
    # each token's top_k lie in at most groups_per_token of them; 1 and 1: no such limit
    expert_groups: int = field(default=1, metadata=positive())
    groups_per_token: int = field(default=1, metadata=positive())
    # MoE models whose MLP is dense in some layers (DeepSeek's first_k_dense_replace, Qwen-MoE's mlp_only_layers
    # and decoder_sparse_step): how many layers run a dense MLP of width dense_ffn instead of the experts, and
    # whether they are the first ones (DeepSeek, GLM: with pp > 1 they sit in the first pipeline stage, the others
    # all MoE; else spread, every stage the mean layer: Setup.stage_model)
    dense_layers: int = field(default=0, metadata=at_least(0))
    dense_ffn: int = field(default=0, metadata=at_least(0))  # the dense layers' MLP inner width; 0: none
    dense_layers_first: bool = True
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
    # chunked attention (Llama 4): in a chunked layer the sequence is cut into chunks of `attention_chunk` tokens and
    # each query attends causally within its own chunk; 0: none. A model has a window or chunks, not both
    attention_chunk: int = field(default=0, metadata=at_least(0))
    full_attention_layers: int = field(default=0, metadata=at_least(0))  # layers that keep full attention
    # multi-head latent attention (DeepSeek-V2 and V3, Kimi K2; Megatron-core's MLASelfAttention): each head's K
    # and V are projected up from one latent of kv_lora_rank per token (kv_heads = heads), Q from a latent of
    # q_lora_rank (0: straight from h); head_dim is a Q/K head's width, rope_head_dim of it the decoupled RoPE part
    # (one key part for all heads), v_head_dim a V head's width. kv_lora_rank 0: GQA (the others 0 too)
    kv_lora_rank: int = field(default=0, metadata=at_least(0))
    q_lora_rank: int = field(default=0, metadata=at_least(0))
    rope_head_dim: int = field(default=0, metadata=at_least(0))
    v_head_dim: int = field(default=0, metadata=at_least(0))
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        owner = f"model {self.name!r}"
        Reader(owner, SpecError).check(self)
        _check_multiple(owner, ("heads", self.heads), ("kv_heads", self.kv_heads))
        _check_at_most(owner, ("top_k", self.top_k), ("experts", self.experts))
        if self.expert_groups > 1:
            _check_multiple(owner, ("experts", self.experts), ("expert_groups", self.expert_groups))
            _check_at_most(owner, ("groups_per_token", self.groups_per_token), ("expert_groups", self.expert_groups))
            _check_at_most(owner, ("top_k", self.top_k), ("groups_per_token x experts / expert_groups",
                                                          self.groups_per_token * self.experts // self.expert_groups))
        elif self.groups_per_token != 1:
            raise SpecError(f"{owner}: groups_per_token ({self.groups_per_token}) needs expert_groups > 1")
        if self.shared_expert_ffn and not self.is_moe:
            raise SpecError(f"{owner}: shared_expert_ffn ({self.shared_expert_ffn}) needs routed experts (experts > "
                            "1); a dense model's MLP is ffn")
        if (self.position == "learned") != (self.max_positions > 0):
            raise SpecError(f"{owner}: max_positions ({self.max_positions}) must be > 0 exactly when position is "
                            f"learned (position is {self.position!r})")
        if self.sliding_window and self.attention_chunk:
            raise SpecError(f"{owner}: sliding_window ({self.sliding_window}) and attention_chunk "
                            f"({self.attention_chunk}) both limit the local layers' keys; give one of them")
        if self.full_attention_layers and not self.local_attention:
            raise SpecError(f"{owner}: full_attention_layers ({self.full_attention_layers}) needs a sliding_window "
                            "or attention_chunk (the other layers' limit); set one or drop full_attention_layers")
        _check_at_most(owner, ("full_attention_layers", self.full_attention_layers), ("layers", self.layers))
        self._check_latent_attention(owner)
        if (self.dense_layers > 0) != (self.dense_ffn > 0):
            raise SpecError(f"{owner}: dense_layers ({self.dense_layers}) and dense_ffn ({self.dense_ffn}) go "
                            "together: the count of layers with a dense MLP and that MLP's width")
        if self.dense_layers and not self.is_moe:
            raise SpecError(f"{owner}: dense_layers ({self.dense_layers}) needs routed experts (experts > 1); a "
                            "dense model's MLP is ffn in every layer")
        if self.dense_layers >= self.layers:
            raise SpecError(f"{owner}: dense_layers ({self.dense_layers}) must be fewer than layers "
                            f"({self.layers}); a model with no MoE layer is dense (experts 1, ffn {self.dense_ffn})")

    def _check_latent_attention(self, owner: str) -> None:
        if not self.is_mla:
            extra = [f"{k} ({getattr(self, k)})" for k in ("q_lora_rank", "rope_head_dim", "v_head_dim")
                     if getattr(self, k)]
            if extra:
                raise SpecError(f"{owner}: {', '.join(extra)} describe multi-head latent attention, which needs "
                                "kv_lora_rank > 0")
            return
        if self.kv_heads != self.heads:
            raise SpecError(f"{owner}: multi-head latent attention projects K and V for every head: kv_heads "
                            f"({self.kv_heads}) must equal heads ({self.heads})")
        if not 0 < self.rope_head_dim < self.head_dim or not self.v_head_dim:
            raise SpecError(f"{owner}: multi-head latent attention needs 0 < rope_head_dim ({self.rope_head_dim}) < "
                            f"head_dim ({self.head_dim}) and v_head_dim ({self.v_head_dim}) > 0")
        if self.qkv_bias or self.linear_bias or self.position != "rope":
            raise SpecError(f"{owner}: multi-head latent attention is modelled without biases and with RoPE "
                            "(DeepSeek's); drop qkv_bias / linear_bias or kv_lora_rank")

    # -- derived widths --------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (kv_lora_rank > 0)."""
        return self.kv_lora_rank > 0

    @property
    def q_width(self) -> int:
        """n_q * d_h: width of the query projection output."""
        return self.heads * self.head_dim

    @property
    def value_head_dim(self) -> int:
        """A V head's width: v_head_dim under MLA, else head_dim."""
        return self.v_head_dim or self.head_dim

    @property
    def k_width(self) -> int:
        """n_kv * d_h: width of K (MLA: every head's, n_kv = n_q)."""
        return self.kv_heads * self.head_dim

    @property
    def v_width(self) -> int:
        """Width of V: n_kv * d_v."""
        return self.kv_heads * self.value_head_dim

    @property
    def kv_width(self) -> float:
        """h_kv: width of K (and of V); the mean of the two where they differ (MLA), so that 2·h_kv is what K and V
        hold together."""
        return self.k_width if self.k_width == self.v_width else (self.k_width + self.v_width) / 2

    @property
    def attn_out_width(self) -> int:
        """Width of the attention core's output, the output projection's input: n_q * d_v (= q_width without MLA)."""
        return self.heads * self.value_head_dim

    @property
    def attn_head_dim(self) -> float:
        """The head width the attention core's FLOPs go by: the mean of Q/K's and V's (QKᵀ at d_h, PV at d_v)."""
        return (self.head_dim + self.value_head_dim) / 2

    @property
    def attn_gather_width(self) -> int:
        """Per token, the input side of the attention's TP collectives: what sequence parallelism all-gathers before
        the column-parallel projections (without SP: the width of their input gradient's all-reduce). The layer
        input h; MLA's latents, q_lora_rank (h without one) and kv_lora_rank plus the RoPE key part, its down
        projections running before the collective [Megatron-core MLASelfAttention]."""
        if not self.is_mla:
            return self.hidden
        return (self.q_lora_rank or self.hidden) + self.kv_lora_rank + self.rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    @property
    def moe_fraction(self) -> float:
        """Share of the layers with routed experts (0 for a dense model)."""
        return (self.layers - self.dense_layers) / self.layers if self.is_moe else 0.0

    def layer_kinds(self) -> tuple[tuple[float, "ModelSpec"], ...]:
        """The model's layers by kind, (share of the layers, a model of that layer alone): ((1, self),) when every
        layer is alike; else (MoE share, the MoE layer) and (dense share, the dense layer), each a ModelSpec without
        dense layers. A per-layer cost of the model is the shares' mean of the kinds' (mean_over_layers)."""
        if not self.dense_layers:
            return ((1.0, self),)
        moe = dataclasses.replace(self, dense_layers=0, dense_ffn=0)
        dense = dataclasses.replace(moe, experts=1, top_k=1, ffn=self.dense_ffn, shared_expert_ffn=0, expert_groups=1,
                                    groups_per_token=1)
        return (self.moe_fraction, moe), (1.0 - self.moe_fraction, dense)

    @property
    def mlp_width_per_token(self) -> float:
        """MLP width one token's work spans in a layer: its top-k experts' (the dense MLP's) and the shared
        expert's; the mean over the layers where some are dense."""
        if self.dense_layers:
            return mean_over_layers(lambda m: m.mlp_width_per_token)(self)
        return self.ffn * self.top_k + self.shared_expert_ffn

    def routed_expert_params(self) -> float:
        """Parameters of one layer's routed experts, the mean over the layers (0 for a dense model): what expert
        parallelism shards."""
        return self.moe_fraction * self.experts * self.expert_params()

    @property
    def local_attention(self) -> int:
        """The local layers' limit on keys: the sliding window or the attention chunk (0: full attention)."""
        return self.sliding_window or self.attention_chunk

    @property
    def windowed_fraction(self) -> float:
        """Share of the layers with local attention, windowed or chunked (0 without either)."""
        return (self.layers - self.full_attention_layers) / self.layers if self.local_attention else 0.0

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

    @property
    def attention_gemms(self) -> int:
        """GEMMs of one layer's attention projections: QKV and O; MLA's q_down and q_up (or q), kv_down, kv_up, O."""
        return ((3 if self.q_lora_rank else 2) + 2) if self.is_mla else 2

    def attention_gemm_params(self) -> int:
        """Weights of one layer's attention projections: Q, K, V and O; MLA's down projections to the latents
        (Q's, and K/V's with the RoPE key part), up projections to the heads' Q and K/V, and O."""
        h, out = self.hidden, self.attn_out_width * self.hidden
        if not self.is_mla:
            return h * (self.q_width + 2 * self.k_width) + out
        q = (h + self.q_width) * self.q_lora_rank if self.q_lora_rank else h * self.q_width
        kv_up = self.kv_lora_rank * self.heads * (self.head_dim - self.rope_head_dim + self.value_head_dim)
        return q + h * (self.kv_lora_rank + self.rope_head_dim) + kv_up + out

    def attention_params(self) -> int:
        """The attention's projections (+ QKV bias, + output bias with linear_bias; MLA: its latents' RMSNorms) of
        one layer."""
        bias = (self.q_width + 2 * self.kv_width) if self.qkv_bias or self.linear_bias else 0
        out_bias = self.hidden if self.linear_bias else 0
        latent_norms = self.q_lora_rank + self.kv_lora_rank
        return self.attention_gemm_params() + bias + out_bias + latent_norms

    def expert_params(self, ffn: int | None = None) -> int:
        """One MLP of width `ffn` (default: an expert's, the dense MLP's): its matrices (+ the up and down biases
        with linear_bias)."""
        f = self.ffn if ffn is None else ffn
        bias = (f * (self.mlp_matrices - 1) + self.hidden) if self.linear_bias and f else 0
        return self.mlp_matrices * self.hidden * f + bias

    def layer_params(self, active: bool = False) -> float:
        """One decoder layer: attention, MLP (all experts, or top_k when active; the shared expert), router, 2
        norms; the mean over the layers where some are dense."""
        if self.dense_layers:
            return mean_over_layers(lambda m: m.layer_params(active))(self)
        n_mlp = self.top_k if active else self.experts
        router = self.hidden * self.experts if self.is_moe else 0
        shared = self.expert_params(self.shared_expert_ffn)
        return self.attention_params() + n_mlp * self.expert_params() + shared + router + 2 * self.norm_params

    def mtp_extra_params(self) -> int:
        """One multi-token-prediction depth beside its decoder layer (Megatron-core's MultiTokenPredictionLayer):
        the norms of the hidden state and of the embedding, the 2h → h projection of the two, and its final norm
        (the embedding and the LM head are the model's own)."""
        return 2 * self.hidden * self.hidden + 3 * self.norm_params

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
        return round(self.layers * self.layer_params()) + self.input_embedding_params() + self.head_params()

    @property
    def active_parameters(self) -> int:
        """Parameters touched per token (top_k experts)."""
        return round(self.layers * self.layer_params(active=True)) + self.input_embedding_params() + self.head_params()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.expert_groups == 1:  # no node-limited routing: written only where a model has it
            del d["expert_groups"], d["groups_per_token"]
        d["parameters"] = self.parameters
        d["active_parameters"] = self.active_parameters
        return d

    @classmethod
    def from_dict(cls, d: Any, origin: str = "model spec") -> "ModelSpec":
        """From a spec JSON object; `origin` (the file) heads every error message."""
        return Reader(origin, SpecError).build(cls, d)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelSpec":
        """Read a HuggingFace `config.json` (Llama, Mistral, Mixtral, Qwen2/3 and their MoE, GPT-OSS, Gemma,
        DeepSeek-V2/V3 with latent attention, GLM-4.5 architectures)."""
        from profiles.table import read_json

        p = Path(path)
        cfg = HFConfig.from_dict(read_json(p, "HuggingFace config", SpecError), str(p))
        return cfg.model_spec(name=p.parent.name if p.name == "config.json" else p.stem,
                              source=f"HuggingFace config {p} ({cfg.architecture})")


def mean_over_layers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A per-layer cost function of (model, ...) for models whose layers differ (ModelSpec.layer_kinds): the mean
    of its value (a number, an array or a tuple of them) over the kinds, by their shares; a uniform model's own.
    Exact for what is linear in the layers (FLOPs, parameters, bytes, times summed over the layers)."""
    @functools.wraps(fn)
    def mean(model: ModelSpec, *args: Any, **kwargs: Any) -> Any:
        kinds = model.layer_kinds()
        if len(kinds) == 1:
            return fn(model, *args, **kwargs)
        values = [(w, fn(kind, *args, **kwargs)) for w, kind in kinds]
        if isinstance(values[0][1], tuple):
            return tuple(sum(w * v[i] for w, v in values) for i in range(len(values[0][1])))
        return sum(w * v for w, v in values)
    return mean


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
    n_routed_experts: int | None = field(default=None, metadata=at_least(0))  # DeepSeek / GLM-4.5 spelling
    num_experts_per_tok: int | None = field(default=None, metadata=positive())
    moe_intermediate_size: int | None = field(default=None, metadata=positive())  # per-expert width
    shared_expert_intermediate_size: int | None = field(default=None, metadata=at_least(0))  # Qwen2-MoE
    n_shared_experts: int | None = field(default=None, metadata=at_least(0))  # DeepSeek: of moe_intermediate_size
    n_group: int | None = field(default=None, metadata=positive())  # DeepSeek-V3: node-limited routing's groups
    topk_group: int | None = field(default=None, metadata=positive())  # and the groups a token's experts lie in
    # which layers have experts, the others a dense MLP of intermediate_size: DeepSeek's and GLM-4.5's from
    # first_k_dense_replace on, every moe_layer_freq-th; Qwen-MoE's every decoder_sparse_step-th (counting from 1)
    # outside mlp_only_layers
    first_k_dense_replace: int | None = field(default=None, metadata=at_least(0))
    moe_layer_freq: int | None = field(default=None, metadata=positive())
    decoder_sparse_step: int | None = field(default=None, metadata=positive())
    mlp_only_layers: list[int] | None = None
    # Llama 4: experts in every interleave_moe_layer_step-th layer (or the moe_layers listed), a shared expert of
    # intermediate_size beside them, the other layers a dense MLP of intermediate_size_mlp
    interleave_moe_layer_step: int | None = field(default=None, metadata=positive())
    moe_layers: list[int] | None = None
    intermediate_size_mlp: int | None = field(default=None, metadata=positive())
    # Llama 4's chunked attention: chunks of attention_chunk_size in the RoPE layers; the NoPE ones (no_rope_layers
    # 0, by default every no_rope_layer_interval-th; or layer_types "full_attention") attend over the whole sequence
    attention_chunk_size: int | None = field(default=None, metadata=positive())
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int | None = field(default=None, metadata=positive())
    # multi-head latent attention (DeepSeek-V2/V3, Kimi K2): a Q/K head is qk_nope_head_dim + qk_rope_head_dim wide
    kv_lora_rank: int | None = field(default=None, metadata=at_least(0))
    q_lora_rank: int | None = field(default=None, metadata=at_least(0))  # None: Q straight from h (V2-Lite)
    qk_nope_head_dim: int | None = field(default=None, metadata=at_least(0))
    qk_rope_head_dim: int | None = field(default=None, metadata=at_least(0))
    v_head_dim: int | None = field(default=None, metadata=at_least(0))
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
        mla = {"qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
               "v_head_dim": self.v_head_dim}
        if self.kv_lora_rank and not all(mla.values()):
            raise SpecError(f"multi-head latent attention (kv_lora_rank {self.kv_lora_rank}) needs "
                            f"{[k for k, v in mla.items() if not v]}")
        if self.kv_lora_rank and self.attention_bias:
            raise SpecError("attention_bias with multi-head latent attention (kv_lora_rank) is not modelled")
        if self.head_dim is None and not self.kv_lora_rank:
            _check_multiple("", ("hidden_size", self.hidden_size), ("num_attention_heads", self.num_attention_heads),
                            hint="; give head_dim if the heads are not hidden_size / num_attention_heads wide")
        if self.num_key_value_heads is not None:
            _check_multiple("", ("num_attention_heads", self.num_attention_heads),
                            ("num_key_value_heads", self.num_key_value_heads))
        if self.experts > 1 and self.num_experts_per_tok is not None:
            spelling = next(k for k in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(self, k))
            _check_at_most("", ("num_experts_per_tok", self.num_experts_per_tok), (spelling, self.experts))

    @classmethod
    def from_dict(cls, d: Any, origin: str) -> "HFConfig":
        if isinstance(d, dict) and "num_hidden_layers" not in d and isinstance(d.get("text_config"), dict):
            d = {"architectures": d.get("architectures"), **d["text_config"]}  # a multimodal model's language model
        need = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in need if k not in d] if isinstance(d, dict) else []
        if missing:
            raise SpecError(f"{origin}: not a decoder config, missing {missing}")
        kind = d.get("model_type") or ""
        if "sliding_window" not in d and (kind == "mistral" or kind.startswith("qwen") and d.get("use_sliding_window")):
            d = {**d, "sliding_window": 4096}  # transformers' MistralConfig and Qwen2Config default
        if kind.startswith("llama4") and "attention_chunk_size" not in d:
            d = {**d, "attention_chunk_size": 8192}  # transformers' Llama4TextConfig default (null: no chunks)
        return Reader(origin, SpecError).build(cls, d, ignore_unknown=True)

    @property
    def experts(self) -> int:
        n = next((x for x in (self.num_local_experts, self.num_experts, self.n_routed_experts) if x is not None), 0)
        return n or 1

    @property
    def is_llama4(self) -> bool:
        return (self.model_type or "").startswith("llama4")

    def dense_layer_indices(self) -> list[int]:
        """Layers with a dense MLP where others have routed experts, by the family's rule (the fields' comments);
        every layer for a dense model."""
        if self.experts <= 1:
            return list(range(self.num_hidden_layers))
        if self.is_llama4:  # every interleave_moe_layer_step-th layer, or those moe_layers lists
            k = self.interleave_moe_layer_step or 1
            moe = set(self.moe_layers if self.moe_layers is not None else range(k - 1, self.num_hidden_layers, k))
            return [i for i in range(self.num_hidden_layers) if i not in moe]
        first, freq = self.first_k_dense_replace or 0, self.moe_layer_freq or 1
        step, dense = self.decoder_sparse_step or 1, set(self.mlp_only_layers or ())
        return [i for i in range(self.num_hidden_layers)
                if not (i >= first and i % freq == 0 and (i + 1) % step == 0 and i not in dense)]

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

    def dense_width(self, expert: bool) -> int:
        """An expert's width (`expert`), else a dense MLP's: intermediate_size, but Llama 4's dense layers run
        intermediate_size_mlp."""
        return self.intermediate_size if expert else (self.intermediate_size_mlp or self.intermediate_size)

    def attention_chunking(self) -> tuple[int, int]:
        """(attention_chunk, full_attention_layers) of the ModelSpec; (0, 0): no chunked attention. Llama 4's NoPE
        layers attend over the whole sequence, its RoPE layers within chunks (transformers' Llama4TextConfig)."""
        if not self.attention_chunk_size:
            return 0, 0
        layers = self.num_hidden_layers
        if self.layer_types is not None:
            full = sum(t == "full_attention" for t in self.layer_types)
        elif self.no_rope_layers:  # 1: the layer uses RoPE (chunked); empty: the default, as transformers reads it
            full = sum(not x for x in self.no_rope_layers[:layers])
        else:
            full = layers // (self.no_rope_layer_interval or 4)
        return (0, 0) if full >= layers else (self.attention_chunk_size, full)

    def shared_expert_width(self) -> int:
        """A shared expert's width: Qwen2-MoE's, DeepSeek's n_shared_experts of moe_intermediate_size (one MLP), or
        Llama 4's one of intermediate_size."""
        if self.is_llama4:
            return self.intermediate_size
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return (self.n_shared_experts or 0) * (self.moe_intermediate_size or self.intermediate_size)

    def latent_attention(self) -> dict[str, int]:
        """The ModelSpec's MLA fields ({} without kv_lora_rank): a Q/K head of qk_nope + qk_rope, every head its K and
        V (kv_heads = heads)."""
        if not self.kv_lora_rank or not self.qk_nope_head_dim or not self.qk_rope_head_dim or not self.v_head_dim:
            return {}  # __post_init__ refused a partial set
        return dict(kv_lora_rank=self.kv_lora_rank, q_lora_rank=self.q_lora_rank or 0,
                    kv_heads=self.num_attention_heads, head_dim=self.qk_nope_head_dim + self.qk_rope_head_dim,
                    rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim)

    def model_spec(self, name: str, source: str) -> ModelSpec:
        dense = self.dense_layer_indices()
        moe = len(dense) < self.num_hidden_layers
        dense_layers = len(dense) if moe else 0
        window, full_layers = self.attention_window()
        chunk, chunk_full = self.attention_chunking()
        heads = dict(kv_heads=self.num_key_value_heads or self.num_attention_heads,
                     head_dim=self.head_dim or self.hidden_size // self.num_attention_heads)
        return ModelSpec(
            name=name, layers=self.num_hidden_layers, hidden=self.hidden_size, heads=self.num_attention_heads,
            **{**heads, **self.latent_attention()},
            ffn=self.moe_intermediate_size if moe and self.moe_intermediate_size else self.dense_width(moe),
            vocab=self.vocab_size, tied_embeddings=self.tie_word_embeddings, experts=self.experts if moe else 1,
            top_k=(self.num_experts_per_tok or 1) if moe else 1,
            shared_expert_ffn=self.shared_expert_width() if moe else 0,
            **({"expert_groups": self.n_group, "groups_per_token": self.topk_group or 1}
               if moe and (self.n_group or 1) > 1 else {}),
            dense_layers=dense_layers,
            dense_ffn=self.dense_width(False) if dense_layers else 0,
            dense_layers_first=dense == list(range(len(dense))),
            qkv_bias=self.attention_bias or "Qwen2" in self.architecture,
            sliding_window=window, attention_chunk=chunk, full_attention_layers=full_layers or chunk_full,
            source=source)


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
# Megatron-core's selective recompute by module (TransformerConfig.recompute_modules, --recompute-modules; megatron-core
# 0.14-0.16; costmodel.recompute prices each): what a `selective` run replays instead of meshplan's own selective
RecomputeModule = Literal["core_attn", "layernorm", "mlp", "moe_act", "moe", "shared_experts", "mla_up_proj"]
RECOMPUTE_MODULES: tuple[str, ...] = get_args(RecomputeModule)
# flash: the profile's fused attention as its table holds it; a named generation (fa1, fa1-triton, fa2, fa3,
# cudnn-2024): that kernel at its published rate over the table's (Profile.attention_kernel_time_x; analytic profiles;
# fa1 is FlashAttention v1, fa1-triton its Triton port as MPT ran it); unfused: materialised scores (QKᵀ, softmax, PV)
AttentionKernel = Literal["flash", "fa1", "fa1-triton", "fa2", "fa3", "cudnn-2024", "unfused"]
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
# The memory-bound kernels between GEMMs: fused as Megatron-LM / Transformer Engine run them, or eager PyTorch (one
# kernel per tensor op, unfused loss: planner/runtime, HF transformers without torch.compile), costmodel.elementwise
Kernels = Literal["fused", "eager"]
KERNELS: tuple[str, ...] = get_args(Kernels)
# The cross-entropy over the vocabulary-parallel logits (docs/COSTMODEL.md "Memory-bound kernels", "Logits"):
# online, an online-softmax loss over 8K-token chunks that never holds the whole logits (ByteScale §7); in_place,
# a fused loss that keeps the logits in their dtype and writes their gradient into them (Transformer Engine's
# parallel_cross_entropy, Megatron's cross_entropy_fusion_impl "te", priced as it runs; apex's xentropy with
# inplace_backward holds the same memory, its forward reading b less);
# fp32, Megatron's vocab_parallel_cross_entropy, which keeps fp32 logits and their softmax
LossKernel = Literal["online", "in_place", "fp32"]
LOSS_KERNELS: tuple[str, ...] = get_args(LossKernel)
# How each micro-batch's weight gradients reach the step's accumulator (docs/COSTMODEL.md "Gradient accumulation"):
# fused, the weight-gradient GEMM accumulates into it (Megatron's gradient_accumulation_fusion); add, a separate
# in-place add of the GEMM's output (Megatron's DDP hook without the fusion, `main_grad.add_(grad)`); cast_add, the
# gradient cast to the accumulator's dtype first, then added (DeepSpeed's BF16_Optimizer; torch autograd under
# autocast over fp32 parameters)
GradAccumulation = Literal["fused", "add", "cast_add"]
# Megatron-core's MoE token dispatcher over EP (ep > 1): "alltoall" (NCCL all-to-alls, every token's copy sent on
# its own), "flex" with DeepEP (a token crosses the network once per node it goes to, then NVLink to its experts) or
# "hybridep", the flex dispatcher with HybridEP's backend (moe_flex_dispatcher_backend hybridep: the same path over
# TMA and IBGDA with fewer SMs, and receive buffers sized for the worst case)
MoeDispatcher = Literal["alltoall", "flex", "hybridep"]
MOE_DISPATCHERS: tuple[str, ...] = get_args(MoeDispatcher)
GRAD_ACCUMULATIONS: tuple[str, ...] = get_args(GradAccumulation)
# Adam's moments (exp_avg, exp_avg_sq) as the optimizer keeps them: fp32 (Megatron-core's default), or bf16 under
# Megatron-core's precision-aware optimizer (--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype
# bf16, Transformer Engine's FusedAdam), which also keeps the fp32 master weights as 16-bit remainders beside the bf16
# parameters (store_param_remainders, its default): 6 B a parameter for master, m and v instead of 12
OptimizerMoments = Literal["fp32", "bf16"]
OPTIMIZER_MOMENTS: tuple[str, ...] = get_args(OptimizerMoments)
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
# GPUs with MXFP8 tensor cores (SM 10.x), where TE's default recipe is MXFP8BlockScaling; elsewhere DelayedScaling
MXFP8_GPUS = ("B200", "GB200", "B300", "GB300")


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
    # with recompute selective: Megatron-core's modules (its default is core_attn alone) instead of meshplan's
    # selective (the attention core where materialised, SwiGLU's product); fused kernels only
    recompute_modules: tuple[RecomputeModule, ...] | None = None
    grad_dtype: DType = "fp32"  # gradient accumulation / reduction dtype (Megatron: fp32 grads)
    # CUDA context + NCCL buffers per GPU (REFERENCE 2.1: 1-3 GB)
    ctx_overhead_bytes: int = field(default=3 * 2**30, metadata=at_least(0))
    # HBM lost to fragmentation (REFERENCE 2.1: 5-10%)
    frag_fraction: float = field(default=0.10, metadata=within(0, 0.5, hi_open=True))
    loss: LossKernel = "online"  # how the cross-entropy holds the logits (LossKernel)
    # how micro-batches' weight gradients accumulate (GradAccumulation); None: the framework's own, Megatron-core's
    # fused with fused kernels, the replay's autograd with eager ones (`grad_accumulation_kind`)
    grad_accumulation: GradAccumulation | None = None
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
    moe_dispatcher: MoeDispatcher = "alltoall"  # how tokens travel over EP (MoeDispatcher)
    # Megatron-core's overlap_moe_expert_parallel_comm (with delay_wgrad_compute, as NVIDIA's recipes set them):
    # one micro-batch's forward runs beside another's backward, each dispatch and combine under the other's compute
    # (docs/COSTMODEL.md "EP all-to-all overlap")
    ep_comm_overlap: bool = False
    # multi-token prediction (DeepSeek-V3; Megatron-core's --mtp-num-layers): depths on the last pipeline stage, each
    # a projection of the hidden state and the next token's embedding, one decoder layer and the shared LM head
    mtp_layers: int = field(default=0, metadata=at_least(0))
    optimizer_moments: OptimizerMoments = "fp32"  # Adam's moments' dtype (OptimizerMoments): bf16 is precision-aware

    # to_dict writes these only when set, so plans that do not use them stay as they were
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ("ep", "etp", "moe_capacity_factor", "moe_grouped_gemm", "kernels",
                                                "overlap_param_gather", "tp_comm_overlap", "fp8_recipe",
                                                "fp8_param_gather", "mtp_layers", "loss", "grad_accumulation",
                                                "recompute_modules", "moe_dispatcher", "ep_comm_overlap",
                                                "optimizer_moments")

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
        if self.optimizer_moments != "fp32" and (self.dtype not in ("bf16", "fp8") or self.zero_stage not in (1, 2)
                                                 or self.kernels == "eager"):
            raise SpecError(f"optimizer_moments {self.optimizer_moments} is Megatron-core's precision-aware optimizer: "
                            "bf16 (or fp8) training with its distributed optimizer (zero_stage 1 or 2) and fused "
                            f"kernels (this run: dtype {self.dtype}, zero_stage {self.zero_stage}, kernels "
                            f"{self.kernels}); drop it or change the run")
        if self.moe_dispatcher != "alltoall" and self.ep == 1:
            raise SpecError(f"moe_dispatcher {self.moe_dispatcher} sends tokens over expert parallelism; it needs "
                            "ep > 1 (with ep = 1 every expert is local); raise --ep or use the default alltoall")
        if self.ep_comm_overlap:
            self._check_ep_comm_overlap()
        if self.zero_stage == 3 and self.expert_groups > 1:
            raise SpecError(f"zero_stage 3 with an expert group over {self.expert_groups} TP groups (ep={self.ep}, "
                            f"etp={self.etp}) is not modelled; use --zero 1 or 2, or fold EP into TP (drop etp)")
        if self.zero_stage == 3 and self.mtp_layers:
            raise SpecError(f"zero_stage 3 with mtp_layers={self.mtp_layers} is not modelled (the rounds gather the "
                            "decoder layers only); use --zero 1 or 2 with --mtp-layers")
        if self.grad_accumulation not in (None, "fused") and (self.zero_stage == 3 or self.zero_stage == 2
                                                              and self.kernels != "eager"):
            raise SpecError(f"grad_accumulation {self.grad_accumulation!r} with zero_stage {self.zero_stage} is not "
                            "modelled (sharded gradients are reduce-scattered, not accumulated whole); use --zero 0 or "
                            "1, or leave grad_accumulation unset")
        if self.zero_stage == 3 and self.pp > 1:
            raise SpecError(f"zero_stage 3 with pp={self.pp} is not modelled (per-layer gathers across pipeline "
                            "stages); use pp=1 with --zero 3, or --zero 1/2 with pipelining")
        if self.recompute_modules is not None:
            self._check_recompute_modules()

    def _check_recompute_modules(self) -> None:
        """What Megatron-core's TransformerConfig refuses of recompute_modules, and what meshplan does not price."""
        mods = self.recompute_modules or ()
        if self.recompute != "selective":
            raise SpecError(f"recompute_modules {','.join(mods) or '(none)'} apply to recompute selective (Megatron's "
                            f"--recompute-granularity selective), not {self.recompute!r}; use --recompute selective")
        if dup := sorted({x for x in mods if mods.count(x) > 1}):
            raise SpecError(f"recompute_modules lists {', '.join(dup)} more than once; name each module once")
        if not mods:
            raise SpecError("recompute_modules is empty; name at least one of " + ", ".join(RECOMPUTE_MODULES)
                            + " (Megatron's default is core_attn), or drop it for meshplan's selective")
        if self.kernels == "eager":
            raise SpecError("recompute_modules describe Megatron-core's recompute; the replay (kernels eager) runs "
                            "its own selective: drop recompute_modules or use the fused kernels")
        if "moe_act" in mods and not self.moe_grouped_gemm:
            raise SpecError("recompute module moe_act needs moe_grouped_gemm (Megatron-core recomputes the grouped "
                            "experts' activation only); add --moe-grouped-gemm or drop moe_act")

    @classmethod
    def from_dict(cls, d: Any, origin: str = "training") -> "TrainingSpec":
        """From a JSON object (a plan's meta.training); `origin` heads every error message."""
        return Reader(origin, SpecError).build(cls, cls.upgraded(d))

    @staticmethod
    def upgraded(d: Any) -> Any:
        """A training object written by an older meshplan in today's keys: `fused_loss` (true: online, false: fp32)
        is `loss` since 2026-12-05. Anything else as it is."""
        if isinstance(d, dict) and "fused_loss" in d and "loss" not in d and isinstance(d["fused_loss"], bool):
            return {**{k: v for k, v in d.items() if k != "fused_loss"},
                    "loss": "online" if d["fused_loss"] else "fp32"}
        return d

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

    def _check_ep_comm_overlap(self) -> None:
        """Megatron-core's refusals of overlap_moe_expert_parallel_comm (transformer_config.py, 0.14+)."""
        why = ("ep > 1 (it overlaps the expert-parallel all-to-alls)" if self.ep == 1 else
               "a recompute other than full (Megatron-core refuses full recompute with it)" if self.recompute == "full"
               else "bf16 or fp16 as the base precision (fp8 GEMMs included), not fp32" if self.dtype == "fp32"
               else f"at most one MTP depth (mtp_layers is {self.mtp_layers})" if self.mtp_layers > 1
               else "no moe in recompute_modules (Megatron-core asserts it since March 2026, PR #3916/#3917; before, "
                    "the overlap skipped the whole MoE layer's recompute)" if "moe" in (self.recompute_modules or ())
               else "")
        if why:
            raise SpecError(f"ep_comm_overlap needs {why}; drop --ep-comm-overlap or change the run")

    @property
    def expert_groups(self) -> int:
        """TP groups of a stage one expert group of ep·etp ranks spans (1: folded into the TP group)."""
        return self.expert_ranks // self.tp

    @property
    def grad_accumulation_kind(self) -> GradAccumulation:
        """grad_accumulation, or the framework's own where unset: the replay (eager kernels) adds every unit's
        gradients into its zeroed whole ones by autograd, a cast and an add under autocast (bf16, fp16), an add in fp32
        (ZeRO-2 too: it shards no gradient; ZeRO-3's rounds reduce-scatter them instead); Megatron-core fuses it into
        the GEMM."""
        if self.grad_accumulation is not None:
            return self.grad_accumulation
        if self.kernels != "eager" or self.zero_stage == 3:
            return "fused"
        return "add" if self.dtype == "fp32" else "cast_add"

    def fp8_recipe_on(self, gpu: str) -> Fp8Recipe:
        """The fp8 recipe on a GPU (a cluster's `gpu`), by default Transformer Engine's (get_default_fp8_recipe):
        MXFP8 block scaling on Blackwell, per-tensor delayed scaling on Hopper."""
        mx = gpu.split()[0].upper() in MXFP8_GPUS
        if self.fp8_recipe == "mxfp8" and not mx:
            raise SpecError(f"fp8_recipe mxfp8 needs Blackwell's MXFP8 tensor cores ({', '.join(MXFP8_GPUS)}); "
                            f"{gpu} has per-tensor fp8 only: use delayed or tensorwise")
        return self.fp8_recipe or ("mxfp8" if mx else "delayed")

    @property
    def loss_chunked(self) -> bool:
        """Whether the loss holds the logits of one chunk at a time (online): eager kernels (meshplan's replay)
        materialise every logit of a unit, whatever `loss` says (an H200 replay: 114 GB peak for 32K tokens of a
        128K vocabulary, where Megatron's layer and an 8K chunk priced 65 GB)."""
        return self.loss == "online" and self.kernels != "eager"

    def check_against(self, model: ModelSpec, cluster: ClusterSpec) -> None:
        """Raise SpecError if the parallel layout does not fit the model or cluster."""
        if model.heads % self.tp or model.kv_heads % self.tp and self.tp % model.kv_heads:
            raise SpecError(f"tp={self.tp} must divide the {model.heads} query heads of {model.name} "
                            f"(and divide or be a multiple of its {model.kv_heads} KV heads)")
        if self.pp > model.layers:
            raise SpecError(f"pp={self.pp} exceeds the {model.layers} layers of {model.name}: every pipeline stage "
                            "needs a layer")
        if self.kernels == "eager" and (model.is_mla or self.mtp_layers):
            raise SpecError(f"kernels eager prices meshplan's replay, which runs no "
                            f"{'multi-head latent attention' if model.is_mla else 'multi-token prediction'} "
                            f"({model.name}); use the default fused kernels")
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
        mods = set(self.recompute_modules or ())
        if "mla_up_proj" in mods and not model.is_mla:
            raise SpecError(f"recompute module mla_up_proj needs multi-head latent attention; {model.name} has none: "
                            "drop it")
        fp8_mods = [x for x in ("layernorm", "moe_act") if x in mods]
        if self.dtype == "fp8" and fp8_mods and self.fp8_recipe_on(cluster.gpu) == "delayed":
            why = "as given" if self.fp8_recipe else f"Transformer Engine's default on {cluster.gpu}"
            other = "tensorwise or mxfp8" if cluster.gpu.split()[0].upper() in MXFP8_GPUS else "tensorwise"
            raise SpecError(f"recompute {' and '.join(fp8_mods)} under fp8 need current or block scaling "
                            f"(Megatron-core refuses them with delayed scaling, {why}); use --fp8-recipe {other}, or "
                            "drop them")
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

    @cached_property
    def stage_model(self) -> ModelSpec:
        """The model as the busiest pipeline stage holds its layers, what the per-layer costs and states are priced
        at: the model itself but where its dense layers come first (DeepSeek, GLM) and pp > 1 leaves the last
        stage without them; then every layer its MoE layer (the last stage, which also runs the head, sets the
        pipeline's pace and holds the most expert weights), the first stage's lighter dense layers not priced."""
        m, p = self.model, self.training.pp
        spread = not m.dense_layers or not m.dense_layers_first
        if p == 1 or spread or m.dense_layers > (p - 1) * self.layers_per_stage:
            return m
        return dataclasses.replace(m, dense_layers=0, dense_ffn=0)

    @property
    def layers_per_stage(self) -> int:
        """Layers of the busiest pipeline stage, ⌈L/pp⌉: what every stage is priced at. Where pp does not divide L
        the stages split the layers as evenly as they go (Megatron's uneven first and last stages, the replay's
        virtual_stage_layers); the busiest sets a pipeline's pace, the others wait on it, so the step is priced
        right and the lighter stages' memory and gradients over (docs/COSTMODEL.md, "Pipeline stages")."""
        return -(-self.model.layers // self.training.pp)
