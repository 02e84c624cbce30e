"""The wake-up of a blocking synchronisation when a CPU node's ranks outnumber its cores (CPU profiles).

A TP all-reduce (or a pipeline hand-off) is a meeting: the rank that arrives first sleeps in gloo until its peer
arrives. With two ranks per core its core is running another rank, so it waits for the scheduler to give it one back, a
delay the collective table (the collectives alone) and the compute share (compute alone) both miss (at one rank per core
the 2-core Xeon still measured 0.67-1.38 ms a meeting, bench.meetings: gloo's threads that move the data want a core
too; costmodel.timing.sync_wake_s_of prices both at this constant). Measured here as it runs: 2c ranks pinned to c cores
(c = min(cores, 2)), in pairs that are gloo subgroups as the replay's TP groups are; each round times, back to back, 12
compute segments of about 5 ms alone, 12 four-byte all-reduces in the pair alone, and the segments each followed by the
all-reduce, every time the slowest rank's; the wake-up is (both - segments - all-reduces) / 12, the median over 36
rounds (0 at the least). One round's value scatters by about 1.5 ms on the 2-core Xeon: the median of 9, as first taken,
moved between 0.36 and 2.27 ms from one profile to the next (docs/BENCHMARKS.md, nineteenth session).

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m profiles.measure.wake --out wake.json

The delay grows with the time a peer computes between meetings (the scheduler's slice: in a scratch probe on a 2-core
Xeon, doubling the segments took it from 1.5 to 2.4 ms; this worker at segments of 2.5, 5, 10 and 20 ms of one core's
work, 15 rounds each, 1.55, 1.28, 1.59 and 1.98 ms, docs/BENCHMARKS.md), so one constant at 5 ms is an
approximation."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEGMENT_S = 5e-3  # compute between two meetings, about a tiny layer's on one core
SYNCS = 12  # meetings per timed run
ROUNDS = 36
MAX_CORES = 2  # cores the pairs run on (2x as many ranks): a large host is sampled, not filled
SOURCE = (f"measured: profiles.measure.wake, 2c gloo ranks pinned to c = min(cores, {MAX_CORES}) cores in pairs, "
          f"{SYNCS} compute segments of {SEGMENT_S * 1e3:g} ms each followed by a 4-byte all-reduce in the pair, "
          f"against the segments alone and the all-reduces alone; the extra time per meeting, the median of "
          f"{ROUNDS} rounds")


def wake_s(both_s: list[float], segments_s: list[float], syncs_s: list[float], syncs: int = SYNCS) -> float:
    """The wake-up per meeting from rounds of paired timings: the median over rounds of (both - segments - syncs) /
    syncs, and no less than 0 (noise can dip below)."""
    return max(0.0, statistics.median((b - c - a) / syncs for b, c, a in zip(both_s, segments_s, syncs_s)))


def product_s(a, b) -> float:
    """Seconds of one `a @ b` on one core alone: timed on rank 0 while the others wait in the broadcast (using no
    CPU), the same value on every rank (work-sized compute segments for meetings, here and in bench.meetings)."""
    import torch
    import torch.distributed as dist

    one = torch.zeros(1, dtype=torch.float64)
    if dist.get_rank() == 0:
        for _ in range(10):
            torch.mm(a, b)
        t0 = time.perf_counter()
        for _ in range(100):
            torch.mm(a, b)
        one += (time.perf_counter() - t0) / 100
    dist.broadcast(one, 0)
    return float(one)


def _worker(out: Path, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    from profiles.measure import collector_paused

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = sorted(os.sched_getaffinity(0))[:max(1, world // 2)]
    os.sched_setaffinity(0, cores)
    pairs = [dist.new_group([2 * j, 2 * j + 1]) for j in range(world // 2)]  # every rank creates every group
    pair = pairs[rank // 2] if rank < 2 * len(pairs) else None
    a, b, flag = torch.randn(256, 256), torch.randn(256, 256), torch.zeros(1)
    reps = max(1, round(SEGMENT_S / product_s(a, b)))  # SEGMENT_S of one core's work

    def run(compute: bool, meet: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(SYNCS):
            if compute:
                for _ in range(reps):
                    torch.mm(a, b)
            if meet and pair is not None:
                dist.all_reduce(flag, group=pair)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a run lasts until its slowest rank is done
        return float(t)

    both, segments, syncs = [], [], []
    with collector_paused():
        for _ in range(rounds):
            segments.append(run(True, False))
            syncs.append(run(False, True))
            both.append(run(True, True))
    if rank == 0:
        out.write_text(json.dumps({"wake_s": wake_s(both, segments, syncs), "cores": len(cores), "ranks": world,
                                   "both_s": both, "segments_s": segments, "syncs_s": syncs}) + "\n")
    dist.destroy_process_group()


def measure_wake_s(cores: int, rounds: int = ROUNDS) -> float:
    """Launch the worker on 2·min(cores, MAX_CORES) ranks under torchrun and return its wake-up in seconds."""
    from profiles.measure import MeasureError, worker_env

    c = max(1, min(int(cores), MAX_CORES))
    with tempfile.TemporaryDirectory(prefix="meshplan-wake-") as tmp:
        out = Path(tmp) / "wake.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(2 * c), "-m",
               "profiles.measure.wake", "--out", str(out), "--rounds", str(rounds)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=600)
        if res.returncode != 0 or not out.exists():
            last = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise MeasureError(f"wake-up worker failed (exit {res.returncode}): {last}")
        return float(json.loads(out.read_text())["wake_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch.distributed.run ... -m profiles.measure.wake",
                                 description="Wake-up of a blocking meeting on shared cores (run under torchrun).")
    ap.add_argument("--out", required=True, type=Path, help="JSON file rank 0 writes")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        print("error: run this worker under torchrun (python -m torch.distributed.run ...)", file=sys.stderr)
        return 2
    _worker(args.out, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
