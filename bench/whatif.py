"""Time a 100-point what-if sweep (docs/BENCHMARKS.md, "What-if sweeps"); prints figures, never fails on a time.

Default grid: llama-7b on dgx-h100, GPUs 256..4096 × context 128K..2M × github-like, byted-like × static,
hdp = 100 points at 32M tokens per step, 2 sampled steps per point, a fresh journal each run.

    python bench/whatif.py [--workers 2] [--tokens-per-step 32M] [--strategies static,hdp] [--profile]

--profile runs serially under cProfile and prints where planning time goes (strategy, finalize,
cost-model lookups, simulation, validation).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.studies import SweepSpec, machine_description, run_sweep  # noqa: E402
from planner.workload import parse_tokens  # noqa: E402

# Functions whose cumulative time explains a sweep (the rest is bookkeeping).
HOTSPOTS = ("plan_step", "plan_balance", "plan_naive", "finalize", "unit_cost", "simulate_step", "validate",
            "make_batches", "build_cost_model", "summarize")


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokens-per-step", default="32M")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gpus", default="256,512,1024,2048,4096")
    ap.add_argument("--context", default="128K,256K,512K,1M,2M")
    ap.add_argument("--lengths", default="github-like,byted-like")
    ap.add_argument("--strategies", default="static,hdp")
    ap.add_argument("--profile", action="store_true", help="serial run under cProfile; print the hot spots")
    a = ap.parse_args()
    spec = SweepSpec(gpus=tuple(parse_tokens(g) for g in a.gpus.split(",")),
                     contexts_tokens=tuple(parse_tokens(c) for c in a.context.split(",")),
                     lengths=tuple(a.lengths.split(",")), strategies=tuple(a.strategies.split(",")), steps=a.steps,
                     tokens_per_step=parse_tokens(a.tokens_per_step))
    points = spec.points()
    workers = 1 if a.profile else a.workers
    with tempfile.TemporaryDirectory() as d:
        prof = cProfile.Profile() if a.profile else None
        cpu0 = _cpu_s()
        t0 = time.perf_counter()
        done = itertools.count(1)

        def on_point(point, row) -> None:  # one line per point on stderr
            print(f"{next(done)}/{len(points)} {point.label}", file=sys.stderr)

        if prof:
            prof.enable()
        res = run_sweep(points, Path(d) / "sweep.csv", workers=workers, on_point=on_point)
        if prof:
            prof.disable()
        wall = time.perf_counter() - t0
        cpu = _cpu_s() - cpu0
    df = res.table
    print(f"machine: {machine_description()}")
    print(f"points: {len(points)} ({int(df['feasible'].sum())} feasible), tokens/step {a.tokens_per_step}, "
          f"steps/point {a.steps}, workers {workers}")
    print(f"wall time: {wall:.1f} s ({wall / len(points):.2f} s/point); CPU time {cpu:.1f} s (this process and its "
          f"workers); load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(other jobs on the machine stretch the wall time)")
    plan_s = df.groupby("strategy")["planning_s"].agg(["sum", "mean", "max"])
    print("strategy planning time inside make_plan (s, summed over points; static also runs once per config "
          "for speedups):")
    print(plan_s.to_string(float_format=lambda v: f"{v:.2f}"))
    by_gpus = df.pivot_table(index="gpus", columns="strategy", values="planning_s", aggfunc="mean")
    print("mean planning seconds per point by GPU count:")
    print(by_gpus.to_string(float_format=lambda v: f"{v:.2f}"))
    if prof:
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        total = sum(v[3] for v in st.stats.values() if v[3] > 0) and max(v[3] for v in st.stats.values())
        print(f"hot spots (cumulative s of {total:.1f} s, profiler overhead included):")
        for (file, line, fn), (cc, nc, tt, ct, callers) in sorted(st.stats.items(), key=lambda kv: -kv[1][3]):
            if fn in HOTSPOTS:
                print(f"  {fn:18s} {ct:8.2f} s  {nc:9d} calls  {Path(file).parent.name}/{Path(file).name}:{line}")


if __name__ == "__main__":
    main()
