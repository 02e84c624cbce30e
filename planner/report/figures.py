"""Plots and reports of what-if sweeps and plans (matplotlib Agg; every figure as PNG and SVG).

- throughput vs max context per strategy, and the speedup heat map over GPUs × context (sweeps);
- a per-rank timeline (Gantt) of one simulated plan step, units coloured by their degree;
- the memory breakdown per HDP rank (pp = 1) or per pipeline stage (pp > 1): model states,
  activations, logits, CUDA context / NCCL buffers and fragmentation, against the HBM;
- a self-contained sweep report: report.md with the figures beside it, and report.html with the
  same content and the PNGs embedded;
- the ByteScale reproduction section of docs/REPRODUCTION.md, regenerated in place between markers.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

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
from planner.api import make_plan  # noqa: E402
from planner.plan import Plan, Step  # noqa: E402
from planner.simulate import StepSimulation, simulate_step, static_memory_parts  # noqa: E402
from planner.workload import format_tokens  # noqa: E402
from planner.studies import (BYTESCALE_CLAIMS, BYTESCALE_LAYOUT_NOTE, BYTESCALE_PANELS, MFU_CONVENTION,  # noqa: E402
                            ByteScaleGrid, Config, batches_of, cost_model_of, default_bytescale_table, options_for,
                            per_doubling_slowdown, run_sweep)
from profiles.table import atomic_write_text  # noqa: E402

GB = 1e9
STRATEGY_COLORS = {"static": "#7f7f7f", "dcp": "#1f77b4", "hdp-naive": "#ff7f0e", "hdp": "#2ca02c"}


# ---- figure files ---------------------------------------------------------------------------------
def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """stem.png and stem.svg, each written to a temp file and renamed; the figure is closed."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for ext in ("png", "svg"):
            path = stem.with_name(f"{stem.name}.{ext}")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{ext}", dir=path.parent)
            os.close(fd)
            try:
                fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight")
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def _feasible(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["feasible"].astype(bool)]


def _layout(r) -> str:
    return f"{r['cluster']} {int(r['gpus'])} GPUs tp{int(r['tp'])} pp{int(r['pp'])}"


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
    keys = ["model", "cluster", "tp", "pp", "lengths"]
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
        model, cluster, tp, pp, lengths = key
        ax.set_title(f"{model} tp{tp} pp{pp}, {lengths}", fontsize=9)
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
    box is a unit's forward and backward), then the gradient sync in grey. Only the first `max_ranks`
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
    t_sync = sim.step_time_s - sim.grad_sync_s
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
    handles.append(matplotlib.patches.Patch(facecolor=sync_color, label="gradient sync"))
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
    ax.set_title((title + "\n" if title else "") + f"step {sim.step}: {sim.step_time_s:.2f} s, gradient sync "
                 f"{sim.grad_sync_s:.2f} s{more}", fontsize=10, pad=22)
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
    g = plot_gantt(sim, _stem(gantt), title=title, max_ranks=max_ranks) if gantt else []
    m = plot_memory(memory_breakdown(st, sim, cm), _stem(memory), hbm_bytes=cm.budget.hbm_bytes,
                    title=title) if memory else []
    return PlanFigures(g, m, sim)


def _stem(path: Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".png", ".svg") else path


# ---- documents ----------------------------------------------------------------------------------------
def md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in r.tolist()) + " |")
    return "\n".join(lines)


