"""numba kernels of the compiled demons path (NumPy backend): bilinear warps, field
composition, the demons force and separable Gaussian smoothing, threads over image rows.

Imported only by :mod:`stemgpu.registration._compiled_warp` (numba's import costs ~0.45 s,
which ``import stemgpu`` must not pay). Each kernel reads its inputs once and writes its
output once (the array path makes several full-size temporaries per step); the arithmetic is
that of :mod:`stemgpu.registration._warp` in the same order, so the two agree to float32
rounding. Sample coordinates are clamped to the frame (``mode="nearest"``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# No exceptions raised inside threads (NumPy's error model). fastmath: every value here is
# finite (callers check frames, references and fields; forces are guarded against division
# by zero), so the no-NaN/inf assumptions hold, and reassociation only changes float32
# rounding (tests/test_warp_compiled.py); it makes the clamped gathers ~1.8x faster.
_JIT = {"cache": True, "fastmath": True, "nogil": True, "error_model": "numpy"}


@njit(inline="always", **_JIT)
def _sample(img, p, r, c, h, w):
    """Bilinear sample of plane ``p`` of the (P, H, W) ``img`` at (r, c), clamped."""
    r = min(max(r, 0.0), h - 1)
    c = min(max(c, 0.0), w - 1)
    r0 = int(r)  # r >= 0: truncation is the floor
    c0 = int(c)
    fr = r - r0
    fc = c - c0
    r1 = min(r0 + 1, h - 1)
    c1 = min(c0 + 1, w - 1)
    a = img[p, r0, c0]
    top = a + fc * (img[p, r0, c1] - a)
    a = img[p, r1, c0]
    bot = a + fc * (img[p, r1, c1] - a)
    return top + fr * (bot - top)


@njit(parallel=True, **_JIT)
def bilinear(src, nc, disp, out):
    """``out[k * B + b](x) = src[k * B + b](x + d_b(x))``: (C * B, H, W) ``src``/``out``,
    ``disp`` (2 B, H, W) with plane ``2 b`` the row and ``2 b + 1`` the col component."""
    _, h, w = src.shape
    nb = disp.shape[0] // 2
    for row in prange(nb * h):
        b = row // h
        i = row % h
        fi = disp.dtype.type(i)
        for j in range(w):
            r = fi + disp[2 * b, i, j]
            c = disp.dtype.type(j) + disp[2 * b + 1, i, j]
            for k in range(nc):
                out[k * nb + b, i, j] = _sample(src, k * nb + b, r, c, h, w)


@njit(parallel=True, **_JIT)
def warp_metric(moving, disp, fixed, out, rowsum):
    """Warp (B, H, W) ``moving`` by ``disp`` (2 B, H, W) into ``out`` and sum
    ``(out - fixed)**2`` per row into ``rowsum`` (B * H,) float64 (``fixed`` is (H, W))."""
    nb, h, w = moving.shape
    for row in prange(nb * h):
        b = row // h
        i = row % h
        fi = disp.dtype.type(i)
        acc = 0.0
        for j in range(w):
            r = fi + disp[2 * b, i, j]
            c = disp.dtype.type(j) + disp[2 * b + 1, i, j]
            v = _sample(moving, b, r, c, h, w)
            out[b, i, j] = v
            d = v - fixed[i, j]
            acc += d * d
        rowsum[row] = acc


@njit(parallel=True, **_JIT)
def demons_force(warped, fixed, grad_fixed, active, alpha2, symmetric, u, rowsum):
    """Demons update (2 B, H, W) into ``u`` and the per-row sums of ``|u|**2``.

    ``grad_fixed`` is (2, H, W); with ``symmetric`` the gradient is the mean of it and the
    central-difference gradient of ``warped`` (one-sided at the edges, as numpy.gradient).
    Frames with ``active[b] == 0`` get a zero update.
    """
    nb, h, w = warped.shape
    half = warped.dtype.type(0.5)
    zero = warped.dtype.type(0.0)
    a2 = warped.dtype.type(alpha2)
    for row in prange(nb * h):
        b = row // h
        i = row % h
        on = active[b]
        up = min(i + 1, h - 1)
        dn = max(i - 1, 0)
        rscale = half if (up - dn) == 2 else warped.dtype.type(1.0)
        acc = 0.0
        for j in range(w):
            d = warped[b, i, j] - fixed[i, j]
            gr = grad_fixed[0, i, j]
            gc = grad_fixed[1, i, j]
            if symmetric:
                wr = (warped[b, up, j] - warped[b, dn, j]) * rscale if h > 1 else zero
                if w == 1:
                    wc = zero
                elif j == 0:
                    wc = warped[b, i, 1] - warped[b, i, 0]
                elif j == w - 1:
                    wc = warped[b, i, w - 1] - warped[b, i, w - 2]
                else:
                    wc = (warped[b, i, j + 1] - warped[b, i, j - 1]) * half
                gr = (wr + gr) * half
                gc = (wc + gc) * half
            denom = gr * gr + gc * gc + a2 * d * d
            s = -d / denom if (denom > 1e-9 and on) else zero
            ur = gr * s
            uc = gc * s
            u[2 * b, i, j] = ur
            u[2 * b + 1, i, j] = uc
            acc += ur * ur + uc * uc
        rowsum[row] = acc


@njit(parallel=True, **_JIT)
def compose(field, update, out):
    """``out = update + field(x + update(x))`` for (2 B, H, W) fields (planes row, col)."""
    n2, h, w = field.shape
    for row in prange((n2 // 2) * h):
        b = row // h
        i = row % h
        fi = field.dtype.type(i)
        for j in range(w):
            ur = update[2 * b, i, j]
            uc = update[2 * b + 1, i, j]
            r = fi + ur
            c = field.dtype.type(j) + uc
            out[2 * b, i, j] = ur + _sample(field, 2 * b, r, c, h, w)
            out[2 * b + 1, i, j] = uc + _sample(field, 2 * b + 1, r, c, h, w)


@njit(parallel=True, **_JIT)
def gaussian(src, wr, wc, out, block):
    """Separable correlation of (N, H, W) ``src`` with the symmetric taps ``wr`` along rows
    (axis 1) then ``wc`` along columns (axis 2), edges replicated (``mode="nearest"``).

    One pass over memory: each output row is the column-direction sum of ``len(wr)`` input
    rows (cache-resident as the window slides), then filtered along the row in a padded
    buffer; mirrored taps share one multiply. Threads take blocks of ``block`` rows. (Whole-
    row array expressions: numba vectorises them better than explicit loops here.)
    """
    n, h, w = src.shape
    rr = (wr.shape[0] - 1) // 2
    rc = (wc.shape[0] - 1) // 2
    nblk = (h + block - 1) // block
    for task in prange(n * nblk):
        p = task // nblk
        i0 = (task % nblk) * block
        buf = np.empty(w + 2 * rc, dtype=out.dtype)
        for i in range(i0, min(h, i0 + block)):
            acc = buf[rc:rc + w]
            acc[:] = wr[rr] * src[p, i]
            for k in range(1, rr + 1):
                acc += wr[rr + k] * (src[p, max(i - k, 0)] + src[p, min(i + k, h - 1)])
            buf[:rc] = buf[rc]
            buf[rc + w:] = buf[rc + w - 1]
            row = out[p, i]
            row[:] = wc[rc] * acc
            for k in range(1, rc + 1):
                row += wc[rc + k] * (buf[rc - k:rc - k + w] + buf[rc + k:rc + k + w])
