"""DP-Balance's rank choice kept across units (issue 18): `DomainLoads` answers "the d least-loaded ranks,
preferring one NVLink domain" from per-domain heaps, and must choose exactly what the O(ranks)
formulation below (a stable sort of all loads and of each node's) chooses on the same loads, ties
included, or plans would change."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.strategies.common import DomainLoads, node_local_ranks


def _reference(loads: np.ndarray, d: int, per_node: int, slack_s: float) -> tuple[int, ...]:
    """The choice by full stable sorts (what node_local_ranks did before the heaps)."""
    n = len(loads)
    best = np.argsort(loads, kind="stable")[:d]
    if d <= per_node and n > per_node:
        nodes = n // per_node
        blk = loads[: nodes * per_node].reshape(nodes, per_node)
        part = np.sort(blk, axis=1)[:, d - 1]
        k = int(np.argmin(part))
        if part[k] <= float(loads[best].max()) + slack_s:
            return tuple(sorted(int(r) for r in k * per_node + np.argsort(blk[k], kind="stable")[:d]))
    if d > per_node and d % per_node == 0 and n > d:
        nodes = n // per_node
        node_max = loads[: nodes * per_node].reshape(nodes, per_node).max(axis=1)
        win = np.lib.stride_tricks.sliding_window_view(node_max, d // per_node).max(axis=1)
        k = int(np.argmin(win))
        if win[k] <= float(loads[best].max()) + slack_s:
            return tuple(range(k * per_node, (k + d // per_node) * per_node))
    return tuple(sorted(int(r) for r in best))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 70), per_node=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_incremental_choices_match_full_sorts(n, per_node, data):
    loads = np.zeros(n)
    domains = DomainLoads(loads, per_node)
    for _ in range(data.draw(st.integers(1, 40))):
        sizes = {1, 2, 3, per_node, 2 * per_node, 3 * per_node, n}  # one node, whole nodes, all ranks
        d = data.draw(st.sampled_from(sorted(s for s in sizes if s <= n)))
        slack = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
        want = _reference(loads.copy(), d, per_node, slack)
        assert domains.choose(d, slack) == want
        assert node_local_ranks(loads, d, per_node, slack) == want
        cost = data.draw(st.sampled_from([0.5, 1.0, 1.0, 3.0]))  # few values: ties between ranks and nodes
        domains.assign(list(want), domains.start(list(want)) + cost)
        assert domains.start(list(want)) == float(loads[list(want)].max())


@settings(max_examples=200, deadline=None)
@given(loads=st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0]), min_size=1, max_size=120),
       per_node=st.sampled_from([1, 2, 4, 8]), slack=st.sampled_from([0.0, 0.5, 10.0]), data=st.data())
def test_least_loaded_from_the_heap_is_the_stable_sort_prefix(loads, per_node, slack, data):
    arr = np.array(loads)
    d = data.draw(st.integers(1, len(arr)))
    assert sorted(DomainLoads(arr, per_node).least(d)) == sorted(np.argsort(arr, kind="stable")[:d].tolist())
    assert node_local_ranks(arr, d, per_node, slack) == _reference(arr, d, per_node, slack)
