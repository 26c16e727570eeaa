"""Old home of the report figures, now :mod:`stemgpu.app.report` (kept for old imports)."""

from __future__ import annotations

from .app.report import plot_columns, plot_maps, plot_report, save_report

__all__ = ["plot_columns", "plot_maps", "plot_report", "save_report"]
