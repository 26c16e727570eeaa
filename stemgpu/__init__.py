"""stemgpu: fast quantitative atomic-resolution STEM on NumPy or CuPy.

Importing the package is cheap: NumPy is the only heavy import. Every public function is
loaded from its module on first use, so ``import stemgpu`` never imports CuPy, SciPy,
sidpy or matplotlib.

Examples
--------
>>> import stemgpu
>>> stemgpu.__version__
'0.1.0'
"""

from __future__ import annotations

from ._lazy import lazy_exports
from .backend import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

# Public name -> module that defines it; resolved lazily by __getattr__ below.
_LAZY = {
    "simulate_stack": "stemgpu.synthetic",
    "simulate_image": "stemgpu.synthetic",
    "Lattice": "stemgpu.synthetic",
    "register_rigid": "stemgpu.registration.rigid",
    "RigidResult": "stemgpu.registration.rigid",
    "apply_shifts": "stemgpu.registration.rigid",
    "drift_report": "stemgpu.registration.drift",
    "DriftReport": "stemgpu.registration.drift",
    "register_demons": "stemgpu.registration.demons",
    "DemonsResult": "stemgpu.registration.demons",
    "find_atoms": "stemgpu.atoms.find",
    "detect_contrast": "stemgpu.atoms.find",
    "fit_atoms": "stemgpu.atoms.fit",
    "AtomFit": "stemgpu.atoms.fit",
    "crlb": "stemgpu.atoms.crlb",
    "track_columns": "stemgpu.atoms.track",
    "ColumnTracks": "stemgpu.atoms.track",
    "frame_series": "stemgpu.lattice.series",
    "unit_cells": "stemgpu.lattice.cells",
    "cell_statistics": "stemgpu.lattice.stats",
    "estimate_distortion": "stemgpu.lattice.distortion",
    "correct_distortion": "stemgpu.lattice.distortion",
    "open": "stemgpu.io.nion",
    "open_frames": "stemgpu.io.nion",
    "source_of": "stemgpu.io.provenance",
    "save": "stemgpu.io.results",
    "load": "stemgpu.io.results",
    "analyze": "stemgpu.app.analysis",
    "Analysis": "stemgpu.app.analysis",
}

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "__version__",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    *sorted(_LAZY),
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
