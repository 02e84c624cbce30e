"""Rounds for ZeRO-3 plans: every HDP rank of a stage joins each round's per-layer collectives, and round r of a
rank is the r-th unit of its order (planner.simulate.rounds), so a unit shared by several ranks must stand at the
same position in every member's order. `round_layouts` turns a strategy's drafts into such layouts, sort_key =
round (finalize numbers units by it, so every rank still runs increasing ids):

- keep-ranks: each unit keeps the strategy's ranks; shared units, longest first, go to the earliest round all
  members reach, a lagging member filling the rounds before it with its own one-rank units (longest first);
  impossible (None) when a member has too few of them.
- relayout (FlexSP's round packing, REFERENCE §4): units, longest first, go to the first round with enough free
  ranks, so each round holds units of similar length and ranks get equal unit counts; rounds run fullest first and
  each round lays its units out on contiguous ranks from rank 0 (largest degree first), so a rank idle in a round
  stays idle in every later one. Units keep their pieces, degree and offload ratio, only their ranks move.
- refill (hdp only: finalize(repack=True)): relayout of the units that must stay whole, then the documents of the
  one-rank bins re-packed into each round's free ranks up to the round's longest unit, the rest into new rounds,
  so ranks get equal unit counts and bins match their round's length instead of a per-rank total.
- redegree (hdp only), before relayout or refill: one-document units longer than a target moved to the fewest
  ranks on which they take at most the target, so the long units of a round end together.

finalize simulates every layout and keeps the fastest that fits (a strategy's own plan is never made worse by a
layout it did not need)."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from costmodel.timing import CostModel
from planner.plan import Piece, zigzag_tokens_per_rank
from planner.simulate.step import price_units_of

if TYPE_CHECKING:  # common imports this module
    from planner.strategies.common import Draft

# redegree's targets tried, in units of a C-token document's time on one rank (the longest one-rank unit without
# offload, so the natural length of a round): measured best of 1, 1.5, and the longest one-rank unit (docs/COSTMODEL.md)
REDEGREE_TARGETS = (1.0, 1.5)


def round_layouts(drafts: list[Draft], cm: CostModel, hdp: int, repack: bool = False) -> list[list[Draft]]:
    """The round layouts of `drafts` worth simulating: keep-ranks when it exists, relayout, and with `repack`
    (a strategy free to re-pack its one-rank bins and re-degree its one-document units: hdp) refill, and relayout
    and refill after redegree to each of REDEGREE_TARGETS."""
    ids = list(range(len(drafts)))
    ranks = [tuple(sorted(d.ranks)) for d in drafts]
    times = price_units_of(ids, ranks, [d.pieces for d in drafts], [d.offload_ratio for d in drafts],
                           cm).last.total_s.tolist()
    drafts = [dataclasses.replace(d, ranks=rs) for d, rs in zip(drafts, ranks)]
    kept = keep_ranks_rounds(drafts, times, hdp)
    layouts = ([] if kept is None else [kept]) + [relayout_rounds(drafts, times, hdp)]
    if repack:
        layouts.append(refill_rounds(drafts, times, hdp, cm))
        full = float(price_units_of([0], [(0,)], [[Piece(-1, 0, cm.capacity_tokens)]], [0.0], cm).last.total_s[0])
        for target in REDEGREE_TARGETS:
            d2, t2 = redegree(drafts, times, hdp, cm, target * full)
            if d2 is not drafts:
                layouts += [relayout_rounds(d2, t2, hdp), refill_rounds(d2, t2, hdp, cm)]
    return layouts


def _longest_first(keys: list[int], times: list[float]) -> list[int]:
    return sorted(keys, key=lambda k: -times[k])  # stable: ties keep the strategy's order


def keep_ranks_rounds(drafts: list[Draft], times: list[float], hdp: int) -> list[Draft] | None:
    """Rounds on the strategy's own ranks (see the module docstring); None when a shared unit cannot be aligned."""
    singles: dict[int, deque[int]] = {r: deque() for r in range(hdp)}
    shared = []
    for k in _longest_first(list(range(len(drafts))), times):
        rs = drafts[k].ranks
        if len(rs) > 1:
            shared.append(k)
        else:
            singles[rs[0]].append(k)
    count = [0] * hdp  # rounds each rank has filled
    round_of = [0] * len(drafts)
    for k in shared:
        rs = drafts[k].ranks
        r = max(count[m] for m in rs)
        for m in rs:
            while count[m] < r:
                if not singles[m]:
                    return None
                round_of[singles[m].popleft()] = count[m]
                count[m] += 1
            count[m] = r + 1
        round_of[k] = r
    for m, rest in singles.items():
        for k in rest:
            round_of[k] = count[m]
            count[m] += 1
    return [dataclasses.replace(d, sort_key=float(r)) for d, r in zip(drafts, round_of)]


