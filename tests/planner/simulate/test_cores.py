"""Ranks sharing a CPU node's cores (planner/simulate/cores.py): a rank that waits or is done leaves its core to the
others, whose compute then runs at the share of the ranks still busy."""

import dataclasses

import numpy as np
import pytest

from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, TrainingSpec
from costmodel.timing import CostModel
from planner.plan import Piece, Predicted, Sequence, Step, Unit
from planner.simulate import simulate_step
from planner.simulate.cores import run_shared
from profiles.table import load_profile


def _cm(ranks: int, profile: str = "local-cpu.measured", cluster: str = "local-cpu",
        share: float | None = None) -> CostModel:
    """Without the meetings' wake-up (a given share prices none): the compute shares alone are compared here."""
    prof = load_profile(profile)
    prof = dataclasses.replace(prof, constants={k: v for k, v in prof.constants.items() if "_wake" not in k})
    return CostModel(Setup(load_model("tiny"), load_cluster(cluster).with_gpus(ranks), TrainingSpec(dtype="fp32")),
                     prof, compute_share=share)


def test_a_rank_that_is_done_leaves_its_core_to_the_others():
    cm = _cm(3)  # 3 ranks on the profile's 2 cores
    s3, s2, s1 = cm.share_at(3), cm.share_at(2), cm.share_at(1)
    assert s3 == cm.compute_share and s3 > s2 > s1 == 1.0
    total, compute = np.array([0.3, 0.02]), np.array([0.25, 0.02])  # unit 0 on ranks 0 and 1, unit 1 on rank 2
    starts, ends, free = run_shared([(0, 1), (2,)], total, compute, 3, cm)
    assert starts == [0.0, 0.0] and ends[1] == pytest.approx(0.02)  # all three busy: unit 1 at its price
    at_two = 0.3 + 0.25 * (s2 / s3 - 1.0)  # unit 0 once rank 2 is done: its compute at the 2-rank share
    assert ends[0] == pytest.approx(0.02 + (1 - 0.02 / 0.3) * at_two)
    assert free == [ends[0], ends[0], ends[1]]
    # a unit that waits for a member: its free rank idles meanwhile, and the busy one computes alone
    starts, ends, _ = run_shared([(0,), (0, 1)], np.array([0.1, 0.1]), np.array([0.1, 0.0]), 2, _cm(2))
    share2 = _cm(2).compute_share
    assert ends[0] == pytest.approx(0.1 / share2) and starts[1] == ends[0] and ends[1] == pytest.approx(ends[0] + 0.1)


def test_gpus_and_given_shares_keep_the_plain_schedule():
    assert not _cm(3, "h100-sxm.analytic", "dgx-h100").shares_cores  # a GPU per rank
    given = _cm(3, share=1.5)
    assert not given.shares_cores and given.share_at(1) == 1.5


def _step(lengths: list[list[int]], ranks: list[tuple[int, ...]]) -> Step:
    seqs, units, k = [], [], 0
    for uid, (docs, rs) in enumerate(zip(lengths, ranks)):
        pieces = []
        for n in docs:
            seqs.append(Sequence(k, n))
            pieces.append(Piece(k, 0, n))
            k += 1
        units.append(Unit(uid, rs, tuple(pieces)))
    order = {r: [u.id for u in units if r in u.hdp_ranks] for r in range(3)}
    return Step(0, sum(sum(d) for d in lengths), seqs, units, order, Predicted(0.0, 0.0, [], []))


def test_the_step_of_an_idle_rank_is_shorter_than_at_the_full_share():
    """The flat simulation on a CPU profile: the 2-rank unit beside a 44-token one (the CPU replay's hdp3 plan) ends
    near its 2-rank-share price; its parts scale with it, so a rank's breakdown still sums to its busy time."""
    cm = _cm(3)
    step = _step([[2899], [44]], [(0, 1), (2,)])
    sim = simulate_step(step, cm)
    plain = simulate_step(step, _cm(3, share=cm.compute_share))
    assert sim.step_time_s < 0.8 * plain.step_time_s
    two = simulate_step(_step([[2899]], [(0, 1)]), _cm(2))  # the same unit in a 2-rank plan
    busy0 = sim.per_rank_busy_s[0]
    assert busy0 == pytest.approx(two.per_rank_busy_s[0], rel=0.05)
    parts = sum(sim.breakdown[k] for k in ("compute", "ring_exposed", "tp_comm", "offload_exposed"))
    assert parts == pytest.approx(np.mean(sim.per_rank_busy_s), rel=1e-9)
