"""Pipeline replay (pp > 1): a rank is one stage of one pipeline (an HDP rank) and runs the op list
the plan's `pipeline` section expands to (`planner.schedule.step_op_lists`, the lists the simulator
times): forward and backward of (unit, slice, chunk), in order.

- Activations and their gradients cross stage boundaries point to point with the same pipeline's
  neighbour (`planner.schedule.dependency` / `consumer` say who); an op's send is posted with the
  next op's receive as one batch, sends are drained at the end of the step, and an op blocks until
  its input is there. Activations and gradients use different tags, so a pair of ranks carrying
  both (p = 2 with chunks) never confuses them.
- A unit shared by several pipelines runs context-parallel on each stage over the unit's ranks of
  that stage, exactly as with pp = 1.
- Sliced units (SlimPipe, `slices` = n): slice j is the j-th uniform part of every document, zigzag
  sharded over the unit's members; it attends the KV cache of slices < j. Backward runs slices in
  reverse and feeds the dK/dV that later slices accumulated into slice j's graph (`cp.KVCache`).
  "sliced-redistributed" is replayed as "sliced": mirror pairing moves work between stages, not
  results, so the gradients are the same.
- The last virtual stage computes the token loss of each slice over the step's global tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from planner.schedule import PipeOp, consumer, dependency, step_op_lists
from planner.plan import Step, Unit
from planner.runtime.cp import KVCache, Peers, ShardLayout, SlicedAttention, unit_attention
from planner.runtime.inputs import Inputs, UnitInputs
from planner.runtime.offload import Offloader
from planner.runtime.trace import CpuUse

_TAG_ACT, _TAG_GRAD = 5, 6  # beside cp.py's 1-4: stage-boundary activations and their gradients


@dataclass
class _UnitRun:
    """One unit on this rank during a step: layouts per slice, inputs, attention, live tensors."""

    unit: Unit
    index: int  # this rank's member index
    layouts: list[list[ShardLayout]]  # [slice][member]
    inputs: list[Inputs]  # per slice: (ids, labels, positions)
    peers: Peers
    offload: Offloader
    cache: KVCache = field(default_factory=KVCache)
    attn: dict[int, object] = field(default_factory=dict)  # per slice
    live: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (slice, chunk) -> (input leaf, output)
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    recv_wait_s: float = 0.0  # blocked receiving stage-boundary tensors
    start_s: float | None = None
    ops: list[list] = field(default_factory=list)  # [kind, slice, chunk, start_s, dur_s, thread_cpu_s]
    cpu: CpuUse = field(default_factory=CpuUse)  # over its ops


def rank_ops(step: Step, pp: int, hdp: int, hdp_rank: int, stage: int) -> list[PipeOp]:
    """This rank's op list (PipeOp.mb = unit id)."""
    return step_op_lists(step, pp, hdp)[(hdp_rank, stage)]


