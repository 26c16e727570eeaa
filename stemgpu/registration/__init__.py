"""Registration of image stacks: rigid shifts, drift versus jitter, and demons warping.

The stage runs io -> registration -> atoms: :func:`register_rigid` measures and removes the
frame offsets (its passes are in ``passes``), :func:`drift_report` splits the offsets
into a smooth drift and the jitter, and :func:`register_demons` removes the distortions left
inside each frame. :func:`apply_shifts` and :func:`warp` apply given shifts or fields.

Importing this package loads NumPy only (SciPy is imported by the functions that use it).

Examples
--------
>>> import numpy as np
>>> from stemgpu.registration import apply_shifts
>>> stack = np.zeros((2, 16, 16), dtype="float32")
>>> stack[:, 8, 8] = 1.0
>>> out = apply_shifts(stack, [[0.0, 0.0], [1.0, 2.0]], order="spline", backend="numpy")
>>> [tuple(int(i) for i in np.unravel_index(f.argmax(), f.shape)) for f in out]
[(8, 8), (9, 10)]
"""

from __future__ import annotations

from .demons import DemonsResult, register_demons, warp
from .drift import XY, DriftReport, drift_report
from .rigid import RigidResult, apply_shifts, register_rigid, valid_region

__all__ = [
    "XY",
    "DemonsResult",
    "DriftReport",
    "RigidResult",
    "apply_shifts",
    "drift_report",
    "register_demons",
    "register_rigid",
    "valid_region",
    "warp",
]
