"""Validation against published measurements: the cases come from the packaged file, every error is
computed from the cost model at run time, and the pipeline timing follows the schedule."""

import dataclasses

import pytest

from costmodel.timing import UnitCost
from planner.schedule import closed_form_bubble
from costmodel.flops import model_flops
from planner.studies import validation
from planner.studies.validation import (CALIBRATION_SETS, ValidationRow, chunk_layers, iteration_flops,
                                        iteration_memory, iteration_row, layer_rows, load_calibration_set,
                                        pipeline_time_s, published_iteration_s, validate_cost_model)
from profiles.table import load_profile


@pytest.fixture(scope="module")
def a100():
    return load_profile("a100-sxm-80gb.analytic")


def test_packaged_set_has_the_published_rows():
    cal = load_calibration_set()
    assert cal.cluster == "dgx-a100" and cal.seq_tokens == 2048
    assert [c.backward_ms for c in cal.layer_cases] == [11.8, 13.1, 19.5]
    assert [c.iteration_s for c in cal.iteration_cases] == [1.42, 1.10, 18.13, 13.75, 37.83, 71.49]

def test_mpt_set_counts_the_parameters_the_benchmark_table_prints():
    # each MPT model's spec (learned positions as long as the row's sequence) holds the table's NumParams exactly,
    # and every row's global batch is GPUs x micro-batch x accumulation
    cal = load_calibration_set("llmfoundry_mpt2023")
    assert len(cal.iteration_cases) == 59 and cal.training["zero_stage"] == 3
    for c in cal.iteration_cases:
        m = cal.model(c.model)
        printed = int(m.source.rsplit("; ", 1)[1].split(" ")[0].replace(",", ""))
        assert m.parameters == printed and m.max_positions == c.seq_tokens
        assert c.global_batch % (c.gpus * c.micro_batch) == 0


def test_report_rows_and_mape(a100):
    r = validate_cost_model(a100)
    assert len(r.rows) == 2 * 3 + 6 and r.profile == "a100-sxm-80gb.analytic"
    for row in r.rows:
        assert row.predicted > 0 and row.note
        assert row.error == pytest.approx(row.predicted / row.published - 1)
    assert r.mape == pytest.approx(sum(abs(x.error) for x in r.rows) / len(r.rows))
    assert r.to_dict()["rows"][0]["error"] == r.rows[0].error


def test_error_moves_with_the_profile(a100):
    # a faster GPU predicts shorter times for the same published figures: the error is computed, not stored
    a, h = validate_cost_model(a100), validate_cost_model("h100-sxm.analytic")
    for ra, rh in zip(a.rows, h.rows):
        assert ra.published == rh.published and rh.predicted < ra.predicted and rh.error < ra.error


def test_error_moves_with_the_published_figure(a100):
    cal = load_calibration_set()
    case = cal.layer_cases[0]
    fwd, _ = layer_rows(cal, case, a100)
    fwd2, _ = layer_rows(cal, dataclasses.replace(case, forward_ms=2 * case.forward_ms), a100)
    assert fwd2.predicted == fwd.predicted
    assert 1 + fwd2.error == pytest.approx((1 + fwd.error) / 2)


def test_full_recompute_backward_includes_the_forward(a100):
    cal = load_calibration_set()
    none, full = (layer_rows(cal, c, a100) for c in (cal.layer_cases[0], cal.layer_cases[2]))
    # the full-recompute row runs without SP: norms, dropout and residuals are replicated on the 8 TP ranks
    assert 1.0 < full[0].predicted / none[0].predicted < 1.2
    assert full[1].predicted > none[1].predicted + 0.8 * none[0].predicted


def test_row_error_sign():
    assert ValidationRow("x", "s", 2.0, 3.0, "n").error == pytest.approx(0.5)
    assert ValidationRow("x", "s", 2.0, 1.0, "n").error == pytest.approx(-0.5)


def _unit(fwd_s: float, bwd_s: float) -> UnitCost:
    return UnitCost(fwd_compute_s=fwd_s, bwd_compute_s=bwd_s, ring_comm_s=0, ring_exposed_fwd_s=0,
                    ring_exposed_bwd_s=0, tp_comm_fwd_s=0, tp_comm_bwd_s=0, offload_exposed_fwd_s=0,
                    offload_exposed_bwd_s=0, head_fwd_s=0, head_bwd_s=0, tokens_per_rank=1)