class StageRunner:
    """Runs one step's op list on one rank. `ctx` is the rank's Context (planner/runtime/context.py: model,
    device, mesh coordinates, options); `ready` holds its units' inputs (planner/runtime/inputs.py) and
    `token_loss` comes from planner/runtime/step.py."""

    def __init__(self, ctx, step: Step, ready: dict[int, UnitInputs], token_loss) -> None:
        self.ctx, self.step, self.ready = ctx, step, ready
        self.token_loss = token_loss
        mesh = ctx.prep.plan.mesh
        self.p, self.hdp, self.v = mesh.pp, mesh.hdp, step.chunks_per_stage
        self.units = {u.id: u for u in step.units}
        self.runs: dict[int, _UnitRun] = {}
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []  # posted, kept alive until the step ends
        self.pending: list[tuple[int, torch.Tensor, int]] = []  # (peer, tensor, tag) to post with the next op
        self.loss = 0.0

    # -- coordinates --------------------------------------------------------------------------
    def _rank_of(self, stage: int) -> int:
        return self.ctx.prep.plan.mesh.global_rank(stage, self.ctx.hdp_rank, self.ctx.tp_rank)

    def _layers(self, chunk: int) -> tuple[int, int]:
        return self.ctx.layer_ranges[chunk * self.p + self.ctx.stage]

    def _last(self, chunk: int) -> bool:
        return self.ctx.stage == self.p - 1 and chunk == self.v - 1

    # -- per unit -----------------------------------------------------------------------------
    def _run(self, uid: int) -> _UnitRun:
        if uid not in self.runs:
            u, ctx, ready = self.units[uid], self.ctx, self.ready[uid]
            mesh = ctx.prep.plan.mesh
            peers = Peers(tuple(mesh.global_rank(ctx.stage, r, ctx.tp_rank) for r in u.hdp_ranks), ready.index)
            self.runs[uid] = _UnitRun(u, ready.index, ready.layouts, ready.inputs, peers,
                                      Offloader(u.offload_ratio, ctx.params))
        return self.runs[uid]

    def _attention(self, run: _UnitRun, j: int):
        if j not in run.attn:
            ctx = self.ctx
            if run.unit.slices == 1:
                run.attn[j] = unit_attention(run.unit, run.layouts[0], run.peers, ctx.opts.cp_impl,
                                             ctx.prep.spec.head_dim, ctx.device, ctx.opts.ring_kernel)
            else:  # launch.check_step refused sliced Ulysses units
                run.attn[j] = SlicedAttention(run.layouts, j, run.peers, run.cache, ctx.device)
        return run.attn[j]

    # -- transfers ----------------------------------------------------------------------------
    # An op's output send is posted together with the next op's input receive, as one batch
    # (Megatron's send_forward_recv_backward): in 1F1B neighbours each send before they receive from
    # each other, which NCCL (one stream per pair, a send waits for its receive) would deadlock on.
    def _input(self, op: PipeOp, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Post the pending send and, when the op reads another stage's output, its receive; return
        that input (None: embedding, or the loss on the last stage)."""
        d = dependency(op, self.ctx.stage, self.p, self.v, self.units[op.mb].slices - 1)
        ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for peer, t, tag in self.pending]
        buf = None
        if d is not None and d[0] != self.ctx.stage:
            buf = torch.empty(shape, device=self.ctx.device)
            ops.append(dist.P2POp(dist.irecv, buf, self._rank_of(d[0]), tag=_TAG_ACT if op.kind == "F" else _TAG_GRAD))
        if ops:
            works = dist.batch_isend_irecv(ops)
            self.sends += [(w, t) for w, (_, t, _) in zip(works, self.pending)]
            if buf is not None:
                t0 = time.perf_counter()
                works[-1].wait()
                self._run(op.mb).recv_wait_s += time.perf_counter() - t0
        self.pending = []
        return buf

    def _send(self, op: PipeOp, t: torch.Tensor) -> None:
        c = consumer(op, self.ctx.stage, self.p, self.v)
        if c is not None:
            self.pending.append((self._rank_of(c[0]), t.contiguous(), _TAG_ACT if op.kind == "F" else _TAG_GRAD))

    # -- ops ----------------------------------------------------------------------------------
    def forward(self, op: PipeOp) -> None:
        run, j, c = self._run(op.mb), op.slice, op.chunk
        ids, labels, pos = run.inputs[j]
        ctx = self.ctx
        x = self._input(op, (ids.numel(), ctx.prep.spec.hidden))
        mark, t0 = CpuUse.mark(), time.perf_counter()
        with run.offload.active():
            if ctx.opts.inject_failure is not None:
                ctx.opts.inject_failure.fire(ctx.rank, op.mb)
            if x is None:
                h = ctx.model.embed_tokens(ids)
            else:
                h = x.requires_grad_()
            a, b = self._layers(c)
            y = ctx.model.run_layers(h, pos, self._attention(run, j), a, b)
            if self._last(c):
                y = self.token_loss(ctx.model, ctx.model.logits(y), labels, self.step.global_tokens)
                self.loss += float(y.detach())
        run.live[(j, c)] = (x, y)
        if not self._last(c):
            self._send(op, y.detach())
        self._timed(run, "F", op, t0, mark)

    def backward(self, op: PipeOp) -> None:
        run, j, c = self._run(op.mb), op.slice, op.chunk
        x, y = run.live.pop((j, c))
        dy = self._input(op, tuple(y.shape))
        mark, t0 = CpuUse.mark(), time.perf_counter()
        a, b = self._layers(c)
        roots, grads = run.cache.backward_roots(j, range(a, b)) if run.unit.slices > 1 else ([], [])
        torch.autograd.backward([y, *roots], [dy, *grads])
        if x is not None:
            self._send(op, x.grad)
        self._timed(run, "B", op, t0, mark)

    def _timed(self, run: _UnitRun, kind: str, op: PipeOp, t0: float, mark: tuple[float, float]) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        t1 = time.perf_counter()
        cpu = run.cpu.add_since(mark)
        if kind == "F":
            run.fwd_s += t1 - t0
        else:
            run.bwd_s += t1 - t0
        run.start_s = t0 if run.start_s is None else run.start_s
        run.ops.append([kind, op.slice, op.chunk, t0, t1 - t0, cpu])

    def _flush(self) -> None:
        if self.pending:
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer, tag=tag) for peer, t, tag in self.pending])
            self.sends += [(w, t) for w, (_, t, _) in zip(works, self.pending)]
            self.pending = []

    def finish(self) -> None:
        """Every send of the step delivered (the receivers have them)."""
        self._flush()
        for w, _ in self.sends:
            w.wait()
        self.sends.clear()
