"""Imported by ``tests/conftest.py`` before it probes the backends: enable the CuPy stand-in
unless a real GPU is usable, and name the pytest plugin that reports it.

``STEMGPU_CUPY_STANDIN=1`` forces the stand-in (also on a GPU machine), ``=0`` forbids it
(then the gpu-marked tests skip without a GPU, as before).
"""

from __future__ import annotations

import os

from . import ENV_VAR, enable

_choice = os.environ.get(ENV_VAR)
if _choice is None:
    from stemgpu.backend import _probe_cupy

    _choice = "0" if _probe_cupy()[0] is not None else "1"  # a real, usable GPU wins
if _choice == "1":
    enable()
else:
    os.environ[ENV_VAR] = "0"

pytest_plugins = ["cupy_standin.plugin"]