def relayout_rounds(drafts: list[Draft], times: list[float], hdp: int) -> list[Draft]:
    """FlexSP-style rounds on fresh contiguous ranks (see the module docstring)."""
    return _lay_out(drafts, _pack(list(range(len(drafts))), [len(d.ranks) for d in drafts], times, hdp)[0])


def refill_rounds(drafts: list[Draft], times: list[float], hdp: int, cm: CostModel) -> list[Draft]:
    """relayout for the units that must stay whole (sharded, offloaded or sliced); the documents of the plain
    one-rank bins are then packed afresh, longest first, into the ranks those rounds leave free (first fit: each
    rank's budget is its round's longest unit, and C tokens), and what is left into new rounds, each with the
    longest document left, or an even share of all left, as its budget (first fit decreasing per round): one-rank
    bins sized to their round rather than to a per-rank total. A bin's time: a one-token unit's (the fixed costs)
    + each document's own. A new round's first document always fits, so the loop ends."""
    cap = cm.capacity_tokens
    stay = [len(d.ranks) > 1 or d.offload_ratio > 0 or d.slices > 1 or sum(d.lengths) > cap for d in drafts]
    loose = [p for d, keep in zip(drafts, stay) if not keep for p in d.pieces]
    if not loose:
        return relayout_rounds(drafts, times, hdp)
    whole = [k for k, keep in enumerate(stay) if keep]
    rounds, free = _pack(whole, [len(drafts[k].ranks) for k in whole], times, hdp)
    # a bin's time ~ its fixed part (a one-token unit's: head, per-layer overheads) + each document's own share
    priced = price_units_of(list(range(len(loose) + 1)), [(0,)] * (len(loose) + 1),
                            [[p] for p in loose] + [[dataclasses.replace(loose[0], end=loose[0].start + 1)]],
                            [0.0] * (len(loose) + 1), cm).last.total_s
    base, alone = float(priced[-1]), np.maximum(priced[:-1] - priced[-1], 0.0)
    # slots: the free ranks of every round (budget: the round's longest unit), then new rounds of hdp slots
    slot_round = [i for i in range(len(rounds)) for _ in range(free[i])]
    budget = [max(times[k] for k in rounds[i]) for i in slot_round]
    bins: list[list] = [[] for _ in slot_round]
    load, tokens = np.full(len(slot_round), base), np.zeros(len(slot_round), dtype=np.int64)
    left = np.argsort(-alone, kind="stable").tolist()
    fresh = False
    while left:
        if fresh:  # a new round: its budget the longest document left, or an even share of all that is left
            slot_round += [len(rounds)] * hdp
            rounds.append([])
            budget += [base + max(float(alone[left[0]]), float(alone[left].sum()) / hdp)] * hdp
            bins += [[] for _ in range(hdp)]
            load, tokens = np.concatenate([load, np.full(hdp, base)]), np.concatenate([tokens, np.zeros(hdp, int)])
        room, rest = np.asarray(budget) * (1 + 1e-12), []
        for j in left:
            fits = np.flatnonzero((load + alone[j] <= room) & (tokens + loose[j].tokens <= cap))
            if not len(fits):
                rest.append(j)
                continue
            slot = int(fits[0])  # first fit: the earliest (longest) round with room
            load[slot] += alone[j]
            tokens[slot] += loose[j].tokens
            bins[slot].append(loose[j])
        left, fresh = rest, True
    units = list(drafts)  # the loose bins stay out of every round: only their pieces are placed
    for slot, pieces in enumerate(bins):
        if pieces:
            rounds[slot_round[slot]].append(len(units))
            # a new Draft (common imports this module: replace builds one without importing it)
            units.append(dataclasses.replace(drafts[0], ranks=(0,), pieces=pieces, offload_ratio=0.0, slices=1))
    return _lay_out(units, [r for r in rounds if r])


