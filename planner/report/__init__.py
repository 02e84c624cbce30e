"""Presentation: figures (Gantt, memory, sweeps) and Markdown documents."""

from planner.report.figures import (
    MEMORY_PARTS, gantt_figure, machine_description, memory_breakdown, memory_figure, plot_plan,
    replace_section, reproduce_bytescale, write_sweep_report)

__all__ = [
    'MEMORY_PARTS', 'gantt_figure', 'machine_description', 'memory_breakdown', 'memory_figure', 'plot_plan',
    'replace_section', 'reproduce_bytescale', 'write_sweep_report']
