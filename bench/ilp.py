"""Exact solvers (issue 6): optimality gap and time of the `ilp` strategy on 16–64-GPU steps of 64–2,000
sequences, hdp's gap to the ILP over seeded instances, and which backend is fastest at which size.
Prints markdown tables (figures go to docs/BENCHMARKS.md, "Exact solvers", with date and machine).

    python -m bench.ilp                      # both sections (~10 minutes on 2 cores; -m: run as a file,
                                             # bench/planner.py would shadow the planner package)
    python -m bench.ilp --only gap           # gap | backends
    python -m bench.ilp --time-limit 3 --seeds 1   # a quicker look
    python -m bench.ilp --only heldout --time-limit 20   # issue 21: 256 GPUs, 1M context, hundreds of long sequences
    python -m bench.ilp --only load --time-limit 10      # issue 18: idle vs two core burners, wall-clock vs work limits

Every instance: LLaMA-7B on DGX-H100 (analytic profile), pp = tp = 1, recompute chosen by `auto`, one step.
Step times are the simulator's (ilp and hdp alike); the gap is within the partition model: objective vs the
largest proven bound of the same model (the area bound or slowest sequence, the configuration LP, the integer
configuration model, or the solver's dual bound; see planner/strategies/ilp/__init__.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date

import numpy as np

from planner.api import PlanRequest, build_cost_model, make_batches
from planner.strategies import IlpOptions, PlanOptions, ilp
from planner.strategies.hdp import plan_balance

M, K = 2**20, 2**10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Shape:
    """One benchmark case: a length family on a cluster size, with the step's token budget."""

    lengths: str
    gpus: int
    tokens_per_step: int
    max_context_tokens: int

    def request(self, seed: int) -> PlanRequest:
        return PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=self.gpus, lengths=self.lengths, seed=seed,
                           tokens_per_step=self.tokens_per_step, max_context_tokens=self.max_context_tokens)