@pytest.mark.parametrize("p,m,v", [(1, 4, 1), (4, 8, 1), (4, 8, 2), (8, 64, 3)])
def test_pipeline_time_matches_the_closed_form_bubble(p, m, v):
    # uniform stages, no transfer: T = m·(f + b) / (1 − bubble) (REFERENCE §6)
    t = pipeline_time_s(p, m, v, _unit(1.0, 2.0), 0.0)
    assert t == pytest.approx(m * 3.0 / (1 - closed_form_bubble(p, m, v=v)))


def test_pipeline_transfers_add_time():
    assert pipeline_time_s(4, 8, 1, _unit(1.0, 2.0), 0.1) > pipeline_time_s(4, 8, 1, _unit(1.0, 2.0), 0.0)


def test_pipeline_runs_each_chunk_with_its_own_layers():
    # the unit prices a stage of 6 layers and the head; BLOOM's split gives the last stage 5 and the head: it is no
    # longer the bottleneck, so the step is set by the middle stages' 6 layers (m·(f + b) plus the bubble)
    unit = dataclasses.replace(_unit(6.0, 12.0), head_fwd_s=1.0, head_bwd_s=2.0)
    even = pipeline_time_s(4, 32, 1, unit, 0.0, [[6]] * 4)
    assert even == pytest.approx(pipeline_time_s(4, 32, 1, unit, 0.0))  # equal chunks: as without layer counts
    split = pipeline_time_s(4, 32, 1, unit, 0.0, [[5], [6], [6], [5]])
    assert split < even
    assert split == pytest.approx(32 * 18.0 / (1 - closed_form_bubble(4, 32)), rel=0.02)
    assert chunk_layers(70, 12, 1) == [[5]] + [[6]] * 10 + [[5]]  # BLOOM: embedding and head each a layer slot
    with pytest.raises(ValueError, match="3 stages"):
        pipeline_time_s(4, 32, 1, unit, 0.0, [[6]] * 3)


def test_iteration_row_rejects_batches_that_do_not_split(a100):
    cal = load_calibration_set()
    case = dataclasses.replace(cal.iteration_cases[0], gpus=16)  # DP 2: 4 sequences are not 2 micro-batches of 4
    with pytest.raises(ValueError, match="not a multiple of micro-batch 4 x DP 2"):
        iteration_row(cal, case, a100)


@pytest.mark.parametrize("name", CALIBRATION_SETS)
def test_every_packaged_set_prices(name):
    r = validate_cost_model(name=name)
    assert r.rows and all(x.predicted > 0 and x.published > 0 for x in r.rows)
    assert r.mape == pytest.approx(sum(abs(x.error) for x in r.rows) / len(r.rows))
    for x in r.rows:  # the breakdown is the prediction, part by part: nothing left over, nothing negative
        assert set(x.parts) <= set(validation.BREAKDOWN_PARTS) and x.parts["gemm"] > 0
        assert sum(x.parts.values()) == pytest.approx(x.predicted, rel=1e-9)
        assert min(x.parts.values()) > -1e-9 * x.predicted


def test_rows_carry_their_kind_of_run():
    bloom = validate_cost_model(name="bloom2022").rows[0]
    assert bloom.facets == {"gpu": "A100 SXM 80GB", "sequence": "1-2K", "layout": "1F1B PP", "model": "dense"}
    # the notes say how each run accumulates its gradients where it is not Megatron-core's fused GEMM
    assert "gradients cast to fp32 and added after each micro-batch's backward" in bloom.note
    nar = validate_cost_model(name="narayanan2021").rows
    assert "fp16 gradients added" in nar[-1].note and "added after" not in nar[0].note
    llama = validate_cost_model(name="llama3_2024").rows[-1].facets  # 128K on TP8 PP16 (8 chunks) CP16
    assert llama == {"gpu": "H100 SXM", "sequence": ">64K", "layout": "interleaved PP + CP", "model": "dense"}
    assert {r.facets["model"] for r in validate_cost_model(name="megatron_bridge_moe2025").rows} == {"MoE"}
    assert validate_cost_model(name="torchtitan_a100_2024").rows[0].facets["layout"] == "FSDP"
    assert validate_cost_model().rows[0].facets["layout"] == "one layer"  # Korthikanti's per-layer times
    # buckets by range: a length up to each bound, whether or not a power of two
    assert [validation.row_facets("B200", s)["sequence"] for s in (512, 3072, 4096, 12288, 65536, 98304)] == \
        ["≤1K", "2-4K", "2-4K", "8-64K", "8-64K", ">64K"]


