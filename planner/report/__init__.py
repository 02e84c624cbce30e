"""Presentation: figures (sweeps, Gantt, memory, length sources) and documents (Markdown / HTML reports)."""

from planner.report.documents import Document, md_table, write_sweep_report
from planner.report.figures import (
    GANTT_PASSES, MEMORY_PARTS, STRATEGY_COLORS, PlanFigures, gantt_figure, memory_breakdown, memory_figure,
    plot_description, plot_gantt, plot_memory, plot_plan, plot_speedup_heatmap, plot_throughput_vs_context,
    save_figure)

__all__ = [
    'Document', 'GANTT_PASSES', 'MEMORY_PARTS', 'PlanFigures', 'STRATEGY_COLORS', 'gantt_figure', 'md_table',
    'memory_breakdown', 'memory_figure', 'plot_description', 'plot_gantt', 'plot_memory', 'plot_plan',
    'plot_speedup_heatmap', 'plot_throughput_vs_context', 'save_figure', 'write_sweep_report']
