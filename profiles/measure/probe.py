"""The host probe: one fixed piece of a rank's work (a GEMM, a causal attention call and an elementwise pass, operands
read from memory), timed on one thread. It is how fast this CPU computes at the moment it runs.

A CPU profile records it while its tables are measured (the `host_probe_s` constant), and a CPU replay records it
before and after its steps (trace meta `host_probe`): on a host shared with other tenants, their ratio is how much
slower or faster the machine ran the replay than when it was profiled, which no cost model can predict and which
`meshplan simulate --measured` reports beside the error (planner/simulate/measured.py). The concurrency slowdowns
(concurrency.py) run the same work in several processes at once."""

from __future__ import annotations

import time
from typing import Callable

HOST_PROBE_CALLS = 4  # calls per round (~15 ms each on one EPYC core)
HOST_PROBE_ROUNDS = 3
PROBE_SOURCE = (f"measured: profiles.measure.probe, one thread alone: a 2048x256x256 fp32 GEMM, causal SDPA (4 heads, "
                f"1,024 tokens, head dim 32) and a 2M-element add per call, operands cycled through copies spanning "
                f"twice the L3; seconds per call, the minimum over {HOST_PROBE_ROUNDS} rounds of {HOST_PROBE_CALLS} "
                "calls")


def probe_work() -> Callable[[], None]:
    """One probe call, operands allocated (a step's working set does not fit the cache: the copies span twice the
    L3, as the GEMM and memory tables read theirs, so ranks running it at once also share the memory bandwidth)."""
    import torch
    import torch.nn.functional as F

    from profiles.measure import cold_copies

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

    return once


def host_probe_s(repeats: int = HOST_PROBE_CALLS, rounds: int = HOST_PROBE_ROUNDS) -> float:
    """Seconds per probe call in this process on its current torch threads (one, as a profile and a replay rank
    run): the minimum over rounds, since other processes' load only ever adds time."""
    from profiles.measure import collector_paused

    once = probe_work()
    once()  # warm-up: lazy init, allocator
    best = float("inf")
    with collector_paused():
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(repeats):
                once()
            best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def probe_constant(before_s: float, after_s: float) -> dict:
    """The profile constant `host_probe_s`: the mean of the probe before and after the tables were measured."""
    return {"value": (before_s + after_s) / 2, "unit": "s", "source": (
        f"{PROBE_SOURCE}; the mean of before the tables ({before_s * 1e3:.1f} ms) and after them "
        f"({after_s * 1e3:.1f} ms)")}
