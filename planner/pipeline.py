"""Pipeline schedules as explicit per-stage op lists, and the event simulation that runs them
(REFERENCE §6: 1F1B, interleaved 1F1B, sliced 1F1B à la Seq1F1B / SlimPipe).

An op is (kind F/B, micro-batch, slice, chunk). Every stage runs its list in order; an op also
waits for its data dependency on the neighbouring stage (plus the point-to-point transfer).
Rules that make the lists valid (checked by `check_schedule`):
- forward slices of a micro-batch in order (slice j attends the cached K/V of slices < j);
  backward slices in reverse (slice j's backward yields dK/dV for earlier slices);
- a micro-batch's backward on the last stage starts after its last forward slice there;
- stage r warms up with (p − r − 1) + (n_max − 1) forward slices (1F1B when n = 1; Seq1F1B's
  n − 1 extra), then alternates one forward and one backward, then drains;
- interleaved (v chunks): Megatron's order: groups of p micro-batches, chunk by chunk, warm-up
  2(p − r − 1) + (v − 1)·p; chunk c of stage p−1 feeds chunk c+1 of stage 0.

`run_ops` is the one discrete-event engine: the plan simulator feeds it the op lists of every
pipeline (shared units occupy the same op on all member pipelines) and per-op durations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

SCHEDULES = ("1f1b", "interleaved", "sliced", "sliced-redistributed")


class ScheduleError(ValueError):
    """A schedule is invalid or deadlocks."""


@dataclass(frozen=True, order=True)
class PipeOp:
    kind: str  # "F" or "B"
    mb: int  # micro-batch position in its pipeline
    slice: int = 0  # 0 .. n−1
    chunk: int = 0  # model chunk (virtual stage) 0 .. v−1


def inflight_budget(p: int, stage: int, slices: Iterable[int], weights: Iterable[float] | None = None) -> float:
    """What a stage may hold in flight, in weight units (a micro-batch of weight w, e.g. its tokens ÷ C,
    in n slices weighs w/n per slice): max over micro-batches of w·(n + p − r − 1)/n (p − r whole
    micro-batches in plain 1F1B, n + p − r − 1 slices in Seq1F1B)."""
    slices = list(slices)
    w = [1.0] * len(slices) if weights is None else list(weights)
    return max((wi * (n + p - stage - 1) / n for n, wi in zip(slices, w)), default=0.0)


def stage_ops(p: int, stage: int, slices: list[int], v: int = 1, budget: float | None = None,
              weights: list[float] | None = None) -> list[PipeOp]:
    """The op list of one stage for micro-batches with the given slice counts and weights (default 1:
    count-based). `budget` (default: `inflight_budget` of these micro-batches) is passed in when several
    pipelines must agree."""
    m = len(slices)
    if v > 1:
        if any(n != 1 for n in slices):
            raise ScheduleError("interleaved schedules here take unsliced micro-batches (n = 1)")
        fwd, bwd = [], []
        for g0 in range(0, m, p):
            group = range(g0, min(m, g0 + p))
            fwd += [PipeOp("F", mb, 0, c) for c in range(v) for mb in group]
            bwd += [PipeOp("B", mb, 0, c) for c in reversed(range(v)) for mb in group]
        warm = min(len(fwd), 2 * (p - stage - 1) + (v - 1) * p)
        ops = fwd[:warm]
        for i in range(warm, len(fwd)):
            ops += [fwd[i], bwd[i - warm]]
        return ops + bwd[len(fwd) - warm:]
    # 1F1B at slice granularity with an in-flight budget (a slice weighs w/n). Uniform micro-batches
    # reproduce the classic lists; with mixed sizes a forward is admitted only when backwards freed
    # room, so small micro-batches never pile up behind the slices of a long sequence. With unit
    # weights the list depends only on slice counts and positions (pipelines sharing units agree).
    fwd = [PipeOp("F", mb, j) for mb in range(m) for j in range(slices[mb])]
    bwd = [PipeOp("B", mb, j) for mb in range(m) for j in reversed(range(slices[mb]))]
    fpos = {op: i for i, op in enumerate(fwd)}
    w = [1.0] * m if weights is None else weights
    size = [w[i] / slices[i] for i in range(m)]
    if budget is None:
        budget = inflight_budget(p, stage, slices, w)
    ops: list[PipeOp] = []
    f = 0
    held = 0.0

    def admit(force_to: int = -1) -> None:
        nonlocal f, held
        while f < len(fwd) and (f <= force_to or held == 0 or held + size[fwd[f].mb] <= budget * (1 + 1e-9)):
            ops.append(fwd[f])
            held += size[fwd[f].mb]
            f += 1

    admit()
    for op in bwd:
        # a micro-batch's backward starts after its last forward slice on this stage
        admit(force_to=fpos[PipeOp("F", op.mb, slices[op.mb] - 1)])
        ops.append(op)
        held -= size[op.mb]
        admit()
    return ops


def dependency(op: PipeOp, stage: int, p: int, v: int, last_slice: int) -> tuple[int, PipeOp] | None:
    """(stage, op) this op needs first, besides the previous op on its own stage."""
    if op.kind == "F":
        if stage > 0:
            return stage - 1, op
        if op.chunk > 0:
            return p - 1, PipeOp("F", op.mb, op.slice, op.chunk - 1)
        return None
    if stage < p - 1:
        return stage + 1, op
    if op.chunk < v - 1:
        return 0, PipeOp("B", op.mb, op.slice, op.chunk + 1)
    return stage, PipeOp("F", op.mb, last_slice, op.chunk)  # loss after the last forward slice


def consumer(op: PipeOp, stage: int, p: int, v: int) -> tuple[int, PipeOp] | None:
    """(stage, op) that takes this op's output across a stage boundary (the inverse of `dependency`):
    a forward feeds the next stage (or chunk c + 1 on stage 0), a backward the previous one (or
    chunk c − 1 on the last stage); None where the data stays (the loss, the embedding)."""
    if op.kind == "F":
        if stage < p - 1:
            return stage + 1, op
        return (0, PipeOp("F", op.mb, op.slice, op.chunk + 1)) if op.chunk < v - 1 else None
    if stage > 0:
        return stage - 1, op
    return (p - 1, PipeOp("B", op.mb, op.slice, op.chunk - 1)) if op.chunk > 0 else None


def check_schedule(p: int, slices: list[int], v: int = 1) -> None:
    """Every op once; F before its B on each stage; slice order; no deadlock (by simulation)."""
    for s in range(p):
        ops = stage_ops(p, s, slices, v)
        want = {PipeOp(k, mb, j, c) for mb, n in enumerate(slices) for j in range(n) for c in range(v) for k in "FB"}
        if len(ops) != len(want) or set(ops) != want:
            raise ScheduleError(f"stage {s}: ops do not cover every (micro-batch, slice, chunk) once")
        pos = {op: i for i, op in enumerate(ops)}
        for mb, n in enumerate(slices):
            for c in range(v):
                for j in range(n):
                    if pos[PipeOp("F", mb, j, c)] > pos[PipeOp("B", mb, j, c)]:
                        raise ScheduleError(f"stage {s}: backward of mb {mb} slice {j} before its forward")
                    if j and pos[PipeOp("F", mb, j - 1, c)] > pos[PipeOp("F", mb, j, c)]:
                        raise ScheduleError(f"stage {s}: forward slices of mb {mb} out of order")
                    if j and pos[PipeOp("B", mb, j, c)] > pos[PipeOp("B", mb, j - 1, c)]:
                        raise ScheduleError(f"stage {s}: backward slices of mb {mb} not reversed")
    lists = {(0, s): [((s, op), op) for op in stage_ops(p, s, slices, v)] for s in range(p)}
    run_ops(lists, lambda key: _dep_key(key, p, v, slices), lambda key: 1.0, lambda key: 0.0)


def _dep_key(key, p, v, slices):
    s, op = key
    d = dependency(op, s, p, v, slices[op.mb] - 1)
    return None if d is None else d


@dataclass(frozen=True)
class OpRun:
    key: Hashable
    resources: tuple[Hashable, ...]
    start_s: float
    end_s: float


def run_ops(lists: dict[Hashable, list[tuple[Hashable, PipeOp]]], dep: Callable[[Hashable], Hashable | None],
            duration: Callable[[Hashable], float], transfer: Callable[[Hashable], float]) -> list[OpRun]:
    """Discrete-event engine. `lists[resource]` is that resource's ordered (op key, op); an op key
    that appears on several resources is one co-scheduled op (a shared unit) and starts when it
    heads every one of those lists, its dependency `dep(key)` has finished (+ `transfer(key)`),
    and all of them are free. Raises ScheduleError on deadlock."""
    members: dict[Hashable, list[Hashable]] = {}
    for res, lst in lists.items():
        for key, _ in lst:
            members.setdefault(key, []).append(res)
    pos = {r: 0 for r in lists}
    free = {r: 0.0 for r in lists}
    done: dict[Hashable, float] = {}
    runs: list[OpRun] = []
    ready_heads = list(lists)
    remaining = len(members)
    while remaining:
        progressed = False
        for res in ready_heads:
            i = pos[res]
            if i >= len(lists[res]):
                continue
            key = lists[res][i][0]
            if key in done:
                continue
            mem = members[key]
            if any(pos[m] >= len(lists[m]) or lists[m][pos[m]][0] != key for m in mem):
                continue
            d = dep(key)
            if d is not None and d not in done:
                continue
            start = max([done[d] + transfer(key) if d is not None else 0.0] + [free[m] for m in mem])
            end = start + duration(key)
            for m in mem:
                free[m] = end
                pos[m] += 1
            done[key] = end
            runs.append(OpRun(key, tuple(mem), start, end))
            remaining -= 1
            progressed = True
        if not progressed:
            stuck = [lists[r][pos[r]][0] for r in lists if pos[r] < len(lists[r])][:3]
            raise ScheduleError(f"pipeline schedule deadlocks (waiting ops: {stuck})")
    return runs


def closed_form_bubble(p: int, m: int, n: int = 1, v: int = 1) -> float:
    """(p−1)/(m·n·v + p−1): 1F1B (n = v = 1), interleaved (v), balanced slicing (n) [REFERENCE §6]."""
    return (p - 1) / (m * n * v + p - 1)


def simulate_uniform(p: int, m: int, n: int = 1, v: int = 1, fwd_s: float = 1.0, bwd_s: float = 2.0,
                     slice_weights: Iterable[float] | None = None) -> tuple[float, float]:
    """One pipeline of m identical micro-batches: (step time, bubble fraction of stage 0). Per-op
    times are the micro-batch's stage time ÷ (n·v), times the slice's weight when given (uniform
    token slices of a causal sequence weigh (2j + 1)/n in attention-dominated work)."""
    w = list(slice_weights) if slice_weights is not None else [1.0] * n
    lists = {(0, s): [((s, op), op) for op in stage_ops(p, s, [n] * m, v)] for s in range(p)}

    def dur(key):
        _, op = key
        base = (fwd_s if op.kind == "F" else bwd_s) / (n * v)
        return base * w[op.slice]

    runs = run_ops(lists, lambda key: _dep_key(key, p, v, [n] * m), dur, lambda key: 0.0)
    total = max(r.end_s for r in runs)
    busy0 = sum(r.end_s - r.start_s for r in runs if (0, 0) in r.resources)
    return total, 1.0 - busy0 / total


def step_op_lists(p: int, order: dict[int, list[int]], slices: dict[int, int], v: int = 1,
                  weights: dict[int, float] | None = None) -> dict[tuple[int, int], list[PipeOp]]:
    """The op list of every (pipeline, stage) of a plan step, `PipeOp.mb` holding the unit id: what
    the simulator times and the runtime executes, from the step's `pipeline` section. `weights`
    (unit id → in-flight weight, the section's "weights") make the 1F1B budget token-weighted; one
    budget over all units of the step, so every pipeline applies the same rule. None: count-based."""
    all_ids = sorted(slices)
    w_all = [1.0 if weights is None else weights[i] for i in all_ids]
    s_all = [slices[i] for i in all_ids]
    out = {}
    for r, ids in order.items():
        w = None if weights is None else [weights[i] for i in ids]
        for s in range(p):
            budget = inflight_budget(p, s, s_all, w_all)
            out[(r, s)] = [PipeOp(op.kind, ids[op.mb], op.slice, op.chunk)
                           for op in stage_ops(p, s, [slices[i] for i in ids], v, budget, w)]
    return out


def section_weights(section: dict | None) -> dict[int, float] | None:
    """Unit id → in-flight weight from a step's `pipeline` section (JSON keys are strings)."""
    w = (section or {}).get("weights")
    return None if w is None else {int(k): float(x) for k, x in w.items()}
