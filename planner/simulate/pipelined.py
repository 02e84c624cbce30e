"""pp > 1: every HDP rank is a pipeline whose stages run the op lists of the step's pipeline section
(`planner.schedule.step_op_lists`); a unit's forward on stage s waits for stage s−1 plus the
activation transfer, its backward for stage s+1; a shared unit's op starts when every member
pipeline's stage is free (`planner.schedule.run_ops`). With "sliced-redistributed", SlimPipe's
mirror pairing moves attention between paired ops and prices its exchange."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from costmodel.slicing import mirror_exchange_bytes, mirror_exchange_exposed_s
from costmodel.timing import CostModel, UnitCost
from planner.plan import PipelineSection, PlanError, Step, Unit
from planner.schedule import (PipeOp, ScheduleError, chunk_last_backwards, consumer, dependency, mirror_chunks,
                              mirror_pairs, run_ops, slice_attention_share, step_op_lists)
from planner.simulate.cores import run_ops_shared
from planner.simulate.memory import (activation_bytes, mtp_activation_bytes, recompute_working_bytes,
                                     static_memory_bytes)
from planner.simulate.timeline import OpTiming, StepSimulation


@dataclass(frozen=True)
class OpCost:
    """Seconds of one pipeline op over all its slices: a unit's pass through one chunk of one stage."""

    time_s: float  # the last stage's last chunk carries the LM head and loss
    attn_s: float  # its causal attention compute (the sources' host work with it), what mirror pairing moves
    compute_s: float = 0.0  # the part of time_s that is compute (head included): what a CPU core's share scales
    sources_s: float = 0.0  # of attn_s, the slices' K/V sources' host work: slice j runs j + 1 of n(n + 1)/2 sources
    full_over_causal: float = 2.0  # a cached slice's full block over a slice's own causal block (slice_attention_share)

    def slice_attn_s(self, j: int, n: int) -> float:
        """Attention of slice j of n uniform token slices: its own causal block and j full blocks of cached K/V
        (`slice_attention_share`; (2j + 1)/n² of the whole at equal rates, REFERENCE §6), and its j + 1 sources'
        host work. Every document is sliced (the runtime's slice j is the j-th part of each), so packed units
        follow it too."""
        blocks = self.attn_s - self.sources_s
        return (blocks * slice_attention_share(j, n, self.full_over_causal)
                + self.sources_s * slice_attention_share(j, n, 1.0))

    def full_block_s(self, n: int) -> float:
        """One cached slice's K/V against a slice (what mirror pairing moves per chunk): a full block and its
        source's host work."""
        blocks = self.attn_s - self.sources_s
        return (blocks * self.full_over_causal * slice_attention_share(0, n, self.full_over_causal)
                + self.sources_s * slice_attention_share(0, n, 1.0))

    def slice_s(self, j: int, n: int) -> float:
        """Slice j's time before any redistribution: the rest split evenly, the attention by slice_attn_s."""
        if self.time_s <= 0:
            return 0.0
        a = min(self.attn_s / self.time_s, 1.0)
        return self.time_s * ((1 - a) / n + a * (self.slice_attn_s(j, n) / self.attn_s if self.attn_s > 0 else 0.0))

    def slice_compute_s(self, j: int, n: int) -> float:
        """The compute part of slice j's time (what a CPU core's share scales): its share of the op's compute."""
        return self.slice_s(j, n) * self.compute_s / self.time_s if self.time_s > 0 else 0.0


def sliced_pass_s(whole: UnitCost, one_slice: UnitCost | None, n: int, forward: bool,
                  compute_only: bool = False, sources_s: float = 0.0) -> float:
    """A unit's pass (forward or backward) through a stage when it runs as n slices (SlimPipe): its attention covers
    the unit's causal area once, split over its slices by OpCost.slice_attn_s, and everything else (GEMMs,
    memory-bound kernels, per-layer overheads, the head and loss, TP collectives) runs once per slice at that slice's
    tokens (`one_slice`: the unit priced with every document's n-th; slice_layout gives slice j the j-th part of
    each). Per-call floors and small-m GEMM rates make that more than the whole unit's: on a CPU, 4 slices of a
    2,899-token unit of `tiny` ran 1.23x its whole time (bench/slice_overhead.py). `compute_only`: its compute part
    alone (the head included, exposed communication not). `sources_s`: what the pass's K/V sources cost beyond their
    blocks' attention (`slice_sources_s`), with the attention."""
    def pass_s(c: UnitCost) -> float:
        if compute_only:
            return c.fwd_compute_s + c.head_fwd_s if forward else c.bwd_compute_s + c.head_bwd_s
        return c.fwd_s if forward else c.bwd_s

    if n == 1 or one_slice is None:
        return pass_s(whole)
    attn = (whole.attn_fwd_compute_s if forward else whole.attn_bwd_compute_s) + sources_s
    return attn + n * (pass_s(one_slice) - (one_slice.attn_fwd_compute_s if forward else one_slice.attn_bwd_compute_s))


