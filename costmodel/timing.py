"""Times from the profile (REFERENCE 7.1, 7.5, 7.6, 2.5): per-unit forward/backward compute, ring
context-parallel overlap, TP collectives, offload exposure, gradient sync, PP point-to-point.

`CostModel` precomputes log-log curves from the profile once, so each lookup afterwards is a
numpy interpolation: planners call it for thousands of units per step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import get_args

import numpy as np

from costmodel.elementwise import (EAGER_STREAM_BYTES, FSDP2_OPTIMIZER_BYTES, MEGATRON_BF16_GRAD_CAST_BYTES,
                                   MEGATRON_OPTIMIZER_BYTES, REPLAY_OPTIMIZER_BYTES, MemKernel, eager_head_kernels,
                                   eager_layer_kernels, embedding_kernels, fp8_cast_kernels, head_kernels,
                                   grad_accumulation_bytes, layer_kernels, precision_aware_optimizer_bytes,
                                   recompute_kernels, score_kernels)
from costmodel.memory import (MemoryBudget, dkv_activation_ratio, expert_params_per_rank, fp8_gemm_params_parts,
                              fp8_recipe, fp8_scaled_tensors, layer_activation_per_token, memory_budget,
                              params_per_rank, sharded_state_params, stage_parts)
from costmodel.moe import (ExpertLayout, dispatcher_sms, mlp_gemm_plan, moe_comm_fwd_s, moe_kernels,
                           router_rows_per_token)
from costmodel.recompute import Replay, replay
from costmodel.specs import DTYPE_BYTES, ClusterSpec, ContextParallel, ModelSpec, Setup, SpecError, TrainingSpec
from profiles.table import Profile, ProfileError

CONTEXT_PARALLEL_KINDS: tuple[str, ...] = get_args(ContextParallel)  # a unit's `cp` values
DDP_BUCKET_PARAMS = 40_000_000  # Megatron-core DDP's default bucket (bucket_size: max(40M, 1M x DP) params)
_TOKEN_GRID = np.unique(np.round(np.geomspace(1, 2**25, 200)).astype(np.int64)).astype(float)
_BYTES_GRID = np.geomspace(1, 2**36, 160)
_LOG_TOKEN_GRID, _LOG_BYTES_GRID = np.log(_TOKEN_GRID), np.log(_BYTES_GRID)
# the layer GEMMs tp_comm_overlap runs TP collectives under, each with its own curves (gemm_<label>, its _dgrad and
# _wgrad); every token curve is over tokens, the others over bytes
_MLP_GEMMS = ("gate_up", "up", "down")
_OVERLAP_GEMMS = ("qkv", "o", *_MLP_GEMMS)
_TOKEN_CURVES = frozenset({"gemm_layer", "gemm_layer_bwd", "gemm_head", "gemm_head_bwd", "attn_fwd", "attn_bwd",
                           "attn_doc_fwd", "attn_doc_bwd", "attn_full_fwd", "attn_full_bwd", "mem_layer_fwd",
                           "mem_layer_bwd", "mem_recompute",
                           "mem_head_fwd", "mem_head_bwd", "mem_embed_fwd", "mem_embed_bwd", "moe_comm",
                           "gemm_mtp_proj", "gemm_mtp_proj_bwd", "gemm_recompute", "gemm_experts",
                           "gemm_experts_dgrad", "gemm_experts_wgrad"}
                          | {f"gemm_{g}{d}" for g in _OVERLAP_GEMMS for d in ("", "_dgrad", "_wgrad")})
_COMPUTE_CURVES = _TOKEN_CURVES - {"moe_comm"}  # what the compute share slows (transfers are measured as shared)


def _interp(x: np.ndarray | float, log_xs: np.ndarray, log_ys: np.ndarray) -> np.ndarray:
    """Log-log interpolation over a precomputed grid (the grid spans every size a plan uses), given the
    logs of grid and curve: planners look up thousands of units, so the logs are taken once."""
    return np.exp(np.interp(np.log(np.maximum(np.asarray(x, float), 1e-9)), log_xs, log_ys))


@dataclass(frozen=True)
class GemmShape:
    """One forward GEMM on one TP rank, run `launches` times: (rows × k) @ (k × n), rows = tokens × rows_per_token,
    tokens counted over the TP group."""

    # qkv (MLA: q_down and q_up, or q; kv_down, kv_up) | o | gate_up (up for GeLU) | down | router (MoE) | lm_head
    label: str
    n: int  # output features
    k: int  # reduction (input) features
    rows_per_token: float = 1.0  # MoE experts: k·cf/E rows per expert (costmodel.moe); router: 1/tp with SP
    launches: int = 1  # MoE experts: one GEMM per local expert (E/ep), or 1 grouped
    groups: int = 1  # weights one launch holds: a grouped GEMM's local experts, each over rows / groups of its rows

    @property
    def rows_per_token_all(self) -> float:
        """Rows of all launches per token."""
        return self.rows_per_token * self.launches


def gemm_shapes(model: ModelSpec, tp: int = 1, experts: ExpertLayout | None = None) -> tuple[GemmShape, ...]:
    """The GEMMs the cost model looks up: a layer's four (QKV, output projection, MLP up — SwiGLU's gate and
    up fused, GeLU's up alone — and down), a shared expert's up and down, MoE's router, then the LM head; the sharded
    dimension of each is split over tp ranks, rounded up, an expert's over etp (`experts`, default ep = 1:
    costmodel.moe.mlp_gemm_plan)."""
    shard = lambda width, by=tp: int(math.ceil(width / by))  # noqa: E731
    up = ("gate_up", 2 * model.ffn) if model.mlp == "swiglu" else ("up", model.ffn)
    lay = experts or ExpertLayout(tp=tp)
    split, rows, launches = mlp_gemm_plan(model, lay)
    groups = model.experts // lay.ep if model.is_moe and lay.grouped_gemm else 1
    router = (GemmShape("router", model.experts, model.hidden, router_rows_per_token(lay)),) if model.is_moe else ()
    f_sh = model.shared_expert_ffn  # the shared expert: a dense MLP over tp, every token
    shared = (GemmShape(f"shared_{up[0]}", shard((2 if model.gated else 1) * f_sh), model.hidden),
              GemmShape("shared_down", model.hidden, shard(f_sh))) if f_sh else ()
    return (*_attention_gemm_shapes(model, tp, router_rows_per_token(lay)),
            GemmShape("o", model.hidden, shard(model.attn_out_width)),
            GemmShape(up[0], shard(up[1], split), model.hidden, rows, launches, groups),
            GemmShape("down", model.hidden, shard(model.ffn, split), rows, launches, groups),
            *shared, *router, GemmShape("lm_head", shard(model.vocab), model.hidden))


def _attention_gemm_shapes(model: ModelSpec, tp: int, own_rows: float) -> tuple[GemmShape, ...]:
    """The attention's projections before the core: QKV fused; MLA's down projections to its latents (replicated
    weights, on the rank's `own_rows` of each token: its own tokens under SP) and up projections from them (over
    tp), or Q straight from h without a Q latent."""
    shard = lambda width: int(math.ceil(width / tp))  # noqa: E731
    h = model.hidden
    if not model.is_mla:
        return (GemmShape("qkv", shard(model.q_width + 2 * model.k_width), h),)
    q_lora = model.q_lora_rank
    q = ((GemmShape("q_down", q_lora, h, own_rows), GemmShape("q_up", shard(model.q_width), q_lora)) if q_lora
         else (GemmShape("q", shard(model.q_width), h),))
    kv_up = model.heads * (model.head_dim - model.rope_head_dim + model.value_head_dim)
    return (*q, GemmShape("kv_down", model.kv_lora_rank + model.rope_head_dim, h, own_rows),
            GemmShape("kv_up", shard(kv_up), model.kv_lora_rank))


def _every_kind_gemm_shapes(model: ModelSpec, tp: int = 1) -> tuple[GemmShape, ...]:
    """gemm_shapes of the model, and where some layers are dense (ModelSpec.layer_kinds) their MLP's, dense_*."""
    kinds = model.layer_kinds()
    if len(kinds) == 1:
        return gemm_shapes(model, tp)
    (_, moe), (_, dense) = kinds
    return gemm_shapes(moe, tp) + tuple(dataclasses.replace(g, label=f"dense_{g.label}")
                                        for g in gemm_shapes(dense, tp) if g.label in _MLP_GEMMS)


def profile_gemm_shapes(models: Mapping[str, ModelSpec], tps: Sequence[int] = (1,)) -> tuple[tuple[str, int, int], ...]:
    """(NAME.label, n, k) of each model's GEMMs at each TP degree of `tps` that divides its KV heads (label suffix
    .tpT beyond 1; each (n, k) once): the model shapes `meshplan profile --models` measures beside its generic
    grid, keyed by the name the model was given. A shape missing from the table is looked up on the generic
    time-vs-FLOPs curve (cubes and square-ish shapes), which overstates the rate of a TP shard's skinnier GEMMs."""
    out = [(f"{name}.{g.label}", g.n, g.k) for name, m in models.items() for g in _every_kind_gemm_shapes(m)]
    seen = {(n, k) for _, n, k in out}
    for name, m in models.items():
        for t in (t for t in tps if t > 1 and m.kv_heads % t == 0):
            for g in _every_kind_gemm_shapes(m, t):
                if (g.n, g.k) not in seen:
                    seen.add((g.n, g.k))
                    out.append((f"{name}.{g.label}.tp{t}", g.n, g.k))
    return tuple(out)


@dataclass(frozen=True)
class UnitCost:
    """Per-rank time of one unit on one pipeline stage (all of its ranks run in lockstep)."""

    fwd_compute_s: float  # GEMMs + attention core, forward, the stage's layers
    bwd_compute_s: float  # backward (+ recompute forward when recomputing)
    ring_comm_s: float  # context-parallel transfer time (ring or all-gather, Ulysses all-to-alls), fwd + bwd
    ring_exposed_fwd_s: float  # CP transfers not hidden under attention compute (all-to-alls: all), forward
    ring_exposed_bwd_s: float  # ... backward (K/V plus dK/dV; and the recompute forward's ring)
    tp_comm_fwd_s: float  # TP/SP all-gathers and reduce-scatters, MoE all-to-alls (not overlapped), forward
    tp_comm_bwd_s: float
    offload_exposed_fwd_s: float  # device-to-host copies not hidden under the layer's forward
    offload_exposed_bwd_s: float  # host-to-device copies not hidden under the layer's backward
    head_fwd_s: float  # final norm, LM head, loss, their TP collectives and MTP depths (last stage); embedding (first)
    head_bwd_s: float
    tokens_per_rank: int  # tokens each member holds
    attn_fwd_compute_s: float = 0.0  # the attention-core part of fwd_compute_s (slices split it unevenly)
    attn_bwd_compute_s: float = 0.0  # the attention-core part of bwd_compute_s
    mem_fwd_s: float = 0.0  # the memory-bound kernels' part of fwd_compute_s (norms, activation, residuals)
    mem_bwd_s: float = 0.0  # ... of bwd_compute_s (recomputed forward kernels included)
    overhead_fwd_s: float = 0.0  # the fixed per-layer and per-attention-call costs in fwd_compute_s
    overhead_bwd_s: float = 0.0

    @property
    def fwd_s(self) -> float:
        """Forward wall time of the stage, exposed communication and head included."""
        return (self.fwd_compute_s + self.ring_exposed_fwd_s + self.tp_comm_fwd_s + self.offload_exposed_fwd_s
                + self.head_fwd_s)

    @property
    def bwd_s(self) -> float:
        return (self.bwd_compute_s + self.ring_exposed_bwd_s + self.tp_comm_bwd_s + self.offload_exposed_bwd_s
                + self.head_bwd_s)

    @property
    def compute_s(self) -> float:
        return self.fwd_compute_s + self.bwd_compute_s + self.head_fwd_s + self.head_bwd_s

    def parts_s(self, direction: str | None = None) -> dict[str, float]:
        """The unit's time in one direction ("fwd", "bwd"; None: both) by kind, summing to fwd_s / bwd_s /
        total_s: the layers' GEMMs (compute less the parts below), attention core, memory-bound kernels and fixed
        per-layer costs; the head and embedding; exposed TP, CP and offload time."""
        ds = ("fwd", "bwd") if direction is None else (direction,)

        def of(name: str) -> float:
            return sum(getattr(self, name.format(d)) for d in ds)

        attn, mem, fixed = of("attn_{}_compute_s"), of("mem_{}_s"), of("overhead_{}_s")
        return {"gemm": of("{}_compute_s") - attn - mem - fixed, "attention": attn, "elementwise": mem,
                "fixed": fixed, "head": of("head_{}_s"), "tp_comm": of("tp_comm_{}_s"),
                "cp_exposed": of("ring_exposed_{}_s"), "offload_exposed": of("offload_exposed_{}_s")}

    @property
    def ring_exposed_s(self) -> float:
        return self.ring_exposed_fwd_s + self.ring_exposed_bwd_s

    @property
    def tp_comm_s(self) -> float:
        return self.tp_comm_fwd_s + self.tp_comm_bwd_s

    @property
    def offload_exposed_s(self) -> float:
        return self.offload_exposed_fwd_s + self.offload_exposed_bwd_s

    @property
    def exposed_comm_s(self) -> float:
        return self.ring_exposed_s + self.tp_comm_s + self.offload_exposed_s

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s


