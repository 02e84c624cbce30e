"""A rank's job under torchrun (`python -m planner.runtime`): checks, process group, this rank's
model shard and groups, the step loop, and on rank 0 the results once every rank finished (step
lines, the --check line, the measured trace)."""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist

from costmodel.specs import SpecError
from planner.plan import PlanError, Step
from planner.runtime.ahead import step_planner
from planner.runtime.check import Check, check_owners
from planner.runtime.context import Context, failure_at, make_optimizer, rank_failure
from planner.runtime.feed import StepFeed, open_feed
from planner.runtime.launch import FLASH_CUDA_ON_CPU, Position, Prepared, ReplayFailure, ReplayOptions, prepare
from planner.runtime.model import ModelConfig, TokenSource, build_model, stage_parameters, virtual_stage_layers
from planner.runtime.offload import parameter_pointers
from planner.runtime.step import device_sync, replay_step
from planner.runtime.tp import TPGroup, shard_model
from planner.runtime.trace import RankTrace, TraceLog, align_clocks, build_trace, remove_stale, write_trace
from profiles.measure.probe import PROBE_SOURCE, host_probe_s


def _device(opts: ReplayOptions, local_rank: int) -> torch.device:
    if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PlanError("--device cuda asked for but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if opts.ring_kernel == "flash-cuda":
        raise PlanError(FLASH_CUDA_ON_CPU)  # launched by torchrun directly: meshplan replay refuses it before
    return torch.device("cpu")


def _context(opts: ReplayOptions, prep: Prepared, rank: int, device: torch.device, tokens: TokenSource,
             position: Position) -> Context:
    """This rank's coordinates, model shard and groups (needs the process group)."""
    mesh = prep.plan.mesh
    stage, hdp_rank, tp_rank = mesh.coordinates(rank)
    ranges = tuple(virtual_stage_layers(prep.spec.layers, mesh.pp, prep.chunks))
    config = ModelConfig(prep.spec, precision=opts.dtype, recompute=prep.recompute)
    hf = None
    if opts.hf_config is not None:  # only this stage's parameters materialised (preflight refused tp > 1)
        from planner.runtime.hf import build_hf_model  # transformers: only when asked for

        hf = partial(build_hf_model, opts.hf_config, config, opts.seed, device, opts.hf_weights)
        full = hf((ranges, mesh.pp, stage))
    else:
        full = build_model(config, opts.seed, device)
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
        reference_model = hf() if hf is not None else full if model is not full else copy.deepcopy(full)
    owned = tuple(stage_parameters(model, ranges, mesh.pp, stage))
    check_owned = (check_owners(model, ranges, mesh, stage, hdp_rank, tp_rank) if reference_model is not None
                   else frozenset())
    mine = {id(p) for p in owned}
    for p in model.parameters():  # a stage holds only its own weights
        if id(p) not in mine:
            p.data = p.data.new_empty(0)
    return Context(opts=opts, prep=prep, rank=rank, hdp_rank=hdp_rank, device=device, model=model,
                   optimizer=make_optimizer(list(owned), opts), tokens=tokens, params=parameter_pointers(model),
                   trace=TraceLog(opts.trace_path, rank, time.time() - time.perf_counter()), stage=stage,
                   layer_ranges=ranges, owned=owned, stage_group=dp_groups.get((stage, tp_rank)), tp_rank=tp_rank,
                   full=reference_model, check_owned=check_owned, position=position,
                   node_load=rank == 0 and device.type == "cpu" and _one_node())


def _one_node() -> bool:
    """Every rank runs on this machine (torchrun's local world is the world): the node's CPU time less the ranks'
    is then other processes' load."""
    world = os.environ.get("WORLD_SIZE", "1")
    return os.environ.get("LOCAL_WORLD_SIZE", world) == world


def warm_up(ctx: Context, step: Step, warmed: set[int]) -> int:
    """Before a step: exchange one element with each peer this rank first meets in it (the other
    members of its units, as global ranks), so that transports set up those pair connections (NCCL:
    on first use) outside the timed step; only the pairs of the steps run, never all pairs of all
    steps up front. Every rank follows its plan order and skips the peers it already warmed; a pair
    is new to both ends at the same unit (the first they share, the plan orders shared units alike
    on all members), so both post their exchange there and it is deadlock-free as the units are.
    Returns the number of new peers."""
    mesh = ctx.prep.plan.mesh
    units = {u.id: u for u in step.units}
    new = 0
    for uid in step.order.get(ctx.hdp_rank, []):
        fresh = [g for r in units[uid].hdp_ranks if r != ctx.hdp_rank
                 and (g := mesh.global_rank(ctx.stage, r, ctx.tp_rank)) not in warmed]
        if not fresh:
            continue
        warmed.update(fresh)
        one = torch.zeros(1, device=ctx.device)
        ops = [dist.P2POp(dist.isend, one, g) for g in fresh]
        ops += [dist.P2POp(dist.irecv, torch.empty_like(one), g) for g in fresh]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        new += len(fresh)
    device_sync(ctx.device)
    return new


def host_probe(ctx: Context) -> float | None:
    """CPU: rank 0 times the host probe (profiles/measure/probe.py) while the other ranks wait at a barrier, alone on
    its thread as a profile measures it: how fast the host computes now, next to the steps. None elsewhere (GPU)."""
    if ctx.device.type != "cpu":
        return None
    ctx.position.set("the host probe")
    dist.barrier()
    s = host_probe_s() if ctx.rank == 0 else None
    dist.barrier()
    return s


_REFUSAL_KEY = "meshplan/refusal-said"


def _refusal_said(rank: int, world: int, timeout_s: float) -> None:
    """Rank 0 marks its refusal as printed in torchrun's agent store; the other ranks wait for that mark before
    they exit, since torchrun stops every rank once one exits non-zero, and a rank 0 slower to its verdict (a
    loaded host) would otherwise be stopped before it said why. Launched without the agent store: no wait."""
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=min(timeout_s, 60.0)))
        if rank == 0:
            store.set(_REFUSAL_KEY, "1")
        else:
            store.wait([_REFUSAL_KEY])
    except (RuntimeError, KeyError, ValueError):  # rank 0 stopped or gave another verdict: exit all the same
        pass


