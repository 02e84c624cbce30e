"""Replay a plan under torchrun: every HDP rank runs its units in the plan's order, then one
gradient all-reduce and an optimizer step (DESIGN.md "Core concepts").

Per unit, a member builds its zigzag shard of the unit's documents, runs forward with the unit's
attention (packed, or context-parallel over P2P with the other members) under the unit's
offload hooks, and adds token-level cross-entropy divided by the step's global token count, so
the all-reduced gradient is the full batch's whatever the assignment (REFERENCE 1, Eq. 1-2).

`--check` makes rank 0 replay the same global batch in one process with plain per-sequence
attention and compare losses and gradients. With pp > 1 a rank is one stage of one pipeline and
runs the plan's op lists (planner/runtime/stages.py); with tp > 1 an HDP rank is a TP group
(planner/runtime/tp.py) whose members talk to the same TP rank of other HDP ranks."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from costmodel.specs import SpecError
from planner.plan import Plan, PlanError, Step, Unit
from planner.runtime import InjectedFailure, preflight
from planner.runtime.cp import CPImpl, Peers, shard_layout, unit_attention, unit_documents
from planner.runtime.model import IGNORE_INDEX, Decoder, ModelConfig, TokenSource, build_model, virtual_stage_layers
from planner.runtime.offload import Offloader, parameter_pointers
from planner.runtime.trace import RankTrace, StepRecord, UnitRecord, build_trace, remove_stale, write_trace


class ReplayFailure(RuntimeError):
    """A rank failed while running; the message names the rank, step and unit."""


@dataclass(frozen=True)
class ReplayOptions:
    plan_path: Path  # plan JSON
    model: str | None = None  # model preset / file; None = the plan's meta["model"]
    steps: int | None = None  # iterations to run; None = every plan step once (more cycle the plan)
    check: bool = False  # compare with a single-process reference on rank 0
    trace_path: Path | None = None  # measured trace JSON (a .chrome.json is written beside it)
    cp_impl: CPImpl = "ring"  # context-parallel attention: "ring" (overlapped) or "allgather"
    ring_kernel: str = "auto"  # ring block kernel: "auto" (fused on CPU), "math" or "fused-cpu"
    seed: int = 0  # model init and generated tokens
    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 1e-3  # learning rate
    tokens_path: Path | None = None  # flat .npy token stream; None = generated tokens
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    timeout_s: float = 300.0  # process-group timeout: a lost peer ends the job after this at most
    inject_failure: InjectedFailure | None = None  # tests: a rank failing (or killed) in a unit's forward
    status_dir: Path | None = None  # each rank keeps its position in rankN here (read by `meshplan replay`)


@dataclass(frozen=True)
class Prepared:
    """What every rank checks before the process group exists."""

    plan: Plan
    config: ModelConfig
    iterations: int  # replayed steps
    chunks: int = 1  # model chunks per pipeline stage (v), the same in every step


def prepare(opts: ReplayOptions, world_size: int) -> Prepared:
    """Every check that needs no process group (planner.runtime.preflight)."""
    plan, spec = preflight(opts.plan_path, world_size, opts.model, cp_impl=opts.cp_impl,
                           ring_kernel=opts.ring_kernel, optimizer=opts.optimizer, steps=opts.steps)
    return Prepared(plan, ModelConfig.from_spec(spec), len(plan.steps) if opts.steps is None else opts.steps,
                    int((plan.steps[0].pipeline or {}).get("v", 1)))


# -- one step ---------------------------------------------------------------------------------

def unit_inputs(tokens: dict[int, torch.Tensor], layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels, RoPE positions) of a member's local tokens; padding gets id 0 and an
    ignored label."""
    inp = torch.zeros(layout.tokens, dtype=torch.long)
    lab = torch.full((layout.tokens,), IGNORE_INDEX, dtype=torch.long)
    for sid in layout.seq.unique().tolist():
        sel = (layout.seq == sid) & layout.valid
        pos = layout.pos[sel]
        inp[sel] = tokens[sid][pos]
        lab[sel] = tokens[sid][pos + 1]
    return inp, lab, layout.pos


