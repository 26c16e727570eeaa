"""Compatibility shim: the CUDA path lives in :mod:`stemgpu.atoms.cuda`.

Kept for ``stemgpu info`` (``stemgpu.cli``), which imports :func:`kernel_dir` from here; new
code imports from :mod:`stemgpu.atoms.cuda`.
"""

from __future__ import annotations

from .atoms.cuda import kernel_dir

__all__ = ["kernel_dir"]