def run(opts: ReplayOptions) -> int:
    """The body of `python -m planner.runtime` on every rank: returns a non-zero exit code on refusal;
    a finished run ends the process right after its final barrier (exit code 0)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    position = Position(opts.status_dir, rank)
    try:
        prep = prepare(opts, world)
        tokens = TokenSource(prep.spec.vocab, opts.seed, str(opts.tokens_path) if opts.tokens_path else None)
        device = _device(opts, local_rank)
        planner = (step_planner(prep.plan, opts.lengths, prep.iterations, str(opts.plan_path))
                   if opts.plan_ahead and rank == 0 else None)  # the cost model and batches, before any step
    except (PlanError, SpecError) as e:
        if rank == 0:  # every rank reaches the same verdict; say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        _refusal_said(rank, world, opts.timeout_s)
        return 2
    if rank == 0 and opts.trace_path is not None:
        remove_stale(opts.trace_path)
    backend = "nccl" if device.type == "cuda" else "gloo"
    ctx: Context | None = None
    try:
        position.set("start-up (process group, model)")
        dist.init_process_group(backend, timeout=timedelta(seconds=opts.timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
        ctx = _context(opts, prep, rank, device, tokens, position)
        probes_s = [host_probe(ctx)]  # before plan-ahead's planning thread starts on rank 0
        feed = open_feed(opts, prep, planner, rank, ctx.trace)  # plan-ahead: rank 0 starts planning
        # The collector never walks set-up's objects again (planner/runtime/collector.py); before the gather below,
        # which lines the ranks up for their first step
        ctx.gc_clock.freeze_set_up()
        # Every rank must replay the same plan (each node reads its own copy); a mismatch would
        # hang in P2P, so compare digests first (REFERENCE 11, decision 23). A stream's digest names
        # every step through its index; plan-ahead's, the request rank 0 plans with.
        digests: list[str | None] = [None] * world
        dist.all_gather_object(digests, feed.digest)
        if len(set(digests)) > 1:
            odd = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ReplayFailure(f"rank {rank}: the plan differs across ranks (ranks {odd} read a different plan "
                                f"than rank 0); give every node the same {opts.plan_path}")
        check = Check() if opts.check else None
        warmed: set[int] = set()  # global ranks this rank has a P2P connection with
        for it in range(prep.iterations):
            position.set(f"step {it}: {'its plan from rank 0 (plan-ahead)' if opts.plan_ahead else 'reading its plan'}")
            try:
                work = feed.next(it)
                step = work.step
                position.set(f"the P2P warm-up of step {it} (plan step {step.step})")
                t0 = time.perf_counter()
                pairs = warm_up(ctx, step, warmed)  # only peers this rank has not met yet
                ctx.trace.warmup(time.perf_counter() - t0, pairs)
            except Exception as e:
                raise rank_failure(ctx, e) from e
            try:
                rec = replay_step(ctx, work, check)
            except ReplayFailure:
                raise
            except Exception as e:  # outside any unit: token reading, the check, the optimizer
                raise rank_failure(ctx, e) from e
            ctx.trace.step(rec)
            if rank == 0:  # progress only; the results are printed once every rank finished
                print(f"step {it} (plan step {rec.plan_step}): loss {rec.step_loss:.6f}, rank 0 {rec.wall_s:.3f} s",
                      file=sys.stderr, flush=True)
        probes_s.append(host_probe(ctx))
        position.set("gathering the traces after the last step")
        traces: list[RankTrace | None] = [None] * world if rank == 0 else None
        # each rank reads its own part back (no shared file system needed): rank 0 merges them
        dist.gather_object(ctx.trace.finish(), traces, dst=0)
        if rank == 0:
            _finish(ctx, feed, traces, check, world, probes_s)
        position.set("the final barrier")
        dist.barrier()  # nobody leaves before rank 0 has written everything
        ctx.trace.remove()  # the complete trace holds every record now
    except Exception as e:
        msg = str(e if isinstance(e, ReplayFailure) else failure_at(f"rank {rank}", position.text, e))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if ctx is not None:
            ctx.trace.failed(msg)
        os._exit(1)  # peers may be blocked in P2P with us: no teardown, the launcher ends them
    # Every rank passed the final barrier, so all work is done and rank 0's files are written. Skip the
    # process-group teardown: gloo's destructors can abort ("terminate called without an active
    # exception") while finished P2P work objects are collected, turning a good run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
    sys.stdout.flush()


def _trace_meta(ctx: Context, feed: StepFeed, world: int) -> dict:
    """Inputs' fingerprints, as every output file records them (DESIGN.md conventions)."""
    dev = ctx.device
    return {"plan": str(ctx.opts.plan_path), "plan_sha256": feed.fingerprint(ctx.opts.plan_path),
            "lengths": ctx.opts.lengths,  # plan-ahead's length source (None: the plan's)
            "plan_model": ctx.prep.plan.meta.get("model"), "model": ctx.prep.spec.name, "world_size": world,
            "cp_impl": ctx.opts.cp_impl, "ring_kernel": ctx.opts.ring_kernel, "seed": ctx.opts.seed,
            "optimizer": ctx.opts.optimizer, "lr": ctx.opts.lr, "dtype": ctx.opts.dtype,
            "recompute": ctx.prep.recompute,
            "tokens": str(ctx.opts.tokens_path) if ctx.opts.tokens_path else "generated",
            "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else (platform.processor() or platform.machine()), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "backend": dist.get_backend(), "steps": ctx.prep.iterations,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gc_frozen_objects": ctx.gc_clock.frozen_objects}