def test_facet_errors_group_mape_and_bias_by_hand():
    def row(err: float, gpu: str, seq: str) -> ValidationRow:
        return ValidationRow("x", "s", 1.0, 1.0 + err, "", {}, {"gpu": gpu, "sequence": seq})
    rows = [row(-0.2, "A100", "4-8K"), row(0.1, "A100", "1-2K"), row(-0.1, "H100", "1-2K")]
    assert validation.facet_errors(rows, "gpu") == [("A100", 2, pytest.approx(0.15), pytest.approx(-0.05)),
                                                     ("H100", 1, pytest.approx(0.1), pytest.approx(-0.1))]
    assert [v for v, *_ in validation.facet_errors(rows, "sequence")] == ["1-2K", "4-8K"]  # shortest first


def test_megatron_flops_convention_is_the_model_flops_with_recompute():
    # Narayanan et al. 2021 eq. 3 (96·B·s·l·h²(1 + s/6h + V/16lh)) = 3 passes of model FLOPs + a recompute forward
    cal = load_calibration_set("narayanan2021")
    gpt = cal.model(cal.iteration_cases[0].model)
    plain = iteration_flops(gpt, "megatron2021", 8, 2048, "none")
    assert plain == pytest.approx(model_flops([2048] * 8, gpt, causal_halved=False), rel=0.02)
    head = 6.0 * 8 * 2048 * gpt.hidden * gpt.vocab
    assert iteration_flops(gpt, "megatron2021", 8, 2048, "full") - head == pytest.approx((plain - head) * 4 / 3)


def test_published_rate_becomes_an_iteration_time():
    cal = load_calibration_set("narayanan2021")
    case = cal.iteration_cases[0]
    t = published_iteration_s(cal, case)
    flops = iteration_flops(cal.model(case.model), "megatron2021", case.global_batch, cal.seq_tokens, case.recompute)
    assert t == pytest.approx(flops / (case.tflops_per_gpu * 1e12 * case.gpus))
    faster = dataclasses.replace(case, tflops_per_gpu=2 * case.tflops_per_gpu)
    assert published_iteration_s(cal, faster) == pytest.approx(t / 2)
    with pytest.raises(ValueError, match="exactly one"):
        published_iteration_s(cal, dataclasses.replace(case, iteration_s=1.0))


# ---- memory: every packaged run trained, so its predicted peak is checked against the HBM it ran in -------------
def test_chunk_layers_take_the_missing_layers_from_the_pipeline_ends():
    # Llama 3: 126 layers on 16 stages x 8 chunks, the first chunk holding only the embedding, the last the output
    layers = chunk_layers(126, 16, 8)
    assert layers[0] == [0] + [1] * 7 and layers[15] == [1] * 7 + [0]
    assert all(c == [1] * 8 for c in layers[1:15]) and sum(map(sum, layers)) == 126
    assert chunk_layers(105, 35, 3) == [[1] * 3] * 35  # 530B: whole chunks
    assert chunk_layers(30, 2, 4) == [[3, 4, 4, 4], [4, 4, 4, 3]]


def test_pipeline_layout_strings_as_megatron_core_writes_them():
    from planner.studies.validation import parse_pipeline_layout as parse
    # DeepSeek-V3's H100 recipe: the embedding and a layer, 30 virtual stages of two, the MTP depth and the loss
    layers = parse("Et|(tt|)*30mL", 8, 4, 61, 1)
    assert layers[0] == [1, 2, 2, 2] and layers[7] == [2, 2, 2, 0] and sum(map(sum, layers)) == 61
    assert parse("E|t*3|t*3|tL", 2, 2, 7) == [[0, 3], [3, 1]]  # stage k % p's chunk k // p
    assert parse("E|(tt|)*2,(t|)*4,mL", 8, 1, 8, 1) == parse("E|tt|tt|t|t|t|t|mL", 8, 1, 8, 1)  # commas: cosmetic
    for bad, match in (("Et|(tt|)*29mL", "31 virtual stages"), ("Et|(tt|)*30L", "0 MTP layers"),
                       ("Etm|(tt|)*30L", "MTP layer \\(m\\) on the pipeline's last"),
                       ("t|(tt|)*29Ett|mL", "embedding \\(E\\) on the pipeline's first"),
                       ("Et|(tt|)*30mx", "unknown symbol"), ("Ett|(tt|)*30mL", "62 transformer layers")):
        with pytest.raises(ValueError, match=match):
            parse(bad, 8, 4, 61, 1)


