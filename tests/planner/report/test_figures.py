"""Plan figures and traces a person reads: the Gantt tells forward from backward, the memory figure's
parts are named in words and sum to the reported peak, both are written as PNG and SVG, and Chrome traces
name every rank."""

import matplotlib
import pytest

matplotlib.use("Agg")

from planner.api import PlanRequest, build_cost_model, make_plan  # noqa: E402
from planner.report import MEMORY_PARTS, gantt_figure, memory_breakdown, memory_figure, plot_plan  # noqa: E402
from planner.runtime.trace import RankTrace, StepRecord, UnitRecord, build_trace  # noqa: E402
from planner.runtime.trace import chrome_trace as measured_chrome_trace  # noqa: E402
from planner.simulate import OpTiming, StepSimulation, simulate_step  # noqa: E402

K, M = 1024, 1024 * 1024


@pytest.fixture(scope="module", params=[1, 2], ids=["pp1", "pp2"])
def planned(request):
    """(plan, cost model) of the tiny model on 4 CPU ranks, without and with a pipeline."""
    req = PlanRequest(model="tiny", cluster="local-cpu", gpus=4, pp=request.param, lengths="wikipedia",
                      tokens_per_step=64 * K, max_context_tokens=8 * K)
    cm = build_cost_model(req)
    return make_plan(req, "hdp", cm), cm


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_gantt_legend_tells_forward_from_backward(planned):
    plan, cm = planned
    fig = gantt_figure(simulate_step(plan.steps[0], cm))
    texts = _legend_texts(fig)
    if cm.pp > 1:
        assert "forward" in texts and "backward" in texts
        hatches = {c.get_hatch() for c in fig.axes[0].collections}
        assert "////" in hatches and None in hatches  # backward hatched, forward plain
    else:
        assert "forward + backward" in texts  # pp = 1: a box is a whole unit
    assert "gradient sync + optimizer" in texts
    matplotlib.pyplot.close(fig)


def test_memory_parts_sum_to_the_reported_peak(planned):
    plan, cm = planned
    st = plan.steps[0]
    sim = simulate_step(st, cm)
    mem = memory_breakdown(st, sim, cm)
    assert list(mem.columns) == list(MEMORY_PARTS)
    assert (mem["fragmentation"] == cm.budget.frag_bytes).all() and cm.budget.frag_bytes > 0
    total = mem.sum(axis=1)
    if cm.pp == 1:  # per HDP rank
        assert list(total) == pytest.approx(st.predicted.peak_memory_bytes, rel=1e-9)
    else:  # per stage, its busiest rank: the largest is the step's peak
        assert total.max() == pytest.approx(max(st.predicted.peak_memory_bytes), rel=1e-9)
    # The peak includes the reserve C is derived with, so "fits" is simply peak <= HBM.
    assert max(sim.peak_memory_bytes) <= cm.budget.hbm_bytes


def test_memory_figure_legend_in_words_and_x_labels_thinned():
    import pandas as pd

    n = 32
    df = pd.DataFrame({p: [1e9 * (i + 1)] * n for i, p in enumerate(MEMORY_PARTS)},
                      index=pd.RangeIndex(n, name="hdp_rank"))
    fig = memory_figure(df, hbm_bytes=80e9)
    texts = _legend_texts(fig)
    assert "fragmentation reserve" in texts and "CUDA context + NCCL buffers" in texts
    assert not {"ctx", "frag"} & set(texts)
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert 2 <= len(shown) <= 17 and "0" in shown  # every k-th rank, labelled with its number
    matplotlib.pyplot.close(fig)


def _names(trace: dict, what: str) -> dict:
    return {(e["pid"], e.get("tid")): e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == what}


def _sort_indexed(trace: dict, what: str) -> set:
    return {(e["pid"], e.get("tid")) for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == what}


