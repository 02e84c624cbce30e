"""hdp is never slower than a baseline (issue 20, item 1): a property over random batches from the length
families, meshes of 4-1,024 ranks, tp and pp, plus the losses that were filed."""

import functools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from planner.api import PlanRequest, build_cost_model, make_batches
from planner.plan import PlanError
from planner.strategies import STRATEGIES, PlanOptions
from planner.workload import FAMILIES, global_batches

BASELINES = ("static", "dcp", "hdp-naive")
K = 1024
M = 2**20


@functools.lru_cache(maxsize=None)
def cost_model(model: str, gpus: int, tp: int, pp: int, capacity: int | None):
    cluster = "local-cpu" if model == "tiny" else "dgx-h100"
    return build_cost_model(PlanRequest(model=model, cluster=cluster, gpus=gpus, tp=tp, pp=pp,
                                        capacity_tokens=capacity, recompute="none"))


def step_times(batch, cm, opt=PlanOptions()) -> dict[str, float]:
    out = {}
    for name in (*BASELINES, "hdp"):
        try:
            out[name] = STRATEGIES[name](batch, cm, opt).predicted.step_time_s
        except PlanError:  # e.g. static or dcp find no (aligned) group for the longest sequence
            out[name] = float("inf")
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(sorted(FAMILIES)), model=st.sampled_from(["tiny", "llama-7b"]),
       ranks=st.sampled_from([4, 8, 16, 32, 64]), tp=st.sampled_from([1, 2]), pp=st.sampled_from([1, 2]),
       small_cap=st.booleans(), steps_of_context=st.integers(2, 16), seed=st.integers(0, 2**16))
def test_hdp_never_slower_than_a_baseline(family, model, ranks, tp, pp, small_cap, steps_of_context, seed):
    assume(ranks // (tp * pp) >= 2)
    cap = 2048 if small_cap or model == "llama-7b" else None  # small C on llama-7b keeps the budgets small
    cm = cost_model(model, ranks, tp, pp, cap)
    max_context = 2 * min(cm.capacity_tokens, 4 * K)
    batch = global_batches(family, tokens_per_step=steps_of_context * max_context, max_context_tokens=max_context,
                           steps=1, seed=seed)[0]
    t = step_times(batch, cm)
    assume(t["hdp"] < float("inf"))
    assert t["hdp"] <= min(t[b] for b in BASELINES) * (1 + 1e-9), t


def test_hdp_beats_dcp_at_32_gpus_with_32m_tokens():
    """Filed loss: LLaMA-7B, 32 x H100, byted-like, 2M context, 32M tokens: dcp 1,173 s, hdp 1,260 s (three
    2M-token units on 30 of 32 ranks and odd degrees left holes between gangs). hdp's own layout must win
    now, not only its fallback to dcp's plan."""
    from planner.strategies import hdp

    req = PlanRequest(gpus=32, tokens_per_step=32 * M, recompute="auto")
    cm = build_cost_model(req)
    batch = make_batches(req)[0]
    dcp = STRATEGIES["dcp"](batch, cm, req.options).predicted.step_time_s
    own = hdp._plan_dp_balance(batch, cm, req.options).predicted.step_time_s
    assert own < dcp
    assert STRATEGIES["hdp"](batch, cm, req.options).predicted.step_time_s <= own


@pytest.mark.filterwarnings("ignore:profile 'epyc-avx2.measured' was measured with torch's AVX2")
def test_pp2_on_4_cpu_ranks_uses_both_pipelines():
    """Filed loss: tiny, 4 CPU ranks, pp = 2, examples/lengths.txt, 4K context: the 8 documents made one
    C-token bin, one micro-batch on one pipeline, the other idle. Priced with the AVX2 EPYC's profile (the fixture),
    where hdp's own layout beats dcp's by 1%; on the AVX-512 EPYC's shipped profiles the two tie (0.03% and 0.01%
    apart)."""
    fixture = Path(__file__).resolve().parents[2] / "data" / "epyc-avx2.measured.json"
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, pp=2, lengths="examples/lengths.txt",
                      max_context_tokens=4 * K, profile=str(fixture))
    cm = build_cost_model(req)
    batch = make_batches(req)[0]
    from planner.strategies import hdp

    t = step_times(batch, cm)
    own = hdp._plan_pp_short_caps(batch, cm, req.options).predicted.step_time_s  # without the baselines' plans
    assert t["hdp"] <= own < min(t[b] for b in BASELINES)
    step = STRATEGIES["hdp"](batch, cm, req.options)
    # Every pipeline gets work. One micro-batch each is enough here: 4 ranks share 2 cores, so a stage idle in its
    # pipeline's bubble leaves its core to the other pipeline's busy stage (planner/simulate/cores.py).
    per_pipeline = [len(step.order[r]) for r in range(cm.setup.hdp)]
    assert min(per_pipeline) >= 1
    busy = np.asarray(step.predicted.per_rank_busy_s)
    assert busy.min() > 0.5 * busy.max()