def token_loss(logits: torch.Tensor, labels: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """Summed token cross-entropy over the global token count (ByteScale Eq. 1-2)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / global_tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class Position:
    """Where this rank is in the run ("step 0 (plan step 0) unit 3 (HDP ranks [0, 1])"). Named in the
    rank's own error, and kept in STATUS_DIR/rankN so that `meshplan replay` can name it when the
    process dies without a word (SIGKILL, the out-of-memory killer): the page cache outlives it."""

    def __init__(self, status_dir: Path | None, rank: int) -> None:
        self._fd = (os.open(status_dir / f"rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    if status_dir is not None else None)
        self.text = ""
        self.set("start-up")

    def set(self, text: str) -> None:
        self.text = text
        if self._fd is not None:
            data = text.encode()
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))


def _ranks(ranks: tuple[int, ...]) -> str:
    """HDP ranks of a unit for a message; long lists elided (a unit may span a thousand ranks)."""
    shown = list(ranks) if len(ranks) <= 8 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)} ranks)"
    return f"HDP ranks {shown}"


@dataclass
class Context:
    """Per-rank state of a replay."""

    opts: ReplayOptions
    prep: Prepared
    rank: int
    hdp_rank: int
    device: torch.device
    model: Decoder
    optimizer: torch.optim.Optimizer
    tokens: TokenSource
    params: frozenset[int]  # parameter data pointers (never offloaded)
    trace: RankTrace
    stage: int = 0  # pipeline stage of this rank
    layer_ranges: tuple[tuple[int, int], ...] = ()  # [start, end) per virtual stage (chunk·pp + stage)
    owned: tuple[nn.Parameter, ...] = ()  # parameters of this stage (all of them when pp = 1)
    stage_group: object = None  # process group of this stage's HDP ranks of our TP rank (None: the world)
    tp_rank: int = 0  # index in the TP group
    full: Decoder | None = None  # --check with pp or tp > 1: the whole model, filled from the shards' owners
    check_owned: frozenset[str] = frozenset()  # names of the parameters this rank fills `full` with
    position: Position = field(default_factory=lambda: Position(None, 0))  # where this rank is, for failures


def run_unit(ctx: Context, it: int, step: Step, unit: Unit, tokens: dict[int, torch.Tensor]) -> float:
    """Forward and backward of one unit on this rank; returns its loss share."""
    mesh = ctx.prep.plan.mesh
    index = unit.hdp_ranks.index(ctx.hdp_rank)
    docs = unit_documents(unit.pieces)
    layouts = [shard_layout(docs, unit.degree, j) for j in range(unit.degree)]
    inp, lab, pos = (t.to(ctx.device) for t in unit_inputs(tokens, layouts[index]))
    peers = Peers(tuple(mesh.global_rank(ctx.stage, r, ctx.tp_rank) for r in unit.hdp_ranks), index)
    attn = unit_attention(unit, layouts, peers, ctx.opts.cp_impl, ctx.prep.config.head_dim, ctx.device,
                          ctx.opts.ring_kernel)
    off = Offloader(unit.offload_ratio, ctx.params)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    with off.active():
        if ctx.opts.inject_failure is not None:
            ctx.opts.inject_failure.fire(ctx.rank, unit.id)
        loss = token_loss(ctx.model(inp, pos, attn), lab, step.global_tokens)
    _sync(ctx.device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(ctx.device)
    t2 = time.perf_counter()
    ctx.trace.units.append(UnitRecord(
        step=it, plan_step=step.step, rank=ctx.rank, hdp_rank=ctx.hdp_rank, unit=unit.id, degree=unit.degree,
        tokens=layouts[index].tokens, start_s=t0, fwd_s=t1 - t0, bwd_s=t2 - t1, comm_wait_s=peers.stats.wait_s,
        sent_bytes=peers.stats.sent_bytes, saved_bytes=off.stats.saved_bytes,
        offloaded_bytes=off.stats.offloaded_bytes, offload_ratio=unit.offload_ratio,
        peak_memory_bytes=_peak_memory(ctx.device), predicted_time_s=unit.predicted_time_s))
    return float(loss.detach())


def prewarm(ctx: Context) -> float:
    """Exchange one element with every rank set the plan shares a unit over, following the plan's
    orders (deadlock-free for the same reason the units are), so transports set up their pair
    connections (NCCL: on first use) before step 0 is timed. Returns the seconds it took."""
    t0 = time.perf_counter()
    done: set[tuple[int, ...]] = set()
    for step in ctx.prep.plan.steps:
        units = {u.id: u for u in step.units}
        for uid in step.order.get(ctx.hdp_rank, []):
            u = units[uid]
            if u.degree > 1 and u.hdp_ranks not in done:  # every member skips the same repeats
                done.add(u.hdp_ranks)
                mesh = ctx.prep.plan.mesh
                Peers(tuple(mesh.global_rank(ctx.stage, r, ctx.tp_rank) for r in u.hdp_ranks),
                      u.hdp_ranks.index(ctx.hdp_rank)).all_gather(
                    torch.zeros(1, device=ctx.device))
    _sync(ctx.device)
    return time.perf_counter() - t0


def _flat_all_reduce(tensors: list[torch.Tensor], extra: list[float], group=None) -> list[float]:
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
    total = _flat_all_reduce([p.grad for p in ctx.owned], [loss], ctx.stage_group)[0]
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


def collect_full(ctx: Context, attr: str) -> None:
    """--check with pp or tp > 1: every parameter's value ("data") or gradient ("grad") into ctx.full on
    every rank, each piece from its one owner (`check_owners`)."""
    from planner.runtime.tp import place_shard

    tp = ctx.prep.plan.mesh.tp
    local = dict(ctx.model.named_parameters())
    vals = []
    for name, p in ctx.full.named_parameters():
        src = local[name].data if attr == "data" else local[name].grad
        vals.append(place_shard(p.shape, src, name, tp, ctx.tp_rank) if name in ctx.check_owned
                    else torch.zeros_like(p.data))
    _flat_all_reduce(vals, [0.0])
    for (name, p), val in zip(ctx.full.named_parameters(), vals):
        if attr == "data":
            p.data.copy_(val)
        else:
            p.grad = val


def check_owners(model: Decoder, layer_ranges: tuple[tuple[int, int], ...], mesh, stage: int, hdp_rank: int,
                 tp_rank: int) -> frozenset[str]:
    """Names of the parameters this rank contributes to the whole-model copy: HDP rank 0 of the first
    stage holding a parameter, every TP rank for its shard, TP rank 0 for replicated weights."""
    from planner.runtime.tp import shard_dim

    if hdp_rank != 0:
        return frozenset()
    name_of = {id(p): n for n, p in model.named_parameters()}
    first = {}
    for s in reversed(range(mesh.pp)):
        for p in stage_parameters(model, layer_ranges, mesh.pp, s):
            first[name_of[id(p)]] = s
    return frozenset(n for n, s in first.items() if s == stage and (tp_rank == 0 or shard_dim(n) is not None))


def stage_parameters(model: Decoder, layer_ranges: tuple[tuple[int, int], ...], pp: int,
                     stage: int) -> list[nn.Parameter]:
    """Parameters pipeline stage `stage` owns (its chunks' layers; embedding first, head last)."""
    v = len(layer_ranges) // pp
    return model.stage_parameters([layer_ranges[c * pp + stage] for c in range(v)], stage == 0, stage == pp - 1)


class ReferenceAttention:
    """The reference's attention for one whole sequence: causal within each of its plan segments
    (a sequence split over units is one document per unit, as the executor runs it)."""

    def __init__(self, segment: torch.Tensor) -> None:
        n = segment.numel()
        self.mask = None if bool((segment == segment[0]).all()) else (
            (segment[:, None] == segment[None, :]) & torch.ones(n, n, dtype=torch.bool, device=segment.device).tril())

    def __call__(self, q, k, v, layer):
        qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=self.mask, is_causal=self.mask is None,
                                           enable_gqa=True)
        return o[0].transpose(0, 1)


def reference_step(model: Decoder, step: Step, tokens: dict[int, torch.Tensor], device: torch.device) -> float:
    """Single-process forward and backward of the whole global batch, one sequence at a time with
    plain causal attention; gradients accumulate in model. Returns the loss."""
    segment = {q.id: torch.empty(q.length, dtype=torch.long) for q in step.sequences}
    for u in step.units:
        for p in u.pieces:
            segment[p.seq][p.start:p.end] = u.id
    total = 0.0
    for q in step.sequences:
        ids = tokens[q.id].to(device)
        logits = model(ids[:-1], torch.arange(q.length, device=device), ReferenceAttention(segment[q.id].to(device)))
        loss = token_loss(logits, ids[1:], step.global_tokens)
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
    source = TokenSource(config.vocab, opts.seed, str(opts.tokens_path) if opts.tokens_path else None)
    times = []
    for it in range(iterations):
        step = plan.steps[it % len(plan.steps)]
        tokens = source.tokens(it, step.sequences, _stream_offset(plan, it))
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


def make_optimizer(params: list[nn.Parameter], opts: ReplayOptions) -> torch.optim.Optimizer:
    # foreach=False: the plain per-parameter loop, same on every rank and device.
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, foreach=False)
    return torch.optim.AdamW(params, lr=opts.lr, foreach=False)


