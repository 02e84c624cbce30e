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
        share: float | None = None, pp: int = 1, wake: bool = False, busy: float | None = None) -> CostModel:
    """Without the meetings' wake-up unless asked (a given share prices none) and without the hand-offs' host CPU:
    the compute shares alone are compared here. `busy`: the slowdown with every core busy, one rank each, instead of
    the profile's."""
    prof = load_profile(profile)
    coll = prof.tables["collective"].drop(columns=["cpu_s"], errors="ignore")
    prof = dataclasses.replace(prof, tables={**prof.tables, "collective": coll})
    if not wake:
        prof = dataclasses.replace(prof, constants={k: v for k, v in prof.constants.items() if "_wake" not in k})
    if busy is not None:
        prof.constants["cores_busy_slowdown"] = {"value": busy, "unit": "x", "source": "test"}
    setup = Setup(load_model("tiny"), load_cluster(cluster).with_gpus(ranks), TrainingSpec(dtype="fp32", pp=pp))
    return CostModel(setup, prof, compute_share=share)


def test_a_rank_that_is_done_leaves_its_core_to_the_others():
    cm = _cm(3, busy=1.04)  # 3 ranks on the profile's 2 cores, both cores busy 4% slower than one (as measured)
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


def _pipeline(p: int, m: int, v: int, transfer_s: float):
    """One pipeline of m one-slice micro-batches over p stages: its lists, dependency, durations and transfer."""
    from planner.schedule import dependency, stage_ops

    lists = {(0, s): [((s, op), None) for op in stage_ops(p, s, [1] * m, v)] for s in range(p)}
    dur = {key: (1.0 + 0.1 * key[1].mb) * (1 if key[1].kind == "F" else 2) / v
           for lst in lists.values() for key, _ in lst}
    return (lists, lambda key: dependency(key[1], key[0], p, v, 0), dur.__getitem__,
            lambda key: 0.0 if dependency(key[1], key[0], p, v, 0) is None else transfer_s)


@pytest.mark.parametrize("p, m, v", [(2, 3, 1), (4, 8, 1), (4, 8, 2)])
def test_the_shared_engine_runs_a_schedule_as_run_ops_does_at_a_fixed_share(p, m, v):
    """At a fixed share (a GPU per rank) the time-ordered engine gives run_ops's starts and ends, op for op."""
    from planner.schedule import run_ops
    from planner.simulate.cores import run_ops_shared

    cm = _cm(p, "h100-sxm.analytic", "dgx-h100")
    lists, dep, dur, transfer = _pipeline(p, m, v, 0.05)
    plain = {r.key: (r.start_s, r.end_s) for r in run_ops(lists, dep, dur, transfer)}
    shared = {r.key: (r.start_s, r.end_s) for r in run_ops_shared(lists, dep, dur, dur, transfer,
                                                                   {res: (0, 1) for res in lists}, cm)}
    assert shared.keys() == plain.keys()
    for k, (a, b) in plain.items():
        assert shared[k] == pytest.approx((a, b))


def test_a_pipeline_stage_computes_alone_while_the_other_waits():
    """Two stages on one core's worth of a 2-core node's ranks (4 ranks: 2 a core): stage 1's forward runs while stage
    0 waits for its backward, so it computes at the 1-rank share; a transfer is a fixed delay at any share."""
    from planner.schedule import PipeOp
    from planner.simulate.cores import run_ops_shared

    cm = _cm(4)
    f0, f1, b1, b0 = ((0, PipeOp("F", 0)), (1, PipeOp("F", 0)), (1, PipeOp("B", 0)), (0, PipeOp("B", 0)))
    lists = {(0, 0): [(f0, None), (b0, None)], (0, 1): [(f1, None), (b1, None)]}
    dep = {f0: None, f1: f0, b1: f1, b0: b1}.__getitem__
    total = {f0: 0.1, f1: 0.1, b1: 0.2, b0: 0.2}
    compute = {f0: 0.1, f1: 0.08, b1: 0.2, b0: 0.2}  # f1 waits 0.02 s for something that does not scale
    runs = {r.key: r for r in run_ops_shared(lists, dep, total.__getitem__, compute.__getitem__, lambda k: 0.01,
                                             {(0, 0): (0, 1), (0, 1): (0, 1)}, cm)}
    x = cm.share_at(1) / cm.compute_share  # one of the node's ranks busy, against the 4 the price assumes
    assert x < 0.6
    assert runs[f0].end_s == pytest.approx(0.1 * x)
    assert runs[f1].start_s == pytest.approx(0.1 * x + 0.01)
    assert runs[f1].end_s - runs[f1].start_s == pytest.approx(0.1 + 0.08 * (x - 1))
    assert runs[b0].start_s == pytest.approx(runs[b1].end_s + 0.01)


