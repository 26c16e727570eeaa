"""Old home of :func:`analyze` and :class:`Analysis`, now :mod:`stemgpu.app.analysis`.

Kept so that old imports keep working and results files written before the move, which
record the class path ``stemgpu.pipeline:Analysis``, load (see also
:data:`stemgpu.io._codec.MOVED_CLASSES`).
"""

from __future__ import annotations

from .app.analysis import Analysis, analyze
from .app.errors import AnalysisError
from .app.statistics import SYSTEMATIC, std_interval
from .app.steps import STEPS
from .app.summary import Row
from .app.table import format_rows

__all__ = ["STEPS", "SYSTEMATIC", "Analysis", "AnalysisError", "Row", "analyze",
           "format_rows", "std_interval"]
