"""`--check`: rank 0 replays each step's global batch in one process with plain per-sequence
attention, from the same weights, and compares losses and gradients with the distributed replay's.
The reference is a deep copy of the replayed model, so it runs in the same precision and recompute
policy (its ModelConfig): in fp32 the two agree to summation order (~1e-6 relative); in bf16 each
rounds activations at different points (per-unit vs per-sequence, ring blocks merged in fp32, TP sums
in bf16), so gradients agree to about 1% (a few bf16 ulps, 2^-8 each): tests allow 3e-2.

With pp or tp > 1 no rank holds the whole model, so every rank keeps a full copy that the shards'
owners fill (weights before the step, gradients after the sync). `reference_loop` is the same
reference as a plain training loop: the baseline bench/replay_overhead.py measures the replay against."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.plan import Mesh, Plan, Step
from planner.runtime.context import Context, make_optimizer
from planner.runtime.feed import StepWork
from planner.runtime.launch import ReplayOptions
from planner.runtime.model import (Decoder, ModelConfig, SequenceTokens, TokenSource, build_model, stage_parameters,
                                   stream_offset)
from planner.runtime.step import flat_all_reduce, token_loss
from planner.runtime.tp import place_shard, shard_dim


@dataclass
class CheckResult:
    """Worst differences from the reference over the run."""

    max_rel_grad_err: float = 0.0  # max over steps and parameters of max|g - g_ref| / max|g_ref|
    loss_abs_err: float = 0.0  # max over steps of |loss - reference loss|
    units: int = 0  # units checked (each step's units, summed)


class Check:
    """--check on one rank, called by replay_step around each step: `before_units`, `after_sync` on every
    rank, `compare` (rank 0 does the work) between the sync and the optimizer step."""

    def __init__(self) -> None:
        self.result = CheckResult()
        self._reference: Decoder | None = None  # rank 0: the step's reference model

    def before_units(self, ctx: Context) -> None:
        if ctx.full is not None:  # rank 0's reference starts from every shard's weights
            collect_full(ctx, "data")
        if ctx.rank == 0:
            self._reference = copy.deepcopy(_whole(ctx))
            self._reference.zero_grad(set_to_none=True)

    def after_sync(self, ctx: Context) -> None:
        if ctx.full is not None:
            collect_full(ctx, "grad")

    def compare(self, ctx: Context, work: StepWork, step_loss: float) -> None:
        """Rank 0 (which holds the whole step, whatever the feed): the reference step and the differences. Every
        rank then waits for it here, outside the timed phases: else the other ranks' next step would wait for
        rank 0 in its rings, hand-offs and all-reduce, and a traced replay's steps after the first would carry
        the reference's time (2.3x the step on the README's 4-rank CPU plan)."""
        reference, self._reference = self._reference, None
        if reference is not None:
            step = work.step
            ctx.position.set(f"step {work.it} (plan step {step.step}) --check reference")
            all_tokens = ctx.tokens.tokens(work.it, step.sequences, work.stream_offset)
            ref_loss = reference_step(reference, step, all_tokens, ctx.device)
            r = self.result
            r.max_rel_grad_err = max(r.max_rel_grad_err, max_rel_grad_err(_whole(ctx), reference))
            r.loss_abs_err = max(r.loss_abs_err, abs(ref_loss - step_loss))
            r.units += len(step.units)
        if dist.is_initialized():
            dist.barrier()


def _whole(ctx: Context) -> Decoder:
    """The model the reference is compared with: this rank's, or the full copy the shards fill."""
    return ctx.model if ctx.full is None else ctx.full


