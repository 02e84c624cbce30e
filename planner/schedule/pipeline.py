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
- interleaved (v chunks), sliced or not: slices run in groups chunk by chunk (Megatron's groups of
  p micro-batches when n = 1; SlimPipe's groups of the smallest divisor of n that is ≥ p); in flight
  before the first backward: 2(p − r − 1) + (v − 1)·p + 1 chunks (n = 1) or n·v + 2(p − r − 1)
  slice-chunks (SlimPipe); chunk c of stage p−1 feeds chunk c+1 of stage 0.

`mirror_pairs` is SlimPipe's workload redistribution: which ops of a pipeline pair up to share
attention (the simulator prices the moves and their transfers).

`run_ops` is the one discrete-event engine: the plan simulator feeds it the op lists of every
pipeline (shared units occupy the same op on all member pipelines) and per-op durations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, NamedTuple

SCHEDULES = ("1f1b", "interleaved", "sliced", "sliced-redistributed")


class ScheduleError(ValueError):
    """A schedule is invalid or deadlocks."""


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
            duration: Callable[[Hashable], float], transfer: Callable[[Hashable], float],
            pairs: Iterable[tuple[Hashable, Hashable]] = (), solo: Callable[[Hashable], float] | None = None,
            broken: list | None = None) -> list[OpRun]:
    """Discrete-event engine. `lists[resource]` is that resource's ordered (op key, op); an op key
    that appears on several resources is one co-scheduled op (a shared unit) and starts when it
    heads every one of those lists, its dependency `dep(key)` has finished (+ `transfer(key)`),
    and all of them are free. Raises ScheduleError on deadlock.

    `pairs` (heavy key, light key) is a rendezvous (SlimPipe's mirror pairing exchanges tensors mid-op):
    the two start together once both are ready as above, take `duration`, and the heavy op ends no
    earlier than the light one (it merges the light op's partial result). A pair that cannot meet
    (each waits on the other through the schedule) is broken and its ops run alone for `solo(key)`
    seconds (default `duration`); its heavy key is appended to `broken` when given."""
    members: dict[Hashable, list[Hashable]] = {}
    for res, lst in lists.items():
        for key, _ in lst:
            members.setdefault(key, []).append(res)
    partner: dict[Hashable, Hashable] = {}
    heavy: set = set()
    for hi, lo in pairs:
        if hi in members and lo in members and hi not in partner and lo not in partner and hi != lo:
            partner[hi], partner[lo] = lo, hi
            heavy.add(hi)
    alone: set = set()
    pos = {r: 0 for r in lists}
    free = {r: 0.0 for r in lists}
    done: dict[Hashable, float] = {}
    runs: list[OpRun] = []
    ready_heads = list(lists)
    remaining = len(members)

    def ready_at(key) -> float | None:
        """When `key` could start (None: not at the head of all its lists or its dependency is pending)."""
        mem = members[key]
        if any(pos[m] >= len(lists[m]) or lists[m][pos[m]][0] != key for m in mem):
            return None
        d = dep(key)
        if d is not None and d not in done:
            return None
        return max([done[d] + transfer(key) if d is not None else 0.0] + [free[m] for m in mem])

    def launch(key, start: float, end: float) -> None:
        mem = members[key]
        for m in mem:
            free[m] = end
            pos[m] += 1
        done[key] = end
        runs.append(OpRun(key, tuple(mem), start, end))

    while remaining:
        progressed = False
        waiting: list[tuple[float, Hashable]] = []
        for res in ready_heads:
            i = pos[res]
            if i >= len(lists[res]):
                continue
            key = lists[res][i][0]
            if key in done:
                continue
            t = ready_at(key)
            if t is None:
                continue
            q = partner.get(key)
            if q is None:
                launch(key, t, t + (solo(key) if solo is not None and key in alone else duration(key)))
                remaining -= 1
                progressed = True
                continue
            tq = ready_at(q)
            if tq is None:
                waiting.append((t, key))
                continue
            start = max(t, tq)
            end_k, end_q = start + duration(key), start + duration(q)
            if key in heavy:
                end_k = max(end_k, end_q)
            else:
                end_q = max(end_q, end_k)
            launch(key, start, end_k)
            launch(q, start, end_q)
            remaining -= 2
            progressed = True
        if not progressed:
            if waiting:  # a pair that cannot meet: break the one whose ready op waits longest
                _, key = min(waiting, key=lambda x: x[0])
                q = partner.pop(key)
                del partner[q]
                alone.update((key, q))
                if broken is not None:
                    broken.append(key if key in heavy else q)
                continue
            stuck = [lists[r][pos[r]][0] for r in lists if pos[r] < len(lists[r])][:3]
            raise ScheduleError(f"pipeline schedule deadlocks (waiting ops: {stuck})")
    return runs


