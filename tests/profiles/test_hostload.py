"""Other processes' load: the node's CPU time less our own, over the wall time."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from profiles.measure.hostload import load_constant, node_cpu_s, other_cores, own_cpu_s

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5:\n    pass\n"


def test_other_cores_is_the_nodes_busy_time_less_ours_per_second():
    assert other_cores(node_busy_s=3.0, own_s=1.0, wall_s=2.0) == 1.0
    assert other_cores(node_busy_s=0.99, own_s=1.0, wall_s=2.0) == 0.0  # clock ticks: never below 0
    c = load_constant(0.75, 0.01, 120.0)
    assert c["value"] == 0.75 and c["unit"] == "cores" and "120 s" in c["source"]


def test_a_process_that_is_not_ours_is_other_load_until_it_ends_and_is_reaped():
    if node_cpu_s() is None:
        pytest.skip("no /proc/stat (not Linux)")
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.3)  # its interpreter is up and spinning
        n0, own0, t0 = node_cpu_s(), own_cpu_s(), time.perf_counter()
        time.sleep(1.0)
        n1, own1, wall = node_cpu_s(), own_cpu_s(), time.perf_counter() - t0
    finally:
        spinner.wait(timeout=60)
    # a running child is not counted as ours (only ended, reaped children are): it is other load, about one core;
    # more on a loaded machine, since every other process counts too
    assert other_cores(n1[0] - n0[0], own1 - own0, wall) > 0.5
    assert n1[1] >= n0[1]  # steal only grows
    assert own_cpu_s() - own1 > 0.5  # reaped: its CPU time is ours now (a profile's measuring processes)
