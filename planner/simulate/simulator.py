"""Discrete-event simulation of one plan step.

pp = 1: every HDP rank runs its units in plan order; a shared unit starts when all of its ranks
are free (co-scheduling, REFERENCE 2.4); then one gradient sync. pp > 1: every HDP rank is a
pipeline whose stages run a 1F1B op list; a unit's forward on stage s waits for stage s−1 plus the
activation transfer, its backward for stage s+1; a shared unit's op starts when every member
pipeline's stage is free. Unit costs come from the cost model, never from the plan's own figures,
so a plan can be re-simulated on another profile."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from costmodel.memory import activation_factor, model_state_bytes
from costmodel.timing import CostModel, UnitCost
from planner.simulate.bounds import lower_bound_s
from planner.schedule import slice_share
from planner.plan import Plan, PlanError, Predicted, Step


@dataclass(frozen=True)
class OpTiming:
    """One simulated op: a unit's forward or backward on one stage (pp = 1: stage 0, whole unit)."""

    unit: int
    ranks: tuple[int, ...]
    stage: int
    kind: str  # "fwd", "bwd" or "unit" (pp = 1: forward + backward)
    start_s: float
    end_s: float


@dataclass
class StepSimulation:
    step: int
    hdp: int
    step_time_s: float
    lower_bound_s: float
    grad_sync_s: float
    per_rank_busy_s: list[float]  # compute + exposed comm per HDP rank (per pipeline: its busiest stage)
    per_rank_idle_s: list[float]  # waiting for co-scheduled partners, bubbles, and the end of the step
    peak_memory_bytes: list[float]  # per HDP rank (max over its stages), fragmentation reserve included
    breakdown: dict[str, float]  # seconds, summed over ranks ÷ ranks (stage-averaged with PP)
    ops: list[OpTiming] = field(default_factory=list)
    # pp > 1: per stage, the activation peak (KV cache, dK/dV accumulators included) of its busiest rank
    stage_activation_peak_bytes: list[float] = field(default_factory=list)
    tp: int = 1  # TP degree, to name an HDP rank's GPUs in the trace

    def predicted(self) -> Predicted:
        return Predicted(step_time_s=self.step_time_s, lower_bound_s=self.lower_bound_s,
                         per_rank_busy_s=[round(x, 9) for x in self.per_rank_busy_s],
                         peak_memory_bytes=[float(round(x)) for x in self.peak_memory_bytes],
                         breakdown={k: round(v, 9) for k, v in self.breakdown.items()})

    def chrome_trace(self) -> dict:
        """Chrome / Perfetto trace: one process per pipeline stage, one named thread per HDP rank."""
        stages = sorted({op.stage for op in self.ops} | {0})
        ev = []
        for op in self.ops:
            for r in op.ranks:
                ev.append({"name": f"u{op.unit} {op.kind}", "ph": "X", "pid": op.stage, "tid": r,
                           "ts": op.start_s * 1e6, "dur": (op.end_s - op.start_s) * 1e6,
                           "args": {"unit": op.unit, "ranks": len(op.ranks)}})
        t_sync = self.step_time_s - self.grad_sync_s
        for s in stages:  # every stage all-reduces its own layers' gradients
            for r in range(self.hdp):
                ev.append({"name": "grad sync", "ph": "X", "pid": s, "tid": r, "ts": t_sync * 1e6,
                           "dur": self.grad_sync_s * 1e6})
        procs = {s: f"stage {s}" if len(stages) > 1 else "HDP ranks" for s in stages}
        threads = {(s, r): f"HDP rank {r} ({_global_ranks_text(s, r, self.hdp, self.tp)})"
                   for s in stages for r in range(self.hdp)}
        return {"traceEvents": chrome_metadata(procs, threads) + ev, "displayTimeUnit": "ms"}

    def write_trace(self, path: str | Path) -> Path:
        from profiles.table import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.chrome_trace()))
        return Path(path)


