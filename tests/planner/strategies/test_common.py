"""Rank-set choice shared by the strategies: the O(n) partition path must pick exactly the ranks a
stable full sort picks (ties to the lowest index), which plan byte-identity depends on."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.strategies.common import least_loaded, node_local_ranks

# few distinct load values: ties are the case that matters
loads_st = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0]), min_size=1, max_size=48)


@settings(max_examples=300, deadline=None)
@given(loads=loads_st, data=st.data())
def test_least_loaded_is_the_stable_sort_prefix(loads, data):
    arr = np.array(loads)
    d = data.draw(st.integers(1, len(arr)))
    assert sorted(least_loaded(arr, d).tolist()) == sorted(np.argsort(arr, kind="stable")[:d].tolist())


@settings(max_examples=300, deadline=None)
@given(loads=loads_st, per_node=st.sampled_from([1, 2, 4, 8]), slack=st.sampled_from([0.0, 0.5, 10.0]),
       data=st.data())
def test_node_local_ranks_takes_d_ranks_within_slack_of_the_best_start(loads, per_node, slack, data):
    arr = np.array(loads)
    d = data.draw(st.integers(1, len(arr)))
    ranks = node_local_ranks(arr, d, per_node, slack)
    assert len(set(ranks)) == d and list(ranks) == sorted(ranks)
    best_start = float(np.sort(arr)[d - 1])
    assert float(arr[list(ranks)].max()) <= best_start + slack
    if len(arr) > per_node >= d:  # the one-node choice is taken whenever some node is within the slack
        nodes = len(arr) // per_node
        blk = np.sort(arr[: nodes * per_node].reshape(nodes, per_node), axis=1)[:, d - 1]
        if blk.min() <= best_start + slack:
            assert ranks[0] // per_node == ranks[-1] // per_node


def test_node_local_ranks_prefers_one_node_within_the_slack():
    loads = np.array([0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 5.0, 5.0])  # two nodes of four
    assert node_local_ranks(loads, 2, 4, 0.0) == (4, 5)  # node 1 holds two idle ranks: no delay
    assert node_local_ranks(loads, 3, 4, 0.0) == (0, 4, 5)  # every node delays the start: global choice
    assert node_local_ranks(loads, 3, 4, 2.0) == (0, 1, 2)  # within slack: node 0 (start 2) beats node 1 (5)
