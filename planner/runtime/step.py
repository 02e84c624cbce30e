"""One replayed step on one rank: every HDP rank runs its units in the plan's order, then one
gradient all-reduce and an optimizer step (DESIGN.md "Core concepts").

Before the step's clock starts a member builds its units' zigzag shards and inputs
(planner/runtime/inputs.py, as a data loader would); per unit it runs forward with the unit's attention
(packed, or context-parallel over P2P with the other members) under the unit's offload hooks, and adds
token-level cross-entropy divided by the step's global token count, so the all-reduced gradient is the
full batch's whatever the assignment (REFERENCE 1, Eq. 1-2).
With pp > 1 a rank is one stage of one pipeline and runs the plan's op lists
(planner/runtime/stages.py); with tp > 1 an HDP rank is a TP group (planner/runtime/tp.py) whose
members talk to the same TP rank of other HDP ranks."""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from planner.plan import Step, Unit
from planner.runtime.context import Context, rank_failure
from planner.runtime.cp import Peers, unit_attention
from planner.runtime.feed import StepWork
from planner.runtime.inputs import UnitInputs, prepare_units
from planner.runtime.model import Decoder
from planner.runtime.offload import Offloader
from planner.runtime.stages import StageRunner, rank_ops
from planner.runtime.trace import CpuUse, StepRecord, UnitRecord
from profiles.measure.hostload import node_cpu_s

if TYPE_CHECKING:  # check.py builds on this module (token_loss, flat_all_reduce)
    from planner.runtime.check import Check


