"""Compiled CPU path of the demons inner loop: bilinear warps, composition, force, smoothing.

On the NumPy backend :mod:`stemgpu.registration._warp` and :mod:`~stemgpu.registration.demons`
hand their per-iteration steps to the numba kernels of ``_compiled_warp_kernels`` (threads
over image rows, one read and one write of each array per step); the array (``xp``) code
stays the path for CuPy and the reference the kernels are tested against
(``tests/test_warp_compiled.py``: equal to float32 rounding, 1e-5 relative).

numba is imported on the first call (or by :func:`available`), never at ``import stemgpu``;
the kernels are cached on disk (``cache=True``), so only the first run on a machine pays the
JIT (~10 s on a 2-core CPU). When numba cannot be imported or the kernels fail to build,
:func:`available` says why and callers use the array path. ``ENABLED = False`` (module
attribute) forces the array path, for comparisons.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

__all__ = ["ENABLED", "available", "bilinear", "compose", "demons_force", "gaussian",
           "gaussian_weights", "usable", "warp_metric"]

#: Set to False to route every call to the array path (tests compare the two).
ENABLED = True
#: numba's "workqueue" threading layer (used where OpenMP and TBB are missing) aborts the
#: process when two threads launch parallel kernels at once: launches are serialised (each
#: kernel already uses every core).
_LOCK = threading.Lock()
#: Rows per thread task of the smoothing kernel (enough to amortise the row buffer).
_BLOCK = 16


def _kernels():
    from . import _compiled_warp_kernels

    return _compiled_warp_kernels


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """Whether the compiled kernels run here (``(True, "numba <version>")``) or why not.

    Compiles (or loads from numba's cache) the float32 kernels on a tiny problem and checks
    one bilinear sample; the answer is cached for the process.
    """
    try:
        import numba
    except Exception as exc:  # ImportError, or a broken install (llvmlite mismatch)
        return False, f"numba cannot be imported: {type(exc).__name__}: {exc}"
    try:
        img = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        disp = np.full((1, 2, 4, 4), 0.5, dtype=np.float32)
        out = bilinear(img, disp)
        if abs(float(out[0, 0, 0, 0]) - 2.5) > 1e-6:
            return False, "compiled warp self-test failed"
        gaussian(img[0], (1.0, 1.0))
        compose(disp, disp)
        warp_metric(img[0], disp, img[0, 0])
        demons_force(img[0], img[0, 0], disp[0], np.ones(1, dtype=bool), 1.0, True)
    except Exception as exc:
        return False, f"compiled warp kernels failed to build: {type(exc).__name__}: {exc}"
    return True, f"numba {numba.__version__}"


def usable(be, *arrays) -> bool:
    """True when the compiled path serves these arrays: NumPy backend, one float dtype
    (float32 or float64), numba working and :data:`ENABLED`. Without arrays: whether the
    backend gets the compiled path at all."""
    if not ENABLED or be.is_gpu:
        return False
    if arrays:
        dt = arrays[0].dtype
        if dt not in (np.float32, np.float64) or any(a.dtype != dt for a in arrays):
            return False
    return available()[0]


def _planes(array):
    """A C-contiguous array (..., H, W) as (P, H, W) planes (a view when it already is)."""
    a = np.ascontiguousarray(array)
    return a.reshape(-1, *a.shape[-2:])


def bilinear(channels, disp):
    """(C, B, H, W) ``channels`` sampled at ``x + disp(x)`` (see ``_warp.bilinear``)."""
    c, b, h, w = channels.shape
    out = np.empty(channels.shape, dtype=channels.dtype)
    with _LOCK:
        _kernels().bilinear(_planes(channels), c, _planes(disp), out.reshape(c * b, h, w))
    return out


def warp_metric(moving, disp, fixed):
    """Warped (B, H, W) and the mean squared difference (B,) float32 against (H, W)."""
    b, h, w = moving.shape
    out = np.empty(moving.shape, dtype=moving.dtype)
    rowsum = np.empty(b * h)
    with _LOCK:
        _kernels().warp_metric(np.ascontiguousarray(moving), _planes(disp),
                               np.ascontiguousarray(fixed), out, rowsum)
    return out, (rowsum.reshape(b, h).sum(axis=1) / (h * w)).astype(np.float32)


def demons_force(warped, fixed, grad_fixed, active, alpha2, symmetric):
    """Update (B, 2, H, W) and its RMS length (B,) float32 (see ``demons._force_update``)."""
    b, h, w = warped.shape
    u = np.empty((b, 2, h, w), dtype=warped.dtype)
    rowsum = np.empty(b * h)
    with _LOCK:
        _kernels().demons_force(np.ascontiguousarray(warped), np.ascontiguousarray(fixed),
                                np.ascontiguousarray(grad_fixed), np.ascontiguousarray(active),
                                float(alpha2), bool(symmetric), u.reshape(2 * b, h, w), rowsum)
    return u, np.sqrt(rowsum.reshape(b, h).sum(axis=1) / (h * w)).astype(np.float32)


def compose(field, update):
    """``update + field(x + update)`` for (B, 2, H, W) fields (see ``_warp.compose``)."""
    out = np.empty(field.shape, dtype=field.dtype)
    with _LOCK:
        _kernels().compose(_planes(field), _planes(update), _planes(out))
    return out


@functools.lru_cache(maxsize=64)
def gaussian_weights(sigma, truncate):
    """Normalised 1-D Gaussian taps of ``scipy.ndimage.gaussian_filter`` (radius
    ``int(truncate * sigma + 0.5)``); a single 1 for ``sigma <= 1e-15``, the widths scipy
    leaves unfiltered (its square would underflow)."""
    if sigma <= 1e-15:
        return np.ones(1)
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x * x)
    return phi / phi.sum()


def gaussian(array, sigma, truncate=3.0):
    """Gaussian smoothing of (..., H, W) over the last two axes, edges replicated, in the
    array's dtype (the taps of ``scipy.ndimage.gaussian_filter``; see ``_warp.smooth``)."""
    h, w = array.shape[-2:]
    src = np.ascontiguousarray(array).reshape(-1, h, w)
    dt = src.dtype
    wr = gaussian_weights(float(sigma[0]), float(truncate)).astype(dt)
    wc = gaussian_weights(float(sigma[1]), float(truncate)).astype(dt)
    out = np.empty_like(src)
    with _LOCK:
        _kernels().gaussian(src, wr, wc, out, _BLOCK)
    return out.reshape(array.shape)

