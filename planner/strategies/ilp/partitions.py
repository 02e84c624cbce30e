"""Partitions of the HDP ranks into groups: greedy warm starts, local search, completion, conversion."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from planner.strategies.ilp.model import Items, StepModel, Table, area_bound_s

LOCAL_SEARCH_ROUNDS = 400  # member moves or swaps that polish a partition
WARM_POLISH = 3  # greedy partitions polished by the local search
WARM_SIZES = (2, 3, 4, 5, 6, 8)  # group sizes of the homogeneous warm starts
WARM_TARGETS = (1.0, 1.005, 1.01, 1.02, 1.03, 1.05, 1.08, 1.12, 1.2, 1.35)  # greedy makespans × area bound


# ---- warm start: a greedy partition seeded by hdp ---------------------------------------------------

@dataclass
class Partition:
    """Groups of a solution: size and member counts per item."""

    sizes: list[int]
    counts: list[np.ndarray]  # per group, [items]


def group_time_s(d: int, counts: np.ndarray, items: Items, tab: Table, C: int) -> float:
    k = int(np.searchsorted(tab.sizes, d))
    nz = counts > 0
    busy = float(counts[nz] @ tab.time_s[nz, k]) if nz.any() else 0.0
    if d == 1 and nz.any():
        busy += tab.gamma_s * math.ceil(float(counts @ items.mean_tokens) / C - 1e-9)
    return busy


def greedy_partition(items: Items, tab: Table, hdp: int, C: int, target_s: float,
                     hint: np.ndarray | None = None, shard_above_s: float | None = None) -> Partition | None:
    """First-fit decreasing by area for a makespan target. Members to shard (longest first: those that
    cannot run on one rank, or would take longer there than shard_above_s, default the target) go to
    the fullest formed group they still finish on by the target, else open the smallest group that
    finishes them by then (or their `hint` degree), else join the group they finish soonest on; groups
    are then shrunk and merged (merge_groups); the ranks left become single-rank groups; the other
    members, longest first, go where they finish soonest."""
    t = tab.time_s
    n_items = len(items.count)
    allowed = np.isfinite(t)
    k_of = {int(d): k for k, d in enumerate(tab.sizes)}
    # "short": may run on one rank and finishes there by the target; the rest are sharded first
    cut = target_s if shard_above_s is None else shard_above_s
    short = (allowed[:, 0] & ((t[:, 0] <= cut) | ~allowed[:, 1:].any(axis=1))) if tab.sizes[0] == 1 \
        else np.zeros(n_items, bool)
    sizes: list[int] = []
    counts: list[np.ndarray] = []
    load: list[float] = []

    def add(g: int, i: int) -> None:
        counts[g][i] += 1
        load[g] = group_time_s(sizes[g], counts[g], items, tab, C)

    def soonest(i: int) -> int | None:
        here = [g for g in range(len(sizes)) if allowed[i, k_of[sizes[g]]]]
        return min(here, key=lambda g: load[g] + t[i, k_of[sizes[g]]]) if here else None

    longs = sorted((i for i in range(n_items) if not short[i]), key=lambda i: -float(t[i][allowed[i]].min()))
    for i in longs:  # first fit, as if ranks were unlimited; the repair below makes them fit
        ok = tab.sizes[allowed[i] & (tab.sizes > 1)]
        quick = ok[t[i, allowed[i] & (tab.sizes > 1)] <= target_s]
        want = int(quick[0]) if len(quick) else int(ok[-1])
        if hint is not None and hint[i] > 1:
            want = int(ok[min(len(ok) - 1, np.searchsorted(ok, hint[i]))])
        for _ in range(int(items.count[i])):
            fits = [g for g in range(len(sizes)) if allowed[i, k_of[sizes[g]]]
                    and load[g] + t[i, k_of[sizes[g]]] <= target_s]
            if fits:
                add(max(fits, key=lambda g: load[g]), i)
            else:
                sizes.append(want)
                counts.append(np.zeros(n_items, dtype=np.int64))
                load.append(0.0)
                add(len(sizes) - 1, i)
    sizes, counts = merge_groups(sizes, counts, tab, target_s)
    load = [group_time_s(d, c, items, tab, C) for d, c in zip(sizes, counts)]
    room = hdp - (1 if short.any() and max(sizes, default=0) < hdp else 0)  # a rank for the short members
    while sum(sizes) > room:  # too many ranks: dissolve the lightest group into the others
        g = min(range(len(sizes)), key=lambda g: load[g] * sizes[g])
        members = counts.pop(g)
        sizes.pop(g)
        load.pop(g)
        for i in np.repeat(np.arange(n_items), members):
            h = soonest(int(i))
            if h is None:
                return None
            add(h, int(i))
    for _ in range(hdp - sum(sizes) if short.any() else 0):
        sizes.append(1)
        counts.append(np.zeros(n_items, dtype=np.int64))
        load.append(0.0)
    g_size = np.array(sizes)
    cur = np.array(load)
    ki = np.searchsorted(tab.sizes, g_size)
    rest = sorted(((float(t[i, 0]), i) for i in range(n_items) if short[i] for _ in range(int(items.count[i]))),
                  reverse=True)
    ti_g = {}  # per item: its time on each group, bins amortised (thousands of members, few items)
    for _, i in rest:
        if i not in ti_g:
            ti_g[i] = t[i, ki] + np.where(g_size == 1, tab.gamma_s * items.mean_tokens[i] / C, 0.0)
        if not _place_least_loaded(counts, cur, i, ti_g[i]):
            return None
    return _nonempty(sizes, counts)


def _place_least_loaded(counts: list[np.ndarray], cur: np.ndarray, i: int, ti: np.ndarray) -> bool:
    """One member of item i onto the group that finishes first with it (`ti`: its time per group);
    False when no group can run it."""
    g = int(np.argmin(cur + ti))
    if not np.isfinite(ti[g]):
        return False
    counts[g][i] += 1
    cur[g] += ti[g]
    return True


def _nonempty(sizes: list[int], counts: list[np.ndarray]) -> Partition:
    keep = [g for g in range(len(sizes)) if counts[g].any()]
    return Partition([sizes[g] for g in keep], [counts[g] for g in keep])


def merge_groups(sizes: list[int], counts: list[np.ndarray], tab: Table,
                 target_s: float) -> tuple[list[int], list[np.ndarray]]:
    """Shrink every multi-rank group to the smallest size that still finishes its members by the
    target, then merge the pair of groups that frees the most ranks while any pair does (two members
    that each leave a group half idle often fill one group together)."""
    allowed = np.isfinite(tab.time_s)
    t0 = np.where(allowed, tab.time_s, 0.0)
    if not sizes:
        return sizes, counts
    c = np.array(counts)
    while True:
        load = c @ t0  # [groups, sizes]
        ok = ~((c > 0).astype(int) @ (~allowed).astype(int)).astype(bool) & (load <= target_s * (1 + 1e-12))
        need = np.where(ok.any(axis=1), tab.sizes[np.argmax(ok, axis=1)], np.array(sizes))
        sizes = [int(min(d, n)) for d, n in zip(sizes, need)]
        if len(sizes) < 2:
            break
        pair_ok = ok[:, None, :] & ok[None, :, :] & (load[:, None, :] + load[None, :, :] <= target_s * (1 + 1e-12))
        pair_need = np.where(pair_ok.any(axis=2), tab.sizes[np.argmax(pair_ok, axis=2)], 10**9)
        d = np.array(sizes)
        saving = d[:, None] + d[None, :] - pair_need
        np.fill_diagonal(saving, 0)
        a, b = np.unravel_index(np.argmax(saving), saving.shape)
        if saving[a, b] <= 0:
            break
        c[a] += c[b]
        sizes[a] = int(pair_need[a, b])
        c = np.delete(c, b, axis=0)
        del sizes[b]
    return sizes, list(c)


def partition_to_vector(p: Partition, sm: StepModel, items: Items, tab: Table, C: int) -> np.ndarray | None:
    """Column values of a partition; None when it needs more copies of a size than the model has."""
    x = np.zeros(sm.lm.n)
    loads = [group_time_s(d, c, items, tab, C) for d, c in zip(p.sizes, p.counts)]
    for d in sorted(set(p.sizes)):
        mine = sorted((g for g in range(len(p.sizes)) if p.sizes[g] == d), key=lambda g: -loads[g])
        slots = np.flatnonzero(sm.group_size == d)
        if len(mine) > len(slots):
            return None
        for g, col in zip(mine, slots):
            x[sm.u[col]] = 1
            x[sm.load[col]] = loads[g]
            if d == 1:
                x[sm.bins[col]] = math.ceil(float(p.counts[g] @ items.mean_tokens) / C - 1e-9)
            for i in np.flatnonzero(p.counts[g]):
                if (int(i), int(col)) not in sm.x:
                    return None
                x[sm.x[(int(i), int(col))]] = p.counts[g][i]
    x[sm.T] = max(loads, default=0.0)
    return x


def makespan_s(p: Partition, items: Items, tab: Table, C: int) -> float:
    return max((group_time_s(d, c, items, tab, C) for d, c in zip(p.sizes, p.counts)), default=0.0)


def improve(p: Partition, items: Items, tab: Table, C: int, rounds: int = LOCAL_SEARCH_ROUNDS) -> Partition:
    """Local search on the busiest group: move one of its members to the group where it lands lightest,
    or, where no move helps, swap one of its members with one of another group's; each step lowers the
    larger of the two loads it touches (a strict improvement of the pair, so it terminates)."""
    if not p.sizes:
        return p
    sizes = np.array(p.sizes)
    k = np.searchsorted(tab.sizes, sizes)
    c = np.array(p.counts)
    t = tab.time_s[:, k].T  # [groups, items]
    one = sizes == 1
    busy = np.array([float(c[g][c[g] > 0] @ t[g][c[g] > 0]) for g in range(len(sizes))])
    tok = c @ items.mean_tokens

    def load(b: np.ndarray, tk: np.ndarray, m: np.ndarray) -> np.ndarray:
        return b + np.where(m, tab.gamma_s * np.ceil(np.maximum(tk, 0) / C - 1e-9), 0.0)

    def shift(i: int, src: int, dst: int) -> None:  # one member of item i from group src to dst
        c[src, i] -= 1
        c[dst, i] += 1
        busy[src] -= t[src, i]
        busy[dst] += t[dst, i]
        tok[src] -= items.mean_tokens[i]
        tok[dst] += items.mean_tokens[i]

    for _ in range(rounds):
        cur = load(busy, tok, one)
        g = int(np.argmax(cur))
        best = None
        for i in np.flatnonzero(c[g]):
            after_g = load(busy[g:g + 1] - t[g, i], tok[g:g + 1] - items.mean_tokens[i], one[g:g + 1])[0]
            after_h = load(busy + t[:, i], tok + items.mean_tokens[i], one)
            after_h[g] = np.inf
            h = int(np.argmin(after_h))
            worst = max(after_g, after_h[h])
            if worst < cur[g] - 1e-9 and (best is None or worst < best[0]):
                best = (worst, i, h)
        j = None
        if best is None:
            best, j = best_swap(g, c, t, busy, tok, cur, one, load, items.mean_tokens)
            if best is None:
                break
        _, i, h = best
        shift(i, g, h)
        if j is not None:
            shift(j, h, g)
    keep = np.flatnonzero(c.any(axis=1))
    return Partition([int(sizes[g]) for g in keep], [c[g] for g in keep])


def best_swap(g: int, c: np.ndarray, t: np.ndarray, busy: np.ndarray, tok: np.ndarray, cur: np.ndarray,
              one: np.ndarray, load, tau: np.ndarray) -> tuple[tuple[float, int, int] | None, int | None]:
    """The swap of a member i of group g with a member j of another group h that leaves the lower
    max(load g, load h), if below g's load now: ((that max, i, h), j), or (None, None)."""
    mine = np.flatnonzero(c[g])
    if not len(mine):
        return None, None
    with np.errstate(invalid="ignore"):
        # [i, j]: g gives i, takes j;  [i, h, j]: h takes i, gives j
        g_busy = busy[g] - t[g, mine][:, None] + t[g][None, :]
        g_tok = tok[g] - tau[mine][:, None] + tau[None, :]
        new_g = load(g_busy, g_tok, np.full(g_busy.shape, one[g]))
        h_busy = busy[None, :, None] + t.T[mine][:, :, None] - t[None, :, :]
        h_tok = tok[None, :, None] + tau[mine][:, None, None] - tau[None, None, :]
        new_h = load(h_busy, h_tok, np.broadcast_to(one[None, :, None], h_busy.shape))
        worst = np.maximum(new_g[:, None, :], new_h)
    ok = (c[None, :, :] > 0) & (mine[:, None, None] != np.arange(c.shape[1])[None, None, :])
    ok[:, g, :] = False
    worst = np.where(ok & np.isfinite(worst), worst, np.inf)
    a, h, j = np.unravel_index(int(np.argmin(worst)), worst.shape)
    if not worst[a, h, j] < cur[g] - 1e-9:
        return None, None
    return (float(worst[a, h, j]), int(mine[a]), int(h)), int(j)