@dataclass(frozen=True)
class UnitCosts:
    """`UnitCost` of many units at once, one array per field (index u: unit u); `CostModel.price_units`."""

    fwd_compute_s: np.ndarray
    bwd_compute_s: np.ndarray
    ring_comm_s: np.ndarray
    ring_exposed_fwd_s: np.ndarray
    ring_exposed_bwd_s: np.ndarray
    tp_comm_fwd_s: np.ndarray
    tp_comm_bwd_s: np.ndarray
    offload_exposed_fwd_s: np.ndarray
    offload_exposed_bwd_s: np.ndarray
    head_fwd_s: np.ndarray
    head_bwd_s: np.ndarray
    tokens_per_rank: np.ndarray  # int64
    attn_fwd_compute_s: np.ndarray
    attn_bwd_compute_s: np.ndarray
    mem_fwd_s: np.ndarray
    mem_bwd_s: np.ndarray
    overhead_fwd_s: np.ndarray
    overhead_bwd_s: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens_per_rank)

    @property
    def total_s(self) -> np.ndarray:
        """UnitCost.total_s per unit (the same sums in the same order)."""
        fwd = self.fwd_compute_s + self.ring_exposed_fwd_s + self.tp_comm_fwd_s + self.offload_exposed_fwd_s
        bwd = self.bwd_compute_s + self.ring_exposed_bwd_s + self.tp_comm_bwd_s + self.offload_exposed_bwd_s
        return (fwd + self.head_fwd_s) + (bwd + self.head_bwd_s)

    def unit(self, u: int) -> UnitCost:
        return UnitCost(**{f.name: getattr(self, f.name)[u].item() for f in fields(self)})

    def units(self) -> list[UnitCost]:
        """Every unit's UnitCost, in order (one pass per field: callers hold thousands)."""
        return [UnitCost(*row) for row in zip(*(getattr(self, f.name).tolist() for f in fields(self)))]


def _group_shapes(size: np.ndarray, inter: np.ndarray):
    """(units mask, group size, scope) per distinct (size > 1, crosses NVLink domains) pair of per-unit collective
    groups: a collective is looked up once per group shape, not per unit."""
    for g in np.unique(size[size > 1]):
        for crosses in (False, True):
            sel = (size == g) & (inter == crosses)
            if sel.any():
                yield sel, int(g), "inter" if crosses else "intra"