class Document:
    """Blocks rendered twice: markdown with figures as relative links, and HTML with them embedded."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def figure(self, png: Path, caption: str) -> None:
        self.blocks.append(("img", Path(png), caption))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].relative_to(self.root).as_posix()})")
            else:
                out.append(md_table(b[1]))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode()
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
            else:
                body.append(b[1].to_html(index=False, border=0, na_rep="-"))
        style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
                 "font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}img{max-width:100%}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """The sweep table as people read it: sizes with suffixes, rates rounded."""
    d = pd.DataFrame({
        "model": df["model"], "GPUs": df["gpus"].astype(int), "tp": df["tp"].astype(int), "pp": df["pp"].astype(int),
        "context": [format_tokens(int(c)) for c in df["context_tokens"]], "lengths": df["lengths"],
        "strategy": df["strategy"],
        "tokens/s": [f"{v:,.0f}" if np.isfinite(v) else "-" for v in df["tokens_per_s"].astype(float)],
        "MFU": [f"{v:.1%}" if np.isfinite(v) else "-" for v in df["mfu"].astype(float)],
        "step (s)": [f"{v:.2f}" if np.isfinite(v) else "-" for v in df["step_time_s"].astype(float)],
        "speedup": [f"{v:.2f}x" if np.isfinite(v) else "-" for v in df["speedup_vs_static"].astype(float)],
        "peak GB": [f"{v / GB:.1f}" if np.isfinite(v) else "-" for v in df["peak_memory_bytes"].astype(float)],
        "feasible": ["no" if not f else "over HBM" if h is False else "yes"
                     for f, h in zip(df["feasible"], df["fits_hbm"].astype(object))],
    })
    return d


def write_sweep_report(df: pd.DataFrame, out_dir: Path, *, title: str = "meshplan what-if sweep",
                       example: bool = True) -> Path:
    """report.md (+ figures/ beside it) and report.html (figures embedded) for a sweep table.
    example: re-plan one step of the point with the best speedup and draw its Gantt and memory next
    to static's (a few seconds more). Returns the markdown path."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    doc = Document(out_dir)
    df = df.copy()
    df["feasible"] = df["feasible"].astype(bool)
    doc.heading(title, 1)
    doc.para(f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {len(df)} points "
             f"({int(df['feasible'].sum())} feasible). Models: {', '.join(map(str, df['model'].unique()))}; clusters: "
             f"{', '.join(map(str, df['cluster'].unique()))}; length sources: "
             f"{', '.join(map(str, df['lengths'].unique()))}; tokens per step: "
             f"{', '.join(format_tokens(int(t)) for t in df['tokens_per_step'].unique())}; steps per point: "
             f"{', '.join(str(int(s)) for s in df['steps'].unique())}; profiles: "
             f"{', '.join(str(p) for p in df['profile'].dropna().unique()) or '-'}.")
    doc.para(f"Predicted by the meshplan cost model and simulator (not measured). {MFU_CONVENTION}. Speedups are "
             "step-time ratios against a static DP x CP mesh of the same config"
             + (" sized for the max context." if (df["static_mesh"] == "context").all() else "."))
    doc.heading("Throughput vs context")
    doc.figure(plot_throughput_vs_context(df, fig_dir / "throughput_vs_context")[0], "tokens/s vs max context")
    for s in [s for s in df["strategy"].unique() if s != "static"]:
        doc.heading(f"Speedup of {s} over static")
        doc.figure(plot_speedup_heatmap(df, fig_dir / f"speedup_{s}", s)[0], f"{s} speedup over GPUs x context")
    ok = df[df["feasible"]]
    if len(ok):
        doc.heading("Best strategy per case")
        best = ok.loc[ok.groupby(["model", "cluster", "gpus", "tp", "pp", "context_tokens", "lengths"],
                                 sort=False)["tokens_per_s"].idxmax()]
        doc.table(_display(best))
    bad = df[~df["feasible"] | (df["fits_hbm"].astype(object) == False)]  # noqa: E712  (NA is neither)
    if len(bad):
        doc.heading("Infeasible points and plans over HBM")
        t = _display(bad)[["model", "GPUs", "tp", "pp", "context", "lengths", "strategy"]].copy()
        t["reason"] = bad["reason"].fillna("").to_numpy()
        doc.table(t)
    if example and len(ok[ok["strategy"] != "static"]):
        _example_plans(doc, ok, fig_dir)
    doc.heading("All points")
    doc.table(_display(df))
    md = out_dir / "report.md"
    atomic_write_text(md, doc.markdown())
    atomic_write_text(out_dir / "report.html", doc.html(title))
    return md


def _example_plans(doc: Document, ok: pd.DataFrame, fig_dir: Path) -> None:
    """Gantt and memory of the best-speedup point and of static on the same config (one step)."""
    cand = ok[(ok["strategy"] != "static") & ok["speedup_vs_static"].notna()]
    if not len(cand):
        return
    r = cand.loc[cand["speedup_vs_static"].astype(float).idxmax()]
    cfg = Config(str(r["model"]), str(r["cluster"]), int(r["gpus"]), int(r["tp"]), int(r["pp"]),
                 int(r["context_tokens"]), str(r["lengths"]), int(r["tokens_per_step"]), 1, int(r["seed"]),
                 str(r["recompute"]), bool(r["offload"]), str(r["static_mesh"]))
    doc.heading(f"Example step: {cfg.model}, {cfg.gpus} GPUs, {format_tokens(cfg.context_tokens)}, {cfg.lengths}")
    doc.para("The point with the largest speedup, re-planned for one step; each unit is a box on the ranks that "
             "run it, coloured by how many ranks share it.")
    cm = cost_model_of(cfg)
    for strategy in ("static", str(r["strategy"])):
        plan = make_plan(cfg.request(options_for(cfg, strategy, cm)), strategy, cm, batches_of(cfg))
        figs = plot_plan(plan, cm, gantt=fig_dir / f"gantt_{strategy}", memory=fig_dir / f"memory_{strategy}",
                         max_ranks=128)
        doc.figure(figs.gantt[0], f"{strategy}: per-rank timeline")
        doc.figure(figs.memory[0], f"{strategy}: memory breakdown")


