"""MoE layers and expert parallelism (docs/COSTMODEL.md "MoE and expert parallelism").

Under HDP only a TP group runs in lockstep, so expert parallelism lives inside it: Megatron-core's "MoE parallel
folding" (Liu et al. 2025, arXiv 2504.14960) with attention TP and expert EP × ETP on the same tp ranks, ep | tp,
etp = tp / ep by default. A static layout whose DP ranks run in lockstep (a published run) may give etp and an
expert group of ep·etp ranks over G = ep·etp/tp TP groups, as Megatron-core draws EP from DP: each expert then gets
the tokens of G TP groups. After attention each TP rank holds s/tp tokens (sequence parallelism); the router scores
them; the tokens go to the ranks owning their top_k experts and come back, as Megatron-core's token dispatchers do
(megatron/core/transformer/moe/token_dispatcher.py):

- ep = 1, `MoEAllGatherTokenDispatcher`: all-gather the hidden states over the TP group, run the local experts on
  the tokens routed to them, reduce-scatter back: the dense MLP's all-gather + reduce-scatter pair, same bytes.
- ep > 1, `MoEAlltoAllTokenDispatcher`: permute → all-to-all over EP → all-gather over ETP (etp > 1) → experts →
  reduce-scatter over ETP → all-to-all over EP → unpermute; this replaces the MLP's TP pair. The flex dispatcher
  with DeepEP moves the same tokens but crosses the network once per node a token's experts are on
  (remote_domains_per_token); costmodel.timing overlaps either with compute under ep_comm_overlap.

Each rank runs E/ep local experts on m = G·s·k·cf/E rows each (s: the TP group's tokens, k = top_k, cf: the
busiest expert's load over the mean), every expert's columns split over etp; one GEMM per expert (Megatron's
SequentialMLP) or one grouped GEMM of the local experts' rows (`moe_grouped_gemm`). Pure functions of the specs
and a profile; costmodel.timing and costmodel.memory call them."""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from costmodel.elementwise import MemKernel, layer_kernels, swiglu_saved_bytes_per_f
from costmodel.specs import ModelSpec, Recompute, SpecError, TrainingSpec
from profiles.table import Profile


# SMs an EP all-to-all holds while it runs beside compute: DeepEP's default Buffer.num_sms (deep_ep/buffer.py; the
# flex dispatcher leaves it, moe_deepep_num_sms defaults to it); NCCL's all-to-all assumed to hold as many
DEEPEP_SMS = 20

# SMs HybridEP's dispatch and combine kernels take (deep_ep/hybrid_ep_buffer.py: num_sms_dispatch_api and
# num_sms_combine_api, 8 across nodes and 32 inside one; Megatron-core's moe_flex_dispatcher_num_sms left unset)
HYBRIDEP_SMS_INTER, HYBRIDEP_SMS_INTRA = 8, 32


def dispatcher_sms(dispatcher: str, inter_node: bool) -> int:
    """SMs an EP all-to-all holds while it runs beside compute: HybridEP's by where it goes, else DeepEP's 20."""
    if dispatcher == "hybridep":
        return HYBRIDEP_SMS_INTER if inter_node else HYBRIDEP_SMS_INTRA
    return DEEPEP_SMS


