"""The wake-up of a blocking meeting when a CPU node's ranks leave no core to spare (CPU profiles).

A pipeline hand-off, a context-parallel ring wait or a TP all-reduce is a meeting: the rank that arrives first sleeps
in gloo until its peer's data is there, and then waits for a core to run on (with two ranks a core, the other rank's
time slice; with one rank a core, gloo's threads that move the data want a core too). The collective table (transfers
alone) and the compute share (compute alone) both miss it. Measured here as the executor meets: ranks pinned to c
cores (c = min(cores, 2)) in pairs, each pair exchanging one message with batched isend/irecv as the ring and the
pipeline do. The wait grows with the compute before the meeting and levels off (the scheduler's slice: on the 2-core
EPYC, bench.meetings with 64 KiB after 2, 5, 10 and 20 ms of one core's work put it at 1.98, 3.30, 3.64 and 4.14 ms
with 4 ranks, docs/BENCHMARKS.md), so it is measured after a short and a long segment (SEGMENTS_S). Each round times,
back to back per segment length, n compute segments alone (n = SPAN_S / segment), n exchanges alone (kept in the
worker's output, for the record), and the segments each followed by an exchange, every time the slowest rank's. A
meeting costs (both - segments) / n beyond the compute, the median over the rounds; less the collective table's
send/recv of the same message (what the cost model already charges a transfer), the two points give
w(t) = plateau · t / (t + half) (fit_wake), kept per ranks a core: at two (`cores_shared_wake_s`,
`cores_shared_wake_half_s`) and, where c >= 2, at one (`cores_busy_wake_s`, `cores_busy_wake_half_s`).
costmodel.timing.sync_wake_of prices each meeting at the compute before it. The first worker met with 4-byte
all-reduces and subtracted them timed alone on the same shared cores, which took out part of the wake-up itself (idle
pairs wake each other too): it priced the 2-core EPYC's meetings at 1.0-1.3 ms where its replays paid about 3
(docs/BENCHMARKS.md, twenty-first session); the second timed one segment length (5 ms) and priced every meeting at it.

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m profiles.measure.wake --out wake.json

At two ranks a core the meeting hardly moves with the message (4 B to 1 MiB alike); at one rank a core it scatters
between 0.9 and 1.9 ms beyond the exchange over the same sizes."""

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

SEGMENTS_S = (2e-3, 20e-3)  # compute before a meeting: about a tiny layer's GEMMs, and a long ring step's attention
SPAN_S = 80e-3  # compute per timed run: n = SPAN_S / segment meetings (40 short, 4 long)
# rounds of the worker: with 24 the medians moved between runs by 0.65-1.64 ms (one rank a core, 2 ms segments) and
# 3.1-5.0 ms (two a core, 20 ms), and the fitted one-a-core plateau of seven fidelity profiles by 0.7-2.2 ms; with 72,
# by 1.31-1.43 and 3.67-3.98 ms (2-core EPYC, docs/BENCHMARKS.md twenty-fourth session), 92 s instead of 39
ROUNDS = 72
MAX_CORES = 2  # cores the pairs run on: a large host is sampled, not filled
MESSAGE_BYTES = 64 << 10  # each way per exchange: a ring step's K/V of a few hundred tokens of a small model
WAKE_CONSTANTS = {2: "cores_shared_wake_s", 1: "cores_busy_wake_s"}  # ranks a core -> the plateau's constant
SOURCE = (f"measured: profiles.measure.wake, gloo ranks pinned to c = min(cores, {MAX_CORES}) cores in pairs, "
          f"compute segments of {' and '.join(f'{t * 1e3:g}' for t in SEGMENTS_S)} ms ({SPAN_S * 1e3:g} ms a run) "
          f"each followed by a {MESSAGE_BYTES >> 10} KiB exchange in the pair (batched isend/irecv), against the "
          f"segments alone; the extra time per meeting, the median of {ROUNDS} rounds, less the collective table's "
          "send/recv of the message; fit_wake's plateau · t / (t + half) through the two")


def syncs_of(segment_s: float) -> int:
    """Meetings per timed run after segments of `segment_s`: SPAN_S of compute, at least 4."""
    return max(4, round(SPAN_S / segment_s))