# ---- docs/REPRODUCTION.md ------------------------------------------------------------------------------
def replace_section(doc_path: Path, name: str, body: str) -> None:
    """Put `body` between <!-- name:begin --> and <!-- name:end --> in doc_path (appended with its
    markers when absent), leaving the rest of the file, which others edit, as it is."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc_path = Path(doc_path)
    text = doc_path.read_text() if doc_path.exists() else "# Reproduction\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    atomic_write_text(doc_path, text)


def _range(values) -> str:
    v = [x for x in values if np.isfinite(x)]
    if not v:
        return "n/a"
    return f"{min(v):.2f}x" if len(v) == 1 or min(v) == max(v) else f"{min(v):.2f}-{max(v):.2f}x"


def _claim(rows: pd.DataFrame, agg: str) -> str:
    """Our figure for a claim from plans that fit HBM; over-HBM plans (†) shown apart when they differ."""
    fits = rows[rows["fits_hbm"].fillna(False).astype(bool)]["speedup_vs_static"]
    show = (lambda x: _range([x.max()])) if agg == "max" else _range
    text = show(fits) if len(fits) else "n/a"
    every = show(rows["speedup_vs_static"])
    return text + (f" ({every} with over-HBM plans †)" if every != text else "")


def _speedup_cell(r: pd.Series | None) -> str:
    if r is None:
        return "-"
    if not r["feasible"] or not np.isfinite(r["speedup_vs_static"]):
        return "infeasible"
    return f"{r['speedup_vs_static']:.2f}x" + ("" if r["fits_hbm"] else "†")


def bytescale_markdown(df: pd.DataFrame, tuning: pd.DataFrame, layouts: dict[str, tuple[int, int]], *,
                       command: str, run_note: str, gpu_scale: float) -> str:
    """The ByteScale section: headline claims next to ours, the speedup grid, throughput, per-doubling
    slowdowns, and the layout choice behind them."""
    P = BYTESCALE_CLAIMS
    df = df.copy()
    df["feasible"] = df["feasible"].astype(bool)
    hdp = df[(df["strategy"] == "hdp") & df["feasible"]]
    ctx_max = int(df["context_tokens"].max())
    big = format_tokens(ctx_max)
    pp_models = {p.model for p in BYTESCALE_PANELS if p.balance == "PP-Balance"}
    gh = hdp[hdp["lengths"] == "github-like"]
    gh2m = gh[gh["context_tokens"] == ctx_max]
    slow = per_doubling_slowdown(df)
    geo = {s: float(np.exp(np.log(g["per_doubling"]).mean())) if len(g) else float("nan")
           for s, g in slow.groupby("strategy")}
    tps = sorted(df["tokens_per_step"].unique())
    lines = [
        "## ByteScale",
        "",
        f"Regenerate with `{command}` ({run_note}; finished points are kept in a journal, so an interrupted run "
        "resumes). Figures are meshplan predictions (cost model + simulator on the "
        f"{', '.join(map(str, df['profile'].dropna().unique()))} profile), not measurements. "
        f"Tokens per step: {', '.join(format_tokens(int(t)) for t in tps)}; "
        f"{int(df['steps'].iloc[0])} sampled step(s) per point; "
        + ("the paper's GPU counts." if gpu_scale == 1 else f"GPU counts scaled by {gpu_scale:g} from the paper's."),
        "",
        f"Setup: {BYTESCALE_LAYOUT_NOTE} The baseline is meshplan's `static` strategy (one DP x CP mesh, CP the "
        "smallest divisor of the HDP ranks that holds the max context, rows packed to C·CP tokens, equal "
        "micro-batch counts); `hdp-naive` is ByteScale Alg. 1 and `hdp` its balance scheduler (Alg. 2: DP-Balance "
        "without PP, PP-Balance with PP), both as meshplan implements them. With PP, static, dcp and hdp-naive run "
        "1F1B; hdp slices long sequences (sliced 1F1B with redistribution where it helps, SlimPipe). Length sources are meshplan's synthetic `github-like` and `byted-like` families fitted to "
        "ByteScale §3.1 (REFERENCE §9), not the paper's data. † marks plans whose simulated peak memory exceeds "
        "the 80 GB HBM although they validated; headline figures use the plans that fit.",
        "",
        "### Headline claims (ByteScale §8.2, REFERENCE §10)",
        "",
        "| claim | paper | meshplan |",
        "|---|---|---|",
        f"| max speedup of balanced HDP over static, GitHub | {P['max_github']:.2f}x | {_claim(gh, 'max')} |",
        f"| DP-Balance models (LLaMA-7B/13B/30B), GitHub, {big} | "
        f"{P['dp_balance_github_2m'][0]:.2f}-{P['dp_balance_github_2m'][1]:.2f}x | "
        f"{_claim(gh2m[~gh2m['model'].isin(pp_models)], 'range')} |",
        f"| max speedup, Byted | {P['max_byted']:.2f}x | {_claim(hdp[hdp['lengths'] == 'byted-like'], 'max')} |",
        f"| PP-Balance models (LLaMA-70B, Mistral-8x7B/8x22B), GitHub, {big} | "
        f"{P['pp_balance_github_2m'][0]:.2f}-{P['pp_balance_github_2m'][1]:.2f}x | "
        f"{_claim(gh2m[gh2m['model'].isin(pp_models)], 'range')} |",
    ]
    for s, label in (("static", "baseline"), ("hdp-naive", "naive HDP"), ("hdp", "balanced HDP")):
        lines.append(f"| slowdown per context doubling, {label} (geometric mean over models and datasets) | "
                     f"{P['per_doubling'][s]:.2f}x | {geo.get(s, float('nan')):.2f}x |")
    ctxs = sorted(df["context_tokens"].unique())
    lines += ["", "### Speedup over static: balanced HDP (naive HDP)", "",
              "| model | GPUs | tp/pp | lengths | " + " | ".join(format_tokens(int(c)) for c in ctxs) + " |",
              "|---|---|---|---|" + "---|" * len(ctxs)]
    for (m, g, tp, pp, ln), grp in df.groupby(["model", "gpus", "tp", "pp", "lengths"], sort=False):
        def row(strategy: str, c: int) -> pd.Series | None:
            r = grp[(grp["context_tokens"] == c) & (grp["strategy"] == strategy)]
            return r.iloc[0] if len(r) else None

        cells = [f"{_speedup_cell(row('hdp', c))} ({_speedup_cell(row('hdp-naive', c))})" for c in ctxs]
        lines.append(f"| {m} | {int(g)} | {int(tp)}/{int(pp)} | {ln} | " + " | ".join(cells) + " |")
    lines += ["", "### Predicted tokens/s of static and balanced HDP (HDP's MFU, causal halved)", "",
              "| model | lengths | " + " | ".join(format_tokens(int(c)) for c in ctxs) + " |",
              "|---|---|" + "---|" * len(ctxs)]
    ok = df[df["feasible"]]
    for (m, ln), grp in ok.groupby(["model", "lengths"], sort=False):
        cells = []
        for c in ctxs:
            st = grp[(grp["context_tokens"] == c) & (grp["strategy"] == "static")]
            hd = grp[(grp["context_tokens"] == c) & (grp["strategy"] == "hdp")]
            cells.append((f"{st['tokens_per_s'].iloc[0]:,.0f}" if len(st) else "-") + " / " +
                         (f"{hd['tokens_per_s'].iloc[0]:,.0f} ({hd['mfu'].iloc[0]:.0%})" if len(hd) else "-"))
        lines.append(f"| {m} | {ln} | " + " | ".join(cells) + " |")
    if len(slow):
        lines += ["", f"### Slowdown per context doubling ({format_tokens(int(ctxs[0]))} to {big}, geometric mean)",
                  ""]
        piv = slow.pivot_table(index=["model", "lengths"], columns="strategy", values="per_doubling", sort=False)
        cols = [s for s in BYTESCALE_CLAIMS["per_doubling"] if s in piv.columns]
        lines.append("| model | lengths | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for (m, ln), r in piv.iterrows():
            lines.append(f"| {m} | {ln} | " + " | ".join(f"{r[s]:.2f}x" for s in cols) + " |")
        lines.append("| paper (§8.2) | | " + " | ".join(f"{P['per_doubling'][s]:.2f}x" for s in cols) + " |")
    lines += ["", f"### Layout choice (static, {big}, github-like)", "",
              "| model | paper GPUs | our GPUs | chosen tp/pp | static tokens/s per candidate tp/pp |",
              "|---|---|---|---|---|"]
    for p in (p for p in BYTESCALE_PANELS if p.model in layouts):
        t = tuning[tuning["model"] == p.model]
        cands = "; ".join(f"{int(r['tp'])}/{int(r['pp'])}: "
                          + (f"{r['tokens_per_s']:,.0f}" if r["feasible"] else "infeasible")
                          for _, r in t.iterrows())
        used = df[df["model"] == p.model]["gpus"]
        lay = layouts.get(p.model, ("-", "-"))
        lines.append(f"| {p.model} | {p.paper_gpus:,} | {f'{int(used.iloc[0]):,}' if len(used) else '-'} | "
                     f"{lay[0]}/{lay[1]} | {cands} |")
    longest = {ln: _longest_sampled(df[df["lengths"] == ln]) for ln in df["lengths"].unique()}
    lines += ["", "Longest sampled sequence at the largest context: " + ", ".join(
        f"{ln} {format_tokens(v) if 'K' in format_tokens(v) or 'M' in format_tokens(v) else f'{v:,}'} tokens"
        for ln, v in longest.items()) + " (where it is below the context, the larger "
        "contexts see the same batches and only the static mesh, sized for the context, changes)."]
    bad = df[~df["feasible"]]
    if len(bad):
        lines += ["", "Infeasible points: " + "; ".join(
            f"{r['model']} {format_tokens(int(r['context_tokens']))} {r['lengths']} {r['strategy']}: {r['reason']}"
            for _, r in bad.iterrows())]
    lines += ["", f"MFU convention: {MFU_CONVENTION}.",
              f"Generated {datetime.now(timezone.utc).date().isoformat()}."]
    return "\n".join(lines)


def _longest_sampled(rows: pd.DataFrame) -> int:
    """Longest sequence of the sampled steps of the largest context in these sweep rows."""
    r = rows.loc[rows["context_tokens"].idxmax()]
    cfg = Config(str(r["model"]), str(r["cluster"]), int(r["gpus"]), int(r["tp"]), int(r["pp"]),
                 int(r["context_tokens"]), str(r["lengths"]), int(r["tokens_per_step"]), int(r["steps"]),
                 int(r["seed"]))
    return max(int(b.lengths_tokens.max()) for b in batches_of(cfg))


def machine_description() -> str:
    """CPU model and core count of this machine, for benchmark records."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()}-core {model}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


