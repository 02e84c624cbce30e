"""Documents: blocks rendered as Markdown (figures linked) and as self-contained HTML (figures embedded),
and the sweep report built on them: report.md with its figures beside it, and report.html."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from planner.api import make_plan
from planner.report.figures import GB, plot_plan, plot_speedup_heatmap, plot_throughput_vs_context
from planner.studies.journal import MFU_CONVENTION, variant_label
from planner.studies.sweep import Config, TrainingFlags, batches_of, cost_model_of, options_for
from planner.workload import format_tokens
from profiles.table import atomic_write_text


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
        "strategy": [s + (f" ({v})" if v else "") for s, v in
                     zip(df["strategy"], map(variant_label, df["zero_stage"], df["attention_kernel"],
                                                 df["training"]))],
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
        best = ok.loc[ok.groupby(["model", "cluster", "gpus", "tp", "pp", "context_tokens", "lengths",
                                  "zero_stage", "attention_kernel", "training"], sort=False)["tokens_per_s"].idxmax()]
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
                 str(r["recompute"]), bool(r["offload"]), str(r["static_mesh"]), ep=int(r["ep"]),
                 zero_stage=int(r["zero_stage"]), attention_kernel=str(r["attention_kernel"]), loss=str(r["loss"]),
                 grad_accumulation=str(r["grad_accumulation"]), recompute_modules=str(r["recompute_modules"] or ""),
                 flags=TrainingFlags.parse(r["training"]))
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
