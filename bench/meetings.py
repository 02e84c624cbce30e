"""What a ring exchange costs ranks that compute on a CPU host's cores, beyond the compute and the transfer alone.

    python -m bench.meetings [--nproc 2] [--segments-ms 2,5,10,20] [--rounds 9] [--kib 371]

Runs itself under torchrun (gloo, one thread a rank) with ranks in pairs (0-1, 2-3, ...), as a 2-member ring's
are. Per segment length (the work of one core alone for that long: 256³ matrix products) and round, back to back,
each the slowest rank's wall over 12 repetitions: the segments alone, the exchanges alone (send to the partner and
receive from it, batch_isend_irecv), each segment followed by an exchange ("serial": a meeting after compute), and
each exchange posted before the segment and waited after it ("overlapped", as the executor's ring steps run). Prints
per segment length the medians over rounds, a repetition's ms: segment, exchange, serial − segment − exchange (the
meeting's wake-up beyond both) and overlapped − segment (what the overlap leaves); and the CPU that threads other than
the ranks' main ones (gloo's) burned a repetition, summed over ranks, in the serial runs: work that takes cores from
the ranks' compute where they share them. profiles.measure.wake measures the profile's constants from the serial runs
(a 64 KiB exchange, less the collective table's send/recv). Figures, never pass/fail."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

REPS = 12
MODES = ("segment", "exchange", "serial", "overlapped")


def _worker(out: Path, segments_ms: list[float], rounds: int, nbytes: int) -> None:
    import torch
    import torch.distributed as dist

    from profiles.measure.wake import product_s

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    partner = rank ^ 1 if (rank ^ 1) < world else None
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    send, recv = torch.randn(max(1, nbytes // 4)), torch.empty(max(1, nbytes // 4))
    one = product_s(a, b)
    reps = {ms: max(1, round(ms * 1e-3 / one)) for ms in segments_ms}

    def exchange():
        if partner is None:
            return []
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, partner), dist.P2POp(dist.irecv, recv, partner)])

    def helper_cpu_s() -> float:
        """This process's CPU less its main thread's: gloo's threads."""
        p, t = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_THREAD)
        return p.ru_utime + p.ru_stime - t.ru_utime - t.ru_stime

    helper: dict[float, list[float]] = {ms: [] for ms in segments_ms}

    def run(mode: str, n: int, ms: float) -> float:
        dist.barrier()
        c0 = helper_cpu_s()
        t0 = time.perf_counter()
        for _ in range(REPS):
            works = exchange() if mode == "overlapped" else []
            if mode != "exchange":
                for _ in range(n):
                    a @ b
            if mode in ("exchange", "serial"):
                works = exchange()
            for w in works:
                w.wait()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        c = torch.tensor([helper_cpu_s() - c0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a run lasts until its slowest rank is done
        dist.all_reduce(c)
        if mode == "serial":
            helper[ms].append(float(c) / REPS)
        return float(t) / REPS

    res = {ms: {m: [] for m in MODES} for ms in segments_ms}
    for _ in range(rounds):
        for ms in segments_ms:
            for m in MODES:
                res[ms][m].append(run(m, reps[ms], ms))
    if rank == 0:
        med = {str(ms): {**{m: statistics.median(v) for m, v in r.items()}, "helper_cpu": statistics.median(helper[ms])}
               for ms, r in res.items()}
        out.write_text(json.dumps({"ranks": world, "bytes": nbytes, "medians_s": med}) + "\n")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks (pairs); on c cores, 2c puts two on each")
    ap.add_argument("--segments-ms", default="2,5,10,20", help="compute between meetings, one core's ms")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--kib", type=float, default=371, help="bytes each way per exchange, KiB")
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # the worker's (under torchrun)
    a = ap.parse_args(argv)
    segments = [float(x) for x in a.segments_ms.split(",")]
    if "RANK" in os.environ:
        _worker(a.out, segments, a.rounds, int(a.kib * 1024))
        return 0
    with tempfile.TemporaryDirectory(prefix="meshplan-meetings-") as tmp:
        out = Path(tmp) / "meetings.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
               "-m", "bench.meetings", "--out", str(out), "--segments-ms", a.segments_ms, "--rounds",
               str(a.rounds), "--kib", str(a.kib)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0 or not out.exists():
            print((res.stderr.strip().splitlines() or ["no output"])[-1], file=sys.stderr)
            return 1
        doc = json.loads(out.read_text())
    print(f"{doc['ranks']} ranks in pairs on {len(os.sched_getaffinity(0))} cores, {doc['bytes']} bytes each way; "
          f"medians over {a.rounds} rounds, ms a repetition")
    print("| segment (one core) | segment | exchange alone | serial: wake-up beyond both | overlapped: beyond the "
          "segment | serial: gloo threads' CPU, all ranks |")
    print("|---|---|---|---|---|---|")
    for ms, m in doc["medians_s"].items():
        seg, xch = m["segment"], m["exchange"]
        print(f"| {float(ms):g} ms | {seg * 1e3:.2f} | {xch * 1e3:.2f} | {(m['serial'] - seg - xch) * 1e3:.2f} | "
              f"{(m['overlapped'] - seg) * 1e3:.2f} | {m['helper_cpu'] * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
