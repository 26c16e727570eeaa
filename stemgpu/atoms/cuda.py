"""The fused CUDA Levenberg-Marquardt kernel (CuPy ``RawModule``), one thread per fit.

The kernel (``kernels/lm_fit.cu`` and its headers) reproduces the algorithm specified in
:mod:`stemgpu.atoms.lm` step for step, reading each window straight from the image on the
device (no (N, k, k) copy) and returning the same :class:`~stemgpu.atoms.lm.LMOutput`
(natural parameters, errors, covariance, objective, iterations, status codes of
:mod:`stemgpu.atoms.models`). Compile options and kernel names come from
:mod:`stemgpu.kernel_sources`, the same definitions the CI NVRTC test compiles.

CuPy is only reached through :func:`stemgpu.backend.resolve_backend`; importing this module
does not import CuPy.
"""

from __future__ import annotations

import functools

import numpy as np

from ..backend import resolve_backend
from ..kernel_sources import _sources_digest, kernel_name, nvrtc_options, read_source
from .lm import LMOutput
from .models import get_model

__all__ = ["get_module", "lm_fit_kernel"]

#: Threads per block (one fit per thread; any multiple of 32 works).
BLOCK = 128


@functools.cache
def _module_for(device_id: int, name: str):
    be = resolve_backend("cupy")
    cp = be.xp
    with cp.cuda.Device(device_id):
        # CuPy's kernel cache keys on the code string, not on the included headers: a digest
        # of all sources in a trailing comment makes header edits recompile. One module per
        # specialisation: a process compiles only what it launches (CuPy 13 does not reuse
        # its disk cache for modules built with name expressions).
        code = read_source() + f"\n// stemgpu kernel sources {_sources_digest()}\n"
        mod = cp.RawModule(code=code, options=nvrtc_options(), name_expressions=(name,))
        mod.compile()
    return mod


def get_module(model: str = "gaussian", estimator: str = "mle", image_dtype: str = "float32",
               compute_dtype: str = "float64"):
    """The compiled ``RawModule`` of one kernel specialisation for the current CUDA device.

    Compiled on first use, once per device and specialisation (see
    :func:`stemgpu.kernel_sources.kernel_name` for the accepted combinations); call it ahead
    of a timed or synchronisation-checked launch to keep the compilation out of it.
    """
    cp = resolve_backend("cupy").xp
    name = kernel_name(get_model(model).name, estimator, image_dtype, compute_dtype)
    return _module_for(cp.cuda.Device().id, name)


