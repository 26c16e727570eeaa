"""Window extraction and model rendering for batched atom fitting (private helpers)."""

from __future__ import annotations

import math

from .models import INVALID_INPUT, OUT_OF_BOUNDS

__all__ = ["default_window", "extract_windows", "render_peaks", "window_origins"]


def default_window(sigma: float) -> int:
    """Odd window size covering +-2.5 sigma of a column (at least 5 px)."""
    return max(5, 2 * math.ceil(2.5 * float(sigma)) + 1)


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
    """Gather (M, k, k) windows from ``stack`` (F, H, W) at frame indices and origins."""
    d = xp.arange(k)
    rows = origins[:, 0, None, None] + d[None, :, None]
    cols = origins[:, 1, None, None] + d[None, None, :]
    return stack[frames[:, None, None], rows, cols]


def render_peaks(model, natural, frames, shape, radius, xp, chunk=4096):
    """Sum of the models' peaks (background excluded) over a (F, H, W) image, float64.

    Each peak is evaluated on a (2 radius + 1)^2 patch around its rounded position and
    scatter-added with ``bincount`` (no loop over atoms; chunks bound memory). Rows of
    ``natural`` with non-finite values are skipped.
    """
    f_n, h, w = shape
    out = xp.zeros(f_n * h * w, dtype=xp.float64)
    good = xp.isfinite(natural).all(axis=1)
    nat = natural[good]
    frm = frames[good]
    size = 2 * radius + 1
    d = xp.arange(size, dtype=xp.float64)
    yy, xx = (g.ravel() for g in xp.meshgrid(d, d, indexing="ij"))
    for s in range(0, nat.shape[0], chunk):
        p = nat[s:s + chunk].astype(xp.float64)
        org = xp.rint(p[:, list(model.position)]) - radius
        t = model.to_internal(p, org, 1.0, xp)
        t[:, model.background] = 0.0
        val = model.value(t, yy, xx, xp)
        rows = org[:, 0:1].astype(xp.int64) + yy.astype(xp.int64)[None, :]
        cols = org[:, 1:2].astype(xp.int64) + xx.astype(xp.int64)[None, :]
        ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        idx = frm[s:s + chunk, None].astype(xp.int64) * (h * w) + rows * w + cols
        out += xp.bincount(idx[ok], weights=val[ok], minlength=f_n * h * w)
    return out.reshape(f_n, h, w)
