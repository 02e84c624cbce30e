"""Ranks in lockstep on shared CPU cores: what a synchronisation after every piece of work costs on top of the
cores' sharing (the CPU profile's concurrency slowdowns run their probes free, each to its own end).

    python -m bench.lockstep [--rounds 5] [--calls 20]

Up to 2c probe processes (profiles/measure/probe.py: a GEMM, causal attention and an elementwise pass, operands from
memory) pinned to this process's c cores (at most 2), each running `--calls` probe calls; a group of them waits at a
barrier after each call, as ring-attention steps and TP collectives hold a unit's ranks together. Per configuration:
the wall time until the last process ends over one process alone in the same round, the median over interleaved
rounds (each round runs every configuration back to back: the host's speed moves between rounds on a shared
machine). Figures, never pass/fail."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]


def configurations(c: int) -> dict[str, list[int]]:
    """Name -> group sizes (1: free-running) of c, c + 1 and 2c processes."""
    out = {"1 alone": [1]} | ({f"{c} free": [1] * c, f"{c} in lockstep": [c]} if c > 1 else {})
    for n in sorted({c + 1, 2 * c}):
        out[f"{n} free"] = [1] * n
        if n == 2 * c and c > 1:
            out[f"{n} in {n // c} lockstep groups of {c}"] = [c] * (n // c)
        out[f"{n} in lockstep"] = [n]
    return out


def _worker(cpus: list[int], inbox: "mp.Queue", out: "mp.Queue", barriers: dict) -> None:
    import torch

    from profiles.measure.probe import probe_work

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(1)
    once = probe_work()
    once()  # warm-up
    out.put(None)
    while (msg := inbox.get()) is not None:
        calls, name = msg
        barrier = barriers.get(name)  # inherited at start: multiprocessing barriers cannot travel through queues
        t0 = time.perf_counter()
        for _ in range(calls):
            once()
            if barrier is not None:
                barrier.wait(timeout=600)
        out.put(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    configs = configurations(len(cpus))
    n_max = max(sum(g) for g in configs.values())
    barriers: list[dict] = [{} for _ in range(n_max)]
    for name, groups in configs.items():
        i = 0
        for g in groups:
            b = ctx.Barrier(g) if g > 1 else None
            for _ in range(g):
                if b is not None:
                    barriers[i][name] = b
                i += 1
    out, inboxes = ctx.Queue(), [ctx.Queue() for _ in range(n_max)]
    procs = [ctx.Process(target=_worker, args=(cpus, q, out, b), daemon=True) for q, b in zip(inboxes, barriers)]
    for p in procs:
        p.start()
    for _ in procs:
        out.get(timeout=600)
    walls: dict[str, list[float]] = {name: [] for name in configs}
    load = os.getloadavg()[0]
    for _ in range(a.rounds):
        for name, groups in configs.items():
            n = sum(groups)
            for q in inboxes[:n]:
                q.put((a.calls, name))
            walls[name].append(max(out.get(timeout=600) for _ in range(n)))
    for q in inboxes:
        q.put(None)
    alone = walls["1 alone"]  # each round's own: the host's speed moves between rounds on a shared machine
    print(f"{len(cpus)} cores, {a.calls} probe calls a run ({statistics.median(alone) / a.calls * 1e3:.1f} ms each "
          f"alone), {a.rounds} rounds; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end\n")
    print("| processes | wall / alone (median of the rounds' ratios) | rounds |")
    print("|---|---|---|")
    for name, w in walls.items():
        ratios = [x / y for x, y in zip(w, alone)]
        print(f"| {name} | {statistics.median(ratios):.3f} | {' '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
