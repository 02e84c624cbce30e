"""Tensor parallelism for the replay (Megatron-style, without sequence parallelism): inside a TP group
the fused QKV and gate/up projections are column-parallel (each rank holds whole query groups and a slice
of the FFN: planner/runtime/model.py lays their rows out so), O and down are row-parallel and all-reduce
their partial outputs. The embedding, the LM head and the loss are vocab-parallel, as Megatron's: each rank
holds a contiguous V/t rows of the table (and of the head; tied, the same rows), looks up the ids in its
range and all-reduces the result, computes its V/t logits, and the cross-entropy meets over the group in two
small all-reduces (the row max; the target logit with the sum of exponentials). The norms stay replicated,
so their gradients agree across the group with no extra collective.

`enter` is Megatron's f (identity forward, all-reduce of the input gradient backward) and `exit` its
g (all-reduce forward, identity backward). Shards are contiguous, so with GQA rank t's query heads
use exactly rank t's K/V heads (kv_heads % tp == 0)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.runtime.cp import CommStats

# Sharded weights by parameter-name suffix: the dimension split over the TP group (biases follow
# their weight's output dimension; row-parallel layers have none).
SHARD_DIM = {"attn.wqkv.weight": 0, "attn.wqkv.bias": 0, "attn.wo.weight": 1, "mlp.gate_up.weight": 0,
             "mlp.down.weight": 1, "embed.weight": 0, "head.weight": 0}


# Parameters that stack two projections along their split dimension (SwiGLU's gate, then up): each TP rank takes its
# part of each, so that its shard is again gate then up (Megatron's per-rank linear_fc1).
STACKED_HALVES = ("mlp.gate_up.weight",)


def shard_dim(name: str) -> int | None:
    """The split dimension of a parameter (by its name in the Decoder), None when replicated."""
    return next((d for suffix, d in SHARD_DIM.items() if name.endswith(suffix)), None)


def _parts(x: torch.Tensor, name: str, d: int) -> torch.Tensor:
    """x with its split dimension d shown as [halves, rows per half] (halves 1 unless `name` stacks two)."""
    halves = 2 if name.endswith(STACKED_HALVES) else 1
    return x.unflatten(d, (halves, x.shape[d] // halves))


def shard_param(full: torch.Tensor, name: str, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s shard of the parameter `name` (a copy); replicated parameters whole."""
    d = shard_dim(name)
    if d is None or tp == 1:
        return full.clone()
    return _parts(full, name, d).chunk(tp, d + 1)[rank].flatten(d, d + 1).clone()


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: "TPGroup") -> torch.Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        ctx.tp.all_reduce(grad)
        return grad, None


class _Exit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: "TPGroup") -> torch.Tensor:
        out = x.contiguous().clone()
        tp.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _VocabParallelLoss(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary (Megatron's vocab_parallel_cross_entropy),
    0 where the label is ignored; fp32 whatever the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, start: int, tp: "TPGroup") -> torch.Tensor:
        z = logits.float()
        top = z.max(-1).values
        tp.all_reduce(top, dist.ReduceOp.MAX)
        z = z - top[:, None]
        mine = (labels >= start) & (labels < start + z.shape[1])  # ignored labels (negative) are no rank's
        idx = torch.where(mine, labels - start, 0)
        exp = z.exp()
        sums = torch.stack((torch.where(mine, z.gather(1, idx[:, None])[:, 0], 0.0), exp.sum(-1)))
        tp.all_reduce(sums)  # the target's logit (one rank holds it) and the partition function
        valid = labels >= 0
        exp.div_(sums[1][:, None])
        ctx.save_for_backward(exp, idx, mine, valid)
        ctx.dtype = logits.dtype
        return torch.where(valid, sums[1].log() - sums[0], 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, idx, mine, valid = ctx.saved_tensors
        g = torch.where(valid, grad, 0.0)
        out = probs.mul_(g[:, None])  # softmax - one-hot(target), scaled by the token's incoming gradient
        rows = mine.nonzero()[:, 0]
        out[rows, idx[rows]] -= g[rows]
        return out.to(ctx.dtype), None, None, None


@dataclass(frozen=True)
class TPGroup:
    """This rank's TP group; the model's attention and MLP blocks call enter/exit around their
    parallel parts."""

    group: object  # torch process group of the tp ranks of one HDP rank (and stage)
    size: int
    rank: int  # this rank's index in the group
    # wait_s: time in the group's all-reduces over the run (a unit's is the difference across it)
    stats: CommStats = field(default_factory=CommStats, compare=False)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """In place over the group, timed into `stats`: on gloo the call returns once done, so its time is the
        transfer and the wait for the group's slowest rank."""
        t0 = time.perf_counter()
        dist.all_reduce(t, op=op, group=self.group)
        self.stats.wait_s += time.perf_counter() - t0

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return _Enter.apply(x, self)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return _Exit.apply(x, self)

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: this rank's rows of the table (ids outside them give 0), summed over the group."""
        start = self.rank * table.shape[0]
        mine = (ids >= start) & (ids < start + table.shape[0])
        rows = F.embedding(torch.where(mine, ids - start, 0), table)
        return self.exit(rows * mine[:, None].to(rows.dtype))

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per token of this rank's vocabulary slice of the logits (0 for ignored labels)."""
        return _VocabParallelLoss.apply(logits, labels, self.rank * logits.shape[-1], self)


def shard_model(full: nn.Module, tp: TPGroup) -> nn.Module:
    """A copy of `full` (a Decoder) holding TP rank `tp.rank`'s shards, wired to the group."""
    local = copy.deepcopy(full)
    for name, module in local.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            for pname in ("weight", "bias"):
                p = getattr(module, pname, None)
                if p is not None and shard_dim(f"{name}.{pname}") is not None:
                    setattr(module, pname, nn.Parameter(shard_param(p.data, f"{name}.{pname}", tp.size, tp.rank)))
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = module.weight.shape
            else:
                module.num_embeddings = module.weight.shape[0]
    local.tp = tp
    for layer in local.layers:
        layer.attn.tp = layer.mlp.tp = tp
    return local


def place_shard(full_shape: torch.Size, local: torch.Tensor, name: str, tp: int, rank: int) -> torch.Tensor:
    """A zero tensor of the full shape with `local` (TP rank `rank`'s piece of `name`) in its place;
    replicated parameters are returned whole."""
    d = shard_dim(name)
    if d is None or tp == 1:
        return local.clone()
    out = local.new_zeros(full_shape)
    mine = _parts(local, name, d)
    _parts(out, name, d).narrow(d + 1, rank * mine.shape[d + 1], mine.shape[d + 1]).copy_(mine)
    return out
