"""Communication that Megatron-core overlaps when asked: TP collectives under their GEMMs (Transformer Engine's
userbuffers, tp_comm_overlap), the gradient reduce-scatter under the last backward of each model chunk
(overlap_grad_reduce) and the parameter all-gather under the next forward (overlap_param_gather)."""

import dataclasses

import numpy as np
import pytest

from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import DDP_BUCKET_PARAMS, CostModel
from costmodel.memory import params_per_rank
from profiles.table import load_profile

H100 = load_profile("h100-sxm.analytic")


def _cm(gpus: int = 64, model: str = "llama3-70b", **training) -> CostModel:
    tr = TrainingSpec(**{"dtype": "bf16", "tp": 4, "pp": 8, **training})  # the recipes' 70B layout
    return CostModel(Setup(load_model(model), load_cluster("dgx-h100").with_gpus(gpus), tr), H100)


def test_tp_overlap_hand_computed_from_its_gemms_and_collectives():
    cm = _cm(tp_comm_overlap=True)
    t, s = 4, 8192.0
    # each GEMM's forward, dgrad and wgrad (the backward's at their own shapes on an analytic profile)
    names = [f"{k}{d}" for k in ("qkv", "o", "gate_up", "down") for d in ("", "_dgrad", "_wgrad")]
    g = {k: float(cm._lookup(f"gemm_{k}", s)) for k in names}
    split = {k: t * float(cm._lookup(f"gemm_{k}", s / t)) for k in g}
    act = s * cm.model.hidden * 2
    ag, rs = float(cm._lookup("tp_all_gather", act)), float(cm._lookup("tp_reduce_scatter", act))

    def ring(c, k):  # one chunk's GEMM runs before the first transfer lands; the split's own loss on top
        return max(0.0, c - split[k] * (t - 1) / t) + split[k] - g[k]

    fwd = ring(ag, "qkv") + ring(rs, "o") + ring(ag, "gate_up") + ring(rs, "down")
    # backward: dY gathered under the second GEMM's dgrad (ring); the input re-gathered beside the first's dgrad and
    # its dX scattered beside its wgrad (bulk)
    bwd = (ring(ag, "o_dgrad") + max(0.0, ag - g["qkv_dgrad"]) + max(0.0, rs - g["qkv_wgrad"])
           + ring(ag, "down_dgrad") + max(0.0, ag - g["gate_up_dgrad"]) + max(0.0, rs - g["gate_up_wgrad"]))
    assert g["o_dgrad"] != pytest.approx(g["o"], rel=0.01)  # not the forward's time
    f, b = cm.layer_tp_comm_s(s)
    assert float(f) == pytest.approx(fwd, rel=1e-9) and float(b) == pytest.approx(bwd, rel=1e-9)


def test_tp_overlap_hides_collectives_under_the_gemms():
    plain, over = _cm(), _cm(tp_comm_overlap=True)
    u0, u1 = plain.unit_cost([8192]), over.unit_cost([8192])
    assert 0 < u1.tp_comm_s < u0.tp_comm_s
    assert u1.fwd_compute_s == pytest.approx(u0.fwd_compute_s) and u1.total_s < u0.total_s
    full = _cm(tp_comm_overlap=True, recompute="full").layer_tp_comm_s(8192.0)
    assert float(full[1]) == pytest.approx(float(sum(over.layer_tp_comm_s(8192.0))), rel=1e-9)


def test_tp_overlap_needs_sequence_parallelism():
    with pytest.raises(SpecError, match="sequence parallelism"):
        TrainingSpec(tp=4, sequence_parallel=False, tp_comm_overlap=True)
    assert TrainingSpec(tp=1, sequence_parallel=False, tp_comm_overlap=True).tp == 1  # nothing to overlap


def test_chunked_grad_sync_hides_under_each_chunks_last_backward():
    cm = _cm(gpus=256, overlap_grad_reduce=True)  # DP 8
    r, g = cm._grad_sync_parts_s(cm.setup.hdp)  # reduce-scatter, all-gather
    lb = r * min(1.0, DDP_BUCKET_PARAMS / params_per_rank(cm.setup))
    # one chunk: the last backward's window, the last bucket after it (the one-window form)
    assert cm.exposed_chunked_grad_sync_s(None, [(-1e-3, 0.0)]) == pytest.approx(cm.exposed_grad_sync_s(None, 1e-3))
    assert cm.exposed_grad_sync_s(None, 1e-3) == pytest.approx(max(lb, r - 1e-3) + g)
    # four chunks, three finishing long before the end: their shares are done; the last chunk's share shows
    early = [(-10.0 + i, -9.5 + i) for i in range(3)] + [(-1e-3, 0.0)]
    assert cm.exposed_chunked_grad_sync_s(None, early) == pytest.approx(max(min(r / 4, lb), r / 4 - 1e-3) + g)
    # shares by layers: the last chunk holding 1 of 10 layers' gradients leaves r / 10 to show, not r / 4
    shares = [0.3, 0.3, 0.3, 0.1]
    assert cm.exposed_chunked_grad_sync_s(None, early, shares) == pytest.approx(
        max(min(r / 10, lb), r / 10 - 1e-3) + g)
    with pytest.raises(ValueError, match="2 gradient shares for 4 chunk windows"):
        cm.exposed_chunked_grad_sync_s(None, early, [0.5, 0.5])
    # chunks finishing together: the queue of all their buckets shows
    together = [(-1e-3, 0.0)] * 4
    assert cm.exposed_chunked_grad_sync_s(None, together) == pytest.approx(max(lb, r - 1e-3) + g, rel=1e-9)
    assert dataclasses.replace(cm.setup.training, overlap_grad_reduce=False).overlap_grad_reduce is False
    off = _cm(gpus=256)
    assert off.exposed_chunked_grad_sync_s(None, early) == pytest.approx(off.grad_sync_s())


