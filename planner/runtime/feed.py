"""Where a replay's steps come from, one per iteration; every rank calls `StepFeed.next(it)` for the
same iterations in the same order (plan-ahead's is a collective).

- `PlanFeed`: a whole plan JSON, loaded and validated by every rank before step 0 (small plans).
- `StreamFeed`: a plan stream (planner/plan/stream.py): each rank reads, validates and checks only the
  step it runs, when it runs it.
- `AheadFeed` (--plan-ahead): rank 0 plans iteration t + 1 from the length source in a background thread
  (planner/runtime/ahead.py) while iteration t trains, then sends every other rank only its part of the
  step (`rank_parts`: its units and order, the sequences they touch, its pipeline op list) with one
  scatter on the world group: no per-step process group, no plan file per step. Each planning is a
  PlanningRecord in rank 0's trace: its span, and how long the next iteration waited for it."""

from __future__ import annotations

import hashlib
import pickle
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch.distributed as dist

from planner.plan import Mesh, Plan, Predicted, Step
from planner.plan.stream import PlanStream, is_stream, plan_fingerprint
from planner.runtime.ahead import StepPlanner
from planner.runtime.launch import Prepared, ReplayOptions, check_step
from planner.runtime.trace import PlanningRecord, TraceLog
from planner.schedule.ops import PipeOp, step_op_lists


@dataclass(frozen=True)
class StepWork:
    """One iteration as one rank runs it."""

    it: int  # replay iteration
    step: Step  # the whole plan step, or this rank's part of it (plan-ahead, ranks other than 0: rank_parts)
    stream_offset: int  # where the iteration's share of a token file's stream starts (earlier iterations' tokens)
    starts: dict[int, int] | None = None  # a part: each sequence's first token in the iteration's share
    ops: list[PipeOp] | None = None  # a part with pp > 1: this rank's op list, expanded from the whole step


Part = tuple[Step, dict[int, int], list[PipeOp] | None]  # what rank_parts gives one rank


def rank_parts(step: Step, mesh: Mesh) -> list[Part]:
    """What each global rank needs of `step` (index: global rank): its HDP rank's units and order, the
    sequences they touch with where each starts in the step's token stream (which the other sequences would
    otherwise give), the loss normaliser and predicted step time, and with pp > 1 its op list (which depends
    on every unit of the step, so it is expanded here from the whole step). One pass over the units and
    sequences (0.03 s for the 1,024 ranks of a LLaMA-7B step, docs/BENCHMARKS.md)."""
    units: dict[int, list] = {r: [] for r in range(mesh.hdp)}
    for u in step.units:
        for r in u.hdp_ranks:
            units[r].append(u)
    first, offset = {}, 0  # sequence id -> its first token in the step's stream
    for q in step.sequences:
        first[q.id] = offset
        offset += q.length
    seq = {q.id: q for q in step.sequences}
    lists = step_op_lists(step, mesh.pp, mesh.hdp) if mesh.pp > 1 else None
    parts: dict[int, Step] = {}
    out = []
    for rank in range(mesh.world_size):
        stage, hdp_rank, _ = mesh.coordinates(rank)
        if hdp_rank not in parts:
            mine = units[hdp_rank]
            wanted = {p.seq for u in mine for p in u.pieces}
            pipeline = step.pipeline
            if pipeline is not None and pipeline.weights is not None:
                pipeline = replace(pipeline, weights={u.id: pipeline.weights[u.id] for u in mine})
            parts[hdp_rank] = Step(
                step=step.step, global_tokens=step.global_tokens, units=mine, pipeline=pipeline,
                sequences=[seq[i] for i in sorted(wanted, key=first.__getitem__)],
                order={hdp_rank: step.order.get(hdp_rank, [])},
                predicted=Predicted(step.predicted.step_time_s, step.predicted.lower_bound_s, [], []))
        part = parts[hdp_rank]
        out.append((part, {q.id: first[q.id] for q in part.sequences},
                    lists[(hdp_rank, stage)] if lists is not None else None))
    return out