def test_a_heavy_op_holds_its_ranks_without_computing_until_its_light_partner_ends():
    """A rendezvous pair (SlimPipe's mirror pairing): both start together; the heavy one, done first, waits for the
    light one's result, and while it waits the light one has the cores to itself."""
    from planner.schedule import PipeOp
    from planner.simulate.cores import run_ops_shared

    cm = _cm(4)
    h0, h, lo = ("h0", PipeOp("F", 0)), ("h", PipeOp("F", 1)), ("l", PipeOp("F", 1))
    lists = {"a": [(h0, None), (h, None)], "b": [(lo, None)]}
    total = {h0: 0.1, h: 0.1, lo: 0.3}
    runs = {r.key: r for r in run_ops_shared(lists, lambda k: None, total.__getitem__, total.__getitem__,
                                             lambda k: 0.0, {"a": (0, 1), "b": (0, 1)}, cm, pairs=[(h, lo)])}
    one, two = cm.share_at(1) / cm.compute_share, cm.share_at(2) / cm.compute_share
    assert runs[h0].end_s == pytest.approx(0.1 * one) == runs[h].start_s == runs[lo].start_s
    left = 1 - 0.1 * two / (0.3 * two)  # the light op's part left when the heavy one's work is done
    assert runs[h].end_s == runs[lo].end_s == pytest.approx(runs[h].start_s + 0.1 * two + left * 0.3 * one)


def test_a_pipelined_step_runs_its_units_faster_than_their_price_while_ranks_wait():
    """pp = 2, hdp = 2 on a 2-core host (the CPU replay's pp2 plan): pipeline 0 runs one long unit, pipeline 1 three
    short ones; the ranks that wait in the bubbles leave their cores to the others. A stage's units then run under
    their price, and what `predicted_units_s` gives a replay is the simulated ops' time."""
    from planner.simulate.measured import predicted_units_s
    from planner.simulate.step import unit_costs

    cm = _cm(4, pp=2)
    step = _step([[2899], [703], [696], [547]], [(0,), (1,), (1,), (1,)])
    sim = simulate_step(step, cm)
    plain = simulate_step(step, _cm(4, share=cm.compute_share, pp=2))
    assert sim.step_time_s < 0.9 * plain.step_time_s
    got, costs = predicted_units_s(step, cm, sim), unit_costs(step, cm)
    for (uid, s), t in got.items():
        ops = [o for o in sim.ops if o.unit == uid and o.stage == s]
        assert len(ops) == 2 and t == pytest.approx(sum(o.end_s - o.start_s for o in ops))
        assert t < costs[uid][1 if s == 1 else 0].total_s
    parts = sum(sim.breakdown[k] for k in ("compute", "ring_exposed", "tp_comm", "offload_exposed"))
    busy = sum(o.end_s - o.start_s for o in sim.ops) / (cm.setup.hdp * cm.pp)
    assert parts == pytest.approx(busy, rel=1e-9)
    # with the wake-up: pipeline 1 runs a short unit, then a long one (1F1B on stage 0: F1 F2 B1 ...); stage 1 sends
    # B1's gradient while stage 0 still runs F2, so B1 starts the wake-up after F2's compute after it
    cm = _cm(4, pp=2, wake=True)
    step = _step([[2899], [547], [2899], [696]], [(0,), (1,), (1,), (1,)])
    sim = simulate_step(step, cm)
    mine = {(o.unit, o.kind): o for o in sim.ops if o.stage == 0 and 1 in o.ranks}
    f2, b1 = mine[(2, "fwd")], mine[(1, "bwd")]
    sent = max(o.end_s for o in sim.ops if o.stage == 1 and o.unit == 1 and o.kind == "bwd")
    assert sent < f2.end_s
    wake = float(cm.wake_after_s(unit_costs(step, cm)[2][0].fwd_compute_s))
    assert 0 < wake < cm.wake.plateau_s and b1.start_s == pytest.approx(f2.end_s + wake)


