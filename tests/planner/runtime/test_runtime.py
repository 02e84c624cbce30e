"""planner/runtime: layout and offload in one process; the replay itself under torchrun (gloo, CPU,
2-4 processes, tiny model), compared with the single-process reference of `--check`."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from planner.plan import (Mesh, Piece, PipelineSection, Plan, Predicted, Sequence, Step, Unit, validate,  # noqa: E402
                          zigzag_tokens_per_rank)
from planner.runtime.cp import PackedAttention, attention_mask, shard_layout, unit_documents  # noqa: E402
from planner.runtime.check import ReferenceAttention  # noqa: E402
from planner.runtime.model import ModelConfig, SequenceTokens, TokenSource, build_model  # noqa: E402
from planner.runtime.offload import Offloader, parameter_pointers  # noqa: E402
from planner.runtime.inputs import unit_inputs  # noqa: E402
from planner.runtime.step import token_loss  # noqa: E402
from costmodel.presets import load_model  # noqa: E402
from costmodel.specs import ModelSpec  # noqa: E402
from planner.runtime.launch import preflight  # noqa: E402

GRAD_TOL = 1e-4  # fp32: max relative gradient error vs the single-process reference
LOSS_TOL = 1e-5
# bf16 vs a bf16 reference: both round activations to bf16 (8-bit mantissa, 2^-8 ≈ 0.4% per rounding) but
# at different points (ring blocks merged in fp32, per-unit vs per-sequence losses), so gradients agree to a
# few bf16 ulps after a dozen roundings, not to fp32's summation-order noise
BF16_GRAD_TOL = 3e-2
BF16_LOSS_TOL = 1e-2
TIMEOUT_S = 180


# -- hand-built plans -----------------------------------------------------------------------------

def make_step(step: int, hdp: int, seqs: dict[int, int], units: list[tuple], order: dict[int, list[int]]) -> Step:
    """units: (id, hdp_ranks, [(seq, start, end), ...], offload_ratio)."""
    return Step(step=step, global_tokens=sum(seqs.values()), sequences=[Sequence(i, n) for i, n in seqs.items()],
                units=[Unit(id=i, hdp_ranks=tuple(r), pieces=tuple(Piece(*p) for p in ps), offload_ratio=o,
                            tokens_per_rank=zigzag_tokens_per_rank([p[2] - p[1] for p in ps], len(r)))
                       for i, r, ps, o in units],
                order=order, predicted=Predicted(1.0, 0.5, [0.5] * hdp, [1e6] * hdp))


def make_plan(hdp: int, steps: list[Step]) -> Plan:
    plan = Plan(meta={"model": "tiny", "strategy": "hand-built"}, mesh=Mesh(hdp, 1, 1, hdp), steps=steps)
    validate(plan)
    return plan


def mixed_plan_3() -> Plan:
    """3 ranks: a packed bin; a unit on all 3 ranks with uneven documents (121, 23: not multiples of
    2N = 6, so padding); a 2-rank unit holding the tail of a split sequence; a sequence whose two
    pieces on rank 2 are not contiguous (its middle is on rank 0); offload 0.3, 0.5 and 1.0;
    3, 2 and 3 units per rank."""
    seqs = {0: 37, 1: 50, 2: 23, 3: 121, 4: 64, 5: 90, 6: 60}
    units = [(0, [0], [(0, 0, 37), (1, 0, 50)], 0.0),
             (1, [0, 1, 2], [(3, 0, 121), (2, 0, 23)], 0.0),
             (2, [1, 2], [(4, 0, 64), (5, 40, 90)], 0.3),
             (3, [0], [(5, 0, 40), (6, 20, 40)], 0.5),
             (4, [2], [(6, 0, 20), (6, 40, 60)], 1.0)]
    return make_plan(3, [make_step(0, 3, seqs, units, {0: [0, 1, 3], 1: [1, 2], 2: [1, 2, 4]})])


def pairs_plan_4() -> Plan:
    """4 ranks, two steps: disjoint pairs, an overlapping pair, a 4-rank unit (150 and 203 tokens over
    2N = 8: padding), a sequence split in three units; in step 1 rank 3 has no unit at all."""
    seqs = {0: 150, 1: 33, 2: 97, 3: 80, 4: 61, 5: 12, 6: 45, 7: 203}
    units = [(0, [0, 1], [(0, 0, 150), (1, 0, 33)], 0.0),
             (1, [2, 3], [(2, 0, 97)], 0.5),
             (2, [1, 2], [(3, 0, 80), (4, 45, 61)], 0.0),
             (3, [0], [(4, 0, 30), (5, 0, 12)], 0.0),
             (4, [0], [(6, 0, 45)], 1.0),
             (5, [3], [(4, 30, 45)], 0.0),
             (6, [0, 1, 2, 3], [(7, 0, 203)], 0.25)]
    s0 = make_step(0, 4, seqs, units, {0: [0, 3, 4, 6], 1: [0, 2, 6], 2: [1, 2, 6], 3: [1, 5, 6]})
    seqs1 = {10: 150, 11: 70, 12: 9}
    units1 = [(0, [0, 1, 2], [(10, 0, 150)], 0.0), (1, [2], [(11, 0, 70)], 0.0), (2, [1], [(12, 0, 9)], 0.0)]
    s1 = make_step(1, 4, seqs1, units1, {0: [0], 1: [0, 2], 2: [0, 1]})
    return make_plan(4, [s0, s1])


def without_offload(plan: Plan) -> Plan:
    return Plan(meta=plan.meta, mesh=plan.mesh, steps=[
        replace(s, units=[replace(u, offload_ratio=0.0) for u in s.units]) for s in plan.steps])


DEEP_TIED = {"name": "tiny-deep-tied", "layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
             "ffn": 128, "vocab": 256, "tied_embeddings": True, "source": "tests: 4 layers, tied embedding"}


def pipelined_plan(schedule: str = "sliced", v: int = 1, tp: int = 1) -> Plan:
    """pp = 2 over 2 pipelines, two steps. Step 0: a unit shared by both pipelines (CP over 2 ranks on
    each stage) with two documents in 3 slices; a 2-slice unit with offload 0.5; a packed bin
    unsliced; pipelines with 2 and 3 micro-batches. Step 1: a shared unsliced unit (ring CP).
    `schedule`/`v` other than sliced: every unit unsliced."""
    seqs = {0: 150, 1: 33, 2: 97, 3: 80, 4: 61, 5: 12}
    units = [(0, [0, 1], [(0, 0, 150), (1, 0, 33)], 0.0),
             (1, [0], [(2, 0, 97)], 0.0),
             (2, [1], [(3, 0, 80), (4, 0, 61)], 0.5),
             (3, [1], [(5, 0, 12)], 0.0)]
    st0 = make_step(0, 2, seqs, units, {0: [0, 1], 1: [0, 2, 3]})
    slices = {0: 3, 1: 2, 2: 2, 3: 1} if schedule == "sliced" else {}
    st0 = replace(st0, units=[replace(u, slices=slices.get(u.id, 1)) for u in st0.units],
                  pipeline=PipelineSection(schedule, v))
    st1 = replace(make_step(1, 2, {7: 90, 8: 40}, [(0, [0, 1], [(7, 0, 90)], 0.0), (1, [1], [(8, 0, 40)], 0.25)],
                            {0: [0], 1: [0, 1]}), pipeline=PipelineSection("1f1b" if v == 1 else schedule, v))
    plan = Plan(meta={"model": "tiny", "strategy": "hand-built"}, mesh=Mesh(4 * tp, tp, 2, 2), steps=[st0, st1])
    validate(plan)
    return plan


# -- running --------------------------------------------------------------------------------------

def torchrun(nproc: int, plan: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "planner.runtime", str(plan), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**_env(), "OMP_NUM_THREADS": "1"})


def meshplan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cli import app; app()", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=_env())


def _env() -> dict[str, str]:
    """This environment without a surrounding torchrun's rank variables."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}