def slice_sources_s(cm: CostModel, whole: UnitCost, unit: Unit, forward: bool) -> float:
    """A sliced unit's pass (forward or backward) through a stage: its layers' K/V sources' host work beyond their
    attention (`CostModel.slice_sources_s`; each of its d members' slices is a source, as SlicedAttention gathers
    them), less the ring steps' the whole unit's price carries (the executor runs a sliced unit's attention as
    sources, not as a ring); 0 unsliced."""
    n, d, way = unit.slices, unit.degree, "fwd" if forward else "bwd"
    if n <= 1:
        return 0.0
    out = cm.layers_per_stage * d * cm.slice_sources_s(whole.tokens_per_rank / n, n, way)
    if d > 1 and (unit.cp or cm.setup.training.cp) == "ring":
        out -= cm.layers_per_stage * d * float(cm.attention_glue_s("ring_step", whole.tokens_per_rank, way))
    return out


def redistribution(op_lists, p: int, hdp: int, units, op_cost, tokens_per_rank: dict[int, int], cm: CostModel,
                   v: int, max_chunks: int) -> tuple[dict, dict, list]:
    """Mirror pairing (REFERENCE §6) on every pipeline: per op key, the seconds added (the borrowed
    attention plus the exposed exchange) or removed (the attention handed over), the exposed exchange
    seconds, and the (heavy, light) pairs, which `run_ops` runs as rendezvous (the partners exchange
    tensors mid-op, so they start together). A pair moves k whole K/V chunks (`mirror_chunks`, at most
    max_chunks) only when that shortens the pair's longer op; the Q/O (forward) and dO/dQ/dK/dV
    (backward) transfers ride on the PP link between the two stages (`costmodel.slicing`). Nothing
    pairs with v = 1: SlimPipe pairs the forward and backward of one iteration, aligned by its warm-up
    of n·v + 2(p − r − 1) slices, which our v > 1 lists use; the v = 1 lists keep Seq1F1B's smaller
    warm-up, under which paired ops sit iterations apart and the rendezvous stalls the pipeline
    (measured: slower than no pairing). An op of a unit shared by several pipelines is paired only
    where every member pipeline pairs it with the same partner."""
    layers = cm.layers_per_stage / v  # layers of one chunk
    attn_cache: dict = {}

    def slice_attn(s: int, op) -> float | None:
        key = (s, op)
        if key not in attn_cache:
            n = units[op.mb].slices
            attn_cache[key] = op_cost(s, op).slice_attn_s(op.slice, n) if n > 1 else None
        return attn_cache[key]

    @functools.cache
    def p2p_s(nbytes: float, inter: bool) -> float:
        return float(cm.p2p_s(nbytes, inter))

    @functools.cache
    def pair(hi_key, lo_key, inter: bool) -> tuple[float, float, float, float] | None:
        """(heavy change, light change, heavy exposed, light exposed) seconds, or None: no move."""
        (sh, hi), (sl, lo) = hi_key, lo_key
        a_h, a_l = slice_attn(sh, hi), slice_attn(sl, lo)
        n = units[hi.mb].slices
        block = op_cost(sh, hi).full_block_s(n)  # one cached slice's K/V against this slice
        k = mirror_chunks(a_h, a_l, block, max_chunks)
        if k == 0:
            return None
        moved = k * block
        to_light_b, back_b = mirror_exchange_bytes(tokens_per_rank[hi.mb] / n, k, cm.model, cm.tp,
                                                   cm.bytes_per_elem, hi.kind)
        exp_h, exp_l = (layers * x for x in mirror_exchange_exposed_s(
            p2p_s(to_light_b, inter), p2p_s(back_b, inter), a_h / layers, a_l / layers, moved / layers))
        t_h, t_l = op_cost(sh, hi).slice_s(hi.slice, n), op_cost(sl, lo).slice_s(lo.slice, units[lo.mb].slices)
        if max(t_h - moved + exp_h, t_l + moved + exp_l) >= t_h:
            return None  # the transfers would cost more than the balance gains
        return exp_h - moved, exp_l + moved, exp_h, exp_l

    applied: dict[tuple, tuple] = {}  # (heavy, light) -> its changes (as the first pipeline priced it)
    seen: dict[tuple, int] = {}  # (heavy, light) -> pipelines that pair it
    pairs_of: dict[tuple, list] = {}  # pipelines with the same op lists pair the same way
    for r in range(hdp):
        sig = tuple(op_lists[(r, 0)])
        if sig not in pairs_of:
            pairs_of[sig] = mirror_pairs([op_lists[(r, s)] for s in range(p)], slice_attn) if v > 1 else []
        for hi_key, lo_key in pairs_of[sig]:
            res = pair(hi_key, lo_key, cm.setup.mesh.stages_in_different_domains(hi_key[0], lo_key[0], r))
            if res is not None:
                applied.setdefault((hi_key, lo_key), res)
                seen[(hi_key, lo_key)] = seen.get((hi_key, lo_key), 0) + 1
    delta: dict = {}
    exposed: dict = {}
    kept: list = []
    used: set = set()
    for (hi_key, lo_key), (d_h, d_l, e_h, e_l) in applied.items():
        ranks = units[hi_key[1].mb].hdp_ranks
        if (units[lo_key[1].mb].hdp_ranks != ranks or seen[(hi_key, lo_key)] != len(ranks)
                or hi_key in used or lo_key in used):
            continue  # member pipelines disagree on this pairing: the ops run unpaired
        used.update((hi_key, lo_key))
        delta[hi_key], delta[lo_key], exposed[hi_key], exposed[lo_key] = d_h, d_l, e_h, e_l
        kept.append((hi_key, lo_key))
    return delta, exposed, kept