def test_param_gather_overlap_leaves_its_first_bucket():
    base = _cm(gpus=256)
    over = _cm(gpus=256, overlap_param_gather=True)
    reduce_s, gather_s = base._grad_sync_parts_s(base.setup.hdp)
    assert reduce_s > 0 and gather_s > 0
    assert base.exposed_grad_sync_s(None, 0.0) == pytest.approx(reduce_s + gather_s)
    bucket = min(1.0, DDP_BUCKET_PARAMS / params_per_rank(base.setup))
    assert over.exposed_grad_sync_s(None, 0.0) == pytest.approx(reduce_s + bucket * gather_s)
    replicated = _cm(gpus=256, zero_stage=0)
    assert replicated._grad_sync_parts_s(replicated.setup.hdp)[1] == 0.0  # an all-reduce: nothing to gather


def test_bound_counts_only_the_exposed_tp_communication():
    from planner.simulate.bounds import total_compute_s

    lengths = np.array([8192] * 8)
    assert total_compute_s(lengths, _cm(tp_comm_overlap=True)) < total_compute_s(lengths, _cm())


def test_shared_embedding_all_reduce_after_the_backward():
    """A copy of the word embedding on the last stage (a tied head, or MTP's) has its gradient all-reduced with the
    first stage's after the backward, exposed: vocab/t rows of h, 4 B each (fp32 gradients), one P2P transfer each
    way across the two stages' nodes; none with one stage or no copy."""
    tied = dataclasses.replace(load_model("llama3-70b"), tied_embeddings=True)
    cm = CostModel(Setup(tied, load_cluster("dgx-h100").with_gpus(64), TrainingSpec(tp=4, pp=8)), H100)
    nbytes = tied.vocab / 4 * tied.hidden * 4
    assert cm.setup.mesh.stages_in_different_domains(0, 7, 0)
    emb = float(cm.p2p_s(nbytes, True))
    assert cm.embedding_sync_s() == pytest.approx(emb) and emb > 0.01  # 1 GiB over one 400 Gb/s NIC
    assert _cm().embedding_sync_s() == 0.0  # untied
    # exposed after every backward, hidden or not, and part of the step's end
    without = CostModel(cm.setup, H100)
    without.embedding_sync_s = lambda: 0.0
    for overlap in (False, True):
        a, b = (CostModel(dataclasses.replace(c.setup, training=dataclasses.replace(
            c.setup.training, overlap_grad_reduce=overlap)), H100) for c in (cm, without))
        b.embedding_sync_s = lambda: 0.0
        windows = [(-1.0, 0.0)]
        assert a.exposed_chunked_grad_sync_s(None, windows) == pytest.approx(
            b.exposed_chunked_grad_sync_s(None, windows) + emb, rel=1e-9)
    assert cm.step_end_s() == pytest.approx(without.step_end_s() + emb, rel=1e-9)
    bf16 = CostModel(Setup(tied, cm.setup.cluster, TrainingSpec(tp=4, pp=8, grad_dtype="bf16")), H100)
    assert bf16.embedding_sync_s() == pytest.approx(float(cm.p2p_s(nbytes / 2, True)))
    one_stage = CostModel(Setup(tied, cm.setup.cluster, TrainingSpec(tp=8, pp=1, zero_stage=3)), H100)
    assert one_stage.embedding_sync_s() == 0.0
    # both stages in one domain (a 2-GPU stage, 4 stages on one node): the transfer over NVLink
    small = dataclasses.replace(load_model("llama3-8b"), tied_embeddings=True)
    near = CostModel(Setup(small, load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=2, pp=4)), H100)
    assert not near.setup.mesh.stages_in_different_domains(0, 3, 0)
    assert near.embedding_sync_s() == pytest.approx(float(near.p2p_s(small.vocab / 2 * small.hidden * 4, False)))
    mtp = _cm(mtp_layers=1)  # untied, but MTP's embedding copy sits on the last stage
    assert mtp.embedding_sync_s() == pytest.approx(float(mtp.p2p_s(mtp.model.vocab / 4 * mtp.model.hidden * 4, True)))