def test_simulated_trace_names_every_rank():
    # Hand-made: 2 stages × 2 HDP ranks × TP 2; HDP rank 1 of stage 1 is GPUs 1·(2·2) + 1·2 = 6 and 7.
    ops = [OpTiming(0, (0, 1), 0, "fwd", 0.0, 1.0), OpTiming(0, (0, 1), 1, "fwd", 1.0, 2.0),
           OpTiming(0, (0, 1), 1, "bwd", 2.0, 4.0), OpTiming(0, (0, 1), 0, "bwd", 4.0, 6.0)]
    sim = StepSimulation(0, 2, 7.0, 5.0, 1.0, [3.0, 3.0], [4.0, 4.0], [1e9, 1e9], {}, ops, [1e9, 1e9], tp=2)
    trace = sim.chrome_trace()
    threads = _names(trace, "thread_name")
    used = {(e["pid"], e["tid"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert used <= set(threads)  # every thread that carries an event is named
    assert threads[(1, 1)] == "HDP rank 1 (global ranks 6-7, TP 2)"
    assert threads[(0, 0)] == "HDP rank 0 (global ranks 0-1, TP 2)"
    assert _names(trace, "process_name") == {(0, None): "stage 0", (1, None): "stage 1"}
    assert _sort_indexed(trace, "thread_sort_index") == set(threads)
    assert _sort_indexed(trace, "process_sort_index") == {(0, None), (1, None)}


def test_planned_trace_names_each_hdp_rank(planned, tmp_path):
    import json

    plan, cm = planned
    sim = simulate_step(plan.steps[0], cm)
    trace = json.loads(sim.write_trace(tmp_path / "t.json").read_text())
    threads = _names(trace, "thread_name")
    assert len(threads) == cm.pp * cm.setup.hdp
    assert len(set(threads.values())) == len(threads)  # one distinct name per (stage, HDP rank)
    assert threads[(cm.pp - 1, 0)] == f"HDP rank 0 (global rank {(cm.pp - 1) * cm.setup.hdp})"


def test_measured_trace_names_each_rank():
    def unit(rank: int, stage: int) -> UnitRecord:
        return UnitRecord(step=0, plan_step=0, rank=rank, hdp_rank=0, unit=0, degree=1, tokens=8, start_s=0.0,
                          fwd_s=0.1, bwd_s=0.2, comm_wait_s=0.0, sent_bytes=0, saved_bytes=0, offloaded_bytes=0,
                          offload_ratio=0.0, peak_memory_bytes=0, predicted_time_s=0.3, stage=stage)

    ranks = [RankTrace(rank=r, clock_offset_s=0.0, units=[unit(r, r)],
                       steps=[StepRecord(step=0, plan_step=0, rank=r, hdp_rank=0, start_s=0.0, units_s=0.3,
                                         grad_sync_s=0.01, optimizer_s=0.01, wall_s=0.35, cpu_s=0.3, loss=1.0,
                                         step_loss=2.0)]) for r in (0, 1)]
    trace = measured_chrome_trace(build_trace({}, ranks, {0: 0.3}))
    assert _names(trace, "process_name") == {(0, None): "rank 0 (HDP rank 0, stage 0)",
                                             (1, None): "rank 1 (HDP rank 0, stage 1)"}
    threads = _names(trace, "thread_name")
    used = {(e["pid"], e["tid"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert used <= set(threads) and threads[(1, 1)] == "steps"


def nonempty(path) -> bool:
    return path.exists() and path.stat().st_size > 1000


@pytest.mark.parametrize("pp", [1, 2])
def test_plan_gantt_and_memory(tmp_path, pp):
    req = PlanRequest(model="llama-7b", gpus=16, pp=pp, tokens_per_step=M, max_context_tokens=128 * K, steps=1)
    cm = build_cost_model(req)
    plan = make_plan(req, "hdp", cm)
    figs = plot_plan(plan, cm, gantt=tmp_path / "g.png", memory=tmp_path / "m")
    assert [p.name for p in figs.gantt + figs.memory] == ["g.png", "g.svg", "m.png", "m.svg"]
    assert all(nonempty(p) for p in figs.gantt + figs.memory)
    mem = memory_breakdown(plan.steps[0], simulate_step(plan.steps[0], cm), cm)
    assert len(mem) == (cm.setup.hdp if pp == 1 else pp)
    # The parts, fragmentation reserve included, add up to the simulator's peak.
    total = mem.sum(axis=1)
    peak = figs.simulation.peak_memory_bytes
    if pp == 1:
        assert list(total) == pytest.approx(peak, rel=1e-9)
    else:
        assert total.max() == pytest.approx(max(peak), rel=1e-9)