def op_pricer(units: Mapping[int, Unit], cm: CostModel, costs: Mapping[int, tuple[UnitCost, UnitCost]],
              slice_costs: Mapping[int, tuple[UnitCost, UnitCost]], v: int) -> Callable[[int, PipeOp], OpCost]:
    """(stage, op) -> its OpCost: a chunk is 1/v of the stage's layers; the LM head runs once, on the last stage's
    last chunk; a sliced unit's pass as its slices run it (sliced_pass_s), their attention split by the blocks'
    rates (CostModel.slice_full_over_causal). Memoised."""
    p = cm.pp
    op_costs: dict = {}

    @functools.cache
    def full_over_causal(uid: int, direction: str) -> float:
        n = units[uid].slices
        return cm.slice_full_over_causal([-(-q.tokens // n) for q in units[uid].pieces], direction)

    def op_cost(s: int, op: PipeOp) -> OpCost:
        k = (s, op.mb, op.kind, op.chunk)
        if k not in op_costs:
            mid, last = costs[op.mb]
            one_mid, one_last = slice_costs.get(op.mb, (None, None))
            f, u = op.kind == "F", units[op.mb]
            n = u.slices
            src = slice_sources_s(cm, mid, u, f)
            t_mid, c_mid = (sliced_pass_s(mid, one_mid, n, f, only, src) for only in (False, True))
            t, c = t_mid / v, c_mid / v
            if s == p - 1 and op.chunk == v - 1:
                t += sliced_pass_s(last, one_last, n, f, False, src) - t_mid
                c += sliced_pass_s(last, one_last, n, f, True, src) - c_mid
            ratio = full_over_causal(op.mb, "fwd" if f else "bwd") if n > 1 else 2.0
            op_costs[k] = OpCost(t, ((mid.attn_fwd_compute_s if f else mid.attn_bwd_compute_s) + src) / v, c, src / v,
                                 ratio)
        return op_costs[k]

    return op_cost


def simulate_pipelined(step: Step, cm: CostModel, costs: Mapping[int, tuple[UnitCost, UnitCost]], hdp: int,
                       lb: float, slice_costs: Mapping[int, tuple[UnitCost, UnitCost]] | None = None
                       ) -> StepSimulation:
    """Every HDP rank is a pipeline running `planner.schedule` op lists; a shared unit's op is one
    co-scheduled op on all member pipelines (`run_ops`), so misaligned plans surface as deadlocks. `slice_costs`:
    each sliced unit's (middle, last)-stage cost at one slice's tokens (sliced_pass_s; None: slices cost nothing
    over the whole unit)."""
    slice_costs = slice_costs or {}
    p = cm.pp
    units = {u.id: u for u in step.units}
    sec = step.pipeline or PipelineSection()
    v = sec.v
    op_lists = step_op_lists(step, p, hdp)
    lists = {key: [((key[1], op), None) for op in ops] for key, ops in op_lists.items()}

    def cost_of(s: int, uid: int) -> UnitCost:
        return costs[uid][1] if s == p - 1 else costs[uid][0]

    op_cost = op_pricer(units, cm, costs, slice_costs, v)

    # On CPU cores that compute gloo's transfers too: each hand-off's host CPU, half on the op that sends (its send
    # is posted with the rank's next op) and half on the op that receives (CostModel.pp_handoff_cpu_s)
    handoff = {uid: cm.pp_handoff_cpu_s(costs[uid][0].tokens_per_rank / units[uid].slices) for uid in units}

    def handoff_s(key) -> float:
        s, op = key
        h = handoff[op.mb]
        if not h:
            return 0.0
        ends = (dependency(op, s, p, v, units[op.mb].slices - 1), consumer(op, s, p, v))
        return h / 2 * sum(e is not None and e[0] != s for e in ends)

    def own_s(key) -> float:
        s, op = key
        return op_cost(s, op).slice_s(op.slice, units[op.mb].slices)

    def base_duration(key) -> float:
        return own_s(key) + handoff_s(key)

    delta, exchange_exposed, pairs = {}, {}, []
    if sec.schedule == "sliced-redistributed":
        delta, exchange_exposed, pairs = redistribution(op_lists, p, hdp, units, op_cost,
                                                        {uid: c[0].tokens_per_rank for uid, c in costs.items()}, cm,
                                                        v, sec.max_chunks)

    def duration(key) -> float:
        return base_duration(key) + delta.get(key, 0.0)

    def compute_of(key, paired: bool) -> float:
        """The compute part of an op's duration: its slice's share of the pass's compute, plus (paired) the attention
        mirror pairing moved to it (its change less its exposed exchange), plus its hand-offs' host CPU."""
        s, op = key
        moved = delta.get(key, 0.0) - exchange_exposed.get(key, 0.0) if paired else 0.0
        return op_cost(s, op).slice_compute_s(op.slice, units[op.mb].slices) + moved + handoff_s(key)

    def dep(key):
        s, op = key
        return dependency(op, s, p, v, units[op.mb].slices - 1)

    p2p = {uid: cm.pp_p2p_s(costs[uid][0].tokens_per_rank / units[uid].slices) for uid in units}  # a slice's hand-off

    def transfer(key) -> float:
        d = dep(key)
        return 0.0 if d is None or d[0] == key[0] else p2p[key[1].mb]

    alone: set = set()  # ops of pairs that cannot meet: each runs unpaired

    def run_duration(key) -> float:
        return base_duration(key) if key in alone else duration(key)

    previous = {}  # shared cores: an op -> the op its rank ran before it (a shared op: its first member's)
    for lst in lists.values() if cm.shares_cores else ():
        for (a, _), (b, _) in zip(lst, lst[1:]):
            previous.setdefault(b, a)

    def late(key) -> float:
        """A receive posted after the data was sent meets a sender busy with its next op: on shared CPU cores it
        costs the wake-up after the receiving rank's own previous op (`CostModel.wake_after_s`); a rank that waited
        for the data pays the transfer alone. Measured on the replay's pp2 plan (4 ranks, 2 cores): 2.6 ms (median of
        51) from a rank's previous op when its input was there, 0.4 ms (of 37) from the send when it waited."""
        d = dep(key)
        if d is None or d[0] == key[0] or key not in previous:
            return 0.0
        before = previous[key]
        return float(cm.wake_after_s(compute_of(before, before not in alone)))

    try:
        if cm.shares_cores:  # CPU: ranks that wait or are done leave their cores to the others (simulate/cores.py)
            broken: list = []
            if pairs:  # whether a pair meets is the schedule's order, not its durations: the plain run tells
                run_ops(lists, dep, duration, transfer, pairs=pairs, solo=base_duration, broken=broken)
            alone = {k for hi, lo in pairs if hi in broken for k in (hi, lo)}
            mesh = cm.setup.mesh
            runs = run_ops_shared(
                lists, dep, run_duration, lambda key: compute_of(key, key not in alone), transfer,
                {(r, s): (mesh.domain_of(mesh.global_rank(s, r)), cm.tp) for r, s in lists}, cm,
                [pr for pr in pairs if pr[0] not in broken], late)
        else:
            runs = run_ops(lists, dep, duration, transfer, pairs=pairs, solo=base_duration)
    except ScheduleError as e:
        raise PlanError(f"step {step.step}: {e} (shared units must sit at the same micro-batch position "
                        "in every member pipeline)") from None
    partners = {k for pr in pairs for k in pr if pr[0] not in alone}  # a held heavy op's time is not its parts'
    busy = np.zeros((hdp, p))
    parts = {"compute": 0.0, "ring_exposed": 0.0, "tp_comm": 0.0, "offload_exposed": 0.0, "pp_exchange": 0.0}
    events: dict[tuple[int, int], list[tuple[float, float]]] = {}
    ops: list[OpTiming] = []
    for run in runs:
        s, op = run.key
        u = units[op.mb]
        c = cost_of(s, op.mb)
        mid = costs[op.mb][0]
        dur = run.end_s - run.start_s
        f = op.kind == "F"
        # Parts of this op: 1/v of the stage's (head-less) parts, the head on the last stage's last chunk;
        # mirror pairing only moves attention between stages, its exposed exchange is a part of its own.
        weight = len(run.resources) / (hdp * p)
        share = own_s(run.key) / (op_cost(s, op).time_s or 1.0) * weight
        hand = handoff_s(run.key)  # before the op's own work, as the executor posts its transfers
        if cm.shares_cores and run.key not in partners:  # its parts scale with the op's time at the cores' share
            priced = run_duration(run.key)
            stretch = dur / priced if priced > 0 else 1.0
            share, hand = share * stretch, hand * stretch
        head = (c.head_fwd_s if f else c.head_bwd_s) if op.chunk == v - 1 else 0.0
        parts["compute"] += share * ((mid.fwd_compute_s if f else mid.bwd_compute_s) / v + head)
        parts["ring_exposed"] += share * (mid.ring_exposed_fwd_s if f else mid.ring_exposed_bwd_s) / v
        parts["tp_comm"] += share * (mid.tp_comm_fwd_s if f else mid.tp_comm_bwd_s) / v
        parts["offload_exposed"] += share * (mid.offload_exposed_fwd_s if f else mid.offload_exposed_bwd_s) / v
        parts["pp_exchange"] += (exchange_exposed.get(run.key, 0.0) + hand) * weight
        act = activation_bytes(c.tokens_per_rank, u.offload_ratio, cm) / (u.slices * v)
        if s == p - 1 and op.chunk == v - 1:  # the last chunk runs the MTP depths' layers too
            act += mtp_activation_bytes(c.tokens_per_rank, cm) / u.slices
        work = recompute_working_bytes(c.tokens_per_rank / u.slices, cm)
        # fp32 dK/dV accumulators of the whole sequence, from a sliced unit's first backward to its last.
        dkv = (c.tokens_per_rank * 2 * cm.model.kv_width / cm.tp * 4 * cm.layers_per_stage / v
               if u.slices > 1 else 0.0)
        for (r, st) in run.resources:
            busy[r, st] += dur
            ev = events.setdefault((r, st), [])
            if f:
                ev.append((run.end_s, act))
            else:
                ev.append((run.end_s, -act))
                ev.append((run.start_s, work))  # full recompute: one layer rebuilt at a time during the backward
                ev.append((run.end_s, -work))
                if op.slice == u.slices - 1:
                    ev.append((run.start_s, dkv))
                if op.slice == 0:
                    ev.append((run.end_s, -dkv))
        ops.append(OpTiming(op.mb, u.hdp_ranks, s, f"{'fwd' if f else 'bwd'}" +
                            (f" s{op.slice}" if u.slices > 1 else "") + (f" c{op.chunk}" if v > 1 else ""),
                            run.start_s + hand, run.end_s))
    mem_peak = np.zeros((hdp, p))
    for (r, st), ev in events.items():
        ev.sort(key=lambda x: (x[0], x[1]))  # releases before allocations at the same instant
        mem_peak[r, st] = max(0.0, float(np.max(np.cumsum([x[1] for x in ev]))))
    finish = max((run.end_s for run in runs), default=0.0)
    # An overlapped gradient reduce hides under each model chunk's last backward on the stage that ends the step.
    total_sync = cm.grad_sync_s(hdp)
    sync = cm.exposed_chunked_grad_sync_s(hdp, chunk_last_backwards(runs))
    optimizer_s = cm.optimizer_step_s(hdp)
    static = np.array([static_memory_bytes(cm, s) for s in range(p)])
    mem = (mem_peak + static[None, :]).max(axis=1)
    stage_busy = busy.max(axis=1)
    idle_all = finish - busy
    bd = dict(parts)
    bd.update(idle=float(idle_all.mean()), grad_sync=sync, grad_sync_hidden=total_sync - sync,
              optimizer=optimizer_s, bubble=float(idle_all.mean()))
    return StepSimulation(step.step, hdp, finish + sync + optimizer_s, lb, sync + optimizer_s, stage_busy.tolist(),
                          (finish - stage_busy).tolist(), mem.tolist(), bd, ops, mem_peak.max(axis=0).tolist(),
                          tp=cm.tp)
