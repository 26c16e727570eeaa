"""Cramér-Rao lower bound for column parameters under Poisson noise."""

from __future__ import annotations

import numpy as np

from .._checks import check_choice
from ..backend import resolve_backend
from .lm import inverse_spd
from .models import get_model, window_grid
from .windows import default_window, extract_windows, render_peaks, render_radius, window_origins

__all__ = ["crlb"]


def crlb(params, *, model="gaussian", window=None, counts_per_unit=1.0, image_shape=None,
         neighbours="include", backend=None):
    """Cramér-Rao lower bound (one sigma) on every parameter of every column.

    The bound is for the same model, pixel grid (k x k window centred on the rounded
    position, pixel-centre sampling) and dose that :func:`stemgpu.fit_atoms` uses:
    ``sqrt(diag(I^-1))`` with the Poisson Fisher information
    ``I = sum_pixels (d mu / d theta)(d mu / d theta)^T / mu`` in counts.

    Parameters
    ----------
    params : (N, P) array
        True natural parameters (model order; amplitude and background in data units).
    model : {"gaussian", "elliptical"}
    window : int, optional
        Odd window size; default from the median width as in :func:`stemgpu.fit_atoms`.
    counts_per_unit : float
        Counts per data unit (1 for data in counts).
    image_shape : (rows, cols), optional
        Needed for ``neighbours="include"`` (the extent of the rendered neighbours).
    neighbours : {"include", "none"}
        ``"include"``: the other columns in ``params`` add to each window's expected counts
        (known, not estimated: the bound of a fit with neighbours subtracted).
    backend : str, optional

    Returns
    -------
    (N, P) array of one-sigma bounds, in natural units (px for positions).

    Raises
    ------
    ValueError
        Malformed ``params``, a non-positive ``counts_per_unit``, an unknown ``neighbours``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.crlb import crlb
    >>> b = crlb(np.array([[200.0, 20.0, 20.0, 3.4, 10.0]]), neighbours="none")
    >>> round(float(b[0, 1]), 3)
    0.034
    """
    mdl = get_model(model)
    be = resolve_backend(backend, params)
    xp = be.xp
    p = xp.asarray(params, dtype=xp.float64)
    if p.ndim != 2 or p.shape[1] != mdl.n_params or p.shape[0] == 0:
        raise ValueError(
            f"params must have shape (N, {mdl.n_params}) for model {mdl.name!r} with N >= 1; "
            f"got {tuple(p.shape)}"
        )
    if not (np.isfinite(counts_per_unit) and counts_per_unit > 0):
        raise ValueError(f"counts_per_unit must be a positive number; got {counts_per_unit!r}")
    check_choice(neighbours, "neighbours", ("include", "none"))
    widths = p[:, list(mdl.widths)]
    k = default_window(float(xp.median(widths))) if window is None else int(window)
    pos = p[:, list(mdl.position)]
    origins = xp.rint(pos).astype(xp.int64) - k // 2
    offset = None
    if neighbours == "include":
        if image_shape is None:
            raise ValueError("neighbours='include' needs image_shape=(rows, cols)")
        h, w = (int(s) for s in image_shape)
        origins, _ = window_origins(pos, k, (h, w), xp)
        frames = xp.zeros(p.shape[0], dtype=xp.int64)
        radius = render_radius(k, float(widths.max()))
        full = render_peaks(mdl, p, frames, (1, h, w), radius, xp)
        offset = extract_windows(full, frames, origins, k, xp).reshape(-1, k * k)
    org = origins.astype(xp.float64)
    gain = float(counts_per_unit)
    t = mdl.to_internal(p, org, gain, xp)
    yy, xx = window_grid(k, xp)
    mu, jac = mdl.value_and_jacobian(t, yy, xx, xp)
    if offset is not None:
        t0 = t.copy()
        t0[:, mdl.background] = 0.0
        mu = mu + offset * gain - mdl.value(t0, yy, xx, xp)  # others only: own peak is in mu
    fisher = xp.einsum("mnp,mnq->mpq", jac, jac / mu[:, :, None])
    inv, ok = inverse_spd(fisher, xp)
    tr = mdl.natural_derivative(t, gain, xp)
    var = xp.diagonal(inv, axis1=1, axis2=2) * tr * tr
    return xp.where(ok[:, None], xp.sqrt(var), xp.inf)