def closed_form_bubble(p: int, m: int, n: int = 1, v: int = 1) -> float:
    """(p−1)/(m·n·v + p−1): 1F1B (n = v = 1), interleaved (v), balanced slicing (n) [REFERENCE §6]."""
    return (p - 1) / (m * n * v + p - 1)


def slice_share(j: int, n: int, attn_share: float) -> float:
    """Share of a micro-batch's stage time in slice j of its n uniform token slices (the n shares sum
    to 1). GEMMs split evenly; causal attention of slice j covers (2j + 1)/n² of the document's area
    (its cache of j slices plus half its own block), so the last slice's attention is (2n − 1)× the
    first's [REFERENCE §6]."""
    return (1 - attn_share) / n + attn_share * (2 * j + 1) / (n * n)


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


def simulate_uniform(p: int, m: int, n: int = 1, v: int = 1, fwd_s: float = 1.0, bwd_s: float = 2.0,
                     attn_share: float = 0.0, redistribute: bool = False,
                     max_chunks: int = 10**9, rendezvous: bool = False) -> tuple[float, float]:
    """One pipeline of m identical single-sequence micro-batches: (step time, bubble fraction of stage
    0). Per-op times are the micro-batch's stage time ÷ v, times its slice's share (`slice_share`:
    uniform token slices of a sequence whose stage time is `attn_share` causal attention). redistribute: mirror pairing
    moves whole K/V chunks between paired ops at no transfer cost (the plan simulator prices them).
    rendezvous: paired ops start together (`run_ops` pairs), as SlimPipe's per-layer exchange forces;
    without it each op just takes its adjusted duration whenever its stage reaches it."""
    lists = {(0, s): [((s, op), op) for op in stage_ops(p, s, [n] * m, v)] for s in range(p)}
    extra: dict[OpKey, float] = {}
    moved_pairs: list[tuple[OpKey, OpKey]] = []

    def base(op: PipeOp) -> float:
        return (fwd_s if op.kind == "F" else bwd_s) / v

    if redistribute and n > 1 and attn_share > 0:
        def attn(_s: int, op: PipeOp) -> float:
            return base(op) * attn_share * (2 * op.slice + 1) / (n * n)

        stage_lists = [[op for _, op in lists[(0, s)]] for s in range(p)]
        for hi, lo in mirror_pairs(stage_lists, attn):
            k = mirror_chunks(attn(*hi), attn(*lo), base(hi[1]) * attn_share * 2 / (n * n), max_chunks)
            moved = k * base(hi[1]) * attn_share * 2 / (n * n)
            extra[hi] = extra.get(hi, 0.0) - moved
            extra[lo] = extra.get(lo, 0.0) + moved
            if k:
                moved_pairs.append((hi, lo))

    def solo(key: OpKey) -> float:
        return base(key[1]) * slice_share(key[1].slice, n, attn_share)

    def dur(key: OpKey) -> float:
        return solo(key) + extra.get(key, 0.0)

    runs = run_ops(lists, lambda key: _dep_key(key, p, v, [n] * m), dur, lambda key: 0.0,
                   pairs=moved_pairs if rendezvous else (), solo=solo)
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


def section_weights(section: dict | None) -> dict[int, float] | None:
    """Unit id → in-flight weight from a step's `pipeline` section (JSON keys are strings)."""
    w = (section or {}).get("weights")
    return None if w is None else {int(k): float(x) for k, x in w.items()}
