"""planner/runtime/ulysses.py: the group layouts and head split in one process; Ulysses and 2D units
replayed under torchrun (gloo, CPU, tiny models) mixed with ring, all-gather and packed units,
compared with the single-process reference of `--check`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from planner.plan import Mesh, Piece, Plan, PlanError, Unit, validate  # noqa: E402
from planner.runtime.cp import Peers, shard_layout, unit_documents  # noqa: E402
from planner.runtime.ulysses import HeadSplit, UlyssesAttention, group_layout  # noqa: E402
from tests.planner.runtime.test_runtime import (DEEP_TIED, assert_matches_reference, json_lines,  # noqa: E402
                                                make_plan, make_step, meshplan, pipelined_plan, torchrun)

CPU = torch.device("cpu")
# 8 query heads over 4 K/V heads: Ulysses 4 over one rank's heads, or 2 per TP rank under tp = 2
GQA8 = {"name": "tiny-gqa8", "layers": 2, "hidden": 64, "heads": 8, "kv_heads": 4, "head_dim": 8, "ffn": 128,
        "vocab": 256, "source": "tests: 8 query heads over 4 KV heads"}


def with_kinds(plan: Plan, kinds: dict[int, tuple[int, str | None]]) -> Plan:
    """Unit id -> (ulysses, cp) in every step; validated."""
    steps = [replace(s, units=[replace(u, ulysses=kinds.get(u.id, (1, None))[0], cp=kinds.get(u.id, (1, None))[1])
                               for u in s.units]) for s in plan.steps]
    out = Plan(meta=plan.meta, mesh=plan.mesh, steps=steps)
    validate(out)
    return out


def mixed_ulysses_plan_4() -> Plan:
    """4 ranks, tiny (4 query heads, 2 KV heads): pure Ulysses over 2 ranks (two documents with
    zigzag padding); 2D over 4 ranks (u = 2, ring 2) with ring and with all-gather across the groups;
    a ring unit over 2 ranks holding part of a split sequence, an all-gather unit over 3, a packed bin."""
    seqs = {0: 150, 1: 33, 2: 203, 3: 97, 4: 61, 5: 12, 6: 120, 7: 50, 8: 70}
    units = [(0, [0, 1], [(0, 0, 150), (1, 0, 33)], 0.0),
             (1, [0, 1, 2, 3], [(2, 0, 203)], 0.0),
             (2, [2, 3], [(3, 0, 97), (4, 45, 61)], 0.0),
             (3, [0], [(4, 0, 45), (5, 0, 12)], 0.0),
             (4, [0, 1, 2, 3], [(6, 0, 120), (7, 0, 50)], 0.3),
             (5, [1, 2, 3], [(8, 0, 70)], 0.0)]
    plan = make_plan(4, [make_step(0, 4, seqs, units, {0: [0, 1, 3, 4], 1: [0, 1, 4, 5], 2: [1, 2, 4, 5],
                                                       3: [1, 2, 4, 5]})])
    return with_kinds(plan, {0: (2, None), 1: (2, "ring"), 4: (2, "allgather"), 5: (1, "allgather")})


def gqa_plan(tp: int) -> Plan:
    """GQA8 model. tp = 1, 4 ranks: pure Ulysses over 4 ranks (u = 4 = the KV heads), a 2D unit u = 2
    with ring, a ring unit. tp = 2, 2 HDP ranks: pure Ulysses over both (2 KV heads per TP rank)."""
    if tp == 1:
        seqs = {0: 130, 1: 41, 2: 96, 3: 77}
        units = [(0, [0, 1, 2, 3], [(0, 0, 130), (1, 0, 41)], 0.0), (1, [0, 1, 2, 3], [(2, 0, 96)], 0.0),
                 (2, [1, 2], [(3, 0, 77)], 0.0)]
        plan = make_plan(4, [make_step(0, 4, seqs, units, {0: [0, 1], 1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1]})])
        plan = with_kinds(plan, {0: (4, None), 1: (2, "ring")})
    else:
        seqs = {0: 90, 1: 25}
        plan = make_plan(2, [make_step(0, 2, seqs, [(0, [0, 1], [(0, 0, 90), (1, 0, 25)], 0.0)], {0: [0], 1: [0]})])
        plan = with_kinds(Plan(meta=plan.meta, mesh=Mesh(4, 2, 1, 2), steps=plan.steps), {0: (2, None)})
    return Plan(meta={**plan.meta, "model": "gqa8.json"}, mesh=plan.mesh, steps=plan.steps)


# -- one process: layouts and head split --------------------------------------------------------

@pytest.mark.parametrize("lengths,degree,u", [([203], 4, 2), ([150, 33], 2, 2), ([64, 16], 4, 2), ([5, 40], 6, 3),
                                              ([96], 4, 4)])
def test_group_layout_is_the_coarser_zigzag_sorted(lengths, degree, u):
    """A group's tokens, sorted, are real tokens in (document, position) order; with no padding they are
    exactly chunk g and its mirror of a zigzag over degree / u; the groups cover every token once."""
    docs = unit_documents(tuple(Piece(i, 0, n) for i, n in enumerate(lengths)))
    lays = [shard_layout(docs, degree, j) for j in range(degree)]
    r = degree // u
    seen = []
    for g in range(r):
        members = HeadSplit(degree, u, g * u).group_members(g)
        lay, perm = group_layout(lays, members, r, g)
        cat = torch.cat([lays[m].key for m in members])
        assert torch.equal(cat[perm], lay.key) and bool((lay.key[1:] > lay.key[:-1]).all())
        real = list(zip(lay.doc[lay.valid].tolist(), lay.pos[lay.valid].tolist()))
        assert real == sorted(real)
        seen += real
        if all(n % (2 * degree) == 0 for n in lengths):  # no padding: the zigzag over r, exactly
            coarse = shard_layout(docs, r, g)
            assert torch.equal(lay.doc, coarse.doc) and torch.equal(lay.pos, coarse.pos)
    assert sorted(seen) == [(d, p) for d, n in enumerate(lengths) for p in range(n)]


def test_head_split_groups_consecutive_members_and_rings_across_them():
    s = HeadSplit(degree=6, ulysses=2, index=3)
    assert (s.ring_degree, s.group, s.share) == (3, 1, 1)
    assert list(s.group_members(s.group)) == [2, 3] and s.ring_members() == [1, 3, 5]
    pure = HeadSplit(degree=4, ulysses=4, index=2)
    assert (pure.ring_degree, pure.group, pure.share, pure.ring_members()) == (1, 0, 2, [2])


def test_ulysses_degree_must_divide_the_kv_heads_per_rank():
    """Refused in one line before anything is sent (tiny: 2 KV heads, u = 4)."""
    docs = unit_documents((Piece(0, 0, 64),))
    unit = Unit(id=7, hdp_ranks=(0, 1, 2, 3), pieces=(Piece(0, 0, 64),), ulysses=4)
    attn = UlyssesAttention(unit, [shard_layout(docs, 4, j) for j in range(4)], Peers((0, 1, 2, 3), 0), "ring", 16,
                            CPU)
    q, kv = torch.zeros(16, 4, 16), torch.zeros(16, 2, 16)
    with pytest.raises(PlanError, match="unit 7: ulysses degree 4 does not divide the 2 KV heads per TP rank"):
        attn(q, kv, kv, 0)


def test_replay_preflight_refuses_a_ulysses_degree_over_the_kv_heads(tmp_path):
    """Before any process starts: the plan's u = 4 over tiny's 2 KV heads, in one line; a sliced Ulysses unit too."""
    from planner.runtime.launch import preflight

    plan = mixed_ulysses_plan_4()
    bad = with_kinds(plan, {1: (4, None)})
    with pytest.raises(PlanError, match="unit 1: ulysses degree 4 does not divide the 2 KV heads per TP rank"):
        preflight(bad.save(tmp_path / "bad.json"), 4, "tiny")
    sliced = Plan(meta=plan.meta, mesh=plan.mesh,
                  steps=[replace(plan.steps[0], units=[replace(u, slices=2) if u.id == 0 else u
                                                       for u in plan.steps[0].units])])
    with pytest.raises(PlanError, match="unit 0: ulysses 2 with 2 slices is not implemented"):
        preflight(sliced.save(tmp_path / "sliced.json"), 4, "tiny")


# -- torchrun ------------------------------------------------------------------------------------

def _sent(doc: dict, unit: int, rank: int) -> int:
    return next(r["sent_bytes"] for r in doc["steps"][0]["units"] if r["unit"] == unit and r["rank"] == rank)


@pytest.mark.torchrun
def test_ulysses_and_2d_units_match_reference(tmp_path):
    """Mixed plan on 4 ranks: gradients and loss as one process; the traffic is the all-to-alls' (and
    the ring's across groups), counted by hand, so the units did run as Ulysses and 2D."""
    mixed_ulysses_plan_4().save(tmp_path / "plan.json")
    res = torchrun(4, tmp_path / "plan.json", "--check", "--cp", "ring", "--trace", str(tmp_path / "trace.json"),
                   cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=6)
    doc = json.loads((tmp_path / "trace.json").read_text())
    f32, d, layers = 4, 16, 2
    # unit 0, pure Ulysses u = 2: 94 local tokens (76 + 18); per layer forward Q/K/V share ((4 + 2·2) / 2
    # heads) and output share (4 / 2 heads) to the one peer, backward the same again
    t = 94
    assert _sent(doc, 0, 0) == layers * 2 * t * d * f32 * (4 + 2)
    # unit 1, 2D u = 2 × ring 2: 52 local tokens (203 over 8 chunks of 26), a group holds 104; the ring
    # moves one K/V head share [2, 1, 104, 16] once forward, once backward, plus 2 dK/dV accumulators
    t, kv = 52, 2 * 1 * 104 * d * f32
    assert _sent(doc, 1, 0) == layers * (2 * t * d * f32 * (4 + 2) + kv * 4)
    # unit 5 says allgather under --cp ring: K/V [2, 2, 24, 16] to 2 peers forward, dK/dV back (a ring over 3
    # would send 2 K/V forward, 2 K/V and 3 dK/dV backward)
    assert _sent(doc, 5, 1) == layers * 2 * 2 * (2 * 2 * 24 * d * f32)