def test_lone_passes_expose_what_the_ep_overlap_hid():
    # one stage: the first forward runs alone and so does the last backward (Megatron-core's combined 1F1B)
    unit = UnitCost(fwd_compute_s=2.0, bwd_compute_s=4.0, ring_comm_s=0, ring_exposed_fwd_s=0, ring_exposed_bwd_s=0,
                    tp_comm_fwd_s=0, tp_comm_bwd_s=0, offload_exposed_fwd_s=0, offload_exposed_bwd_s=0, head_fwd_s=0,
                    head_bwd_s=0, tokens_per_rank=1)
    base = validation.pipeline_runs(1, 4, 1, unit, 0.0, [[2]])[0]
    assert validation.pipeline_runs(1, 4, 1, unit, 0.0, [[2]], unpaired_s=0.25)[0] == pytest.approx(base + 2 * 2 * 0.25)
    # interleaved, 4 stages: each stage's warm-up forwards and cool-down backwards, 2 layers a chunk
    p, m, v = 4, 8, 2
    ops = {s: validation.stage_ops(p, s, [1] * m, v) for s in range(p)}
    lone = []
    for s in range(p):
        kinds = [op.kind for op in ops[s]]
        first_b, last_f = kinds.index("B"), len(kinds) - 1 - kinds[::-1].index("F")
        lone.append(sum(1 for i, k in enumerate(kinds) if (k == "F" and i < first_b) or (k == "B" and i > last_f)))
    assert lone[0] == 2 * ((v - 1) * p + 2 * (p - 1)) + 2  # Megatron's interleaved warm-up, + its first F and last B
    more = validation.pipeline_runs(p, m, v, unit, 0.0, [[2, 2]] * p, unpaired_s=1e-3)[0]
    assert base < more and validation.pipeline_runs(p, m, v, unit, 0.0, [[2, 2]] * p)[0] < more


def test_deepseek_v3_runs_its_layout_dispatcher_and_overlap():
    cal = load_calibration_set("megatron_bridge_moe2025")
    case = next(c for c in cal.iteration_cases if c.model == "deepseek-v3")
    assert case.layout == "Et|(tt|)*30mL" and case.training["moe_dispatcher"] == "flex"
    h100 = load_profile("h100-sxm.analytic")
    row = iteration_row(cal, case, h100)
    assert "layout Et|(tt|)*30mL" in row.note
    plain = dataclasses.replace(case, training={**case.training, "ep_comm_overlap": False})
    assert iteration_row(cal, plain, h100).predicted > row.predicted  # the overlap hides all-to-alls
    mem, plain_mem = iteration_memory(cal, case, h100), iteration_memory(cal, plain, h100)
    assert mem.held_layers == plain_mem.held_layers + 2  # one more chunk forward warmed up
    with pytest.raises(ValueError, match="needs an interleaved pipeline"):
        iteration_row(cal, dataclasses.replace(case, chunks=1, layout=None), h100)


def test_memory_row_adds_up_the_stage_it_names(a100):
    # 22B, full recompute, pp 1: states + one micro-batch's layer inputs + one layer's working set + its logits
    cal = load_calibration_set()
    case = cal.iteration_cases[0]
    row = iteration_memory(cal, case, a100)
    run_cm = validate_cost_model(a100)  # the same row in the report
    assert run_cm.memory[0] == row and row.stage == 0 and row.held_layers == 48
    tokens = case.micro_batch * cal.seq_tokens
    gpt = cal.model(case.model)
    assert row.parts["activations"] == pytest.approx(48 * tokens * 2 * gpt.hidden)  # full recompute: 2h a layer
    assert row.peak_bytes == pytest.approx(sum(row.parts.values()))
    # an A100 80GB gives CUDA 84,987,740,160 B; a run fits when its allocations and the context do, and the planner's
    # 10% fragmentation reserve is reported beside it
    assert row.hbm_bytes == 84_987_740_160
    assert row.needed_bytes == pytest.approx(row.peak_bytes - row.parts["fragmentation"])
    assert row.parts["fragmentation"] == pytest.approx(0.1 * row.hbm_bytes)
    assert row.fits == (row.needed_bytes <= row.hbm_bytes) and row.headroom_bytes == row.hbm_bytes - row.needed_bytes
    assert row.fits_with_reserve == (row.peak_bytes <= row.hbm_bytes)