def meeting_s(both_s: list[float], segments_s: list[float], syncs: int) -> float:
    """What one meeting costs beyond the compute, from rounds of paired timings: the median over rounds of (both -
    segments) / syncs, and no less than 0 (noise can dip below)."""
    return max(0.0, statistics.median((b - c) / syncs for b, c in zip(both_s, segments_s)))


def fit_wake(short: tuple[float, float], long: tuple[float, float]) -> tuple[float, float]:
    """(plateau_s, half_s) of w(t) = plateau · t / (t + half) through two (segment_s, wake_s) points, short < long:
    with r = w_short / w_long, half = t_s · t_l · (1 - r) / (r · t_l - t_s), at most t_l (a short wake near 0 would
    make the curve a line through the origin: it stays a curve that levels off), and plateau = w_long · (t_l + half)
    / t_l. A wake no larger after the long segment than after the short one levels off at once: half 0, the plateau
    their mean."""
    (ts, ws), (tl, wl) = short, long
    if wl <= ws:
        return (ws + wl) / 2.0, 0.0
    r = ws / wl
    half = tl if r * tl <= ts else min(tl, ts * tl * (1.0 - r) / (r * tl - ts))
    return wl * (tl + half) / tl, half


def wake_constants(meetings_s: dict[int, dict[float, float]], transfer_s: float) -> dict[str, dict]:
    """Profile constants from the meetings measured per ranks a core and segment length: each meeting less the
    transfer the collective table prices for its message (`transfer_s`), no less than 0; fit_wake's plateau and half
    through the shortest and the longest segment."""
    out = {}
    for k, by_seg in sorted(meetings_s.items(), reverse=True):
        pts = sorted((t, max(0.0, m - transfer_s)) for t, m in by_seg.items())
        plateau, half = fit_wake(pts[0], pts[-1])
        seen = ", ".join(f"{w * 1e3:.2f} ms after {t * 1e3:g} ms" for t, w in pts)
        src = f"{SOURCE}; {k} rank(s) a core: {seen}"
        out[WAKE_CONSTANTS[k]] = {"value": plateau, "unit": "s", "source": src}
        out[WAKE_CONSTANTS[k].replace("_wake_s", "_wake_half_s")] = {"value": half, "unit": "s", "source": src}
    return out


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
    one = product_s(a, b)
    reps = {t: max(1, round(t / one)) for t in SEGMENTS_S}  # each segment: t of one core's work

    def run(segment_s: float, compute: bool, meet: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(syncs_of(segment_s)):
            if compute:
                for _ in range(reps[segment_s]):
                    torch.mm(a, b)
            if meet and partner is not None:
                for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, partner),
                                                 dist.P2POp(dist.irecv, recv, partner)]):
                    w.wait()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a run lasts until its slowest rank is done
        return float(t)

    runs = {t: {"both_s": [], "segments_s": [], "exchanges_s": []} for t in SEGMENTS_S}
    with collector_paused():
        for _ in range(rounds):
            for t, r in runs.items():
                r["segments_s"].append(run(t, True, False))
                r["exchanges_s"].append(run(t, False, True))
                r["both_s"].append(run(t, True, True))
    if rank == 0:
        meetings = {str(t): meeting_s(r["both_s"], r["segments_s"], syncs_of(t)) for t, r in runs.items()}
        out.write_text(json.dumps({"meetings_s": meetings, "cores": len(cores), "ranks": world,
                                   "bytes": MESSAGE_BYTES, "runs": {str(t): r for t, r in runs.items()}}) + "\n")
    dist.destroy_process_group()


def measure_meetings_s(cores: int, rounds: int = ROUNDS) -> dict[int, dict[float, float]]:
    """Ranks a core -> segment length (s) -> what a meeting after it costs beyond the compute, in seconds: the
    worker under torchrun on 2c ranks and, where c = min(cores, MAX_CORES) >= 2, on c (one pair needs two ranks)."""
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
            out_s[per_core] = {float(t): float(m) for t, m in json.loads(out.read_text())["meetings_s"].items()}
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
