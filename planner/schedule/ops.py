"""Pipeline schedules as explicit per-stage op lists (REFERENCE §6: 1F1B, interleaved 1F1B, sliced
1F1B à la Seq1F1B / SlimPipe), what each op waits for, and SlimPipe's mirror pairing of ops.

An op is (kind F/B, micro-batch, slice, chunk). Every stage runs its list in order; an op also
waits for its data dependency on the neighbouring stage (plus the point-to-point transfer).
Rules that make the lists valid (checked by `check_schedule`):
- forward slices of a micro-batch in order (slice j attends the cached K/V of slices < j);
  backward slices in reverse (slice j's backward yields dK/dV for earlier slices);
- a micro-batch's backward on the last stage starts after its last forward slice there;
- stage r warms up with (p − r − 1) + (n_max − 1) forward slices (1F1B when n = 1; Seq1F1B's
  n − 1 extra), then alternates one forward and one backward, then drains;
- interleaved (v chunks), sliced or not: slices run in groups chunk by chunk (Megatron's groups of
  p micro-batches when n = 1; SlimPipe's groups of the smallest divisor of n that is ≥ p); in flight
  before the first backward: 2(p − r − 1) + (v − 1)·p + 1 chunks (n = 1) or n·v + 2(p − r − 1)
  slice-chunks (SlimPipe); chunk c of stage p−1 feeds chunk c+1 of stage 0.

`step_op_lists` expands a plan step's pipeline section into these lists (what the simulator times
and the runtime executes). `mirror_pairs` is SlimPipe's workload redistribution: which ops of a
pipeline pair up to share attention (the simulator prices the moves and their transfers). The lists
run on `planner.schedule.engine.run_ops`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, Sequence

from planner.schedule.engine import OpRun, ScheduleError, run_ops

if TYPE_CHECKING:  # the plan reads this package's schedules; only the type goes the other way
    from planner.plan import Step

SCHEDULES = ("1f1b", "interleaved", "sliced", "sliced-redistributed")  # a pipeline section's `schedule`


class PipeOp(NamedTuple):
    """(kind, micro-batch, slice, chunk); a named tuple: the simulator hashes millions of them."""

    kind: str  # "F" or "B"
    mb: int  # micro-batch position in its pipeline
    slice: int = 0  # 0 .. n−1
    chunk: int = 0  # model chunk (virtual stage) 0 .. v−1


def warm_lead(n: int, p: int, v: int) -> int:
    """Forward position of a micro-batch's last slice in its last chunk within a uniform interleaved
    stream (`_streams`): the last stage runs that many forwards plus one before the micro-batch's first
    backward. n·v − 1 with n ≥ p slices (SlimPipe), (v − 1)·G + n − 1 when whole micro-batches form
    groups of G ≥ p items (Megatron: n = 1, G = p), n − 1 without interleaving."""
    if v == 1 or n >= p:
        return n * v - 1
    return (v - 1) * n * -(-p // n) + n - 1


def inflight_budget(p: int, stage: int, slices: Iterable[int], weights: Iterable[float] | None = None,
                    v: int = 1) -> float:
    """What a stage may hold in flight, in weight units (a micro-batch of weight w, e.g. its tokens ÷ C,
    in n slices and v chunks weighs w/(n·v) per slice-chunk). v = 1: max over micro-batches of
    w·(n + p − r − 1)/n (p − r whole micro-batches in plain 1F1B, n + p − r − 1 slices in Seq1F1B).
    v > 1: the last stage's, max of w·(warm_lead + 1)/(n·v), for every stage (earlier stages run a
    fixed number of forwards more, see `_interleaved_ops`)."""
    slices = list(slices)
    w = [1.0] * len(slices) if weights is None else list(weights)
    if v > 1:
        return max((wi * (warm_lead(n, p, v) + 1) / (n * v) for n, wi in zip(slices, w)), default=0.0)
    return max((wi * (n + p - stage - 1) / n for n, wi in zip(slices, w)), default=0.0)


def group_size(n: int, p: int) -> int:
    """SlimPipe's interleaving group of a micro-batch of n ≥ p slices: the smallest divisor of n that is
    ≥ p, so a slice's chunk c output from the last stage is back on stage 0 before chunk c + 1 needs it."""
    return next(g for g in range(p, n + 1) if n % g == 0)