def _stream_offset(plan: Plan, it: int) -> int:
    return sum(plan.steps[i % len(plan.steps)].global_tokens for i in range(it))


def _peer_lost(e: Exception) -> bool:
    """A transport error caused by another rank dying (its own error names the root cause)."""
    text = str(e)
    return isinstance(e, dist.DistBackendError) or any(
        m in text for m in ("Connection closed by peer", "Connection reset by peer", "remote worker"))


def _failure_at(who: str, where: str, e: Exception) -> ReplayFailure:
    verb = "stopped (a peer rank failed first)" if _peer_lost(e) else "failed"
    return ReplayFailure(f"{who} {verb} in {where}: {type(e).__name__}: {e}")


def _failure(ctx: Context, e: Exception) -> ReplayFailure:
    """The rank's error, naming where it was (ctx.position)."""
    return _failure_at(f"rank {ctx.rank} (HDP rank {ctx.hdp_rank})", ctx.position.text, e)


@dataclass
class CheckResult:
    max_rel_grad_err: float = 0.0
    loss_abs_err: float = 0.0
    units: int = 0


def _enter_unit(ctx: Context, it: int, step: Step, unit: Unit) -> None:
    stage = f" on stage {ctx.stage}" if ctx.prep.plan.mesh.pp > 1 else ""
    ctx.position.set(f"step {it} (plan step {step.step}) unit {unit.id}{stage} ({_ranks(unit.hdp_ranks)})")