@pytest.mark.torchrun
def test_gqa_pure_ulysses_over_the_kv_heads_and_2d_via_cli(tmp_path):
    """8 query heads over 4 KV heads: Ulysses over 4 ranks (one KV head each), a 2D unit, a ring
    unit; run as `meshplan replay PLAN --check` end to end."""
    gqa_plan(tp=1).save(tmp_path / "plan.json")
    (tmp_path / "gqa8.json").write_text(json.dumps(GQA8))
    res = meshplan("replay", "plan.json", "--nproc", "4", "--check", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json_lines(res.stdout)["check"][0]
    assert c["ranks"] == 4 and c["units"] == 3
    assert c["max_rel_grad_err"] < 1e-4 and c["loss_abs_err"] < 1e-5, c


@pytest.mark.torchrun
def test_ulysses_under_tensor_parallelism_matches_reference(tmp_path):
    """tp = 2 × 2 HDP ranks: each TP rank's 2 KV heads split over the Ulysses pair of that TP rank."""
    gqa_plan(tp=2).save(tmp_path / "plan.json")
    (tmp_path / "gqa8.json").write_text(json.dumps(GQA8))
    res = torchrun(4, tmp_path / "plan.json", "--check", "--steps", "2", cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=2)


@pytest.mark.torchrun
def test_ulysses_unit_in_a_pipeline_matches_reference(tmp_path):
    """pp = 2 over 2 pipelines, 1F1B: the unit both pipelines share runs pure Ulysses on each stage
    (between the two ranks of that stage), two steps, tied embedding."""
    with_kinds(pipelined_plan("1f1b"), {0: (2, None)}).save(tmp_path / "plan.json")
    (tmp_path / "deep.json").write_text(json.dumps(DEEP_TIED))
    res = torchrun(4, tmp_path / "plan.json", "--check", "--model", "deep.json", cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=4 + 2)
