"""Unit times: monotone in length, ring overlap, hidden offload, the fitted layer time, gradient sync."""

import dataclasses

import numpy as np
import pytest

from costmodel.presets import load_cluster, load_model
from costmodel.specs import Setup, SpecError, TrainingSpec
from costmodel.timing import CostModel, compute_share_of, fit_layer_time, gemm_shapes, lockstep_x_of
from profiles.table import load_profile


@pytest.fixture(scope="module")
def cm():
    return CostModel(Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64), TrainingSpec()),
                     load_profile("h100-sxm.analytic"))


def test_unit_costs_monotone_and_ring_overlap(cm):
    t = [cm.unit_time_s([s]) for s in (512, 1024, 4096, 8192)]
    assert all(a < b for a, b in zip(t, t[1:]))
    # Packed short docs cost less than one doc of the same total (attention is per document).
    assert cm.unit_time_s([1024] * 8) < cm.unit_time_s([8192])
    # A long document at ~C tokens per rank hides its ring transfers; short documents sharded 8 ways do not.
    assert cm.unit_cost([8 * 8192], 8).ring_exposed_s < 0.05 * cm.unit_cost([8 * 8192], 8).total_s
    short = cm.unit_cost([1024] * 64, 8)
    assert short.ring_exposed_s > 0
    assert short.total_s > cm.unit_cost([1024] * 8, 1).total_s


def test_a_packed_bins_short_documents_pay_the_attention_floor(cm):
    # one rank: each document a call (tile row) of its own, below the 128-token grid at the 128-token time
    per_doc = float(cm.attn_fwd_s(100, whole=True))  # lookups interpolate a token grid: 3% near the kink
    assert float(cm.attn_fwd_s(16, whole=True)) == pytest.approx(per_doc, rel=0.03)
    one, many = cm.unit_cost([16]), cm.unit_cost([16] * 64)
    assert many.attn_fwd_compute_s == pytest.approx(64 * one.attn_fwd_compute_s)
    assert one.attn_fwd_compute_s == pytest.approx(cm.layers_per_stage * per_doc, rel=0.03)
    # sharded over 2 ranks the same document runs as blocks at the table's rate
    assert cm.unit_cost([16] * 64, 2).attn_fwd_compute_s < 0.1 * many.attn_fwd_compute_s


def test_offload_hidden_for_long_sequences(cm):
    u = cm.unit_cost([2**18], 8, offload_ratio=1.0, inter_node=True)
    assert u.offload_exposed_s == pytest.approx(0.0, abs=1e-9)  # 256K: r = 1 is free (ByteScale Fig. 21)


def test_fit_layer_time_close(cm):
    f = fit_layer_time(load_model("llama-7b"), TrainingSpec(), load_profile("h100-sxm.analytic"))
    assert f["alpha1_s_per_token2"] > 0 and f["beta1_s_per_token"] > 0
    # GEMM wave quantisation makes the measured-like curve a staircase under ~2K tokens that a quadratic
    # cannot follow exactly (split-K below one wave, 2026-12-05, made its small steps steeper: 17.5% at worst)
    assert f["max_rel_err"] < 0.2 and f["r2"] > 0.99


def test_grad_sync_positive_and_grows_across_nodes():
    m = load_model("llama-7b")
    p = load_profile("h100-sxm.analytic")
    intra = CostModel(Setup(m, load_cluster("dgx-h100").with_gpus(8), TrainingSpec()), p).grad_sync_s()
    inter = CostModel(Setup(m, load_cluster("dgx-h100").with_gpus(64), TrainingSpec()), p).grad_sync_s()
    assert 0 < intra < inter


