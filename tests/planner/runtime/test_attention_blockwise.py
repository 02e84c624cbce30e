"""Memory-linear attention (planner/runtime/cp.py): block kernels and the sources function
against dense masked attention on small inputs with several documents, GQA, uneven
zigzag shards and blocks far smaller than a shard; then a 65,536-token unit replayed over 4 CPU
ranks whose peak RSS per rank must stay under a bound linear in the tokens per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from planner.plan import (Mesh, Piece, Plan, Predicted, Sequence, Step, Unit, validate,  # noqa: E402
                          zigzag_tokens_per_rank)
from planner.runtime.cp import (BlockKernel, FlashCUDABlocks, _SourcesAttentionFn, attention_mask,  # noqa: E402
                                block_mask, block_tokens, layout_spans, make_kernel, merge_block, shard_layout,
                                slice_layout, span_mode, span_runs, unit_documents)

CPU = torch.device("cpu")


def _dense(q, ks, vs, allowed):
    """Reference: SDPA over all sources' keys under the whole mask, heads-first q [Hq, T, D]."""
    g = q.shape[0] // ks[0].shape[0]
    return torch.nn.functional.scaled_dot_product_attention(
        q[None], torch.cat(ks, 1).repeat_interleave(g, 0)[None], torch.cat(vs, 1).repeat_interleave(g, 0)[None],
        attn_mask=allowed)[0]


@pytest.mark.parametrize("kind", ["math", "fused-cpu"])
@pytest.mark.parametrize("lengths,degree,block", [([23, 8], 3, 8), ([203, 37, 9], 4, 16), ([5], 3, 64),
                                                  ([64, 64], 2, 16), ([40, 1, 17], 1, 8), ([23], 3, 1024),
                                                  ([24], 3, 1024)])