def warm_start(items: Items, tab: Table, hdp: int, C: int, hint: np.ndarray, hdp_makespan_s: float,
               deadline: float = math.inf) -> Partition | None:
    """The best greedy partition after local search: hdp's degrees (and none) at hdp's makespan, first
    fit over a ladder of targets above the area bound (the greedy is not monotone in its target), and
    homogeneous group sizes; the WARM_POLISH best are polished (the search reorders them). Past the
    deadline no further greedy partition is tried once one is found (thousands of members: ~0.2 s each)."""
    area = area_bound_s(items, tab, hdp, C)
    tries = [(hdp_makespan_s, hint, None), (hdp_makespan_s, None, None)]
    tries += [(area * f, None, area * f * cut) for f in WARM_TARGETS for cut in (1.0, 0.5)]
    for d in WARM_SIZES:  # FlexSP's homogeneous starts: every sharded member on groups of one size
        tries += [(area * f, np.full(len(items.count), d), area * f / 2) for f in (1.01, 1.03)]
    found = []
    for target, h, cut in tries:
        if found and time.perf_counter() > deadline:
            break
        p = greedy_partition(items, tab, hdp, C, target, h, cut)
        if p is not None:
            found.append(p)
    found.sort(key=lambda p: makespan_s(p, items, tab, C))
    polished = [improve(p, items, tab, C) for p in found[:WARM_POLISH]]
    return min(polished, key=lambda p: makespan_s(p, items, tab, C), default=None)


