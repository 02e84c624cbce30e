"""How much slower one rank computes when the other ranks of its node compute too (CPU profiles).

Each torchrun rank of the CPU executor is one process with one torch thread, and the tables are timed that way,
alone. In a run, ranks share the node: with one rank per core they still share the last-level cache and the
memory bandwidth; with more ranks than cores the scheduler time-slices them and every switch costs cached state.
Both are measured here, not assumed: `k` processes each run the same compute probe (a GEMM, a causal attention
call and an elementwise pass, what a layer mixes) at once, and the slowdown is the wall time until the last one ends
over one process's alone, at k = cores (every core busy) and k = 2 × cores (two ranks per core; the time-sharing
alone would give 2), each the minimum over interleaved rounds. The cost model turns them into the compute share
of a rank (costmodel.timing.compute_share_of)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

PROBE_REPEATS = 10  # probe iterations per process (~0.05 s each on one EPYC core)
ROUNDS = 3
MAX_PROBE_CORES = 4  # cores the probe runs on at most (2x as many processes)
SOURCE = (f"measured: profiles.measure.concurrency, one-thread probe processes pinned to c = min(cores, "
          f"{MAX_PROBE_CORES}) cores, c (busy) or 2c (shared) started together; wall time to the last one over one "
          f"alone, each the minimum over {ROUNDS} interleaved rounds")


def _probe(cpus: list[int], repeats: int, ready: "mp.Queue", start: "mp.synchronize.Event",
           out: "mp.Queue") -> None:  # runs in a child process
    import torch
    import torch.nn.functional as F

    from profiles.measure import cold_copies

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(1)
    # operands cycled through copies spanning twice the L3, as the GEMM and memory tables read theirs: a step's
    # working set does not fit the cache either, and ranks then also share the memory bandwidth
    n = cold_copies((2048 * 256 * 3 + 3 * 4 * 1024 * 32 + 2**22) * 4, "cpu")
    sets = [(torch.randn(2048, 256), torch.randn(256, 256), *(torch.randn(1, 4, 1024, 32) for _ in range(3)),
             torch.randn(2**21)) for _ in range(n)]
    calls = [0]

    def once() -> None:
        a, b, q, k, v, x = sets[calls[0] % n]
        calls[0] += 1
        torch.mm(a, b)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.add(x, 1.0)

    once()  # warm-up: lazy init, allocator
    ready.put(True)
    start.wait()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    out.put(time.perf_counter() - t0)


def _wall_s(cpus: list[int], processes: int, repeats: int) -> float:
    """Wall time until the last of `processes` probes started together ends (a step waits for its slowest rank)."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads inherited from the parent
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_probe, args=(cpus, repeats, ready, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:  # every child has imported torch and warmed up: they start together
        ready.get(timeout=600)
    start.set()
    walls = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(walls)


def measure_concurrency(cores: int, repeats: int = PROBE_REPEATS, rounds: int = ROUNDS) -> dict[str, float]:
    """{"cores_busy_slowdown": wall at k = c / alone, "cores_shared_slowdown": wall at k = 2·c / alone} on c =
    min(cores, MAX_PROBE_CORES) of this process's cores (children pinned to them: a large host is sampled, not
    filled with processes), each wall the minimum over `rounds` interleaved rounds of (alone, busy, shared) runs:
    other processes' load only ever adds time, and it would not hit the three alike."""
    cpus = sorted(os.sched_getaffinity(0))[:max(1, min(cores, MAX_PROBE_CORES))]
    c = len(cpus)
    walls: dict[int, list[float]] = {1: [], c: [], 2 * c: []}
    for _ in range(rounds):
        for k in walls:
            walls[k].append(_wall_s(cpus, k, repeats))
    alone = min(walls[1])
    # no less than no contention: 1 with a core each, a fair 2 with two ranks per core (noise can dip below)
    return {"cores_busy_slowdown": max(1.0, min(walls[c]) / alone),
            "cores_shared_slowdown": max(2.0, min(walls[2 * c]) / alone)}