def redegree(drafts: list[Draft], times: list[float], hdp: int, cm: CostModel,
             target_s: float) -> tuple[list[Draft], list[float]]:
    """Each one-document unit longer than `target_s` (a sharded document, or one offloaded on one rank) moved to
    the fewest ranks, without offload, on which it takes at most target_s (the fastest degree when none does):
    units of one round length instead of degrees balanced for per-rank totals. Returns (drafts, times)."""
    cap = cm.capacity_tokens
    cand: list[tuple[int, int]] = []  # (draft index, degree)
    for k, d in enumerate(drafts):
        if times[k] > target_s and len(d.pieces) == 1 and (len(d.ranks) > 1 or d.offload_ratio > 0):
            s = d.pieces[0].tokens
            lo = max(1, -(-s // cap))
            while zigzag_tokens_per_rank([s], lo) > cap:
                lo += 1
            cand += [(k, g) for g in range(lo, min(hdp, 8 * lo) + 1)]  # 8x the fewest: ample
    if not cand:
        return drafts, times
    priced = price_units_of(list(range(len(cand))), [tuple(range(g)) for _, g in cand],
                            [drafts[k].pieces for k, _ in cand], [0.0] * len(cand), cm).last.total_s.tolist()
    best: dict[int, tuple[int, float]] = {}
    for (k, g), t in zip(cand, priced):
        have = best.get(k)
        if have is None or (have[1] > target_s and t < have[1]):  # the first under target, else the fastest
            best[k] = (g, t)
    drafts, times = list(drafts), list(times)
    for k, (g, t) in best.items():
        if t < times[k]:
            drafts[k] = dataclasses.replace(drafts[k], ranks=tuple(range(g)), offload_ratio=0.0, slices=1)
            times[k] = t
    return drafts, times


def _pack(keys: list[int], degree: list[int], times: list[float], hdp: int) -> tuple[list[list[int]], list[int]]:
    """Units (keys, each of degree[i] ranks), longest first, into the first round with enough free ranks:
    (the rounds' units, their free ranks)."""
    rounds: list[list[int]] = []
    free: list[int] = []
    first_fit: dict[int, int] = {}  # degree -> first round that may have room (free ranks only shrink)
    for i in sorted(range(len(keys)), key=lambda i: -times[keys[i]]):
        d = degree[i]
        r = first_fit.get(d, 0)
        while r < len(rounds) and free[r] < d:
            r += 1
        first_fit[d] = r
        if r == len(rounds):
            rounds.append([])
            free.append(hdp)
        rounds[r].append(keys[i])
        free[r] -= d
    return rounds, free


def _lay_out(units: list[Draft], rounds: list[list[int]]) -> list[Draft]:
    """Rounds run fullest first; each lays its units out on contiguous ranks from rank 0, largest degree first,
    so a rank idle in a round is idle in every later one. sort_key = round; the units of no round are left out."""
    out: list[Draft | None] = [None] * len(units)
    fill = [sum(len(units[k].ranks) for k in r) for r in rounds]
    for r, i in enumerate(sorted(range(len(rounds)), key=lambda i: -fill[i])):  # stable: ties in packing order
        pos = 0
        for k in sorted(rounds[i], key=lambda k: -len(units[k].ranks)):
            d = len(units[k].ranks)
            out[k] = dataclasses.replace(units[k], ranks=tuple(range(pos, pos + d)), sort_key=float(r))
            pos += d
    return [u for u in out if u is not None]