def run_units(ctx: Context, it: int, step: Step, tokens: dict[int, torch.Tensor]) -> float:
    """pp = 1: this rank's units in plan order; returns its loss share."""
    units = {u.id: u for u in step.units}
    loss = 0.0
    for uid in step.order.get(ctx.hdp_rank, []):
        _enter_unit(ctx, it, step, units[uid])
        try:
            loss += run_unit(ctx, it, step, units[uid], tokens)
        except Exception as e:  # name the rank and unit; the launcher ends the other ranks
            raise _failure(ctx, e) from e
    return loss


def run_pipelined(ctx: Context, it: int, step: Step, tokens: dict[int, torch.Tensor]) -> float:
    """pp > 1: this rank's op list (planner/runtime/stages.py); returns its loss share (last stage)."""
    from planner.runtime.stages import StageRunner, rank_ops

    mesh = ctx.prep.plan.mesh
    runner = StageRunner(ctx, step, tokens, unit_inputs, token_loss)
    units = {u.id: u for u in step.units}
    for op in rank_ops(step, mesh.pp, mesh.hdp, ctx.hdp_rank, ctx.stage):
        _enter_unit(ctx, it, step, units[op.mb])
        try:
            (runner.forward if op.kind == "F" else runner.backward)(op)
        except Exception as e:
            raise _failure(ctx, e) from e
    ctx.position.set(f"step {it} (plan step {step.step}) stage-boundary sends")
    try:
        runner.finish()
    except Exception as e:
        raise _failure(ctx, e) from e
    for run in runner.runs.values():
        u = run.unit
        ctx.trace.units.append(UnitRecord(
            step=it, plan_step=step.step, rank=ctx.rank, hdp_rank=ctx.hdp_rank, unit=u.id, degree=u.degree,
            tokens=sum(lay[run.index].tokens for lay in run.layouts), start_s=run.start_s, fwd_s=run.fwd_s,
            bwd_s=run.bwd_s, comm_wait_s=run.peers.stats.wait_s + run.recv_wait_s,
            sent_bytes=run.peers.stats.sent_bytes, saved_bytes=run.offload.stats.saved_bytes,
            offloaded_bytes=run.offload.stats.offloaded_bytes, offload_ratio=u.offload_ratio,
            peak_memory_bytes=_peak_memory(ctx.device), predicted_time_s=u.predicted_time_s, stage=ctx.stage,
            slices=u.slices, ops=run.ops))
    return runner.loss