def chrome_metadata(processes: dict[int, str], threads: dict[tuple[int, int], str]) -> list[dict]:
    """Chrome / Perfetto metadata ("M") events naming processes and threads (pid / (pid, tid) -> name),
    sorted by their ids rather than by name; the simulated and the measured trace both use it."""
    ev: list[dict] = []
    for pid, name in sorted(processes.items()):
        ev.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
        ev.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
    for (pid, tid), name in sorted(threads.items()):
        ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        ev.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    return ev


def _global_ranks_text(stage: int, hdp_rank: int, hdp: int, tp: int) -> str:
    """The GPUs of one HDP rank of one stage: stage·(hdp·tp) + hdp_rank·tp + tp_rank (DESIGN.md Mesh)."""
    first = stage * hdp * tp + hdp_rank * tp
    return f"global rank {first}" if tp == 1 else f"global ranks {first}-{first + tp - 1}, TP {tp}"


def unit_costs(step: Step, cm: CostModel) -> dict[int, tuple[UnitCost, UnitCost]]:
    """(middle-stage cost, last-stage cost) per unit; equal when pp = 1."""
    per_node = cm.setup.hdp_per_node
    out = {}
    for u in step.units:
        lengths = [p.tokens for p in u.pieces]
        inter = u.hdp_ranks[0] // per_node != u.hdp_ranks[-1] // per_node
        last = cm.unit_cost(lengths, u.degree, u.offload_ratio, inter, with_head=True)
        mid = cm.unit_cost(lengths, u.degree, u.offload_ratio, inter, with_head=False) if cm.pp > 1 else last
        out[u.id] = (mid, last)
    return out


def _activation_bytes(u_tokens: int, offload: float, cm: CostModel) -> float:
    return u_tokens * cm.layers_per_stage * cm.a_tok * activation_factor(offload, cm.layers_per_stage)


def simulate_step(step: Step, cm: CostModel,
                  costs: dict[int, tuple[UnitCost, UnitCost]] | None = None) -> StepSimulation:
    """Simulate one step; `costs` (from `unit_costs`) may be passed in when the caller priced the units."""
    hdp = cm.setup.hdp
    if any(r >= hdp for u in step.units for r in u.hdp_ranks):
        raise PlanError(f"step {step.step}: plan uses HDP ranks beyond the mesh's {hdp}")
    costs = costs if costs is not None else unit_costs(step, cm)
    lb = lower_bound_s(np.array([q.length for q in step.sequences]), cm, hdp)
    sync = cm.grad_sync_s(hdp)
    if cm.pp == 1:
        return _simulate_flat(step, cm, costs, hdp, lb, sync)
    return _simulate_pipelined(step, cm, costs, hdp, lb, sync)