def _streams(slices: list[int], p: int, v: int) -> tuple[list[PipeOp], list[PipeOp]]:
    """Forward and backward op streams, in groups run chunk by chunk (one group per chunk when v = 1): a
    micro-batch of n ≥ p slices splits into groups of `group_size(n, p)` slices; other micro-batches
    are gathered whole until a group holds ≥ p items (Megatron's groups of p micro-batches when n = 1).
    Backward groups take the same cuts of the backward items (each micro-batch's slices reversed) and
    run chunks v−1 .. 0."""
    # A micro-batch that starts a group and has n ≥ p slices splits into SlimPipe's groups; others are
    # gathered whole until a group holds ≥ p items, and a short last group joins the one before: with
    # fewer than p items, stage 0 would start a group's next chunk before the last stage produced its
    # input, while that stage waits on stage 0's backward (a deadlock).
    sizes: list[int] = []
    pending = 0
    for n in slices:
        if not pending and n >= p:
            sizes += [group_size(n, p)] * (n // group_size(n, p))
            continue
        pending += n
        if pending >= p:
            sizes.append(pending)
            pending = 0
    if pending:
        if sizes:
            sizes[-1] += pending
        else:
            sizes.append(pending)
    f_items = [(mb, j) for mb, n in enumerate(slices) for j in range(n)]
    b_items = [(mb, j) for mb, n in enumerate(slices) for j in reversed(range(n))]
    fwd: list[PipeOp] = []
    bwd: list[PipeOp] = []
    start = 0
    for g in sizes:  # the same cuts backward: each micro-batch's slices reversed
        fwd += [PipeOp("F", mb, j, c) for c in range(v) for mb, j in f_items[start:start + g]]
        bwd += [PipeOp("B", mb, j, c) for c in reversed(range(v)) for mb, j in b_items[start:start + g]]
        start += g
    return fwd, bwd


def _interleaved_ops(p: int, stage: int, slices: list[int], v: int, budget: float | None,
                     weights: list[float] | None) -> list[PipeOp]:
    """1F1B over the interleaved streams. Before backward i every stage r has run R(i) + 2(p − r − 1)
    forwards (Megatron's warm-up offset), where R paces the last stage: at least the forward position
    of the micro-batch's last slice in its last chunk plus one (its backward waits for it), else
    R(i − 1) + 1 (one forward per backward), or R(i − 1) (a pause) when the next forward would push the
    last stage's in-flight weight over `budget` and no forward stage 0 has queued meanwhile waits for a
    chunk input the last stage has not yet produced (pausing then would deadlock). Uniform micro-batches
    never pause: Megatron's 2(p − r − 1) + (v − 1)p + 1 chunks in flight (n = 1), SlimPipe's
    n·v + 2(p − r − 1) slice-chunks (n ≥ p). Pipelines whose slices and weights agree up to the end of
    a shared unit's group build the same order for it (elsewhere the simulator reports a deadlock)."""
    fwd, bwd = _streams(slices, p, v)
    fpos = {op: i for i, op in enumerate(fwd)}
    w = [1.0] * len(slices) if weights is None else weights
    size = [wi / (n * v) for n, wi in zip(slices, w)]
    if budget is None:
        budget = inflight_budget(p, stage, slices, w, v)
    # position of the last stage's output each chunk c ≥ 1 forward consumes (-1: chunk 0)
    needs = [fpos[PipeOp("F", op.mb, op.slice, op.chunk - 1)] if op.chunk else -1 for op in fwd]
    extra = 2 * (p - stage - 1)
    ops: list[PipeOp] = []
    emitted = 0
    ran = 0  # R(i − 1)
    held = 0.0  # the last stage's in-flight weight
    for op in bwd:
        pause = (ran < len(fwd) and held + size[fwd[ran].mb] > budget * (1 + 1e-9)
                 and all(needs[k] < ran for k in range(ran, min(len(fwd), ran + 2 * (p - 1)))))
        new = max(fpos[PipeOp("F", op.mb, slices[op.mb] - 1, v - 1)] + 1, ran + (0 if pause else 1))
        held += sum(size[fwd[k].mb] for k in range(ran, min(new, len(fwd)))) - size[op.mb]
        ran = new
        target = min(len(fwd), ran + extra)
        ops += fwd[emitted:target]
        emitted = max(emitted, target)
        ops.append(op)
    return ops + fwd[emitted:]


def stage_ops(p: int, stage: int, slices: list[int], v: int = 1, budget: float | None = None,
              weights: list[float] | None = None) -> list[PipeOp]:
    """The op list of one stage for micro-batches with the given slice counts and weights (default 1:
    count-based) in v chunks. `budget` (default: `inflight_budget` of these micro-batches) is passed in
    when several pipelines must agree. v > 1: the interleaved schedule (`_interleaved_ops`)."""
    if v > 1:
        return _interleaved_ops(p, stage, slices, v, budget, weights)
    # 1F1B at slice granularity with an in-flight budget (a slice weighs w/n). Uniform micro-batches
    # reproduce the classic lists; with mixed sizes a forward is admitted only when backwards freed
    # room, so small micro-batches never pile up behind the slices of a long sequence. With unit
    # weights the list depends only on slice counts and positions (pipelines sharing units agree).
    m = len(slices)
    fwd, bwd = _streams(slices, p, 1)
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


def step_op_lists(step: Step, p: int, hdp: int) -> dict[tuple[int, int], list[PipeOp]]:
    """The op list of every (pipeline, stage) of a plan step, `PipeOp.mb` holding the unit id: what
    the simulator times, validate checks and the runtime executes. From the step's pipeline section:
    v chunks per stage, and `weights` (unit id → in-flight weight) that make the 1F1B budget
    token-weighted, one budget over all units of the step so every pipeline applies the same rule
    (None, or no section: count-based)."""
    order = {r: step.order.get(r, []) for r in range(hdp)}
    slices = {u.id: u.slices for u in step.units}
    v = step.chunks_per_stage
    weights = None if step.pipeline is None else step.pipeline.weights
    all_ids = sorted(slices)
    w_all = [1.0 if weights is None else weights[i] for i in all_ids]
    s_all = [slices[i] for i in all_ids]
    out = {}
    done: dict[tuple[int, ...], int] = {}  # pipelines running the same units (a wide CP unit) share lists
    for r, ids in order.items():
        if (twin := done.setdefault(tuple(ids), r)) != r:
            out.update({(r, s): list(out[(twin, s)]) for s in range(p)})
            continue
        w = None if weights is None else [weights[i] for i in ids]
        for s in range(p):
            budget = inflight_budget(p, s, s_all, w_all, v)
            out[(r, s)] = [PipeOp(op.kind, ids[op.mb], op.slice, op.chunk)
                           for op in stage_ops(p, s, [slices[i] for i in ids], v, budget, w)]
    return out


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
    run_ops(lists, lambda key: dependency(key[1], key[0], p, v, slices[key[1].mb] - 1), lambda key: 1.0,
            lambda key: 0.0)


def slice_attention_share(j: int, n: int, full_over_causal: float = 2.0) -> float:
    """Slice j's share of a micro-batch's attention over its n uniform token slices (the n shares sum to 1): its
    own causal block and j full blocks of the cached slices' K/V, a full block taking `full_over_causal` times a
    causal one of the same tokens. At 2 (equal rates per FLOP) slice j covers (2j + 1)/n² of the document's causal
    area, so the last slice's attention is (2n − 1)× the first's [REFERENCE §6]; a kernel slower per FLOP on causal
    blocks (short slices: the diagonal tiles are part masked) shifts attention to the first slices."""
    r = full_over_causal
    return (1.0 + j * r) / (n + n * (n - 1) / 2.0 * r)


def slice_share(j: int, n: int, attn_share: float, full_over_causal: float = 2.0) -> float:
    """Share of a micro-batch's stage time in slice j of its n uniform token slices (the n shares sum
    to 1): GEMMs split evenly, attention as `slice_attention_share`."""
    return (1 - attn_share) / n + attn_share * slice_attention_share(j, n, full_over_causal)


OpKey = tuple[int, PipeOp]  # (stage, op) within one pipeline


def mirror_pairs(stage_lists: list[list[PipeOp]],
                 attn_s: Callable[[int, PipeOp], float | None]) -> list[tuple[OpKey, OpKey]]:
    """SlimPipe's mirror pairing on one pipeline: (heavy, light) op pairs that share attention.

    Every stage runs the same forward stream one position behind its upstream neighbour and the same
    backward stream one position behind its downstream one, so at a schedule step t stage r runs
    forward position t − r and backward position t − (p − 1 − r) (SlimPipe pairs ranks by these
    offsets). A step's ops are sorted by their attention seconds `attn_s(stage, op)` (None: not
    redistributable, e.g. an unsliced micro-batch) and paired smallest with largest; with one long
    sequence the cache lengths of a step form a contiguous run, so every pair has the same sum and the
    step balances at once. Steps where some stage has no op of that kind (fill and drain) are left
    alone, like SlimPipe's warm-up and cool-down."""
    p = len(stage_lists)
    pairs: list[tuple[OpKey, OpKey]] = []
    for kind in "FB":
        streams = [[op for op in ops if op.kind == kind] for ops in stage_lists]
        lag = [r if kind == "F" else p - 1 - r for r in range(p)]
        for t in range(p - 1, min(len(s) + lag[r] for r, s in enumerate(streams))):
            step = [(a, r, op) for r, op in ((r, streams[r][t - lag[r]]) for r in range(p))
                    if (a := attn_s(r, op)) is not None]
            step.sort(key=lambda x: (x[0], x[1]))
            for i in range(len(step) // 2):
                (_, rl, lo), (_, rh, hi) = step[i], step[-1 - i]
                pairs.append(((rh, hi), (rl, lo)))
    return pairs


def mirror_chunks(heavy_attn_s: float, light_attn_s: float, block_s: float, max_chunks: int) -> int:
    """K/V chunks the heavy op hands over: half the attention gap in whole chunks of `block_s` seconds
    (one cached slice × the current slice), at most `max_chunks` (SlimPipe's `attn_balance`)."""
    if block_s <= 0 or heavy_attn_s <= light_attn_s or max_chunks <= 0:
        return 0
    return int(min(max_chunks, (heavy_attn_s - light_attn_s) / (2 * block_s) + 1e-9))


def _last_backward_chunks(runs: Iterable[OpRun]) -> tuple[int, dict[int, tuple[float, float]]] | None:
    """The stage whose backward ends last, and (start, end) of each of its chunks' last backward relative to that
    end; None without a backward."""
    backward = [r for r in runs if r.key[1].kind == "B"]
    if not backward:
        return None
    last = max(backward, key=lambda r: r.end_s)
    chunks: dict[int, tuple[float, float]] = {}
    for r in backward:
        stage, op = r.key
        if stage == last.key[0] and r.end_s - last.end_s >= chunks.get(op.chunk, (0.0, -float("inf")))[1]:
            chunks[op.chunk] = (r.start_s - last.end_s, r.end_s - last.end_s)
    return last.key[0], dict(sorted(chunks.items()))


def chunk_last_backwards(runs: Iterable[OpRun]) -> list[tuple[float, float]]:
    """(start, end) of each model chunk's last backward on the stage whose backward ends last, relative to that end
    (≤ 0), from runs keyed (stage, PipeOp), in chunk order: what an overlapped gradient reduction can hide under,
    chunk by chunk (CostModel.exposed_chunked_grad_sync_s). No backward: one empty window."""
    last = _last_backward_chunks(runs)
    return list(last[1].values()) if last else [(0.0, 0.0)]


def chunk_gradient_shares(runs: Iterable[OpRun], params: Sequence[Sequence[float]]) -> list[float]:
    """Each window of chunk_last_backwards' share of its stage's gradients: the chunk's parameters over the stage's
    (`params`: each stage's chunks' parameter counts, the embedding and the head on their chunks; equal shares
    where the stage holds none)."""
    last = _last_backward_chunks(runs)
    if not last:
        return [1.0]
    counts = [params[last[0]][c] for c in last[1]]
    return [n / sum(counts) for n in counts] if sum(counts) else [1.0 / len(counts)] * len(counts)
