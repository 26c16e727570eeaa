"""Maps and histograms of unit cells (matplotlib is imported inside the functions only).

``cell_map`` rasterises any per-cell quantity into an image (each pixel takes the value of the
cell whose centre is nearest, NaN where no cell covers it: NaN here means "no cell", which
is what image viewers show as blank). ``plot_cell_map`` draws the cells as coloured
quadrilaterals, ``plot_bsite_displacement`` the B-site displacement as arrows (polarisation
map) and ``plot_cell_histograms`` the distributions behind the statistics table.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_host
from .stats import CELL_QUANTITIES, calibrate

__all__ = ["QUANTITIES", "cell_map", "cell_values", "plot_bsite_displacement",
           "plot_cell_histograms", "plot_cell_map"]

#: Per-cell quantities by name: (label, unit kind "px", "px2", "deg" or "" for
#: dimensionless), derived from :data:`stemgpu.lattice.stats.CELL_QUANTITIES`.
QUANTITIES = {q.name: (q.label, q.unit) for q in CELL_QUANTITIES}
_BY_NAME = {q.name: q for q in CELL_QUANTITIES}


def cell_values(cells, quantity: str, *, pixel_size: float | None = None):
    """Per-cell values of ``quantity`` and its axis label (calibrated with ``pixel_size``).

    Examples
    --------
    >>> import numpy as np
    >>> import stemgpu
    >>> from stemgpu.lattice.plot import cell_values
    >>> r, c = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    >>> cells = stemgpu.unit_cells(np.stack([r.ravel(), c.ravel()], 1) * 20.0)
    >>> v, label = cell_values(cells, "smallest_side", pixel_size=10.0)
    >>> v.round(1).tolist()[:2], label
    ([200.0, 200.0], 'smallest side (pm)')
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity={quantity!r} is not known; accepted: {sorted(QUANTITIES)}")
    q = _BY_NAME[quantity]
    v = np.asarray(q.values(cells.to_numpy()), dtype=np.float64)
    label = q.label
    if q.unit in ("px", "px2") and pixel_size is not None:
        v = calibrate(v, q.unit, pixel_size)
        label += " (pm)" if q.unit == "px" else " (nm^2)"
    elif q.unit in ("px", "px2"):
        label += " (px)" if q.unit == "px" else " (px^2)"
    return v, label


