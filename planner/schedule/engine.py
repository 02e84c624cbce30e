"""The discrete-event engine every pipeline simulation runs on: per-resource ordered op lists,
data dependencies with transfer delays, co-scheduled ops shared by several resources, and
rendezvous pairs (SlimPipe's mirror pairing). It knows nothing of what an op is: the op lists come
from `planner.schedule.ops`, the durations from the caller (the plan simulator, `uniform`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable


class ScheduleError(ValueError):
    """A schedule is invalid or deadlocks."""


@dataclass(frozen=True)
class OpRun:
    """One op as the engine ran it."""

    key: Hashable  # the op key (the simulator's (stage, PipeOp))
    resources: tuple[Hashable, ...]  # every list it occupied (one per member pipeline stage)
    start_s: float
    end_s: float


def members_of(lists: dict[Hashable, list[tuple[Hashable, Any]]]) -> dict[Hashable, list[Hashable]]:
    """Each op key's resources: the lists it appears on, in the lists' order."""
    members: dict[Hashable, list[Hashable]] = {}
    for res, lst in lists.items():
        for key, _ in lst:
            members.setdefault(key, []).append(res)
    return members


def partners_of(pairs: Iterable[tuple[Hashable, Hashable]], members: dict[Hashable, list[Hashable]]
                ) -> tuple[dict[Hashable, Hashable], set]:
    """(each paired key's partner, the heavy keys) of the rendezvous pairs whose ops exist, a key in one pair at
    most (the first that names it)."""
    partner: dict[Hashable, Hashable] = {}
    heavy: set = set()
    for hi, lo in pairs:
        if hi in members and lo in members and hi not in partner and lo not in partner and hi != lo:
            partner[hi], partner[lo] = lo, hi
            heavy.add(hi)
    return partner, heavy


def run_ops(lists: dict[Hashable, list[tuple[Hashable, Any]]], dep: Callable[[Hashable], Hashable | None],
            duration: Callable[[Hashable], float], transfer: Callable[[Hashable], float],
            pairs: Iterable[tuple[Hashable, Hashable]] = (), solo: Callable[[Hashable], float] | None = None,
            broken: list | None = None) -> list[OpRun]:
    """Discrete-event engine. `lists[resource]` is that resource's ordered (op key, op); an op key
    that appears on several resources is one co-scheduled op (a shared unit) and starts when it
    heads every one of those lists, its dependency `dep(key)` has finished (+ `transfer(key)`),
    and all of them are free. Raises ScheduleError on deadlock.

    `pairs` (heavy key, light key) is a rendezvous (SlimPipe's mirror pairing exchanges tensors mid-op):
    the two start together once both are ready as above, take `duration`, and the heavy op ends no
    earlier than the light one (it merges the light op's partial result). A pair that cannot meet
    (each waits on the other through the schedule) is broken and its ops run alone for `solo(key)`
    seconds (default `duration`); its heavy key is appended to `broken` when given."""
    members = members_of(lists)
    partner, heavy = partners_of(pairs, members)
    alone: set = set()
    pos = {r: 0 for r in lists}
    free = {r: 0.0 for r in lists}
    done: dict[Hashable, float] = {}
    runs: list[OpRun] = []
    ready_heads = list(lists)
    remaining = len(members)

    def ready_at(key) -> float | None:
        """When `key` could start (None: not at the head of all its lists or its dependency is pending)."""
        mem = members[key]
        if any(pos[m] >= len(lists[m]) or lists[m][pos[m]][0] != key for m in mem):
            return None
        d = dep(key)
        if d is not None and d not in done:
            return None
        return max([done[d] + transfer(key) if d is not None else 0.0] + [free[m] for m in mem])

    def launch(key, start: float, end: float) -> None:
        mem = members[key]
        for m in mem:
            free[m] = end
            pos[m] += 1
        done[key] = end
        runs.append(OpRun(key, tuple(mem), start, end))

    while remaining:
        progressed = False
        waiting: list[tuple[float, Hashable]] = []
        for res in ready_heads:
            i = pos[res]
            if i >= len(lists[res]):
                continue
            key = lists[res][i][0]
            if key in done:
                continue
            t = ready_at(key)
            if t is None:
                continue
            q = partner.get(key)
            if q is None:
                launch(key, t, t + (solo(key) if solo is not None and key in alone else duration(key)))
                remaining -= 1
                progressed = True
                continue
            tq = ready_at(q)
            if tq is None:
                waiting.append((t, key))
                continue
            start = max(t, tq)
            end_k, end_q = start + duration(key), start + duration(q)
            if key in heavy:
                end_k = max(end_k, end_q)
            else:
                end_q = max(end_q, end_k)
            launch(key, start, end_k)
            launch(q, start, end_q)
            remaining -= 2
            progressed = True
        if not progressed:
            if waiting:  # a pair that cannot meet: break the one whose ready op waits longest
                _, key = min(waiting, key=lambda x: x[0])
                q = partner.pop(key)
                del partner[q]
                alone.update((key, q))
                if broken is not None:
                    broken.append(key if key in heavy else q)
                continue
            stuck = [lists[r][pos[r]][0] for r in lists if pos[r] < len(lists[r])][:3]
            raise ScheduleError(f"pipeline schedule deadlocks (waiting ops: {stuck})")
    return runs


