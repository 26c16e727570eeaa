"""Frame-by-frame lattice statistics: unit cells in every frame of a tracked stack.

:func:`frame_series` measures the unit cells of each frame from per-frame column positions
(:func:`stemgpu.track_columns`), giving time series of the lattice parameter, area, strain
and B-site displacement with their uncertainties, and tests each series for a linear drift
over the frames (a beam-induced change of the lattice), with its significance.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_real, fail
from ..backend import HostCopyMixin

__all__ = ["FrameSeries", "SeriesTrend", "frame_series", "linear_trend"]

#: Rows of the per-frame cell statistics followed over the series.
SERIES_ROWS = ("a1_length_pm", "a2_length_pm", "area_nm2", "tetragonal", "shear",
               "rotation_deg", "bsite_displacement_row_pm", "bsite_displacement_col_pm")


@dataclass(frozen=True)
class SeriesTrend:
    """Weighted linear fit ``value = level + slope * (frame - mean frame)`` of one series.

    ``z = slope / slope_error`` uses the larger of the stated errors and the scatter about the
    line (``chi2 / dof`` > 1 inflates the error); ``p`` is the two-sided p-value of a zero
    slope (Student t with ``dof``); ``significant`` when ``p < alpha``.
    """

    name: str
    slope: float
    slope_error: float
    level: float
    z: float
    p: float
    dof: int
    significant: bool

    def __str__(self) -> str:
        verdict = "significant drift" if self.significant else "no significant drift"
        return (f"{self.name}: slope {self.slope:+.4g} +/- {self.slope_error:.2g} per frame "
                f"(z = {self.z:+.1f}, p = {self.p:.2g}): {verdict}")


@dataclass(frozen=True)
class FrameSeries(HostCopyMixin):
    """Per-frame unit-cell statistics of a tracked stack.

    Attributes
    ----------
    frames : (M,) int
        Frames with enough cells for statistics.
    values, uncertainties : dict of str -> (M,) float
        Median and its uncertainty per frame for each row of :data:`SERIES_ROWS` present.
    n_cells : (M,) int
    trends : dict of str -> SeriesTrend
    skipped : dict of int -> str
        Frames left out, with the reason.
    parameters : dict
    """

    frames: Any
    values: dict
    uncertainties: dict
    n_cells: Any
    trends: dict
    skipped: dict
    parameters: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"frame series: {len(self.frames)} frames"
                 + (f" ({len(self.skipped)} skipped)" if self.skipped else "")]
        lines += [f"  {t}" for t in self.trends.values()]
        return "\n".join(lines)


def linear_trend(name, frames, values, errors, *, alpha=1e-3) -> SeriesTrend:
    """Weighted straight line through one series and the significance of its slope.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.series import linear_trend
    >>> f = np.arange(20)
    >>> rng = np.random.default_rng(0)
    >>> t = linear_trend("a", f, 390 + 0.05 * f + rng.normal(0, 0.1, 20), np.full(20, 0.1))
    >>> t.significant, round(t.slope, 2)
    (True, 0.05)
    >>> linear_trend("b", f, 390 + rng.normal(0, 0.1, 20), np.full(20, 0.1)).significant
    False
    """
    from scipy.stats import t as student

    x = np.asarray(frames, dtype=float)
    y = np.asarray(values, dtype=float)
    e = np.asarray(errors, dtype=float)
    ok = np.isfinite(y) & np.isfinite(e) & (e > 0)
    x, y, e = x[ok], y[ok], e[ok]
    dof = int(len(x) - 2)
    if dof < 1:
        return SeriesTrend(name, np.nan, np.inf, np.nan, 0.0, 1.0, max(dof, 0), False)
    w = 1.0 / e ** 2
    xm = float((w * x).sum() / w.sum())
    sxx = float((w * (x - xm) ** 2).sum())
    slope = float((w * (x - xm) * y).sum() / sxx)
    level = float((w * y).sum() / w.sum())
    chi2 = float((w * (y - level - slope * (x - xm)) ** 2).sum())
    # The stated errors may understate the frame-to-frame scatter: never trust them more
    # than the scatter about the line allows.
    slope_error = float(np.sqrt(max(1.0, chi2 / dof) / sxx))
    z = slope / slope_error
    p = float(2.0 * student.sf(abs(z), dof))
    return SeriesTrend(name, slope, slope_error, level, float(z), p, dof, bool(p < alpha))


def _check_series_options(species, min_cells, cell_options, unit_cells) -> None:
    """Types of frame_series' options, so that a wrong one is named (not NumPy's message)."""
    if species is not None and not (
            isinstance(species, tuple | list | np.ndarray) and 1 <= len(species) <= 2
            and all(isinstance(x, str | np.str_) for x in species)):
        fail("species", "None or 1 or 2 species labels (a_site, b_site), e.g. ('Sr', 'Ti')",
             species)
    if isinstance(min_cells, bool | np.bool_) or not isinstance(min_cells, numbers.Real) \
            or not math.isfinite(min_cells) or min_cells != int(min_cells):
        fail("min_cells", "an integer", min_cells)
    if cell_options is not None:
        # frame_series passes the positions, species and pixel size itself
        allowed = set(inspect.signature(unit_cells).parameters) - {
            "positions", "species", "pixel_size"}
        if not isinstance(cell_options, dict) or not set(cell_options) <= allowed:
            fail("cell_options", "None or a dict of unit_cells options (" +
                 ", ".join(sorted(allowed)) + ")", cell_options)


def frame_series(tracks, *, pixel_size, species=None, min_cells=4, alpha=1e-3,
                 cell_options=None) -> FrameSeries:
    """Unit cells of every frame of a tracked stack, as time series with drift tests.

    Parameters
    ----------
    tracks : ColumnTracks
        From :func:`stemgpu.track_columns` (per-frame positions and species).
    pixel_size : float
        pm per pixel.
    species : sequence of str, optional
        The cell-corner and centre species, ``(a_site, b_site)``; by default every species
        except ``"O"`` and ``"-"`` takes part as in :func:`stemgpu.analyze` (labels ``"A"`` /
        ``"B"``, or a single species as corners only).
    min_cells : int
        Frames with fewer cells are skipped (and listed with the reason).
    alpha : float
        Significance level of the drift tests.
    cell_options : dict, optional
        Passed to :func:`stemgpu.unit_cells`.

    Returns
    -------
    FrameSeries

    Raises
    ------
    ValueError
        A bad pixel size, or no frame with ``min_cells`` cells.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from stemgpu.lattice.series import frame_series
    >>> rng = np.random.default_rng(0)
    >>> r, c = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    >>> base = np.stack([r.ravel(), c.ravel()], 1) * 26.75
    >>> pos = base[None] * (1 + 0.002 * np.arange(8))[:, None, None]  # the lattice grows
    >>> tracks = SimpleNamespace(positions=pos + rng.normal(0, 0.05, pos.shape),
    ...                          species=np.array(["Sr"] * 100), column_flags=np.zeros(100))
    >>> s = frame_series(tracks, pixel_size=14.6)
    >>> s.trends["a1_length_pm"].significant, len(s.frames)
    (True, 8)
    """
    from .cells import unit_cells
    from .stats import cell_statistics

    px = check_real(pixel_size, "pixel_size", greater=0)
    check_real(alpha, "alpha", greater=0, maximum=0.5)
    _check_series_options(species, min_cells, cell_options, unit_cells)
    positions = np.asarray(tracks.positions, dtype=float)
    labels = np.asarray(tracks.species).astype(str)
    flags = np.asarray(getattr(tracks, "column_flags", np.zeros(len(labels))))
    if species is None:
        use = ~np.isin(labels, ["O", "-"])
        kw = {}
    else:
        use = np.isin(labels, [str(s) for s in species[:2]])
        kw = {"a_site": str(species[0]), "b_site": str(species[1])} if len(species) > 1 else {}
    use &= flags == 0  # hopping, fading or erratic columns would bias a frame's cells
    present = sorted(set(labels[use].tolist()))
    pass_species = species is not None or "A" in present
    if not pass_species and len(present) > 1:
        raise ValueError(f"species must name the (a_site, b_site) labels among {present}")
    kw.update(cell_options or {})
    frames, n_cells, skipped = [], [], {}
    vals: dict[str, list] = {}
    errs: dict[str, list] = {}
    for f in range(positions.shape[0]):  # one Delaunay pass per frame (host geometry)
        ok = use & np.isfinite(positions[f]).all(axis=1)
        try:
            cells = unit_cells(positions[f][ok], species=labels[ok] if pass_species else None,
                               pixel_size=px, **kw)
            if cells.n_cells < min_cells:
                raise ValueError(f"{cells.n_cells} cell(s), fewer than min_cells={min_cells}")
            stats = cell_statistics(cells, pixel_size=px, uncertainty="gaussian")
        except ValueError as exc:
            skipped[f] = str(exc)
            continue
        frames.append(f)
        n_cells.append(cells.n_cells)
        for name in SERIES_ROWS:
            if name in stats.rows:
                vals.setdefault(name, []).append(stats[name].median)
                errs.setdefault(name, []).append(stats[name].median_uncertainty)
    if not frames:
        raise ValueError(f"frame_series: no frame has {min_cells} or more unit cells; first "
                         f"reason: {next(iter(skipped.values()), 'no frames')}")
    frames_a = np.asarray(frames)
    values = {k: np.asarray(v) for k, v in vals.items() if len(v) == len(frames)}
    uncert = {k: np.asarray(errs[k]) for k in values}
    trends = {k: linear_trend(k, frames_a, values[k], uncert[k], alpha=alpha) for k in values}
    return FrameSeries(frames_a, values, uncert, np.asarray(n_cells), trends, skipped,
                       {"pixel_size_pm": px, "min_cells": int(min_cells), "alpha": alpha})