def test_backward_gemms_take_their_own_shapes_where_the_profile_times_shapes():
    # dgrad contracts over the forward's output features, wgrad over the tokens into the weight's tiles; a measured
    # table (its forward shapes only) takes each as the forward
    import numpy as np

    model, tp = load_model("gpt-22b"), 8
    setup = Setup(model, load_cluster("dgx-a100").with_gpus(8), TrainingSpec(tp=tp))
    a100 = load_profile("a100-sxm-80gb.analytic")
    cm = CostModel(setup, a100)
    tokens = np.array([4096.0, 32768.0])  # on the token grid's smooth part (it interpolates between its points)
    want = sum(a100.gemm_time_s(tokens, g.k, g.n) + a100.gemm_time_s(float(g.k), g.n, tokens)
               for g in gemm_shapes(model, tp)[:-1])
    assert cm.gemm_layer_bwd_s(tokens) == pytest.approx(want, rel=0.02)
    assert not np.allclose(cm.gemm_layer_bwd_s(tokens), 2 * cm.gemm_layer_fwd_s(tokens), rtol=0.01)
    h200 = CostModel(dataclasses.replace(setup, cluster=load_cluster("hgx-h200").with_gpus(8)),
                     load_profile("h200-sxm.measured"))
    assert h200.gemm_layer_bwd_s(tokens) == pytest.approx(2 * h200.gemm_layer_fwd_s(tokens))



def test_weight_gradients_accumulated_in_the_gemm_read_and_write_the_main_gradient():
    # Megatron's gradient_accumulation_fusion: each wgrad reads and writes its fp32 main gradient (8 B a weight), which
    # shows where few rows make it memory-bound; an accumulation outside the GEMM ("add") writes it once in bf16 and
    # pays its add as a pass of its own (grad_accum_layer_s); large token counts stay compute-bound either way
    import numpy as np

    model = load_model("llama-7b")
    a100 = load_profile("a100-sxm-80gb.analytic")
    setup = Setup(model, load_cluster("dgx-a100").with_gpus(8), TrainingSpec())
    cm = lambda **kw: CostModel(dataclasses.replace(setup, training=TrainingSpec(**kw)), a100)  # noqa: E731
    fused, add, bf16 = cm(), cm(grad_accumulation="add"), cm(grad_dtype="bf16")
    few, many = np.array([64.0]), np.array([32768.0])
    assert fused.gemm_layer_bwd_s(few) > bf16.gemm_layer_bwd_s(few) > add.gemm_layer_bwd_s(few)
    assert fused.gemm_layer_bwd_s(many) == pytest.approx(add.gemm_layer_bwd_s(many))
    assert add.grad_accum_layer_s > 0 == fused.grad_accum_layer_s

