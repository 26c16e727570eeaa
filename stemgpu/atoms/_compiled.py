"""Compiled CPU engine: the batched LM of :mod:`stemgpu.atoms.lm`, one fit per loop iteration.

:func:`lm_fit` has the signature, semantics and return values of :func:`stemgpu.atoms.lm.lm_fit`
(the specification in that module's docstring, which the CUDA kernel implements too). Each fit
runs to its own end in compiled code (numba, ``prange`` over fits, float64 throughout): its
normal equations live in a few small arrays, nothing is allocated per iteration, and a
converged fit stops at once instead of waiting, masked, for the slowest fit of its chunk. The
isotropic Gaussian is evaluated separably on the window grid (2k exponentials per evaluation).

numba is imported on the first call (or by :func:`compiled_available`), never at
``import stemgpu`` time; compiled code is cached on disk (``cache=True``), so only the first
run on a machine pays the JIT (~20 s per model / estimator pair on a 2-core CPU); later
processes load a pair in ~0.1 s after numba's own import (~0.45 s).
The thread count is numba's (``NUMBA_NUM_THREADS`` / ``numba.set_num_threads``).

Callers choose the engine with :func:`compiled_available`: ``(False, reason)`` when numba
cannot be imported or the default kernels (isotropic, MLE) fail to compile or to reproduce a
known fit, and then the array engine is the one to use.
Models without compiled formulas raise :class:`CompiledUnsupported` (a ``ValueError``), so a
caller can fall back to the array engine for them as well.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .lm import (
    DAMPING_FLOOR,
    FISHER_FLOOR,
    LAMBDA0,
    LAMBDA_DOWN,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LAMBDA_UP,
    LMOutput,
)
from .models import (
    AMPLITUDE_MIN_COUNTS,
    CONVERGED,
    DIVERGED,
    MAX_ITER,
    OUT_OF_BOUNDS,
    SIGMA_MIN,
    SINGULAR,
    get_model,
)

__all__ = ["SUPPORTED_MODELS", "CompiledUnsupported", "compiled_available", "lm_fit",
           "num_threads"]

#: Registry models with compiled formulas, and the layout those formulas assume
#: (amplitude, (row, col), widths, angle, background, n_params).
SUPPORTED_MODELS = {
    "gaussian": (0, (1, 2), (3,), None, 4, 5),
    "elliptical": (0, (1, 2), (3, 4), 5, 6, 7),
}
_EST_IDS = {"mle": 0, "lsq": 1}


class CompiledUnsupported(ValueError):
    """The compiled engine has no formulas for this model (use the array engine)."""


def _kernels():
    """The numba module (imported, and its kernels compiled or loaded from cache, on demand)."""
    from . import _compiled_kernels

    return _compiled_kernels


@functools.lru_cache(maxsize=1)
def compiled_available() -> tuple[bool, str]:
    """Whether the compiled engine can run here, and why not.

    Imports numba and runs one tiny isotropic MLE fit on float32 and on float64 data (this
    compiles those kernels, or loads them from numba's on-disk cache: ~0.5 s with a warm
    cache, tens of seconds the first time on a machine). The other model / estimator pairs
    are compiled on their first use. The answer is cached for the process.

    Returns
    -------
    (bool, str)
        ``(True, "numba <version>, <n> threads")`` or ``(False, reason)``.

    Examples
    --------
    >>> from stemgpu.atoms._compiled import compiled_available
    >>> ok, why = compiled_available()
    >>> isinstance(ok, bool) and isinstance(why, str)
    True
    """
    try:
        import numba
    except Exception as exc:  # ImportError, or a broken install (llvmlite mismatch)
        return False, f"numba cannot be imported: {type(exc).__name__}: {exc}"
    try:
        yy, xx = np.mgrid[0:9, 0:9]
        win = (100.0 * np.exp(-((yy - 4.2) ** 2 + (xx - 3.9) ** 2) / 8.0) + 10.0)[None]
        for dt in (np.float32, np.float64):
            out = lm_fit(win.astype(dt), np.zeros((1, 2)), np.array([[90.0, 4, 4, 1.8, 9]]))
            if not (out.status[0] == CONVERGED and abs(out.params[0, 1] - 4.2) < 1e-3):
                return False, f"compiled engine self-test failed ({np.dtype(dt).name} data)"
    except Exception as exc:
        return False, f"compiled engine failed to build: {type(exc).__name__}: {exc}"
    return True, f"numba {numba.__version__}, {numba.get_num_threads()} threads"


def num_threads() -> int:
    """Threads the compiled engine uses (numba's current setting)."""
    import numba

    return int(numba.get_num_threads())


def _layout(mdl):
    """Registry layout of ``mdl`` as the kernels' small arrays; refuses models whose layout
    differs from what the compiled formulas assume (a registry change must not silently
    produce wrong fits)."""
    if mdl.name not in SUPPORTED_MODELS:
        raise CompiledUnsupported(
            f"model={mdl.name!r} has no compiled formulas; accepted: "
            + ", ".join(repr(m) for m in SUPPORTED_MODELS) + " (use the array engine)")
    want = SUPPORTED_MODELS[mdl.name]
    have = (mdl.amplitude, tuple(mdl.position), tuple(mdl.widths), mdl.angle, mdl.background,
            mdl.n_params)
    if have != want:
        raise CompiledUnsupported(
            f"model={mdl.name!r} in the registry has layout {have}, the compiled formulas "
            f"assume {want} (use the array engine)")
    lay = np.array([mdl.amplitude, mdl.position[0], mdl.position[1], mdl.background,
                    len(mdl.widths), *mdl.widths], dtype=np.int64)
    islog = np.zeros(mdl.n_params, dtype=np.int64)
    islog[list(mdl.log_params)] = 1
    return lay, islog


_CONSTS = np.array([LAMBDA0, LAMBDA_UP, LAMBDA_DOWN, LAMBDA_MIN, LAMBDA_MAX, DAMPING_FLOOR,
                    FISHER_FLOOR, math.log(SIGMA_MIN), math.log(AMPLITUDE_MIN_COUNTS)])
_CODES = np.array([CONVERGED, MAX_ITER, SINGULAR, OUT_OF_BOUNDS, DIVERGED], dtype=np.int64)


def lm_fit(windows, origins, init, *, model="gaussian", estimator="mle", max_iter=50,
           tol=1e-7, gain=1.0, xp=None, offset=None, chunk=None, fixed=None) -> LMOutput:
    """Fit one model per window: :func:`stemgpu.atoms.lm.lm_fit`, compiled and multi-threaded.

    Same arguments and results as the array engine (NumPy arrays only). Each fit runs to its
    own end; the outputs do not depend on the batch composition or the thread count.

    Parameters
    ----------
    windows : (M, k, k) array
        Pixel data in data units (float32 and float64 are used as they are, other dtypes are
        converted to float64).
    origins : (M, 2) array
        Image (row, col) of each window's ``[0, 0]`` pixel.
    init : (M, P) array
        Natural initial parameters.
    model : {"gaussian", "elliptical"} or Model
    estimator : {"mle", "lsq"}
    max_iter : int
    tol : float
    gain : float
        Counts per data unit.
    xp : module, optional
        Must be NumPy (or None): the compiled engine runs on the CPU.
    offset : (M, k, k) array, optional
        Known additive model part in data units (fitted neighbouring columns).
    chunk : int, optional
        Accepted for the array engine's signature; memory here is a few k x k arrays per
        thread whatever the batch, so it has no effect.
    fixed : (M, P) bool array, optional
        Parameters held at their initial value (zero error reported).

    Returns
    -------
    LMOutput
        NumPy arrays.

    Raises
    ------
    CompiledUnsupported
        A model without compiled formulas.
    ValueError
        An unknown estimator, a non-NumPy ``xp``, malformed shapes.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms._compiled import lm_fit
    >>> yy, xx = np.mgrid[0:11, 0:11]
    >>> win = (100 * np.exp(-((yy - 5.3) ** 2 + (xx - 4.8) ** 2) / 8.0) + 10)[None]
    >>> out = lm_fit(win, np.zeros((1, 2)), np.array([[90.0, 5, 5, 1.8, 8]]))
    >>> np.round(out.params[0, 1:3], 3).tolist(), int(out.status[0])
    ([5.3, 4.8], 0)
    """
    if xp is not None and xp is not np:
        raise ValueError(f"the compiled engine runs on NumPy arrays; got xp={xp!r}")
    mdl = get_model(model)
    if estimator not in _EST_IDS:
        raise ValueError(f"estimator={estimator!r} is not known; accepted: 'mle', 'lsq'")
    lay, islog = _layout(mdl)
    win = np.asarray(windows)
    if win.ndim != 3 or win.shape[1] != win.shape[2]:
        raise ValueError(f"windows must be (M, k, k); got shape {win.shape}")
    if win.dtype not in (np.float32, np.float64):
        win = win.astype(np.float64)
    win = np.ascontiguousarray(win)
    m_total = win.shape[0]
    p = mdl.n_params
    org = np.ascontiguousarray(origins, dtype=np.float64).reshape(m_total, 2)
    ini = np.ascontiguousarray(init, dtype=np.float64).reshape(m_total, p)
    if offset is None:
        off, has_off = np.zeros((1, 1, 1)), False
    else:
        off, has_off = np.ascontiguousarray(offset, dtype=np.float64), True
        if off.shape != win.shape:
            raise ValueError(f"offset must have the windows' shape {win.shape}; got {off.shape}")
    if fixed is None:
        fx, has_fixed = np.zeros((1, p), dtype=bool), False
    else:
        fx, has_fixed = np.ascontiguousarray(fixed, dtype=bool).reshape(m_total, p), True
    params = np.empty((m_total, p))
    errors = np.empty((m_total, p))
    covs = np.empty((m_total, p, p))
    chi2 = np.empty(m_total)
    n_iter = np.empty(m_total, dtype=np.int32)
    status = np.empty(m_total, dtype=np.int8)
    if m_total == 0:
        return LMOutput(params, errors, covs, chi2, n_iter, status)
    kern = _kernels()
    import numba

    threads = numba.get_num_threads()
    # Blocks of fits share scratch arrays; ~16 blocks per thread, handed out one at a time
    # (dynamic scheduling), keep threads busy when some fits take many more iterations.
    block = max(1, min(64, -(-m_total // (16 * threads))))
    with numba.parallel_chunksize(1):
        kern.BATCH[mdl.name, estimator](
            win, off, has_off, fx, has_fixed, org, ini, float(gain), int(max_iter), float(tol),
            _CONSTS, _CODES, lay, islog, block, params, errors, covs, chi2, n_iter, status)
    return LMOutput(params, errors, covs, chi2, n_iter, status)