def collect_full(ctx: Context, attr: str) -> None:
    """--check with pp or tp > 1: every parameter's value ("data") or gradient ("grad") into ctx.full on
    every rank, each piece from its one owner (`check_owners`)."""
    tp = ctx.prep.plan.mesh.tp
    local = dict(ctx.model.named_parameters())
    vals = []
    for name, p in ctx.full.named_parameters():
        src = local[name].data if attr == "data" else local[name].grad
        vals.append(place_shard(p.shape, src, name, tp, ctx.tp_rank) if name in ctx.check_owned
                    else torch.zeros_like(p.data))
    flat_all_reduce(vals, [0.0])
    for (name, p), val in zip(ctx.full.named_parameters(), vals):
        if attr == "data":
            p.data.copy_(val)
        else:
            p.grad = val


def check_owners(model: Decoder, layer_ranges: tuple[tuple[int, int], ...], mesh: Mesh, stage: int, hdp_rank: int,
                 tp_rank: int) -> frozenset[str]:
    """Names of the parameters this rank contributes to the whole-model copy: HDP rank 0 of the first
    stage holding a parameter, every TP rank for its shard, TP rank 0 for replicated weights."""
    if hdp_rank != 0:
        return frozenset()
    name_of = {id(p): n for n, p in model.named_parameters()}
    first = {}
    for s in reversed(range(mesh.pp)):
        for p in stage_parameters(model, layer_ranges, mesh.pp, s):
            first[name_of[id(p)]] = s
    return frozenset(n for n, s in first.items() if s == stage and (tp_rank == 0 or shard_dim(n) is not None))


class ReferenceAttention:
    """The reference's attention for one whole sequence: causal within each of its plan segments
    (a sequence split over units is one document per unit, as the replay runs it)."""

    def __init__(self, segment: torch.Tensor) -> None:
        n = segment.numel()
        self.mask = None if bool((segment == segment[0]).all()) else (
            (segment[:, None] == segment[None, :]) & torch.ones(n, n, dtype=torch.bool, device=segment.device).tril())

    def __call__(self, q, k, v, layer):
        qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=self.mask, is_causal=self.mask is None,
                                           enable_gqa=True)
        return o[0].transpose(0, 1)


def reference_step(model: Decoder, step: Step, tokens: dict[int, SequenceTokens], device: torch.device) -> float:
    """Single-process forward and backward of the whole global batch, one sequence at a time with
    plain causal attention, in the model's precision (its ModelConfig); gradients accumulate in model.
    Returns the loss."""
    segment = {q.id: torch.empty(q.length, dtype=torch.long) for q in step.sequences}
    for u in step.units:
        for p in u.pieces:
            segment[p.seq][p.start:p.end] = u.id
    total = 0.0
    for q in step.sequences:
        t = tokens[q.id]
        logits = model(t.ids.to(device), torch.arange(q.length, device=device),
                       ReferenceAttention(segment[q.id].to(device)))
        loss = token_loss(model, logits, t.labels.to(device), step.global_tokens)
        loss.backward()
        total += float(loss.detach())
    return total


def reference_loop(plan: Plan, config: ModelConfig, iterations: int, opts: ReplayOptions,
                   threads: int = 1) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per step of a plain single-process training loop on the replay's tokens
    (the `--check` reference plus the optimizer): the baseline replay overhead is measured against."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model = build_model(config, opts.seed, device)
    optimizer = make_optimizer(list(model.parameters()), opts)
    source = TokenSource(config.spec.vocab, opts.seed, str(opts.tokens_path) if opts.tokens_path else None)
    times = []
    for it in range(iterations):
        step = plan.steps[it % len(plan.steps)]
        tokens = source.tokens(it, step.sequences, stream_offset(plan, it))
        t0, c0 = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        reference_step(model, step, tokens, device)
        optimizer.step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def max_rel_grad_err(model: nn.Module, reference: nn.Module) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref| (relative to each tensor's scale, so
    near-zero entries do not dominate)."""
    worst = 0.0
    for p, r in zip(model.parameters(), reference.parameters()):
        scale = float(r.grad.abs().max())
        err = float((p.grad - r.grad).abs().max())
        worst = max(worst, err / scale if scale > 0 else err)
    return worst