def test_gemm_shapes_follow_the_mlp_kind():
    gpt, llama = load_model("gpt-22b"), load_model("llama-7b")
    up = {g.label: g for g in gemm_shapes(gpt, tp=8)}
    assert "gate_up" not in up and (up["up"].n, up["up"].k) == (gpt.ffn // 8, gpt.hidden)
    assert (up["down"].n, up["down"].k) == (gpt.hidden, gpt.ffn // 8)
    gate_up = {g.label: g for g in gemm_shapes(llama, tp=2)}["gate_up"]
    assert (gate_up.n, gate_up.k) == (llama.ffn, llama.hidden)  # 2f / 2


def test_ranks_beyond_the_cores_share_them():
    """A CPU profile records the cores its ranks share (one thread each) and the measured slowdowns with every core
    busy and with two ranks per core: every compute term takes the share of the node's rank count; transfers
    (measured with the ranks sharing the cores) and GPU profiles are unchanged."""
    cpu = load_profile("local-cpu.measured")
    cores = int(cpu.constant("cores_per_node"))
    busy, shared = cpu.constant("cores_busy_slowdown"), cpu.constant("cores_shared_slowdown")
    assert busy >= 1.0 and shared >= 2.0
    tiny, tr = load_model("tiny"), TrainingSpec(dtype="fp32")

    def cost(profile, ranks: int, cluster: str = "local-cpu") -> CostModel:
        return CostModel(Setup(tiny, load_cluster(cluster).with_gpus(ranks), tr), profile)

    one, full, crowded = cost(cpu, 1), cost(cpu, cores), cost(cpu, 2 * cores)
    assert one.compute_share == 1.0 and full.compute_share == pytest.approx(busy)
    assert crowded.compute_share == pytest.approx(shared)
    assert compute_share_of(cpu, 4 * cores) == pytest.approx(2 * shared)  # k/c · s/2
    a, b = one.unit_cost([1024, 300], degree=1), crowded.unit_cost([1024, 300], degree=1)
    assert b.fwd_compute_s == pytest.approx(shared * a.fwd_compute_s)
    assert b.head_bwd_s == pytest.approx(shared * a.head_bwd_s)
    assert crowded.optimizer_step_s(1) == pytest.approx(shared * one.optimizer_step_s(1))
    assert crowded.p2p_s(2**20, False) == pytest.approx(one.p2p_s(2**20, False))
    gpu = load_profile("h100-sxm.analytic")
    assert cost(gpu, 8, "dgx-h100").compute_share == 1.0  # a GPU per rank
    # a profile with cores but no measured slowdowns: the fair share
    bare = dataclasses.replace(cpu, constants={k: v for k, v in cpu.constants.items() if "slowdown" not in k})
    assert compute_share_of(bare, 2 * cores) == pytest.approx(2.0) and compute_share_of(bare, cores) == 1.0


def without_wake(profile):
    """The profile without its meetings' wake-up constants (a CPU profile measured before them)."""
    return dataclasses.replace(profile, constants={k: v for k, v in profile.constants.items() if "_wake" not in k})


def test_a_lockstep_group_larger_than_the_cores_takes_whole_turns():
    """A unit's ranks (degree × tp) synchronise at every ring step and TP collective: on c cores a group of g > c
    ranks runs in ⌈g/c⌉ turns between synchronisations where the compute share priced g/c, so all of the unit's
    terms stretch by ⌈g/c⌉/(g/c) (3 ranks on 2 cores: 4/3). Groups that fit the cores, a given share (a fit's lone
    rank) and GPU profiles are unchanged. (Without the meetings' wake-up: a given share prices none.)"""
    cpu = without_wake(load_profile("local-cpu.measured"))
    assert int(cpu.constant("cores_per_node")) == 2
    assert list(lockstep_x_of(cpu, 8, np.array([1, 2, 3, 4, 5, 6, 7]))) == pytest.approx(
        [1, 1, 4 / 3, 1, 6 / 5, 1, 8 / 7])
    assert list(lockstep_x_of(cpu, 4, np.array([5]))) == [1.0]  # at most the node's ranks share its cores
    assert list(lockstep_x_of(load_profile("h100-sxm.analytic"), 8, np.array([3]))) == [1.0]
    tiny = load_model("tiny")

    def cost(ranks: int, tp: int = 1, share: float | None = None) -> CostModel:
        return CostModel(Setup(tiny, load_cluster("local-cpu").with_gpus(ranks), TrainingSpec(dtype="fp32", tp=tp)),
                         cpu, compute_share=share)

    three = cost(3)
    free = cost(3, share=three.compute_share)  # the same share, given: no lockstep term
    docs = [1500, 900]
    for degree, x in ((1, 1.0), (2, 1.0), (3, 4 / 3)):
        a, b = three.unit_cost(docs, degree=degree), free.unit_cost(docs, degree=degree)
        # (the ring's transfers are exposed on the shared node's busy cores, hidden under a given share's compute)
        assert a.total_s - a.ring_exposed_s == pytest.approx(x * (b.total_s - b.ring_exposed_s), rel=1e-12), degree
        assert a.fwd_compute_s == pytest.approx(x * b.fwd_compute_s, rel=1e-12)
        assert a.ring_comm_s == pytest.approx(x * b.ring_comm_s, rel=1e-12)
    tp = cost(4, tp=2)  # TP pairs: a unit of one HDP rank is 2 ranks, of two 4 (2 turns, as the share priced)
    for degree in (1, 2):
        a, b = tp.unit_cost(docs, degree=degree), cost(4, tp=2, share=tp.compute_share).unit_cost(docs, degree=degree)
        assert a.total_s - a.ring_exposed_s == pytest.approx(b.total_s - b.ring_exposed_s, rel=1e-12)


def test_tp_collectives_take_the_rows_of_every_tp_group_of_the_node_at_once():
    """The node's TP groups run the same collectives at the same time (one per DP replica): a TP pair is priced
    from the profile's rows for that many concurrent groups where it has them (a measured CPU profile: 4 ranks
    on 2 cores, tp 2: two groups), else as one group alone (analytic: none within a node)."""
    measured, tiny = without_wake(load_profile("local-cpu.measured")), load_model("tiny")
    coll = measured.tables["collective"].copy()
    coll.loc[coll["concurrent_groups"] == 2, "time_s"] *= 3.0  # two groups at once: 3x their measured time
    slow = dataclasses.replace(measured, tables={**measured.tables, "collective": coll})
    tr = TrainingSpec(dtype="fp32", tp=2)

    def pair(profile, cluster: str, ranks: int) -> float:
        return float(CostModel(Setup(tiny, load_cluster(cluster).with_gpus(ranks), tr), profile).tp_pair_s(2048))

    assert pair(slow, "local-cpu", 2) == pytest.approx(pair(measured, "local-cpu", 2))  # one group: its rows
    assert pair(slow, "local-cpu", 4) == pytest.approx(3.0 * pair(measured, "local-cpu", 4))
    act = 2048 * tiny.hidden * 4
    alone = sum(float(measured.collective_time_s(op, act, 2)) for op in ("all_gather", "reduce_scatter"))
    assert pair(measured, "local-cpu", 2) == pytest.approx(alone, rel=1e-3)
    h100 = load_profile("h100-sxm.analytic")
    alone = sum(float(h100.collective_time_s(op, 2048 * tiny.hidden * 2, 2)) for op in ("all_gather", "reduce_scatter"))
    assert float(CostModel(Setup(tiny, load_cluster("dgx-h100").with_gpus(8), TrainingSpec(tp=2)), h100)
                 .tp_pair_s(2048)) == pytest.approx(alone, rel=1e-3)


def test_another_attention_kernel_scales_the_attention_core_only():
    """TrainingSpec.attention_kernel fa2 on the FA3 table: the attention core at FA2's published rate for its
    length (FA3 paper, H100: causal forward 616 / 335 TFLOP/s at 16K and beyond, 292 / 191 at 512), GEMMs and
    collectives as they were."""
    def unit(kernel, docs, cp):
        setup = Setup(load_model("llama-7b"), load_cluster("dgx-h100").with_gpus(64),
                      TrainingSpec(attention_kernel=kernel))
        return CostModel(setup, load_profile("h100-sxm.analytic")).unit_cost(docs, cp)

    long, short = ([131072], 2), ([512] * 64, 1)  # CP 2 on 32K chunks; a packed bin of 512-token documents
    fa3, fa2, flash = unit("fa3", *long), unit("fa2", *long), unit("flash", *long)
    assert fa3 == flash  # the table's own kernel
    assert fa2.attn_fwd_compute_s == pytest.approx(fa3.attn_fwd_compute_s * 616 / 335)
    assert fa2.attn_bwd_compute_s == pytest.approx(fa3.attn_bwd_compute_s * 561 / 322)
    # (the cost model samples each curve on a log grid of lengths: the ratio's kink at 512 moves it by 0.2%)
    assert unit("fa2", *short).attn_fwd_compute_s == pytest.approx(unit("fa3", *short).attn_fwd_compute_s * 292 / 191,
                                                                   rel=5e-3)
    assert fa2.fwd_compute_s - fa2.attn_fwd_compute_s == pytest.approx(fa3.fwd_compute_s - fa3.attn_fwd_compute_s)
    assert fa2.tp_comm_fwd_s == fa3.tp_comm_fwd_s


def test_chunked_attention_prices_each_chunk_as_a_document(cm):
    """Llama 4's chunked layers: a 20K document in chunks of 8K is two 8K causal squares and a 3,616-token one, each
    at its own length's rate; one layer of four attends over the whole sequence (φ = 3/4); up to a chunk, nothing
    changes; sharded over CP the ranks' attention takes the same factor."""
    chunked = dataclasses.replace(cm.model, name="chunked", attention_chunk=8192, full_attention_layers=8)
    ch = CostModel(Setup(chunked, cm.setup.cluster, cm.setup.training), cm.profile)
    t = lambda s: float(cm.attn_bwd_s(float(s)))  # noqa: E731
    want = 0.25 + 0.75 * (2 * t(8192) + t(20000 - 2 * 8192)) / t(20000)
    assert float(ch.attn_window_x(20000.0, "bwd")) == pytest.approx(want, rel=1e-12)
    assert float(ch.attn_window_x(8192.0, "fwd")) == 1.0 and float(ch.attn_window_x(5000.0, "bwd")) == 1.0
    whole = float(ch.attn_window_x(2 * 8192.0, "fwd"))  # no remainder: two squares of 8K
    assert whole == pytest.approx(0.25 + 0.75 * 2 * float(cm.attn_fwd_s(8192.0)) / float(cm.attn_fwd_s(16384.0)))
    cp1, cp8 = cm.unit_cost([8 * 32768], 8), ch.unit_cost([8 * 32768], 8)
    assert cp8.attn_fwd_compute_s == pytest.approx(cp1.attn_fwd_compute_s * float(ch.attn_window_x(8 * 32768.0,
                                                                                                   "fwd")), rel=1e-9)
    with pytest.raises(SpecError, match="sliding_window \\(4096\\) and attention_chunk \\(8192\\) both"):
        dataclasses.replace(chunked, sliding_window=4096)


def test_sliding_window_prices_the_band_of_keys(cm):
    # Mistral 7B v0.1's shape: every layer a 4K window; a 32K document's attention is the 4K causal square and 7
    # more 4K squares' worth at twice the pairs, at the 4K rate: t(4K)·(1 + 2·28K/4K)
    win = dataclasses.replace(cm.model, name="windowed", sliding_window=4096)
    wm = CostModel(Setup(win, cm.setup.cluster, cm.setup.training), cm.profile)
    x = float(wm.attn_window_x(32768.0, "fwd"))
    assert x == pytest.approx(float(cm.attn_fwd_s(4096.0)) * 15 / float(cm.attn_fwd_s(32768.0)), rel=1e-12)
    assert float(wm.attn_window_x(4096.0, "bwd")) == 1.0 and x < 1.0
    one, many = cm.unit_cost([32768]), wm.unit_cost([32768])
    assert many.attn_fwd_compute_s == pytest.approx(one.attn_fwd_compute_s * x, rel=1e-9)
    assert many.fwd_compute_s - many.attn_fwd_compute_s == pytest.approx(one.fwd_compute_s - one.attn_fwd_compute_s)
    # sharded over CP the ranks share the same band: attention x the same factor, the ring's transfers unchanged
    cp1, cp8 = cm.unit_cost([8 * 32768], 8), wm.unit_cost([8 * 32768], 8)
    assert cp8.attn_fwd_compute_s == pytest.approx(cp1.attn_fwd_compute_s * float(wm.attn_window_x(8 * 32768.0,
                                                                                                   "fwd")), rel=1e-9)
    assert cp8.ring_comm_s == pytest.approx(cp1.ring_comm_s)
    # one layer of two full (Gemma 2's alternation): half the layers at the factor
    half = dataclasses.replace(win, layers=32, full_attention_layers=16)
    hm = CostModel(Setup(half, cm.setup.cluster, cm.setup.training), cm.profile)
    assert float(hm.attn_window_x(32768.0, "fwd")) == pytest.approx(0.5 + 0.5 * x, rel=1e-12)
    assert wm.fit_layer_time()["alpha1_s_per_token2"] < cm.fit_layer_time()["alpha1_s_per_token2"]
    # materialised attention computes the whole square and masks it: a window saves nothing there
    unfused = dataclasses.replace(cm.setup.training, attention_kernel="unfused", tp=8)
    full_u = CostModel(Setup(cm.model, cm.setup.cluster, unfused), cm.profile).unit_cost([8192])
    win_u = CostModel(Setup(win, cm.setup.cluster, unfused), cm.profile).unit_cost([8192])
    assert win_u.attn_fwd_compute_s == full_u.attn_fwd_compute_s


def test_tp_without_sp_prices_the_all_reduces_that_run():
    """Without SP, Megatron (and the replay) all-reduce a layer's attention and MLP outputs forward and their input
    gradients backward, the embedding's output forward and the head's input gradient backward: priced from the
    all-reduce table, not as a gather plus a scatter, which differ on a measured profile (gloo here). With SP the
    collectives are the gathers and scatters."""
    prof = without_wake(load_profile("local-cpu.measured"))  # the collectives alone
    tokens, h = 2048.0, load_model("tiny").hidden

    def priced(sp: bool) -> tuple[CostModel, list[tuple[str, float]]]:
        tr = TrainingSpec(tp=2, dtype="fp32", kernels="eager", sequence_parallel=sp)
        cm = CostModel(Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(2), tr), prof)
        looked: list[tuple[str, float]] = []
        lookup = cm._lookup
        cm._lookup = lambda curve, x: looked.append((curve, float(np.max(x)))) or lookup(curve, x)
        cm.unit_cost([int(tokens)])
        return cm, looked

    no_sp, looked = priced(False)
    assert not [c for c, _ in looked if c in ("tp_all_gather", "tp_reduce_scatter")]
    act = tokens * h * 4  # one fp32 activation of the unit
    ar = float(no_sp._lookup("tp_all_reduce", act))
    pair = float(no_sp.tp_pair_s(tokens, layer=True))
    assert abs(ar / pair - 1) > 0.01  # the profile tells the two apart
    fwd, bwd = no_sp.layer_tp_comm_s(tokens)
    assert float(fwd) == pytest.approx(2 * ar, rel=1e-12) and float(bwd) == pytest.approx(2 * ar, rel=1e-12)
    unit = no_sp.unit_cost([int(tokens)])  # the tiny model's 2 layers
    assert unit.tp_comm_fwd_s == pytest.approx(4 * ar, rel=1e-12) and unit.tp_comm_bwd_s == pytest.approx(4 * ar)
    # the embedding's and the head's all-reduces, the loss's two small ones (row max; target logit and sum)
    assert {("tp_all_reduce", act), ("tp_all_reduce", tokens * 4), ("tp_all_reduce", tokens * 8)} <= set(looked)
    sp, looked = priced(True)
    assert float(sp.layer_tp_comm_s(tokens)[0]) == pytest.approx(2 * float(sp.tp_pair_s(tokens, layer=True)))
    assert ("tp_all_reduce", act) not in looked
    assert ("tp_all_gather", act) in looked and ("tp_reduce_scatter", act) in looked


def test_a_meeting_on_shared_cores_pays_the_profiles_wake_up():
    """Where a CPU node has as many ranks as cores or more, each TP collective, pipeline hand-off and ring wait costs
    the profile's measured wake-up on top of its transfer (the sleeper waits for a core); with cores left over, on
    GPU profiles and on CPU profiles measured before the constant, nothing."""
    from costmodel.timing import sync_wake_of

    def wake_s(profile, ranks) -> float:
        return sync_wake_of(profile, ranks).plateau_s

    base = without_wake(load_profile("local-cpu.measured"))
    cores = base.constants["cores_per_node"]["value"]
    woken = dataclasses.replace(base, constants={**base.constants, "cores_shared_wake_s": {"value": 2e-3}})
    assert wake_s(woken, 2 * cores) == wake_s(woken, cores) == 2e-3  # no one-a-core value: the same
    assert wake_s(woken, cores - 1) == 0.0 and sync_wake_of(woken, 2 * cores).half_s == 0.0
    # measured at one rank a core too: that at as many ranks as cores, linear up to two a core, then two a core's
    both = dataclasses.replace(woken, constants={**woken.constants, "cores_busy_wake_s": {"value": 1e-3}})
    assert wake_s(both, cores) == 1e-3 and wake_s(both, 3 * cores) == 2e-3
    assert wake_s(both, 1.5 * cores) == pytest.approx(1.5e-3)
    busy_only = dataclasses.replace(base, constants={**base.constants, "cores_busy_wake_s": {"value": 1e-3}})
    assert wake_s(busy_only, cores) == wake_s(busy_only, 2 * cores) == 1e-3
    assert wake_s(base, cores + 1) == 0.0 and wake_s(load_profile("h100-sxm.analytic"), 64) == 0.0

    def cm(profile, ranks: int, **tr) -> CostModel:
        return CostModel(Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(ranks),
                               TrainingSpec(dtype="fp32", kernels="eager", sequence_parallel=False, **tr)), profile)

    over = 2 * int(cores)  # two ranks per core
    act = 2048.0 * 64 * 4
    assert float(cm(woken, over, tp=2)._tp("all_reduce", 2048.0, act)) == pytest.approx(
        float(cm(base, over, tp=2)._tp("all_reduce", 2048.0, act)) + 2e-3)
    # a pipeline hand-off's wake-up is the schedule's, after the receiving rank's previous op (test_cores)
    assert cm(woken, over, pp=2).pp_p2p_s(2048.0) == cm(base, over, pp=2).pp_p2p_s(2048.0)
    # a ring over 2 members of 2 layers, no core to spare: no transfer hides, and each wait is a meeting; forward 1
    # K/V transfer a layer, backward 1 for K/V and 2 for the dK/dV accumulator, fp32 as the executor keeps it: as many
    # bytes as fp32 K/V, twice bf16's (1,024 tokens a member, K/V 2 x 32 wide)
    ring = cm(woken, int(cores))
    kv = 1024 * 2 * ring.model.kv_width * 4
    comm_f = float(ring.p2p_s(kv, False))
    cost = ring.unit_cost([2048], 2)
    assert cost.ring_exposed_fwd_s == pytest.approx(2 * (comm_f + 2e-3))
    assert cost.ring_exposed_bwd_s == pytest.approx(2 * (comm_f + 2e-3) + 2 * 2 * (comm_f + 2e-3))
    # bf16: the fp32 accumulator is twice the K/V's bytes (what TE's combined K/V + dK/dV message also moves)
    half = CostModel(Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(int(cores)),
                           TrainingSpec(dtype="bf16", kernels="eager", sequence_parallel=False)), woken)
    kv_f, acc_b = float(half.p2p_s(kv / 2, False)), float(half.p2p_s(kv, False))
    assert half.unit_cost([2048], 2).ring_exposed_bwd_s == pytest.approx(2 * (kv_f + 2e-3) + 2 * 2 * (acc_b + 2e-3))
    assert cm(base, int(cores)).unit_cost([2048], 2).ring_exposed_s < cost.ring_exposed_s
    # Ulysses over the pair: two all-to-alls a layer each way (Q, K and V in one, O in the other), each a meeting
    uly_w, uly_b = (cm(p, int(cores)).unit_cost([2048], 2, ulysses=2) for p in (woken, base))
    assert uly_w.ring_exposed_fwd_s == pytest.approx(uly_b.ring_exposed_fwd_s + 2 * 2 * 2e-3)
    assert uly_w.ring_exposed_bwd_s == pytest.approx(uly_b.ring_exposed_bwd_s + 2 * 2 * 2e-3)
    spare = {**woken.constants, "cores_per_node": {"value": 2 * int(cores)}}  # a core left over for each rank
    roomy = dataclasses.replace(woken, constants=spare)
    roomy_base = dataclasses.replace(base, constants={**base.constants, "cores_per_node": {"value": 2 * int(cores)}})
    assert cm(roomy, int(cores), tp=2).unit_cost([2048]).total_s == cm(roomy_base, int(cores),
                                                                           tp=2).unit_cost([2048]).total_s