def json_lines(out: str) -> dict[str, list[dict]]:
    got: dict[str, list[dict]] = {}
    for line in out.splitlines():
        if line.startswith("{"):
            (k, v), = json.loads(line).items()
            got.setdefault(k, []).append(v)
    return got


def assert_matches_reference(res: subprocess.CompletedProcess, ranks: int, units: int) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    lines = json_lines(res.stdout)
    assert len(lines["check"]) == 1, res.stdout
    c = lines["check"][0]
    assert c["ranks"] == ranks and c["units"] == units
    assert c["max_rel_grad_err"] < GRAD_TOL, c
    assert c["loss_abs_err"] < LOSS_TOL, c
    return lines


@pytest.fixture(scope="module")
def mixed_ring(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    mixed_plan_3().save(d / "plan.json")
    res = torchrun(3, d / "plan.json", "--check", "--steps", "2", "--cp", "ring", "--trace", str(d / "trace.json"),
                   cwd=d)
    return d, res


# -- one process: layout, attention, offload, tokens -------------------------------------------

@pytest.mark.parametrize("lengths,degree", [([121, 23], 3), ([150, 33], 2), ([203], 4), ([37, 50], 1), ([5], 4)])
def test_zigzag_layout_covers_every_token_once(lengths, degree):
    docs = unit_documents(tuple(Piece(i, 0, n) for i, n in enumerate(lengths)))
    lays = [shard_layout(docs, degree, j) for j in range(degree)]
    assert {lay.tokens for lay in lays} == {zigzag_tokens_per_rank(lengths, degree)}
    real = sorted((int(s), int(p)) for lay in lays for s, p, v in zip(lay.seq, lay.pos, lay.valid) if v)
    assert real == [(i, p) for i, n in enumerate(lengths) for p in range(n)]
    keys = torch.cat([lay.key for lay in lays])
    assert keys.unique().numel() == keys.numel()  # padding included: every slot distinct
    if degree > 1:  # member 0 holds the first and the last chunk of each document
        c = -(-lengths[0] // (2 * degree))
        assert lays[0].pos[:c].tolist() == list(range(c))
        assert lays[0].pos[c:2 * c][lays[0].valid[c:2 * c]].tolist() == list(range((2 * degree - 1) * c, lengths[0]))


def test_mask_is_causal_per_document_and_padding_sees_only_itself():
    docs = unit_documents((Piece(7, 0, 5), Piece(8, 10, 13)))  # 5 and 3 tokens over 2 ranks: 8 slots each
    lays = [shard_layout(docs, 2, j) for j in range(2)]
    mask = torch.cat([attention_mask(lays[0], lay) for lay in lays], dim=1)
    q = lays[0]
    keys = [(int(s), int(p), bool(v), int(k))
            for lay in lays for s, p, v, k in zip(lay.seq, lay.pos, lay.valid, lay.key)]
    for i in range(q.tokens):
        for j, (s, p, v, k) in enumerate(keys):
            if bool(q.valid[i]):
                want = v and s == int(q.seq[i]) and p <= int(q.pos[i])
            else:
                want = k == int(q.key[i])
            assert bool(mask[i, j]) == want, (i, j)


def test_split_piece_positions_are_true_sequence_positions():
    docs = unit_documents((Piece(3, 40, 44), Piece(3, 10, 12)))  # two pieces of one sequence: one document
    assert len(docs) == 1 and docs[0].positions.tolist() == [10, 11, 40, 41, 42, 43]
    toks = {3: SequenceTokens(torch.arange(100, 150), torch.arange(101, 151))}
    inp, lab, pos = unit_inputs(toks, shard_layout(docs, 1, 0))
    assert inp.tolist() == [110, 111, 140, 141, 142, 143] and lab.tolist() == [111, 112, 141, 142, 143, 144]


def _loss_and_grads(model, step: Step, unit: Unit, tokens, offload_ratio: float):
    model.zero_grad(set_to_none=True)
    lay = shard_layout(unit_documents(unit.pieces), 1, 0)
    inp, lab, pos = unit_inputs(tokens, lay)
    off = Offloader(offload_ratio, parameter_pointers(model))
    with off.active():
        loss = token_loss(model, model(inp, pos, PackedAttention(lay)), lab, step.global_tokens)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()], off.stats


def test_offload_gives_bitwise_identical_gradients_and_hits_the_ratio():
    step = mixed_plan_3().steps[0]
    unit = step.units[0]
    model = build_model(ModelConfig(load_model("tiny")), seed=1, device=torch.device("cpu"))
    tokens = TokenSource(256, seed=0).tokens(0, step.sequences)
    base_loss, base, stats0 = _loss_and_grads(model, step, unit, tokens, 0.0)
    assert stats0.offloaded_bytes == 0 and stats0.saved_bytes > 0
    for r in (0.3, 0.5, 1.0):
        loss, grads, stats = _loss_and_grads(model, step, unit, tokens, r)
        assert loss == base_loss
        assert all(torch.equal(a, b) for a, b in zip(grads, base))
        assert stats.saved_bytes == stats0.saved_bytes
        assert 0 < stats.offloaded_bytes <= r * stats.saved_bytes + 1e-9
        assert stats.achieved_ratio > r - 0.25  # greedy by whole tensors: close to r
    assert stats.achieved_ratio == 1.0


def test_packed_bin_equals_per_sequence_reference():
    """A packed bin (per-document masks, positions restarting per document) gives the same logits
    as each sequence run alone."""
    step = mixed_plan_3().steps[0]
    unit = step.units[0]  # sequences 0 and 1, whole
    model = build_model(ModelConfig(load_model("tiny")), seed=3, device=torch.device("cpu"))
    tokens = TokenSource(256, seed=5).tokens(0, step.sequences)
    lay = shard_layout(unit_documents(unit.pieces), 1, 0)
    inp, _, pos = unit_inputs(tokens, lay)
    with torch.no_grad():
        packed = model(inp, pos, PackedAttention(lay))
        alone = [model(tokens[s].ids, torch.arange(n), ReferenceAttention(torch.zeros(n, dtype=torch.long)))
                 for s, n in ((0, 37), (1, 50))]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,kernel,block", [(4, "auto", None), (3, "math", 16)])  # default; many small block pairs
def test_sliced_attention_with_kv_cache_equals_whole_unit(n, kernel, block):
    """A unit run as n slices (forward in order against the KV cache, backward in reverse feeding the
    accumulated dK/dV) gives the loss and gradients of the unit run whole."""
    from planner.runtime.cp import KVCache, Peers, SlicedAttention, slice_layout

    step = pairs_plan_4().steps[0]
    unit = replace(step.units[0], hdp_ranks=(0,))  # sequences 0 (150) and 1 (33) packed on one rank
    model = build_model(ModelConfig(load_model("tiny")), seed=3, device=torch.device("cpu"))
    tokens = TokenSource(256, seed=5).tokens(0, step.sequences)
    docs = unit_documents(unit.pieces)
    lay = shard_layout(docs, 1, 0)
    inp, lab, pos = unit_inputs(tokens, lay)
    whole = token_loss(model, model(inp, pos, PackedAttention(lay)), lab, step.global_tokens)
    whole.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    cache, peers = KVCache(), Peers((0,), 0)
    layouts = [[slice_layout(docs, n, j, 1, 0)] for j in range(n)]
    losses = []
    for j in range(n):
        i, lb, ps = unit_inputs(tokens, layouts[j][0])
        attn = SlicedAttention(layouts, j, peers, cache, torch.device("cpu"), kernel=kernel, block=block)
        losses.append(token_loss(model, model(i, ps, attn), lb, step.global_tokens))
    assert sum(lay[0].tokens for lay in layouts) == lay.tokens
    for j in reversed(range(n)):
        roots, grads = cache.backward_roots(j, range(model.cfg.spec.layers))
        assert bool(roots) == (j < n - 1)  # every slice but the last has dK/dV from later slices
        torch.autograd.backward([losses[j], *roots], [None, *grads])
    assert not cache.outs and not cache.leaves
    assert abs(sum(float(x.detach()) for x in losses) - float(whole.detach())) < 1e-6
    for g, w in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_stage_layers_and_parameters_partition_the_model():
    from planner.runtime.model import stage_parameters, virtual_stage_layers

    assert virtual_stage_layers(10, 2, 2) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(Exception, match="fewer than pp × v"):
        virtual_stage_layers(3, 2, 2)
    for tied in (False, True):
        cfg = ModelConfig(replace(load_model("tiny"), layers=4, tied_embeddings=tied))
        model = build_model(cfg, seed=0, device=torch.device("cpu"))
        ranges = tuple(virtual_stage_layers(4, 2, 2))
        owners = [{id(p) for p in stage_parameters(model, ranges, 2, s)} for s in range(2)]
        every = {id(p) for p in model.parameters()}
        assert owners[0] | owners[1] == every
        shared = owners[0] & owners[1]
        assert shared == ({id(model.embed.weight)} if tied else set())
        # stage 0 holds layers 0 and 2 (chunks 0 and 1), stage 1 layers 1 and 3
        up = [layer.mlp.gate_up.weight for layer in model.layers]
        assert id(up[2]) in owners[0] and id(up[1]) in owners[1]


def test_tokens_are_deterministic_per_sequence_and_read_from_a_file(tmp_path):
    seqs = [Sequence(4, 10), Sequence(9, 6)]
    a = TokenSource(256, seed=2).tokens(3, seqs)
    b = TokenSource(256, seed=2).tokens(3, seqs[::-1], wanted={9})
    assert torch.equal(a[9].ids, b[9].ids) and a[4].ids.shape == a[4].labels.shape == (10,)
    assert torch.equal(a[4].ids[1:], a[4].labels[:-1])  # generated: one extra id, the last label
    assert not torch.equal(a[9].ids, TokenSource(256, seed=2).tokens(4, seqs)[9].ids)  # a new step, new tokens
    np.save(tmp_path / "t.npy", np.arange(20, dtype=np.uint16))
    f = TokenSource(256, seed=0, path=str(tmp_path / "t.npy")).tokens(0, seqs, stream_offset=15)
    assert f[4].ids.tolist() == [15, 16, 17, 18, 19, 0, 1, 2, 3, 4]  # the file is read as a ring
    assert f[9].ids.tolist() == [5, 6, 7, 8, 9, 10]  # starts where sequence 4's `length` tokens end
    # labels stay inside the document: not across the wrap (a new document), not into the next sequence
    assert f[4].labels.tolist() == [16, 17, 18, 19, -100, 1, 2, 3, 4, -100]
    assert f[9].labels.tolist() == [6, 7, 8, 9, 10, -100]


# -- torchrun --------------------------------------------------------------------------------------

@pytest.mark.torchrun
def test_mixed_plan_ring_matches_reference_and_writes_trace(mixed_ring):
    d, res = mixed_ring
    lines = assert_matches_reference(res, ranks=3, units=2 * 5)
    assert [s["step"] for s in lines["step"]] == [0, 1]  # --steps 2 cycles the one-step plan
    doc = json.loads((d / "trace.json").read_text())
    assert doc["complete"] and doc["meta"]["cp_impl"] == "ring" and len(doc["steps"]) == 2
    probe = doc["meta"]["host_probe"]  # rank 0 alone, before and after the steps: milliseconds per call
    assert all(1e-4 < probe[k] < 1 for k in ("before_s", "after_s"))
    # set-up's objects (the model, the plan, the libraries) frozen out of the collector's walks before step 0
    assert doc["meta"]["gc_frozen_objects"] > 10_000
    assert all(0 <= r["gc_s"] < r["wall_s"] for s in doc["steps"] for r in s["ranks"])
    units = doc["steps"][0]["units"]
    assert len(units) == 3 + 2 + 3  # one record per (rank, unit)
    by = {(u["rank"], u["unit"]): u for u in units}
    assert by[(0, 1)]["sent_bytes"] > 0 and by[(0, 0)]["sent_bytes"] == 0
    assert by[(2, 4)]["offloaded_bytes"] == by[(2, 4)]["saved_bytes"] > 0
    assert by[(0, 0)]["offloaded_bytes"] == 0
    assert by[(1, 1)]["tokens"] == 2 * 21 + 2 * 4  # zigzag over 3 ranks: 121 -> 126, 23 -> 24
    assert all(u["fwd_s"] > 0 and u["bwd_s"] > 0 for u in units)
    # the rank's own thread computed the unit (autograd's CPU backward included), within its wall time; gloo's
    # threads moved the ring's K/V. 2 ms of slack: the clocks tick apart
    assert all(0 < u["thread_cpu_s"] <= u["fwd_s"] + u["bwd_s"] + 2e-3 for u in units)
    assert all(u["helper_cpu_s"] >= 0 for u in units)
    chrome = json.loads((d / "trace.chrome.json").read_text())
    assert sum(e.get("cat") == "forward" for e in chrome["traceEvents"]) == 2 * 8


@pytest.mark.torchrun
def test_mixed_plan_allgather_matches_reference(tmp_path):
    mixed_plan_3().save(tmp_path / "plan.json")
    res = torchrun(3, tmp_path / "plan.json", "--check", "--cp", "allgather", cwd=tmp_path)
    assert_matches_reference(res, ranks=3, units=5)


@pytest.mark.torchrun
def test_offload_on_and_off_give_identical_results(mixed_ring, tmp_path):
    _, on = mixed_ring
    without_offload(mixed_plan_3()).save(tmp_path / "plan.json")
    off = torchrun(3, tmp_path / "plan.json", "--check", "--steps", "2", "--cp", "ring", cwd=tmp_path)
    a, b = json_lines(on.stdout), json_lines(off.stdout)
    assert off.returncode == 0, off.stderr[-3000:]
    # Same gradients bit for bit: the same error against the reference, the same losses after an
    # optimizer step taken on those gradients.
    assert a["check"] == b["check"]
    assert [s["loss"] for s in a["step"]] == [s["loss"] for s in b["step"]]


@pytest.mark.torchrun
def test_bf16_ring_matches_a_bf16_reference(tmp_path):
    mixed_plan_3().save(tmp_path / "plan.json")
    res = torchrun(3, tmp_path / "plan.json", "--check", "--dtype", "bf16", "--cp", "ring",
                   "--trace", str(tmp_path / "trace.json"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json_lines(res.stdout)["check"][0]
    assert c["max_rel_grad_err"] < BF16_GRAD_TOL and c["loss_abs_err"] < BF16_LOSS_TOL, c
    meta = json.loads((tmp_path / "trace.json").read_text())["meta"]
    assert meta["dtype"] == "bf16" and meta["recompute"] == "none"


@pytest.mark.torchrun
def test_the_plans_recompute_policy_leaves_gradients_unchanged(mixed_ring, tmp_path):
    _, base = mixed_ring
    plan = mixed_plan_3()
    plan.meta["training"] = {"recompute": "full"}  # what `meshplan plan` writes (TrainingSpec.to_dict)
    plan.save(tmp_path / "plan.json")
    res = torchrun(3, tmp_path / "plan.json", "--check", "--steps", "2", "--cp", "ring",
                   "--trace", str(tmp_path / "trace.json"), cwd=tmp_path)
    lines = assert_matches_reference(res, ranks=3, units=2 * 5)
    assert json.loads((tmp_path / "trace.json").read_text())["meta"]["recompute"] == "full"
    # step 1 ran after an optimizer step on step 0's gradients: equal losses mean equal gradients
    for a, b in zip(lines["step"], json_lines(base.stdout)["step"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


@pytest.mark.torchrun
def test_cli_replay_four_ranks_math_kernel_token_file_sgd_rendezvous_passthrough(tmp_path):
    pairs_plan_4().save(tmp_path / "plan.json")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 256, 5000).astype(np.int32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = meshplan("replay", "plan.json", "--nproc", "4", "--check", "--optimizer", "sgd", "--lr", "0.1",
                   "--ring-kernel", "math",
                   "--tokens", "tokens.npy", "--nnodes", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test", cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=7 + 3)


@pytest.mark.torchrun
def test_plans_from_every_strategy_match_reference(tmp_path):
    from planner.api import PlanRequest, make_plan as plan_with

    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, profile="h100-sxm.analytic",
                      lengths="lognormal:median=60,sigma=1.0,max=300", tokens_per_step=1200,
                      max_context_tokens=300, capacity_tokens=200, seed=3)
    steps = []
    for i, name in enumerate(("static", "dcp", "hdp-naive", "hdp")):
        st = plan_with(req, name).steps[0]
        steps.append(replace(st, step=i))
    assert any(u.degree > 1 for s in steps for u in s.units) and any(u.degree == 1 for s in steps for u in s.units)
    plan = Plan(meta={"model": "tiny"}, mesh=Mesh(4, 1, 1, 4), steps=steps)
    validate(plan)
    plan.save(tmp_path / "plan.json")
    res = torchrun(4, tmp_path / "plan.json", "--check", cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=sum(len(s.units) for s in steps))


@pytest.mark.torchrun
def test_failing_rank_is_named_and_leaves_no_output(tmp_path):
    mixed_plan_3().save(tmp_path / "plan.json")
    (tmp_path / "trace.json").write_text('{"stale": true}\n')  # from an earlier run
    res = meshplan("replay", "plan.json", "--nproc", "3", "--check", "--trace", "trace.json",
                   "--inject-failure", "2:2", cwd=tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "replay failed: rank 2" in last and "unit 2" in last and "injected failure" in last, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "see above" not in res.stderr
    assert "check" not in json_lines(res.stdout) and "step" not in json_lines(res.stdout)
    assert not (tmp_path / "trace.json").exists() and not (tmp_path / "trace.chrome.json").exists()


def two_rank_plan() -> Plan:
    """2 ranks: a unit shared by both, then a packed bin on rank 1 (rank 0 goes on to the all-reduce)."""
    return make_plan(2, [make_step(0, 2, {0: 40, 1: 30}, [(0, [0, 1], [(0, 0, 40)], 0.0), (1, [1], [(1, 0, 30)], 0.0)],
                                   {0: [0], 1: [0, 1]})])


@pytest.mark.torchrun
def test_killed_rank_is_named_with_its_step_and_unit(tmp_path):
    """A rank that dies without a word (SIGKILL, as the out-of-memory killer does): one line names it,
    the signal, the step and the unit it was in; no traceback, no 'see above', exit code 1."""
    two_rank_plan().save(tmp_path / "plan.json")
    res = meshplan("replay", "plan.json", "--nproc", "2", "--inject-failure", "1:1:kill", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: replay failed: rank 1 was killed by SIGKILL in step 0 (plan step 0) unit 1 "
                                "(HDP ranks [1])"), res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "see above" not in res.stderr and "ChildFailedError" not in res.stderr
    assert len([x for x in lines if x.startswith("error:")]) == 1  # rank 0, stopped by its peer, says nothing


@pytest.mark.torchrun
def test_replay_builds_the_model_the_plan_priced(tmp_path):
    """A plan made from a model file names the file (meta.model) and embeds the spec it priced (meta.model_spec): the
    replay builds that spec on a machine without the file; --model still wins."""
    spec = dataclasses.asdict(load_model("tiny")) | {"name": "tiny-3l", "layers": 3}
    plan = mixed_plan_3()
    plan.meta.update(model="configs/tiny-3l.json", model_spec=spec)
    plan.save(tmp_path / "plan.json")
    assert preflight(tmp_path / "plan.json", 3)[1] == ModelSpec.from_dict(spec)
    assert preflight(tmp_path / "plan.json", 3, "tiny")[1] == load_model("tiny")


def test_runtime_refuses_world_size_mismatch(tmp_path):
    mixed_plan_3().save(tmp_path / "plan.json")
    res = torchrun(2, tmp_path / "plan.json", "--check", cwd=tmp_path)
    assert res.returncode != 0
    assert "world_size 3" in res.stderr and "this job has 2 processes" in res.stderr
    assert res.stderr.count("error: ") == 1  # said once, by rank 0
    assert res.stdout.strip() == ""


@pytest.mark.torchrun
@pytest.mark.parametrize("schedule,v", [("sliced", 1), ("interleaved", 2), ("sliced", 2)])
def test_pipelined_replay_matches_reference(tmp_path, schedule, v):
    """pp = 2: sliced 1F1B with the KV cache (shared CP unit in 3 slices, offload) or interleaved
    chunks; a tied embedding split over the first and last stage; 3 iterations (the reference
    follows every stage's optimizer steps)."""
    pipelined_plan(schedule, v).save(tmp_path / "plan.json")
    (tmp_path / "deep.json").write_text(json.dumps(DEEP_TIED))
    res = torchrun(4, tmp_path / "plan.json", "--check", "--steps", "3", "--model", "deep.json", cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=4 + 2 + 4)


@pytest.mark.torchrun
def test_tensor_parallel_replay_matches_reference(tmp_path):
    """tp = 2 on the 3-rank mixed plan (6 processes): heads and FFN split per TP group, context
    parallelism between the same TP rank of different HDP ranks, offload."""
    plan = mixed_plan_3()
    plan = Plan(meta=plan.meta, mesh=Mesh(6, 2, 1, 3), steps=plan.steps)
    validate(plan)
    plan.save(tmp_path / "plan.json")
    res = torchrun(6, tmp_path / "plan.json", "--check", "--steps", "2", "--cp", "allgather", "--trace",
                   str(tmp_path / "trace.json"), cwd=tmp_path)
    assert_matches_reference(res, ranks=6, units=10)
    recs = [u for st in json.loads((tmp_path / "trace.json").read_text())["steps"] for u in st["units"]]
    # every unit's layers all-reduce over its TP pair: time in them, within the unit's own
    assert recs and all(0 < r["tp_wait_s"] < r["fwd_s"] + r["bwd_s"] for r in recs)


@pytest.mark.torchrun
def test_tensor_and_pipeline_parallel_replay_matches_reference(tmp_path):
    """tp = 2 × pp = 2 × 2 pipelines (8 processes): sliced shared unit, tied embedding."""
    pipelined_plan(tp=2).save(tmp_path / "plan.json")
    (tmp_path / "deep.json").write_text(json.dumps(DEEP_TIED))
    res = torchrun(8, tmp_path / "plan.json", "--check", "--steps", "2", "--model", "deep.json", "--trace",
                   str(tmp_path / "trace.json"), cwd=tmp_path)
    assert_matches_reference(res, ranks=8, units=6)
    recs = json.loads((tmp_path / "trace.json").read_text())["steps"][0]["units"]
    assert recs and all(r["tp_wait_s"] > 0 for r in recs)  # a pipelined unit's ops, each stage's TP pair


@pytest.mark.torchrun
def test_planned_pipeline_replays_and_traces_per_stage(tmp_path):
    """An hdp plan with pp = 2 (long sequences sliced by the planner) replays with the reference's
    gradients; the trace carries per-stage ops and `simulate --measured` compares per stage."""
    from planner.api import PlanRequest, make_plan as plan_with

    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, pp=2,
                      lengths="lognormal:median=100,sigma=1.0,max=300", tokens_per_step=1200, max_context_tokens=300,
                      capacity_tokens=200, seed=3)
    plan = plan_with(req, "hdp")
    assert any(u.slices > 1 for u in plan.steps[0].units)
    plan.save(tmp_path / "plan.json")
    res = torchrun(4, tmp_path / "plan.json", "--check", "--trace", str(tmp_path / "trace.json"), cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=len(plan.steps[0].units))
    doc = json.loads((tmp_path / "trace.json").read_text())
    recs = doc["steps"][0]["units"]
    assert {r["stage"] for r in recs} == {0, 1} and all(r["tp_wait_s"] == 0 for r in recs)  # tp = 1
    sliced = [r for r in recs if r["slices"] > 1]
    assert sliced and all(len(r["ops"]) == 2 * r["slices"] for r in sliced)
    assert all(0 < r["thread_cpu_s"] <= sum(o[4] for o in r["ops"]) + 2e-3 for r in recs)  # over its ops alone
    assert all(r["thread_cpu_s"] == pytest.approx(sum(o[5] for o in r["ops"])) for r in recs)  # each op's CPU
    res = meshplan("simulate", "plan.json", "--measured", "trace.json", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["measured"]
    assert {(u["unit"], u["stage"]) for u in got["units"]} == {(u.id, s) for u in plan.steps[0].units for s in (0, 1)}
    assert {(o["unit"], o["stage"], o["kind"], o["slice"]) for o in got["ops"]} == {
        (u.id, s, k, j) for u in plan.steps[0].units for s in (0, 1) for k in "FB" for j in range(u.slices)}


@pytest.mark.torchrun
def test_uneven_pipeline_stages_replay_matches_reference(tmp_path):
    """pp = 2 over a 3-layer model: the stages split 2 + 1 (virtual_stage_layers), the plan is priced at the busier
    stage's 2 layers (Setup.layers_per_stage) with no more chunks than layers; the gradients are one process's."""
    from planner.api import PlanRequest, make_plan as plan_with

    (tmp_path / "tiny3.json").write_text(json.dumps({**load_model("tiny").to_dict(), "name": "tiny3", "layers": 3}))
    req = PlanRequest(model=str(tmp_path / "tiny3.json"), cluster="local-cpu", gpus=4, pp=2,
                      lengths="lognormal:median=60,sigma=1.0,max=300", tokens_per_step=1200, max_context_tokens=300,
                      capacity_tokens=200, seed=3)
    plan = plan_with(req, "hdp")
    assert plan.meta["layers_per_stage"] == 2
    assert all((st.pipeline or PipelineSection()).v == 1 for st in plan.steps)  # 2 x 2 chunks would need 4 layers
    plan.save(tmp_path / "plan.json")
    res = torchrun(4, tmp_path / "plan.json", "--check", "--model", "tiny3.json", cwd=tmp_path)
    assert_matches_reference(res, ranks=4, units=len(plan.steps[0].units))


# -- refused before anything starts (no torchrun launched) ----------------------------------------

def _corrupt_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = mixed_plan_3()
    good.save(tmp_path / "good.json")
    text = (tmp_path / "good.json").read_text()
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    d = json.loads(text)
    d["steps"][0]["units"][0]["pieces"][0]["end"] = 30  # sequence 0 loses 7 tokens
    d["steps"][0]["units"][0]["tokens_per_rank"] = 0  # (0: not stated, so coverage is what fails)
    (tmp_path / "gap.json").write_text(json.dumps(d))
    tp = json.loads(text)
    tp["mesh"] = {"world_size": 12, "tp": 4, "pp": 1, "hdp": 3}  # tiny has 2 KV heads
    (tmp_path / "tp.json").write_text(json.dumps(tp))
    (tmp_path / "odd_vocab.json").write_text(json.dumps({**DEEP_TIED, "name": "odd-vocab", "vocab": 255}))
    (tmp_path / "windowed.json").write_text(json.dumps({**DEEP_TIED, "name": "windowed", "sliding_window": 16}))
    (tmp_path / "chunked.json").write_text(json.dumps({**DEEP_TIED, "name": "chunked", "attention_chunk": 16}))
    tp2 = json.loads(text)
    tp2["mesh"] = {"world_size": 6, "tp": 2, "pp": 1, "hdp": 3}
    (tmp_path / "tp2.json").write_text(json.dumps(tp2))
    pp = json.loads(text)
    pp["mesh"] = {"world_size": 12, "tp": 1, "pp": 4, "hdp": 3}  # tiny has 2 layers
    (tmp_path / "pp.json").write_text(json.dumps(pp))
    sliced = pipelined_plan()
    sliced.save(tmp_path / "sliced.json")
    # unit 2 holds 141 tokens (validate passes 100 slices) but its longest document only 80
    sliced.steps[0].units[2] = replace(sliced.steps[0].units[2], slices=100)
    sliced.save(tmp_path / "slices.json")
    mixed_v = pipelined_plan()
    mixed_v.steps[1].pipeline = PipelineSection("interleaved", 2)
    mixed_v.save(tmp_path / "mixed_v.json")
    moe = json.loads(text)
    moe["meta"]["model"] = "mistral-8x7b"
    (tmp_path / "moe.json").write_text(json.dumps(moe))
    gpt = json.loads(text)
    gpt["meta"]["model"] = "gpt-22b"
    (tmp_path / "gpt.json").write_text(json.dumps(gpt))
    mtp = json.loads(text)
    mtp["meta"]["training"] = {**(mtp["meta"].get("training") or {}), "mtp_layers": 1}
    (tmp_path / "mtp.json").write_text(json.dumps(mtp))
    return [(["truncated.json", "--nproc", "3"], "truncated or corrupt plan JSON"),
            (["gap.json", "--nproc", "3"], "sequence 0 covers 30 of 37 tokens"),
            (["good.json", "--nproc", "4"], "the plan is for world_size 3"),
            (["tp.json", "--nproc", "12"], "kv_heads = 2 does not split over tp = 4"),
            (["tp2.json", "--nproc", "6", "--model", "odd_vocab.json"], "vocab = 255 does not split over tp = 2"),
            (["pp.json", "--nproc", "12"], "has 2 layers, fewer than the plan's 4 pipeline chunks"),
            (["slices.json", "--nproc", "4"], "unit 2 has 100 slices but its longest document only 80 tokens"),
            (["mixed_v.json", "--nproc", "4"], "steps use different chunk counts v [1, 2]"),
            (["moe.json", "--nproc", "3"], "MoE replay is not implemented"),
            (["mtp.json", "--nproc", "3"], "the replay runs no MTP depths"),
            (["gpt.json", "--nproc", "3"], "replay builds Llama-style blocks"),
            (["good.json", "--nproc", "3", "--model", "windowed.json"], "sliding_window 16 is shorter than the plan's"),
            (["good.json", "--nproc", "3", "--model", "chunked.json"], "attention_chunk 16 is shorter than the plan's"),
            (["sliced.json", "--nproc", "4", "--recompute", "full"], "with sliced units (slices > 1) is not"),
            (["good.json", "--nproc", "3", "--recompute", "auto"], "--recompute is 'auto'; the replay applies one of"),
            (["good.json", "--nproc", "3", "--dtype", "fp16"], "unknown --dtype 'fp16'"),
            (["good.json", "--nproc", "3", "--model", "nope"], "unknown model 'nope'")]


def test_cli_refuses_bad_plans_with_one_line(tmp_path, monkeypatch, capsys):
    from cli import app

    monkeypatch.chdir(tmp_path)
    for args, message in _corrupt_cases(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            app(["replay", *args], prog_name="meshplan")
        out = capsys.readouterr()
        err = " ".join(out.err.split())  # rich wraps long lines
        assert exit_.value.code == 2, (args, out.err)
        assert err.startswith("error:") and message in err and "Traceback" not in err, (args, out.err)
        assert out.out == ""


def test_check_holds_every_rank_until_rank_0s_reference_is_done(monkeypatch):
    """--check: rank 0 runs the reference between the sync and the optimizer, then every rank meets it in a barrier
    there, outside the timed phases; without it the other ranks' next step waited for rank 0 in its rings and
    all-reduce, and a traced replay's later steps carried the reference's time."""
    from types import SimpleNamespace

    from planner.runtime import check as check_mod

    calls: list[str] = []
    monkeypatch.setattr(check_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(check_mod.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(check_mod, "reference_step", lambda *a: calls.append("reference") or 1.0)
    monkeypatch.setattr(check_mod, "max_rel_grad_err", lambda *a: 0.0)
    ctx = SimpleNamespace(position=SimpleNamespace(set=lambda text: None), device="cpu", model=None, full=None,
                          tokens=SimpleNamespace(tokens=lambda *a: {}))
    work = SimpleNamespace(it=0, stream_offset=0, step=SimpleNamespace(step=0, sequences=[], units=[]))
    other = check_mod.Check()  # a rank that holds no reference only waits
    other.compare(ctx, work, 1.0)
    assert calls == ["barrier"]
    calls.clear()
    rank0 = check_mod.Check()
    rank0._reference = object()
    rank0.compare(ctx, work, 1.0)
    assert calls == ["reference", "barrier"] and rank0.result.loss_abs_err == 0.0
