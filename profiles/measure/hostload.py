"""Other processes' load on this machine while something is timed: every process's CPU time on the node (Linux
/proc/stat) minus our own processes', over the wall time between two readings. The host probe (probe.py) says how
fast one core computes; it cannot see another process busy on a different core, which slows a replay whose ranks
fill every core. A CPU profile records the load over its run (constant `host_other_cores`), a CPU replay per step
(rank 0's step record), and `meshplan simulate --measured` sets the two side by side."""

from __future__ import annotations

import os
import resource
from pathlib import Path

HOST_LOAD_SOURCE = ("measured: profiles.measure.hostload, /proc/stat (every process's user, nice, system, irq and "
                    "softirq time on the node) minus this run's own processes' CPU time, over the wall time")


def node_cpu_s() -> tuple[float, float] | None:
    """(busy, steal): seconds of CPU every process on this machine has used since boot, and seconds the hypervisor
    ran something else on its virtual CPUs; None where /proc/stat is missing (not Linux)."""
    try:
        with Path("/proc/stat").open() as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the profile's measuring processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def other_cores(node_busy_s: float, own_s: float, wall_s: float) -> float:
    """Cores other processes kept busy on average over a window of `wall_s`: the node's busy CPU seconds less our own
    processes', per second; never below 0 (/proc/stat counts in clock ticks, 10 ms each)."""
    return max(0.0, node_busy_s - own_s) / wall_s if wall_s > 0 else 0.0


def load_constant(other: float, steal: float, wall_s: float) -> dict:
    """The profile constant `host_other_cores`: other processes' load over the profile's run."""
    return {"value": other, "unit": "cores", "source": (
        f"{HOST_LOAD_SOURCE}, over the profile's {wall_s:.0f} s; the hypervisor's steal {steal:.2f} cores")}
