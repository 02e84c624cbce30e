"""Ranks that share a CPU node's cores: processor sharing, in the flat schedule (pp = 1) and in pipelines.

A unit is priced with every rank of its node computing (`CostModel.compute_share`), but a rank that waits for a
shared unit's other members, or has run all of its units, leaves its core to the others: the node's busy ranks then
compute at `CostModel.share_at(busy)`. So the schedule is an event simulation: between two unit ends the running
units and with them each node's busy ranks (tp per HDP rank) are fixed, and a unit advances at 1 / its duration at
that load, the compute part of its time scaled by share_at(busy) / compute_share and its exposed transfers not
(a unit's members run in lockstep: at the load of its busiest node). On one 2-core host a 2-rank unit beside a rank
that ran a 44-token unit and then idled took 97, 103 and 79 ms, in three rounds each interleaved with the same unit
in a 2-rank plan (91, 112 and 97 ms); priced at the 3-rank share it was 113 ms against 74 at the 2-rank one
(docs/BENCHMARKS.md, fifteenth session). A pipeline's ranks wait in its bubbles the same way: on the replay's pp2
plan (4 ranks, 2 cores) the stage prices were 15-72% over the replayed units, median 35% (docs/BENCHMARKS.md,
twenty-third session).
GPU profiles and given shares: the plain schedules (flat._run_units, planner.schedule.run_ops)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import numpy as np

from costmodel.timing import CostModel
from planner.schedule.engine import OpRun, ScheduleError, members_of, partners_of


def run_ops_shared(lists: Mapping[Hashable, list[tuple[Hashable, Any]]], dep: Callable[[Hashable], Hashable | None],
                   duration: Callable[[Hashable], float], compute: Callable[[Hashable], float],
                   transfer: Callable[[Hashable], float], node: Mapping[Hashable, tuple[int, int]], cm: CostModel,
                   pairs: Iterable[tuple[Hashable, Hashable]] = (),
                   late: Callable[[Hashable], float] | None = None) -> list[OpRun]:
    """`planner.schedule.run_ops` in time order, with processor sharing: the same lists, dependencies, transfers and
    rendezvous pairs, but an op's compute runs at the share of its node's busy ranks. `duration(key)` is its time with
    every rank of the node busy, `compute(key)` the part of it that scales with the share; `node[resource]` is (the
    node its ranks sit on, how many ranks it keeps busy: tp). Between two events (an op's end, a transfer's arrival)
    the running ops are fixed, and each advances at 1 / (duration + compute · (share_at(busy) / compute_share − 1)),
    busy the ranks computing on its busiest member's node. A heavy op of a pair that finishes first holds its ranks
    without computing until its light partner ends (it merges the partner's result). Pairs must be ones that meet
    (run_ops reports the broken ones). `late(key)`: what an op's input costs after its ranks' previous op when it
    was sent before they got there (a receive that meets a busy sender: `CostModel.wake_after_s`), against
    `transfer(key)` after the send when they waited for it. Raises ScheduleError on deadlock."""
    members = members_of(lists)
    partner, heavy = partners_of(pairs, members)
    duration, compute = functools.cache(duration), functools.cache(compute)  # asked at every event
    planned = cm.compute_share
    shares: dict[int, float] = {}  # memo of share_at per busy count
    pos = {r: 0 for r in lists}
    idle = {r: True for r in lists}
    free = {r: 0.0 for r in lists}  # when each list's last op ended
    done: dict[Hashable, float] = {}
    left: dict[Hashable, float] = {}  # computing op -> fraction of it still to run
    holding: set = set()  # heavy ops whose own work is done, waiting for their partner
    began: dict[Hashable, float] = {}
    runs: list[OpRun] = []
    t, remaining = 0.0, len(members)
    eps = 1e-12

    def ready_at(key) -> float | None:
        """When `key` could start (None: not at the head of all its idle lists, or its dependency is pending)."""
        mem = members[key]
        if any(not idle[m] or pos[m] >= len(lists[m]) or lists[m][pos[m]][0] != key for m in mem):
            return None
        d = dep(key)
        if d is None:
            return 0.0
        if d not in done:
            return None
        return max(done[d] + transfer(key), max(free[m] for m in mem) + late(key) if late is not None else 0.0)

    def finish(key) -> None:
        nonlocal remaining
        done[key] = t
        for m in members[key]:
            idle[m], free[m] = True, t
            pos[m] += 1
        runs.append(OpRun(key, tuple(members[key]), began[key], t))
        remaining -= 1

    def complete(key) -> None:
        """`key`'s work is done: it ends, unless it is a heavy op whose light partner still runs (it holds its ranks
        until then); a light op's end also ends its holding partner."""
        q = partner.get(key)
        if key in heavy and q not in done:
            holding.add(key)
            return
        finish(key)
        if q in holding:
            holding.discard(q)
            finish(q)

    while remaining:
        arrival = float("inf")
        launched = True
        while launched:  # start every op that can start now; a zero-length one ends at once
            launched = False
            for res in lists:
                if not idle[res] or pos[res] >= len(lists[res]):
                    continue
                key = lists[res][pos[res]][0]
                keys = (key,) if key not in partner else (key, partner[key])
                at = [ready_at(k) for k in keys]
                if any(a is None for a in at):
                    continue
                if max(at) > t + eps:
                    arrival = min(arrival, max(at))
                    continue
                for k in keys:
                    began[k] = t
                    for m in members[k]:
                        idle[m] = False
                    left[k] = 1.0
                for k in keys:
                    if duration(k) <= 0.0:
                        del left[k]
                        complete(k)
                launched = True
        if not remaining:
            break
        if not left:
            if holding or arrival == float("inf"):
                stuck = [lists[r][pos[r]][0] for r in lists if pos[r] < len(lists[r])][:3]
                raise ScheduleError(f"pipeline schedule deadlocks (waiting ops: {stuck})")
            t = arrival
            continue
        busy: dict[int, int] = {}
        for k in left:
            for m in members[k]:
                n, ranks = node[m]
                busy[n] = busy.get(n, 0) + ranks
        rate = {}
        for k in left:
            b = max(busy[node[m][0]] for m in members[k])
            if b not in shares:
                shares[b] = cm.share_at(b)
            rate[k] = 1.0 / max(duration(k) + compute(k) * (shares[b] / planned - 1.0), 1e-15)
        dt = min(min(left[k] / rate[k] for k in left), arrival - t)
        t += dt
        for k in list(left):
            left[k] -= rate[k] * dt
            if left[k] <= 1e-12:
                del left[k]
                complete(k)
    return runs


