"""Figures of what-if sweeps, plans and length sources (matplotlib Agg; plan and sweep figures as PNG and SVG).

- throughput vs max context per strategy, and the speedup heat map over GPUs × context (sweeps);
- a per-rank timeline (Gantt) of one simulated plan step, units coloured by their degree;
- the memory breakdown per HDP rank (pp = 1) or per pipeline stage (pp > 1): model states,
  activations, logits, CUDA context / NCCL buffers and fragmentation, against the HBM;
- the per-bucket shares of a length source (samples, tokens, attention FLOPs), as one PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from costmodel.timing import CostModel  # noqa: E402
from planner.plan import Plan, Step  # noqa: E402
from planner.simulate import StepSimulation, simulate_step, static_memory_parts  # noqa: E402
from planner.studies.journal import variant_label  # noqa: E402
from planner.workload import SourceError, format_tokens  # noqa: E402
from profiles.table import atomic_write  # noqa: E402

GB = 1e9
STRATEGY_COLORS = {"static": "#7f7f7f", "dcp": "#1f77b4", "hdp-naive": "#ff7f0e", "hdp": "#2ca02c"}


# ---- figure files ---------------------------------------------------------------------------------
def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """stem.png and stem.svg, each written atomically, or neither (a failure removes the one written before it);
    the figure is closed."""
    stem = Path(stem)
    paths = []
    try:
        for ext in ("png", "svg"):
            path = stem.with_name(f"{stem.name}.{ext}")
            atomic_write(path, lambda tmp: fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight"))
            paths.append(path)
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return paths


def _feasible(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["feasible"].astype(bool)]


def _layout(r) -> str:
    variant = variant_label(r["zero_stage"], r["attention_kernel"], r["training"])
    layout = f"{r['cluster']} {int(r['gpus'])} GPUs tp{int(r['tp'])} pp{int(r['pp'])}"
    return f"{layout}, {variant}" if variant else layout


def _facets(n: int, width_in: float = 5.0, height_in: float = 3.6) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width_in * cols, height_in * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# ---- sweep plots ----------------------------------------------------------------------------------
def plot_throughput_vs_context(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Tokens/s against the max context, one panel per (model, lengths), one line per strategy and
    layout; infeasible points are left out (their line breaks)."""
    ok = _feasible(df)
    groups = list(ok.groupby(["model", "lengths"], sort=False)) or [(("no feasible point", ""), ok)]
    fig, axes = _facets(len(groups))
    for ax, ((model, lengths), g) in zip(axes, groups):
        layouts = list(dict.fromkeys(_layout(r) for _, r in g.iterrows()))
        markers = "osD^v<>p*hX"
        for (strategy, lay), line in g.groupby([g["strategy"], g.apply(_layout, axis=1)], sort=False):
            line = line.sort_values("context_tokens")
            ax.plot(line["context_tokens"], line["tokens_per_s"], marker=markers[layouts.index(lay) % len(markers)],
                    color=STRATEGY_COLORS.get(strategy), label=f"{strategy}, {lay}" if len(layouts) > 1 else strategy)
        ax.set_xscale("log", base=2)
        ticks = sorted(g["context_tokens"].unique())
        ax.set_xticks(ticks, [format_tokens(int(t)) for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_yscale("log")
        ax.set_xlabel("max context (tokens)")
        ax.set_ylabel("tokens/s (predicted)")
        ax.set_title(f"{model}, {lengths}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Throughput vs context per strategy", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, stem)


def plot_speedup_heatmap(df: pd.DataFrame, stem: Path, strategy: str = "hdp") -> list[Path]:
    """Speedup of `strategy` over static on a GPUs × context grid, one panel per (model, cluster, tp,
    pp, lengths); n/a cells are infeasible or missing points, † marks plans over the HBM."""
    sub = df[df["strategy"] == strategy].copy()
    sub["over"] = sub["fits_hbm"].astype(object).map(lambda v: v is False or v is np.False_)
    keys = ["model", "cluster", "tp", "pp", "lengths", "zero_stage", "attention_kernel", "training"]
    groups = list(sub.groupby(keys, sort=False)) or [(("no point",) * len(keys), sub)]
    fig, axes = _facets(len(groups), 4.8, 3.8)
    for ax, (key, g) in zip(axes, groups):
        grid = g.pivot_table(index="gpus", columns="context_tokens", values="speedup_vs_static", aggfunc="first")
        grid = grid.sort_index().reindex(sorted(grid.columns), axis=1)
        over = g.pivot_table(index="gpus", columns="context_tokens", values="over", aggfunc="first")
        over = over.reindex(index=grid.index, columns=grid.columns).fillna(False).to_numpy(dtype=bool)
        vals = grid.to_numpy(dtype=float)
        finite = vals[np.isfinite(vals)]
        vmax = max(2.0, float(finite.max())) if finite.size else 2.0
        im = ax.imshow(np.ma.masked_invalid(vals), cmap="RdYlGn", origin="lower", aspect="auto",
                       norm=LogNorm(vmin=1 / vmax, vmax=vmax))
        for (i, j), v in np.ndenumerate(vals):
            text = f"{v:.2f}x" + ("†" if over[i, j] else "") if np.isfinite(v) else "n/a"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(grid.columns)), [format_tokens(int(c)) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [str(int(i)) for i in grid.index])
        ax.set_xlabel("max context (tokens)")
        ax.set_ylabel("GPUs")
        model, cluster, tp, pp, lengths, zero, kernel, training = key
        variant = variant_label(zero, kernel, training) if model != "no point" else ""
        ax.set_title(f"{model} tp{tp} pp{pp}, {lengths}" + (f", {variant}" if variant else ""), fontsize=9)
        bar = fig.colorbar(im, ax=ax, label=f"{strategy} speedup vs static")
        bar.set_ticks([t for t in 2.0 ** np.arange(-6, 7) if 1 / vmax <= t <= vmax])
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(f"Speedup of {strategy} over a static DP x CP mesh († predicted peak memory over the HBM)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, stem)


# ---- plan plots -----------------------------------------------------------------------------------
GANTT_PASSES = {"unit": ("forward + backward", None), "fwd": ("forward", None), "bwd": ("backward", "////")}


def gantt_figure(sim: StepSimulation, *, title: str = "", max_ranks: int = 256) -> plt.Figure:
    """Per-rank timeline of one simulated step: a row per HDP rank (per stage and rank with PP), units
    coloured by their degree (ranks sharing them, log scale), backward ops hatched (pp > 1; with pp = 1 a
    box is a unit's forward and backward), then the gradient sync and optimizer step in grey. Only the first `max_ranks`
    HDP ranks are drawn."""
    shown = min(sim.hdp, max_ranks)
    stages = sorted({op.stage for op in sim.ops}) or [0]
    n_rows = shown * len(stages)
    max_deg = max((len(op.ranks) for op in sim.ops), default=1)
    norm = LogNorm(vmin=1, vmax=max(2, max_deg))
    cmap = plt.get_cmap("viridis")
    h = 0.8

    def box(t0: float, t1: float, y: int) -> list[tuple[float, float]]:
        return [(t0, y - h / 2), (t1, y - h / 2), (t1, y + h / 2), (t0, y + h / 2)]

    boxes: dict[str, tuple[list, list]] = {}  # pass -> (boxes, colours): one collection each, its own hatch
    for op in sim.ops:
        verts, colors = boxes.setdefault(op.kind.split()[0], ([], []))
        c = cmap(norm(len(op.ranks)))
        for r in op.ranks:
            if r < shown:
                verts.append(box(op.start_s, op.end_s, stages.index(op.stage) * shown + r))
                colors.append(c)
    t_sync = sim.step_time_s - sim.step_end_s
    sync_color = (0.6, 0.6, 0.6, 1.0)
    fig, ax = plt.subplots(figsize=(11, min(12.0, 2.0 + 0.12 * n_rows)))
    # Thin white edges separate back-to-back units; past ~20K boxes they would hide the colours.
    many = sum(len(v) for v, _ in boxes.values()) + n_rows >= 20000
    edges = dict(edgecolors="none") if many else dict(edgecolors="white", linewidths=0.3)
    handles = []
    for kind, (verts, colors) in boxes.items():
        label, hatch = GANTT_PASSES[kind]
        ax.add_collection(PolyCollection(verts, facecolors=colors, hatch=hatch, **edges))
        handles.append(matplotlib.patches.Patch(facecolor="#bbbbbb", edgecolor="white", hatch=hatch, label=label))
    ax.add_collection(PolyCollection([box(t_sync, sim.step_time_s, y) for y in range(n_rows)],
                                     facecolors=[sync_color], **edges))
    handles.append(matplotlib.patches.Patch(facecolor=sync_color, label="gradient sync + optimizer"))
    ax.legend(handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(handles),
              frameon=False)
    ax.set_xlim(0, sim.step_time_s * 1.01 if sim.step_time_s > 0 else 1)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("HDP rank" if len(stages) == 1 else "stage x HDP rank")
    if len(stages) > 1:
        for i in range(1, len(stages)):
            ax.axhline(i * shown - 0.5, color="black", lw=0.6)
        ax.set_yticks([i * shown + shown / 2 - 0.5 for i in range(len(stages))], [f"stage {s}" for s in stages])
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, label="unit degree (ranks)")
    ticks = [2**k for k in range(0, int(np.log2(max(2, max_deg))) + 1)]
    cb.set_ticks(ticks, labels=[str(t) for t in ticks])
    cb.ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    more = f" (first {shown} of {sim.hdp} HDP ranks)" if shown < sim.hdp else ""
    ax.set_title((title + "\n" if title else "") + f"step {sim.step}: {sim.step_time_s:.2f} s, gradient sync + "
                 f"optimizer {sim.step_end_s:.2f} s{more}", fontsize=10, pad=22)
    return fig


def plot_gantt(sim: StepSimulation, stem: Path, *, title: str = "", max_ranks: int = 256) -> list[Path]:
    return save_figure(gantt_figure(sim, title=title, max_ranks=max_ranks), stem)


# memory_breakdown() columns, bottom to top, with the words the figure's legend uses
MEMORY_PARTS = {"states": "model states (weights, gradients, optimizer)", "activations": "activations (peak resident)",
                "logits": "logits (loss-head peak)", "context": "CUDA context + NCCL buffers",
                "fragmentation": "fragmentation reserve"}


def memory_breakdown(step: Step, sim: StepSimulation, cm: CostModel) -> pd.DataFrame:
    """Peak bytes per HDP rank (pp = 1) or per pipeline stage, max over its ranks (pp > 1), split into
    MEMORY_PARTS: the rank's fixed parts (`planner.simulate.static_memory_parts`) and its activation
    peak (after offload). Each row sums to the simulator's peak memory of that rank (pp > 1: the stage's
    busiest rank), the figure the plan and the tables report."""
    if cm.pp == 1:
        index = pd.RangeIndex(sim.hdp, name="hdp_rank")
        fixed = [static_memory_parts(cm)] * sim.hdp
        act = np.asarray(sim.peak_memory_bytes) - sum(fixed[0].values())
    else:
        index = pd.RangeIndex(cm.pp, name="stage")
        fixed = [static_memory_parts(cm, s) for s in range(cm.pp)]
        act = np.asarray(sim.stage_activation_peak_bytes)  # slices, chunks and dK/dV included
    df = pd.DataFrame(fixed, index=index)
    df["activations"] = act
    return df[list(MEMORY_PARTS)]


def memory_figure(breakdown: pd.DataFrame, *, hbm_bytes: float, title: str = "") -> plt.Figure:
    """Stacked bars of memory_breakdown(), with the HBM capacity as a line; at most ~16 x labels."""
    colors = {"states": "#4c72b0", "activations": "#55a868", "logits": "#c44e52", "context": "#8172b2",
              "fragmentation": "#cccccc"}
    n = len(breakdown)
    fig, ax = plt.subplots(figsize=(min(14.0, 5.0 + 0.08 * n), 4.2))
    x = np.arange(n)
    bottom = np.zeros(n)
    for part, label in MEMORY_PARTS.items():
        v = breakdown[part].to_numpy(dtype=float) / GB
        ax.bar(x, v, bottom=bottom, width=0.9 if n < 64 else 1.0, color=colors[part], label=label,
               hatch="//" if part == "fragmentation" else None, linewidth=0)
        bottom += v
    ax.axhline(hbm_bytes / GB, color="black", ls="--", lw=1, label=f"HBM {hbm_bytes / GB:.3g} GB")
    what = breakdown.index.name.replace("hdp_rank", "HDP rank")
    busiest = "its busiest HDP rank; " if what == "stage" else ""
    ax.set_xlabel(what)
    ax.set_ylabel("GB")
    # x is the rank (stage) number itself: integer ticks, thinned so labels never collide
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=min(n, 16), integer=True))
    ax.set_xlim(-0.5, n - 0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title((title + "\n" if title else "") + f"peak memory per {what} ({busiest}bars sum to the reported peak)",
                 fontsize=10)
    return fig


def plot_memory(breakdown: pd.DataFrame, stem: Path, *, hbm_bytes: float, title: str = "") -> list[Path]:
    return save_figure(memory_figure(breakdown, hbm_bytes=hbm_bytes, title=title), stem)


@dataclass
class PlanFigures:
    gantt: list[Path]
    memory: list[Path]
    simulation: StepSimulation


def plot_plan(plan: Plan, cm: CostModel, *, step: int = 0, gantt: Path | None = None, memory: Path | None = None,
              max_ranks: int = 256) -> PlanFigures:
    """Gantt and/or memory figure of one plan step (stems or .png/.svg paths; both formats are written)."""
    st = plan.steps[step]
    sim = simulate_step(st, cm)
    s = cm.setup
    title = (f"{plan.meta.get('strategy', '?')}: {s.model.name} on {s.cluster.world_size} x {s.cluster.gpu}, "
             f"tp{cm.tp} pp{cm.pp} hdp{s.hdp}")
    g = plot_gantt(sim, figure_stem(gantt), title=title, max_ranks=max_ranks) if gantt else []
    m = plot_memory(memory_breakdown(st, sim, cm), figure_stem(memory), hbm_bytes=cm.budget.hbm_bytes,
                    title=title) if memory else []
    return PlanFigures(g, m, sim)


def figure_stem(path: Path) -> Path:
    """PATH without a .png / .svg suffix: save_figure writes both."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".png", ".svg") else path


# ---- length sources -------------------------------------------------------------------------------
def plot_description(description: dict[str, Any], path: str | Path, *, title: str) -> None:
    """Write a PNG with three bar charts per bucket: share of samples, of tokens, of attention FLOPs."""
    buckets = description["buckets"]
    labels = [format_tokens(b["hi"]) for b in buckets]
    x = np.arange(len(buckets))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.45 * len(buckets) + 2), 8), sharex=True)
    for ax, key, label in zip(axes, ("samples_share", "tokens_share", "attn_flops_share"),
                              ("samples", "tokens", "attention FLOPs (∝ s²)")):
        ax.bar(x, [100 * b[key] for b in buckets], color="tab:blue")
        ax.set_ylabel(f"% of {label}")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(x, labels, rotation=60)
    axes[-1].set_xlabel("bucket upper bound (tokens; bucket = (hi/2, hi])")
    fig.suptitle(f"{title}: {description['count']:,} sequences, {description['tokens']:,} tokens")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise SourceError(f"{path}: cannot write the plot: {e.strerror or e}") from None
    finally:
        plt.close(fig)
