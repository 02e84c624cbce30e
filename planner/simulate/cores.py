"""Ranks that share a CPU node's cores, in the flat schedule (pp = 1): processor sharing.

A unit is priced with every rank of its node computing (`CostModel.compute_share`), but a rank that waits for a
shared unit's other members, or has run all of its units, leaves its core to the others: the node's busy ranks then
compute at `CostModel.share_at(busy)`. So the schedule is an event simulation: between two unit ends the running
units and with them each node's busy ranks (tp per HDP rank) are fixed, and a unit advances at 1 / its duration at
that load, the compute part of its time scaled by share_at(busy) / compute_share and its exposed transfers not
(a unit's members run in lockstep: at the load of its busiest node). On one 2-core host a 2-rank unit beside a rank
that ran a 44-token unit and then idled took 97, 103 and 79 ms, in three rounds each interleaved with the same unit
in a 2-rank plan (91, 112 and 97 ms); priced at the 3-rank share it was 113 ms against 74 at the 2-rank one
(docs/BENCHMARKS.md, fifteenth session). GPU profiles and given shares: the plain schedule (flat._run_units)."""

from __future__ import annotations

from collections import deque

import numpy as np

from costmodel.timing import CostModel


def run_shared(ranks: list[tuple[int, ...]], total_s: np.ndarray, compute_s: np.ndarray, hdp: int,
               cm: CostModel) -> tuple[list[float], list[float], list[float]]:
    """(start and end of each unit, when each HDP rank is free at the end) for units in run order (`ranks`: each
    unit's HDP ranks; `total_s` its time with the node's ranks all busy, `compute_s` the part of it that is compute).
    A unit starts once it heads the queue of each of its ranks and they are all free."""
    n = len(ranks)
    mesh, tp, planned = cm.setup.mesh, cm.tp, cm.compute_share
    node = [mesh.domain_of(mesh.global_rank(0, r)) for r in range(hdp)]
    queues: list[deque[int]] = [deque() for _ in range(hdp)]
    for u, rs in enumerate(ranks):
        for r in rs:
            queues[r].append(u)
    starts, ends = [0.0] * n, [0.0] * n
    free = [0.0] * hdp
    idle = [True] * hdp
    left: dict[int, float] = {}  # running unit -> fraction of it still to run
    shares: dict[int, float] = {}  # memo of share_at per busy count
    t, done = 0.0, 0
    while done < n:
        for r in range(hdp):  # start every unit whose ranks are all free and all have it next
            if idle[r] and queues[r]:
                u = queues[r][0]
                if all(idle[m] and queues[m][0] == u for m in ranks[u]):
                    for m in ranks[u]:
                        idle[m] = False
                    starts[u], left[u] = t, 1.0
        if not left:  # nothing can start: the orders disagree (simulate_flat's topological order rules this out)
            raise ValueError("units wait on each other: no rank can start its next unit")
        busy: dict[int, int] = {}
        for u in left:
            for r in ranks[u]:
                busy[node[r]] = busy.get(node[r], 0) + tp
        rate = {}
        for u in left:
            k = max(busy[node[r]] for r in ranks[u])
            if k not in shares:
                shares[k] = cm.share_at(k)
            x = shares[k]
            rate[u] = 1.0 / max(float(total_s[u]) + float(compute_s[u]) * (x / planned - 1.0), 1e-15)
        dt = min(left[u] / rate[u] for u in left)
        t += dt
        for u in list(left):
            left[u] -= rate[u] * dt
            if left[u] <= 1e-12:
                del left[u]
                ends[u] = t
                done += 1
                for r in ranks[u]:
                    queues[r].popleft()
                    idle[r], free[r] = True, t
    return starts, ends, free