def lm_fit_kernel(image_or_stack, frame_index, origins, init, *, window, model="gaussian",
                  estimator="mle", max_iter=50, tol=1e-7, gain=1.0, offset=None,
                  compute_dtype="float64") -> LMOutput:
    """Fit one model per window on the GPU with the fused LM kernel.

    Parameters
    ----------
    image_or_stack : (H, W) or (F, H, W) cupy.ndarray
        Image data (float32 or float64; other dtypes are converted to float32 on the device).
    frame_index : (M,) int array or int
        Frame of each fit (0 for a single image).
    origins : (M, 2) int array
        Image (row, col) of each window's ``[0, 0]`` pixel. Windows not fully inside the
        image get status OUT_OF_BOUNDS (parameters = ``init``, infinite errors).
    init : (M, P) array
        Natural initial parameters (model order, image coordinates).
    window : int
        Window side k (px).
    model : str
        Registered model name (``"gaussian"``, ``"elliptical"``).
    estimator : {"mle", "lsq"}
    max_iter : int
    tol : float
    gain : float
        Counts per data unit.
    offset : (M, k, k) array, optional
        Known additive model part in data units (fitted neighbouring columns).
    compute_dtype : {"float64", "float32"}
        Arithmetic of the per-pixel Jacobian passes. ``"float64"`` (default) follows the
        :mod:`stemgpu.atoms.lm` spec exactly; ``"float32"`` keeps the objective, sums and
        solves in float64 and agrees to ~1e-5 px on well-posed fits (float32 images only).

    Returns
    -------
    LMOutput
        CuPy arrays, as :func:`stemgpu.atoms.lm.lm_fit`.

    Raises
    ------
    ValueError
        For unknown models / estimators / dtypes or inconsistent shapes.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.backend import available_backends
    >>> if available_backends()["cupy"] == "available":  # doctest: +SKIP
    ...     import cupy as cp
    ...     from stemgpu.atoms.cuda import lm_fit_kernel
    ...     yy, xx = np.mgrid[0:11, 0:11]
    ...     img = cp.asarray(100 * np.exp(-((yy - 5.3) ** 2 + (xx - 4.8) ** 2) / 8.0) + 10)
    ...     out = lm_fit_kernel(img, 0, cp.zeros((1, 2), dtype=cp.int32),
    ...                         cp.asarray([[90.0, 5, 5, 1.8, 8]]), window=11)
    ...     print(np.round(cp.asnumpy(out.params[0, 1:3]), 3).tolist())
    [5.3, 4.8]
    """
    be = resolve_backend("cupy")
    cp = be.xp
    mdl = get_model(model)
    if estimator not in ("mle", "lsq"):
        raise ValueError(f"estimator={estimator!r} is not known; accepted: 'mle', 'lsq'")
    if compute_dtype not in ("float32", "float64"):
        raise ValueError(f"compute_dtype={compute_dtype!r} is not accepted; use 'float32' or "
                         "'float64'")
    stack = cp.asarray(image_or_stack)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"image_or_stack must be 2-D or 3-D; got shape {stack.shape}")
    if stack.dtype not in (cp.float32, cp.float64):
        stack = stack.astype(cp.float32)
    stack = cp.ascontiguousarray(stack)
    image_dtype = np.dtype(stack.dtype).name
    if image_dtype == "float64":
        compute_dtype = "float64"
    k = int(window)
    if k < 1:
        raise ValueError(f"window must be a positive number of pixels; got {window!r}")
    p = mdl.n_params
    init = cp.ascontiguousarray(cp.asarray(init, dtype=cp.float64))
    if init.ndim != 2 or init.shape[1] != p:
        raise ValueError(f"init must have shape (M, {p}) for model {mdl.name!r}; got "
                         f"{init.shape}")
    m = init.shape[0]
    fi = cp.ascontiguousarray(cp.broadcast_to(cp.asarray(frame_index, dtype=cp.int32), (m,)))
    org = cp.ascontiguousarray(cp.asarray(origins).astype(cp.int32, copy=False))
    if org.shape != (m, 2):
        raise ValueError(f"origins must have shape ({m}, 2); got {org.shape}")
    off = None
    if offset is not None:
        off = cp.ascontiguousarray(cp.asarray(offset, dtype=compute_dtype))
        if off.shape != (m, k, k):
            raise ValueError(f"offset must have shape ({m}, {k}, {k}); got {off.shape}")
    params = cp.empty((m, p), dtype=cp.float64)
    errors = cp.empty((m, p), dtype=cp.float64)
    cov = cp.empty((m, p, p), dtype=cp.float64)
    chi2 = cp.empty(m, dtype=cp.float64)
    n_iter = cp.empty(m, dtype=cp.int32)
    status = cp.empty(m, dtype=cp.int8)
    if m == 0:
        return LMOutput(params, errors, cov, chi2, n_iter, status)
    name = kernel_name(mdl.name, estimator, image_dtype, compute_dtype)
    kern = get_module(mdl.name, estimator, image_dtype, compute_dtype).get_function(name)
    f_n, h, w = stack.shape
    grid = ((m + BLOCK - 1) // BLOCK,)
    kern(grid, (BLOCK,), (
        stack, np.int32(f_n), np.int32(h), np.int32(w), fi, org, init, np.int64(m),
        np.int32(k), np.float64(gain), np.int32(max_iter), np.float64(tol),
        off if off is not None else np.uintp(0), params, errors, cov, chi2, n_iter, status))
    return LMOutput(params, errors, cov, chi2, n_iter, status)