def _finish(ctx: Context, feed: StepFeed, traces: list[RankTrace], check: Check | None, world: int,
            probes_s: list[float | None]) -> None:
    """Rank 0, after every rank finished: step lines, the check line, the plan-ahead line, the trace files."""
    align_clocks(traces)
    meta = _trace_meta(ctx, feed, world)
    if None not in probes_s:
        meta["host_probe"] = {"before_s": probes_s[0], "after_s": probes_s[-1], "source": PROBE_SOURCE}
    doc = build_trace(meta, traces, feed.predicted)
    for s in doc["steps"]:
        _emit({"step": {"step": s["step"], "plan_step": s["plan_step"], "loss": s["loss"],
                        "wall_s": s["step_time_s"], "predicted_s": s["predicted_step_time_s"]}})
    if "plan_ahead" in doc["meta"]:
        _emit({"plan_ahead": doc["meta"]["plan_ahead"]})
    if ctx.opts.trace_path is not None:
        j, c = write_trace(ctx.opts.trace_path, doc)
        print(f"trace: {j} and {c}", file=sys.stderr, flush=True)
    if check is not None:
        r = check.result
        _emit({"check": {"max_rel_grad_err": r.max_rel_grad_err, "loss_abs_err": r.loss_abs_err,
                         "ranks": world, "units": r.units}})