def run_shared(ranks: list[tuple[int, ...]], total_s: np.ndarray, compute_s: np.ndarray, hdp: int,
               cm: CostModel) -> tuple[list[float], list[float], list[float]]:
    """(start and end of each unit, when each HDP rank is free at the end) for units in run order (`ranks`: each
    unit's HDP ranks; `total_s` its time with the node's ranks all busy, `compute_s` the part of it that is compute).
    A unit starts once it heads the queue of each of its ranks and they are all free."""
    lists: dict[int, list[tuple[int, None]]] = {r: [] for r in range(hdp)}
    for u, rs in enumerate(ranks):
        for r in rs:
            lists[r].append((u, None))
    mesh = cm.setup.mesh
    node = {r: (mesh.domain_of(mesh.global_rank(0, r)), cm.tp) for r in range(hdp)}
    runs = run_ops_shared(lists, lambda u: None, lambda u: float(total_s[u]), lambda u: float(compute_s[u]),
                          lambda u: 0.0, node, cm)
    starts, ends, free = [0.0] * len(ranks), [0.0] * len(ranks), [0.0] * hdp
    for run in runs:
        starts[run.key], ends[run.key] = run.start_s, run.end_s
        for r in run.resources:
            free[r] = max(free[r], run.end_s)
    return starts, ends, free
