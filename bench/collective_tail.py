"""How gloo's collective times spread on this host: why the profile's collective rows keep the mean of their repeats.

    python -m bench.collective_tail [--nproc 2] [--calls 200]

Runs itself under torchrun (one process per rank, one torch thread each, gloo) and times `--calls` all-reduces of
each size on the world group, after a barrier (as `meshplan profile` times them) and after a barrier and 2 ms of
compute (as a step reaches one); a call's time is the slowest rank's. Prints per size the 10th percentile, median,
90th percentile, mean and max in ms (a step that makes many calls pays the mean), and rank 0's CPU time per call
(its process's, gloo's threads included): time a rank sharing its core takes from the other. Figures, never
pass/fail."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = (4096, 65536, 753_000, 4 << 20)  # bytes; 753 KB: a TP all-reduce of 2,943 tokens of `tiny` in fp32


def _worker(calls: int) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def compute(s: float) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < s:
            torch.mm(a, b)

    if rank == 0:
        print("| bytes | before the call | p10 (ms) | median | p90 | mean | max | mean / median | CPU per call (ms) |\n"
              "|---|---|---|---|---|---|---|---|---|")
    for nbytes in SIZES:
        buf = torch.randn(nbytes // 4)
        for work_s in (0.0, 0.002):
            times, cpu = [], 0.0
            for _ in range(calls):
                dist.barrier()
                compute(work_s)
                c0, t0 = time.process_time(), time.perf_counter()
                dist.all_reduce(buf)
                times.append(time.perf_counter() - t0)
                cpu += time.process_time() - c0  # every thread of the process: gloo's own included
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a call lasts until its slowest rank is done
            x = t.numpy() * 1e3
            if rank == 0:
                what = "a barrier" if work_s == 0 else f"a barrier, {work_s * 1e3:.0f} ms compute"
                p10, med, p90 = np.percentile(x, [10, 50, 90])
                print(f"| {nbytes:,} | {what} | {p10:.3f} | {med:.3f} | {p90:.3f} | {x.mean():.3f} | {x.max():.2f} | "
                      f"{x.mean() / med:.2f} | {cpu / calls * 1e3:.3f} |")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks (processes on this host)")
    ap.add_argument("--calls", type=int, default=200, help="all-reduces per size and case")
    a = ap.parse_args()
    if "RANK" in os.environ:
        _worker(a.calls)
        return
    print(f"{a.nproc} gloo ranks on {len(os.sched_getaffinity(0))} cores, {a.calls} calls per size and case, "
          f"load average {os.getloadavg()[0]:.2f}\n", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
           "-m", "bench.collective_tail", "--calls", str(a.calls)]
    sys.exit(subprocess.run(cmd, env=env, cwd=root).returncode)


if __name__ == "__main__":
    main()
