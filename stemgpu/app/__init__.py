"""The application on top of the library: :func:`analyze`, its summary, report, demo and CLI.

The data flow ``io -> registration -> atoms -> lattice`` is run end to end by
:func:`~stemgpu.app.analysis.analyze` (one function per stage in :mod:`~stemgpu.app.stages`,
stage names in :mod:`~stemgpu.app.steps`); :class:`~stemgpu.app.analysis.Analysis` holds
the results. :mod:`~stemgpu.app.summary` builds the summary rows from the statistics of
:mod:`~stemgpu.app.statistics`, :mod:`~stemgpu.app.table` prints them;
:mod:`~stemgpu.app.report` draws the figures; :mod:`~stemgpu.app.demo`,
:mod:`~stemgpu.app.run`, :mod:`~stemgpu.app.bench` and :mod:`~stemgpu.app.cli` are the
``stemgpu`` command (exit codes and :class:`AnalysisError` in :mod:`~stemgpu.app.errors`,
output path checks in :mod:`~stemgpu.app.paths`). Nothing in the library imports this
package. Names are loaded on first use, so ``import stemgpu.app`` stays cheap.

Examples
--------
>>> from stemgpu.app import STEPS, analyze
>>> STEPS, analyze.__module__
(('rigid', 'demons', 'atoms', 'cells'), 'stemgpu.app.analysis')
"""

from __future__ import annotations

from .._lazy import lazy_exports

# Public name -> module that defines it; resolved lazily by __getattr__ below.
_LAZY = {
    "Analysis": "stemgpu.app.analysis",
    "analyze": "stemgpu.app.analysis",
    "AnalysisError": "stemgpu.app.errors",
    "EXIT_OK": "stemgpu.app.errors",
    "EXIT_FAILED": "stemgpu.app.errors",
    "EXIT_USAGE": "stemgpu.app.errors",
    "EXIT_BAD_INPUT": "stemgpu.app.errors",
    "EXIT_BACKEND": "stemgpu.app.errors",
    "STEPS": "stemgpu.app.steps",
    "check_steps": "stemgpu.app.steps",
    "Row": "stemgpu.app.summary",
    "summary_rows": "stemgpu.app.summary",
    "SYSTEMATIC": "stemgpu.app.statistics",
    "std_interval": "stemgpu.app.statistics",
    "format_rows": "stemgpu.app.table",
    "plot_columns": "stemgpu.app.report",
    "plot_maps": "stemgpu.app.report",
    "plot_report": "stemgpu.app.report",
    "save_report": "stemgpu.app.report",
    "DEMO": "stemgpu.app.demo",
    "BIASED": "stemgpu.app.demo",
    "compare": "stemgpu.app.demo",
    "demo_stack": "stemgpu.app.demo",
    "demo_truth": "stemgpu.app.demo",
    "run_demo": "stemgpu.app.demo",
    "read_input": "stemgpu.app.run",
    "run_file": "stemgpu.app.run",
    "check_output_paths": "stemgpu.app.paths",
    "main": "stemgpu.app.cli",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