def replay_step(ctx: Context, it: int, check: CheckResult | None) -> StepRecord:
    plan = ctx.prep.plan
    step = plan.steps[it % len(plan.steps)]
    ctx.position.set(f"step {it} (plan step {step.step}) before its first unit")
    units = {u.id: u for u in step.units}
    mine = step.order.get(ctx.hdp_rank, [])
    wanted = {p.seq for uid in mine for p in units[uid].pieces}
    offset = _stream_offset(plan, it)
    tokens = ctx.tokens.tokens(it, step.sequences, offset, wanted)
    pipelined = plan.mesh.pp > 1
    whole = ctx.model if ctx.full is None else ctx.full  # what the reference is compared with
    if check is not None and ctx.full is not None:  # rank 0's reference starts from every shard's weights
        collect_full(ctx, "data")
    reference = copy.deepcopy(whole) if check is not None and ctx.rank == 0 else None
    if reference is not None:
        reference.zero_grad(set_to_none=True)
    for p in ctx.owned:  # zeros, not None: ranks without units still join the all-reduce
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = run_pipelined(ctx, it, step, tokens) if pipelined else run_units(ctx, it, step, tokens)
    loss = loss if ctx.tp_rank == 0 else 0.0  # a TP group computes its loss once per member: count it once
    t1 = time.perf_counter()
    ctx.position.set(f"step {it} (plan step {step.step}) gradient all-reduce")
    try:
        step_loss = sync_gradients(ctx, loss)
        if check is not None and ctx.full is not None:
            collect_full(ctx, "grad")
        _sync(ctx.device)
    except Exception as e:
        raise _failure(ctx, e) from e
    t2, c2 = time.perf_counter(), time.process_time()
    if reference is not None:
        ctx.position.set(f"step {it} (plan step {step.step}) --check reference")
        all_tokens = ctx.tokens.tokens(it, step.sequences, offset)
        ref_loss = reference_step(reference, step, all_tokens, ctx.device)
        check.max_rel_grad_err = max(check.max_rel_grad_err, max_rel_grad_err(whole, reference))
        check.loss_abs_err = max(check.loss_abs_err, abs(ref_loss - step_loss))
        check.units += len(step.units)
        del reference
    t3, c3 = time.perf_counter(), time.process_time()
    ctx.position.set(f"step {it} (plan step {step.step}) optimizer step")
    ctx.optimizer.step()
    _sync(ctx.device)
    t4, c4 = time.perf_counter(), time.process_time()
    return StepRecord(step=it, plan_step=step.step, rank=ctx.rank, hdp_rank=ctx.hdp_rank, start_s=t0,
                      units_s=t1 - t0, grad_sync_s=t2 - t1, optimizer_s=t4 - t3, wall_s=(t4 - t0) - (t3 - t2),
                      cpu_s=(c4 - c0) - (c3 - c2), loss=loss, step_loss=step_loss)