# 16 shapes × 2 seeds = 32 instances of 72–1,654 sequences; the 256K-context shapes on 32/64 GPUs get a
# small C (recompute none/selective), hence dozens of sharded sequences.
SHAPES = [
    Shape("byted-like", 16, 2 * M, 256 * K), Shape("byted-like", 16, 3 * M // 4, 256 * K),
    Shape("github-like", 16, 1 * M, 256 * K), Shape("prolong-like", 16, 2 * M, 256 * K),
    Shape("longalign-like", 16, 2 * M, 256 * K),
    Shape("byted-like", 32, 4 * M, 512 * K), Shape("github-like", 32, 3 * M // 2, 512 * K),
    Shape("prolong-like", 32, 3 * M, 512 * K), Shape("byted-like", 32, 2 * M, 256 * K),
    Shape("github-like", 32, 3 * M // 2, 256 * K),
    Shape("byted-like", 64, 8 * M, 1024 * K), Shape("github-like", 64, 2 * M, 1024 * K),
    Shape("prolong-like", 64, 4 * M, 1024 * K), Shape("lognormal", 64, 2 * M, 256 * K),
    Shape("byted-like", 64, 4 * M, 256 * K), Shape("prolong-like", 64, 2 * M, 256 * K),
]
BACKEND_SHAPES = [SHAPES[i] for i in (0, 4, 5, 8, 10, 13)]  # two per cluster size: big C and small C
# Issue 21's held-out kind, reduced to run here: 256 GPUs, a 1M context, 16M tokens (C = 6.8K: 265 and 395
# sharded sequences, 104 and 390 distinct long lengths, beyond the 48 that used to be bucketed).
HELDOUT_SHAPES = [Shape("prolong-like", 256, 16 * M, 1024 * K), Shape("github-like", 256, 16 * M, 1024 * K)]


def run(shape: Shape, seed: int, solver: str, limit_s: float, deterministic: bool = False) -> dict:
    """Plan one step with hdp and with ilp; figures of both from the simulator."""
    req = shape.request(seed)
    cm = build_cost_model(req)
    batch = make_batches(req)[0]
    opt = PlanOptions(ilp=IlpOptions(solver=solver, time_limit_s=limit_s, deterministic=deterministic))
    t0 = time.perf_counter()
    hdp = plan_balance(batch, cm, opt)
    hdp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = ilp.solve_step(batch, cm, opt)
    secs = time.perf_counter() - t0
    step, r = out.step, out.solver
    units = sorted((u.hdp_ranks, [(p.seq, p.start, p.end) for p in u.pieces]) for u in step.units)
    return dict(shape=asdict(shape), seed=seed, solver=solver, written=r.written,
                plan=hashlib.sha256(json.dumps(units).encode()).hexdigest()[:8], seqs=len(batch), long=int(
        (batch.lengths_tokens > cm.capacity_tokens).sum()), C=cm.capacity_tokens,
        recompute=cm.setup.training.recompute, items=r.items, variables=r.variables, status=r.status,
        bound_from=r.bound_from, note=r.note,
        seconds=secs, gap=r.gap, objective_s=r.objective_s, bound_s=r.bound_s,
        ilp_s=step.predicted.step_time_s, hdp_s=hdp.predicted.step_time_s, hdp_plan_s=hdp_s,
        lower_bound_s=step.predicted.lower_bound_s)


def label(s: dict) -> str:
    sh = s["shape"]
    return (f"{sh['lengths']} {sh['gpus']} GPUs {sh['tokens_per_step'] / M:g}M/{sh['max_context_tokens'] // K}K "
            f"s{s['seed']}")


def gap_section(limit_s: float, seeds: int) -> None:
    print(f"\n### Gap and time, HiGHS, {limit_s:g} s limit ({len(SHAPES) * seeds} instances)\n")
    print("| instance | seqs (long) | C | items / vars | status | time (s) | gap | ilp step (s) | model (s) | "
          "hdp step (s) | hdp vs ilp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in SHAPES:
        for seed in range(seeds):
            r = run(shape, seed, "highs", limit_s)
            rows.append(r)
            print(f"| {label(r)} | {r['seqs']} ({r['long']}) | {r['C']} | {r['items']} / {r['variables']} | "
                  f"{r['status']} | {r['seconds']:.1f} | {100 * r['gap']:.2f}% | {r['ilp_s']:.3f} | "
                  f"{r['objective_s']:.3f} | {r['hdp_s']:.3f} | {100 * (r['hdp_s'] / r['ilp_s'] - 1):+.1f}% |",
                  flush=True)
    gaps = np.array([r["gap"] for r in rows])
    secs = np.array([r["seconds"] for r in rows])
    hdp_gap = np.array([r["hdp_s"] / r["ilp_s"] - 1 for r in rows])
    model_err = np.array([r["ilp_s"] / r["objective_s"] - 1 for r in rows if r["written"] != "hdp"])
    ok = (gaps <= 0.02) & (secs <= limit_s)
    print(f"\nsolved within {limit_s:g} s at ≤ 2% gap: {ok.sum()}/{len(rows)}; proven optimal: "
          f"{sum(r['status'] == 'optimal' for r in rows)}; gap median {100 * np.median(gaps):.2f}%, max "
          f"{100 * gaps.max():.2f}%; time median {np.median(secs):.1f} s, max {secs.max():.1f} s")
    sources: dict[str, int] = {}
    for r in rows:
        sources[r["bound_from"]] = sources.get(r["bound_from"], 0) + 1
    print("bound that sets the gap: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items(), key=lambda x: -x[1])))
    by = {}
    for r, g in zip(rows, gaps):
        by.setdefault(r["shape"]["gpus"], []).append(g)
    print("gap by cluster size: " + ", ".join(f"{k} GPUs median {100 * np.median(v):.2f}% max {100 * max(v):.2f}%"
                                              for k, v in sorted(by.items())))
    print(f"hdp's step time vs the ILP plan's: median {100 * np.median(hdp_gap):+.1f}%, max "
          f"{100 * hdp_gap.max():+.1f}%, min {100 * hdp_gap.min():+.1f}% (negative: hdp faster, it may re-group "
          f"ranks mid-step); hdp faster on {(hdp_gap < 0).sum()}/{len(rows)}")
    print(f"simulated ilp step vs its model objective, where a partition is written ({len(model_err)}/{len(rows)}): "
          f"median {100 * np.median(model_err):+.2f}%, range {100 * model_err.min():+.2f}% to "
          f"{100 * model_err.max():+.2f}% (buckets, partial bins)")
    kept_hdp = sum("wrote hdp's plan" in r["note"] for r in rows)
    print(f"over the time limit: {(secs > limit_s).sum()}/{len(rows)} (max {secs.max():.2f} s); hdp's plan written "
          f"on {kept_hdp}/{len(rows)}")


def backend_section(limit_s: float) -> None:
    """Each backend in its own process (highspy and OR-Tools cannot share one, see ilp.solve)."""
    print(f"\n### Backends, {limit_s:g} s limit, one process per backend (CBC and HiGHS one thread, CP-SAT "
          f"{max(1, min(8, os.cpu_count() or 1))} workers)\n")
    res = {}
    for solver in ilp.SOLVERS:
        out = subprocess.run([sys.executable, "-m", "bench.ilp", "--worker", solver, "--time-limit", str(limit_s)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        res[solver] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    print("| instance | seqs | vars | " + " | ".join(f"{s}: status, time, gap, step" for s in ilp.SOLVERS) + " |")
    print("|---|---|---|" + "---|" * len(ilp.SOLVERS))
    for k in range(len(BACKEND_SHAPES)):
        r0 = res[ilp.SOLVERS[0]][k]
        cells = [f"{res[s][k]['status']}, {res[s][k]['seconds']:.1f} s, {100 * res[s][k]['gap']:.2f}%, "
                 f"{res[s][k]['ilp_s']:.3f}" for s in ilp.SOLVERS]
        print(f"| {label(r0)} | {r0['seqs']} | {r0['variables']} | " + " | ".join(cells) + " |")
    notes = [f"{s} on {label(res[s][k])}: {res[s][k]['note']}" for s in ilp.SOLVERS for k in range(len(BACKEND_SHAPES))
             if res[s][k]["note"]]
    for n in notes:
        print(f"\n- {n}")


def heldout_section(limit_s: float) -> None:
    """The plan written against the model and hdp (issue 21): model objective, simulated step time of the
    plan written, hdp's, and the wall time of the whole call against the limit."""
    print(f"\n### Held-out, HiGHS, {limit_s:g} s limit: the plan written\n")
    print("| instance | seqs (long) | items | status | time (s) | model (s) | written, simulated (s) | hdp (s) | "
          "gap | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in HELDOUT_SHAPES:
        r = run(shape, 0, "highs", limit_s)
        print(f"| {label(r)} | {r['seqs']} ({r['long']}) | {r['items']} | {r['status']} | {r['seconds']:.1f} | "
              f"{r['objective_s']:.3f} | {r['ilp_s']:.3f} | {r['hdp_s']:.3f} | {100 * r['gap']:.2f}% | "
              f"{r['note'] or '-'} |", flush=True)


LOAD_CASES = [SHAPES[i] for i in (0, 5, 9, 14)]  # 16, 32 (two C) and 64 GPUs


def burners(n: int) -> list[subprocess.Popen]:
    """n processes that each keep a core busy (the "loaded machine")."""
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def load_section(limit_s: float) -> None:
    """The same instances idle and with two core burners, with the wall-clock phases (default) and with
    deterministic work limits (IlpOptions.deterministic): gap and simulated step of the plan written."""
    print(f"\n### Under load, HiGHS, {limit_s:g} s limit: idle vs two core burners\n")
    print("| instance | limits | idle: gap, step (s), time (s), plan | loaded: gap, step (s), time (s), plan | "
          "same plan | clock (idle / loaded) |")
    print("|---|---|---|---|---|---|")
    for shape in LOAD_CASES:
        for det in (False, True):
            idle = run(shape, 0, "highs", limit_s, det)
            procs = burners(2)
            try:
                busy = run(shape, 0, "highs", limit_s, det)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            cells = [f"{100 * r['gap']:.2f}%, {r['ilp_s']:.3f}, {r['seconds']:.1f}, {r['plan']}" for r in (idle, busy)]
            clock = ["stopped " + r["note"].split("the clock stopped ")[1].split(" before")[0]
                     if "the clock stopped" in r["note"] else "-" for r in (idle, busy)]
            print(f"| {label(idle)} | {'work' if det else 'wall clock'} | " + " | ".join(cells)
                  + f" | {'yes' if idle['plan'] == busy['plan'] else 'no'} | {' / '.join(clock)} |", flush=True)


def worker(solver: str, limit_s: float) -> None:
    for shape in BACKEND_SHAPES:
        print(json.dumps(run(shape, 0, solver, limit_s)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["gap", "backends", "heldout", "load"])
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--worker", choices=ilp.SOLVERS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.time_limit)
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"## Exact solvers: {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load:.1f} at start; `python -m bench.ilp " + " ".join(sys.argv[1:]) + "`")
    if a.only in (None, "gap"):
        gap_section(a.time_limit, a.seeds)
    if a.only in (None, "backends"):
        backend_section(a.time_limit)
    if a.only in (None, "heldout"):
        heldout_section(a.time_limit)
    if a.only in (None, "load"):
        load_section(a.time_limit)


if __name__ == "__main__":
    main()
