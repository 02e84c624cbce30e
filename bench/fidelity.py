"""Cost-model fidelity (issue 15): the published calibration sets and CPU replays, predicted vs measured.

    python -m bench.fidelity                          # both sections
    python -m bench.fidelity --only published         # `meshplan validate` for every packaged set, time and memory
    python -m bench.fidelity --only cpu --workdir W   # 6 plans replayed under torchrun (gloo), a few minutes
    python -m bench.fidelity --only cpu --workdir W --reuse   # re-price traces already in W, no replay
    python -m bench.fidelity --only cpu --workdir W --profile P --rounds 3   # a fresh profile P, 3 rounds

published: one table per calibration set (case, published, predicted, error) and its MAPE, from
`validate_cost_model` (error computed at run time, nothing fitted).

cpu: six small plans of the `tiny` model on the `local-cpu` cluster (planned in fp32 with eager kernels, as the
replay runs them), each exercising another part of the planner and the runtime (static, dcp, hdp with 2-rank units,
pp = 2 sliced with a 2-rank unit, tp = 2, and hdp on 3 ranks with a unit spanning all 3 unevenly), replayed with
`meshplan replay --trace` (fp32, one process per rank, --steps iterations; --rounds N replays every plan N times in
interleaved rounds and keeps each plan's round of median step). The first iteration is cold (lazy allocation) and
left out, as the calibration leaves it out (`warm_steps`). Per plan: step time predicted vs measured (median over
warm iterations) and the median and max |error| over units (each unit's measured time the median over them, from
its last member's start to its last member's end: planner.simulate.measured), first on the shipped profile (or
--profile's), then leave-one-plan-out: each plan predicted by
`meshplan calibrate`'s fit on the other five (planner.studies.calibrate with that plan held out). The measured step
is broken down from the trace (slowest rank's units, P2P wait, TP all-reduces, gradient sync, optimizer, Python's
garbage collector, CPU time / wall time) next to the prediction's terms, so a miss can be traced to its cause; the
units' own-thread CPU against their priced compute, per plan and pooled by kind of unit (`unit_kind`). Load
average at start and end, and per plan the host probe's time around its replay over the profile's (1: the host
computed as fast as when profiled): the machine may be shared.

Prints markdown; figures, never pass/fail (a replay or a set that fails is reported and the rest goes on)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

PROFILE = "local-cpu.measured"
# Units' CPU is also reported by kind: context-parallel units, and packed ones at most this many tokens (a few ms of
# the tiny model's compute, where fixed per-op costs and the host's state weigh most) or more [choice]
SHORT_UNIT_TOKENS = 256
LENGTHS = "lognormal:median=300,sigma=1.4,max=4096"
MAX_CONTEXT_TOKENS = 4096


@dataclass(frozen=True)
class CpuCase:
    """One plan of the CPU section: what it exercises and the request that makes it."""

    name: str
    strategy: str
    gpus: int
    tokens_per_step: int
    capacity_tokens: int  # set so the work spreads over the ranks (tiny fits any batch on one rank)
    tp: int = 1
    pp: int = 1
    exercises: str = ""


CASES = (
    CpuCase("static", "static", 2, 8192, 4096, exercises="one packed bin per rank"),
    CpuCase("dcp", "dcp", 2, 8192, 2048, exercises="2-rank CP units and packed bins"),
    CpuCase("hdp", "hdp", 4, 8192, 2048, exercises="4 ranks on 2 cores, 2-rank CP units"),
    CpuCase("pp2", "hdp", 4, 8192, 2048, pp=2, exercises="pp = 2, sliced 1F1B, a 2-pipeline CP unit"),
    CpuCase("tp2", "hdp", 4, 8192, 4096, tp=2, exercises="tp = 2 collectives"),
    CpuCase("hdp3", "hdp", 3, 4608, 1536, exercises="a unit on 3 ranks (uneven shards)"),
)


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:+.1%}"


def _abs_pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.1%}"


def _ms(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x * 1e3:.1f}" if abs(x) >= 1e-3 else f"{x * 1e3:.2f}"


# ---- published ------------------------------------------------------------------------------------------
def published() -> None:
    from planner.studies.validation import CALIBRATION_SETS, validate_cost_model

    print("## Published measurements (`meshplan validate`)\n")
    for name in CALIBRATION_SETS:
        try:
            rep = validate_cost_model(None, name)
        except Exception as e:  # one set failing must not hide the others
            print(f"{name}: failed: {type(e).__name__}: {e}\n")
            continue
        role = "held out" if rep.held_out else "design set"
        print(f"### {name} ({role}; profile {rep.profile})\n\n{rep.source}\n")
        print("| case | published | predicted | error |\n|---|---|---|---|")
        for r in rep.rows:
            print(f"| {r.case} | {r.published:.2f} {r.unit} | {r.predicted:.2f} {r.unit} | {_pct(r.error)} |")
        print(f"\nMAPE {rep.mape:.1%} over {len(rep.rows)} cases, "
              f"{sum(r.error < 0 for r in rep.rows)} optimistic\n")
        if rep.memory:  # every run trained: a peak over its HBM is the memory model's error
            print("| case | peak per GPU (GB) | allocated (GB) | HBM (GB) | busiest stage | fits |\n"
                  "|---|---|---|---|---|---|")
            for m in rep.memory:
                print(f"| {m.case} | {m.peak_bytes / 1e9:.1f} | {m.allocated_bytes / 1e9:.1f} | "
                      f"{m.hbm_bytes / 1e9:.0f} | {m.stage} | {'yes' if m.fits else 'no'} |")
            print(f"\n{sum(m.fits for m in rep.memory)} of {len(rep.memory)} runs fit\n")


# ---- cpu -------------------------------------------------------------------------------------------------
def make_plans(work: Path, seed: int, profile: str = PROFILE) -> dict[str, Path]:
    from planner.api import PlanRequest, make_plan

    paths = {}
    for c in CASES:
        req = PlanRequest(model="tiny", cluster="local-cpu", gpus=c.gpus, tp=c.tp, pp=c.pp, profile=profile,
                          lengths=LENGTHS, tokens_per_step=c.tokens_per_step, max_context_tokens=MAX_CONTEXT_TOKENS,
                          capacity_tokens=c.capacity_tokens, seed=seed, dtype="fp32", kernels="eager",
                          sequence_parallel=False)  # priced as the replay runs: eager ops, TP without SP
        path = work / f"plan_{c.name}.json"
        make_plan(req, c.strategy).save(path)
        paths[c.name] = path
    return paths


def _meshplan() -> list[str]:
    exe = shutil.which("meshplan")
    return [exe] if exe else [sys.executable, "-c", "from cli import app; app()"]


def replay(plan: Path, world: int, trace: Path, steps: int, log: Path) -> str | None:
    """`meshplan replay PLAN --nproc WORLD --trace TRACE`; None when it finished, else its last error line."""
    cmd = _meshplan() + ["replay", str(plan), "--nproc", str(world), "--trace", str(trace), "--steps", str(steps),
                         "--dtype", "fp32", "--device", "cpu"]
    with log.open("w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    if res.returncode:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        return lines[-1] if lines else f"exit {res.returncode}"
    return None


@dataclass
class PlanFigures:
    """Predicted vs measured for one plan on one profile."""

    step_predicted_s: float
    step_measured_s: float  # median over replay iterations
    unit_errors: list[float] = field(default_factory=list)  # per (unit, stage): predicted / median measured − 1
    host_slowdown: float | None = None  # the replay's host probe over the profile's (compare_measured)
    other_cores: float | None = None  # other processes' cores during the replay's steps (median; compare_measured)
    # per (unit, stage) with a CPU prediction: priced compute / median own-thread CPU − 1 (compare_measured)
    cpu_errors: list[float] = field(default_factory=list)
    # pipelines, by op "F2/4" (kind, slice / slices): the median over its sliced units' ops of each op's priced
    # compute / median own-thread CPU − 1 (compare_measured's ops)
    slice_cpu_errors: dict[str, float] = field(default_factory=dict)
    # the cpu_errors by kind of unit (unit_kind)
    cpu_errors_by_kind: dict[str, list[float]] = field(default_factory=dict)

    @property
    def step_error(self) -> float:
        return self.step_predicted_s / self.step_measured_s - 1

    @property
    def unit_median(self) -> float:
        return statistics.median(abs(e) for e in self.unit_errors) if self.unit_errors else float("nan")

    @property
    def unit_max(self) -> float:
        return max(abs(e) for e in self.unit_errors) if self.unit_errors else float("nan")


def figures(plan, cm, trace: dict) -> PlanFigures:
    """Plans here have one plan step: every replay iteration replays it."""
    from planner.simulate.measured import compare_measured

    c = compare_measured(plan, cm, trace)
    units: dict[tuple[int, int], list[dict]] = {}
    for u in c.units:
        units.setdefault((u["unit"], u["stage"]), []).append(u)
    errs = [v[0]["predicted_s"] / statistics.median(x["measured_s"] for x in v) - 1 for v in units.values()]
    cpu_by = {key: v[0]["predicted_cpu_s"] / statistics.median(x["thread_cpu_s"] for x in v) - 1
              for key, v in units.items() if "predicted_cpu_s" in v[0]}
    kind = {u.id: unit_kind(u) for u in plan.steps[0].units}
    by_kind: dict[str, list[float]] = {}
    for (uid, _), err in cpu_by.items():
        by_kind.setdefault(kind[uid], []).append(err)
    slices = {u.id: u.slices for u in plan.steps[0].units}
    ops: dict[tuple, list[dict]] = {}
    for o in c.ops:
        if slices[o["unit"]] > 1:
            ops.setdefault((o["unit"], o["stage"], o["kind"], o["slice"], o["chunk"]), []).append(o)
    by_slice: dict[str, list[float]] = {}
    for (uid, _, kind, j, _), v in ops.items():
        err = v[0]["predicted_cpu_s"] / statistics.median(x["thread_cpu_s"] for x in v) - 1
        by_slice.setdefault(f"{kind}{j}/{slices[uid]}", []).append(err)
    return PlanFigures(c.steps[0]["predicted_s"], statistics.median(s["measured_s"] for s in c.steps), errs,
                       c.host_slowdown, c.other_load.replay_cores if c.other_load else None, list(cpu_by.values()),
                       {k: statistics.median(v) for k, v in sorted(by_slice.items())}, by_kind)


UNIT_KINDS = ("context-parallel", f"packed, <= {SHORT_UNIT_TOKENS} tokens", f"packed, > {SHORT_UNIT_TOKENS} tokens")


def unit_kind(unit) -> str:
    """One of UNIT_KINDS: a unit over several ranks, or a packed one by its tokens."""
    if unit.degree > 1:
        return UNIT_KINDS[0]
    return UNIT_KINDS[1] if unit.tokens <= SHORT_UNIT_TOKENS else UNIT_KINDS[2]


def measured_breakdown(trace: dict) -> dict[str, float]:
    """Medians over iterations: slowest rank's units, its P2P wait and TP all-reduces, gradient sync, optimizer and
    Python's garbage collector (max over ranks), CPU time over wall time summed over ranks (the share of a core
    each rank got), the most CPU a rank's own thread and its other threads (gloo's) spent in its units, and the most
    a rank spent outside them (posting and receiving hand-offs, the sync, the optimizer, Python between ops; the
    last three None in traces before the units' CPU)."""
    rows = []
    for st in trace["steps"]:
        ranks = st["ranks"]
        wait: dict[int, float] = {}
        tp: dict[int, float] = {}
        own: dict[int, float] = {}
        helpers: dict[int, float] = {}
        for u in st["units"]:
            wait[u["rank"]] = wait.get(u["rank"], 0.0) + u["comm_wait_s"]
            tp[u["rank"]] = tp.get(u["rank"], 0.0) + u.get("tp_wait_s", 0.0)  # traces before it: none
            if "thread_cpu_s" in u:
                own[u["rank"]] = own.get(u["rank"], 0.0) + u["thread_cpu_s"]
                helpers[u["rank"]] = helpers.get(u["rank"], 0.0) + u["helper_cpu_s"]
        rows.append({"step_s": st["step_time_s"], "units_s": max(r["units_s"] for r in ranks),
                     "comm_wait_s": max(wait.values(), default=0.0), "tp_wait_s": max(tp.values(), default=0.0),
                     "grad_sync_s": max(r["grad_sync_s"] for r in ranks),
                     "optimizer_s": max(r["optimizer_s"] for r in ranks),
                     "gc_s": max(r.get("gc_s", 0.0) for r in ranks),  # traces before it: none
                     "cpu_share": sum(r["cpu_s"] for r in ranks) / sum(r["wall_s"] for r in ranks),
                     "thread_cpu_s": max(own.values(), default=None),
                     "helper_cpu_s": max(helpers.values(), default=None),
                     "outside_cpu_s": max((r["cpu_s"] - own[r["rank"]] - helpers[r["rank"]] for r in ranks
                                           if r["rank"] in own), default=None)})
    return {k: (statistics.median(r[k] for r in rows) if rows[0][k] is not None else None) for k in rows[0]}


def predicted_breakdown(plan, cm) -> dict[str, float]:
    from planner.simulate import simulate_step

    s = simulate_step(plan.steps[0], cm)
    b = s.breakdown
    return {"busiest_s": max(s.per_rank_busy_s), "ring_exposed_s": b.get("ring_exposed", 0.0),
            "tp_comm_s": b.get("tp_comm", 0.0),
            "grad_sync_s": b.get("grad_sync", 0.0), "optimizer_s": b.get("optimizer", 0.0),
            "bubble_s": b.get("bubble", 0.0), "pp_exchange_s": b.get("pp_exchange", 0.0)}


def warm_trace(trace: dict) -> dict:
    """The trace with its cold first replay of each plan step left out (`warm_steps`), as the calibration and
    `meshplan machine-check` compare it: the first pass over a step's shapes allocates and loads lazily."""
    from planner.simulate.measured import warm_steps

    return {**trace, "steps": warm_steps(trace)}


def median_round(traces: list[Path]) -> Path:
    """The trace whose measured step (median over its warm iterations) is the median of the rounds' (the lower one
    of an even count)."""
    def step_s(t: Path) -> float:
        return statistics.median(st["step_time_s"] for st in warm_trace(json.loads(t.read_text()))["steps"])
    ranked = sorted(traces, key=step_s)
    return ranked[(len(ranked) - 1) // 2]


def cpu(args: argparse.Namespace) -> None:
    import numpy as np

    from costmodel.timing import CostModel
    from planner.api import cost_model_for_plan
    from planner.plan import Plan
    from planner.studies.calibrate import calibrate

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="meshplan-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    print("## CPU replays: predicted vs measured\n")
    if args.wait_for and not args.reuse:
        t0 = time.monotonic()
        while not Path(args.wait_for).exists() and time.monotonic() - t0 < args.wait_max_s:
            time.sleep(30)
        waited = time.monotonic() - t0
        print(f"waited {waited:.0f} s for {args.wait_for}"
              + ("" if Path(args.wait_for).exists() else " (not there: ran anyway)") + "\n")
    load_start = os.getloadavg()
    t_start = time.monotonic()
    plans = ({c.name: work / f"plan_{c.name}.json" for c in CASES} if args.reuse
             else make_plans(work, args.seed, args.profile))
    # Rounds: every plan once per round, rounds one after another, so a slow spell of the host hits one round of
    # each plan rather than all of one plan; each plan keeps its round of median step time.
    rounds: dict[str, list[Path]] = {c.name: [] for c in CASES}
    for r in range(0 if args.reuse else args.rounds):
        for c in CASES:
            trace = work / (f"trace_{c.name}.json" if r == 0 else f"trace_{c.name}.round{r}.json")
            plan = Plan.load(plans[c.name])
            t0 = time.perf_counter()
            why = replay(plans[c.name], plan.mesh.world_size, trace, args.steps, work / f"replay_{c.name}.log")
            print(f"replay {c.name} (round {r + 1}/{args.rounds}): "
                  + (f"FAILED: {why}" if why else f"{time.perf_counter() - t0:.0f} s"), file=sys.stderr)
            if not why and trace.exists():
                rounds[c.name].append(trace)
    if args.reuse:  # every round a previous run left
        rounds = {c.name: [t for t in [work / f"trace_{c.name}.json", *sorted(work.glob(f"trace_{c.name}.round*.json"))]
                           if t.exists() and not t.name.endswith(".chrome.json")] for c in CASES}
    traces = {n: median_round(ts) for n, ts in rounds.items() if ts}
    n_rounds = max((len(ts) for ts in rounds.values()), default=0)
    load_end = os.getloadavg()
    replay_s = time.monotonic() - t_start

    docs = {n: warm_trace(json.loads(t.read_text())) for n, t in traces.items()}
    loaded = {n: Plan.load(plans[n]) for n in traces}
    base = {n: figures(loaded[n], cost_model_for_plan(loaded[n], args.profile), docs[n]) for n in traces}
    lopo: dict[str, PlanFigures] = {}
    fitted: dict[str, str] = {}
    held: dict[str, object] = {}
    prior = float("nan")  # the tables' prior width the fits used
    pairs = [(plans[n], traces[n]) for n in traces]
    for n in traces if len(traces) >= 3 else ():  # a fit on the others needs at least two other plans
        try:
            cal = calibrate(pairs, args.profile, holdout=[plans[n]])
        except Exception as e:
            print(f"calibrate without {n}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        cm = CostModel(cost_model_for_plan(loaded[n], args.profile).setup, cal.profile)
        lopo[n] = figures(loaded[n], cm, docs[n])
        held[n], prior = cal.held_out[0], cal.prior_width
        fitted[n] = ", ".join(f"{p.name} {p.fitted:.3g}" if p.status == "fitted" else f"{p.name} -"
                              for p in cal.params) + f" (fitted to {cal.basis})"

    cm0 = cost_model_for_plan(next(iter(loaded.values())), args.profile) if loaded else None
    other = cm0.profile.constants.get("host_other_cores") if cm0 else None
    print(f"Date {date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; profile {args.profile}; model tiny, cluster local-cpu, lengths {LENGTHS}, "
          f"max context {MAX_CONTEXT_TOKENS}, seed {args.seed}; {args.steps} replay iterations, fp32, one process "
          f"per rank (1 thread each). Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load_start)}"
          f", at end {', '.join(f'{x:.2f}' for x in load_end)}; replays {replay_s:.0f} s, {n_rounds} round(s), "
          "each plan at its round of median step"
          + (f"; other processes kept {other['value']:.2f} cores busy while the profile was measured" if other else "")
          + (" (reused traces)" if args.reuse else "") + f". Outputs in {work}.\n")
    print("| plan | mesh | units (max degree) | step predicted / measured (ms) | step error | unit median / max "
          "abs error | host probe x | other load (cores) | LOPO step predicted (ms) | LOPO step error | "
          "LOPO unit median / max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in CASES:
        if c.name not in traces:
            print(f"| {c.name} | replay failed | | | | | | | | | |")
            continue
        p, b, a = loaded[c.name], base[c.name], lopo.get(c.name)
        m = p.mesh
        st = p.steps[0]
        print(f"| {c.name} | {m.world_size} ranks: tp {m.tp}, pp {m.pp}, hdp {m.hdp} | {len(st.units)} "
              f"({max(u.degree for u in st.units)}) | {_ms(b.step_predicted_s)} / {_ms(b.step_measured_s)} | "
              f"{_pct(b.step_error)} | {_abs_pct(b.unit_median)} / {_abs_pct(b.unit_max)} | "
              + (f"{b.host_slowdown:.2f} | " if b.host_slowdown else "- | ")
              + (f"{b.other_cores:.2f} | " if b.other_cores is not None else "- | ")
              + (f"{_ms(a.step_predicted_s)} | {_pct(a.step_error)} | {_abs_pct(a.unit_median)} / "
                 f"{_abs_pct(a.unit_max)} |" if a else "- | - | - |"))
    def pool(fs, attr: str) -> float:
        return float(np.median([abs(getattr(f, attr)) for f in fs])) if fs else float("nan")

    def pool_units(fs) -> float:
        return float(np.median([abs(e) for f in fs for e in f.unit_errors])) if fs else float("nan")

    print(f"\nOverall (median over plans of |step error|; median over all units of |unit error|): shipped "
          f"{_abs_pct(pool(base.values(), 'step_error'))} per step, {_abs_pct(pool_units(base.values()))} per unit; "
          f"leave-one-plan-out {_abs_pct(pool(lopo.values(), 'step_error'))} per step, "
          f"{_abs_pct(pool_units(lopo.values()))} per unit. Within 10% per step / 15% per unit (shipped; LOPO): "
          + "; ".join(f"{n} {'yes' if abs(base[n].step_error) <= .10 else 'no'}/"
                      f"{'yes' if base[n].unit_max <= .15 else 'no'}"
                      + (f", {'yes' if abs(lopo[n].step_error) <= .10 else 'no'}/"
                         f"{'yes' if lopo[n].unit_max <= .15 else 'no'}" if n in lopo else "")
                      for n in traces) + ".\n")

    print("Measured step (trace, medians over iterations; slowest rank) against the profile's terms (ms):\n")
    print("| plan | measured step | units | P2P wait | TP all-reduces | grad sync | optimizer | collector | "
          "CPU / wall | predicted step | busiest rank | ring exposed | TP comm | grad sync | optimizer | bubble | "
          "hand-offs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    breakdowns = {}
    for n in traces:
        mb = measured_breakdown(docs[n])
        pb = predicted_breakdown(loaded[n], cost_model_for_plan(loaded[n], args.profile))
        breakdowns[n] = {"measured": mb, "predicted": pb}
        print(f"| {n} | {_ms(mb['step_s'])} | {_ms(mb['units_s'])} | {_ms(mb['comm_wait_s'])} | "
              f"{_ms(mb['tp_wait_s'])} | {_ms(mb['grad_sync_s'])} | {_ms(mb['optimizer_s'])} | {_ms(mb['gc_s'])} | "
              f"{mb['cpu_share']:.2f} | "
              f"{_ms(base[n].step_predicted_s)} | {_ms(pb['busiest_s'])} | {_ms(pb['ring_exposed_s'])} | "
              f"{_ms(pb['tp_comm_s'])} | {_ms(pb['grad_sync_s'])} | {_ms(pb['optimizer_s'])} | {_ms(pb['bubble_s'])} | "
              f"{_ms(pb['pp_exchange_s'])} |")
    print("\nUnits' CPU: each unit's own-thread CPU (the trace's thread_cpu_s, members' mean, median over iterations) "
          "against its priced compute at the share of as many busy ranks as cores ("
          "planner.simulate.measured.predicted_cpu_s), which waits and time slicing do not move; and per step the "
          "most CPU a rank's own thread and its other threads (gloo's) spent in its units, and outside them (its "
          "hand-offs, the sync and optimizer, Python between ops):\n")
    print("| plan | units' CPU error, median (signed) | median / max abs | own thread a step (ms) | "
          "other threads a step (ms) | outside units a step (ms) |")
    print("|---|---|---|---|---|---|")
    for n in traces:
        cpu, mb = base[n].cpu_errors, breakdowns[n]["measured"]
        print(f"| {n} | " + (f"{_pct(float(np.median(cpu)))} | {_abs_pct(float(np.median(np.abs(cpu))))} / "
                             f"{_abs_pct(float(np.max(np.abs(cpu))))} | " if cpu else "- | - | ")
              + f"{_ms(mb['thread_cpu_s'])} | {_ms(mb['helper_cpu_s'])} | {_ms(mb['outside_cpu_s'])} |")
    pooled = {k: [(n, e) for n in traces for e in base[n].cpu_errors_by_kind.get(k, ())] for k in UNIT_KINDS}
    if any(pooled.values()):
        print("\nUnits' CPU error by kind of unit, pooled over the plans (each unit's, as above):\n")
        print("| kind | units | plans | median (signed) | quartiles |")
        print("|---|---|---|---|---|")
        for k, v in pooled.items():
            if v:
                e = np.array([x for _, x in v])
                print(f"| {k} | {len(v)} | {', '.join(dict.fromkeys(n for n, _ in v))} | {_pct(float(np.median(e)))} | "
                      f"{_pct(float(np.percentile(e, 25)))} / {_pct(float(np.percentile(e, 75)))} |")
    sliced = [n for n in traces if base[n].slice_cpu_errors]
    if sliced:
        print("\nSliced units' pipeline ops, each op's own-thread CPU (the trace's ops) against its priced compute "
              "(planner.simulate.measured.predicted_op_cpu_s: the op's share of its pass, a slice's attention its own "
              "causal block and a full block per cached slice at the table's rates), median over ops by kind and "
              "slice:\n")
        for n in sliced:
            errs = base[n].slice_cpu_errors
            print(f"| {n} | " + " | ".join(errs) + " |")
            print("|---|" + "---|" * len(errs))
            print("| CPU error | " + " | ".join(_pct(e) for e in errs.values()) + " |\n")
    if fitted:
        print("\nLeave-one-plan-out fits (table-time multipliers and overheads in s; '-': kept at base; the tables' "
              f"prior width {prior:g}, `meshplan calibrate`'s default):\n")
        for n, f in fitted.items():
            print(f"- without {n}: {f}")
    out = {"date": date.today().isoformat(), "load_start": load_start, "load_end": load_end, "profile": args.profile,
           "steps": args.steps, "seed": args.seed, "workdir": str(work),
           "plans": {n: {"shipped": {**vars(base[n]), "step_error": base[n].step_error},
                         "lopo": ({**vars(lopo[n]), "step_error": lopo[n].step_error} if n in lopo else None),
                         "calibrate_held_out": (vars(held[n]) if n in held else None),
                         "breakdown": breakdowns[n]} for n in traces}}
    (work / "fidelity_cpu.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\nJSON: {work / 'fidelity_cpu.json'}")
    if traces:
        from planner.report import Strip, plot_strips

        # each plan's errors on the profile as given (grey), then fitted on the other plans (its LOPO fold, if any)
        def strip(n: str, what) -> Strip:
            return Strip(n, what(lopo[n]) if n in lopo else (), True, what(base[n]))
        paths = plot_strips([("per step", [strip(n, lambda f: (f.step_error,)) for n in traces]),
                             ("per unit", [strip(n, lambda f: tuple(f.unit_errors)) for n in traces])],
                            work / "fidelity_cpu.png", title=f"CPU replays on {args.profile}",
                            labels=("the profile", "fitted on the other plans", "fitted on it"))
        print(f"Figure: {', '.join(map(str, paths))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("published", "cpu"), help="one section (default: both)")
    p.add_argument("--workdir", help="where plans, traces and logs go (default: a new temp folder)")
    p.add_argument("--steps", type=int, default=5, help="replay iterations per plan (the first is left out)")
    p.add_argument("--rounds", type=int, default=1, help="replays of every plan, in interleaved rounds; each plan "
                   "keeps its round of median step time")
    p.add_argument("--seed", type=int, default=0, help="seed of the length source")
    p.add_argument("--profile", default=PROFILE, help="profile to plan and price with, a name or a JSON path "
                   "(e.g. one measured just before with `meshplan profile --quick --models tiny --out P`)")
    p.add_argument("--reuse", action="store_true", help="re-price the plans and traces in --workdir, no replay")
    p.add_argument("--wait-for", help="before replaying, wait for this file to exist (another heavy job ends)")
    p.add_argument("--wait-max-s", type=float, default=1200.0, help="longest wait for --wait-for, then run anyway")
    args = p.parse_args()
    if args.reuse and not args.workdir:
        p.error("--reuse needs --workdir")
    if args.only in (None, "published"):
        published()
    if args.only in (None, "cpu"):
        cpu(args)


if __name__ == "__main__":
    main()