def fill_partition(sizes: list[int], counts: list[np.ndarray], items: Items, tab: Table, hdp: int,
                   C: int) -> Partition | None:
    """Complete a partial partition: the ranks left become single-rank groups, and every member not
    yet placed goes, longest first, to the group it may use where it finishes soonest (bins amortised,
    as in greedy_partition). None when some member fits no group."""
    n = len(items.count)
    sizes = list(sizes) + [1] * (hdp - sum(sizes) if tab.sizes[0] == 1 else 0)
    counts = [np.asarray(c, np.int64).copy() for c in counts] + [np.zeros(n, np.int64)
                                                                  for _ in range(len(sizes) - len(counts))]
    left = items.count - np.sum(counts, axis=0) if counts else items.count.copy()
    if (left < 0).any() or sum(sizes) > hdp:
        return None
    g_size = np.array(sizes)
    ki = np.searchsorted(tab.sizes, g_size)
    cur = np.array([group_time_s(d, c, items, tab, C) for d, c in zip(sizes, counts)])
    amort = np.where(g_size == 1, tab.gamma_s / C, 0.0)
    t_min = np.where(np.isfinite(tab.time_s), tab.time_s, np.inf).min(axis=1)
    for i in sorted(np.flatnonzero(left), key=lambda i: -t_min[i]):
        for _ in range(int(left[i])):
            if not _place_least_loaded(counts, cur, i, tab.time_s[i, ki] + amort * items.mean_tokens[i]):
                return None
    return _nonempty(sizes, counts)
