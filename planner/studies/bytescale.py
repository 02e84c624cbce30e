"""The ByteScale §8.2 reproduction in one place: the paper's panels and claims, the grid planned for it,
the layout choice, and the section of docs/REPRODUCTION.md it regenerates (between markers, in place)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from costmodel.presets import load_cluster
from planner.api import BYTESCALE_TOKENS_PER_STEP
from planner.studies.fingerprint import machine_description
from planner.studies.journal import MFU_CONVENTION
from planner.studies.sweep import Config, Point, batches_of, run_sweep
from planner.workload import format_tokens
from profiles.table import atomic_write_text

# ---- the grid ---------------------------------------------------------------------------------------
Layout = tuple[int, int]  # (tp, pp)


@dataclass(frozen=True)
class ReproPanel:
    """One ByteScale §8.2 panel: a model at the paper's GPU count. The paper hides TP/PP, so each panel
    lists candidate layouts; the one where the static baseline is fastest is used for every strategy."""

    model: str
    paper_gpus: int  # ByteScale §8.1-8.2 (">12K" for 8x22B read as 12,288)
    balance: str  # "DP-Balance" (HDP+TP) or "PP-Balance" (HDP+TP+PP), ByteScale §8.2
    layouts: tuple[Layout, ...]  # candidate (tp, pp)


_TP_ONLY = tuple((tp, 1) for tp in (1, 2, 4, 8))
_TP_PP = tuple((tp, pp) for tp in (4, 8) for pp in (2, 4, 8))
BYTESCALE_PANELS: tuple[ReproPanel, ...] = (
    ReproPanel("llama-7b", 1024, "DP-Balance", _TP_ONLY),
    ReproPanel("llama-13b", 2048, "DP-Balance", _TP_ONLY),
    ReproPanel("llama-30b", 4096, "DP-Balance", _TP_ONLY),
    ReproPanel("llama-70b", 8192, "PP-Balance", _TP_PP),
    ReproPanel("mistral-8x7b", 8192, "PP-Balance", _TP_PP),
    ReproPanel("mistral-8x22b", 12288, "PP-Balance", _TP_PP),
)
BYTESCALE_LAYOUT_NOTE = ("ByteScale hides its GPU type and TP/PP degrees. We use H100 80GB nodes (dgx-h100: "
                         "85.0 GB per GPU, what CUDA reports) and, per model, the layout where the static baseline "
                         "is fastest at the largest context on github-like (a tuned baseline, as MegaScale's would "
                         "be), among TP 1/2/4/8 for the HDP+TP models and TP 4/8 x PP 2/4/8 for the HDP+TP+PP ones; "
                         "all strategies use that layout.")
BYTESCALE_STRATEGIES = ("static", "hdp-naive", "hdp")


@dataclass(frozen=True)
class ByteScaleGrid:
    """The ByteScale §8.2 grid: models at the paper's GPU counts (× gpu_scale, whole nodes and tp·pp
    groups), contexts 256K-2M, github-like and byted-like, static / hdp-naive / hdp."""

    gpu_scale: float = 1.0
    tokens_per_step: int = BYTESCALE_TOKENS_PER_STEP
    steps: int = 2
    seed: int = 0
    cluster: str = "dgx-h100"
    panels: tuple[ReproPanel, ...] = BYTESCALE_PANELS
    contexts_tokens: tuple[int, ...] = tuple(2**k * 256 * 2**10 for k in range(4))
    lengths: tuple[str, ...] = ("github-like", "byted-like")

    def config(self, panel: ReproPanel, layout: Layout, context_tokens: int, lengths: str) -> Config:
        tp, pp = layout
        unit = math.lcm(load_cluster(self.cluster).gpus_per_node, tp * pp)
        gpus = max(unit, int(round(panel.paper_gpus * self.gpu_scale / unit)) * unit)
        return Config(panel.model, self.cluster, gpus, tp, pp, context_tokens, lengths, self.tokens_per_step,
                      self.steps, self.seed)

    def tuning_points(self) -> list[Point]:
        """Static at the largest context on github-like for every candidate layout."""
        return [Point(self.config(p, lay, max(self.contexts_tokens), "github-like"), "static")
                for p in self.panels for lay in p.layouts]

    def choose_layouts(self, tuning: pd.DataFrame) -> dict[str, Layout]:
        """Per model, the candidate with the highest static tokens/s that fits (else the first candidate)."""
        ok = tuning[tuning["feasible"] & tuning["fits_hbm"].fillna(False).astype(bool)]
        out = {}
        for p in self.panels:
            g = ok[ok["model"] == p.model]
            out[p.model] = (tuple(int(x) for x in g.loc[g["tokens_per_s"].idxmax(), ["tp", "pp"]]) if len(g)
                            else p.layouts[0])
        return out

    def points(self, layouts: dict[str, Layout]) -> list[Point]:
        return [Point(self.config(p, layouts[p.model], ctx, ln), s)
                for p in self.panels for ctx in self.contexts_tokens for ln in self.lengths
                for s in BYTESCALE_STRATEGIES]

    def total_points(self) -> int:
        """Points a reproduction plans (tuning, then the grid, whose size does not depend on the layouts)."""
        return len(self.tuning_points()) + len(self.points({p.model: p.layouts[0] for p in self.panels}))


def default_bytescale_table() -> Path:
    """Where `meshplan whatif reproduce` keeps its table and journal unless told (outside the repo)."""
    return Path(tempfile.gettempdir()) / "meshplan-bytescale" / "bytescale.csv"


# ByteScale §8.2 claims (REFERENCE §10) the reproduction is compared against.
BYTESCALE_CLAIMS = {
    "max_github": 7.89,  # max speedup over the static mesh, GitHub, 2M
    "dp_balance_github_2m": (6.21, 7.89),  # LLaMA-7B/13B/30B (HDP+TP), GitHub, 2M
    "max_byted": 4.26,  # max speedup, Byted
    "pp_balance_github_2m": (3.42, 4.28),  # LLaMA-70B, Mistral-8x7B/8x22B (HDP+TP+PP), GitHub, 2M
    "per_doubling": {"static": 2.0, "hdp-naive": 1.23, "hdp": 1.08},  # slowdown per context doubling
}


def per_doubling_slowdown(df: pd.DataFrame) -> pd.DataFrame:
    """Geometric-mean step-time ratio per context doubling (smallest to largest context) of each
    (model, lengths, strategy), on feasible rows; ByteScale §8.2 reads ≈2× / 1.23× / 1.08×."""
    out = []
    ok = df[df["feasible"]]
    for (m, ln, s), g in ok.groupby(["model", "lengths", "strategy"], sort=False):
        g = g.sort_values("context_tokens")
        if len(g) < 2:
            continue
        doublings = math.log2(g["context_tokens"].iloc[-1] / g["context_tokens"].iloc[0])
        ratio = g["step_time_s"].iloc[-1] / g["step_time_s"].iloc[0]
        out.append({"model": m, "lengths": ln, "strategy": s, "per_doubling": ratio ** (1 / doublings)})
    return pd.DataFrame(out, columns=["model", "lengths", "strategy", "per_doubling"])


# ---- the section of docs/REPRODUCTION.md ------------------------------------------------------------
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
        "1F1B; hdp slices long sequences (sliced 1F1B with redistribution where it helps, SlimPipe). "
        "Length sources are meshplan's synthetic `github-like` and `byted-like` families fitted to "
        "ByteScale §3.1 (REFERENCE §9), not the paper's data. † marks plans whose simulated peak memory exceeds "
        "the GPU's memory although they validated; headline figures use the plans that fit.",
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


@dataclass
class Reproduction:
    table: pd.DataFrame  # the grid's sweep table
    tuning: pd.DataFrame  # static at the largest context for every candidate layout
    layouts: dict[str, tuple[int, int]]  # chosen (tp, pp) per model
    paths: tuple[Path, ...]  # the sweep table (CSV, Parquet)
    elapsed_s: float
    computed: int  # points planned in this run (the rest came from the journal)


def reproduce_bytescale(doc_path: Path, grid: ByteScaleGrid = ByteScaleGrid(), *, table: Path | None = None,
                        workers: int = 1, on_point: Callable[[Point, dict], None] | None = None,
                        command: str = "meshplan whatif reproduce") -> Reproduction:
    """Choose each model's layout (static baseline at its fastest), plan the ByteScale grid and rewrite the
    ByteScale section of doc_path. Both sweeps share one journal, so a rerun plans nothing twice.
    on_point: run_sweep's progress callback, over the tuning points then the grid."""
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
