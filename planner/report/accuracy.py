"""Figures of predicted against measured times, for `meshplan validate`, `simulate --measured` and `calibrate`:

- a parity plot: predicted against measured (or published) on log axes, y = x and its ±band shaded;
- each group's errors (predicted / measured − 1) as a strip, its MAPE beside it: a calibration set, a kind of row,
  a plan before and after a fit;
- for published runs, the memory each needs against its GPU's (every one of them ran, so none may exceed 1).

Groups the model was designed or fitted on are drawn hollow, held-out ones filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from planner.report.figures import figure_stem, plt, save_figure

_COLORS = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # ten strong colours, then pale
_BEFORE = "#9a9a9a"


@dataclass(frozen=True)
class Comparison:
    """One group of predicted vs measured times (seconds): a calibration set, a plan, a kind of row."""

    label: str
    measured_s: tuple[float, ...]  # measured or published
    predicted_s: tuple[float, ...]
    held_out: bool = True  # False: the model was designed or fitted on these (hollow markers)

    def __post_init__(self) -> None:
        if len(self.measured_s) != len(self.predicted_s):
            raise ValueError(f"{self.label}: {len(self.measured_s)} measured times, {len(self.predicted_s)} predicted")

    @property
    def errors(self) -> np.ndarray:
        return np.asarray(self.predicted_s, dtype=float) / np.asarray(self.measured_s, dtype=float) - 1.0


@dataclass(frozen=True)
class Strip:
    """One row of a strip panel: relative errors, with the errors before a change drawn grey behind them."""

    label: str
    errors: tuple[float, ...]
    held_out: bool = True
    before: tuple[float, ...] | None = None  # e.g. the base profile's errors, before a calibration


def _color(i: int) -> tuple[float, float, float]:
    return _COLORS[i % len(_COLORS)]


def _marker(held_out: bool, color) -> dict:
    return dict(color=color, markerfacecolor=color if held_out else "none", markeredgecolor=color)


def _mape(e: np.ndarray) -> str:
    return f"{100 * np.mean(np.abs(e)):.1f}% ({len(e)})" if len(e) else "-"


def _parity(ax: plt.Axes, groups: Sequence[Comparison], band: float, measured_label: str) -> None:
    vals = np.array([v for g in groups for v in (*g.measured_s, *g.predicted_s) if v > 0], dtype=float)
    lo, hi = (vals.min() / 1.4, vals.max() * 1.4) if len(vals) else (0.1, 10.0)
    line = np.geomspace(lo, hi, 50)
    ax.fill_between(line, line * (1 - band), line * (1 + band), color="#e6e6e6", lw=0,
                    label=f"±{band:.0%}")
    ax.plot(line, line, color="#555555", lw=0.8, label="predicted = measured")
    for i, g in enumerate(groups):
        ax.plot(g.measured_s, g.predicted_s, "o", ms=4.5, alpha=0.85, **_marker(g.held_out, _color(i)))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # 1-2-5 ticks as plain numbers: readable over a decade or over six
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if hi / lo < 1e3 else (1.0,)))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"{measured_label} (s)")
    ax.set_ylabel("predicted (s)")
    ax.grid(which="both", alpha=0.25)
    ax.legend(loc="upper left", fontsize=8, frameon=False)


def _strips(ax: plt.Axes, rows: Sequence[Strip], band: float, measured_label: str = "measured") -> None:
    """One row per Strip, top to bottom: its errors jittered around the row, MAPE on the right."""
    rng = np.random.default_rng(0)  # the same jitter on every draw
    ax.axvspan(-100 * band, 100 * band, color="#e6e6e6", lw=0)
    ax.axvline(0, color="#555555", lw=0.8)
    n = len(rows)
    for i, r in enumerate(rows):
        y = n - 1 - i
        color = _color(i)
        if r.before is not None and len(r.before):
            b = 100 * np.asarray(r.before, dtype=float)
            ax.plot(b, y + 0.18 + rng.uniform(-0.08, 0.08, len(b)), "o", ms=3.5, alpha=0.7,
                    **_marker(False, _BEFORE))
        e = 100 * np.asarray(r.errors, dtype=float)
        shift = -0.12 if r.before is not None else 0.0
        ax.plot(e, y + shift + rng.uniform(-0.15, 0.15, len(e)) * (0.6 if r.before is not None else 1), "o", ms=4,
                alpha=0.85, **_marker(r.held_out, color))
        text = _mape(np.asarray(r.errors, dtype=float))
        if r.before is not None:
            text = f"{_mape(np.asarray(r.before, dtype=float))} → {text}"
        ax.annotate(text, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ax.annotate("MAPE (n)", (1.01, n - 0.3), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                color="#555555")
    ax.set_yticks(range(n - 1, -1, -1), [r.label for r in rows], fontsize=8)
    for i, tick in enumerate(ax.get_yticklabels()):
        tick.set_color(_color(i))
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"error, % (predicted / {measured_label} − 1)")
    ax.grid(axis="x", alpha=0.25)


def accuracy_figure(groups: Sequence[Comparison], *, title: str, measured_label: str = "measured",
                    band: float = 0.10, memory: Sequence[tuple[str, Sequence[float]]] = ()) -> plt.Figure:
    """Parity plot and error strips of `groups` (one strip each); with `memory`, a third panel: per group label,
    each run's memory needed / its GPU's."""
    if not groups:
        raise ValueError("no predicted vs measured times to draw")
    n = len(groups)
    panels = 3 if memory else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels + 1.5, max(4.6, 0.32 * n + 1.6)),
                             gridspec_kw={"width_ratios": [1.1, 1.0, 0.8][:panels]})
    _parity(axes[0], groups, band, measured_label)
    _strips(axes[1], [Strip(g.label, tuple(g.errors), g.held_out) for g in groups], band, measured_label)
    if memory:
        _memory(axes[2], groups, memory)
    handles = [plt.Line2D([], [], ls="", marker="o", **_marker(True, "#333333"), label="held out"),
               plt.Line2D([], [], ls="", marker="o", **_marker(False, "#333333"), label="design / fitted")]
    if any(not g.held_out for g in groups):
        fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _memory(ax: plt.Axes, groups: Sequence[Comparison], memory: Sequence[tuple[str, Sequence[float]]]) -> None:
    """Memory needed / GPU memory per run, on the rows of the strip panel beside it (matched by label)."""
    rng = np.random.default_rng(1)
    rows = {g.label: i for i, g in enumerate(groups)}
    n = len(groups)
    for label, ratios in memory:
        i = rows.get(label)
        if i is None or not len(ratios):
            continue
        r = np.asarray(ratios, dtype=float)
        y = n - 1 - i + rng.uniform(-0.15, 0.15, len(r))
        ok = r <= 1.0
        ax.plot(r[ok], y[ok], "o", ms=4, alpha=0.85, **_marker(groups[i].held_out, _color(i)))
        ax.plot(r[~ok], y[~ok], "X", ms=6, color="#d62728", ls="")
    ax.axvline(1.0, color="#d62728", lw=0.8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_yticks(range(n - 1, -1, -1), [""] * n)
    ax.set_xlabel("memory needed / GPU memory (each ran)")
    ax.grid(axis="x", alpha=0.25)


def strips_figure(panels: Sequence[tuple[str, Sequence[Strip]]], *, title: str, band: float = 0.10) -> plt.Figure:
    """Error strips alone, one panel per (heading, rows), each row's `before` errors grey behind its own (a fit's
    plans: the base profile's errors, then the fitted one's)."""
    panels = [(h, rows) for h, rows in panels if rows]
    if not panels:
        raise ValueError("no errors to draw")
    n = max(len(rows) for _h, rows in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels) + 1.0, max(3.0, 0.45 * n + 1.6)),
                             squeeze=False)
    for ax, (heading, rows) in zip(axes[0], panels):
        _strips(ax, rows, band)
        ax.set_title(heading, fontsize=9)
    rows = [r for _h, rs in panels for r in rs]
    handles = [plt.Line2D([], [], ls="", marker="o", **_marker(held, color), label=label) for show, held, color, label
               in ((any(r.before is not None for r in rows), False, _BEFORE, "before"),
                   (any(r.held_out for r in rows), True, "#333333", "after, held out"),
                   (any(not r.held_out for r in rows), False, "#333333", "after, fitted on")) if show]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_accuracy(groups: Sequence[Comparison], path: Path, **kw) -> list[Path]:
    """accuracy_figure written as PATH's stem .png and .svg."""
    return save_figure(accuracy_figure(groups, **kw), figure_stem(path))


def plot_strips(panels: Sequence[tuple[str, Sequence[Strip]]], path: Path, **kw) -> list[Path]:
    """strips_figure written as PATH's stem .png and .svg."""
    return save_figure(strips_figure(panels, **kw), figure_stem(path))