def hybridep_bytes_per_token(hidden: int, ranks: int, local_experts: float, nvl_ranks: int) -> float:
    """GPU memory of HybridEP's buffers per token a rank dispatches (its max_num_of_tokens_per_rank, T; they grow to
    the largest batch seen), csrc/hybrid_ep/buffer (intranode.cu, internode.cu): receive buffers sized for every
    token of the EP group landing on one rank, T·ep slots of the token (2h B, dispatch output and combine input
    shared), its routing probabilities over the node's experts (4 B each of local_experts · nvl_ranks) and fp8
    scales (4 B per 128 elements); across N nodes the RDMA staging too: the rank's own tokens (2h), the other nodes'
    tokens with their probabilities and scales, and combine's two (N − 1)·2h buffers. `ranks`: the dispatcher's
    group, Megatron-core's tp_ep_group (ep·etp). Outside PyTorch's allocator (cudaMalloc and fabric memory).
    DeepSeek-V3 at EP 64 over 8 nodes: 1.26 MB a token, 5.2 GB at 4,096 tokens."""
    nodes = max(ranks // nvl_ranks, 1)
    slot = 2 * hidden + 4 * local_experts * min(ranks, nvl_ranks) + 4 * (hidden // 128)
    rdma = 2 * hidden + (nodes - 1) * slot + 2 * (nodes - 1) * 2 * hidden if nodes > 1 else 0.0
    return float(ranks * slot + rdma)


# DeepEP's normal-mode buffers, which the flex dispatcher allocates once (megatron/core/transformer/moe/fused_a2a.py
# get_buffer: the larger of the dispatch and combine configs' size hints for hidden_bytes = h · 2, bf16 tokens).
# Per EP group size: the NVLink receive ring's tokens per channel and the RDMA send chunk (the RDMA ring's 128
# tokens rounded up to a multiple of it), from deep_ep/buffer.py's get_dispatch_config (Config(num_sms,
# nvl_send, nvl_recv, rdma_send, rdma_recv = 128)); the combine configs' NVLink rings are the same size, their RDMA
# chunk may round the ring up by a few tokens more (at most 3%, not counted). DeepEP refuses other group sizes.
DEEPEP_CONFIGS: dict[int, tuple[int, int]] = {2: (256, 6), 4: (256, 6), 8: (256, 6), 16: (288, 20), 24: (288, 32),
                                              32: (288, 32), 64: (288, 28), 128: (560, 32), 144: (720, 12),
                                              160: (720, 12)}
DEEPEP_NVL_PEERS = 8  # NUM_MAX_NVL_PEERS: ranks a node's NVLink buffer serves
DEEPEP_RDMA_RECV_TOKENS = 128
DEEPEP_WORKSPACE_BYTES = 32 * 2**20  # NUM_WORKSPACE_BYTES, allocated beside the buffers
DEEPEP_TOPK_SLOTS = 128  # kNumMaxTopK = kNumMaxScales: every received token's slot holds room for 128 of each


def deepep_buffer_bytes(hidden: int, ranks: int) -> float:
    """GPU memory DeepEP's normal-mode buffers take on each rank of a dispatcher group of `ranks` (Megatron-core's
    tp_ep_group, the ep·etp ranks of an expert group; csrc/config.hpp
    get_nvl_buffer_size_hint / get_rdma_buffer_size_hint at 20 SMs, 10 channels): an NVLink ring per channel and
    NVLink peer of nvl_recv token slots, each the token (2h B), its source metadata (8 B), 128 top-k indices (8 B),
    weights and scales (4 B each); beyond one node an RDMA ring per channel and node of send and receive halves
    (NVSHMEM's heap); and a 32 MiB workspace. Allocated by cudaMalloc and NVSHMEM, outside PyTorch's caching allocator:
    DeepSeek-V3 (h 7168) holds 743 MiB at EP 64 and 352 MiB at EP 8, the workspace included."""
    if ranks not in DEEPEP_CONFIGS:
        raise SpecError(f"DeepEP has no configuration for {ranks} EP ranks (deep_ep Buffer.get_dispatch_config: "
                        f"{', '.join(map(str, DEEPEP_CONFIGS))}); use an expert group (ep x etp, folded: tp) of one of "
                        "those sizes or the alltoall dispatcher")
    nvl_recv, rdma_send = DEEPEP_CONFIGS[ranks]
    channels = DEEPEP_SMS // 2
    nvl_ranks, rdma_ranks = min(ranks, DEEPEP_NVL_PEERS), max(ranks // DEEPEP_NVL_PEERS, 1)
    slot = 2 * hidden + 8 + DEEPEP_TOPK_SLOTS * (8 + 4 + 4)
    nvl = channels * nvl_ranks * ((2 * rdma_ranks + 3) * 4 + nvl_recv * slot)
    rdma = 0
    if ranks > DEEPEP_NVL_PEERS:
        tokens = -(-DEEPEP_RDMA_RECV_TOKENS // rdma_send) * rdma_send
        rdma = channels * rdma_ranks * ((2 * DEEPEP_NVL_PEERS + 2) * 2 * 4 + tokens * 2 * (slot + 16))
    align = lambda b: -(-b // 128) * 128  # noqa: E731
    return float(align(nvl) + align(rdma) + DEEPEP_WORKSPACE_BYTES)


@dataclass(frozen=True)
class ExpertLayout:
    """How an MoE layer runs: ep ranks of etp each hold E/ep experts, folded into the TP group (etp = tp/ep, ep | tp)
    or, etp given, over G = ep·etp/tp TP groups (TrainingSpec checks both)."""

    tp: int = 1  # the TP group: attention TP
    ep: int = 1  # expert-parallel degree: ranks holding different experts
    capacity_factor: float = 1.0  # busiest expert's tokens over the mean (1: balanced routing)
    grouped_gemm: bool = False  # a rank's local experts in one grouped GEMM
    sequence_parallel: bool = True  # the MoE input is s/tp tokens per rank
    etp: int = 0  # expert tensor-parallel degree, ranks splitting one expert's columns; 0: tp/ep (folded)
    inter_node: bool = False  # the EP all-to-all crosses nodes (an expert group beyond one NVLink domain)
    dispatcher: str = "alltoall"  # TrainingSpec.moe_dispatcher: "alltoall" (NCCL), "flex" (DeepEP) or "hybridep"
    domains: int = 1  # NVLink domains the expert group spans (its experts spread evenly over them)

    def __post_init__(self) -> None:
        if not self.etp:
            if self.tp % self.ep:
                raise ValueError(f"ep={self.ep} folded into tp={self.tp} needs ep | tp; give etp for a wider group")
            object.__setattr__(self, "etp", self.tp // self.ep)

    @classmethod
    def of(cls, training: TrainingSpec, inter_node: bool = False, domains: int = 1) -> "ExpertLayout":
        return cls(tp=training.tp, ep=training.ep, capacity_factor=training.moe_capacity_factor,
                   grouped_gemm=training.moe_grouped_gemm, sequence_parallel=training.sequence_parallel,
                   etp=training.expert_tp, inter_node=inter_node, dispatcher=training.moe_dispatcher,
                   domains=domains if inter_node else 1)

    @property
    def groups(self) -> int:
        """TP groups whose tokens meet in one expert group of ep·etp ranks, G (1: EP folded into the TP group).
        With G > 1 every expert gets the tokens of G TP groups (in lockstep, equal batches)."""
        return self.ep * self.etp // self.tp

    @property
    def all_to_all(self) -> bool:
        """Whether tokens travel by all-to-all (ep > 1); else the all-gather dispatcher, the dense TP pair."""
        return self.ep > 1


def expert_rows_per_token(model: ModelSpec, layout: ExpertLayout) -> float:
    """Rows one expert's GEMMs get per token of the TP group on the busiest rank: m / s = G·k·cf/E."""
    return layout.groups * model.top_k * layout.capacity_factor / model.experts


def mlp_gemm_plan(model: ModelSpec, layout: ExpertLayout) -> tuple[int, float, int]:
    """(column split, rows per token of the TP group per launch, launches) of a layer's MLP GEMMs on one rank.
    Dense: split over tp, one row per token, one launch. MoE: split over etp; E/ep launches of k·cf/E rows per
    token each, or one grouped launch of their E/ep·k·cf/E = k·cf/ep rows."""
    if not model.is_moe:
        return layout.tp, 1.0, 1
    local = model.experts // layout.ep
    rows = expert_rows_per_token(model, layout)
    return (layout.etp, rows * local, 1) if layout.grouped_gemm else (layout.etp, rows, local)


def router_rows_per_token(layout: ExpertLayout) -> float:
    """Router GEMM rows per token of the TP group: each rank scores its own s/tp tokens with the (replicated)
    h × E router under sequence parallelism, all s tokens without it."""
    return 1.0 / layout.tp if layout.sequence_parallel else 1.0


def dispatch_bytes(tokens: np.ndarray | float, model: ModelSpec, layout: ExpertLayout,
                   dtype_bytes: int) -> np.ndarray:
    """nccl-tests S of the dispatch (and combine) all-to-all on the busiest rank: its s/tp tokens' k copies of
    h values each, × cf (the busiest rank's share under imbalance)."""
    t = np.asarray(tokens, dtype=float)
    return t / layout.tp * model.top_k * layout.capacity_factor * model.hidden * dtype_bytes


def expert_gather_bytes(tokens: np.ndarray | float, model: ModelSpec, layout: ExpertLayout,
                        dtype_bytes: int) -> np.ndarray:
    """nccl-tests S of the ETP all-gather after the dispatch (the reduce-scatter before the combine moves the
    same): the rows of the rank's E/ep experts, G·s·k·cf/ep, of h values each."""
    t = np.asarray(tokens, dtype=float)
    return t * layout.groups * model.top_k * layout.capacity_factor / layout.ep * model.hidden * dtype_bytes


def remote_domains_per_token(model: ModelSpec, domains: int) -> float:
    """Expected NVLink domains other than its own that a token's top_k experts lie in, its experts spread evenly
    over `domains` domains (contiguous blocks, as EP ranks hold them) and chosen uniformly (Megatron's benchmarks
    force balanced routing): under node-limited routing groups_per_token t of the expert_groups g (contiguous
    blocks of E/g experts) first, then k experts among theirs. A domain d holding n_j experts of group j is missed
    with probability E_S[C(tE/g − Σ_{j∈S} n_j, k) / C(tE/g, k)] over the t-subsets S of groups (their sums counted
    by a small dynamic programme); the token's own domain is any of D alike, so the mean is (1 − 1/D)·Σ_d P(d hit).
    Exact for any split of groups over domains (g = t = 1: no limit)."""
    e, k, d = model.experts, model.top_k, domains
    if d <= 1:
        return 0.0
    g, t = model.expert_groups, model.groups_per_token
    pool = t * e // g  # experts a token chooses among once its groups are drawn
    hit = 0.0
    for dom in range(d):
        lo, hi = dom * e // d, (dom + 1) * e // d  # the domain's experts [lo, hi)
        # ways[size][m]: subsets of `size` groups holding m of the domain's experts
        ways = [[0] * (hi - lo + 1) for _ in range(t + 1)]
        ways[0][0] = 1
        for j in range(g):
            n = max(0, min(hi, (j + 1) * e // g) - max(lo, j * e // g))
            for size in range(min(j + 1, t), 0, -1):
                for m in range(hi - lo, n - 1, -1):
                    ways[size][m] += ways[size - 1][m - n]
        miss = sum(w * comb(pool - m, k) for m, w in enumerate(ways[t])) / (comb(g, t) * comb(pool, k))
        hit += 1.0 - miss
    return (1.0 - 1.0 / d) * hit


def moe_comm_fwd_s(profile: Profile, tokens: np.ndarray | float, model: ModelSpec, layout: ExpertLayout,
                   dtype_bytes: int) -> np.ndarray:
    """Forward communication of one MoE layer with ep > 1, not overlapped: dispatch and combine all-to-alls over
    EP (+ the ETP all-gather and reduce-scatter when etp > 1). The backward moves the same bytes the other way.
    A folded EP group lies inside a TP group, which MeshLayout keeps inside one NVLink domain; a wider one's
    all-to-all is inter-node when its ep·etp ranks span domains (`inter_node`, etp innermost as Megatron-core
    orders them, so the ETP collectives stay inside a domain, etp dividing it). Inter-node it is looked up at
    ep·etp ranks, the domains its ep members span (the tables' inter-node rows are whole domains)."""
    group = layout.ep * layout.etp if layout.inter_node else layout.ep
    if layout.dispatcher != "alltoall" and layout.inter_node:  # DeepEP, HybridEP: once per remote domain, then NVLink
        copies = dispatch_bytes(tokens, model, layout, dtype_bytes)
        nic = copies / model.top_k * remote_domains_per_token(model, layout.domains)
        local = max(2, layout.ep // layout.domains)  # the EP ranks of one domain the NVLink leg spans
        a2a = np.maximum(profile.collective_time_s("send_recv", nic, 2, "inter"),
                         profile.collective_time_s("all_to_all", copies, local, "intra"))
    else:
        a2a = profile.collective_time_s("all_to_all", dispatch_bytes(tokens, model, layout, dtype_bytes), group,
                                        "inter" if layout.inter_node else "intra")
    t = 2.0 * a2a
    if layout.etp > 1:
        g = expert_gather_bytes(tokens, model, layout, dtype_bytes)
        t = t + (profile.collective_time_s("all_gather", g, layout.etp, "intra")
                 + profile.collective_time_s("reduce_scatter", g, layout.etp, "intra"))
    return t


def moe_kernels(model: ModelSpec, layout: ExpertLayout, dtype_bytes: int, direction: str) -> tuple[MemKernel, ...]:
    """An MoE layer's memory-bound kernels beyond elementwise.layer_kernels, bytes per token of the TP group on
    one rank, either direction (the backward moves the same bytes back): the permutation into expert order
    (read the rank's source tokens, write their k·cf rows) and the weighted unpermutation (the reverse), plus the
    activation's extra cf − 1 share on the busiest rank (layer_kernels prices k·f/tp per token)."""
    if not model.is_moe:
        return ()
    b, h, k, cf = float(dtype_bytes), model.hidden, model.top_k, layout.capacity_factor
    src = 1.0 / layout.tp if layout.all_to_all else 1.0  # all-to-all: own s/tp tokens; all-gather: all s
    rows = k * cf * src  # their top-k copies (ep = 1 under the all-gather dispatcher: every expert is local)
    perm = MemKernel("moe_permute", (src + rows) * h * b)
    out = [perm, MemKernel("moe_unpermute", perm.bytes_per_item)]
    if layout.all_to_all and model.experts // layout.ep > 1:  # received chunks sorted by local expert and back
        sort = 2.0 * layout.groups * k * cf / layout.ep * h * b
        out += [MemKernel("moe_sort_chunks", sort), MemKernel("moe_unsort_chunks", sort)]
    if cf > 1.0:  # the routed experts' share of the activation (a shared expert's is never imbalanced)
        act = next(x for x in layer_kernels(model, layout.tp, layout.sequence_parallel, dtype_bytes, direction)
                   if x.label == model.mlp)
        routed = model.ffn * model.top_k / model.mlp_width_per_token
        out.append(MemKernel(f"{act.label}_imbalance", (cf - 1.0) * routed * act.bytes_per_item))
    return tuple(out)


def moe_activation_bytes_per_token(model: ModelSpec, layout: ExpertLayout, recompute: Recompute,
                                   dtype_bytes: int = 2, fp8: bool = False) -> float:
    """Saved activations of one MoE layer per token of the TP group on the busiest rank, beyond what
    costmodel.memory counts for a dense layer of k MLPs (its 2h/tp MLP input is the router's input here): the
    dispatched rows the experts keep for their weight gradients, 2h·G·k·cf/ep (fp8: h·G·k·cf/ep, Transformer
    Engine's GroupedLinear keeps the columnwise fp8 cast of its input, not the bf16 rows: TE >= 2.3; before, both
    casts, 2 B); the expert outputs the routing weights multiply, kept for the weights' gradient (all-to-all: back
    on the rank's own k·s/tp rows; all-gather: its k·cf·s/ep rows, bf16); and the MLP's inner terms (SwiGLU 6f, 4f
    under selective; ungated 4f) × (cf − 1)/tp. Full recompute keeps only the layer input: nothing more."""
    if not model.is_moe or recompute == "full":
        return 0.0
    scale = dtype_bytes / 2.0
    h, f, k, cf = model.hidden, model.ffn, model.top_k, layout.capacity_factor
    rows = h * layout.groups * k * cf / layout.ep
    dispatched = (1.0 / scale if fp8 else 2.0) * rows  # fp8: 1 B whatever the storage dtype
    combined = 2 * h * k / layout.tp if layout.all_to_all else 2.0 * rows
    inner = swiglu_saved_bytes_per_f(recompute) * f if model.gated else 4 * f
    return (dispatched + combined + inner * k * (cf - 1.0) / layout.tp) * scale