def test_interleaved_stage_holds_megatrons_warmup():
    # Llama 3 on 8,192 GPUs: 32 micro-batches, p = 16, v = 8. Stage 1 (8 one-layer chunks) holds Megatron's warm-up,
    # 2(p - 2) + (v - 1)p + 1 = 141 chunk forwards, before its first backward.
    cal = load_calibration_set("llama3_2024")
    row = iteration_memory(cal, cal.iteration_cases[0], load_profile("h100-sxm.analytic"))
    assert row.stage == 1 and row.held_layers == 141


@pytest.mark.parametrize("name", ["korthikanti2022", "narayanan2021"])
def test_megatron_runs_on_a100_fit_their_80_gb(name):
    # every row trained on 80 GB A100s (Megatron-LM, its own schedules): the memory model must not say otherwise, even
    # with the planner's fragmentation reserve, nor leave most of the GPU unexplained (the fp16 gradients of 2021's
    # runs leave Narayanan's 3.6B at 55% of it)
    r = validate_cost_model(name=name)
    assert len(r.memory) == len(load_calibration_set(name).iteration_cases)
    for m in r.memory:
        assert m.fits_with_reserve, f"{m.case}: {m.peak_bytes / 1e9:.1f} GB predicted on an 80 GB GPU"
        assert m.needed_bytes > 0.5 * m.hbm_bytes, m.case


def test_published_throughput_becomes_an_iteration_time():
    # tokens/s per GPU (Megatron-Bridge's tables): GBS · seq tokens over the whole machine's rate, no FLOP count
    cal = load_calibration_set("megatron_bridge2025")
    case = cal.iteration_cases[0]
    assert published_iteration_s(cal, case) == pytest.approx(case.global_batch * 8192 / (case.tokens_per_s_per_gpu
                                                                                         * case.gpus))
    with pytest.raises(ValueError, match="exactly one"):
        published_iteration_s(cal, dataclasses.replace(case, tflops_per_gpu=700.0))


def test_overlapped_gradient_sync_is_what_the_validation_charges():
    # the recipes overlap the gradient reduce-scatter with each chunk's last backward and the all-gather with the
    # next forward: the row's exposed sync is far below the whole sync, and turning the overlaps off costs it back
    cal = load_calibration_set("megatron_bridge2025")
    h100 = load_profile("h100-sxm.analytic")
    case = cal.iteration_cases[3]  # 405B, DP 8 x CP 2
    over = iteration_row(cal, case, h100)
    plain_cal = dataclasses.replace(cal, training={**cal.training, "overlap_grad_reduce": False,
                                                   "overlap_param_gather": False})
    plain = iteration_row(plain_cal, case, h100)
    # the 405B's 0.49 s sync: bf16 gradients and fp8 weights (fp8_param_gather) over 8 nodes' NICs
    assert plain.predicted > over.predicted + 0.4
    assert "s exposed" in over.note


def test_a_case_runs_its_own_recipe_over_the_sets():
    # NeMo 24.07: LLAMA3-8B's run reduced its gradients in bf16 (examples/training/llama/h100/llama3_8b_fp8.sh), the
    # set default is fp32; the case's own training wins, and case fields cannot be given twice
    cal = load_calibration_set("nemo2024")
    case = next(c for c in cal.iteration_cases if c.label.startswith("LLAMA3-8B"))
    h100 = load_profile("h100-sxm.analytic")
    own = iteration_memory(cal, case, h100)
    fp32 = iteration_memory(cal, dataclasses.replace(case, training={}), h100)
    assert own.fits and not fp32.fits  # 8.03B gradients at 4 B: 16 GB more, over the 80 GB
    assert fp32.parts["states"] - own.parts["states"] == pytest.approx(8.03e9 * 2, rel=0.01)
    # a run the memory model says does not fit is still priced at its own micro-batch
    assert iteration_row(cal, dataclasses.replace(case, training={}), h100).predicted > 0
    with pytest.raises(ValueError, match="give tp as the case's own field"):
        iteration_row(cal, dataclasses.replace(case, training={"tp": 2}), h100)


