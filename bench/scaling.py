"""Planner scaling benchmark (issue 18): hdp's planning time per step from 64 to 16,384 GPUs, with
tokens per step scaled as 32M per 1,024 GPUs (LLaMA-7B, dgx-h100, 2M max context). Prints a markdown
table, the fitted exponent (log-log slope of seconds over GPUs) and the process's peak RSS, which the
largest size sets. Figures go to docs/BENCHMARKS.md with the date and machine.

    python -m bench.scaling                          # 64 ... 16,384 GPUs, byted-like, seed 0
    python -m bench.scaling --gpus 64 256 1024 --lengths github-like --repeat 3
    cp bench/scaling.py /tmp/s.py && PYTHONPATH=/old/tree python /tmp/s.py   # another checkout (before/after;
                                            # run from bench/, bench/planner.py would shadow the planner package)
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from datetime import date

import numpy as np

from planner.api import PlanRequest, build_cost_model, make_batches
from planner.strategies import STRATEGIES

M = 2**20
SIZES_GPUS = (64, 256, 1024, 4096, 16384)
TOKENS_PER_1024_GPUS = 32 * M


def plan_seconds(gpus: int, lengths: str, seed: int, repeat: int, strategy: str = "hdp") -> tuple[int, int, float]:
    """(sequences, units, best-of-`repeat` seconds) of one step: strategy + pricing + simulation."""
    req = PlanRequest(model="llama-7b", cluster="dgx-h100", gpus=gpus, lengths=lengths, seed=seed,
                      tokens_per_step=TOKENS_PER_1024_GPUS * gpus // 1024, max_context_tokens=2 * M,
                      recompute="auto")
    cm = build_cost_model(req)
    batch = make_batches(req)[0]
    secs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step = STRATEGIES[strategy](batch, cm, req.options)
        secs.append(time.perf_counter() - t0)
    return len(batch.lengths_tokens), len(step.units), min(secs)  # min: the machine is shared


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=list(SIZES_GPUS))
    ap.add_argument("--lengths", default="byted-like")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="plan each step this many times, keep the fastest")
    a = ap.parse_args()
    print(f"meshplan planner scaling, {date.today()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, {a.lengths}, seed {a.seed}\n")
    print("| GPUs | tokens/step | sequences | units | hdp planning (s) |")
    print("|---|---|---|---|---|")
    gpus, secs = [], []
    for g in sorted(a.gpus):
        n_seq, n_units, s = plan_seconds(g, a.lengths, a.seed, a.repeat)
        gpus.append(g)
        secs.append(s)
        print(f"| {g:,} | {TOKENS_PER_1024_GPUS * g // 1024 // M}M | {n_seq:,} | {n_units:,} | {s:.3f} |", flush=True)
    if len(gpus) > 1:
        slope = np.polyfit(np.log(gpus), np.log(secs), 1)[0]
        print(f"\nfitted exponent (seconds ~ GPUs^k): k = {slope:.2f}")
    print(f"peak RSS (largest size, {gpus[-1]:,} GPUs): {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
