"""Presentation: figures (sweeps, Gantt, memory, length sources, predicted vs measured) and documents (Markdown /
HTML reports)."""

from planner.report.accuracy import Comparison, Strip, accuracy_figure, plot_accuracy, plot_strips, strips_figure
from planner.report.documents import Document, md_table, write_sweep_report
from planner.report.figures import (
    GANTT_PASSES, MEMORY_PARTS, STRATEGY_COLORS, PlanFigures, gantt_figure, memory_breakdown, memory_figure,
    plot_description, plot_gantt, plot_memory, plot_plan, plot_speedup_heatmap, plot_throughput_vs_context,
    save_figure)

__all__ = [
    'Comparison', 'Document', 'GANTT_PASSES', 'MEMORY_PARTS', 'PlanFigures', 'STRATEGY_COLORS', 'Strip',
    'accuracy_figure', 'gantt_figure', 'md_table', 'memory_breakdown', 'memory_figure', 'plot_accuracy',
    'plot_description', 'plot_gantt', 'plot_memory', 'plot_plan',
    'plot_speedup_heatmap', 'plot_strips', 'plot_throughput_vs_context', 'save_figure', 'strips_figure',
    'write_sweep_report']
