"""Predicted-vs-measured figures: the points are where the times put them, each group's strip holds its signed
errors and its MAPE, held-out groups are filled and fitted ones hollow, runs over their GPU's memory are marked,
and the files come as PNG and SVG."""

import matplotlib
import matplotlib.figure
import numpy as np
import pytest

matplotlib.use("Agg")

from planner.report import Comparison, Strip, accuracy_figure, plot_accuracy, plot_strips, strips_figure  # noqa: E402


def _points(ax) -> list[np.ndarray]:
    """The (x, y) of every marker-only line drawn on ax, in drawing order."""
    return [np.column_stack(line.get_data()) for line in ax.get_lines() if line.get_linestyle() in ("None", "")]


def test_parity_points_sit_at_measured_and_predicted_and_strips_hold_the_signed_errors():
    a = Comparison("set a", (1.0, 10.0), (1.1, 8.0))
    b = Comparison("set b", (0.02,), (0.02,), held_out=False)
    assert np.allclose(a.errors, [0.1, -0.2])
    fig = accuracy_figure([a, b], title="t", measured_label="published")
    parity, strips = fig.axes[:2]
    pa, pb = _points(parity)
    assert np.allclose(pa, [[1.0, 1.1], [10.0, 8.0]]) and np.allclose(pb, [[0.02, 0.02]])
    lo, hi = parity.get_xlim()
    assert lo < 0.02 and hi > 10.0 and parity.get_xscale() == "log" and parity.get_ylim() == (lo, hi)
    sa, sb = _points(strips)
    assert np.allclose(sorted(sa[:, 0]), [-20.0, 10.0]) and np.allclose(sb[:, 0], [0.0])  # percent
    assert (np.abs(sa[:, 1] - 1) < 0.2).all() and (np.abs(sb[:, 1]) < 0.2).all()  # a on top, b below
    assert [t.get_text() for t in strips.get_yticklabels()] == ["set a", "set b"]
    notes = [t.get_text() for t in strips.texts]
    assert "15.0% (2)" in notes and "0.0% (1)" in notes  # MAPE and count beside each strip
    assert "published" in strips.get_xlabel() and "published" in parity.get_xlabel()
    held, fitted = (line for line in parity.get_lines() if line.get_linestyle() in ("None", ""))
    assert held.get_markerfacecolor() != "none" and fitted.get_markerfacecolor() == "none"
    matplotlib.pyplot.close(fig)


def test_runs_over_their_gpus_memory_are_marked_on_their_sets_row():
    groups = [Comparison("a", (1.0,), (1.0,)), Comparison("b", (1.0,), (1.0,))]
    fig = accuracy_figure(groups, title="t", memory=[("b", [0.5, 1.2])])
    assert len(fig.axes) == 3
    fits, over = (ln for ln in fig.axes[2].get_lines() if ln.get_linestyle() in ("None", ""))
    assert np.allclose(fits.get_xdata(), [0.5]) and np.allclose(over.get_xdata(), [1.2])
    assert over.get_marker() == "X" and (np.abs(np.asarray(over.get_ydata())) < 0.2).all()  # b: the lower row
    matplotlib.pyplot.close(fig)


def test_strips_draw_the_errors_before_grey_behind_the_errors_after():
    rows = [Strip("p (held-out)", (0.05, -0.05), True, (0.3, 0.2)), Strip("p (fitted)", (0.01,), False, (0.2,))]
    fig = strips_figure([("per step", rows), ("per unit", rows), ("empty", [])], title="t")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "per step"  # an empty panel is left out
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert "25.0% (2) → 5.0% (2)" in notes and "20.0% (1) → 1.0% (1)" in notes
    before, after = _points(fig.axes[0])[:2]
    assert np.allclose(sorted(before[:, 0]), [20.0, 30.0]) and np.allclose(sorted(after[:, 0]), [-5.0, 5.0])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["before", "after, held out", "after, fitted on"]
    matplotlib.pyplot.close(fig)
    fig = strips_figure([("s", [Strip("a", (0.1,))])], title="t")  # no fit: nothing before, nothing fitted on
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["after, held out"]
    matplotlib.pyplot.close(fig)


def test_times_a_log_axis_cannot_show_are_left_out_and_counted_and_outliers_sit_at_the_edge():
    g = Comparison("a", (1.0, 0.0, float("inf"), 2.0), (1.5, 1.0, 1.0, 12.0))  # +50%, two undrawable, +500%
    assert list(g.drawable) == [True, False, False, True] and np.allclose(g.errors, [0.5, 5.0])
    fig = accuracy_figure([g], title="t")
    parity, strips = fig.axes[:2]
    assert np.allclose(_points(parity)[0], [[1.0, 1.5], [2.0, 12.0]])
    inside, edge = _points(strips)
    assert np.allclose(inside[:, 0], [50.0]) and np.allclose(edge[:, 0], [100.0])  # +500% drawn at +100% as '>'
    assert [ln.get_marker() for ln in strips.get_lines() if ln.get_linestyle() in ("None", "")] == ["o", ">"]
    assert strips.get_xlim()[1] < 120 and "275.0% (2), 2 not drawn" in [t.get_text() for t in strips.texts]
    matplotlib.pyplot.close(fig)


def test_rows_of_one_plan_share_its_colour():
    rows = [Strip("p (held-out)", (0.1,), True, None, 3), Strip("q (held-out)", (0.1,), True, None, 4),
            Strip("p (fitted)", (0.1,), False, None, 3)]
    fig = strips_figure([("s", rows)], title="t")
    colors = [t.get_color() for t in fig.axes[0].get_yticklabels()]
    assert colors[0] == colors[2] != colors[1]
    matplotlib.pyplot.close(fig)


def test_nothing_to_draw_is_an_error_and_mismatched_times_are_refused():
    with pytest.raises(ValueError, match="no predicted vs measured"):
        accuracy_figure([], title="t")
    with pytest.raises(ValueError, match="no errors"):
        strips_figure([("x", [])], title="t")
    with pytest.raises(ValueError, match="2 measured times, 1 predicted"):
        Comparison("a", (1.0, 2.0), (1.0,))


def test_figures_are_written_as_png_and_svg_or_not_at_all(tmp_path, monkeypatch):
    paths = plot_accuracy([Comparison("a", (1.0,), (1.2,))], tmp_path / "acc.png", title="t")
    assert paths == [tmp_path / "acc.png", tmp_path / "acc.svg"] and all(p.stat().st_size > 0 for p in paths)
    paths = plot_strips([("s", [Strip("a", (0.1,))])], tmp_path / "strips", title="t",
                        labels=("the profile", "fitted on the others", "fitted on it"))
    assert [p.name for p in paths] == ["strips.png", "strips.svg"]
    savefig = matplotlib.figure.Figure.savefig

    def no_svg(self, fname, *a, format=None, **kw):
        if format == "svg":
            raise OSError(28, "No space left on device")
        return savefig(self, fname, *a, format=format, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_svg)
    with pytest.raises(OSError, match="No space"):
        plot_accuracy([Comparison("a", (1.0,), (1.2,))], tmp_path / "half.png", title="t")
    assert not list(tmp_path.glob("half*")) and not list(tmp_path.glob(".half*"))  # the PNG went with the SVG
