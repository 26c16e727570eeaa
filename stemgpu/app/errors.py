"""The application's failure vocabulary: :class:`AnalysisError` and the exit codes.

====  =====================================================
code  meaning
====  =====================================================
0     success
1     the analysis ran but failed (e.g. no atoms found)
2     bad command line (argparse)
3     bad input file or option value
4     requested backend unavailable
5     ``stemgpu batch``: some files failed (the others have results)
====  =====================================================
"""

from __future__ import annotations

__all__ = ["EXIT_BACKEND", "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_PARTIAL",
           "EXIT_USAGE", "AnalysisError"]

from ..lattice.gates import AnalysisError  # one class: the lattice gates raise it too

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_BACKEND = 0, 1, 2, 3, 4
EXIT_PARTIAL = 5
