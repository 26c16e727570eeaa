"""Old home of the ``stemgpu`` command, now :mod:`stemgpu.app.cli` (kept for old imports,
old console-script installs and ``python -m stemgpu.cli``)."""

from __future__ import annotations

import sys

from .app.bench import quick_bench
from .app.cli import build_parser, cmd_bench, cmd_demo, cmd_info, cmd_run, main
from .app.errors import EXIT_BACKEND, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .app.paths import IMAGE_FORMATS, check_output_paths
from .app.run import read_input, run_file
from .app.steps import STEPS as STEP_NAMES

__all__ = ["EXIT_BACKEND", "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE",
           "IMAGE_FORMATS", "STEP_NAMES", "build_parser", "check_output_paths", "cmd_bench",
           "cmd_demo", "cmd_info", "cmd_run", "main", "quick_bench", "read_input", "run_file"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
