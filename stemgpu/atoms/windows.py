"""Window extraction and model rendering for batched atom fitting.

The one window gather (:func:`extract_windows`), window placement (:func:`window_origins`),
default window size and peak-rendering radius used by :mod:`.fit`, :mod:`.crlb`, the tests
and the benchmarks. The k x k pixel grid itself is :func:`stemgpu.atoms.models.window_grid`.
"""

from __future__ import annotations

import math

from .models import INVALID_INPUT, OUT_OF_BOUNDS, window_grid

__all__ = ["default_window", "extract_windows", "render_peaks", "render_radius",
           "window_origins"]


def default_window(sigma: float) -> int:
    """Odd window size covering +-2.5 sigma of a column (at least 5 px).

    Examples
    --------
    >>> from stemgpu.atoms.windows import default_window
    >>> default_window(3.4)
    19
    """
    return max(5, 2 * math.ceil(2.5 * float(sigma)) + 1)


def render_radius(k: int, sigma_max: float) -> int:
    """Half-size of the patch each neighbouring peak is rendered on: +-4 of the widest width,
    at least half the window (so a neighbour's flank reaches every pixel of a window).

    Examples
    --------
    >>> from stemgpu.atoms.windows import render_radius
    >>> render_radius(19, 3.4), render_radius(19, 1.0)
    (14, 9)
    """
    return int(max(k // 2, math.ceil(4.0 * float(sigma_max))))


def window_origins(positions, k, shape, xp):
    """Integer origins (M, 2) of k x k windows centred on ``positions`` and a status array.

    Status is -1 where the window fits inside an image of ``shape`` (rows, cols),
    INVALID_INPUT for non-finite positions, OUT_OF_BOUNDS for positions outside the image or
    whose window would cross the image edge (those origins are clipped so gathers stay legal).
    """
    h, w = shape
    finite = xp.isfinite(positions).all(axis=1)
    safe = xp.where(finite[:, None], positions, 0.0)
    origins = xp.rint(safe).astype(xp.int64) - k // 2
    inside = (safe[:, 0] >= -0.5) & (safe[:, 0] <= h - 0.5) & (safe[:, 1] >= -0.5) & (
        safe[:, 1] <= w - 0.5)
    fits = (origins[:, 0] >= 0) & (origins[:, 1] >= 0) & (origins[:, 0] + k <= h) & (
        origins[:, 1] + k <= w)
    status = xp.full(positions.shape[0], -1, dtype=xp.int8)
    status = xp.where(~(inside & fits), OUT_OF_BOUNDS, status)
    status = xp.where(~finite, INVALID_INPUT, status).astype(xp.int8)
    origins[:, 0] = xp.clip(origins[:, 0], 0, max(h - k, 0))
    origins[:, 1] = xp.clip(origins[:, 1], 0, max(w - k, 0))
    return origins, status


def extract_windows(stack, frames, origins, k, xp):
    """Gather (M, k, k) windows from ``stack`` (F, H, W) at frame indices and origins.

    ``frames`` (M,) and integer ``origins`` (M, 2) (each window's ``[0, 0]`` pixel) must keep
    the windows inside the stack (see :func:`window_origins`).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.windows import extract_windows
    >>> stack = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    >>> extract_windows(stack, np.array([1]), np.array([[1, 2]]), 2, np)[0].tolist()
    [[22, 23], [26, 27]]
    """
    d = xp.arange(k)
    rows = origins[:, 0, None, None] + d[None, :, None]
    cols = origins[:, 1, None, None] + d[None, None, :]
    return stack[frames[:, None, None], rows, cols]


def render_peaks(model, natural, frames, shape, radius, xp, chunk=1024):
    """Sum of the models' peaks (background excluded) over a (F, H, W) image, float64.

    Each peak is evaluated on a (2 radius + 1)^2 patch around its rounded position and
    scatter-added with ``bincount`` (no loop over atoms). The peaks are taken in raster
    order, so each chunk of ``chunk`` peaks covers a band of rows and is scattered into that
    band only (memory and cache traffic of the band, not of the whole stack per chunk). Rows
    of ``natural`` with non-finite values are skipped.
    """
    f_n, h, w = shape
    out = xp.zeros(f_n * h * w, dtype=xp.float64)
    good = xp.isfinite(natural).all(axis=1)
    nat = natural[good].astype(xp.float64)
    frm = frames[good].astype(xp.int64)
    size = 2 * radius + 1
    if nat.shape[0] == 0:
        return out.reshape(f_n, h, w)
    yy, xx = window_grid(size, xp)
    d = xp.arange(size, dtype=xp.int64)
    patch = (d[:, None] * w + d[None, :]).ravel()  # flat offsets of the patch in a frame
    org_all = xp.rint(nat[:, list(model.position)]) - radius
    o_all = org_all.astype(xp.int64)
    base_all = frm * (h * w) + o_all[:, 0] * w + o_all[:, 1]
    order = xp.argsort(base_all)
    for s in range(0, nat.shape[0], chunk):
        sel = order[s:s + chunk]
        p, org, o, base = nat[sel], org_all[sel], o_all[sel], base_all[sel]
        t = model.to_internal(p, org, 1.0, xp)
        t[:, model.background] = 0.0
        val = model.value_on_grid(t, size, xp)  # separable where the model is
        # Patches wholly inside the frame need no per-pixel bounds test (most of them).
        inside = (o[:, 0] >= 0) & (o[:, 0] + size <= h) & (o[:, 1] >= 0) & (o[:, 1] + size <= w)
        parts_i = [(base[inside, None] + patch[None, :]).ravel()]
        parts_w = [val[inside].ravel()]
        edge = ~inside
        if bool(edge.any()):
            rows = o[edge, 0:1] + yy.astype(xp.int64)[None, :]
            cols = o[edge, 1:2] + xx.astype(xp.int64)[None, :]
            ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
            idx = frm[sel][edge, None] * (h * w) + rows * w + cols
            parts_i.append(idx[ok])
            parts_w.append(val[edge][ok])
        idx = parts_i[0] if len(parts_i) == 1 else xp.concatenate(parts_i)
        wts = parts_w[0] if len(parts_w) == 1 else xp.concatenate(parts_w)
        if int(idx.size) == 0:
            continue
        lo, hi = int(idx.min()), int(idx.max()) + 1  # the chunk's band of the stack
        out[lo:hi] += xp.bincount(idx - lo, weights=wts, minlength=hi - lo)
    return out.reshape(f_n, h, w)