@pytest.mark.parametrize("gpus", [64, 256])
def test_hdp_not_slower_on_byted_like_at_scale(gpus):
    """The bench's setup (LLaMA-7B, 2M context, 32M tokens per 1,024 GPUs), where steps exceed the size at
    which the baselines are candidates: hdp's own layout must still win."""
    req = PlanRequest(gpus=gpus, tokens_per_step=max(4 * M, 32 * M * gpus // 1024), recompute="auto")
    cm = build_cost_model(req)
    batch = make_batches(req)[0]
    t = step_times(batch, cm)
    assert t["hdp"] <= min(t[b] for b in BASELINES) * (1 + 1e-9), t


def test_hdp_under_pp_beats_the_baselines_on_a_long_context_mix():
    """Filed loss (issue 21): llama3-70b, tp 8, pp 4, 512K context, 32M github-like tokens on 1,024 H100s:
    hdp 83 s against dcp's 47 s, long sequences on 1-2 pipelines at offload ratios of 0.9-0.97 set a 1F1B
    fill and drain of 47 s. At half that scale with pp 8 (hdp 188 s, dcp 159 s before) hdp's degrees are now
    capped against the fill and drain, and documents larger than a bin are sharded too."""
    req = PlanRequest(model="llama3-70b", gpus=512, tp=8, pp=8, max_context_tokens=512 * K, tokens_per_step=16 * M,
                      lengths="github-like")
    cm = build_cost_model(req)
    batch = make_batches(req, cm)[0]
    t = step_times(batch, cm, req.options)
    step = STRATEGIES["hdp"](batch, cm, req.options)
    assert t["hdp"] <= min(t["static"], t["dcp"])
    assert step.predicted.step_time_s / step.predicted.lower_bound_s < 1.35  # 1.27 now; 3.7 before
    assert max(step.predicted.peak_memory_bytes) <= cm.budget.hbm_bytes


# derandomized: the same 8 cases every run (large meshes: a CI run must not draw a 10x slower case by chance)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(family=st.sampled_from(sorted(FAMILIES)), ranks=st.sampled_from([128, 256, 512, 1024]),
       tp=st.sampled_from([1, 2, 8]), pp=st.sampled_from([1, 2]), context=st.sampled_from([32 * K, 128 * K, 512 * K]),
       steps_of_context=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_hdp_never_slower_than_a_baseline_at_scale(family, ranks, tp, pp, context, steps_of_context, seed):
    """The same property on 128-1,024 ranks (LLaMA-7B, H100), where steps may exceed the size at which the
    baselines' plans are hdp's candidates (hdp.NEVER_SLOWER_MAX_SEQUENCES): hdp's own layouts must win there."""
    cm = cost_model("llama-7b", ranks, tp, pp, None)
    batch = global_batches(family, tokens_per_step=steps_of_context * context, max_context_tokens=context, steps=1,
                           seed=seed)[0]
    t = step_times(batch, cm)
    assert t["hdp"] <= min(t[b] for b in BASELINES) * (1 + 1e-9), t


def test_large_steps_far_from_their_bound_take_the_baselines_as_candidates(monkeypatch):
    """Above NEVER_SLOWER_MAX_SEQUENCES the baselines are planned only when hdp's own plan is over FAR_FROM_BOUND ×
    its lower bound (the loss found at 512 GPUs, pp 4, 2M: hdp 36.2 s at 1.64x, dcp 34.7 s; ~100 s to plan, so not
    run here): within it, they are never planned; past it (the factor lowered to 1), the fastest is kept."""
    from planner.strategies import dcp, hdp

    req = PlanRequest(gpus=64, tokens_per_step=8 * M, max_context_tokens=256 * K, lengths="github-like",
                      recompute="auto")
    cm = build_cost_model(req)
    batch = make_batches(req, cm)[0]
    assert len(batch.lengths_tokens) > hdp.NEVER_SLOWER_MAX_SEQUENCES
    planned = []
    real = dcp.plan_step
    monkeypatch.setattr(dcp, "plan_step", lambda *a: planned.append(1) or real(*a))
    own = STRATEGIES["hdp"](batch, cm, req.options)
    assert own.predicted.step_time_s <= hdp.FAR_FROM_BOUND * own.predicted.lower_bound_s and not planned
    monkeypatch.setattr(hdp, "FAR_FROM_BOUND", 1.0)
    best = STRATEGIES["hdp"](batch, cm, req.options)
    assert planned and best.predicted.step_time_s <= min(own.predicted.step_time_s,
                                                         real(batch, cm, req.options).predicted.step_time_s)