def cell_map(cells, quantity: str, shape, *, pixel_size: float | None = None) -> np.ndarray:
    """Rasterise a per-cell quantity into an image of ``shape`` (rows, cols), float32.

    Pixels inside a cell (within half the shorter reference side of its centre, nearest
    centre wins) get the cell's value; others are NaN (no cell).

    Examples
    --------
    >>> import numpy as np
    >>> import stemgpu
    >>> from stemgpu.lattice.plot import cell_map
    >>> r, c = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    >>> cells = stemgpu.unit_cells(np.stack([r.ravel(), c.ravel()], 1) * 20.0 + 5)
    >>> m = cell_map(cells, "tetragonal", (70, 70))
    >>> m.shape, bool(np.isnan(m[0, 0])), float(m[30, 30])
    ((70, 70), True, 0.0)
    """
    from scipy.spatial import cKDTree

    v, _ = cell_values(cells, quantity, pixel_size=pixel_size)
    cells = cells.to_numpy()
    h, w = (int(s) for s in shape)
    out = np.full(h * w, np.nan, dtype=np.float32)
    if cells.n_cells == 0:
        return out.reshape(h, w)
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pix = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float64)
    radius = 0.5 * float(np.min(np.linalg.norm(cells.reference, axis=1)))
    dist, idx = cKDTree(np.asarray(cells.centres)).query(pix, k=1, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    out[ok] = v[idx[ok]]
    return out.reshape(h, w)


def plot_cell_map(cells, quantity: str = "tetragonal", *, image=None, ax=None,
                  pixel_size: float | None = None, cmap: str = "RdBu_r", vmax=None):
    """Draw the cells as quadrilaterals coloured by ``quantity`` (over ``image`` if given).

    Parameters
    ----------
    cells : UnitCells
    quantity : str
        A name of :func:`cell_values` (e.g. ``"tetragonal"``, ``"shear"``, ``"area"``).
    image : (H, W) array, optional
        Drawn underneath in grey.
    ax : matplotlib Axes, optional
        Drawn into; a new 6 x 6 in figure otherwise.
    pixel_size : float, optional
        pm per pixel, for calibrated lengths and areas.
    cmap : str
    vmax : float, optional
        Colour limit; default the 98th percentile of ``|value|`` (symmetric for signed
        quantities).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> import stemgpu
    >>> image, truth = stemgpu.simulate_image((160, 160), seed=0)
    >>> cells = stemgpu.unit_cells(truth.image_positions(0), species=truth.species,
    ...                            a_site="Sr", b_site="TiO")
    >>> from stemgpu.lattice.plot import plot_cell_map
    >>> fig = plot_cell_map(cells, "tetragonal", image=image)
    >>> len(fig.axes)  # the map and its colour bar
    2
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    v, label = cell_values(cells, quantity, pixel_size=pixel_size)
    cells = cells.to_numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 6))
    fig = ax.figure
    if image is not None:
        ax.imshow(to_host(image), cmap="gray")
    corners = np.asarray(cells.corners)[..., ::-1]  # (row, col) -> (x, y) = (col, row)
    finite = v[np.isfinite(v)]
    lim = vmax if vmax is not None else (np.percentile(np.abs(finite), 98) if len(finite)
                                         else 1.0)
    diverging = quantity in ("tetragonal", "shear", "rotation_deg", "angle_deviation_deg") \
        or quantity.startswith("strain_")
    coll = PolyCollection(corners, array=v, cmap=cmap, edgecolors="none",
                          clim=(-lim, lim) if diverging else None)
    ax.add_collection(coll)
    if image is None:
        ax.autoscale_view()
        ax.invert_yaxis()
        ax.set_aspect("equal")
    fig.colorbar(coll, ax=ax, label=label)
    return fig


def plot_bsite_displacement(cells, *, image=None, ax=None, scale: float = 10.0,
                            pixel_size: float | None = None):
    """Arrows from each cell centre along the B-site displacement, magnified ``scale`` times.

    Parameters
    ----------
    cells : UnitCells
        With B sites assigned (``unit_cells(..., b_site=...)``).
    image : (H, W) array, optional
    ax : matplotlib Axes, optional
    scale : float
        Arrow magnification (displacements are a few pm in cells of hundreds).
    pixel_size : float, optional
        pm per pixel: colours in pm instead of px.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> import stemgpu
    >>> image, truth = stemgpu.simulate_image((160, 160), seed=0)
    >>> cells = stemgpu.unit_cells(truth.image_positions(0), species=truth.species,
    ...                            a_site="Sr", b_site="TiO")
    >>> from stemgpu.lattice.plot import plot_bsite_displacement
    >>> fig = plot_bsite_displacement(cells, scale=20, pixel_size=14.6)
    >>> fig.axes[-1].get_ylabel()
    'B-site displacement (pm)'
    """
    import matplotlib.pyplot as plt

    cells = cells.to_numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 6))
    fig = ax.figure
    if image is not None:
        ax.imshow(to_host(image), cmap="gray")
    ok = np.asarray(cells.bsite_index) >= 0
    c = np.asarray(cells.centres)[ok]
    d = np.asarray(cells.bsite_displacement)[ok]
    mag = np.linalg.norm(d, axis=1) * (pixel_size or 1.0)
    q = ax.quiver(c[:, 1], c[:, 0], d[:, 1] * scale, d[:, 0] * scale, mag, angles="xy",
                  scale_units="xy", scale=1.0, cmap="viridis")
    fig.colorbar(q, ax=ax, label="B-site displacement " + ("(pm)" if pixel_size else "(px)"))
    if image is None:
        ax.invert_yaxis()
        ax.set_aspect("equal")
    return fig


def plot_cell_histograms(cells, *, pixel_size: float, bins: int = 40):
    """Histograms of the quantities of the statistics table, medians marked.

    Parameters
    ----------
    cells : UnitCells
    pixel_size : float
        pm per pixel.
    bins : int

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> import stemgpu
    >>> image, truth = stemgpu.simulate_image((160, 160), seed=0)
    >>> cells = stemgpu.unit_cells(truth.image_positions(0), species=truth.species,
    ...                            a_site="Sr", b_site="TiO")
    >>> from stemgpu.lattice.plot import plot_cell_histograms
    >>> fig = plot_cell_histograms(cells, pixel_size=14.6)
    >>> sum(ax.get_visible() for ax in fig.axes)  # six quantities and the B-site distance
    7
    """
    import matplotlib.pyplot as plt

    names = ["smallest_side", "longest_side", "angle_deviation_deg", "area", "tetragonal",
             "shear"]
    if np.any(cells.to_numpy().bsite_index >= 0):
        names.append("bsite_distance")
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, name in zip(axes.ravel(), names, strict=False):
        v, label = cell_values(cells, name, pixel_size=pixel_size)
        v = v[np.isfinite(v)]
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        if hi - lo <= 1e-9 * max(abs(lo), 1.0):  # identical values: widen for one bar
            lo, hi = lo - 1e-6 * max(abs(lo), 1.0), hi + 1e-6 * max(abs(hi), 1.0)
        ax.hist(v, bins=bins, range=(lo, hi), color="0.6")
        med = np.median(v)
        ax.axvline(med, color="C3", label=f"median {med:.4g}")
        ax.set_xlabel(label)
        ax.legend(fontsize="small")
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
