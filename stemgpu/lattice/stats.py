"""The unit-cell table in one call: medians, standard deviations and their error bars.

Every row is the median over cells, the standard deviation over cells (the cell-to-cell
scatter: noise plus real variation) and the *uncertainty of the median* (how well the median
itself is known):

* ``"bootstrap"``: standard deviation of the median over ``n_bootstrap`` resamples of the
  cells with replacement (NumPy generator with a fixed ``seed``: reproducible);
* ``"order"``: distribution-free, from the order statistics around the median,
  ``(x[(n + sqrt(n))/2] - x[(n - sqrt(n))/2]) / 2`` (the half-width of the ~68 % confidence
  interval of the median; O(n log n), for millions of cells);
* ``"gaussian"``: ``1.2533 * std / sqrt(n)`` (exact for normally distributed values only);
* ``"auto"`` (default): bootstrap up to 20 000 cells, order statistics above.

Cells share corners, so neighbouring cells are not independent; for position noise this makes
all three estimates conservative (the shared corners' errors partly cancel in the median).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .._checks import check_choice, check_int
from .._inputs import resolve_pixel_size
from ..backend import HostCopyMixin

__all__ = ["CELL_QUANTITIES", "CellStatistics", "Quantity", "Stat", "calibrate",
           "cell_statistics", "median_uncertainty"]

_METHODS = ("auto", "bootstrap", "order", "gaussian")
_BOOTSTRAP_MAX_N = 20_000
#: Attributes a cells object must have (duck-typed: this module does not import cells).
_CELL_ATTRIBUTES = ("n_cells", "pixel_size_pm", "vectors", "area", "strain_lattice",
                    "bsite_index", "bsite_displacement", "to_numpy")


class Quantity(NamedTuple):
    """One per-cell quantity: how to read it from cells, its unit and its labels.

    ``unit`` is ``"px"`` (a length: pm with a pixel size), ``"px2"`` (an area: nm^2),
    ``"deg"`` or ``""`` (dimensionless). ``row`` is its row in :func:`cell_statistics`
    (``None``: a per-cell map quantity only); ``label`` is the plot label, ``row_label`` the
    table's.
    """

    name: str
    unit: str
    label: str
    row: str | None
    row_label: str
    values: Callable[[Any], np.ndarray]


def _length(i: int):
    return lambda c: np.linalg.norm(c.vectors, axis=2)[:, i]


#: Every per-cell quantity, in the order of the statistics table: the one source of
#: :func:`cell_statistics`'s rows and of :data:`stemgpu.lattice.plot.QUANTITIES`.
CELL_QUANTITIES = (
    Quantity("smallest_side", "px", "smallest side", "smallest_side_pm", "smallest side",
             lambda c: c.smallest_side),
    Quantity("longest_side", "px", "longest side", "longest_side_pm", "longest side",
             lambda c: c.longest_side),
    Quantity("a1_length", "px", "|a1|", "a1_length_pm", "|a1|", _length(0)),
    Quantity("a2_length", "px", "|a2|", "a2_length_pm", "|a2|", _length(1)),
    Quantity("angle_deviation_deg", "deg", "angle(a1, a2) - 90 (deg)", "angle_deviation_deg",
             "angle(a1, a2) - 90", lambda c: c.angle_deviation_deg),
    Quantity("abs_angle_deviation_deg", "deg", "mean |corner angle - 90| (deg)",
             "abs_angle_deviation_deg", "mean |corner angle - 90|",
             lambda c: c.abs_angle_deviation_deg),
    Quantity("area", "px2", "area", "area_nm2", "area", lambda c: c.area),
    Quantity("equivalent_side", "px", "equivalent square side", "equivalent_side_pm",
             "sqrt(area)", lambda c: np.sqrt(c.area)),
    Quantity("tetragonal", "", "tetragonal distortion", "tetragonal",
             "tetragonal distortion eps11 - eps22", lambda c: c.tetragonal),
    Quantity("shear", "", "shear distortion", "shear", "shear distortion eps12",
             lambda c: c.shear),
    Quantity("strain_11", "", "strain along r1", "strain_11", "strain along r1",
             lambda c: c.strain_lattice[:, 0, 0]),
    Quantity("strain_22", "", "strain along r2", "strain_22", "strain along r2",
             lambda c: c.strain_lattice[:, 1, 1]),
    Quantity("rotation_deg", "deg", "rotation (deg)", "rotation_deg",
             "rotation against reference", lambda c: c.rotation_deg),
    Quantity("strain_12", "", "shear strain (lattice frame)", None, "",
             lambda c: c.strain_lattice[:, 0, 1]),
    Quantity("bsite_distance", "px", "B-site distance from centre", None, "",
             lambda c: np.linalg.norm(c.bsite_displacement, axis=1)),
)

#: Unit of a statistics row by the quantity's unit kind.
_ROW_UNITS = {"px": "pm", "px2": "nm^2", "deg": "deg", "": ""}


def calibrate(values: np.ndarray, unit: str, pixel_size: float) -> np.ndarray:
    """Per-cell values in px / px^2 as pm / nm^2 (other units unchanged).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.stats import calibrate
    >>> calibrate(np.array([2.0]), "px", 10.0).tolist()
    [20.0]
    >>> float(calibrate(np.array([2.0]), "px2", 10.0)[0])  # nm^2
    0.0002
    """
    if unit == "px":
        return values * pixel_size
    if unit == "px2":
        return values * (pixel_size / 1000.0) ** 2
    return values


@dataclass(frozen=True)
class Stat:
    """One row of the table: median, std and uncertainty of the median of ``n`` values."""

    median: float
    std: float
    median_uncertainty: float
    n: int
    unit: str
    label: str

    def as_dict(self) -> dict:
        """Plain dict of the row."""
        return {"median": self.median, "std": self.std,
                "median_uncertainty": self.median_uncertainty, "n": self.n, "unit": self.unit}


@dataclass(frozen=True)
class CellStatistics(HostCopyMixin):
    """Result of :func:`cell_statistics`: ``rows`` maps a name (unit in it) to a :class:`Stat`.

    Rows (B-site rows only when cells have B-site columns):
    ``smallest_side_pm``, ``longest_side_pm``, ``a1_length_pm``, ``a2_length_pm``,
    ``angle_deviation_deg`` (signed, angle(a1, a2) - 90), ``abs_angle_deviation_deg`` (mean
    |corner angle - 90| per cell), ``area_nm2``, ``equivalent_side_pm`` (sqrt of the area),
    ``tetragonal``, ``shear``, ``strain_11``, ``strain_22`` (lattice frame, against the
    reference cell), ``rotation_deg``, ``bsite_distance_pm`` (distance of the B-site column
    from the A-site cell centre), ``bsite_displacement_row_pm``, ``bsite_displacement_col_pm``.

    The B-site distance is a magnitude and position noise biases it upwards (for an
    unshifted column with noise ``s`` per component its median is ``1.18 s``, Rayleigh); the
    medians of the displacement components are unbiased. Likewise the smallest/longest side
    are order statistics of four noisy sides (see :func:`stemgpu.unit_cells`), while
    ``a1_length_pm`` and ``a2_length_pm`` are unbiased.
    """

    rows: dict
    n_cells: int
    pixel_size_pm: float
    method: str
    parameters: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> Stat:
        try:
            return self.rows[name]
        except KeyError:
            raise KeyError(f"no row {name!r}; rows are {list(self.rows)}") from None

    def as_dict(self) -> dict:
        """``{row name: {"median", "std", "median_uncertainty", "n", "unit"}}`` plus metadata."""
        out: dict[str, Any] = {name: s.as_dict() for name, s in self.rows.items()}
        out["n_cells"] = self.n_cells
        out["pixel_size_pm"] = self.pixel_size_pm
        out["uncertainty_method"] = self.method
        return out

    def __str__(self) -> str:
        r = self.rows
        lines = [f"unit cells: {self.n_cells} squares (rim triangles excluded), pixel size "
                 f"{self.pixel_size_pm:g} pm; +/- is the uncertainty of the median "
                 f"({self.method})"]

        def side(name, label):
            s = r[name]
            lines.append(f"median {label}: {s.median / 1000:.4f} nm +/- {s.median_uncertainty:.2f}"
                         f" pm, std {s.std:.1f} pm")

        side("smallest_side_pm", "smallest side")
        side("longest_side_pm", "longest side")
        side("a1_length_pm", "|a1|")
        side("a2_length_pm", "|a2|")
        for name, label in (("angle_deviation_deg", "angle deviation from square (signed)"),
                            ("abs_angle_deviation_deg", "mean |corner angle - 90|")):
            s = r[name]
            lines.append(f"median {label}: {s.median:.3f} deg +/- {s.median_uncertainty:.3f}, "
                         f"std {s.std:.3f} deg")
        s, e = r["area_nm2"], r["equivalent_side_pm"]
        lines.append(f"median area: {s.median:.4f} nm^2 +/- {s.median_uncertainty:.5f}, std "
                     f"{s.std:.4f} nm^2 (equivalent square side {e.median / 1000:.4f} nm, std "
                     f"{e.std:.1f} pm)")
        if "bsite_distance_pm" in r:
            d, dr, dc = (r["bsite_distance_pm"], r["bsite_displacement_row_pm"],
                         r["bsite_displacement_col_pm"])
            lines.append(f"median B-site distance from cell centre: {d.median:.2f} pm +/- "
                         f"{d.median_uncertainty:.2f}, std {d.std:.2f} pm ({d.n} cells); "
                         f"median displacement (row, col) ({dr.median:.2f}, {dc.median:.2f}) pm")
        for name, label in (("tetragonal", "tetragonal distortion"),
                            ("shear", "shear distortion")):
            s = r[name]
            lines.append(f"median {label}: {s.median:.5f} +/- {s.median_uncertainty:.5f}, "
                         f"std {s.std:.4f}")
        s = r["rotation_deg"]
        lines.append(f"median rotation against reference: {s.median:.3f} deg, std {s.std:.3f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CellStatistics(n_cells={self.n_cells}, rows={list(self.rows)})"


def _order_uncertainty(sorted_values: np.ndarray) -> np.ndarray:
    n = sorted_values.shape[-1]
    half = 0.5 * np.sqrt(n)
    lo = int(np.clip(np.floor((n - 1) / 2 - half), 0, n - 1))
    hi = int(np.clip(np.ceil((n - 1) / 2 + half), 0, n - 1))
    return 0.5 * (sorted_values[..., hi] - sorted_values[..., lo])


#: Most bootstrap resamples: the time grows with n_bootstrap x cells (200 is plenty).
_BOOTSTRAP_MAX = 100_000


def _check_bootstrap(n_bootstrap, seed) -> tuple[int, int]:
    # The bootstrap uncertainty is the std of the resampled medians (ddof=1): one resample
    # would give NaN, so at least 2.
    n = check_int(n_bootstrap, "n_bootstrap", minimum=2, maximum=_BOOTSTRAP_MAX)
    return n, check_int(seed, "seed", minimum=0)


def median_uncertainty(values, *, method: str = "auto", n_bootstrap: int = 200,
                       seed: int = 0) -> tuple[np.ndarray, str]:
    """Uncertainty of the median of each row of ``values`` (k, n) (or of a 1-D array).

    Returns the uncertainties (k,) (or a scalar array) and the method used.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.stats import median_uncertainty
    >>> x = np.random.default_rng(0).normal(size=4000)
    >>> u, how = median_uncertainty(x, method="gaussian")
    >>> round(float(u), 4), how
    (0.0198, 'gaussian')
    """
    check_choice(method, "uncertainty", _METHODS)
    n_bootstrap, seed = _check_bootstrap(n_bootstrap, seed)
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("values must be a 1-D or 2-D array of numbers; got "
                         f"{type(values).__name__}") from None
    if v.ndim not in (1, 2):
        raise ValueError(f"values must be a 1-D or 2-D array of numbers; got shape {v.shape}")
    one = v.ndim == 1
    v = np.atleast_2d(v)
    n = v.shape[1]
    if n < 2:
        raise ValueError(f"the uncertainty of a median needs at least 2 values; got {n}")
    if method == "auto":
        method = "bootstrap" if n <= _BOOTSTRAP_MAX_N else "order"
    if method == "gaussian":
        out = 1.2533 * v.std(axis=1, ddof=1) / np.sqrt(n)
    elif method == "order":
        out = _order_uncertainty(np.sort(v, axis=1))
    else:
        rng = np.random.default_rng(seed)
        chunk = max(1, min(int(n_bootstrap), 20_000_000 // (n * v.shape[0])))
        meds = []
        for start in range(0, int(n_bootstrap), chunk):  # loop over resample batches
            m = min(chunk, int(n_bootstrap) - start)
            idx = rng.integers(0, n, size=(m, n))
            meds.append(np.median(v[:, idx], axis=2))  # (k, m)
        out = np.concatenate(meds, axis=1).std(axis=1, ddof=1)
    return (out[0] if one else out), method


def cell_statistics(cells, *, pixel_size: float | None = None, uncertainty: str = "auto",
                    n_bootstrap: int = 200, seed: int = 0) -> CellStatistics:
    """The table of unit-cell figures (sides, angles, area, distortions, B-site) with error bars.

    Parameters
    ----------
    cells : UnitCells
        From :func:`stemgpu.unit_cells`.
    pixel_size : float, optional
        pm per pixel; defaults to the one stored in ``cells``. Required one way or the other.
    uncertainty : {"auto", "bootstrap", "order", "gaussian"}
        How the uncertainty of each median is computed (see the module docstring).
    n_bootstrap : int
        Number of bootstrap resamples, 2 to 100 000.
    seed : int
        Seed (>= 0) of the bootstrap generator (fixed: the table is reproducible).

    Returns
    -------
    CellStatistics
        Printable (``print(stats)``), ``stats.as_dict()``, ``stats["tetragonal"].median``.

    Raises
    ------
    ValueError
        Without a calibration, with fewer than 2 cells, an unknown ``uncertainty``, or
        ``n_bootstrap`` / ``seed`` not an integer in range (one resample has no spread).
    TypeError
        If ``cells`` is not a :class:`~stemgpu.lattice.cells.UnitCells`.

    Notes
    -----
    Lengths: ``side_pm = side_px * pixel_size``; area ``area_nm2 = area_px * (pixel_size /
    1000)**2``; equivalent square side ``sqrt(area)``. Tetragonal distortion
    ``epsilon_11 - epsilon_22`` and shear distortion ``epsilon_12`` are the lattice-frame
    components of the Biot strain ``U - I`` of the deformation gradient ``F = M^T R^{-T}``
    against the reference cell (see :mod:`stemgpu.lattice.strain`); with the default
    square reference they measure the departure from a square cell.

    Examples
    --------
    >>> import numpy as np
    >>> import stemgpu
    >>> rng = np.random.default_rng(0)
    >>> r, c = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    >>> pos = np.stack([r.ravel(), c.ravel()], 1) * 26.75 + rng.normal(0, 0.1, (144, 2))
    >>> stats = stemgpu.cell_statistics(stemgpu.unit_cells(pos), pixel_size=14.6)
    >>> stats.n_cells, round(stats["area_nm2"].median, 4)
    (121, 0.1525)
    >>> sorted(stats.as_dict()["tetragonal"])
    ['median', 'median_uncertainty', 'n', 'std', 'unit']
    """
    if not all(hasattr(cells, name) for name in _CELL_ATTRIBUTES):
        raise TypeError(f"cells must be a UnitCells (from stemgpu.unit_cells); got "
                        f"{type(cells).__name__}")
    px = resolve_pixel_size(pixel_size, cells.pixel_size_pm, required=True,
                            what="cell_statistics (calibrated pm / nm output)")
    check_choice(uncertainty, "uncertainty", _METHODS)
    n_bootstrap, seed = _check_bootstrap(n_bootstrap, seed)
    if cells.n_cells < 2:
        raise ValueError(f"cell_statistics needs at least 2 cells; got {cells.n_cells}")
    c = cells.to_numpy()
    table = [q for q in CELL_QUANTITIES if q.row is not None]
    matrix = np.stack([calibrate(q.values(c), q.unit, px) for q in table])
    unc, how = median_uncertainty(matrix, method=uncertainty, n_bootstrap=n_bootstrap,
                                  seed=seed)
    rows = {}
    for i, q in enumerate(table):
        rows[q.row] = Stat(float(np.median(matrix[i])), float(np.std(matrix[i], ddof=1)),
                           float(unc[i]), int(matrix.shape[1]), _ROW_UNITS[q.unit], q.row_label)
    has_b = c.bsite_index >= 0
    if has_b.sum() >= 2:
        d = c.bsite_displacement[has_b] * px
        bm = np.stack([np.linalg.norm(d, axis=1), d[:, 0], d[:, 1]])
        bunc, _ = median_uncertainty(bm, method=how, n_bootstrap=n_bootstrap, seed=seed)
        for i, (k, label) in enumerate((("bsite_distance_pm", "B-site distance from centre"),
                                        ("bsite_displacement_row_pm", "B-site row displacement"),
                                        ("bsite_displacement_col_pm",
                                         "B-site col displacement"))):
            rows[k] = Stat(float(np.median(bm[i])), float(np.std(bm[i], ddof=1)),
                           float(bunc[i]), int(bm.shape[1]), "pm", label)
    return CellStatistics(rows, cells.n_cells, float(px), how,
                          {"uncertainty": uncertainty, "n_bootstrap": int(n_bootstrap),
                           "seed": int(seed)})
