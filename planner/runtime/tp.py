"""Tensor parallelism for the replay (Megatron-style, without sequence parallelism): inside a TP group
Q/K/V, gate and up are column-parallel (each rank holds whole heads and a slice of the FFN), O and down
are row-parallel and all-reduce their partial outputs; embedding, norms and the LM head stay
replicated, so their gradients agree across the group with no extra collective.

`enter` is Megatron's f (identity forward, all-reduce of the input gradient backward) and `exit` its
g (all-reduce forward, identity backward). Shards are contiguous, so with GQA rank t's query heads
use exactly rank t's K/V heads (kv_heads % tp == 0)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# Sharded weights by parameter-name suffix: the dimension split over the TP group (biases follow
# their weight's output dimension; row-parallel layers have none).
SHARD_DIM = {"attn.wq.weight": 0, "attn.wk.weight": 0, "attn.wv.weight": 0, "attn.wq.bias": 0, "attn.wk.bias": 0,
             "attn.wv.bias": 0, "attn.wo.weight": 1, "mlp.gate.weight": 0, "mlp.up.weight": 0, "mlp.down.weight": 1}


def shard_dim(name: str) -> int | None:
    """The split dimension of a parameter (by its name in the Decoder), None when replicated."""
    return next((d for suffix, d in SHARD_DIM.items() if name.endswith(suffix)), None)


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Exit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@dataclass(frozen=True)
class TPGroup:
    """This rank's TP group; the model's attention and MLP blocks call enter/exit around their
    parallel parts."""

    group: object  # torch process group of the tp ranks of one HDP rank (and stage)
    size: int
    rank: int  # this rank's index in the group

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return _Enter.apply(x, self.group)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return _Exit.apply(x, self.group)


def shard_model(full: nn.Module, tp: TPGroup) -> nn.Module:
    """A copy of `full` (a Decoder) holding TP rank `tp.rank`'s shards, wired to the group."""
    local = copy.deepcopy(full)
    for name, module in local.named_modules():
        if isinstance(module, nn.Linear):
            for pname in ("weight", "bias"):
                p = getattr(module, pname)
                d = shard_dim(f"{name}.{pname}")
                if p is not None and d is not None:
                    setattr(module, pname, nn.Parameter(p.data.chunk(tp.size, d)[tp.rank].clone()))
            module.out_features, module.in_features = module.weight.shape
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
    out.narrow(d, rank * local.shape[d], local.shape[d]).copy_(local)
    return out
