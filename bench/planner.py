"""Planner benchmark: plan quality against the lower bound, strategy ordering, planning speed, the
ByteScale ablation and step time vs context. Prints markdown tables (figures go to
docs/BENCHMARKS.md and docs/REPRODUCTION.md with the date and machine).

    python -m bench.planner                 # everything (a few minutes on 2 cores; -m: the file name
                                            # would otherwise shadow the planner package)
    python -m bench.planner --only speed    # quality | speed | ablation | context | scale | pipeline
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import numpy as np

from planner.api import PlanRequest, build_cost_model, make_batches
from planner.strategies import HEURISTICS, STRATEGIES, PlanOptions

M = 2**20


def case(**kw) -> PlanRequest:
    base = dict(model="llama-7b", cluster="dgx-h100", gpus=1024, lengths="byted-like", tokens_per_step=32 * M,
                max_context_tokens=2 * M, recompute="auto")
    base.update(kw)
    return PlanRequest(**base)


def run(req: PlanRequest, names, opts: PlanOptions | None = None):
    cm = build_cost_model(req)
    batches = make_batches(req)
    out = {}
    for n in names:
        t0 = time.perf_counter()
        steps = [STRATEGIES[n](b, cm, opts or req.options) for b in batches]
        secs = (time.perf_counter() - t0) / len(batches)
        out[n] = (float(np.mean([s.predicted.step_time_s for s in steps])),
                  float(np.mean([s.predicted.lower_bound_s for s in steps])), secs,
                  max(max(s.predicted.peak_memory_bytes) for s in steps))
    return cm, out


def quality() -> None:
    print("\n### Quality: LLaMA-7B, 1,024 x H100 (analytic), 2M max context, 32M tokens/step, seeds 0-2\n")
    print("| lengths | seed | recompute | C | static (s) | dcp (s) | hdp-naive (s) | hdp (s) | hdp / LB | "
          "dcp / hdp | static / hdp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for lengths in ("byted-like", "github-like"):
        for seed in (0, 1, 2):
            cm, r = run(case(lengths=lengths, seed=seed), list(HEURISTICS))
            h, lb, *_ = r["hdp"]
            print(f"| {lengths} | {seed} | {cm.setup.training.recompute} | {cm.capacity_tokens} | "
                  f"{r['static'][0]:.2f} | {r['dcp'][0]:.2f} | {r['hdp-naive'][0]:.2f} | {h:.2f} | {h / lb:.3f} | "
                  f"{r['dcp'][0] / h:.2f} | {r['static'][0] / h:.2f} |")


def speed() -> None:
    print("\n### Planning speed (one step, one core; seconds of strategy + pricing + simulation)\n")
    print("| HDP ranks | tokens/step | sequences | static | dcp | hdp-naive | hdp |")
    print("|---|---|---|---|---|---|---|")
    for gpus, tokens in ((1024, 32 * M), (8192, 128 * M)):
        req = case(gpus=gpus, tokens_per_step=tokens)
        cm, r = run(req, list(HEURISTICS))
        n = len(make_batches(req)[0].lengths_tokens)
        print(f"| {cm.setup.hdp} | {tokens // M}M | {n} | " + " | ".join(f"{r[k][2]:.2f}" for k in HEURISTICS) + " |")


def ablation() -> None:
    print("\n### ByteScale ablation: LLaMA-7B, 2M, 1,024 GPUs, 32M tokens/step (byted-like, seeds 0-2)\n")
    print("| stage | step time (s) | speedup vs static | ByteScale (paper §8.4) |")
    print("|---|---|---|---|")
    stages = [("static mesh", "static", PlanOptions()),
              ("+ dynamic communication (hdp-naive, no offload)", "hdp-naive", PlanOptions(offload=False)),
              ("+ selective offload (hdp-naive)", "hdp-naive", PlanOptions(offload=True)),
              ("+ balance scheduler (hdp)", "hdp", PlanOptions(offload=True))]
    paper = ["1.00", "1.59", "2.01", "3.69"]
    times = []
    for (label, name, opt), ref in zip(stages, paper):
        ts = [run(case(seed=s), [name], opt)[1][name][0] for s in (0, 1, 2)]
        times.append(float(np.mean(ts)))
        print(f"| {label} | {times[-1]:.2f} | {times[0] / times[-1]:.2f} | {ref} |")


def context() -> None:
    print("\n### Step time vs context: LLaMA-7B, 1,024 GPUs, 32M tokens/step, byted-like (seeds 0-1)\n")
    print("| max context | recompute | static (s) | hdp-naive (s) | hdp (s) | static / hdp |")
    print("|---|---|---|---|---|---|")
    prev = None
    for ctx in (256 * 1024, 512 * 1024, M, 2 * M):
        res = [run(case(max_context_tokens=ctx, seed=s), ["static", "hdp-naive", "hdp"]) for s in (0, 1)]
        cm = res[0][0]
        t = {k: float(np.mean([r[1][k][0] for r in res])) for k in ("static", "hdp-naive", "hdp")}
        print(f"| {ctx // 1024}K | {cm.setup.training.recompute} | {t['static']:.2f} | {t['hdp-naive']:.2f} | "
              f"{t['hdp']:.2f} | {t['static'] / t['hdp']:.2f} |")
        if prev:
            print(f"|   per doubling | | x{t['static'] / prev['static']:.2f} | "
                  f"x{t['hdp-naive'] / prev['hdp-naive']:.2f} | x{t['hdp'] / prev['hdp']:.2f} | |")
        prev = t


def scale() -> None:
    print("\n### Scale sweep: LLaMA-7B, dgx-h100 (analytic), 2M max context, 32K tokens per GPU per step (at least "
          "2M), seed 0\n")
    print("Step time of hdp over each baseline's (< 1: hdp faster) and over the lower bound.\n")
    print("| GPUs | lengths | tokens/step | hdp (s) | / static | / dcp | / hdp-naive | / LB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for gpus in (32, 64, 256, 1024, 4096):
        for lengths in ("byted-like", "github-like", "prolong-like"):
            tokens = max(2 * M, gpus * 32 * 1024)
            _, r = run(case(gpus=gpus, lengths=lengths, tokens_per_step=tokens), list(HEURISTICS))
            h, lb, *_ = r["hdp"]
            ratios = " | ".join(f"{h / r[k][0]:.3f}" for k in ("static", "dcp", "hdp-naive"))
            print(f"| {gpus:,} | {lengths} | {tokens // M}M | {h:.2f} | {ratios} | {h / lb:.3f} |", flush=True)


def pipeline() -> None:
    print("\n### Pipeline parallelism: LLaMA-3-70B, tp 8, 1,024 x H100 (analytic), 32M tokens/step, seed 0\n")
    print("prolong-like is the long-context continual-pretraining mix; hdp peak: simulated, fragmentation reserve "
          "included (HBM 80 GB).\n")
    print("| lengths | pp | max context | recompute | static (s) | dcp (s) | hdp-naive (s) | hdp (s) | hdp / LB | "
          "dcp / hdp | hdp peak (GB) | hdp plan (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lengths in ("github-like", "prolong-like"):
        for pp in (4, 8):
            for ctx in (512 * 1024, 2 * M):
                req = case(model="llama3-70b", tp=8, pp=pp, lengths=lengths, max_context_tokens=ctx)
                cm, r = run(req, list(HEURISTICS))
                h, lb, secs, peak = r["hdp"]
                print(f"| {lengths} | {pp} | {ctx // 1024}K | {cm.setup.training.recompute} | {r['static'][0]:.1f} | "
                      f"{r['dcp'][0]:.1f} | {r['hdp-naive'][0]:.1f} | {h:.1f} | {h / lb:.2f} | {r['dcp'][0] / h:.2f} | "
                      f"{peak / 1e9:.1f} | {secs:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["quality", "speed", "ablation", "context", "scale", "pipeline"])
    a = ap.parse_args()
    print(f"meshplan planner benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    for name, fn in (("quality", quality), ("speed", speed), ("ablation", ablation), ("context", context),
                     ("scale", scale), ("pipeline", pipeline)):
        if a.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
