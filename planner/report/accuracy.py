"""Figures of predicted against measured times, for `meshplan validate`, `simulate --measured`, `calibrate` and
`machine-check`:

- a parity plot: predicted against measured (or published) on log axes, y = x and its ±band shaded;
- each group's errors (predicted / measured − 1) as a strip, its MAPE (mean |error|) beside it: a calibration set,
  a kind of row, a plan before and after a fit;
- for published runs, the memory each needs against its GPU's (every one of them ran, so none may exceed 1).

Groups the model was designed or fitted on are drawn hollow, held-out ones filled. Times that are not finite and
positive (a unit measured at 0) cannot be drawn on log axes: they are left out and counted beside their strip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from planner.report.figures import figure_stem, plt, save_figure

# twenty strong colours: tab10, then the darkest shade of each of tab20b's and tab20c's five hues
_COLORS = plt.get_cmap("tab10").colors + plt.get_cmap("tab20b").colors[::4] + plt.get_cmap("tab20c").colors[::4]
_BEFORE = "#9a9a9a"
STRIP_MAX_PCT = 100.0  # errors beyond +100% are drawn at the edge as ">": one outlier must not flatten the rest


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

    @classmethod
    def from_rows(cls, label: str, rows: Sequence[dict], measured: str = "measured_s",
                  predicted: str = "predicted_s", held_out: bool = True) -> "Comparison":
        """The rows (dicts, e.g. `compare_measured`'s) that have both times."""
        rows = [r for r in rows if measured in r and predicted in r]
        return cls(label, tuple(float(r[measured]) for r in rows), tuple(float(r[predicted]) for r in rows), held_out)

    @property
    def drawable(self) -> np.ndarray:
        """Which pairs a log axis can show: both times finite and positive."""
        m, p = np.asarray(self.measured_s, dtype=float), np.asarray(self.predicted_s, dtype=float)
        return np.isfinite(m) & np.isfinite(p) & (m > 0) & (p > 0)

    @property
    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(measured, predicted) of the drawable pairs."""
        ok = self.drawable
        return np.asarray(self.measured_s, dtype=float)[ok], np.asarray(self.predicted_s, dtype=float)[ok]

    @property
    def errors(self) -> np.ndarray:
        """predicted / measured − 1 of the drawable pairs."""
        m, p = self.points
        return p / m - 1.0


@dataclass(frozen=True)
class Strip:
    """One row of a strip panel: relative errors, with the errors before a change drawn grey behind them."""

    label: str
    errors: tuple[float, ...]
    held_out: bool = True
    before: tuple[float, ...] | None = None  # e.g. the base profile's errors, before a calibration
    color: int | None = None  # the colour's index (rows of one plan share it); default: the row's own
    left_out: int = 0  # pairs not drawn (not finite and positive), said beside the strip


def _color(i: int) -> tuple[float, float, float]:
    return _COLORS[i % len(_COLORS)]


def _marker(held_out: bool, color) -> dict:
    return dict(color=color, markerfacecolor=color if held_out else "none", markeredgecolor=color)


def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


def _mape(e: np.ndarray) -> str:
    return f"{100 * np.mean(np.abs(e)):.1f}% ({len(e)})" if len(e) else "-"


def _parity(ax: plt.Axes, groups: Sequence[Comparison], band: float, measured_label: str) -> None:
    vals = np.concatenate([np.concatenate(g.points) for g in groups])
    lo, hi = (vals.min() / 1.4, vals.max() * 1.4) if len(vals) else (0.1, 10.0)
    line = np.geomspace(lo, hi, 50)
    ax.fill_between(line, line * (1 - band), line * (1 + band), color="#e6e6e6", lw=0, label=f"±{band:.0%}")
    ax.plot(line, line, color="#555555", lw=0.8, label=f"predicted = {measured_label}")
    for i, g in enumerate(groups):
        ax.plot(*g.points, "o", ms=4.5, alpha=0.85, **_marker(g.held_out, _color(i)))
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


def _strip_points(ax: plt.Axes, pct: np.ndarray, y: np.ndarray, held_out: bool, color, ms: float) -> None:
    """Errors in %, those past STRIP_MAX_PCT at the edge as '>'."""
    over = pct > STRIP_MAX_PCT
    ax.plot(pct[~over], y[~over], "o", ms=ms, alpha=0.85, **_marker(held_out, color))
    if over.any():
        ax.plot(np.full(over.sum(), STRIP_MAX_PCT), y[over], ">", ms=ms + 1.5, ls="", **_marker(held_out, color))


def _strips(ax: plt.Axes, rows: Sequence[Strip], band: float, measured_label: str = "measured") -> None:
    """One row per Strip, top to bottom: its errors jittered around the row, MAPE on the right."""
    rng = np.random.default_rng(0)  # the same jitter on every draw
    ax.axvspan(-100 * band, 100 * band, color="#e6e6e6", lw=0)
    ax.axvline(0, color="#555555", lw=0.8)
    n = len(rows)
    shown = []
    for i, r in enumerate(rows):
        y = n - 1 - i
        color = _color(i if r.color is None else r.color)
        e, b = _finite(r.errors), (_finite(r.before) if r.before is not None else None)
        if b is not None and len(b):
            _strip_points(ax, 100 * b, y + 0.18 + rng.uniform(-0.08, 0.08, len(b)), False, _BEFORE, 3.5)
        spread = 0.09 if r.before is not None else 0.15
        _strip_points(ax, 100 * e, y - (0.12 if r.before is not None else 0.0) + rng.uniform(-spread, spread, len(e)),
                      r.held_out, color, 4.0)
        shown += [*e, *(b if b is not None else ())]
        text = _mape(e) if b is None else f"{_mape(b)} → {_mape(e)}"
        if r.left_out:
            text += f", {r.left_out} not drawn"
        ax.annotate(text, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ax.annotate("MAPE (n)", (1.01, n - 0.3), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                color="#555555")
    ax.set_yticks(range(n - 1, -1, -1), [r.label for r in rows], fontsize=8)
    for i, (tick, r) in enumerate(zip(ax.get_yticklabels(), rows)):
        tick.set_color(_color(i if r.color is None else r.color))
    pct = 100 * np.asarray(shown, dtype=float)
    lo = min(-100 * band, pct.min() if len(pct) else 0.0)
    hi = max(100 * band, min(pct.max(), STRIP_MAX_PCT) if len(pct) else 0.0)
    ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"error, % (predicted / {measured_label} − 1; past +{STRIP_MAX_PCT:g}%: >)")
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
    _strips(axes[1], [Strip(g.label, tuple(g.errors), g.held_out, left_out=int((~g.drawable).sum()))
                      for g in groups], band, measured_label)
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
        r = _finite(ratios)
        if i is None or not len(r):
            continue
        y = n - 1 - i + rng.uniform(-0.15, 0.15, len(r))
        ok = r <= 1.0
        ax.plot(r[ok], y[ok], "o", ms=4, alpha=0.85, **_marker(groups[i].held_out, _color(i)))
        ax.plot(r[~ok], y[~ok], "X", ms=6, color="#d62728", ls="")
    ax.axvline(1.0, color="#d62728", lw=0.8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_yticks(range(n - 1, -1, -1), [""] * n)
    ax.set_xlabel("memory needed / GPU memory (each ran)")
    ax.grid(axis="x", alpha=0.25)


def strips_figure(panels: Sequence[tuple[str, Sequence[Strip]]], *, title: str, band: float = 0.10,
                  labels: tuple[str, str, str] = ("before", "after, held out", "after, fitted on")) -> plt.Figure:
    """Error strips alone, one panel per (heading, rows), each row's `before` errors grey behind its own (a fit's
    plans: the base profile's errors, then the fitted one's). `labels` name the three kinds of points."""
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
    drawn = [r for r in rows if len(r.errors)]
    handles = [plt.Line2D([], [], ls="", marker="o", **_marker(held, color), label=label) for show, held, color, label
               in ((any(r.before is not None for r in rows), False, _BEFORE, labels[0]),
                   (any(r.held_out for r in drawn), True, "#333333", labels[1]),
                   (any(not r.held_out for r in drawn), False, "#333333", labels[2])) if show]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_accuracy(groups: Sequence[Comparison], path: Path, **kw) -> list[Path]:
    """accuracy_figure written as PATH's stem .png and .svg."""
    return save_figure(accuracy_figure(groups, **kw), figure_stem(path))


def plot_strips(panels: Sequence[tuple[str, Sequence[Strip]]], path: Path, **kw) -> list[Path]:
    """strips_figure written as PATH's stem .png and .svg."""
    return save_figure(strips_figure(panels, **kw), figure_stem(path))
