"""planner/runtime/model.py in one process: tokens from a Megatron .bin/.idx pair with labels inside each
document, recompute (gradients unchanged, forward really rerun), bf16 autocast with fp32 master weights."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from costmodel.presets import load_model  # noqa: E402
from planner.plan import Piece, PlanError, Sequence  # noqa: E402
from planner.runtime.cp import PackedAttention, shard_layout, unit_documents  # noqa: E402
from planner.runtime.model import IGNORE_INDEX, ModelConfig, TokenSource, build_model  # noqa: E402
from planner.runtime.inputs import unit_inputs  # noqa: E402
from planner.runtime.step import token_loss  # noqa: E402
from planner.workload.readers import read_megatron_idx  # noqa: E402


def write_megatron(prefix: Path, documents: list[list[list[int]]]) -> None:
    """A Megatron indexed dataset (.bin ids, .idx by the public MMIDIDX layout, uint16 ids): each document a
    list of sequences, each sequence a list of token ids."""
    seqs = [s for doc in documents for s in doc]
    lengths = np.array([len(s) for s in seqs], dtype="<i4")
    pointers = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64) * 2)).astype("<i8")
    doc_idx = np.concatenate(([0], np.cumsum([len(d) for d in documents]))).astype("<i8")
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", len(seqs),
                                                                                           doc_idx.size)
    prefix.with_suffix(".idx").write_bytes(header + lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    prefix.with_suffix(".bin").write_bytes(np.array([t for s in seqs for t in s], dtype="<u2").tobytes())


def test_megatron_tokens_keep_labels_inside_each_document(tmp_path):
    # documents: [10..14] (two sequences), [20..22], [30..33]: stream 10 11 12 13 14 20 21 22 30 31 32 33
    write_megatron(tmp_path / "data", [[[10, 11, 12], [13, 14]], [[20, 21, 22]], [[30, 31, 32, 33]]])
    assert read_megatron_idx(tmp_path / "data.idx").tolist() == [5, 3, 4]  # the planner's lengths, same reader
    seqs = [Sequence(0, 5), Sequence(1, 4), Sequence(2, 6)]
    for path in ("data.bin", "data.idx"):
        got = TokenSource(64, seed=0, path=str(tmp_path / path)).tokens(0, seqs)
        assert got[0].ids.tolist() == [10, 11, 12, 13, 14]
        assert got[0].labels.tolist() == [11, 12, 13, 14, IGNORE_INDEX]  # sequences inside a document join
        # a plan sequence spanning two documents: no label crosses from 22 to 30
        assert got[1].ids.tolist() == [20, 21, 22, 30]
        assert got[1].labels.tolist() == [21, 22, IGNORE_INDEX, IGNORE_INDEX]
        # wraps at the end of the dataset: 33 is a document's last token, 10 starts another
        assert got[2].ids.tolist() == [31, 32, 33, 10, 11, 12]
        assert got[2].labels.tolist() == [32, 33, IGNORE_INDEX, 11, 12, IGNORE_INDEX]
    with pytest.raises(PlanError, match="ids outside"):
        TokenSource(16, seed=0, path=str(tmp_path / "data.bin")).tokens(0, seqs)
    (tmp_path / "data.bin").write_bytes(b"\x00" * 4)
    with pytest.raises(PlanError, match="truncated"):
        TokenSource(64, seed=0, path=str(tmp_path / "data.bin"))
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" * 8)
    with pytest.raises(PlanError, match="not a Megatron index"):
        TokenSource(64, seed=0, path=str(tmp_path / "bad.idx"))


class CountingAttention(PackedAttention):
    """PackedAttention that counts its calls and records the dtype of its queries."""

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.calls, self.dtypes = 0, set()

    def __call__(self, q, k, v, layer):
        self.calls += 1
        self.dtypes.add(q.dtype)
        return super().__call__(q, k, v, layer)


def _unit_grads(cfg: ModelConfig):
    """Loss, gradients and the attention counter of one packed unit (two documents) on `cfg`."""
    spec = cfg.spec
    model = build_model(cfg, seed=3, device=torch.device("cpu"))
    seqs = [Sequence(0, 37), Sequence(1, 50)]
    tokens = TokenSource(spec.vocab, seed=5).tokens(0, seqs)
    lay = shard_layout(unit_documents((Piece(0, 0, 37), Piece(1, 0, 50))), 1, 0)
    inp, lab, pos = unit_inputs(tokens, lay)
    attn = CountingAttention(lay)
    loss = token_loss(model, model(inp, pos, attn), lab, 87)
    loss.backward()
    return model, float(loss.detach()), [p.grad.clone() for p in model.parameters()], attn


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_recompute_reruns_the_forward_and_leaves_gradients_unchanged(policy):
    spec = load_model("tiny")
    _, base_loss, base, attn0 = _unit_grads(ModelConfig(spec))
    _, loss, grads, attn = _unit_grads(ModelConfig(spec, recompute=policy))
    assert attn0.calls == spec.layers and attn.calls == 2 * spec.layers  # the attention core ran again
    assert loss == base_loss
    for g, b in zip(grads, base):
        torch.testing.assert_close(g, b, rtol=1e-6, atol=1e-8)


def test_bf16_autocasts_compute_and_keeps_fp32_weights_and_gradients():
    spec = replace(load_model("tiny"), tied_embeddings=True)
    _, loss32, g32, attn32 = _unit_grads(ModelConfig(spec))
    model, loss16, g16, attn16 = _unit_grads(ModelConfig(spec, precision="bf16", recompute="full"))
    assert attn32.dtypes == {torch.float32} and attn16.dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert loss16 != loss32 and abs(loss16 - loss32) < 1e-2 * abs(loss32)
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g16, g32))
    assert 1e-5 < worst < 0.1  # bf16 rounding shows, and stays at bf16's scale (8-bit mantissa)


def test_a_tp_shard_of_the_fused_gate_up_is_its_part_of_each_half_and_places_back():
    from planner.runtime.tp import place_shard, shard_param

    full = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)  # rows 0-3: gate, 4-7: up
    name = "layers.0.mlp.gate_up.weight"
    shards = [shard_param(full, name, 2, r) for r in range(2)]
    assert shards[0].tolist() == full[[0, 1, 4, 5]].tolist() and shards[1].tolist() == full[[2, 3, 6, 7]].tolist()
    assert sum(place_shard(full.shape, s, name, 2, r) for r, s in enumerate(shards)).equal(full)
    down = torch.arange(3 * 4, dtype=torch.float32).view(3, 4)  # no halves: a plain split of its columns
    assert shard_param(down, "layers.0.mlp.down.weight", 2, 1).equal(down[:, 2:])
