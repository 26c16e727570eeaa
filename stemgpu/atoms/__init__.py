"""Atom columns: finding, batched fitting with calibrated errors, the Cramér-Rao bound.

=====================  ==========================================================
module                 owns
=====================  ==========================================================
:mod:`.find`           :func:`find_atoms`, :func:`estimate_sigma`, :func:`detect_contrast`
:mod:`.fit`            :func:`fit_atoms`, :class:`AtomFit` (validation + passes)
:mod:`._passes`        the named passes of ``fit_atoms`` (neighbours, refits, ...)
:mod:`.engines`        :class:`FitEngine`, :class:`ArrayEngine`, :class:`CompiledEngine`,
                       :class:`KernelEngine`
:mod:`._compiled`      the compiled CPU engine (numba, loaded on first use)
:mod:`.track`          :func:`track_columns`, :class:`ColumnTracks` (every frame)
:mod:`.lm`             the LM specification and the array implementation
:mod:`.cuda`           the CUDA kernel: sources, NVRTC options, loader, launch
:mod:`.models`         the model registry (:data:`MODELS`), estimators, status codes
:mod:`.windows`        window placement, gathering, peak rendering
:mod:`.crlb`           :func:`crlb`
=====================  ==========================================================

Names are resolved on first use, so ``import stemgpu.atoms`` stays cheap (no SciPy, no
CuPy).

Examples
--------
>>> import stemgpu.atoms as atoms
>>> atoms.fit_atoms is atoms.fit.fit_atoms, atoms.ESTIMATORS
(True, ('mle', 'lsq'))
"""

from __future__ import annotations

from .._lazy import lazy_exports

# Public name -> submodule that defines it.
_LAZY = {
    "find_atoms": "find",
    "FoundAtoms": "find",
    "estimate_sigma": "find",
    "detect_contrast": "find",
    "track_columns": "track",
    "ColumnTracks": "track",
    "CompiledEngine": "engines",
    "with_contrast": "models",
    "fit_atoms": "fit",
    "AtomFit": "fit",
    "crlb": "crlb",
    "FitEngine": "engines",
    "ArrayEngine": "engines",
    "KernelEngine": "engines",
    "ENGINES": "engines",
    "make_engine": "engines",
    "LMOutput": "lm",
    "lm_fit": "lm",
    "inverse_spd": "lm",
    "lm_fit_kernel": "cuda",
    "MODELS": "models",
    "Model": "models",
    "ESTIMATORS": "models",
    "STATUS_NAMES": "models",
    "get_model": "models",
    "window_grid": "models",
    "extract_windows": "windows",
    "render_peaks": "windows",
    "window_origins": "windows",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