def test_block_kernel_sources_merge_to_dense_attention(kind, lengths, degree, block):
    """Every member: per-source outputs (each computed block pair by block pair) merged by log-sum-exp,
    and per-source gradients from the final output, equal dense masked attention and its autograd
    gradients on every real row (padding rows get a zero output gradient, as in the model)."""
    docs = unit_documents(tuple(Piece(i, 0, n) for i, n in enumerate(lengths)))
    lays = [shard_layout(docs, degree, j) for j in range(degree)]
    g = torch.Generator().manual_seed(0)
    t, hq, hkv, d = lays[0].tokens, 4, 2, 8
    assert t > block or lengths == [5] or block == 1024  # several blocks per shard (1024: the one-block case)
    for me in range(degree):
        q = torch.randn(hq, t, d, generator=g).requires_grad_()
        ks = [torch.randn(hkv, t, d, generator=g).requires_grad_() for _ in lays]
        vs = [torch.randn(hkv, t, d, generator=g).requires_grad_() for _ in lays]
        ref = _dense(q, ks, vs, torch.cat([attention_mask(lays[me], lay) for lay in lays], dim=1))
        real = lays[me].valid
        dout = torch.randn(ref.shape, generator=g) * real[None, :, None]
        ref.backward(dout)
        kern: BlockKernel = make_kernel(kind, lays[me], dict(enumerate(lays)), me, block, CPU)
        assert kern.name == kind
        scale = d ** -0.5
        with torch.no_grad():
            out, lse = torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf"))
            for j in kern.members:
                out, lse = merge_block(out, lse, *kern.forward(q, ks[j], vs[j], j, scale))
            assert torch.isfinite(out).all() and torch.isfinite(lse).all()
            torch.testing.assert_close(out[:, real], ref[:, real], rtol=1e-5, atol=1e-5)
            dq = torch.zeros_like(q)
            for j in range(degree):
                bq, bk, bv = (kern.backward(dout, q, ks[j], vs[j], out, lse, j, scale) if j in kern.members
                              else (0, torch.zeros_like(ks[j]), torch.zeros_like(vs[j])))
                dq += bq
                torch.testing.assert_close(bk, ks[j].grad, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(bv, vs[j].grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dq[:, real], q.grad[:, real], rtol=1e-4, atol=1e-5)


def test_block_pairs_skip_what_the_mask_hides():
    """Many short documents over one rank: only block pairs on the diagonal band run (linear in tokens,
    not quadratic), and a member whose keys our queries never see is no source at all."""
    docs = unit_documents(tuple(Piece(i, 0, 64) for i in range(32)))  # 2,048 tokens, documents of 64
    lay = shard_layout(docs, 1, 0)
    kern = make_kernel("math", lay, {0: lay}, 0, 64, CPU)
    assert sum(len(ks) for _, ks in kern.pairs[0]) == 32  # one pair per document: blocks align with them
    far = shard_layout(unit_documents((Piece(99, 0, 64),)), 1, 0)  # another unit's document: index 0 again
    kern = make_kernel("math", lay, {0: lay, 1: far}, 0, 64, CPU)
    assert 1 in kern.members  # same document index: the mask decides, the skip test only bounds the work
    spans = layout_spans(lay, 100)  # cut at each document as well as every 100 tokens
    assert len(spans) == 32 and (spans[-1].a, spans[-1].b) == (1984, 2048) and spans[0].first == (0, 0)
    assert block_tokens(4) == 1024 and block_tokens(32) == 256 and block_tokens(1) == 2048


@pytest.mark.parametrize("degree", [2, 3, 4])
def test_zigzag_ring_steps_are_one_unmasked_call_per_document(degree):
    """Whole-block kernels (the fused CPU one): every member runs one block pair per document and source (ring
    step), fully visible or, on its own keys, causal over both its zigzag chunks (a member's local order is
    position order), so the fused kernel runs it without a mask, as the cost model prices a ring (one call per
    document and step); only padding builds a mask. With 256-token blocks the pairs follow zigzag runs."""
    docs = unit_documents((Piece(0, 0, 2899), Piece(1, 0, 40)))
    lays = [shard_layout(docs, degree, j) for j in range(degree)]
    for me in range(degree):
        kern = make_kernel("fused-cpu", lays[me], dict(enumerate(lays)), me, 1 << 20, CPU)
        assert kern.members == set(range(degree))
        for src, by_q in kern.pairs.items():
            real = [(qs, ks) for qs, kss in by_q for ks in kss if not (qs.padding or ks.padding)]
            assert len(real) == len(docs), (me, src, real)
            modes = [kern._visible(src, qs, ks) for qs, ks in real]
            assert modes == ["causal" if src == me else "all"] * len(docs), (me, src, modes)
        kern = make_kernel("fused-cpu", lays[me], dict(enumerate(lays)), me, 256, CPU)
        modes = [kern._visible(src, qs, ks) for src, by_q in kern.pairs.items() for qs, kss in by_q for ks in kss
                 if not (qs.padding or ks.padding)]
        assert modes and all(m in ("all", "causal") for m in modes)
        for sp in layout_spans(lays[me], 4096):  # a run is consecutive positions of one document
            pos, doc = lays[me].pos[sp.a:sp.b], lays[me].doc[sp.a:sp.b]
            assert sp.padding or (bool((pos.diff() == 1).all()) and len(set(doc.tolist())) == 1)


@pytest.mark.parametrize("layouts,block", [
    ([slice_layout(unit_documents((Piece(0, 0, 2899),)), 4, j, 1, 0) for j in range(4)], 256),  # SlimPipe slices
    ([shard_layout(unit_documents((Piece(0, 0, 203), Piece(1, 0, 37))), 3, j) for j in range(3)], 16),  # zigzag
    ([shard_layout(unit_documents(tuple(Piece(i, 0, n) for i, n in enumerate([40, 1, 17]))), 1, 0)], 8),  # packed
    ([slice_layout(unit_documents((Piece(0, 0, 300), Piece(1, 0, 50))), 3, j, 2, m) for j in range(3)
      for m in range(2)], 32)])  # slices of a 2-member unit
def test_a_block_pairs_mode_from_its_spans_is_its_mask(layouts, block):
    """span_mode settles a pair from its spans alone where it can (the mask is then not built): every pair it
    calls "all" has a full mask, every "causal" one the lower triangle; it settles all pairs of these real layouts
    of one document's consecutive positions but partial overlaps and padding. Spans and runs (span_runs) alike."""
    spans = [layout_spans(lay, block) + [sp for sp, _ in span_runs(lay, block)] for lay in layouts]
    settled = 0
    for qi, q_lay in enumerate(layouts):
        for ki, k_lay in enumerate(layouts):
            for q in spans[qi]:
                for k in spans[ki]:
                    mode = span_mode(q, k)
                    if mode is None:
                        continue
                    m = block_mask(q_lay, k_lay, slice(q.a, q.b), slice(k.a, k.b), self_keys=qi == ki)
                    want = torch.ones_like(m) if mode == "all" else torch.ones_like(m).tril()
                    assert torch.equal(m, want), (qi, ki, q, k, mode)
                    settled += 1
    assert settled > 0


def test_sources_function_gradients_through_autograd():
    """_SourcesAttentionFn (gather and sliced attention's core) under autograd: output and gradients of
    q and of every source equal dense attention's; sources the queries never see get no gradient."""
    docs = unit_documents((Piece(0, 0, 50), Piece(1, 0, 31)))
    lays = [shard_layout(docs, 2, j) for j in range(2)]
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, t = 6, 2, 8, lays[0].tokens
    q = torch.randn(hq, t, d, generator=g).requires_grad_()
    kvs = [torch.randn(2, hkv, t, d, generator=g).requires_grad_() for _ in lays]
    dout = torch.randn(hq, t, d, generator=g) * lays[1].valid[None, :, None]
    kern = make_kernel("fused-cpu", lays[1], dict(enumerate(lays)), 1, 16, CPU)
    out = _SourcesAttentionFn.apply(q, kern, (0, 1), d ** -0.5, *kvs)
    out.backward(dout)
    got = [q.grad.clone()] + [kv.grad.clone() for kv in kvs]
    for x in [q, *kvs]:
        x.grad = None
    ref = _dense(q, [kv[0] for kv in kvs], [kv[1] for kv in kvs],
                 torch.cat([attention_mask(lays[1], lay) for lay in lays], dim=1))
    ref.backward(dout)
    real = lays[1].valid
    torch.testing.assert_close(out[:, real], ref[:, real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0][:, real], q.grad[:, real], rtol=1e-4, atol=1e-5)
    for a, kv in zip(got[1:], kvs):
        torch.testing.assert_close(a, kv.grad, rtol=1e-4, atol=1e-5)


# -- under torchrun ---------------------------------------------------------------------------------

def _torchrun(nproc: int, plan: Path, *args: str, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "planner.runtime", str(plan), *args]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return subprocess.run(cmd, cwd=plan.parent, capture_output=True, text=True, timeout=timeout_s,
                          env={**base, "OMP_NUM_THREADS": "1", **env})


def _check_line(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith('{"check"')]
    assert len(lines) == 1, res.stdout
    return lines[0]["check"]


def _one_unit_plan(lengths: list[int], ranks: int) -> Plan:
    unit = Unit(id=0, hdp_ranks=tuple(range(ranks)), pieces=tuple(Piece(i, 0, n) for i, n in enumerate(lengths)),
                offload_ratio=0.0, tokens_per_rank=zigzag_tokens_per_rank(lengths, ranks))
    step = Step(step=0, global_tokens=sum(lengths), sequences=[Sequence(i, n) for i, n in enumerate(lengths)],
                units=[unit], order={r: [0] for r in range(ranks)},
                predicted=Predicted(1.0, 0.5, [0.5] * ranks, [1e6] * ranks))
    plan = Plan(meta={"model": "tiny", "strategy": "hand-built"}, mesh=Mesh(ranks, 1, 1, ranks), steps=[step])
    validate(plan)
    return plan


@pytest.mark.torchrun
@pytest.mark.parametrize("cp", ["ring", "allgather"])
def test_small_blocks_over_four_ranks_match_reference(tmp_path, cp):
    """Ring steps and all-gather with 16-token block pairs (many per shard, straddling documents and
    zigzag chunks, padding): loss and gradients equal the single-process reference."""
    _one_unit_plan([203, 37, 9, 150], 4).save(tmp_path / "plan.json")
    c = _check_line(_torchrun(4, tmp_path / "plan.json", "--check", "--cp", cp,
                              env={"MESHPLAN_BLOCK_TOKENS": "16"}, timeout_s=180))
    assert c["max_rel_grad_err"] < 1e-4 and c["loss_abs_err"] < 1e-5, c


# The 65,536-token unit: 8 rounds of documents of 4096 down to 64 tokens, one unit over 4 ranks, zigzag:
# 16,384 tokens per rank (every length is a multiple of 2N = 8: no padding).
LONG_DOCS = [4096, 2048, 1024, 512, 256, 128, 64, 64] * 8
RSS_FLOOR_BYTES = 600 << 20  # python + torch + gloo + a torchrun worker, measured 390-400 MB: margin 1.5x


def linear_rss_bound_bytes(tokens_per_rank: int, unit_tokens: int, block: int) -> int:
    """What one rank may hold for the tiny model (2 layers, hidden 64, 4 query heads and 2 K/V heads of
    16, ffn 128, vocab 256; fp32), each term linear in tokens or fixed by the block size:

    - activations autograd keeps per local token and layer: ~8 hidden-wide tensors (norm in/out, q,
      attention core, wo out, residuals) + k, v (2 kv-wide) + 4 ffn-wide (gate, up, their product,
      down in) = 8·64 + 2·32 + 4·128 = 1,088 floats; the attention's fp32 output and log-sum-exp
      (4·16 + 4); RoPE tables (2·8 fp32 + float64 angles): ~1,200 floats = 4.8 KB per token-layer;
    - head: logits, log-softmax and their gradients, 4 × vocab floats = 4 KB per token;
    - transient per layer in backward: dQ, dK/dV accumulators and K/V in flight, < 4 × q-width floats =
      1 KB per token; ids, labels, positions and the layout (6 int64) = 48 bytes;
    - one block pair: scores and their gradient (2 × 4 heads × block² fp32) plus the fused kernel's
      bias and the block's mask, < 3 × 4 · 4 · block² bytes;
    - nothing per unit token on a ring rank (K/V blocks are per member, the size of ours).

    That is ~2 × 4.8 KB + 4 KB + 1 KB ≈ 15 KB per local token; the bound allows 2x that (allocator
    slack, glibc arenas), 30 KB per token, plus the floor. A dense [T, N·T] mask alone at 16,384 tokens
    per rank is 1 GB of bools, and the former fused path's float biases 4 GB per layer pass."""
    del unit_tokens  # ring: the bound must not grow with the unit, only with the local tokens
    per_token = 30 << 10
    return RSS_FLOOR_BYTES + per_token * tokens_per_rank + 3 * 4 * 4 * block * block


@pytest.mark.torchrun
def test_64k_token_unit_over_four_ranks_has_linear_memory(tmp_path):
    """One unit of 65,536 tokens over 4 CPU ranks (ring, default blocks of 1,024): every rank's peak RSS
    stays under the linear bound, the loss is finite, and gradients equal the single-process
    reference (which runs each whole document with causal flash attention: also linear)."""
    total = sum(LONG_DOCS)
    assert total == 65536
    _one_unit_plan(LONG_DOCS, 4).save(tmp_path / "plan.json")
    res = _torchrun(4, tmp_path / "plan.json", "--check", "--cp", "ring", "--steps", "1", "--trace",
                    str(tmp_path / "trace.json"), env={}, timeout_s=300)
    c = _check_line(res)
    assert c["max_rel_grad_err"] < 1e-4 and c["loss_abs_err"] < 1e-5, c
    doc = json.loads((tmp_path / "trace.json").read_text())
    units = doc["steps"][0]["units"]
    assert len(units) == 4 and {u["tokens"] for u in units} == {total // 4}
    bound = linear_rss_bound_bytes(total // 4, total, block_tokens(4))
    peaks = {u["rank"]: u["peak_memory_bytes"] for u in units}
    assert all(p < bound for p in peaks.values()), (peaks, bound)
    losses = [json.loads(x)["step"]["loss"] for x in res.stdout.splitlines() if x.startswith('{"step"')]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)


def _bind(op, args, kwargs) -> dict:
    """The call's arguments by name, from the op's real schema (a wrong order or a missing argument fails)."""
    schema = op.default._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip((a.name for a in schema.arguments), args))
    bound.update(kwargs)
    assert set(bound) == {a.name for a in schema.arguments}, schema
    return bound


@pytest.fixture
def cuda_flash_on_cpu(monkeypatch):
    """torch's CUDA flash ops, stood in for by the CPU flash kernel, called through their own CUDA schemas:
    what FlashCUDABlocks passes is checked by name and shape, what it gets back has the CUDA ops' layout."""
    aten, calls = torch.ops.aten, {"fwd": 0, "bwd": 0}
    fwd_op, bwd_op = aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward

    def fwd(*args, **kwargs):
        a = _bind(fwd_op, args, kwargs)
        assert a["query"].dtype == torch.bfloat16 and a["query"].dim() == 4 and not a["return_debug_mask"]
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            a["query"], a["key"], a["value"], a["dropout_p"], a["is_causal"], scale=a["scale"])
        calls["fwd"] += 1
        none = torch.empty(0)
        return out, lse, none, none, a["query"].shape[2], a["key"].shape[2], none, none, none

    def bwd(*args, **kwargs):
        a = _bind(bwd_op, args, kwargs)
        assert a["max_q"] == a["query"].shape[2] and a["max_k"] == a["key"].shape[2]
        assert a["out"].dtype == a["query"].dtype and a["logsumexp"].dtype == torch.float32
        calls["bwd"] += 1
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            a["grad_out"], a["query"], a["key"], a["value"], a["out"], a["logsumexp"], a["dropout_p"],
            a["is_causal"], scale=a["scale"])

    monkeypatch.setattr(FlashCUDABlocks, "flash_ops", staticmethod(lambda: (fwd, bwd)))
    return calls