def _topological_units(step: Step) -> list[int]:
    """Units in an order consistent with every rank's order (Kahn); a cycle is a deadlock."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(u.id for u in step.units)
    for ids in step.order.values():
        g.add_edges_from(zip(ids, ids[1:]))
    try:
        return list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        raise PlanError(f"step {step.step}: unit orders contain a cycle (deadlock)") from None


def _simulate_flat(step, cm, costs, hdp, lb, sync) -> StepSimulation:
    units = {u.id: u for u in step.units}
    free = np.zeros(hdp)
    busy = np.zeros(hdp)
    parts = {"compute": np.zeros(hdp), "ring_exposed": np.zeros(hdp), "tp_comm": np.zeros(hdp),
             "offload_exposed": np.zeros(hdp)}
    peak_act = np.zeros(hdp)
    ops = []
    for uid in _topological_units(step):
        u = units[uid]
        c = costs[uid][1]
        r = np.array(u.hdp_ranks)
        start = float(free[r].max())
        end = start + c.total_s
        free[r] = end
        busy[r] += c.total_s
        parts["compute"][r] += c.compute_s
        parts["ring_exposed"][r] += c.ring_exposed_s
        parts["tp_comm"][r] += c.tp_comm_s
        parts["offload_exposed"][r] += c.offload_exposed_s
        peak_act[r] = np.maximum(peak_act[r], _activation_bytes(c.tokens_per_rank, u.offload_ratio, cm))
        ops.append(OpTiming(uid, u.hdp_ranks, 0, "unit", start, end))
    finish = float(free.max()) if len(step.units) else 0.0
    step_time = finish + sync
    idle = finish - busy
    mem = _static_memory(cm) + peak_act
    bd = {k: float(v.mean()) for k, v in parts.items()}
    bd.update(idle=float(idle.mean()), grad_sync=sync, bubble=0.0)
    return StepSimulation(step.step, hdp, step_time, lb, sync, busy.tolist(), idle.tolist(), mem.tolist(), bd, ops,
                          tp=cm.tp)


def static_memory_parts(cm: CostModel, stage: int | None = None) -> dict[str, float]:
    """Bytes a rank of `stage` (None: the largest) holds whatever it runs: model states, the loss-head
    peak, CUDA context + NCCL buffers, and the fragmentation reserve. The one definition behind the
    simulated peak memory (so peak <= HBM means "fits", as C is derived) and the memory figure."""
    b = cm.budget
    return {"states": model_state_bytes(cm.setup, stage), "logits": b.logits_bytes, "context": b.ctx_bytes,
            "fragmentation": b.frag_bytes}


def _static_memory(cm: CostModel, stage: int | None = None) -> float:
    return sum(static_memory_parts(cm, stage).values())


def inflight_weights(step: Step, cm: CostModel, costs: dict[int, tuple[UnitCost, UnitCost]]) -> dict[str, float]:
    """The pipeline section's "weights": each unit's resident activations per stage (offload applied) ÷
    a C-token micro-batch's, so the 1F1B in-flight budget is memory-faithful (rounded: the plan file
    holds exactly what the simulator and the runtime expand)."""
    full = _activation_bytes(cm.capacity_tokens, 0.0, cm)
    return {str(u.id): round(max(_activation_bytes(costs[u.id][0].tokens_per_rank, u.offload_ratio, cm) / full, 1e-6), 6)
            for u in step.units}


DEFAULT_MAX_CHUNKS = 1000  # mirror pairing: most K/V chunks one pair moves (SlimPipe configs: 100-1000)


@dataclass(frozen=True)
class OpCost:
    """Seconds of one pipeline op over all its slices: a unit's pass through one chunk of one stage."""

    time_s: float  # the last stage's last chunk carries the LM head and loss
    attn_s: float  # its causal attention compute, what mirror pairing moves

    def slice_attn_s(self, j: int, n: int) -> float:
        """Attention of slice j of n uniform token slices: (2j + 1)/n² of the whole (REFERENCE §6). Every
        document is sliced (the runtime's slice j is the j-th part of each), so packed units follow it too."""
        return self.attn_s * (2 * j + 1) / (n * n)

    def slice_s(self, j: int, n: int) -> float:
        """Slice j's time before any redistribution (`planner.schedule.slice_share`)."""
        return self.time_s * slice_share(j, n, min(self.attn_s / self.time_s, 1.0) if self.time_s > 0 else 0.0)