def _segment_sums(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-segment sums of each row of `values` (segment u: columns starts[u] to starts[u] + counts[u]),
    bit-identical to `values[:, a:b].sum(axis=-1)` of each segment: numpy sums contiguous rows pairwise,
    which np.add.reduceat does not reproduce, so segments of equal length are summed as one 2-D block."""
    out = np.zeros((values.shape[0], len(starts)))
    order = np.argsort(counts, kind="stable")
    sorted_counts = counts[order]
    edges = np.flatnonzero(np.diff(sorted_counts)) + 1
    for group in np.split(order, edges):
        k = int(counts[group[0]]) if len(group) else 0
        if k == 1:
            out[:, group] = values[:, starts[group]]
        elif k > 1:
            block = np.ascontiguousarray(values[:, starts[group][:, None] + np.arange(k)])  # rows contiguous
            out[:, group] = block.sum(axis=-1)
    return out


@dataclass
class CostModel:
    """Cost of units, syncs and transfers for one (model, cluster, training) on one profile."""

    setup: Setup
    profile: Profile
    _curves: dict = field(default_factory=dict, repr=False)
    # Slowdown of every compute time from ranks sharing a node's compute: None derives it from the profile
    # (compute_share_of); GPU profiles have no cores (a GPU per rank): 1.
    compute_share: float | None = None
    _grad_sync: dict[int, float] = field(default_factory=dict, init=False, repr=False)  # memo per HDP group size
    _grad_sync_parts: dict[int, tuple[float, float]] = field(default_factory=dict, init=False, repr=False)  # same

    def __post_init__(self) -> None:
        self.profile.require_tables()  # a profile measured with --ops may lack a table every step needs
        m, tr = self.setup.model, self.setup.training
        self.model: ModelSpec = m
        self.tp = tr.tp
        self.pp = tr.pp
        self.layers_per_stage = self.setup.layers_per_stage  # the busiest stage's
        self.bytes_per_elem = tr.dtype_bytes
        self.budget: MemoryBudget = memory_budget(self.setup)
        self.capacity_tokens = self.budget.capacity_tokens
        # how MoE layers run (costmodel.moe): on the TP group, or an expert group of G TP groups in lockstep
        mesh = self.setup.mesh
        self.experts = ExpertLayout.of(tr, inter_node=mesh.group_spans_domains(tr.expert_groups),
                                       domains=-(-tr.expert_groups // max(1, mesh.hdp_per_domain)))
        self.a_tok = layer_activation_per_token(self.setup)  # the replay's eager layer with eager kernels
        # the layers as the busiest stage holds them (Setup.stage_model): what every per-layer term is priced at
        self.stage_model: ModelSpec = self.setup.stage_model
        self.dkv_ratio = dkv_activation_ratio(self.stage_model, tr.tp, tr.recompute, tr.dtype_bytes,
                                              tr.sequence_parallel, self.experts, tr.dtype == "fp8")
        # Megatron-core's recompute modules (costmodel.recompute): what each layer kind's backward replays
        self.replays: tuple[tuple[float, Replay], ...] = ()
        if tr.recompute == "selective" and tr.recompute_modules:
            self.dkv_ratio = 2 * self.stage_model.kv_width * 4 / tr.tp / self.a_tok  # a_tok: with what they free
            self.replays = tuple((w, replay(kind, tr.recompute_modules, tr.tp, tr.sequence_parallel, tr.dtype_bytes,
                                            self.experts)) for w, kind in self.stage_model.layer_kinds())
        self.heads_per_rank = max(1, m.heads // tr.tp)
        self.unfused_attention = tr.attention_kernel == "unfused"
        # Fixed costs a profile may carry (absent: 0; `meshplan calibrate` fits them): the host's time to issue
        # one layer's forward (the backward issues twice as many kernels), and one attention call's set-up, paid
        # per document (and per ring step) where the executor calls attention document by document.
        consts = self.profile.constants
        # CPU profiles: ranks share their node's cores, the share moving with how many compute (share_at, lockstep
        # groups larger than the cores: lockstep_x_of); a share given (1: a fit's lone rank) holds for every unit
        self.shares_cores = self.compute_share is None and bool(consts.get("cores_per_node", {}).get("value"))
        if self.compute_share is None:
            self.compute_share = compute_share_of(self.profile, self.setup.cluster.gpus_per_node)
        share = self.compute_share
        # a blocking meeting on a node of as many ranks as cores or more: the sleeper waits for a core (sync_wake_of)
        self.wake = sync_wake_of(self.profile, self.setup.cluster.gpus_per_node) if self.shares_cores else Wake()
        self.transfers_on_cores = self.shares_cores and cores_all_busy(self.profile, self.setup.cluster.gpus_per_node)
        self.layer_overhead_s = share * float(consts.get("layer_overhead_s", {}).get("value", 0.0))
        self.attn_call_overhead_s = share * float(consts.get("attn_call_overhead_s", {}).get("value", 0.0))
        # The executor's host work beyond the attention it runs (planner/runtime/call_overhead.py), per K/V source of
        # a sliced unit's slice ("source") and per ring step ("ring_step"), forward and backward: (a fixed part, one
        # per token and head a member holds); profiles measured before the per-token parts have only the fixed ones
        self.glue_s = {(kind, way): tuple(share * float(consts.get(name, {}).get("value", 0.0))
                                          for name in (f"attn_{kind}_{way}_s", f"attn_{kind}_token_{way}_s"))
                       for kind in ("source", "ring_step") for way in ("fwd", "bwd")}
        # Each micro-batch's weight gradients added to the step's accumulator outside the GEMM (grad_accumulation):
        # a memory-bound pass over the parameters a rank holds, per layer, and over the last stage's head (and the
        # embedding where pp = 1: the last stage's parts); the first stage's embedding with pp > 1 is not priced
        acc = grad_accumulation_bytes(tr.grad_accumulation_kind, DTYPE_BYTES[tr.dtype], DTYPE_BYTES[tr.grad_dtype])
        self.grad_accum_layer_s = self.grad_accum_head_s = 0.0
        if acc:
            layers, extra = stage_parts(self.setup, tr.pp - 1, None)
            per_layer = (params_per_rank(self.setup, tr.pp - 1) - extra / tr.tp) / layers
            self.grad_accum_layer_s = share * float(self.profile.memory_time_s(per_layer * acc))
            self.grad_accum_head_s = share * float(self.profile.memory_time_s(extra / tr.tp * acc)) if extra else 0.0
        dt = "bf16" if tr.dtype in ("bf16", "fp16", "fp8") else "fp32"
        dtypes = set(self.profile.tables["gemm"]["dtype"])
        self.dtype = dt if dt in dtypes else sorted(dtypes - {"fp8"} or dtypes)[0]  # attention, LM head, unfused QKᵀ
        # fp8 training: the decoder layers' linear GEMMs in fp8; attention, embedding and LM head stay bf16
        # (docs/COSTMODEL.md "fp8")
        fp8 = tr.dtype == "fp8"
        if fp8 and "fp8" not in dtypes:
            raise ProfileError(f"--dtype fp8: profile {self.profile.fingerprint.name!r} has no fp8 GEMM table (GPUs "
                               "before Hopper, e.g. A100, have no fp8 tensor cores); use --dtype bf16, an fp8 GPU's "
                               "profile (h100-sxm.analytic, b200.analytic, ...) or `meshplan profile` on one")
        self.gemm_dtype = "fp8" if fp8 else self.dtype
        p = self.profile
        head = gemm_shapes(m, tr.tp, self.experts)[-1]
        self._curves["gemm_head"] = p.gemm_time_s(_TOKEN_GRID, head.n, head.k, self.dtype)
        self._curves["gemm_head_bwd"] = sum(self._gemm_grads(head, self._curves["gemm_head"], self.dtype))
        if tr.mtp_layers:  # an MTP depth's projection of the hidden state and the embedding, 2h -> h over tp
            proj = GemmShape("mtp_proj", math.ceil(m.hidden / tr.tp), 2 * m.hidden)
            self._curves["gemm_mtp_proj"] = p.gemm_time_s(_TOKEN_GRID, proj.n, proj.k, self.gemm_dtype)
            self._curves["gemm_mtp_proj_bwd"] = sum(self._gemm_grads(proj, self._curves["gemm_mtp_proj"],
                                                                     self.gemm_dtype))
        unfused = self._unfused_attention_s(_TOKEN_GRID) if tr.attention_kernel == "unfused" else None
        # another fused kernel than the table's: its published rate over the table's, per document length
        kernel_x = (p.attention_kernel_time_x(tr.attention_kernel, _TOKEN_GRID)
                    if tr.attention_kernel not in ("flash", "unfused") else {"fwd": 1.0, "bwd": 1.0})
        # attn_doc_*: whole documents of a packed bin, each its own call / tiles; attn_full_*: a square without the
        # causal mask (a ring step's block of another member's keys; an unfused kernel computes the square anyway)
        for direction in ("fwd", "bwd"):
            for name, whole, causal in (("attn", False, True), ("attn_doc", True, True), ("attn_full", False, False)):
                if unfused is not None:
                    tt = unfused[direction]
                else:
                    tt = kernel_x[direction] * p.attention_time_s(
                        _TOKEN_GRID, heads=self.heads_per_rank, head_dim=m.attn_head_dim, causal=causal,
                        direction=direction, dtype=self.dtype, per_document=whole)
                self._curves[f"{name}_{direction}"] = np.maximum(tt, 1e-12)
        sp, b = tr.sequence_parallel, tr.dtype_bytes
        self.fp8_recipe = fp8_recipe(self.setup) if fp8 else None
        # Current scaling casts a GEMM input once, with its amax all-reduced over TP, before the SP all-gather, so
        # the gather moves 1 B per element (TE linear.py: with_amax_reduction over the TP group for a column-
        # parallel input and a row-parallel output gradient); other recipes gather bf16 [assumption]
        self.tp_amaxes = self.fp8_recipe == "tensorwise" and tr.tp > 1 and tr.sequence_parallel  # else bf16 outputs
        self.tp_gather_bytes = 1 if self.tp_amaxes else tr.dtype_bytes
        for w, kind in self.stage_model.layer_kinds():  # a layer's curves: its kinds' mean where some are dense
            gemms = self._layer_gemms(kind)
            for key, curve in self._layer_curves(kind, gemms).items():
                self._curves[key] = self._curves.get(key, 0.0) + w * curve
            if kind.is_moe and tr.ep_comm_overlap:  # one MoE layer's expert GEMMs, what EP overlap pairs up
                for i, name in enumerate(("gemm_experts", "gemm_experts_dgrad", "gemm_experts_wgrad")):
                    self._curves[name] = np.maximum(sum((t[i] for g, *t in gemms if g.label in _MLP_GEMMS),
                                                        np.zeros_like(_TOKEN_GRID)), 1e-15)
            # what TP overlap splits (_overlapped_tp_comm_s): the attention's GEMMs (MLA: its up projections take the
            # gathered input), and a dense MLP's (expert GEMMs run no userbuffer overlap)
            self._curves.update({f"gemm_{g.label}{d}": np.maximum(t, 1e-15) for g, *ts in gemms
                                 for d, t in zip(("", "_dgrad", "_wgrad"), ts)
                                 if g.label in _OVERLAP_GEMMS and not (kind.is_moe and g.label in _MLP_GEMMS)})
            if kind.is_mla:
                for i, d in enumerate(("", "_dgrad", "_wgrad")):
                    self._curves[f"gemm_qkv{d}"] = sum(ts[i] for g, *ts in gemms if g.label in ("q", "q_up", "kv_up"))
        eager = tr.kernels == "eager"
        kernels = {"mem_head_fwd": (eager_head_kernels(m, tr.tp, sp, b, "fwd") if eager else
                                    head_kernels(m, tr.tp, sp, b, tr.loss, "fwd")),
                   "mem_head_bwd": (eager_head_kernels(m, tr.tp, sp, b, "bwd") if eager else
                                    head_kernels(m, tr.tp, sp, b, tr.loss, "bwd")),
                   # eager: the fp32 table gathered into the fp32 stream (EAGER_STREAM_BYTES)
                   "mem_embed_fwd": embedding_kernels(m, int(EAGER_STREAM_BYTES) if eager else b, "fwd"),
                   "mem_embed_bwd": embedding_kernels(m, int(EAGER_STREAM_BYTES) if eager else b, "bwd")}
        for name, ks in kernels.items():
            self._curves[name] = np.maximum(self._kernels_s(ks, _TOKEN_GRID), 1e-15)
        for scope in ("intra", "inter"):
            self._curves[f"p2p_{scope}"] = p.collective_time_s("send_recv", _BYTES_GRID, 2, scope)
        self._curves["d2h"] = p.host_copy_time_s(_BYTES_GRID, "d2h", True)
        self._curves["h2d"] = p.host_copy_time_s(_BYTES_GRID, "h2d", True)
        if tr.tp > 1:  # every TP group of a node runs the same collectives at once (the node's ranks / tp of them)
            tp_groups = max(1, self.setup.cluster.gpus_per_node // tr.tp)
            for op in ("all_gather", "reduce_scatter", "all_reduce"):  # each a meeting of the group's ranks
                self._curves[f"tp_{op}"] = p.collective_time_s(op, _BYTES_GRID, tr.tp, "intra", tp_groups)
        if self.experts.all_to_all:  # MoE dispatch and combine over EP (+ ETP gather), per token of the TP group
            self._curves["moe_comm"] = np.maximum(moe_comm_fwd_s(p, _TOKEN_GRID, m, self.experts, b), 1e-15)
        for k in _COMPUTE_CURVES:  # ranks sharing cores: each rank's compute runs at 1 / share of its own speed
            if k in self._curves:
                self._curves[k] = self._curves[k] * share
        # (log grid, log curve) per lookup table, taken once here: `_lookup` serves every query from them
        self._log_curves = {k: (_LOG_TOKEN_GRID if k in _TOKEN_CURVES else _LOG_BYTES_GRID, np.log(v))
                            for k, v in self._curves.items()}
        self._curves["fit"] = self.fit_layer_time()

    def _layer_gemms(self, kind: ModelSpec) -> list[tuple[GemmShape, np.ndarray, np.ndarray, np.ndarray]]:
        """Each forward GEMM of one layer of `kind` with its forward, dgrad and wgrad times over the token grid (all
        its launches); the MoE router stays in bf16 under fp8 (Transformer Engine wraps the linears only)."""
        *layer, _ = gemm_shapes(kind, self.tp, self.experts)
        out = []
        for g in layer:
            dtype = self.dtype if g.label == "router" else self.gemm_dtype
            fwd = g.launches * self.profile.gemm_time_s(_TOKEN_GRID * g.rows_per_token, g.n, g.k, dtype)
            out.append((g, fwd, *self._gemm_grads(g, fwd, dtype)))
        return out

    def _gemm_grads(self, g: GemmShape, fwd: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """The backward of forward GEMM `g` (time `fwd` over the token grid): dgrad, (rows × n)·(n × k), contracted
        over the output features; wgrad, (k × rows)·(rows × n), each weight's k × n tiles contracted over its rows
        (a grouped GEMM's experts: one weight each, over their share of the rows). Each at its own shape where the
        profile times shapes (their tiles, waves and roofline differ from the forward's: a small weight's wgrad
        fills few tiles, a small k's forward is memory-bound), else each as much as the forward (a measured table's
        forward shapes)."""
        if not self.profile.times_gemm_shapes:
            return fwd, fwd
        rows = _TOKEN_GRID * g.rows_per_token
        return (g.launches * self.profile.gemm_time_s(rows, g.k, g.n, dtype),
                g.launches * g.groups * self.profile.gemm_time_s(float(g.k), g.n, rows / g.groups, dtype,
                                                                 out_bytes=self._wgrad_out_bytes))

    @property
    def _wgrad_out_bytes(self) -> float | None:
        """Bytes a weight-gradient GEMM moves per weight element: where it accumulates into the main gradient
        (Megatron's gradient_accumulation_fusion, wgrad_gemm_accum_fp32; Transformer Engine's grouped GEMM into
        main_grad) it reads and writes that, 2 × the gradients' width (8 B in fp32); else None, its output written
        once in the GEMM's dtype. ZeRO-3's rounds take each micro-batch's gradient as written."""
        tr = self.setup.training
        if tr.grad_accumulation_kind == "fused" and tr.zero_stage < 3:
            return 2.0 * DTYPE_BYTES[tr.grad_dtype]
        return None

    def _layer_curves(self, kind: ModelSpec, gemms: list[tuple[GemmShape, np.ndarray, np.ndarray, np.ndarray]]
                      ) -> dict[str, np.ndarray]:
        """One layer of `kind` over the token grid: its GEMMs (`gemms`, _layer_gemms) and memory-bound kernels,
        forward, backward and what recompute replays (with fp8 the casts of the GEMM inputs, with MoE the
        permutations)."""
        tr, b, sp = self.setup.training, self.setup.training.dtype_bytes, self.setup.training.sequence_parallel
        widths = {g.label: (g.k * g.rows_per_token_all, g.n * g.rows_per_token_all) for g, *_ in gemms
                  if g.label != "router"}
        current = self.fp8_recipe == "tensorwise"
        cast = {d: fp8_cast_kernels(widths, d, current) if self.fp8_recipe else () for d in ("fwd", "bwd")}
        moe = {d: moe_kernels(kind, self.experts, b, d) for d in ("fwd", "bwd")}  # () for dense layers
        eager = tr.kernels == "eager"
        layer_ks = eager_layer_kernels if eager else layer_kernels
        kernels = {"mem_layer_fwd": layer_ks(kind, tr.tp, sp, b, "fwd") + cast["fwd"] + moe["fwd"],
                   "mem_layer_bwd": layer_ks(kind, tr.tp, sp, b, "bwd") + cast["bwd"] + moe["bwd"],
                   "mem_recompute": (recompute_kernels(kind, tr.tp, sp, b, tr.recompute, eager)
                                     + (cast["fwd"] + moe["fwd"] if tr.recompute == "full" else ()))}
        rp = replay(kind, tr.recompute_modules, tr.tp, sp, b, self.experts) if self.replays else None
        if rp is not None:  # the modules' kernels and the fp8 casts of the GEMMs they replay
            kernels["mem_recompute"] = rp.kernels + tuple(c for c in cast["fwd"]
                                                          if c.label.removeprefix("fp8_cast_") in rp.gemms)
        curves = {name: np.maximum(self._kernels_s(ks, _TOKEN_GRID), 1e-15) for name, ks in kernels.items()}
        curves["gemm_layer"] = sum((t for _, t, *_ in gemms), np.zeros_like(_TOKEN_GRID))
        curves["gemm_layer_bwd"] = sum((d + w for _, _, d, w in gemms), np.zeros_like(_TOKEN_GRID))
        if rp is not None:
            curves["gemm_recompute"] = np.maximum(sum((t for g, t, *_ in gemms if g.label in rp.gemms),
                                                      np.zeros_like(_TOKEN_GRID)), 1e-15)
        return curves

    def _kernels_s(self, kernels: tuple[MemKernel, ...], items: np.ndarray) -> np.ndarray:
        """Memory-bound kernels run on `items` tokens (or scores) each: one memory-table lookup per kernel, its bytes
        over its kind's share of the table's bandwidth (a broadcast or strided kernel moves its bytes slower)."""
        p = self.profile
        return sum((p.memory_time_s(items * k.bytes_per_item / p.memory_kind_ratio(k.kind)) for k in kernels),
                   np.zeros_like(items))

    def _unfused_attention_s(self, doc_len: np.ndarray) -> dict[str, np.ndarray]:
        """Materialised attention of one document per length on one TP rank (no FlashAttention), per direction:
        the batched GEMMs QKᵀ and PV over the rank's heads (the full s × s square: the causal mask is applied,
        not skipped) and the softmax (+ dropout) kernels over its scores; backward: two GEMMs per forward one."""
        m, heads = self.model, self.heads_per_rank
        p = self.profile
        coarse = np.unique(np.concatenate([doc_len[::8], doc_len[-1:]]))  # GEMM time is smooth in s: sample it
        gemm = np.array([float(p.gemm_time_s(heads * s, int(s), m.head_dim, self.dtype)
                               + p.gemm_time_s(heads * s, m.value_head_dim, int(s), self.dtype)) for s in coarse])
        gemm = _interp(doc_len, np.log(coarse), np.log(gemm))
        scores = heads * doc_len * doc_len
        b = self.setup.training.dtype_bytes
        return {d: (gemm if d == "fwd" else 2.0 * gemm) + self._kernels_s(score_kernels(m, b, d), scores)
                for d in ("fwd", "bwd")}

    # ---- primitive lookups (vectorised) ---------------------------------------------------------
    def _lookup(self, curve: str, x: np.ndarray | float) -> np.ndarray:
        return _interp(x, *self._log_curves[curve])

    def gemm_layer_fwd_s(self, tokens: np.ndarray | float) -> np.ndarray:
        """Forward GEMMs of one layer for `tokens` tokens on one TP rank."""
        return self._lookup("gemm_layer", tokens)

    def gemm_layer_bwd_s(self, tokens: np.ndarray | float) -> np.ndarray:
        """Backward GEMMs (dgrad and wgrad) of one layer for `tokens` tokens on one TP rank."""
        return self._lookup("gemm_layer_bwd", tokens)

    def attn_fwd_s(self, doc_len: np.ndarray | float, whole: bool = False) -> np.ndarray:
        """Forward attention core of one layer on one TP rank, per document length; whole: documents of a packed
        bin, each a kernel call or tile row of its own, so that a short one costs the table's smallest length's
        time (profiles.table); else blocks of a sharded document at the table's rate, a lower bound for both."""
        return self._lookup("attn_doc_fwd" if whole else "attn_fwd", doc_len)

    def attn_bwd_s(self, doc_len: np.ndarray | float, whole: bool = False) -> np.ndarray:
        return self._lookup("attn_doc_bwd" if whole else "attn_bwd", doc_len)

    def attn_full_s(self, doc_len: np.ndarray | float, direction: str) -> np.ndarray:
        """A square of doc_len queries by doc_len keys without the causal mask (twice the causal FLOPs), at the
        profile's non-causal rate (a profile without non-causal rows: its causal rate per FLOP)."""
        return self._lookup(f"attn_full_{direction}", doc_len)

    def attn_window_x(self, doc_len: np.ndarray | float, direction: str) -> np.ndarray:
        """What local attention makes of a document's attention time, over the stage's layers (1 without it):
        (1 − φ) + φ·t_w(s)/t(s), φ the local layers' share. A windowed layer computes the band of w keys
        behind each query: w(w+1)/2 + (s − w)·w pairs, as the causal square of w and (s − w)/w more such squares'
        worth at twice the pairs; the kernel runs it in w-long blocks, so at the rate of length w:
        t_w(s) = t(w)·(1 + 2(s − w)/w) for s > w, t(s) up to w [assumption: FlashAttention's window kernels skip
        the blocks outside the band, as its causal mask does]. A chunked layer (Llama 4) runs ⌊s/c⌋ causal squares
        of c and the remainder's, each a document of its own: t_c(s) = ⌊s/c⌋·t(c) + t(s mod c). The layers are
        mixed in every stage at φ."""
        s = np.asarray(doc_len, dtype=float)
        m, phi = self.model, self.model.windowed_fraction
        if not phi or self.unfused_attention:  # materialised scores: the whole square is computed, then masked
            return np.ones_like(s)
        t = self._attn_table(direction)
        whole = t(np.maximum(s, 1.0))
        if m.sliding_window:
            w = float(m.sliding_window)
            local = np.where(s > w, t(w) * (1.0 + 2.0 * (s - w) / w), whole)
        else:
            c = float(m.attention_chunk)
            rest = np.mod(s, c)
            local = np.where(s > c, np.floor(s / c) * t(c) + np.where(rest > 0, t(np.maximum(rest, 1.0)), 0.0), whole)
        return (1.0 - phi) + phi * np.minimum(local / whole, 1.0)  # never above the full square's time

    def doc_attn_s(self, doc_len: np.ndarray | float, direction: str) -> np.ndarray:
        """One layer's attention core of whole documents on one rank (forward or backward), at the table's rate,
        a sliding window's share included (attn_window_x): what the fast estimates and bounds use."""
        return self._attn_table(direction)(doc_len) * self.attn_window_x(doc_len, direction)

    def _attn_table(self, direction: str) -> Callable[[np.ndarray | float], np.ndarray]:
        return self.attn_fwd_s if direction == "fwd" else self.attn_bwd_s

    def p2p_s(self, nbytes: np.ndarray | float, inter_node: bool) -> np.ndarray:
        return self._lookup("p2p_inter" if inter_node else "p2p_intra", nbytes)

    def host_copy_s(self, nbytes: np.ndarray | float, direction: str) -> np.ndarray:
        return self._lookup(direction, nbytes)

    # ---- units ----------------------------------------------------------------------------------
    def unit_cost(self, doc_lengths: np.ndarray | list[int], degree: int = 1, offload_ratio: float = 0.0,
                  inter_node: bool = False, with_head: bool | None = None, ulysses: int = 1,
                  cp: ContextParallel | None = None, ulysses_inter: bool | None = None) -> UnitCost:
        """Per-rank cost of one unit: `price_units` for a batch of one (see there)."""
        s = np.asarray(doc_lengths, dtype=float).ravel()
        return self.price_units(s, np.zeros(1, np.int64), int(degree), offload_ratio, inter_node, with_head,
                                int(ulysses), cp, ulysses_inter).unit(0)

    @property
    def max_ulysses(self) -> int:
        """Largest head-split (Ulysses) degree: the KV heads per TP rank (they divide the query heads per rank);
        1 when TP replicates KV heads (tp > kv_heads). Every Ulysses degree must divide it."""
        return max(1, self.model.kv_heads // self.tp)

    def check_ulysses(self, ulysses: np.ndarray | int, degree: np.ndarray | int) -> None:
        """SpecError (one line) unless each head-split degree divides its unit's degree and the KV (hence the
        query) heads per TP rank: Ulysses splits whole heads, and replicating KV heads is not modelled."""
        u = np.asarray(ulysses, dtype=np.int64)
        d = np.broadcast_to(np.asarray(degree, dtype=np.int64), u.shape)
        bad = (u < 1) | (d % np.maximum(u, 1) != 0) | (self.max_ulysses % np.maximum(u, 1) != 0)
        if bad.any():
            k = np.flatnonzero(bad.ravel())[0]
            uk, dk = int(u.ravel()[k]), int(d.ravel()[k])
            raise SpecError(f"ulysses degree {uk} must divide the unit's {dk} ranks and the {self.max_ulysses} KV "
                            f"heads per TP rank of {self.model.name} (kv_heads {self.model.kv_heads}, tp {self.tp})")

    def _allgather_units(self, cp: Sequence[ContextParallel | None] | ContextParallel | None, n: int) -> np.ndarray:
        """Per unit: whether its context-parallel part all-gathers K/V (else a ring); None: the training's kind."""
        default = self.setup.training.cp
        if cp is None or isinstance(cp, str):  # one kind for all (the planners' hot path: no per-unit list)
            if cp not in (None, *CONTEXT_PARALLEL_KINDS):
                raise SpecError(f"context-parallel kind must be one of {', '.join(CONTEXT_PARALLEL_KINDS)}, "
                                f"got {cp!r}")
            return np.full(n, (cp or default) == "allgather")
        kinds = list(cp)
        wrong = next((k for k in kinds if k not in (None, *CONTEXT_PARALLEL_KINDS)), None)
        if wrong is not None or len(kinds) != n:
            raise SpecError(f"context-parallel kind must be one of {', '.join(CONTEXT_PARALLEL_KINDS)} per unit, "
                            f"got {wrong!r}" if wrong is not None else f"{len(kinds)} CP kinds for {n} units")
        return np.fromiter(((k or default) == "allgather" for k in kinds), bool, n)

    def price_units(self, doc_lengths: np.ndarray, unit_offsets: np.ndarray, degree: np.ndarray | int = 1,
                    offload_ratio: np.ndarray | float = 0.0, inter_node: np.ndarray | bool = False,
                    with_head: np.ndarray | bool | None = None, ulysses: np.ndarray | int = 1,
                    cp: Sequence[ContextParallel | None] | ContextParallel | None = None,
                    ulysses_inter: np.ndarray | bool | None = None) -> UnitCosts:
        """Per-rank cost of many units at once: unit u holds documents doc_lengths[unit_offsets[u]:
        unit_offsets[u + 1]] (a flat array, offsets increasing from 0), packed on one rank (degree 1) or each
        sharded zigzag over `degree` ranks with ring attention (REFERENCE 7.6: per ring step the max of compute
        and transfer; the first step has nothing to wait for). Degree, offload ratio, inter-node and with_head
        are per unit or one for all; with_head defaults to pp == 1; the embedding is priced with the head when
        pp == 1 (its first stage is the last). Planners price thousands of units per step: one call does it.
        Head-split context parallelism (docs/COSTMODEL.md "Ulysses and 2D"): `ulysses` u per unit splits the
        heads over consecutive groups of u members (all-to-alls of Q, K, V and O, priced over NVLink or across
        domains by `ulysses_inter`, default inter_node) and runs the unit's CP kind (`cp`, per unit or one; None:
        the training's) across the d/u groups on d/u-th of the heads; u = 1 everywhere is plain ring/all-gather."""
        s = np.asarray(doc_lengths, dtype=float)
        starts = np.asarray(unit_offsets, dtype=np.int64)
        n = len(starts)
        counts = np.diff(starts, append=len(s))
        d = np.broadcast_to(np.asarray(degree, dtype=np.int64), (n,))
        u = np.broadcast_to(np.asarray(ulysses, dtype=np.int64), (n,))
        if (u != 1).any():
            self.check_ulysses(u, d)
        ring_d = d // u  # members the context-parallel part spans (groups of u)
        ag = self._allgather_units(cp, n)
        r_off = np.broadcast_to(np.asarray(offload_ratio, dtype=float), (n,))
        inter = np.broadcast_to(np.asarray(inter_node, dtype=bool), (n,))
        u_inter = inter if ulysses_inter is None else np.broadcast_to(np.asarray(ulysses_inter, dtype=bool), (n,))
        head = np.broadcast_to(np.asarray(self.pp == 1 if with_head is None else with_head, dtype=bool), (n,))
        l = self.layers_per_stage
        # Per document: its tokens on each rank (zigzag chunk pair when sharded) and its attention core. A rank
        # computes 1/d of each document's causal area, one kernel call per document and ring step (the executor's
        # block pairs, Transformer Engine's zigzag steps): on its own keys the causal square of its two chunks, len
        # tokens; on another member's a full rectangle, len × len/2 (that member's earlier chunk) or len/2 × len,
        # the area of two chunk-length squares at the non-causal rate: t(len) + (d − 1)·2·t_full(len/2). All-gather
        # CP does the same work (the executor runs the same block pairs per member; Transformer Engine's calls of
        # each chunk over the gathered keys are full rectangles but for two chunk-length causal squares). With a
        # head split of u, a rank holds its group's u chunks on 1/u of the heads (attention time is proportional
        # to heads) and the ring runs over the d/u groups: len = u × per-rank length, time / u.
        d_doc = np.repeat(d, counts)
        u_doc, ring_doc = np.repeat(u, counts), np.repeat(ring_d, counts)
        per_rank = np.where(d_doc > 1, 2.0 * np.ceil(s / (2 * d_doc)), s)
        attn_len = per_rank * u_doc
        # A document a rank holds whole (degree 1) is a call of its own: below the table's grid, its floor.
        whole = d_doc == 1
        t_f = np.where(whole, self.attn_fwd_s(attn_len, True), self.attn_fwd_s(attn_len))
        t_b = np.where(whole, self.attn_bwd_s(attn_len, True), self.attn_bwd_s(attn_len))
        full_f, full_b = (2.0 * self.attn_full_s(attn_len / 2, way) for way in ("fwd", "bwd"))
        t_f, t_b = t_f + (ring_doc - 1) * full_f, t_b + (ring_doc - 1) * full_b
        if self.model.windowed_fraction:  # each document's local keys, whichever rank computes which part of it
            t_f, t_b = t_f * self.attn_window_x(s, "fwd"), t_b * self.attn_window_x(s, "bwd")
        tokens, attn_f, attn_b = _segment_sums(np.stack([per_rank, t_f / u_doc, t_b / u_doc]), starts, counts)
        ring_units = (ring_d > 1) & ~ag
        if ring_units.any() and any(self.glue_s[("ring_step", way)] != (0.0, 0.0) for way in ("fwd", "bwd")):
            attn_f = attn_f + np.where(ring_units, ring_d * self.attention_glue_s("ring_step", tokens, "fwd"), 0.0)
            attn_b = attn_b + np.where(ring_units, ring_d * self.attention_glue_s("ring_step", tokens, "bwd"), 0.0)
        gemm_f = self.gemm_layer_fwd_s(tokens)
        mem_f = self._lookup("mem_layer_fwd", tokens)
        mem_b = self._lookup("mem_layer_bwd", tokens)
        rec = self.setup.training.recompute
        calls = counts * ring_d  # attention calls per layer and direction: one per document and ring step
        # Recompute replays in the backward what the forward did not keep: full, the whole forward (its TP
        # collectives below); selective, the attention core when it is materialised (GPT blocks) and, for SwiGLU
        # models, the activation product (costmodel.memory keeps neither); with Megatron-core's recompute modules,
        # what each layer kind's modules rerun (costmodel.recompute), the core's calls with their set-up.
        core = (any(r.attention for _, r in self.replays) if self.replays
                else rec == "selective" and self.unfused_attention)
        over_f = self.layer_overhead_s + calls * self.attn_call_overhead_s
        over_b = (2.0 * self.layer_overhead_s + calls * self.attn_call_overhead_s + (over_f if rec == "full" else 0.0)
                  + (calls * self.attn_call_overhead_s if core and self.replays else 0.0) + self.grad_accum_layer_s)
        fwd_layer = gemm_f + attn_f + mem_f + over_f
        bwd_layer = self.gemm_layer_bwd_s(tokens) + attn_b + mem_b + over_b  # dgrad + wgrad
        mem_rec = self._lookup("mem_recompute", tokens) if rec != "none" else 0.0
        attn_rec = attn_f if rec == "full" or core else 0.0
        gemm_rec = gemm_f if rec == "full" else (self._lookup("gemm_recompute", tokens) if self.replays else 0.0)
        bwd_layer = bwd_layer + (gemm_rec + attn_rec + mem_rec)
        # K/V bytes a rank passes per ring step: its group's u chunks on 1/u of the KV heads, i.e. its own tokens'
        kv_bytes = tokens * 2 * self.model.kv_width / self.tp * self.bytes_per_elem
        # full recompute and a recomputed core (Megatron-core's core_attn: TE's CP attention) replay the forward's
        # K/V exchange
        passes_f = 2 if rec == "full" or (core and self.replays) else 1
        if ag.all():
            ring_comm, ring_exp_f, ring_exp_b = self._allgather_cp_s(tokens, kv_bytes, ring_d, inter, l, passes_f)
        else:
            comm_f = np.where(inter, self.p2p_s(kv_bytes, True), self.p2p_s(kv_bytes, False))
            comm_b = np.where(inter, self.p2p_s(2 * kv_bytes, True), self.p2p_s(2 * kv_bytes, False))  # dK/dV back
            ring_steps = l * (ring_d - 1)  # 0 for packed units and pure Ulysses: no ring
            ring_comm = ring_steps * (passes_f * comm_f + comm_b)
            if self.transfers_on_cores:  # a CPU node without a spare core (cores_all_busy): gloo's threads move the
                # data on the cores that compute, so no transfer hides, and every ring wait is a blocking meeting;
                # per layer d − 1 K/V transfers forward (and in a recompute), backward d − 1 for K/V and d for the
                # dK/dV accumulator coming home, on its own and in fp32 (planner/runtime/cp.py); each a meeting
                # (sync_wake_of), each after its step's attention: the forward's, the backward's
                w_f, w_b = self.wake_after_s(attn_f / ring_d), self.wake_after_s(attn_b / ring_d)
                homes = np.where(ring_d > 1, l * ring_d, 0)
                acc = kv_bytes * 4 / self.bytes_per_elem
                acc_b = np.where(inter, self.p2p_s(acc, True), self.p2p_s(acc, False))
                ring_exp_f = ring_steps * (comm_f + w_f)
                ring_exp_b = ring_steps * ((passes_f - 1) * (comm_f + w_f) + comm_f + w_b) + homes * (acc_b + w_b)
            else:  # each transfer under its step's attention: what the step leaves exposed
                left_f = np.maximum(0.0, comm_f - attn_f / ring_d)
                ring_exp_f = ring_steps * left_f
                ring_exp_b = ring_steps * ((passes_f - 1) * left_f + np.maximum(0.0, comm_b - attn_b / ring_d))
            if ag.any():  # units of both kinds in one batch
                ag_comm, ag_f, ag_b = self._allgather_cp_s(tokens, kv_bytes, ring_d, inter, l, passes_f)
                ring_comm, ring_exp_f, ring_exp_b = (np.where(ag, ag_comm, ring_comm), np.where(ag, ag_f, ring_exp_f),
                                                     np.where(ag, ag_b, ring_exp_b))
        if (u > 1).any():  # the all-to-alls are not overlapped (REFERENCE 18): exposed in full
            a2a_comm, a2a_f, a2a_b = self._ulysses_a2a_s(tokens, u, u_inter, l, passes_f)
            ring_comm, ring_exp_f, ring_exp_b = ring_comm + a2a_comm, ring_exp_f + a2a_f, ring_exp_b + a2a_b
        tp_f = tp_b = head_comm_f = head_comm_b = embed_comm = np.zeros(n)
        if self.tp > 1 or self.experts.all_to_all:  # tp = 1: an expert group over TP groups, its all-to-alls
            tp_f, tp_b = self.layer_tp_comm_s(tokens)
            if self.setup.training.ep_comm_overlap and self.experts.all_to_all:
                hidden = self.ep_overlap_hidden_s(tokens, fwd_layer, bwd_layer)
                tp_f, tp_b = tp_f - hidden, tp_b - hidden
            tp_f, tp_b = l * tp_f, l * tp_b
        if self.tp > 1:
            h_bytes = tokens * self.model.hidden * self.bytes_per_elem
            if self.setup.training.sequence_parallel:  # the head's input gathered forward, its gradient scattered
                head_comm_f = self._tp("all_gather", tokens, h_bytes)  # backward; the embedding's output scattered
                head_comm_b = embed_comm = self._tp("reduce_scatter", tokens, h_bytes)
            else:  # Megatron's f at the head (its input gradient all-reduced backward); the embedding's output
                head_comm_b = embed_comm = self.tp_all_reduce_s(tokens)  # all-reduced
            # the vocab-parallel loss, forward: all-reduces of each token's logit max, then of its target logit and
            # sum of exponentials (fp32; the replay's two, where Megatron-LM all-reduces the last two apart)
            comm_loss = self._tp("all_reduce", tokens, tokens * 4) + self._tp("all_reduce", tokens, tokens * 8)
        off_f = off_b = np.zeros(n)
        if l > 2:
            nbytes = r_off * tokens * self.a_tok
            off = r_off > 0
            off_f = np.where(off, (l - 2) * np.maximum(0.0, self.host_copy_s(nbytes, "d2h") - fwd_layer), 0.0)
            off_b = np.where(off, (l - 2) * np.maximum(0.0, self.host_copy_s(nbytes, "h2d") - bwd_layer), 0.0)
        gemm_h = self._lookup("gemm_head", tokens)
        head_f = gemm_h + self._lookup("mem_head_fwd", tokens) + head_comm_f + (comm_loss if self.tp > 1 else 0.0)
        head_b = self._lookup("gemm_head_bwd", tokens) + self._lookup("mem_head_bwd", tokens) + head_comm_b
        mtp = self.setup.training.mtp_layers
        if mtp or self.pp == 1:
            embed_f, embed_b = self._lookup("mem_embed_fwd", tokens) + embed_comm, self._lookup("mem_embed_bwd", tokens)
        if mtp:  # multi-token prediction on the last stage, per depth: the next tokens' embedding, the projection,
            proj = self._lookup("gemm_mtp_proj", tokens)  # one more layer (as the stage's) and the head again
            proj_f, proj_b = self._mtp_proj_tp_s(tokens) if self.tp > 1 else (0.0, 0.0)
            if self.setup.training.recompute == "full":  # Megatron checkpoints the depth: its projection replays
                proj_b = proj_b + proj + proj_f
            head_f, head_b = (head_f + mtp * (embed_f + proj + proj_f + fwd_layer + (tp_f + ring_exp_f) / l + head_f),
                              head_b + mtp * (embed_b + self._lookup("gemm_mtp_proj_bwd", tokens) + proj_b
                                              + bwd_layer + (tp_b + ring_exp_b) / l + head_b))
        if self.pp == 1:  # the embedding: lookup, then its reduce-scatter (all-reduce) over TP; scatter-add back
            head_f, head_b = head_f + embed_f, head_b + embed_b
        head_b = head_b + self.grad_accum_head_s  # once: the head's (and MTP's) parameters, whatever the depths
        zero = np.zeros(n)
        costs = UnitCosts(fwd_compute_s=l * fwd_layer, bwd_compute_s=l * bwd_layer, ring_comm_s=ring_comm,
                          ring_exposed_fwd_s=ring_exp_f, ring_exposed_bwd_s=ring_exp_b, tp_comm_fwd_s=tp_f,
                          tp_comm_bwd_s=tp_b, offload_exposed_fwd_s=off_f, offload_exposed_bwd_s=off_b,
                          head_fwd_s=np.where(head, head_f, zero), head_bwd_s=np.where(head, head_b, zero),
                          tokens_per_rank=tokens.astype(np.int64),
                          attn_fwd_compute_s=l * attn_f, attn_bwd_compute_s=l * (attn_b + attn_rec),
                          mem_fwd_s=l * mem_f, mem_bwd_s=l * (mem_b + mem_rec), overhead_fwd_s=l * over_f,
                          overhead_bwd_s=l * over_b)
        if self.shares_cores:  # a lockstep group of more ranks than its node's cores (CPU): all it does stretches alike
            x = lockstep_x_of(self.profile, self.setup.cluster.gpus_per_node, d * self.tp)
            if (x != 1.0).any():
                costs = UnitCosts(**{f.name: getattr(costs, f.name) if f.name == "tokens_per_rank"
                                     else x * getattr(costs, f.name) for f in fields(UnitCosts)})
        return costs

    def ep_overlap_max_hidden_s(self, tokens: np.ndarray | float) -> np.ndarray:
        """The most the EP overlap can hide of one layer's communication each way: its dispatch and combine
        all-to-alls (the MoE layers' share); 0 without it. What a lower bound may leave out."""
        if not (self.setup.training.ep_comm_overlap and self.experts.all_to_all):
            return np.zeros_like(np.asarray(tokens, dtype=float))
        return self.stage_model.moe_fraction * self._lookup("moe_comm", tokens)

    def ep_overlap_hidden_s(self, tokens: np.ndarray | float, fwd_layer: np.ndarray | float,
                            bwd_layer: np.ndarray | float) -> np.ndarray:
        """What Megatron-core's EP all-to-all overlap hides of one layer's dispatch and combine, per direction (the
        layer's share of MoE layers weighted in). Its combined 1F1B runs one micro-batch's forward of a layer beside
        another's backward of one, on a compute and a comm stream, in four steps (fine_grained_callables, 0.14+,
        with delay_wgrad_compute): the backward's combine under the forward's attention and router, the forward's
        dispatch under the experts' dgrad, the backward's dispatch under their wgrad and the forward's experts, the
        forward's combine under the backward's attention. A step of all-to-all c beside compute g takes
        max(c, g + c·(1 − κ)): while the all-to-all runs it holds its dispatcher's SMs (moe.dispatcher_sms: DeepEP's
        20, HybridEP's 8 across nodes) and the compute runs at κ = 1 − those/SMs of its speed (profiles without
        an SM count: κ = 1). Exposed per pair: the
        four steps less the compute; each direction is charged half, against the two all-to-alls each way
        unoverlapped."""
        mu = self.stage_model.moe_fraction
        a = self._lookup("moe_comm", tokens) / 2.0  # one all-to-all (dispatch or combine, ETP collectives with it)
        x_f = self._lookup("gemm_experts", tokens)  # the experts' forward GEMMs, their dgrad and wgrad
        x_d, x_w = self._lookup("gemm_experts_dgrad", tokens), self._lookup("gemm_experts_wgrad", tokens)
        a_f, a_b = fwd_layer - mu * x_f, bwd_layer - mu * (x_d + x_w)  # the rest: attention, router, shared expert
        sms = self.profile.constants.get("gemm_sms", {}).get("value")
        slow = 1.0 - dispatcher_sms(self.experts.dispatcher, self.experts.inter_node) / float(sms) if sms else 1.0

        def step(c: np.ndarray, g: np.ndarray) -> np.ndarray:
            return np.maximum(c, g + c * (1.0 - slow))

        pair = step(a, a_f) + step(a, x_d) + step(a, x_w + x_f) + step(a, a_b)
        exposed = pair - (a_f + a_b + x_f + x_d + x_w)
        return mu * (2.0 * a - exposed / 2.0)

    def _allgather_cp_s(self, tokens: np.ndarray, kv_bytes: np.ndarray, d: np.ndarray, inter: np.ndarray,
                        layers: int, passes_f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All-gather context parallelism per unit: each layer all-gathers the d members' K/V before attention
        (nccl-tests S = the gathered bytes) and reduce-scatters dK/dV (fp32: twice the bytes) after its
        backward, neither hidden; one group per TP rank, tp of them at once (across domains they share the NICs).
        Returns (all transfer time, exposed forward, exposed backward)."""
        ag, rs = np.zeros(len(d)), np.zeros(len(d))
        for sel, g, scope in _group_shapes(d, inter):
            ag[sel] = self.profile.collective_time_s("all_gather", kv_bytes[sel] * g, g, scope, self.tp)
            rs[sel] = self.profile.collective_time_s("reduce_scatter", 2 * kv_bytes[sel] * g, g, scope, self.tp)
        meet = self.layer_wake_s(tokens)  # each a blocking meeting (sync_wake_of)
        ag, rs = ag + meet, rs + meet
        exp_f = layers * ag
        exp_b = layers * ((passes_f - 1) * ag + rs)
        return exp_f + exp_b, exp_f, exp_b

    def _ulysses_a2a_s(self, tokens: np.ndarray, u: np.ndarray, inter: np.ndarray, layers: int,
                       passes_f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ulysses all-to-alls per unit over its groups of u members (REFERENCE 7.5; nccl-tests S = the per-rank
        send buffer, tokens × width/t × b, of which (u−1)/u leaves the rank). Forward: Q, K, V (K and V at the KV
        width: GQA) before attention, O after it. Backward as Transformer Engine's AttnFuncWithCPAndQKVOA2A: O is
        saved in token layout (no activation beyond ring CP's) and re-exchanged with dO, then dQ, dK, dV.
        Returns (all transfer time, exposed forward, exposed backward); units with u = 1 get 0."""
        q_bytes = tokens * self.model.q_width / self.tp * self.bytes_per_elem
        o_bytes = tokens * self.model.attn_out_width / self.tp * self.bytes_per_elem  # MLA: V's head width
        kv_bytes = tokens * self.model.kv_width / self.tp * self.bytes_per_elem
        fwd, bwd = np.zeros(len(u)), np.zeros(len(u))
        for sel, g, scope in _group_shapes(u, inter):
            t_q = self.profile.collective_time_s("all_to_all", q_bytes[sel], g, scope, self.tp)
            t_o = self.profile.collective_time_s("all_to_all", o_bytes[sel], g, scope, self.tp)
            t_kv = self.profile.collective_time_s("all_to_all", kv_bytes[sel], g, scope, self.tp)
            fwd[sel] = t_q + t_o + 2 * t_kv  # Q, O; K, V
            bwd[sel] = 2 * t_o + t_q + 2 * t_kv  # O, dO, dQ; dK, dV
        # blocking meetings (sync_wake_of), as the executor exchanges: Q, K and V in one, O in another; backward
        # the same two
        meet = np.where(np.asarray(u) > 1, 2 * self.layer_wake_s(tokens), 0.0)
        fwd, bwd = fwd + meet, bwd + meet
        exp_f = layers * fwd
        exp_b = layers * ((passes_f - 1) * fwd + bwd)  # full recompute replays the forward's all-to-alls
        return exp_f + exp_b, exp_f, exp_b

    def memory_layer_s(self, tokens: np.ndarray | float, recompute: bool) -> np.ndarray:
        """Memory-bound kernels of one layer on `tokens` tokens per rank, forward + backward (+ what a recompute
        policy replays), as price_units charges them."""
        t = self._lookup("mem_layer_fwd", tokens) + self._lookup("mem_layer_bwd", tokens)
        return t + self._lookup("mem_recompute", tokens) if recompute else t

    def layer_tp_comm_s(self, tokens: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """One layer's exposed TP-group communication for `tokens` tokens, (forward, backward) as price_units
        charges them: without tp_comm_overlap every collective (with SP 2 all-gathers + 2 reduce-scatters each way,
        without it 2 all-reduces, tp_activation_s; MoE with ep > 1: the MLP's pair becomes the all-to-alls), with it
        what the GEMMs do not hide (_overlapped_tp_comm_s); full recompute replays the forward's in the backward,
        recompute modules what they rerun (a dense MLP's pair, an MoE layer's all-to-alls, MLA's latent gather)."""
        tokens = np.asarray(tokens, dtype=float)
        mu = self.stage_model.moe_fraction  # the MoE layers' share (0 dense, 1 when every layer has experts)
        pair = self.tp_activation_s(tokens) if self.tp > 1 else np.zeros_like(tokens)
        # an MoE layer's MLP: all-to-alls (all-gather dispatcher: the pair), and a shared expert's pair
        moe = self._lookup("moe_comm", tokens) if self.experts.all_to_all else pair
        shared = pair if self.model.shared_expert_ffn else 0.0
        experts = mu * (moe + shared)
        mlp_f = pair  # a dense MLP's forward pair as exposed
        if self.tp == 1:  # no TP collectives: an expert group's all-to-alls alone
            fwd = bwd = experts
        elif self.setup.training.tp_comm_overlap:  # expert GEMMs run no userbuffer overlap: their comm stays exposed
            fwd, bwd, mlp_f = self._overlapped_tp_comm_s(tokens)
            fwd, bwd = fwd + experts, bwd + experts
        else:  # the attention's pair (MLA: at its latents' width on their side), a dense MLP's in the dense layers'
            attn_f, attn_b = self._attention_pair_s(tokens, pair)  # share
            fwd, bwd = attn_f + (1.0 - mu) * pair + experts, attn_b + (1.0 - mu) * pair + experts
        if self.tp_amaxes:  # current scaling: a 4-byte amax all-reduce per gathered fp8 tensor, 2 each way
            amax = 2.0 * self._tp("all_reduce", tokens, 4.0)
            fwd, bwd = fwd + amax, bwd + amax
        if self.setup.training.recompute == "full":
            return fwd, bwd + fwd
        for w, r in self.replays:  # what recompute modules replay of the forward's collectives, per layer kind
            if r.mlp_pair:
                bwd = bwd + w * mlp_f
            if r.experts_comm:
                bwd = bwd + w * (moe + shared)
            if r.shared_pair:
                bwd = bwd + w * pair
            if r.latent_gather and self.tp > 1:
                width = self.model.attn_gather_width
                bwd = bwd + w * self._tp("all_gather", tokens, tokens * width * self.tp_gather_bytes)
        return fwd, bwd

    def _overlapped_tp_comm_s(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exposed TP communication of one layer under Transformer Engine's userbuffer overlap as Megatron-core
        configures it for Hopper (docs/COSTMODEL.md "TP overlap"). Ring exchange splits a GEMM into t row chunks
        and passes one chunk per step while the next computes, so a collective of time C beside a GEMM of split
        time G_t = t·G(m/t) shows max(0, C − G_t·(t−1)/t), plus the split's own loss G_t − G(m). Forward: the
        input all-gather under QKV (and MLP up), the reduce-scatter under the output projection (and MLP down).
        Backward: the output gradient's all-gather under the projection's (down's) dgrad, ring-exchanged; the
        input re-gathered for QKV's (up's) wgrad beside its dgrad, and dX reduce-scattered beside its wgrad, each
        in bulk: max(0, C − G). Dense layers both pairs; MoE layers the attention's only (the MLP pair weighs the
        dense layers' share). MLA gathers its latents for the up projections (ModelSpec.attn_gather_width).
        Returns (forward, backward, a dense MLP pair's forward unweighted: what recompute module mlp replays)."""
        t = self.tp
        act = tokens * self.model.hidden
        ag = self._tp("all_gather", tokens, act * self.tp_gather_bytes)
        rs = self._tp("reduce_scatter", tokens, act * self.bytes_per_elem)
        ag_attn, rs_attn = ag, rs
        if self.model.is_mla:  # the up projections' input: the latents
            width = self.model.attn_gather_width
            ag_attn = self._tp("all_gather", tokens, tokens * width * self.tp_gather_bytes)
            rs_attn = self._tp("reduce_scatter", tokens, tokens * width * self.bytes_per_elem)
        pairs = [("qkv", "o", 1.0, ag_attn, rs_attn)]
        if self.stage_model.moe_fraction < 1.0:
            up = "gate_up" if self.model.mlp == "swiglu" else "up"
            pairs.append((up, "down", 1.0 - self.stage_model.moe_fraction, ag, rs))
        fwd = bwd = mlp_f = np.zeros_like(tokens)
        def ring(c: np.ndarray, gemm: str) -> np.ndarray:  # c beside `gemm` split into t row chunks
            g, split = self._lookup(gemm, tokens), t * self._lookup(gemm, tokens / t)
            return np.maximum(0.0, c - split * (t - 1) / t) + (split - g)

        # ag_in, rs_in: the first GEMM's input gathered and its input gradient scattered; ag: the second's dY gathered
        for first, second, w, ag_in, rs_in in pairs:
            ring1, ring2 = ring(ag_in, f"gemm_{first}"), ring(rs, f"gemm_{second}")
            bulk = (np.maximum(0.0, ag_in - self._lookup(f"gemm_{first}_dgrad", tokens))
                    + np.maximum(0.0, rs_in - self._lookup(f"gemm_{first}_wgrad", tokens)))
            fwd = fwd + w * (ring1 + ring2)
            bwd = bwd + w * (ring(ag, f"gemm_{second}_dgrad") + bulk)
            if first != "qkv":
                mlp_f = ring1 + ring2
        return fwd, bwd, mlp_f

    def _attention_pair_s(self, tokens: np.ndarray, pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The attention's TP collectives, (forward, backward), not overlapped. With SP: the input all-gathered
        before the projections and the output reduce-scattered after O; backward the output gradient gathered and
        the input gradient scattered. Without SP: an all-reduce of the output forward, of the input gradient
        backward (tp_all_reduce_s). The input side is MLA's latents, else h, where both directions are the layer's
        `pair` (tp_activation_s)."""
        if not self.model.is_mla:
            return pair, pair
        h, lat = float(self.model.hidden), float(self.model.attn_gather_width)
        if self.setup.training.sequence_parallel:
            return (self.tp_pair_s(tokens, True, gather_width=lat),
                    self.tp_pair_s(tokens, True, gather_width=h, scatter_width=lat))
        return self.tp_all_reduce_s(tokens), self.tp_all_reduce_s(tokens, lat)

    def _mtp_proj_tp_s(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The TP collectives of an MTP depth's 2h -> h projection, (forward, backward), as Megatron-core's
        MultiTokenPredictionLayer runs it: a column-parallel linear whose h/t outputs are gathered whole on every
        rank. With SP its 2h input is all-gathered over the sequence forward (fp8 under current scaling, as a
        layer's) and its gradient reduce-scattered backward, and the gathered output is split back to the rank's
        tokens, whose backward all-gathers h; without SP the output's gather is the forward's only collective, the
        input gradient's all-reduce (2h) the backward's. As a layer's collectives without tp_comm_overlap: the
        weight gradient's re-gather of the input beside the data gradient is not priced, and none is overlapped."""
        h = float(self.model.hidden)
        ag_h = self._tp("all_gather", tokens, tokens * h * self.bytes_per_elem)
        if self.setup.training.sequence_parallel:
            return (self._tp("all_gather", tokens, tokens * 2 * h * self.tp_gather_bytes) + ag_h,
                    self._tp("reduce_scatter", tokens, tokens * 2 * h * self.bytes_per_elem) + ag_h)
        return ag_h, self.tp_all_reduce_s(tokens, 2 * h)

    def tp_activation_s(self, tokens: np.ndarray) -> np.ndarray:
        """The TP collectives of one layer's activation (or its gradient) in one direction: with SP an all-gather
        plus a reduce-scatter (tp_pair_s), without it the one all-reduce that Megatron-LM (and meshplan's replay)
        run, priced from the all-reduce table (tp_all_reduce_s)."""
        if self.setup.training.sequence_parallel:
            return self.tp_pair_s(tokens, layer=True)
        return self.tp_all_reduce_s(tokens)

    def tp_all_reduce_s(self, tokens: np.ndarray, width: float | None = None) -> np.ndarray:
        """One all-reduce of tokens × width (h by default) over the TP group, in the training dtype: TP without
        SP. Looked up as what runs, not as a gather plus a scatter: one latency floor, and the all-reduce's own
        algorithm and rate where the profile measured it (NVLS on Hopper, gloo on CPU)."""
        return self._tp("all_reduce", tokens, tokens * (width or self.model.hidden) * self.bytes_per_elem)

    def tp_pair_s(self, tokens: np.ndarray, layer: bool = False, gather_width: float | None = None,
                  scatter_width: float | None = None) -> np.ndarray:
        """One all-gather plus one reduce-scatter of the TP group's gathered activation (tokens × h, or the widths
        given); a layer's all-gather (`layer`) moves fp8 under current scaling (tp_gather_bytes), the head's bf16."""
        h = self.model.hidden
        gather = self.tp_gather_bytes if layer else self.bytes_per_elem
        return (self._tp("all_gather", tokens, tokens * (gather_width or h) * gather)
                + self._tp("reduce_scatter", tokens, tokens * (scatter_width or h) * self.bytes_per_elem))

    def unit_time_s(self, doc_lengths, degree: int = 1, offload_ratio: float = 0.0, inter_node: bool = False) -> float:
        return self.unit_cost(doc_lengths, degree, offload_ratio, inter_node).total_s

    # ---- fast estimate for heuristics -----------------------------------------------------------
    def fit_layer_time(self, max_len: int | None = None) -> dict[str, float]:
        """Least-squares fit of one layer's fwd+bwd time of a whole document on one rank,
        T(s) = α1·s² + β1·s + γ (ByteScale §5.2), relative error weighted, coefficients ≥ 0."""
        hi = max_len or max(2 * self.capacity_tokens, 65536)
        s = np.unique(np.round(np.geomspace(64, hi, 48)))
        gemm = self.gemm_layer_fwd_s(s) + self.gemm_layer_bwd_s(s)
        mem = self._lookup("mem_layer_fwd", s) + self._lookup("mem_layer_bwd", s)
        t = gemm + self.doc_attn_s(s, "fwd") + self.doc_attn_s(s, "bwd") + mem
        a = np.stack([s * s, s, np.ones_like(s)], axis=1) / t[:, None]
        coef, *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
        if (coef < 0).any():  # refit without the negative terms
            keep = coef >= 0
            c2, *_ = np.linalg.lstsq(a[:, keep], np.ones_like(t), rcond=None)
            coef = np.zeros(3)
            coef[keep] = np.maximum(c2, 0)
        pred = a @ coef  # predicted / measured
        fit_t = pred * t
        r2 = 1.0 - float(np.sum((fit_t - t) ** 2) / np.sum((t - t.mean()) ** 2))
        return {"alpha1_s_per_token2": float(coef[0]), "beta1_s_per_token": float(coef[1]),
                "gamma_s": float(coef[2]), "max_rel_err": float(np.max(np.abs(pred - 1))), "r2": r2}

    def doc_time_estimate_s(self, lengths: np.ndarray | float, degree: np.ndarray | int = 1) -> np.ndarray:
        """Fast per-rank estimate of a document sharded over `degree` ranks: L·(α1 s²/d + β1 s/d) from the
        fit (γ is charged once per unit by callers). Used to balance; final numbers use unit_cost."""
        f = self._curves["fit"]
        s = np.asarray(lengths, float)
        d = np.asarray(degree, float)
        return self.layers_per_stage * (f["alpha1_s_per_token2"] * s * s + f["beta1_s_per_token"] * s) / d

    @property
    def unit_overhead_s(self) -> float:
        """γ of the fit for all of a stage's layers: the per-micro-batch fixed cost."""
        return self.layers_per_stage * self._curves["fit"]["gamma_s"]

    # ---- step-level communication ---------------------------------------------------------------
    def grad_sync_s(self, hdp_ranks: int | None = None) -> float:
        """Gradient synchronisation over the HDP ranks of a stage (REFERENCE 7.5): all-reduce of fp32
        grads, or with the distributed optimizer a reduce-scatter of grads plus an all-gather of params; plus
        fp8 delayed scaling's amax all-reduce (fp8_amax_sync_s, 0 otherwise); the shared embedding's all-reduce
        between the first and the last stage (embedding_sync_s, 0 otherwise)."""
        d = hdp_ranks or self.setup.hdp
        if d not in self._grad_sync:  # simulations ask once or more per step; the lookup filters tables
            self._grad_sync[d] = ((self._grad_sync_uncached_s(d) if d > 1 else 0.0) + self.fp8_amax_sync_s(d)
                                  + self.embedding_sync_s())
        return self._grad_sync[d]

    def _grad_sync_uncached_s(self, d: int) -> float:
        return sum(self._grad_sync_parts_s(d))

    def _grad_sync_parts_s(self, d: int) -> tuple[float, float]:
        """(gradient reduction, parameter all-gather) over d HDP ranks: an all-reduce alone, or the distributed
        optimizer's reduce-scatter and all-gather; ZeRO-3's rounds did both already."""
        if d not in self._grad_sync_parts:  # every simulated step asks (exposed_chunked_grad_sync_s)
            self._grad_sync_parts[d] = self._grad_sync_parts_uncached_s(d)
        return self._grad_sync_parts[d]

    def _grad_sync_parts_uncached_s(self, d: int) -> tuple[float, float]:
        tr = self.setup.training
        if d <= 1 or tr.zero_stage == 3:  # every round reduce-scattered its gradients already (costmodel.zero)
            return 0.0, 0.0
        g = tr.expert_groups
        fp8_dense, fp8_experts = self._fp8_gathered_params()
        if g == 1:  # one collective over every parameter of the rank
            return self._sync_parts_s(params_per_rank(self.setup), fp8_dense + fp8_experts, d)
        # an expert group over g TP groups: the dense parameters sync over the d HDP ranks, the experts over the
        # d/g ranks g apart that hold the same experts (Megatron-core's expert data-parallel group), one after
        # the other
        if d % g:
            raise ValueError(f"{d} HDP ranks do not hold whole expert groups of {g} TP groups")
        experts = expert_params_per_rank(self.setup, stage_parts(self.setup, None, None)[0])  # with MTP's
        dense = self._sync_parts_s(params_per_rank(self.setup) - experts, fp8_dense, d)
        expert = self._sync_parts_s(experts, fp8_experts, d // g, stride=g)
        return dense[0] + expert[0], dense[1] + expert[1]

    def _sync_parts_s(self, params: float, fp8_params: float, group: int, stride: int = 1) -> tuple[float, float]:
        """(gradient reduction, parameter all-gather) of `params` parameters per rank over `group` HDP ranks
        `stride` apart, one collective per TP rank and stride offset at once (a domain holds at most its GPUs' worth
        of them: as many as it has GPUs when the group keeps one member per domain); `fp8_params` of them gathered
        in fp8. An all-reduce alone without the distributed optimizer."""
        if group <= 1:
            return 0.0, 0.0
        tr, mesh = self.setup.training, self.setup.mesh
        scope = "inter" if mesh.spans_domains([0, (group - 1) * stride]) else "intra"
        gb, pb = DTYPE_BYTES[tr.grad_dtype], tr.dtype_bytes
        at_once = min(self.tp * stride, mesh.gpus_per_domain)
        if tr.zero_stage >= 1:
            gathered = params * pb - fp8_params * (pb - 1)  # the fp8 GEMMs' weights travel in fp8, 1 B each
            return (float(self.profile.collective_time_s("reduce_scatter", params * gb, group, scope, at_once)),
                    float(self.profile.collective_time_s("all_gather", gathered, group, scope, at_once)))
        return float(self.profile.collective_time_s("all_reduce", params * gb, group, scope, at_once)), 0.0

    def _fp8_gathered_params(self) -> tuple[float, float]:
        """(dense, expert) parameters of the rank gathered in fp8: the fp8 GEMMs' weights under fp8_param_gather,
        (0, 0) otherwise."""
        tr = self.setup.training
        if not tr.fp8_param_gather:
            return 0.0, 0.0
        dense, experts = fp8_gemm_params_parts(self.stage_model, self.tp, tr.expert_ranks)
        return self.layers_per_stage * dense, self.layers_per_stage * experts

    def exposed_grad_sync_s(self, hdp_ranks: int | None, backward_window_s: float) -> float:
        """The gradient sync left after the backward, the last backward taking `backward_window_s`: one model chunk
        (exposed_chunked_grad_sync_s)."""
        return self.exposed_chunked_grad_sync_s(hdp_ranks, [(-backward_window_s, 0.0)])

    def exposed_chunked_grad_sync_s(self, hdp_ranks: int | None, last_backwards_s: Sequence[tuple[float, float]],
                                    shares: Sequence[float] | None = None) -> float:
        """The gradient sync left after the step's last backward, given (start, end) of each model chunk's last
        backward relative to that end (≤ 0; interleaved pipelines finish their chunks apart) and each chunk's share
        of the stage's gradients (`shares`, default equal; chunks of unequal layers: planner.schedule.ops.
        chunk_gradient_shares). Without overlap_grad_reduce all of it. With it (Megatron-core DDP) a chunk's buckets
        of DDP_BUCKET_PARAMS are reduced, one bucket after another across chunks, as its last backward produces
        them, the last bucket after it ends. With overlap_param_gather the distributed optimizer's all-gather runs
        under the next step's forward, its first bucket exposed. fp8's amax all-reduce and the shared embedding's
        all-reduce run after the backward, never hidden."""
        d = hdp_ranks or self.setup.hdp
        tr = self.setup.training
        after = self.fp8_amax_sync_s(d) + self.embedding_sync_s()  # never hidden
        reduce_s, gather_s = self._grad_sync_parts_s(d)
        bucket = min(1.0, DDP_BUCKET_PARAMS / params_per_rank(self.setup))
        if tr.overlap_param_gather:
            gather_s *= bucket
        if not tr.overlap_grad_reduce:
            return reduce_s + gather_s + after
        if shares is None:  # a chunk's gradients: the stage's over its chunks
            shares = [1.0 / len(last_backwards_s)] * len(last_backwards_s)
        if len(shares) != len(last_backwards_s):
            raise ValueError(f"{len(shares)} gradient shares for {len(last_backwards_s)} chunk windows")
        done = -np.inf
        for (start, end), x in sorted(zip(last_backwards_s, shares), key=lambda w: w[0][1]):
            share = reduce_s * x
            done = max(max(start, done) + share, end + min(share, reduce_s * bucket))
        return max(0.0, done) + gather_s + after

    def fp8_amax_sync_s(self, hdp_ranks: int | None = None) -> float:
        """fp8 delayed scaling's amax reduction (0 otherwise): Transformer Engine all-reduces (max) the current
        amaxes of every scaled tensor, one buffer for the forward's and one for the backward's, over the
        stage's hdp·tp ranks; once per step here, after the last backward (a per-micro-batch reduction would
        hold HDP ranks that run different unit counts in lockstep) [assumption]. 4 B per tensor."""
        fwd, bwd = fp8_scaled_tensors(self.setup)
        d = hdp_ranks or self.setup.hdp
        if not fwd or d * self.tp <= 1:
            return 0.0
        group, scope = d * self.tp, "inter" if self.setup.mesh.group_spans_domains(d) else "intra"
        return float(sum(self.profile.collective_time_s("all_reduce", 4.0 * n, group, scope) for n in (fwd, bwd)))

    def embedding_sync_s(self) -> float:
        """The shared word embedding's gradient all-reduce between the first and the last pipeline stage, where the
        last holds a copy (a tied LM head, or multi-token prediction's embedding): Megatron-core's
        _allreduce_word_embedding_grads in finalize_model_grads, after the data-parallel sync, exposed. 0 with pp = 1
        (one copy) or no copy. Each (HDP, TP) rank pair of the two stages reduces its vocab/t rows of the gradient
        (grad_dtype) at once, each GPU on its own link; an all-reduce of two ranks moves S bytes each way (ring
        factor 2(n − 1)/n = 1): one P2P transfer of S, across domains where the two stages sit apart."""
        m, tr, mesh = self.model, self.setup.training, self.setup.mesh
        if self.pp <= 1 or not (m.tied_embeddings or tr.mtp_layers):
            return 0.0
        nbytes = m.vocab / self.tp * m.hidden * DTYPE_BYTES[tr.grad_dtype]
        return float(self.p2p_s(nbytes, mesh.stages_in_different_domains(0, self.pp - 1, 0)))

    def optimizer_step_s(self, hdp_ranks: int | None = None) -> float:
        """The optimizer step on the parameters this rank updates (its ZeRO shard of the stage's, or all of them),
        memory-bound passes priced by their bytes (costmodel.elementwise): Megatron-core's clipped Adam with its
        master-to-model copy, then its whole gradient buffer zeroed (zero_stage < 3); with eager kernels torch's:
        FSDP2's clipped AdamW under ZeRO-3, else the replay's fused AdamW over all its parameters."""
        d = hdp_ranks or self.setup.hdp
        tr = self.setup.training
        p = sharded_state_params(self.setup) / d if tr.zero_stage >= 1 else params_per_rank(self.setup)
        if tr.kernels == "eager":  # the replay updates every parameter it holds (it shards no optimizer state)
            passes = [p * FSDP2_OPTIMIZER_BYTES if tr.zero_stage == 3
                      else params_per_rank(self.setup) * REPLAY_OPTIMIZER_BYTES]
        else:
            grad_bytes = DTYPE_BYTES[tr.grad_dtype]
            passes = [p * (precision_aware_optimizer_bytes(grad_bytes) if tr.optimizer_moments != "fp32" else
                           MEGATRON_OPTIMIZER_BYTES + (MEGATRON_BF16_GRAD_CAST_BYTES if grad_bytes == 2 else 0))]
            if tr.zero_stage < 3:
                passes.append(params_per_rank(self.setup) * grad_bytes)
        return float(sum(self.profile.memory_time_s(b) for b in passes)) * self.compute_share

    def step_end_s(self, hdp_ranks: int | None = None) -> float:
        """What follows a stage's last backward each step: the gradient synchronisation with fp8's amax reduction
        (exposed: Megatron's default keeps it after the backward) and the optimizer step."""
        return self.grad_sync_s(hdp_ranks) + self.optimizer_step_s(hdp_ranks)

    def share_at(self, busy_ranks: int) -> float:
        """The compute share while `busy_ranks` of a node's ranks compute (the others wait or are done): units are
        priced with every rank of the node busy (`compute_share`); on a CPU node a rank computes faster while others
        idle (planner/simulate/cores.py). The fixed share where ranks do not share cores."""
        return compute_share_of(self.profile, max(1, busy_ranks)) if self.shares_cores else self.compute_share

    def slice_sources_s(self, tokens_per_slice: float, n: int, direction: str) -> float:
        """SlimPipe's n slices of a unit in one layer, forward or backward, beyond their blocks' attention: n(n + 1)/2
        K/V sources of one member (each slice's own block and its cached slices'), each the executor's host work per
        source (`attention_glue_s`: its block kernel's call and copies, in the forward the online-softmax merge, in
        the backward the dQ, dK and dV accumulators). 0 for one slice or without the constants (GPU profiles: the
        host runs ahead)."""
        if n <= 1:
            return 0.0
        return n * (n + 1) / 2 * float(self.attention_glue_s("source", tokens_per_slice, direction))

    def slice_full_over_causal(self, slice_tokens: np.ndarray | list[float], direction: str) -> float:
        """What a SlimPipe slice's full block of a cached slice's K/V takes over its own causal block, forward or
        backward, summed over a unit's documents at their slice lengths: the attention table's non-causal rows over
        its causal ones (planner.schedule.slice_attention_share). 2 where both run at one rate per FLOP (profiles
        without non-causal rows), 1 for an unfused kernel (it computes the whole square either way); a measured
        flash kernel runs a short causal block slower per FLOP (its diagonal tiles part masked): 1.14 at 725 tokens
        on the 2-core EPYC, where the executor's per-slice CPU followed the blocks (docs/BENCHMARKS.md)."""
        s = np.asarray(slice_tokens, dtype=float)
        causal = float(np.sum(self.attn_fwd_s(s) if direction == "fwd" else self.attn_bwd_s(s)))
        return float(np.sum(self.attn_full_s(s, direction))) / causal if causal > 0 else 2.0

    def attention_glue_s(self, kind: str, tokens: np.ndarray | float, direction: str) -> np.ndarray:
        """The executor's host work in one layer beyond the attention it runs (CPU profiles; 0 without the
        constants), per K/V source of a sliced unit's slice (kind "source") or per ring step ("ring_step"), forward
        or backward: the fixed part plus the part per token and head a member holds, as `meshplan profile` measured
        them (constants attn_{kind}_{direction}_s and attn_{kind}_token_{direction}_s,
        planner/runtime/call_overhead.py). With a head split of u a member holds u times the tokens on 1/u of the
        heads: the same."""
        fixed, per_token = self.glue_s[(kind, direction)]
        return fixed + per_token * np.asarray(tokens, dtype=float) * self.heads_per_rank

    def pp_p2p_s(self, tokens_per_rank: float) -> float:
        """One activation (or gradient) transfer between adjacent stages: s·h·b/t bytes, inter-node
        when adjacent stages sit on different nodes. On busy CPU cores a receive posted after the send also waits for
        a wake-up, which the pipeline schedule charges after the receiving rank's previous op
        (planner/simulate/pipelined.py)."""
        inter = self.setup.mesh.adjacent_stages_in_different_domains
        return float(self.p2p_s(self._handoff_bytes(tokens_per_rank), inter))

    def _handoff_bytes(self, tokens_per_rank: float) -> float:
        """What one hand-off between adjacent stages moves: s·h·b/t bytes."""
        return tokens_per_rank * self.model.hidden * self.bytes_per_elem / self.tp

    def pp_handoff_cpu_s(self, tokens_per_rank: float) -> float:
        """The host CPU of one transfer between adjacent stages (a send and its receive, on both ranks together)
        where gloo's threads move it on the cores that compute (`transfers_on_cores`), at the CPU time the cores
        take with every rank busy (× compute_share): the collective table's send_recv cpu_s of a 2-rank ring (each
        member sends and receives once a call) with as many rings at once as a stage has ranks (every pipeline and TP
        rank hands off). 0 elsewhere, and for profiles without the column."""
        if not self.transfers_on_cores:
            return 0.0
        scope = "inter" if self.setup.mesh.adjacent_stages_in_different_domains else "intra"
        return float(self.profile.collective_cpu_s("send_recv", self._handoff_bytes(tokens_per_rank), 2, scope,
                                                   self.setup.mesh.stage_size)) * self.compute_share

    def wake_after_s(self, compute_s: np.ndarray | float) -> np.ndarray:
        """A blocking meeting's wake-up (sync_wake_of) after `compute_s` of priced compute: Wake takes one core's
        work alone, the priced time over the compute share. 0 off busy CPU cores."""
        compute_s = np.asarray(compute_s, dtype=float)
        if not self.wake.plateau_s:
            return np.zeros_like(compute_s)
        return self.wake.at(compute_s / self.compute_share)

    def layer_wake_s(self, tokens: np.ndarray | float) -> np.ndarray:
        """The wake-up of a meeting inside a layer (a TP collective, an all-gather CP gather or scatter, a Ulysses
        all-to-all) for `tokens` tokens a rank: after half the layer's forward GEMMs and memory-bound kernels, the
        compute between two of a direction's meetings without attention (a lower bound: its share depends on the
        documents, which the per-token lookups here do not see)."""
        tokens = np.asarray(tokens, dtype=float)
        if not self.wake.plateau_s:
            return np.zeros_like(tokens)
        return self.wake_after_s((self.gemm_layer_fwd_s(tokens) + self._lookup("mem_layer_fwd", tokens)) / 2.0)

    def _tp(self, op: str, tokens: np.ndarray | float, nbytes: np.ndarray | float) -> np.ndarray:
        """One collective of the TP group (nccl-tests S = `nbytes`) in a unit of `tokens` tokens a rank: the table's
        transfer and, on busy CPU cores, the meeting's wake-up (layer_wake_s; GPU pricing adds nothing here)."""
        t = self._lookup(f"tp_{op}", nbytes)
        return t + self.layer_wake_s(tokens) if self.wake.plateau_s else t

    def peak_flops(self) -> float:
        return self.profile.constant("peak_bf16_flops")


def compute_share_of(profile: Profile, ranks_per_node: int) -> float:
    """How much slower each rank computes than the profile's one-thread tables with `ranks_per_node` ranks on a
    node of the profile's `cores_per_node` cores (CPU profiles; 1 without it): from the measured slowdowns with
    every core busy (b, one rank each: shared cache and memory bandwidth) and with two ranks per core (s,
    time-sliced; 2 would be a fair share at no cost): 1 → b linearly up to one rank per core, then k/c · s/2.
    Without measured slowdowns: max(1, k/c)."""
    consts = profile.constants
    cores = consts.get("cores_per_node", {}).get("value")
    if not cores:
        return 1.0
    c, k = float(cores), float(ranks_per_node)
    busy = float(consts.get("cores_busy_slowdown", {}).get("value", 1.0))
    shared = float(consts.get("cores_shared_slowdown", {}).get("value", 2.0))
    if k <= c:
        return 1.0 + (busy - 1.0) * (k - 1.0) / (c - 1.0) if c > 1 else 1.0
    return k / c * shared / 2.0


@dataclass(frozen=True)
class Wake:
    """What one blocking meeting costs beyond its transfer on busy CPU cores, against the compute before it (one
    core's work alone, s): plateau_s · t / (t + half_s), as profiles.measure.wake fits it; half_s 0: plateau_s
    whatever the compute (profiles measured before the half)."""
    plateau_s: float = 0.0  # what a meeting after a long compute costs, s
    half_s: float = 0.0  # the compute before a meeting at which it costs half the plateau, s

    def at(self, compute_s: np.ndarray | float) -> np.ndarray:
        """The wake-up after `compute_s` of one core's work alone."""
        t = np.maximum(np.asarray(compute_s, dtype=float), 0.0)
        if self.half_s <= 0.0:
            return np.full_like(t, self.plateau_s)
        return self.plateau_s * t / (t + self.half_s)


def sync_wake_of(profile: Profile, ranks_per_node: int) -> Wake:
    """What one blocking meeting of ranks (a TP collective, a pipeline hand-off, a context-parallel ring wait,
    all-gather or Ulysses all-to-all) costs beyond its transfer on a CPU node of as many ranks as cores or more: the
    rank that arrived first sleeps, and once its peer's data is there it waits for a core (profiles.measure.wake):
    the profile's `cores_busy_wake_s` / `cores_busy_wake_half_s` at one rank a core (gloo's threads that move the
    data compete with the ranks), `cores_shared_wake_s` / `cores_shared_wake_half_s` at two or more (the sleeper waits
    for another rank's time slice), each linear in the ranks between (one rank a core: the two-a-core values where the
    profile has none, and the reverse). Nothing where cores are left over, and for profiles without the constants (GPU
    profiles, CPU ones measured before them)."""
    if not cores_all_busy(profile, ranks_per_node):
        return Wake()
    consts = profile.constants
    c = float(consts["cores_per_node"]["value"])
    x = min(1.0, (ranks_per_node - c) / c)  # 0 at one rank a core, 1 at two or more

    def between(busy_key: str, shared_key: str) -> float:
        busy, shared = (consts.get(k, {}).get("value") for k in (busy_key, shared_key))
        busy, shared = (busy if busy is not None else shared), (shared if shared is not None else busy)
        busy, shared = float(busy or 0.0), float(shared or 0.0)
        return busy + (shared - busy) * x

    return Wake(between("cores_busy_wake_s", "cores_shared_wake_s"),
                between("cores_busy_wake_half_s", "cores_shared_wake_half_s"))


def cores_all_busy(profile: Profile, ranks_per_node: int) -> bool:
    """A CPU node (a profile that knows its cores) running as many ranks as cores or more: no core is left over for
    gloo's threads, which move data on the cores that compute (a transfer hides under no compute), and a rank that
    sleeps in a meeting waits for a core to wake on."""
    cores = profile.constants.get("cores_per_node", {}).get("value")
    return bool(cores) and ranks_per_node >= float(cores)


def lockstep_x_of(profile: Profile, ranks_per_node: int, group: np.ndarray) -> np.ndarray:
    """How much longer a unit takes than the node's compute share gives when its `group` ranks (degree × tp) run in
    lockstep (ring steps, TP collectives) on a node of fewer cores (CPU profiles): between two synchronisations the
    c cores run c of its g ranks and the others after them, ⌈g/c⌉ turns where sharing priced g/c (wave quantisation
    of a group onto cores; bench.lockstep: 3 ranks on 2 cores 1.31x free, 4 in one group 1.08x, two groups of 2
    0.97x, against 1.33, 1 and 1). 1 for a group that fits the cores, and for GPU profiles."""
    g = np.minimum(np.asarray(group, dtype=float), float(ranks_per_node))
    cores = profile.constants.get("cores_per_node", {}).get("value")
    if not cores:
        return np.ones_like(g)
    c = float(cores)
    return np.where(g > c, np.ceil(g / c) * c / g, 1.0)


def fit_layer_time(model: ModelSpec, training: TrainingSpec, profile: Profile) -> dict[str, float]:
    """T(s) fit for a model on a profile, independent of any cluster size (one rank, ample memory)."""
    cluster = ClusterSpec(name="fit", gpu=profile.fingerprint.device, nodes=1, gpus_per_node=max(8, training.tp),
                          gpu_memory_bytes=10**15, host_memory_bytes=10**15, intra_node_bw_bytes_per_s=1e11,
                          inter_node_bw_bytes_per_s=1e10, host_link_bw_bytes_per_s=1e10, profile="")
    cm = CostModel(Setup(model, cluster.with_gpus(max(8, training.tp * training.pp)), training), profile,
                   compute_share=1.0)
    return cm.fit_layer_time(max_len=262144)


def fit_models(profile: Profile, models: Mapping[str, ModelSpec]) -> list[str]:
    """Add each model's T(s) fit, trained in the profile's main dtype, to profile.fits under the name it
    was given (what `meshplan profile --models` does); return one note per model that could not be fitted."""
    from profiles.measure.runner import main_dtype  # the measuring side, loaded only when a profile is fitted

    try:
        training = TrainingSpec(dtype=main_dtype(profile))
    except ProfileError as e:  # e.g. `--ops host_copy`: nothing to fit with, the tables are still written
        return [f"no T(s) fit for {name}: {e}" for name in models]
    notes = []
    for name, model in models.items():
        try:
            profile.fits[name] = fit_layer_time(model, training, profile)
        except (ProfileError, SpecError) as e:
            notes.append(f"no T(s) fit for {name}: {e}")
    return notes