@dataclass
class Reproduction:
    table: pd.DataFrame  # the grid's sweep table
    tuning: pd.DataFrame  # static at the largest context for every candidate layout
    layouts: dict[str, tuple[int, int]]  # chosen (tp, pp) per model
    paths: tuple[Path, ...]  # the sweep table (CSV, Parquet)
    elapsed_s: float
    computed: int  # points planned in this run (the rest came from the journal)


def reproduce_bytescale(doc_path: Path, grid: ByteScaleGrid = ByteScaleGrid(), *, table: Path | None = None,
                        workers: int = 1, on_point=None, command: str = "meshplan whatif reproduce") -> Reproduction:
    """Choose each model's layout (static baseline at its fastest), plan the ByteScale grid and rewrite the
    ByteScale section of doc_path. Both sweeps share one journal, so a rerun plans nothing twice."""
    import time

    out = table or default_bytescale_table()
    t0 = time.perf_counter()
    tune = run_sweep(grid.tuning_points(), out, workers=workers, on_point=on_point)
    layouts = grid.choose_layouts(tune.table)
    points = grid.points(layouts)
    res = run_sweep(points, out, workers=workers, on_point=on_point)
    elapsed = time.perf_counter() - t0
    computed = tune.computed + res.computed
    total = len(set(p.key for p in grid.tuning_points()) | set(p.key for p in points))
    planning_min = (res.table["planning_s"].sum() + tune.table["planning_s"].sum()) / 60
    note = (f"this run planned {computed} of {total} points in {elapsed / 60:.1f} min with {workers} worker(s) on a "
            f"{machine_description()}; the strategies' planning time summed over all points is "
            f"{planning_min:.1f} min")
    replace_section(doc_path, "bytescale", bytescale_markdown(res.table, tune.table, layouts, command=command,
                                                              run_note=note, gpu_scale=grid.gpu_scale))
    return Reproduction(res.table, tune.table, layouts, res.paths, elapsed, computed)