def _redistribution(op_lists, p: int, hdp: int, units, op_cost, tokens_per_rank: dict[int, int], cm: CostModel,
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
    from costmodel.slicing import mirror_exchange_bytes, mirror_exchange_exposed_s, stages_inter_node
    from planner.schedule import mirror_chunks, mirror_pairs

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
        block = op_cost(sh, hi).attn_s * 2 / (n * n)  # one cached slice's K/V against this slice
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
            res = pair(hi_key, lo_key, stages_inter_node(cm.setup, hi_key[0], lo_key[0], r))
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


def _simulate_pipelined(step, cm, costs, hdp, lb, sync) -> StepSimulation:
    """Every HDP rank is a pipeline running `planner.schedule` op lists; a shared unit's op is one
    co-scheduled op on all member pipelines (`run_ops`), so misaligned plans surface as deadlocks."""
    from planner.schedule import ScheduleError, dependency, run_ops, section_weights, step_op_lists

    p = cm.pp
    units = {u.id: u for u in step.units}
    sec = step.pipeline or {}
    sched = sec.get("schedule", "1f1b")
    v = int(sec.get("v", 1))
    op_lists = step_op_lists(p, {r: step.order.get(r, []) for r in range(hdp)}, {u.id: u.slices for u in step.units},
                             v, section_weights(step.pipeline))
    lists = {key: [((key[1], op), None) for op in ops] for key, ops in op_lists.items()}

    def cost_of(s: int, uid: int) -> UnitCost:
        return costs[uid][1] if s == p - 1 else costs[uid][0]

    op_costs: dict = {}

    def op_cost(s: int, op) -> OpCost:
        """A chunk is 1/v of the stage's layers; the LM head runs once, on the last stage's last chunk."""
        k = (s, op.mb, op.kind, op.chunk)
        if k not in op_costs:
            mid, last = costs[op.mb]
            f = op.kind == "F"
            t = (mid.fwd_s if f else mid.bwd_s) / v
            if s == p - 1 and op.chunk == v - 1:
                t += (last.fwd_s - mid.fwd_s) if f else (last.bwd_s - mid.bwd_s)
            op_costs[k] = OpCost(t, (mid.attn_fwd_compute_s if f else mid.attn_bwd_compute_s) / v)
        return op_costs[k]

    def base_duration(key) -> float:
        s, op = key
        return op_cost(s, op).slice_s(op.slice, units[op.mb].slices)

    delta, exchange_exposed, pairs = {}, {}, []
    if sched == "sliced-redistributed":
        delta, exchange_exposed, pairs = _redistribution(op_lists, p, hdp, units, op_cost,
                                                  {uid: c[0].tokens_per_rank for uid, c in costs.items()}, cm, v,
                                                  int(sec.get("max_chunks", DEFAULT_MAX_CHUNKS)))

    def duration(key) -> float:
        return base_duration(key) + delta.get(key, 0.0)

    p2p = {uid: cm.pp_p2p_s(costs[uid][0].tokens_per_rank / units[uid].slices) for uid in units}

    def dep(key):
        s, op = key
        return dependency(op, s, p, v, units[op.mb].slices - 1)

    def transfer(key) -> float:
        s, op = key
        d = dependency(op, s, p, v, units[op.mb].slices - 1)
        return 0.0 if d is None or d[0] == s else p2p[op.mb]

    try:
        runs = run_ops(lists, dep, duration, transfer, pairs=pairs, solo=base_duration)
    except ScheduleError as e:
        raise PlanError(f"step {step.step}: {e} (shared units must sit at the same micro-batch position "
                        "in every member pipeline)") from None
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
        share = base_duration(run.key) / (op_cost(s, op).time_s or 1.0) * weight
        head = (c.head_fwd_s if f else c.head_bwd_s) if op.chunk == v - 1 else 0.0
        parts["compute"] += share * ((mid.fwd_compute_s if f else mid.bwd_compute_s) / v + head)
        parts["ring_exposed"] += share * (mid.ring_exposed_fwd_s if f else mid.ring_exposed_bwd_s) / v
        parts["tp_comm"] += share * (mid.tp_comm_fwd_s if f else mid.tp_comm_bwd_s) / v
        parts["offload_exposed"] += share * (mid.offload_exposed_fwd_s if f else mid.offload_exposed_bwd_s) / v
        parts["pp_exchange"] += exchange_exposed.get(run.key, 0.0) * weight
        act = _activation_bytes(c.tokens_per_rank, u.offload_ratio, cm) / (u.slices * v)
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
                if op.slice == u.slices - 1:
                    ev.append((run.start_s, dkv))
                if op.slice == 0:
                    ev.append((run.end_s, -dkv))
        ops.append(OpTiming(op.mb, u.hdp_ranks, s, f"{'fwd' if f else 'bwd'}" +
                            (f" s{op.slice}" if u.slices > 1 else "") + (f" c{op.chunk}" if v > 1 else ""),
                            run.start_s, run.end_s))
    mem_peak = np.zeros((hdp, p))
    for (r, st), ev in events.items():
        ev.sort(key=lambda x: (x[0], x[1]))  # releases before allocations at the same instant
        mem_peak[r, st] = max(0.0, float(np.max(np.cumsum([x[1] for x in ev]))))
    finish = max((run.end_s for run in runs), default=0.0)
    static = np.array([_static_memory(cm, s) for s in range(p)])
    mem = (mem_peak + static[None, :]).max(axis=1)
    stage_busy = busy.max(axis=1)
    idle_all = finish - busy
    bd = dict(parts)
    bd.update(idle=float(idle_all.mean()), grad_sync=sync, bubble=float(idle_all.mean()))
    return StepSimulation(step.step, hdp, finish + sync, lb, sync, stage_busy.tolist(),
                          (finish - stage_busy).tolist(), mem.tolist(), bd, ops, mem_peak.max(axis=0).tolist(),
                          tp=cm.tp)


def simulate_plan(plan: Plan, cm: CostModel) -> list[StepSimulation]:
    if plan.mesh.hdp != cm.setup.hdp or plan.mesh.pp != cm.pp or plan.mesh.tp != cm.tp:
        raise PlanError(f"plan mesh (tp {plan.mesh.tp}, pp {plan.mesh.pp}, hdp {plan.mesh.hdp}) does not match the "
                        f"cost model's (tp {cm.tp}, pp {cm.pp}, hdp {cm.setup.hdp})")
    return [simulate_step(s, cm) for s in plan.steps]


@dataclass(frozen=True)
class MeasuredComparison:
    """Predicted (this simulator) vs measured (a `meshplan replay --trace` file)."""

    units: list[dict]  # per (replay step, unit): predicted_s, measured_s (mean over its ranks), rel_err
    steps: list[dict]  # per replay step: predicted_s, measured_s, rel_err

    @property
    def median_abs_unit_err(self) -> float:
        return float(np.median([abs(u["rel_err"]) for u in self.units])) if self.units else float("nan")


def compare_measured(plan: Plan, cm: CostModel, trace: dict) -> MeasuredComparison:
    """Match a measured trace (schema meshplan.measured/1) to the plan's simulation, unit by unit and
    step by step. Relative error = predicted / measured − 1."""
    if not isinstance(trace, dict) or not str(trace.get("schema", "")).startswith("meshplan.measured/"):
        raise PlanError("not a measured trace (expected the JSON written by `meshplan replay --trace`)")
    if not trace.get("complete"):
        raise PlanError("measured trace is incomplete (the replay did not finish)")
    sims = {s.step: simulate_step(s, cm) for s in plan.steps}
    steps_by_id = {s.step: s for s in plan.steps}
    units_out, steps_out = [], []
    for st in trace.get("steps", []):
        ps = st["plan_step"]
        if ps not in steps_by_id:
            raise PlanError(f"measured trace replays plan step {ps}, which the plan does not have")
        costs = unit_costs(steps_by_id[ps], cm)
        # pp > 1: a rank measures its own stage's share (the last stage's includes the head and loss)
        per_unit: dict[tuple[int, int], list[float]] = {}
        for u in st["units"]:
            per_unit.setdefault((int(u["unit"]), int(u.get("stage", 0))), []).append(float(u["fwd_s"]) + float(u["bwd_s"]))
        for (uid, stage), vals in sorted(per_unit.items()):
            pred = costs[uid][1 if stage == cm.pp - 1 else 0].total_s
            meas = float(np.mean(vals))
            units_out.append({"step": st["step"], "unit": uid, "stage": stage, "predicted_s": pred,
                              "measured_s": meas, "rel_err": pred / meas - 1 if meas > 0 else float("inf")})
        pred_step = sims[ps].step_time_s
        meas_step = float(st["step_time_s"])
        steps_out.append({"step": st["step"], "plan_step": ps, "predicted_s": pred_step, "measured_s": meas_step,
                          "rel_err": pred_step / meas_step - 1 if meas_step > 0 else float("inf")})
    return MeasuredComparison(units_out, steps_out)