def test_a_meeting_costs_more_after_more_compute():
    """With a measured half, a meeting's wake-up is plateau · t / (t + half) after t of one core's work alone (the
    priced compute over the compute share): a ring wait after its step's attention, a TP collective after half the
    layer's forward GEMMs and kernels, a late pipeline receive after its rank's previous op; the two constants are
    interpolated per rank count as the plateau is."""
    from costmodel.timing import Wake, sync_wake_of

    assert Wake(4e-3, 2e-3).at(np.array([0.0, 2e-3, 6e-3])).tolist() == pytest.approx([0.0, 2e-3, 3e-3])
    assert Wake(4e-3).at(np.array([0.0, 1.0])).tolist() == [4e-3, 4e-3]  # no half: the plateau throughout
    base = without_wake(load_profile("local-cpu.measured"))
    cores = int(base.constants["cores_per_node"]["value"])
    consts = {**base.constants, "cores_shared_wake_s": {"value": 4e-3}, "cores_shared_wake_half_s": {"value": 2e-3},
              "cores_busy_wake_s": {"value": 2e-3}, "cores_busy_wake_half_s": {"value": 1e-3}}
    curved = dataclasses.replace(base, constants=consts)
    for k in (cores, cores + max(1, cores // 2), 2 * cores, 3 * cores):  # linear from one rank a core to two
        x = min(1.0, (k - cores) / cores)
        got = sync_wake_of(curved, k)
        assert (got.plateau_s, got.half_s) == pytest.approx((2e-3 + 2e-3 * x, 1e-3 + 1e-3 * x))

    def cm(profile, ranks: int, **tr) -> CostModel:
        return CostModel(Setup(load_model("tiny"), load_cluster("local-cpu").with_gpus(ranks),
                               TrainingSpec(dtype="fp32", kernels="eager", sequence_parallel=False, **tr)), profile)

    ring, flat = cm(curved, cores), cm(base, cores)
    cost, cost0 = ring.unit_cost([2048], 2), flat.unit_cost([2048], 2)
    layers = ring.layers_per_stage
    attn_step = cost.attn_fwd_compute_s / layers / 2  # one ring step's attention, priced
    w = 2e-3 * (attn_step / ring.compute_share) / (attn_step / ring.compute_share + 1e-3)
    assert 0 < w < 2e-3 and cost.ring_exposed_fwd_s == pytest.approx(cost0.ring_exposed_fwd_s + layers * w)
    tp, tp0 = cm(curved, 2 * cores, tp=2), cm(base, 2 * cores, tp=2)
    seg = (float(tp.gemm_layer_fwd_s(1024.0)) + float(tp._lookup("mem_layer_fwd", 1024.0))) / 2 / tp.compute_share
    act = 1024.0 * 64 * 4
    assert float(tp._tp("all_reduce", 1024.0, act)) == pytest.approx(
        float(tp0._tp("all_reduce", 1024.0, act)) + 4e-3 * seg / (seg + 2e-3))
    assert float(tp.layer_wake_s(4096.0)) > float(tp.layer_wake_s(1024.0))  # more tokens: more compute before it
    pp = cm(curved, 2 * cores, pp=2)
    t = 3e-3 * pp.compute_share  # 3 ms of one core's work, priced
    assert float(pp.wake_after_s(t)) == pytest.approx(4e-3 * 3 / 5)  # what a late receive waits after it