# -- the job ----------------------------------------------------------------------------------

def _device(opts: ReplayOptions, local_rank: int) -> torch.device:
    if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PlanError("--device cuda asked for but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
    sys.stdout.flush()


def _trace_meta(ctx: Context, world: int) -> dict:
    """Inputs' fingerprints, as every output file records them (DESIGN.md conventions)."""
    dev = ctx.device
    return {"plan": str(ctx.opts.plan_path),
            "plan_sha256": hashlib.sha256(Path(ctx.opts.plan_path).read_bytes()).hexdigest(),
            "plan_model": ctx.prep.plan.meta.get("model"), "model": ctx.prep.config.name, "world_size": world,
            "cp_impl": ctx.opts.cp_impl, "ring_kernel": ctx.opts.ring_kernel, "seed": ctx.opts.seed,
            "optimizer": ctx.opts.optimizer, "lr": ctx.opts.lr,
            "tokens": str(ctx.opts.tokens_path) if ctx.opts.tokens_path else "generated",
            "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else (platform.processor() or platform.machine()), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "backend": dist.get_backend(), "steps": ctx.prep.iterations,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _context(opts: ReplayOptions, prep: Prepared, rank: int, device: torch.device, tokens: TokenSource,
             position: Position) -> Context:
    """This rank's coordinates, model shard and groups (needs the process group)."""
    from planner.runtime.tp import TPGroup, shard_model

    mesh = prep.plan.mesh
    stage, rest = divmod(rank, mesh.hdp * mesh.tp)
    hdp_rank, tp_rank = divmod(rest, mesh.tp)
    full = build_model(prep.config, opts.seed, device)
    # Static groups, created by every rank in the same order: per (stage, tp rank) the HDP ranks that
    # all-reduce gradients, per (stage, HDP rank) the TP group. Units never get one (P2P on the world).
    split = mesh.pp > 1 or mesh.tp > 1
    dp_groups = {(s, t): dist.new_group([mesh.global_rank(s, r, t) for r in range(mesh.hdp)])
                 for s in range(mesh.pp) for t in range(mesh.tp)} if split else {}
    tp_groups = {(s, r): dist.new_group([mesh.global_rank(s, r, t) for t in range(mesh.tp)])
                 for s in range(mesh.pp) for r in range(mesh.hdp)} if mesh.tp > 1 else {}
    model = shard_model(full, TPGroup(tp_groups[(stage, hdp_rank)], mesh.tp, tp_rank)) if mesh.tp > 1 else full
    reference_model = None
    if opts.check and split:  # rank 0's reference needs the whole model: every rank keeps a full copy to fill
        reference_model = full if model is not full else copy.deepcopy(full)
    ranges = tuple(virtual_stage_layers(prep.config.layers, mesh.pp, prep.chunks))
    owned = tuple(stage_parameters(model, ranges, mesh.pp, stage))
    check_owned = (check_owners(model, ranges, mesh, stage, hdp_rank, tp_rank) if reference_model is not None
                   else frozenset())
    mine = {id(p) for p in owned}
    for p in model.parameters():  # a stage holds only its own weights
        if id(p) not in mine:
            p.data = p.data.new_empty(0)
    return Context(opts=opts, prep=prep, rank=rank, hdp_rank=hdp_rank, device=device, model=model,
                   optimizer=make_optimizer(list(owned), opts), tokens=tokens, params=parameter_pointers(model),
                   trace=RankTrace(rank, time.time() - time.perf_counter()), stage=stage, layer_ranges=ranges,
                   owned=owned, stage_group=dp_groups.get((stage, tp_rank)), tp_rank=tp_rank, full=reference_model,
                   check_owned=check_owned, position=position)


def run(opts: ReplayOptions) -> int:
    """The body of `python -m planner.runtime` on every rank: returns a non-zero exit code on refusal;
    a finished run ends the process right after its final barrier (exit code 0)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    position = Position(opts.status_dir, rank)
    try:
        prep = prepare(opts, world)
        tokens = TokenSource(prep.config.vocab, opts.seed, str(opts.tokens_path) if opts.tokens_path else None)
        device = _device(opts, local_rank)
    except (PlanError, SpecError) as e:
        if rank == 0:  # every rank reaches the same verdict; say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if rank == 0 and opts.trace_path is not None:
        remove_stale(opts.trace_path)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        position.set("start-up (process group, model)")
        dist.init_process_group(backend, timeout=timedelta(seconds=opts.timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
        ctx = _context(opts, prep, rank, device, tokens, position)
        # Every rank must replay the same plan (each node reads its own copy); a mismatch would
        # hang in P2P, so compare digests first (REFERENCE 11, decision 23).
        digest = hashlib.sha256(prep.plan.to_json().encode()).hexdigest()
        digests: list[str | None] = [None] * world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            odd = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ReplayFailure(f"rank {rank}: the plan differs across ranks (ranks {odd} read a different plan "
                                f"than rank 0); give every node the same {opts.plan_path}")
        position.set("the P2P warm-up before step 0")
        try:
            ctx.trace.prewarm_s = prewarm(ctx)
        except Exception as e:
            raise _failure(ctx, e) from e
        check = CheckResult() if opts.check else None
        for it in range(prep.iterations):
            try:
                rec = replay_step(ctx, it, check)
            except ReplayFailure:
                raise
            except Exception as e:  # outside any unit: token reading, the check, the optimizer
                raise _failure(ctx, e) from e
            ctx.trace.steps.append(rec)
            if rank == 0:  # progress only; the results are printed once every rank finished
                print(f"step {it} (plan step {rec.plan_step}): loss {rec.step_loss:.6f}, rank 0 {rec.wall_s:.3f} s",
                      file=sys.stderr, flush=True)
        position.set("gathering the traces after the last step")
        traces: list[RankTrace | None] = [None] * world if rank == 0 else None
        dist.gather_object(ctx.trace, traces, dst=0)
        if rank == 0:
            _finish(ctx, traces, check, world)
        position.set("the final barrier")
        dist.barrier()  # nobody leaves before rank 0 has written everything
    except Exception as e:
        msg = str(e if isinstance(e, ReplayFailure) else _failure_at(f"rank {rank}", position.text, e))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        os._exit(1)  # peers may be blocked in P2P with us: no teardown, the launcher ends them
    # Every rank passed the final barrier, so all work is done and rank 0's files are written. Skip the
    # process-group teardown: gloo's destructors can abort ("terminate called without an active
    # exception") while finished P2P work objects are collected, turning a good run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _finish(ctx: Context, traces: list[RankTrace], check: CheckResult | None, world: int) -> None:
    """Rank 0, after every rank finished: step lines, the check line, the trace files."""
    origin = min(t.clock_offset_s + min((s.start_s for s in t.steps), default=0.0) for t in traces)
    for t in traces:  # per-rank perf_counter -> shared wall clock, zero at the first step start
        shift = t.clock_offset_s - origin
        for u in t.units:
            u.start_s += shift
            for o in u.ops:
                o[3] += shift
        for s in t.steps:
            s.start_s += shift
    plan = ctx.prep.plan
    doc = build_trace(_trace_meta(ctx, world), traces, {s.step: s.predicted.step_time_s for s in plan.steps})
    for s in doc["steps"]:
        _emit({"step": {"step": s["step"], "plan_step": s["plan_step"], "loss": s["loss"],
                        "wall_s": s["step_time_s"], "predicted_s": s["predicted_step_time_s"]}})
    if ctx.opts.trace_path is not None:
        j, c = write_trace(ctx.opts.trace_path, doc)
        print(f"trace: {j} and {c}", file=sys.stderr, flush=True)
    if check is not None:
        _emit({"check": {"max_rel_grad_err": check.max_rel_grad_err, "loss_abs_err": check.loss_abs_err,
                         "ranks": world, "units": check.units}})
