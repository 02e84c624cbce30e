"""A small Llama-style decoder in plain torch (RMSNorm, RoPE, GQA attention, SwiGLU), in fp32 or bf16
autocast, with the plan's activation recompute; and the token ids it trains on (generated, or read
from a flat .npy or a Megatron .bin/.idx stream).

The model never decides how attention is computed: every forward takes an `Attention` callable
that sees the local (q, k, v) of all layers. The unit step passes packed-bin or context-parallel
attention, the `--check` reference plain per-sequence attention; the weights and everything else
are shared, which is what makes the distributed gradients comparable with the reference's."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from costmodel.specs import ModelSpec
from planner.plan import Plan, PlanError, Sequence
from planner.runtime.launch import Precision
from planner.workload import SourceError
from planner.workload.readers import read_megatron_index

IGNORE_INDEX = -100  # label of padding tokens and of each document's last position: cross_entropy skips them


@dataclass(frozen=True)
class ModelConfig:
    """The decoder to build: a dense ModelSpec's shape (preset name, file or HuggingFace config) and the
    constants only the runtime fixes."""

    spec: ModelSpec  # layers, widths, heads, vocab, tied embeddings, QKV bias (dense: preflight refuses MoE)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    precision: Precision = "fp32"  # bf16: matmuls and attention under autocast, parameters and gradients fp32
    recompute: str = "none"  # costmodel.specs.RECOMPUTE_POLICIES: none, selective (attention core), full (layer)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward's precision context (backward runs outside it, as autocast wants)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)


class Attention(Protocol):
    """Attention over the local tokens of a unit: q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D].
    `layer` lets context-parallel implementations name their transfers."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D/2] for explicit per-token positions (they restart at each document)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, H, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class SelfAttention(nn.Module):
    """Q, K and V come from one fused projection, laid out as Megatron's linear_qkv: per KV head (query
    group) its `rep` query heads, then its K and V head. A split of the rows into contiguous TP shards then
    gives each rank whole groups, and the cost model's one QKV GEMM is the one the replay runs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        s = cfg.spec
        self.head_dim = s.head_dim
        self.rep = s.heads // s.kv_heads  # query heads per KV head
        self.wqkv = nn.Linear(s.hidden, s.q_width + 2 * s.kv_width, bias=s.qkv_bias)
        self.wo = nn.Linear(s.q_width, s.hidden, bias=False)
        self.tp = None  # planner.runtime.tp.TPGroup when the heads are split over a TP group
        self.recompute_core = cfg.recompute == "selective"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention,
                layer: int) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        if self.tp is not None:
            x = self.tp.enter(x)
        # groups from the weights: this rank's under TP, all of them otherwise; split's backward is one cat
        q, k, v = torch.split(self.wqkv(x).view(t, -1, (self.rep + 2) * d), [self.rep * d, d, d], dim=-1)
        q, k = apply_rope(q.reshape(t, -1, d), cos, sin), apply_rope(k, cos, sin)
        v = v.contiguous()  # attention saves it for backward: dense, as RoPE's outputs are
        if self.recompute_core:  # selective: the attention core's activations are recomputed in backward
            core = checkpoint(attn, q, k, v, layer, use_reentrant=False)
        else:
            core = attn(q, k, v, layer)
        out = self.wo(core.reshape(t, -1))
        return out if self.tp is None else self.tp.exit(out)


class SwiGLU(nn.Module):
    """Gate and up from one fused projection (Megatron's linear_fc1): its rows are the gate's, then the up's; a TP
    shard holds its part of each, gate then up, as Megatron's per-rank linear_fc1 (planner.runtime.tp.shard_param).
    Each half of the output is then a view with contiguous rows, where interleaved gate and up rows gave views of
    stride 2: on a CPU those ran SiLU, its backward and the gradients' stack 5-7x slower than contiguous operands."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        s = cfg.spec
        self.gate_up = nn.Linear(s.hidden, 2 * s.ffn, bias=False)
        self.down = nn.Linear(s.ffn, s.hidden, bias=False)
        self.tp = None  # planner.runtime.tp.TPGroup when the FFN is split over a TP group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:
            x = self.tp.enter(x)
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # chunk's backward is one cat
        out = self.down(F.silu(gate) * up)
        return out if self.tp is None else self.tp.exit(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.spec.hidden, cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.spec.hidden, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.recompute_all = cfg.recompute == "full"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention,
                layer: int) -> torch.Tensor:
        if self.recompute_all:  # full: only the layer's input is kept; its forward reruns in backward
            return checkpoint(self._forward, x, cos, sin, attn, layer, use_reentrant=False)
        return self._forward(x, cos, sin, attn, layer)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention,
                 layer: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn, layer)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """tokens [T] + positions [T] -> logits [T, V]; one flat token dimension (no batch axis), as
    varlen kernels see a packed bin."""

    tp = None  # planner.runtime.tp.TPGroup when the vocabulary is split over a TP group (embedding, head, loss)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.spec
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, cfg.norm_eps)
        self.head = None if s.tied_embeddings else nn.Linear(s.hidden, s.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn: Attention) -> torch.Tensor:
        x = self.run_layers(self.embed_tokens(tokens), positions, attn, 0, self.cfg.spec.layers)
        return self.logits(x)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states (the first pipeline stage's head)."""
        return self.embed(tokens) if self.tp is None else self.tp.embed(self.embed.weight, tokens)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, attn: Attention, start: int,
                   end: int) -> torch.Tensor:
        """Hidden states through layers [start, end): one pipeline stage's (or chunk's) share."""
        cos, sin = rope_tables(positions, self.cfg.spec.head_dim, self.cfg.rope_theta)
        with self.cfg.autocast(x.device):
            for i in range(start, end):
                x = self.layers[i](x, cos, sin, attn, i)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (the last pipeline stage's tail); under TP this rank's vocabulary slice."""
        with self.cfg.autocast(x.device):
            h = self.norm(x) if self.tp is None else self.tp.enter(self.norm(x))
            return F.linear(h, self.embed.weight if self.head is None else self.head.weight)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per token of `logits(...)`'s output (0 where the label is ignored), in fp32."""
        if self.tp is not None:
            return self.tp.token_losses(logits, labels)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")

    def stage_parameters(self, layer_ranges: list[tuple[int, int]], first: bool, last: bool) -> list[nn.Parameter]:
        """The parameters a pipeline stage owns: its layers, the embedding on the first virtual stage,
        the final norm and head on the last (a tied embedding belongs to both), in model order."""
        own = {id(p) for a, b in layer_ranges for i in range(a, b) for p in self.layers[i].parameters()}
        if first:
            own.add(id(self.embed.weight))
        if last:
            own.update(id(p) for p in self.norm.parameters())
            own.add(id(self.embed.weight if self.head is None else self.head.weight))
        return [p for p in self.parameters() if id(p) in own]


def virtual_stage_layers(layers: int, pp: int, v: int) -> list[tuple[int, int]]:
    """[start, end) of each virtual stage k = chunk·pp + stage: layers split as evenly as possible,
    earlier virtual stages taking the remainder."""
    k = pp * v
    if layers < k:
        raise PlanError(f"the model has {layers} layers, fewer than pp × v = {pp} × {v} pipeline chunks; "
                        "pass a deeper --model")
    base, extra = divmod(layers, k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(zip(bounds, bounds[1:]))


def stage_parameters(model: Decoder, layer_ranges: tuple[tuple[int, int], ...], pp: int,
                     stage: int) -> list[nn.Parameter]:
    """Parameters pipeline stage `stage` owns (its chunks' layers; embedding first, head last)."""
    v = len(layer_ranges) // pp
    return model.stage_parameters([layer_ranges[c * pp + stage] for c in range(v)], stage == 0, stage == pp - 1)


def build_model(cfg: ModelConfig, seed: int, device: torch.device) -> Decoder:
    """Deterministic init from `seed` alone (a private generator, parameters in name order), so
    every rank and the reference start from bit-identical weights whatever the global RNG did."""
    model = Decoder(cfg)
    g = torch.Generator().manual_seed(seed)
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.to(device)


def sequence_seed(seed: int, iteration: int, seq_id: int) -> int:
    """A 63-bit generator seed per (run seed, step iteration, sequence id), stable across processes
    and Python versions (unlike hash())."""
    h = hashlib.blake2b(f"{seed}:{iteration}:{seq_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SequenceTokens:
    """One plan sequence's model inputs and next-token labels."""

    ids: torch.Tensor  # int64 [length] input ids
    labels: torch.Tensor  # int64 [length] next-token ids, IGNORE_INDEX where the next token is another document's


@dataclass(frozen=True)
class TokenStream:
    """Token ids read as one stream of documents: a flat .npy array (each plan sequence is a document), or
    a Megatron indexed dataset (.bin ids, .idx sequence lengths, byte pointers and document index)."""

    ids: np.ndarray  # [tokens] token ids (memory-mapped)
    doc_starts: np.ndarray  # int64 [documents], sorted: stream offsets where a document begins (0 first)

    @classmethod
    def open(cls, path: Path) -> TokenStream:
        if path.suffix in (".bin", ".idx"):
            return cls._megatron(path.with_suffix(""))
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise PlanError(f"{path}: cannot read token file ({e}); expected a flat .npy array of token ids "
                            "or a Megatron .bin/.idx pair") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.size < 2:
            raise PlanError(f"{path}: token file must be a 1-D integer .npy array with at least 2 ids, got "
                            f"shape {arr.shape} dtype {arr.dtype}")
        return cls(arr, np.zeros(1, dtype=np.int64))

    @classmethod
    def _megatron(cls, prefix: Path) -> TokenStream:
        """Documents in dataset order; the .bin must hold the sequences back to back (as Megatron writes it)."""
        idx, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
        try:
            index = read_megatron_index(idx)
        except SourceError as e:
            raise PlanError(str(e)) from None
        if index.dtype.kind not in "iu":
            raise PlanError(f"{idx}: token dtype {index.dtype} is not an integer type")
        offsets = np.concatenate(([0], np.cumsum(index.sequence_lengths, dtype=np.int64)))
        total = int(offsets[-1])
        if total < 2 or not np.array_equal(index.sequence_pointers,
                                           index.sequence_pointers[0] + offsets[:-1] * index.dtype.itemsize):
            raise PlanError(f"{idx}: expected at least 2 tokens stored back to back in {bin_path.name} (the "
                            "sequence pointers must follow the lengths)")
        start = int(index.sequence_pointers[0])
        need = start + total * index.dtype.itemsize
        size = bin_path.stat().st_size if bin_path.is_file() else -1
        if size < need:
            raise PlanError(f"{bin_path}: missing or truncated: the index needs {need:,} bytes, the file has "
                            f"{max(size, 0):,}")
        ids = np.memmap(bin_path, dtype=index.dtype, mode="r", offset=start, shape=(total,))
        docs = np.unique(offsets[index.document_index[:-1]])
        return cls(ids, docs if docs.size and docs[0] == 0 else np.concatenate(([0], docs)))

    def read(self, start: int, n: int, vocab: int, seq_id: int) -> SequenceTokens:
        """The n tokens from stream offset `start` (the stream is a ring: after its last token comes its
        first, of another document); the last label and every label that would cross into the next
        document are IGNORE_INDEX."""
        size = self.ids.size
        where = (start + np.arange(n + 1)) % size
        ids = torch.from_numpy(self.ids[where[:-1]].astype(np.int64))
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise PlanError(f"token file: sequence {seq_id} has ids outside [0, {vocab}) (model vocab)")
        labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
        labels[:-1] = ids[1:]
        crosses = np.flatnonzero(np.isin(where[1:-1], self.doc_starts))  # the next token begins a document
        labels[torch.from_numpy(crosses)] = IGNORE_INDEX
        return SequenceTokens(ids, labels)


class TokenSource:
    """The tokens of every sequence of a replayed step.

    Generated (default): `length + 1` uniform ids per sequence from a generator seeded by (seed,
    iteration, sequence id), so any rank can make any sequence without talking to the others; the
    sequence is the first `length` of them and every position has a label (the extra id is only a label).

    From a file (`TokenStream`: a flat .npy array or a Megatron .bin/.idx pair): each step takes its
    sequences in plan order from where the previous step stopped, wrapping at the end. Labels stay inside
    each document: a sequence's last position, and a position whose next token starts a dataset document,
    are IGNORE_INDEX, so such a step labels fewer than global_tokens positions. The loss is still divided
    by global_tokens (the step contract) in the replay and in the --check reference alike, which read the
    same labels, so the two agree; the gradient is that of the labelled tokens, uniformly scaled."""

    def __init__(self, vocab: int, seed: int, path: str | None = None) -> None:
        self.vocab, self.seed = vocab, seed
        self.stream = TokenStream.open(Path(path)) if path is not None else None

    def tokens(self, iteration: int, sequences: list[Sequence], stream_offset: int = 0,
               wanted: set[int] | None = None, starts: dict[int, int] | None = None) -> dict[int, SequenceTokens]:
        """Ids and labels of each wanted sequence (all when None). stream_offset: where this step's share of
        the file stream starts (the sum of earlier steps' global_tokens); a sequence starts after those listed
        before it, or at stream_offset + starts[id] when `starts` is given (a rank's part of a step lists only
        its sequences)."""
        out, offset = {}, stream_offset
        for q in sequences:
            start, offset = offset, offset + q.length
            if starts is not None:
                start = stream_offset + starts[q.id]
            if wanted is not None and q.id not in wanted:
                continue
            if self.stream is not None:
                out[q.id] = self.stream.read(start, q.length, self.vocab, q.id)
                continue
            g = torch.Generator().manual_seed(sequence_seed(self.seed, iteration, q.id))
            ids = torch.randint(0, self.vocab, (q.length + 1,), generator=g)
            out[q.id] = SequenceTokens(ids[:-1], ids[1:])
        return out


def stream_offset(plan: Plan, iteration: int) -> int:
    """Where replay iteration `iteration` starts in a token file's stream: the global tokens of the
    iterations before it (TokenSource.tokens' stream_offset)."""
    return sum(plan.steps[i % len(plan.steps)].global_tokens for i in range(iteration))