def test_nemos_flop_count_is_palms_full_square():
    # NeMo's Llama count per token, L·h²·(12 + 12g/a + 18f/h + 12s/h + 6V/(L·h)) (nemo/utils/flops_formulas.py),
    # is PaLM's 6N + 12·L·H·Q·T but for the norm weights; with it NeMo 24.07's LLAMA2-7B row, 16,847 tokens/s per
    # GPU, is its published 776 TFLOP/s (a causal half would give 722): nemo_longseq2024 turns its TFLOP/s back so
    m = load_calibration_set("nemo_longseq2024").model("llama2-7b")
    L, h, g, a, f, V = m.layers, m.hidden, m.kv_heads, m.heads, m.ffn, m.vocab
    for s in (4096, 1 << 20):
        nemo = L * h * h * (12 + 12 * g / a + 18 * f / h + 12 * s / h + 6 * V / (L * h))
        assert iteration_flops(m, "palm", 1, s, "none") / s == pytest.approx(nemo, rel=1e-4)
    assert 16847 * iteration_flops(m, "palm", 1, 4096, "none") / 4096 / 1e12 == pytest.approx(776, abs=0.5)


def test_an_fsdp_row_runs_as_rounds_of_per_layer_gathers():
    """torchtitan's FSDP2 rows (zero_stage 3): each micro-batch a round (costmodel.zero.round_time_s) of the
    unit's per-layer times with the per-layer all-gathers and reduce-scatters over all 64 ranks, no gradient sync
    after the backward; and no pipeline under FSDP."""
    from costmodel.zero import round_collectives, round_time_s

    cal = load_calibration_set("torchtitan_a100_2024")
    case = next(c for c in cal.iteration_cases if c.model == "llama3-70b")
    a100 = load_profile("a100-sxm-80gb.analytic")
    row = iteration_row(cal, case, a100)
    cm = validation._run(cal, case, a100).cm
    unit = cm.unit_cost([8192], with_head=True)
    layers = cm.layers_per_stage
    rounds = round_time_s((unit.fwd_s - unit.head_fwd_s) / layers, (unit.bwd_s - unit.head_bwd_s) / layers,
                          unit.head_fwd_s + unit.head_bwd_s, layers, round_collectives(cm.setup, a100))
    assert rounds > unit.total_s  # the first gathers and the last reduce-scatter are exposed
    assert row.predicted == pytest.approx(rounds + cm.optimizer_step_s())
    assert "FSDP over DP 64" in row.note
    with pytest.raises(ValueError, match="zero_stage 3 with pp=2 is not modelled"):
        iteration_row(cal, dataclasses.replace(case, pp=2, gpus=64), a100)


def test_chunk_gradient_shares_weigh_each_chunks_parameters():
    # 2 stages of 2 chunks, 1 + 2 and 2 + 1 layers: stage 0 ends the step, its first chunk holds a layer and the
    # embedding, its second two layers; by layers alone the shares would be 1/3 and 2/3
    from planner.studies.validation import _run, pipeline_runs
    from profiles.table import load_profile

    cal = load_calibration_set("llama3_2024")
    m = cal.model("llama3-405b")
    unit = _run(cal, cal.iteration_cases[0], load_profile("h100-sxm.analytic")).cm.unit_cost([8192], with_head=True)
    layers = [[1, 2], [2, 1]]
    _, windows, shares = pipeline_runs(2, 4, 2, unit, 0.0, layers, m)
    first, second = m.layer_params() + m.input_embedding_params(), 2 * m.layer_params()
    assert windows[0][1] == 0.0  # chunk 0 of stage 0 ends the step
    assert shares == pytest.approx([first / (first + second), second / (first + second)])
    assert pipeline_runs(2, 4, 2, unit, 0.0, layers)[2] == pytest.approx([1 / 3, 2 / 3])