def token_loss(model: Decoder, logits: torch.Tensor, labels: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """Summed token cross-entropy over the global token count (ByteScale Eq. 1-2); vocab-parallel under TP."""
    return model.token_losses(logits, labels).sum() / global_tokens


def device_sync(device: torch.device) -> None:
    """Wait for the device's kernels, so that a phase's host time includes them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _ranks(ranks: tuple[int, ...]) -> str:
    """HDP ranks of a unit for a message; long lists elided (a unit may span a thousand ranks)."""
    shown = list(ranks) if len(ranks) <= 8 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)} ranks)"
    return f"HDP ranks {shown}"


def _enter_unit(ctx: Context, it: int, step: Step, unit: Unit) -> None:
    stage = f" on stage {ctx.stage}" if ctx.prep.plan.mesh.pp > 1 else ""
    ctx.position.set(f"step {it} (plan step {step.step}) unit {unit.id}{stage} ({_ranks(unit.hdp_ranks)})")


# -- the units ----------------------------------------------------------------------------------

def run_unit(ctx: Context, it: int, step: Step, unit: Unit, ready: UnitInputs) -> float:
    """Forward and backward of one unit on this rank (its inputs `ready`); returns its loss share."""
    mesh = ctx.prep.plan.mesh
    index, layouts = ready.index, ready.layouts[0]
    inp, lab, pos = ready.inputs[0]
    peers = Peers(tuple(mesh.global_rank(ctx.stage, r, ctx.tp_rank) for r in unit.hdp_ranks), index)
    attn = unit_attention(unit, layouts, peers, ctx.opts.cp_impl, ctx.prep.spec.head_dim, ctx.device,
                          ctx.opts.ring_kernel)
    off = Offloader(unit.offload_ratio, ctx.params)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    tp0 = _tp_wait_s(ctx)
    cpu, mark = CpuUse(), CpuUse.mark()
    t0 = time.perf_counter()
    with off.active():
        if ctx.opts.inject_failure is not None:
            ctx.opts.inject_failure.fire(ctx.rank, unit.id)
        loss = token_loss(ctx.model, ctx.model(inp, pos, attn), lab, step.global_tokens)
    device_sync(ctx.device)
    t1 = time.perf_counter()
    loss.backward()
    device_sync(ctx.device)
    t2 = time.perf_counter()
    cpu.add_since(mark)
    ctx.trace.unit(UnitRecord(
        step=it, plan_step=step.step, rank=ctx.rank, hdp_rank=ctx.hdp_rank, unit=unit.id, degree=unit.degree,
        tokens=layouts[index].tokens, start_s=t0, fwd_s=t1 - t0, bwd_s=t2 - t1, comm_wait_s=peers.stats.wait_s,
        sent_bytes=peers.stats.sent_bytes, saved_bytes=off.stats.saved_bytes,
        offloaded_bytes=off.stats.offloaded_bytes, offload_ratio=unit.offload_ratio,
        peak_memory_bytes=_peak_memory(ctx.device), predicted_time_s=unit.predicted_time_s, ulysses=unit.ulysses,
        cp=unit.cp or ctx.opts.cp_impl, tp_wait_s=_tp_wait_s(ctx) - tp0, thread_cpu_s=cpu.thread_s,
        helper_cpu_s=cpu.helpers_s))
    return float(loss.detach())


def _tp_wait_s(ctx: Context) -> float:
    """This rank's time in TP all-reduces so far (0 without TP)."""
    return ctx.model.tp.stats.wait_s if ctx.model.tp is not None else 0.0


def run_units(ctx: Context, it: int, step: Step, ready: dict[int, UnitInputs]) -> float:
    """pp = 1: this rank's units in plan order; returns its loss share."""
    units = {u.id: u for u in step.units}
    loss = 0.0
    for uid in step.order.get(ctx.hdp_rank, []):
        _enter_unit(ctx, it, step, units[uid])
        try:
            loss += run_unit(ctx, it, step, units[uid], ready[uid])
        except Exception as e:  # name the rank and unit; the launcher ends the other ranks
            raise rank_failure(ctx, e) from e
    return loss


def run_pipelined(ctx: Context, it: int, step: Step, ops: list, ready: dict[int, UnitInputs]) -> float:
    """pp > 1: this rank's op list (planner/runtime/stages.py), its units' inputs `ready`; returns its loss
    share (last stage)."""
    runner = StageRunner(ctx, step, ready, token_loss)
    units = {u.id: u for u in step.units}
    tp_wait: dict[int, float] = {}
    for op in ops:
        _enter_unit(ctx, it, step, units[op.mb])
        tp0 = _tp_wait_s(ctx)
        try:
            (runner.forward if op.kind == "F" else runner.backward)(op)
        except Exception as e:
            raise rank_failure(ctx, e) from e
        tp_wait[op.mb] = tp_wait.get(op.mb, 0.0) + _tp_wait_s(ctx) - tp0
    ctx.position.set(f"step {it} (plan step {step.step}) stage-boundary sends")
    try:
        runner.finish()
    except Exception as e:
        raise rank_failure(ctx, e) from e
    for run in runner.runs.values():
        u = run.unit
        ctx.trace.unit(UnitRecord(
            step=it, plan_step=step.step, rank=ctx.rank, hdp_rank=ctx.hdp_rank, unit=u.id, degree=u.degree,
            tokens=sum(lay[run.index].tokens for lay in run.layouts), start_s=run.start_s, fwd_s=run.fwd_s,
            bwd_s=run.bwd_s, comm_wait_s=run.peers.stats.wait_s + run.recv_wait_s,
            sent_bytes=run.peers.stats.sent_bytes, saved_bytes=run.offload.stats.saved_bytes,
            offloaded_bytes=run.offload.stats.offloaded_bytes, offload_ratio=u.offload_ratio,
            peak_memory_bytes=_peak_memory(ctx.device), predicted_time_s=u.predicted_time_s, stage=ctx.stage,
            slices=u.slices, ulysses=u.ulysses, cp=u.cp or ctx.opts.cp_impl, ops=run.ops,
            tp_wait_s=tp_wait.get(u.id, 0.0), thread_cpu_s=run.cpu.thread_s, helper_cpu_s=run.cpu.helpers_s))
    return runner.loss


# -- gradient sync ------------------------------------------------------------------------------

def flat_all_reduce(tensors: list[torch.Tensor], extra: list[float], group=None) -> list[float]:
    """Sum `tensors` in place and the `extra` scalars over `group` in one collective (one flat buffer)."""
    flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_tensor(extra)])
    dist.all_reduce(flat, group=group)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()
    return flat[off:].tolist()