def test_a_pipeline_hand_offs_host_cpu_runs_on_the_cores_that_compute():
    """Where gloo's threads move the data on the cores that compute (as many ranks as cores or more), each hand-off
    between stages costs the collective table's send_recv CPU, half on the op that sends and half on the op that
    receives, computed at the cores' share; a profile without the column prices none."""
    base = _cm(4, pp=2)
    prof = base.profile
    coll = prof.tables["collective"].assign(cpu_s=2e-3)
    cm = CostModel(base.setup, dataclasses.replace(prof, tables={**prof.tables, "collective": coll}))
    assert cm.transfers_on_cores and base.pp_handoff_cpu_s(725) == 0.0
    h = cm.pp_handoff_cpu_s(725)
    assert h == pytest.approx(2e-3 * cm.compute_share)
    step = _step([[2899], [703], [696], [547]], [(0,), (1,), (1,), (1,)])
    without, sim = simulate_step(step, base), simulate_step(step, cm)
    assert sim.step_time_s > without.step_time_s and without.breakdown["pp_exchange"] == 0.0
    # an op's timing starts after its hand-offs' host work, as the executor times its ops
    parts = sum(sim.breakdown[k] for k in ("compute", "ring_exposed", "tp_comm", "offload_exposed"))
    assert parts == pytest.approx(sum(o.end_s - o.start_s for o in sim.ops) / (cm.setup.hdp * cm.pp), rel=1e-9)
    # 4 units, each sends twice and receives twice: 8 hand-offs of h, an op's share of it run at the cores' share
    ends = 8 * h / (cm.setup.hdp * cm.pp)
    alone = cm.share_at(1) / cm.compute_share
    assert alone * ends <= sim.breakdown["pp_exchange"] <= ends * (1 + 1e-9)


def test_a_late_receive_waits_for_a_wake_up_after_its_ranks_previous_op():
    """A pipeline op whose input was sent before its rank got to it starts the wake-up after the rank's previous op
    (CostModel.wake_after_s of that op's compute) after it; one whose rank waited starts the transfer after the send."""
    from planner.schedule import PipeOp
    from planner.simulate.cores import run_ops_shared

    cm = _cm(4)
    f0, f1, b1, b0 = ((0, PipeOp("F", 0)), (1, PipeOp("F", 0)), (1, PipeOp("B", 0)), (0, PipeOp("B", 0)))
    x0 = (0, PipeOp("F", 9))  # stage 0's own op after its forward, longer than stage 1's work
    lists = {(0, 0): [(f0, None), (x0, None), (b0, None)], (0, 1): [(f1, None), (b1, None)]}
    dep = {f0: None, x0: None, f1: f0, b1: f1, b0: b1}.__getitem__
    total = {f0: 0.1, x0: 1.0, f1: 0.1, b1: 0.2, b0: 0.2}
    runs = {r.key: r for r in run_ops_shared(lists, dep, total.__getitem__, total.__getitem__, lambda k: 0.01,
                                             {(0, 0): (0, 1), (0, 1): (0, 1)}, cm, late=lambda k: 0.003)}
    assert runs[f1].start_s == pytest.approx(runs[f0].end_s + 0.01)  # stage 1 waited: the transfer after the send
    assert runs[b1].end_s < runs[x0].end_s  # stage 0 was busy when the gradient came
    assert runs[b0].start_s == pytest.approx(runs[x0].end_s + 0.003)


def test_a_zero_length_light_op_ends_its_holding_partner():
    """A rendezvous pair whose light op takes no time: the heavy one ends with its own work (no deadlock)."""
    from planner.schedule import PipeOp
    from planner.simulate.cores import run_ops_shared

    cm = _cm(4)
    h, lo = ("h", PipeOp("F", 0)), ("l", PipeOp("F", 0))
    for total in ({h: 0.0, lo: 0.0}, {h: 0.1, lo: 0.0}, {h: 0.0, lo: 0.1}):
        runs = {r.key: r for r in run_ops_shared({"a": [(h, None)], "b": [(lo, None)]}, lambda k: None,
                                                 total.__getitem__, total.__getitem__, lambda k: 0.0,
                                                 {"a": (0, 1), "b": (0, 1)}, cm, pairs=[(h, lo)])}
        assert runs[h].end_s >= runs[lo].end_s and runs[h].start_s == runs[lo].start_s == 0.0
