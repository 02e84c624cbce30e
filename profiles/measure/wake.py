"""The wake-up of a blocking meeting when a CPU node's ranks leave no core to spare (CPU profiles).

A pipeline hand-off, a context-parallel ring wait or a TP all-reduce is a meeting: the rank that arrives first sleeps
in gloo until its peer's data is there, and then waits for a core to run on (with two ranks a core, the other rank's
time slice; with one rank a core, gloo's threads that move the data want a core too). The collective table (transfers
alone) and the compute share (compute alone) both miss it. Measured here as the executor meets: ranks pinned to c
cores (c = min(cores, 2)) in pairs, each pair exchanging one message with batched isend/irecv as the ring and the
pipeline do; each round times, back to back, 12 compute segments of about 5 ms of one core's work alone, 12 exchanges
alone (kept in the worker's output, for the record), and the segments each followed by an exchange, every time the
slowest rank's. A meeting costs (both - segments) / 12 beyond the compute, the median over 36 rounds; the profile
keeps what it costs beyond the collective table's send/recv of the same message (what the cost model already charges
a transfer), at two ranks a core (`cores_shared_wake_s`) and, where c >= 2, at one (`cores_busy_wake_s`);
costmodel.timing.sync_wake_s_of prices them. The first worker met with 4-byte all-reduces and subtracted them timed
alone on the same shared cores, which took out part of the wake-up itself (idle pairs wake each other too): it priced
the 2-core EPYC's meetings at 1.0-1.3 ms where its replays paid about 3 (docs/BENCHMARKS.md, twenty-first session).

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m profiles.measure.wake --out wake.json

The meeting grows with the compute before it (the scheduler's slice: on the 2-core EPYC, bench.meetings with 64 KiB
after 2, 5, 10 and 20 ms of one core's work put it at 1.98, 3.30, 3.64 and 4.14 ms with 4 ranks, docs/BENCHMARKS.md),
so one value at 5 ms is an approximation. At two ranks a core it hardly moves with the message (4 B to 1 MiB alike);
at one rank a core it scatters between 0.9 and 1.9 ms beyond the exchange over the same sizes."""

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
MAX_CORES = 2  # cores the pairs run on: a large host is sampled, not filled
MESSAGE_BYTES = 64 << 10  # each way per exchange: a ring step's K/V of a few hundred tokens of a small model
WAKE_CONSTANTS = {2: "cores_shared_wake_s", 1: "cores_busy_wake_s"}  # ranks a core -> the profile constant
SOURCE = (f"measured: profiles.measure.wake, gloo ranks pinned to c = min(cores, {MAX_CORES}) cores in pairs, "
          f"{SYNCS} compute segments of {SEGMENT_S * 1e3:g} ms each followed by a {MESSAGE_BYTES >> 10} KiB "
          f"exchange in the pair (batched isend/irecv), against the segments alone; the extra time per meeting, the "
          f"median of {ROUNDS} rounds, less the collective table's send/recv of the message")


def meeting_s(both_s: list[float], segments_s: list[float], syncs: int = SYNCS) -> float:
    """What one meeting costs beyond the compute, from rounds of paired timings: the median over rounds of (both -
    segments) / syncs, and no less than 0 (noise can dip below)."""
    return max(0.0, statistics.median((b - c) / syncs for b, c in zip(both_s, segments_s)))


def wake_constants(meetings_s: dict[int, float], transfer_s: float) -> dict[str, dict]:
    """Profile constants from the meetings measured per ranks a core: each meeting less the transfer the collective
    table prices for its message (`transfer_s`), no less than 0."""
    return {WAKE_CONSTANTS[k]: {"value": max(0.0, m - transfer_s), "unit": "s",
                                "source": f"{SOURCE}; {k} rank(s) a core"}
            for k, m in sorted(meetings_s.items(), reverse=True)}


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


def _worker(out: Path, rounds: int, per_core: int) -> None:
    import torch
    import torch.distributed as dist

    from profiles.measure import collector_paused

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = sorted(os.sched_getaffinity(0))[:max(1, world // per_core)]
    os.sched_setaffinity(0, cores)
    partner = rank ^ 1 if (rank ^ 1) < world else None
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    send, recv = torch.randn(MESSAGE_BYTES // 4), torch.empty(MESSAGE_BYTES // 4)
    reps = max(1, round(SEGMENT_S / product_s(a, b)))  # SEGMENT_S of one core's work

    def run(compute: bool, meet: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(SYNCS):
            if compute:
                for _ in range(reps):
                    torch.mm(a, b)
            if meet and partner is not None:
                for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, partner),
                                                 dist.P2POp(dist.irecv, recv, partner)]):
                    w.wait()
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
        out.write_text(json.dumps({"meeting_s": meeting_s(both, segments), "cores": len(cores), "ranks": world,
                                   "bytes": MESSAGE_BYTES, "both_s": both, "segments_s": segments,
                                   "exchanges_s": syncs}) + "\n")
    dist.destroy_process_group()


def measure_meetings_s(cores: int, rounds: int = ROUNDS) -> dict[int, float]:
    """Ranks a core -> what a meeting costs beyond the compute, in seconds: the worker under torchrun on 2c ranks
    and, where c = min(cores, MAX_CORES) >= 2, on c (one pair needs two ranks)."""
    from profiles.measure import MeasureError, worker_env

    c = max(1, min(int(cores), MAX_CORES))
    out_s = {}
    for per_core in (2, 1) if c >= 2 else (2,):
        with tempfile.TemporaryDirectory(prefix="meshplan-wake-") as tmp:
            out = Path(tmp) / "wake.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(per_core * c), "-m", "profiles.measure.wake", "--out", str(out), "--rounds", str(rounds),
                   "--ranks-per-core", str(per_core)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=600)
            if res.returncode != 0 or not out.exists():
                last = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
                raise MeasureError(f"wake-up worker failed (exit {res.returncode}): {last}")
            out_s[per_core] = float(json.loads(out.read_text())["meeting_s"])
    return out_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch.distributed.run ... -m profiles.measure.wake",
                                 description="What a blocking meeting costs on busy cores (run under torchrun).")
    ap.add_argument("--out", required=True, type=Path, help="JSON file rank 0 writes")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--ranks-per-core", type=int, default=2, choices=(1, 2))
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        print("error: run this worker under torchrun (python -m torch.distributed.run ...)", file=sys.stderr)
        return 2
    _worker(args.out, args.rounds, args.ranks_per_core)
    return 0


if __name__ == "__main__":
    sys.exit(main())