@pytest.mark.parametrize("lengths,degree,block", [([203, 37, 9], 4, 16), ([23], 3, 1024), ([64, 64], 2, 16)])
def test_cuda_flash_block_kernel_matches_math_in_bf16(cuda_flash_on_cpu, lengths, degree, block):
    """The opt-in CUDA flash block kernel (not run on a GPU here): full and causal pairs through the flash ops'
    CUDA schemas, padding pairs on the math kernel; outputs, log-sum-exps and gradients equal the math kernel's
    on the same bf16 inputs."""
    docs = unit_documents(tuple(Piece(i, 0, n) for i, n in enumerate(lengths)))
    lays = [shard_layout(docs, degree, j) for j in range(degree)]
    g = torch.Generator().manual_seed(1)
    t, hq, hkv, d, scale = lays[0].tokens, 4, 2, 16, 16 ** -0.5
    for me in range(degree):
        q = torch.randn(hq, t, d, generator=g).bfloat16()
        ks = [torch.randn(hkv, t, d, generator=g).bfloat16() for _ in lays]
        vs = [torch.randn(hkv, t, d, generator=g).bfloat16() for _ in lays]
        dout = (torch.randn(hq, t, d, generator=g) * lays[me].valid[None, :, None]).bfloat16()
        results = {}
        for kind in ("math", "flash-cuda"):
            kern = make_kernel(kind, lays[me], dict(enumerate(lays)), me, block, CPU)
            out, lse = torch.zeros(q.shape), torch.full(q.shape[:-1], float("-inf"))
            for j in kern.members:
                out, lse = merge_block(out, lse, *kern.forward(q, ks[j], vs[j], j, scale))
            out = out.bfloat16()
            grads = [kern.backward(dout, q, ks[j], vs[j], out, lse, j, scale) for j in sorted(kern.members)]
            results[kind] = (out.float(), lse, grads)
        (o1, l1, g1), (o2, l2, g2) = results["math"], results["flash-cuda"]
        real = lays[me].valid
        torch.testing.assert_close(o2[:, real], o1[:, real], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(l2[:, real], l1[:, real], rtol=1e-3, atol=1e-3)
        for a, b in zip(g2, g1):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=3e-2, atol=3e-2)
    assert cuda_flash_on_cpu["fwd"] > 0 and cuda_flash_on_cpu["bwd"] > 0