def sync_gradients(ctx: Context, loss: float) -> float:
    """One all-reduce of the stage's gradients over its HDP ranks of the same TP rank (pp = tp = 1: the
    world, the loss share riding along); with pp > 1 a tied embedding's two halves (first and last
    stage of a pipeline) are then summed point to point; the loss (last stage, TP rank 0) is
    all-reduced over the world. Returns the step loss."""
    total = flat_all_reduce([p.grad for p in ctx.owned], [loss], ctx.stage_group)[0]
    if ctx.stage_group is None:
        return total
    mesh, model = ctx.prep.plan.mesh, ctx.model
    if mesh.pp > 1 and model.head is None and ctx.stage in (0, mesh.pp - 1):
        g = model.embed.weight.grad
        peer = mesh.global_rank(mesh.pp - 1 - ctx.stage, ctx.hdp_rank, ctx.tp_rank)
        other = torch.empty_like(g)
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, g.clone(), peer, tag=7),
                                         dist.P2POp(dist.irecv, other, peer, tag=7)]):
            w.wait()
        g.add_(other)
    out = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(out)
    return float(out[0])


# -- the step -----------------------------------------------------------------------------------

def replay_step(ctx: Context, work: StepWork, check: Check | None) -> StepRecord:
    """Replay one iteration (planner/runtime/feed.py: its plan step, whole or this rank's part): units,
    gradient sync, optimizer step; `check` (--check) compares with the reference between the sync and
    the optimizer, outside the timed phases."""
    it, step = work.it, work.step
    ctx.position.set(f"step {it} (plan step {step.step}) before its first unit")
    units = {u.id: u for u in step.units}
    mine = step.order.get(ctx.hdp_rank, [])
    wanted = {p.seq for uid in mine for p in units[uid].pieces}
    tokens = ctx.tokens.tokens(it, step.sequences, work.stream_offset, wanted, work.starts)
    mesh = ctx.prep.plan.mesh
    pipelined = mesh.pp > 1
    ops = None
    if pipelined:  # `work.ops` when the rank holds only its part of the step, expanded from the whole step
        ops = work.ops if work.ops is not None else rank_ops(step, mesh.pp, mesh.hdp, ctx.hdp_rank, ctx.stage)
    ready = prepare_units(step, [op.mb for op in ops] if pipelined else mine, ctx.hdp_rank, tokens, ctx.device)
    if check is not None:
        check.before_units(ctx)
    for p in ctx.owned:  # zeros, not None: ranks without units still join the all-reduce
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
    node = [node_cpu_s()] if ctx.node_load else []  # the node's CPU time at t0, t2, t3, t4 (the check left out)
    ctx.gc_clock.take()  # the collector's seconds from here, the check's left out as the wall's are
    t0, c0 = time.perf_counter(), time.process_time()
    loss = run_pipelined(ctx, it, step, ops, ready) if pipelined else run_units(ctx, it, step, ready)
    loss = loss if ctx.tp_rank == 0 else 0.0  # a TP group computes its loss once per member: count it once
    t1 = time.perf_counter()
    ctx.position.set(f"step {it} (plan step {step.step}) gradient all-reduce")
    try:
        step_loss = sync_gradients(ctx, loss)
        device_sync(ctx.device)
    except Exception as e:
        raise rank_failure(ctx, e) from e
    t2, c2 = time.perf_counter(), time.process_time()
    gc_s = ctx.gc_clock.take()
    node += [node_cpu_s()] if node else []
    if check is not None:  # outside the timed phases: the gradients' gather (pp or tp > 1) and the reference
        try:
            check.after_sync(ctx)
        except Exception as e:
            raise rank_failure(ctx, e) from e
        check.compare(ctx, work, step_loss)
    node += [node_cpu_s()] if node else []
    t3, c3 = time.perf_counter(), time.process_time()
    ctx.gc_clock.take()
    ctx.position.set(f"step {it} (plan step {step.step}) optimizer step")
    ctx.optimizer.step()
    device_sync(ctx.device)
    t4, c4 = time.perf_counter(), time.process_time()
    gc_s += ctx.gc_clock.take()
    node += [node_cpu_s()] if node else []
    counted = {} if not node or None in node else {
        f"node_{k}_s": (node[3][i] - node[0][i]) - (node[2][i] - node[1][i]) for i, k in enumerate(("cpu", "steal"))}
    return StepRecord(step=it, plan_step=step.step, rank=ctx.rank, hdp_rank=ctx.hdp_rank, start_s=t0,
                      units_s=t1 - t0, grad_sync_s=t2 - t1, optimizer_s=t4 - t3, wall_s=(t4 - t0) - (t3 - t2),
                      cpu_s=(c4 - c0) - (c3 - c2), loss=loss, step_loss=step_loss, gc_s=gc_s, **counted)