class StepFeed(ABC):
    """The steps of a run, one `next(it)` per iteration; keeps the token stream's running offset and the
    predicted time of each plan step seen (rank 0's trace compares them with the measured ones)."""

    def __init__(self, digest: str) -> None:
        self.digest = digest  # names what this rank replays: ranks compare it before step 0
        self.predicted: dict[int, float] = {}  # plan step -> predicted step time
        self._offset = 0

    def next(self, it: int) -> StepWork:
        work = self._get(it, self._offset)
        self._offset += work.step.global_tokens
        self.predicted[work.step.step] = work.step.predicted.step_time_s
        return work

    @abstractmethod
    def _get(self, it: int, offset: int) -> StepWork:
        """Iteration it's work; `offset`: where its share of the token stream starts."""

    def fingerprint(self, path: Path) -> str:
        """The trace's plan_sha256 (planner.plan.stream.plan_fingerprint)."""
        return plan_fingerprint(path)


class PlanFeed(StepFeed):
    """A whole plan in memory (validated by preflight): iteration it runs plan step it mod steps."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(hashlib.sha256(plan.to_json().encode()).hexdigest())
        self.plan = plan

    def _get(self, it: int, offset: int) -> StepWork:
        return StepWork(it, self.plan.steps[it % len(self.plan.steps)], offset)


class StreamFeed(StepFeed):
    """A plan stream: iteration it reads, validates and checks stream step it mod steps, and only it."""

    def __init__(self, path: Path, prep: Prepared) -> None:
        self.stream = PlanStream(path)
        super().__init__(self.stream.digest)
        self.prep = prep
        self._last: tuple[int, Step] | None = None  # a one-step stream cycled is read once

    def _get(self, it: int, offset: int) -> StepWork:
        k = it % self.stream.steps
        if self._last is None or self._last[0] != k:
            step = self.stream.validated_step(k)
            check_step(step, self.prep.chunks, self.prep.recompute, f"{self.stream.path} step {k}")
            self._last = (k, step)
        return StepWork(it, self._last[1], offset)


class AheadFeed(StepFeed):
    """--plan-ahead: rank 0 plans (`planner`, None elsewhere) one iteration ahead and scatters the parts."""

    def __init__(self, prep: Prepared, planner: StepPlanner | None, rank: int, trace: TraceLog) -> None:
        super().__init__(hashlib.sha256(prep.plan.to_json().encode()).hexdigest())  # the request every rank read
        self.prep, self.planner, self.rank, self.trace = prep, planner, rank, trace
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="plan-ahead") if rank == 0 else None
        self._pending: Future | None = self._pool.submit(self._plan, 0) if self._pool is not None else None

    def _plan(self, it: int) -> tuple[Step, list[Part | None], int, float, float]:
        """Background thread: iteration it's step, every rank's part of it (rank 0's None: it keeps the
        step) and their pickled bytes, the perf_counter time planning began, and its seconds."""
        t0 = time.perf_counter()
        step = self.planner(it)
        check_step(step, self.prep.chunks, self.prep.recompute, f"--plan-ahead iteration {it}")
        parts: list[Part | None] = [None, *rank_parts(step, self.prep.plan.mesh)[1:]]
        sent = sum(len(pickle.dumps(p)) for p in parts[1:])
        return step, parts, sent, t0, time.perf_counter() - t0

    def _get(self, it: int, offset: int) -> StepWork:
        if self.rank != 0:
            got: list = [None]
            dist.scatter_object_list(got, None, src=0)
            part, starts, ops = got[0]
            return StepWork(it, part, offset, starts, ops)
        w0 = time.perf_counter()
        step, parts, sent, start_s, plan_s = self._pending.result()  # planned while the iteration before ran
        wait_s = time.perf_counter() - w0
        if it + 1 < self.prep.iterations:  # the next one, while this one runs
            self._pending = self._pool.submit(self._plan, it + 1)
        s0 = time.perf_counter()
        dist.scatter_object_list([None], parts, src=0)
        self.trace.planning(PlanningRecord(step=it, start_s=start_s, plan_s=plan_s, wait_s=wait_s,
                                           send_s=time.perf_counter() - s0, sent_bytes=sent))
        return StepWork(it, step, offset)  # rank 0 keeps the whole step (the --check reference needs it)


def open_feed(opts: ReplayOptions, prep: Prepared, planner: StepPlanner | None, rank: int,
              trace: TraceLog) -> StepFeed:
    """The feed of this run: plan-ahead, a plan stream, or the whole plan JSON."""
    if opts.plan_ahead:
        return AheadFeed(prep, planner, rank, trace)
    if is_stream(opts.plan_path):
        return StreamFeed(opts.plan_path, prep)
    return PlanFeed(prep.plan)
