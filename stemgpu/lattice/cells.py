"""Unit cells from column positions: Delaunay triangles paired into squares, vectorised.

The A-site (corner) columns are triangulated with :class:`scipy.spatial.Delaunay`. In a
near-square lattice every unit cell is split by one diagonal into two triangles whose longest
edge is that diagonal, so two triangles whose longest edges are the *same* edge are paired
into a quadrilateral. Triangles at the rim of the field of view (their longest edge is on the
hull or is not the partner's longest edge), and pairs that are not near-square (an interior
angle more than ``angle_tolerance_deg`` from 90 deg, or a side more than ``side_tolerance``
away, relatively, from the reference side, or opposite sides differing by more than
``parallelogram_tolerance``) are rejected: vacancies, missing columns and grain
boundaries produce such pairs (e.g. the sqrt(2)-larger square around a vacancy).

With ``lattice="hexagonal"`` or ``"generic"`` the cells are instead the primitive
parallelograms of the two shortest lattice translations (found from the neighbour vectors
that carry most points onto points), and the reference is the median cell.

Everything is array arithmetic over all triangles at once: O(N log N) for the triangulation
and KD-tree, O(N) otherwise. The geometry runs on the host with NumPy in float64 (there is
no GPU Delaunay; positions are small next to images), and CuPy inputs are copied once.

Corner order and lattice vectors
--------------------------------
Corners are ordered ``[o, o + a1, o + a1 + a2, o + a2]``: ``a1`` is the side direction closest
to the reference direction ``r1`` (by default the dominant side direction of all cells,
folded into (-45, 45] deg from the row axis), ``a2`` the next side turning towards ``r2``
(by default +90 deg, from the row axis towards the col axis). The cell vectors are the means
of opposite sides, ``a1 = ((p1 - p0) + (p2 - p3)) / 2`` and ``a2 = ((p3 - p0) + (p2 - p1)) /
2`` (the linear part of the least-squares affine map of the unit square onto the four
corners).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .._checks import check_choice, check_real, fail
from .._inputs import resolve_pixel_size
from ..backend import HostCopyMixin, resolve_backend, to_host
from .gates import (
    AnalysisError,
    check_corner_checkerboard,
    check_hexagonal,
    check_lattice_parameter,
    check_square,
)
from .strain import bsite_displacement, strain_components

__all__ = ["UnitCells", "unit_cells"]

_NAN_POLICIES = ("raise", "omit")


@dataclass(frozen=True)
class UnitCells(HostCopyMixin):
    """Result of :func:`unit_cells`; every per-cell array has ``n_cells`` rows. Lengths in px.

    Attributes
    ----------
    corner_index : (n, 4) int64
        Rows of the input ``positions`` at the corners ``[o, o+a1, o+a1+a2, o+a2]``.
    corners : (n, 4, 2) float64
        Corner positions (row, col), px.
    centres : (n, 2) float64
        Mean of the four corners, px.
    vectors : (n, 2, 2) float64
        Rows ``a1, a2``: means of opposite sides, px.
    sides : (n, 4) float64
        Side lengths ``|p1-p0|, |p2-p1|, |p3-p2|, |p0-p3|``, px.
    smallest_side, longest_side : (n,) float64
        Smallest and longest of the four sides, px.
    angles_deg : (n, 4) float64
        Interior angles at the four corners, degrees.
    angle_deviation_deg : (n,) float64
        Signed deviation from square: angle between ``a1`` and ``a2`` minus 90 deg.
    abs_angle_deviation_deg : (n,) float64
        Mean over the four corners of ``|interior angle - 90 deg|``.
    area : (n,) float64
        Shoelace area of the quadrilateral, px^2.
    reference : (2, 2) float64
        Reference cell (rows ``r1, r2``, px) of the strain analysis (all NaN only when no
        cell was found and none was given).
    deformation_gradient : (n, 2, 2) float64
        ``F = M^T R^{-T}``; see :mod:`stemgpu.lattice.strain`.
    strain : (n, 2, 2) float64
        Biot strain ``U - I`` in image axes (row, col).
    strain_lattice : (n, 2, 2) float64
        The same in the lattice frame (axis 1 along ``r1``).
    rotation_deg : (n,) float64
        Rotation of each cell against the reference, degrees.
    tetragonal : (n,) float64
        Tetragonal distortion ``epsilon_11 - epsilon_22`` (lattice frame).
    shear : (n,) float64
        Shear distortion ``epsilon_12`` (lattice frame).
    bsite_index : (n,) int64
        Row of ``positions`` of the B-site column of each cell, -1 where none was found.
    bsite_displacement : (n, 2) float64
        B-site position minus cell centre (row, col), px; NaN where ``bsite_index == -1``.
    flagged : (N,) bool
        Input positions that were not finite (omitted with ``nan_policy="omit"``).
    pixel_size_pm : float or None
    parameters : dict
        Options used, the reference and counts (triangles, pairs, rejections).
    """

    corner_index: Any
    corners: Any
    centres: Any
    vectors: Any
    sides: Any
    smallest_side: Any
    longest_side: Any
    angles_deg: Any
    angle_deviation_deg: Any
    abs_angle_deviation_deg: Any
    area: Any
    reference: Any
    deformation_gradient: Any
    strain: Any
    strain_lattice: Any
    rotation_deg: Any
    tetragonal: Any
    shear: Any
    bsite_index: Any
    bsite_displacement: Any
    flagged: Any
    pixel_size_pm: float | None = None
    parameters: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(len(self.corner_index))

    @property
    def has_bsite(self):
        """(n,) bool: cells with an assigned B-site column."""
        return self.bsite_index >= 0

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        px = "uncalibrated" if self.pixel_size_pm is None else f"{self.pixel_size_pm:g} pm/px"
        return (f"UnitCells({self.n_cells} cells, {int(self.has_bsite.sum())} with B-site, "
                f"{px})")

    def statistics(self, **kwargs):
        """Shortcut for :func:`stemgpu.cell_statistics` of these cells."""
        from .stats import cell_statistics

        return cell_statistics(self, **kwargs)


# ----------------------------------------------------------------------------- validation

def _as_positions(positions, nan_policy: str):
    try:
        x = np.asarray(to_host(positions), dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"positions must be an (N, 2) array of (row, col) px; got {type(positions).__name__}"
        ) from None
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"positions must have shape (N, 2) (row, col) px; got {x.shape}")
    check_choice(nan_policy, "nan_policy", _NAN_POLICIES)
    flagged = ~np.all(np.isfinite(x), axis=1)
    if flagged.any() and nan_policy == "raise":
        bad = np.flatnonzero(flagged)
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise ValueError(
            f"positions has {len(bad)} non-finite (NaN/inf) row(s) at index {shown}; drop "
            "failed fits or pass nan_policy='omit' to skip them (they are flagged in the result)"
        )
    return x, flagged


def _check_enough(x: np.ndarray, what: str) -> None:
    if len(x) < 4:
        raise ValueError(
            f"{what} must hold at least 4 finite (row, col) points to form a cell; got {len(x)}"
        )
    centred = x - x.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    if sv[0] == 0 or sv[1] <= 1e-9 * sv[0]:
        raise ValueError(
            f"{what} are collinear (all {len(x)} points lie on one line); a 2-D lattice is needed"
        )


def _species_mask(species, n: int, a_site, b_site):
    """A-site and B-site masks from labels (any hashable labels; A/B defaults)."""
    if species is None:
        if b_site is not None:
            raise ValueError("b_site= needs species= labels (one per position)")
        return np.ones(n, dtype=bool), None, None, None
    lab = np.asarray(species)
    if lab.shape != (n,):
        raise ValueError(f"species must hold one label per position ({n}); got shape {lab.shape}")
    present = list(dict.fromkeys(lab.tolist()))
    if a_site is None:
        if "A" not in present:
            raise ValueError(
                f"species labels {present[:8]} contain no 'A'; pass a_site= (the corner species, "
                "e.g. a_site='Sr') and b_site= (e.g. b_site='TiO')"
            )
        a_site = "A"
        if b_site is None and "B" in present:
            b_site = "B"
    if a_site not in present:
        raise ValueError(f"a_site={a_site!r} is not among the species labels {present[:8]}")
    if b_site is not None and b_site not in present:
        raise ValueError(f"b_site={b_site!r} is not among the species labels {present[:8]}")
    a_mask = lab == a_site
    b_mask = lab == b_site if b_site is not None else None
    return a_mask, b_mask, a_site, b_site


#: ``lattice=`` names: the perovskite path (square A-site cells) and the primitive-cell paths.
_KINDS = ("perovskite", "hexagonal", "generic")


def _reference_from_lattice(lattice, pixel_size, lattice_parameter=None):
    """(kind, value): 'square'/'median', a square side in px, (2, 2) vectors in px, or
    'hexagonal'/'generic' with the expected |a1| in px (None when not given)."""
    named = isinstance(lattice, str)
    if lattice_parameter is not None:
        if not (lattice is None or (named and lattice in ("square", *_KINDS))):
            raise ValueError(
                f"lattice_parameter= goes with lattice=None, 'perovskite', 'hexagonal' or "
                f"'generic'; got lattice={lattice!r} (a float lattice= is the parameter)")
        p = check_real(lattice_parameter, "lattice_parameter", greater=0)
        if pixel_size is None:
            raise ValueError(f"lattice_parameter={p!r} pm needs pixel_size= (pm per pixel)")
        if lattice in ("hexagonal", "generic"):
            return lattice, p / pixel_size
        lattice, named = p, False
    if lattice is None or (named and lattice == "perovskite"):
        return "square", None
    if named:
        if lattice in ("hexagonal", "generic"):
            return lattice, None
        if lattice not in ("square", "median"):
            raise ValueError(
                f"lattice={lattice!r} is not accepted; use None/'square'/'perovskite', "
                "'median', 'hexagonal', 'generic', a lattice parameter in pm (with "
                "pixel_size=) or (2, 2) lattice vectors in px"
            )
        return lattice, None
    try:
        if isinstance(lattice, bytes | dict | complex):
            raise TypeError
        arr = np.asarray(lattice, dtype=np.float64)
    except (TypeError, ValueError):
        fail("lattice", "None, a lattice name, a lattice parameter in pm or (2, 2) lattice "
             "vectors in px", lattice)
    if arr.shape == ():
        if pixel_size is None:
            raise ValueError(
                f"lattice={float(arr)!r} is a lattice parameter in pm and needs pixel_size= "
                "(pm per pixel); or pass (2, 2) lattice vectors in px"
            )
        if not np.isfinite(arr) or arr <= 0:
            raise ValueError(f"lattice parameter must be a positive number of pm; got {lattice!r}")
        return "side", float(arr) / pixel_size
    if arr.shape == (2, 2) and np.all(np.isfinite(arr)) and abs(np.linalg.det(arr)) > 1e-9:
        return "vectors", arr
    raise ValueError(
        f"lattice must be None, 'square', 'median', a lattice parameter in pm or a non-singular "
        f"(2, 2) array of lattice vectors (rows a1, a2) in px; got {lattice!r}"
    )


# ----------------------------------------------------------------------------- geometry

def _pair_triangles(points: np.ndarray):
    """Quadrilaterals (q, 4) of point indices from triangles sharing their longest edge."""
    from scipy.spatial import Delaunay, QhullError

    try:
        tri = Delaunay(points)
    except QhullError as exc:
        raise ValueError(
            f"positions could not be triangulated (degenerate point set): {str(exc)[:200]}"
        ) from None
    s, nb = tri.simplices, tri.neighbors
    p = points[s]  # (T, 3, 2)
    # Edge k is opposite vertex k: from vertex k+1 to vertex k+2.
    e = p[:, [2, 0, 1]] - p[:, [1, 2, 0]]
    longest = np.argmax(np.einsum("tki,tki->tk", e, e), axis=1)
    t = np.arange(len(s))
    partner = nb[t, longest]
    ok = partner >= 0
    mutual = np.zeros(len(s), dtype=bool)
    mutual[ok] = nb[partner[ok], longest[partner[ok]]] == t[ok]
    keep = mutual & (t < partner)  # each pair once
    t1, t2 = t[keep], partner[keep]
    k1, k2 = longest[t1], longest[t2]
    v = s[t1, k1]
    u1 = s[t1, (k1 + 1) % 3]
    u2 = s[t1, (k1 + 2) % 3]
    w = s[t2, k2]
    quads = np.stack([v, u1, w, u2], axis=1)
    counts = {"triangles": int(len(s)), "rim_or_unpaired_triangles": int(len(s) - 2 * len(t1)),
              "pairs": int(len(t1))}
    return quads, counts


def _edges(corners: np.ndarray) -> np.ndarray:
    return np.roll(corners, -1, axis=1) - corners  # e_i = p_{i+1} - p_i


def _cross(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _interior_angles(corners: np.ndarray) -> np.ndarray:
    """Interior angles (degrees) at each corner of convex quads (any orientation)."""
    e = _edges(corners)
    prev = -np.roll(e, 1, axis=1)  # p_{i-1} - p_i
    dot = np.einsum("qki,qki->qk", e, prev)
    return np.degrees(np.arctan2(np.abs(_cross(e, prev)), dot))


def _orient(quads, points, hand: float):
    """Make the cyclic order turn with sign ``hand`` (cross(e0, e1) has sign hand)."""
    c = points[quads]
    area2 = _cross(_edges(c), np.roll(_edges(c), -1, axis=1)).sum(axis=1)
    flip = np.sign(area2) != hand
    quads = quads.copy()
    quads[flip] = quads[flip][:, ::-1]
    return quads


def _roll_to_direction(quads, points, d1):
    """Start each quad at the corner whose outgoing side is best aligned with ``d1``."""
    c = points[quads]
    e = _edges(c)
    en = e / np.linalg.norm(e, axis=2, keepdims=True)
    k = np.argmax(en @ d1, axis=1)
    idx = (k[:, None] + np.arange(4)[None, :]) % 4
    return np.take_along_axis(quads, idx, axis=1)


def _dominant_direction(quads, points) -> np.ndarray:
    """Unit side direction in (-45, 45] deg from the row axis (4-fold circular mean)."""
    e = _edges(points[quads]).reshape(-1, 2)
    phi = np.arctan2(e[:, 1], e[:, 0])
    z = np.exp(4j * phi).mean()
    phi0 = np.angle(z) / 4.0
    return np.array([np.cos(phi0), np.sin(phi0)])


def _cell_vectors(corners):
    a1 = 0.5 * ((corners[:, 1] - corners[:, 0]) + (corners[:, 2] - corners[:, 3]))
    a2 = 0.5 * ((corners[:, 3] - corners[:, 0]) + (corners[:, 2] - corners[:, 1]))
    return np.stack([a1, a2], axis=1)


def _angle_between(a, b):
    return np.degrees(np.arctan2(np.abs(_cross(a, b)), np.einsum("...i,...i->...", a, b)))


def unit_cells(
    positions,
    *,
    species=None,
    intensities=None,
    a_site=None,
    b_site=None,
    lattice=None,
    pixel_size: float | None = None,
    angle_tolerance_deg: float = 12.0,
    side_tolerance: float = 0.15,
    parallelogram_tolerance: float = 0.1,
    bsite_max_distance: float = 0.3,
    nan_policy: str = "raise",
    lattice_parameter: float | None = None,
    backend=None,
) -> UnitCells:
    """Find the unit cells (squares of A-site columns) and their geometry, strain and B-site.

    Parameters
    ----------
    positions : (N, 2) array
        Column positions (row, col) in px, e.g. refined positions from atom fitting.
    species : (N,) array of labels, optional
        Species of each column. Without it (and without ``intensities``) every position is
        taken as a corner (A-site) column and no B-site displacement is computed.
    intensities : (N,) array, optional
        Fitted column intensities. Without ``species`` they are split into classes
        ``"A"``, ``"B"``, ``"O"`` (brightest first; ``"A"``, ``"B"`` on the primitive-cell
        paths) by :func:`stemgpu.lattice.sublattice.assign_by_intensity`. With ``species``
        they feed the one-species-at-the-corners gate of the perovskite path
        (:func:`~stemgpu.lattice.gates.check_corner_checkerboard`).
    a_site, b_site : label, optional
        The corner and the centre species among ``species`` (default ``"A"`` and ``"B"``
        when those labels exist), e.g. ``a_site="Sr", b_site="TiO"``.
    lattice : None, "perovskite", "square", "median", "hexagonal", "generic", float or (2, 2)
        The lattice and the reference cell of the strain analysis.

        *Perovskite path* (square A-site cells from Delaunay pairs):
        ``None``/``"perovskite"``/``"square"``: a square reference whose side is the median
        equivalent-square side ``sqrt(area)`` of the cells, oriented along their median
        ``a1``; ``"median"``: the median cell (median of ``a1`` and of ``a2``); a float: a
        square of that lattice parameter in pm (needs ``pixel_size``), oriented along the
        median ``a1``; a (2, 2) array: lattice vectors (rows ``r1, r2``) in px, which also
        fix the direction of ``a1`` and the side lengths used to reject non-cells.

        *Primitive-cell paths*: ``"hexagonal"`` (graphene, MoS2, WSe2: the corner species'
        lattice, 120 deg cells) and ``"generic"`` (any 2-D lattice): cells are the
        parallelograms ``[p, p+a1, p+a1+a2, p+a2]`` of the two shortest lattice translations
        (for a honeycomb of one species, on one of its two sublattices), and the reference is
        the median cell. No B-site columns.

        Gates (:mod:`stemgpu.lattice.gates`): on the perovskite path without lattice
        vectors the median cell must be near-square; with ``"hexagonal"`` a 120 deg
        rhombus; a given lattice parameter or vectors must match the data's cells within
        ``side_tolerance``. A crossed gate raises :class:`~stemgpu.lattice.gates.AnalysisError`;
        the records are in ``parameters["gates"]``.
    pixel_size : float, optional
        pm per pixel; stored for calibrated statistics and needed for a lattice parameter.
    angle_tolerance_deg : float
        Reject quadrilaterals with an interior angle further than this from 90 deg.
    side_tolerance : float
        Reject quadrilaterals with a side differing from the reference side by more than this
        fraction (sides along ``a1`` are compared with ``|r1|``, along ``a2`` with ``|r2|``).
    parallelogram_tolerance : float
        Reject quadrilaterals whose opposite sides, as vectors, differ by more than this
        fraction of the reference side (``|e0 + e2|`` and ``|e1 + e3|``): a cell is a
        near-parallelogram, quadrilaterals straddling a grain boundary are not.
    bsite_max_distance : float
        A B-site column is assigned to a cell when it lies within this fraction of the
        shorter reference side from the cell centre.
    nan_policy : {"raise", "omit"}
        Non-finite positions (failed fits) raise, or are skipped and flagged in
        ``UnitCells.flagged``.
    lattice_parameter : float, optional
        The expected lattice parameter in pm (needs ``pixel_size``): with ``"hexagonal"`` or
        ``"generic"`` it is checked against the median ``|a1|`` (and ``|a2|`` for
        hexagonal); with the perovskite path it is the same as ``lattice=<parameter>``.
    backend : {"numpy", "cupy", "auto"}, optional
        Backend of the result's arrays (default: CuPy for CuPy ``positions``). The geometry
        itself always runs on the host (there is no GPU Delaunay triangulation): CuPy
        positions are copied to the host once and the result's arrays back once.

    Returns
    -------
    UnitCells

    Raises
    ------
    ValueError
        Fewer than 4 finite A-site positions, collinear positions, non-finite positions (with
        ``nan_policy="raise"``), unknown species labels, a lattice parameter without
        ``pixel_size``, or bad tolerances.
    AnalysisError
        A gate refused the lattice (a ``ValueError``; see ``lattice``), or no lattice
        translations were found on a primitive-cell path.
    TypeError
        ``positions`` not array-like.

    Notes
    -----
    Formulas (all per cell, float64): ``a1 = ((p1-p0) + (p2-p3))/2``,
    ``a2 = ((p3-p0) + (p2-p1))/2``; ``F = M^T R^{-T}`` with ``M`` (rows a1, a2) and ``R``
    (rows r1, r2); ``F = Q(theta) U`` (polar decomposition); strain ``epsilon = U - I``;
    tetragonal distortion ``epsilon_11 - epsilon_22`` and shear distortion ``epsilon_12`` in
    the lattice frame (axis 1 along ``r1``); B-site displacement ``b - (p0+p1+p2+p3)/4``.
    See :mod:`stemgpu.lattice.strain`.

    The smallest and longest of the four sides are order statistics: with isotropic position
    noise ``sigma`` per coordinate each side scatters by ``sigma*sqrt(2)`` and the median of
    the smallest side of an ideal square lies ``~1.0*sigma*sqrt(2)`` below the true side
    (the longest as much above). The cell vectors ``|a1|``, ``|a2|`` are unbiased.

    Examples
    --------
    >>> import numpy as np
    >>> import stemgpu
    >>> r, c = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
    >>> pos = np.stack([r.ravel(), c.ravel()], axis=1) * 26.75
    >>> cells = stemgpu.unit_cells(pos, pixel_size=14.6)
    >>> cells.n_cells, round(float(np.median(cells.smallest_side)) * 14.6, 1)
    (20, 390.6)

    A hexagonal lattice (a = 316 pm, e.g. the Mo columns of MoS2): primitive 120 deg cells.

    >>> v = np.array([[1.0, 0.0], [-0.5, np.sqrt(3) / 2]]) * 316.0 / 14.6
    >>> i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    >>> hexa = np.stack([i.ravel(), j.ravel()], 1) @ v
    >>> cells = stemgpu.unit_cells(hexa, lattice="hexagonal", pixel_size=14.6)
    >>> cells.n_cells, round(float(np.median(cells.angle_deviation_deg)) + 90, 1)
    (49, 120.0)
    """
    be = resolve_backend(backend, positions)
    x, flagged = _as_positions(positions, nan_policy)
    _check_numbers(intensities, "intensities")
    tolerances = _check_tolerances(angle_tolerance_deg, side_tolerance,
                                   parallelogram_tolerance, bsite_max_distance)
    px = resolve_pixel_size(pixel_size, None)
    kind, ref_value = _reference_from_lattice(lattice, px, lattice_parameter)
    primitive = kind in ("hexagonal", "generic")
    n = len(x)
    species = _species_from_intensities(species, intensities, flagged, n,
                                        n_classes=2 if primitive else 3)
    a_mask, b_mask, a_name, b_name = _species_mask(species, n, a_site, b_site)
    if primitive:  # B-site columns belong to the perovskite path
        b_mask, b_name = _no_bsite(b_site, kind), None
    a_idx = np.flatnonzero(a_mask & ~flagged)
    pts = x[a_idx]
    _check_enough(pts, "A-site positions" if species is not None else "positions")

    if primitive:
        quads, hand, counts = _primitive_cells(pts, kind, tolerances)
    else:
        quads, counts = _candidate_quads(pts)
        quads, hand, rejected = _reject_non_cells(quads, pts, kind, ref_value, tolerances)
        counts.update(rejected)
    geometry = _cell_geometry(pts[quads])
    corner_values = _corner_intensities(intensities, species, a_idx[quads], n)
    gates = _gates(kind, ref_value, geometry, counts.pop("candidate_sides", None), tolerances,
                   px, corner_values)
    reference = _reference_cell(geometry, kind, ref_value, hand)
    comps = _strain(geometry["vectors"], reference)
    bsite_index, disp = _assign_bsites(geometry["centres"], x, b_mask, flagged, reference,
                                       bsite_max_distance)
    params = {
        "a_site": a_name, "b_site": b_name,
        "lattice": lattice if lattice is None or isinstance(lattice, str | float | int)
        else np.asarray(lattice).tolist(),
        "reference_kind": kind,
        **tolerances,
        "nan_policy": nan_policy,
        "n_positions": int(n),
        "n_flagged": int(flagged.sum()),
        **counts,
        "gates": gates,
    }
    if lattice_parameter is not None:
        params["lattice_parameter"] = float(lattice_parameter)
    result = _result(a_idx[quads], geometry, reference, comps, bsite_index, disp, flagged, px,
                     params)
    if be.is_gpu:  # one transfer out for the whole result
        result = replace(result, **{f.name: be.asarray(getattr(result, f.name))
                                    for f in fields(result)
                                    if f.name not in ("pixel_size_pm", "parameters")})
    return result


# ----------------------------------------------------------------------------- passes

def _check_numbers(value, name: str) -> None:
    """None or an array of real numbers (strings, dicts and complex numbers refused)."""
    if value is None:
        return
    accepted = "None or an (N,) array of numbers, one per position"
    if isinstance(value, str | bytes | dict | complex):
        fail(name, accepted, value)
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            arr = arr.astype(np.float64)
    except (TypeError, ValueError):
        fail(name, accepted, value)
    if arr.dtype.kind == "c":
        fail(name, accepted, value)


def _check_tolerances(angle_tolerance_deg, side_tolerance, parallelogram_tolerance,
                      bsite_max_distance) -> dict:
    """The four tolerances as floats (each a finite number > 0), keyed by argument name."""
    return {"angle_tolerance_deg": check_real(angle_tolerance_deg, "angle_tolerance_deg",
                                              greater=0),
            "side_tolerance": check_real(side_tolerance, "side_tolerance", greater=0),
            "parallelogram_tolerance": check_real(parallelogram_tolerance,
                                                  "parallelogram_tolerance", greater=0),
            "bsite_max_distance": check_real(bsite_max_distance, "bsite_max_distance",
                                             greater=0)}


def _species_from_intensities(species, intensities, flagged, n: int, n_classes: int = 3):
    """``species`` as given, or labels by intensity class (A, B, O / A, B) when only
    intensities are."""
    if species is not None or intensities is None:
        return species
    from .sublattice import assign_by_intensity

    inten = np.asarray(intensities, dtype=np.float64)
    if inten.shape != (n,):
        raise ValueError(
            f"intensities must hold one value per position ({n}); got shape {inten.shape}"
        )
    labels = np.full(n, "", dtype=object)
    labels[~flagged] = assign_by_intensity(inten[~flagged], n_classes=n_classes)
    return labels.astype(str)


def _candidate_quads(points: np.ndarray):
    """Candidate cells: quadrilaterals of Delaunay triangles sharing their longest edge."""
    return _pair_triangles(points)


def _reject_non_cells(quads, pts, kind: str, ref_value, tol: dict):
    """Drop candidates that are not near-square cells of the reference lattice.

    Returns the kept quads (rolled so that side 0 runs along ``a1``), the handedness of the
    corner order and the rejection counts (with the candidates' median sides along ``a1``
    and ``a2``, px, for the lattice-parameter gate).
    """
    if kind == "vectors":
        d1 = ref_value[0] / np.linalg.norm(ref_value[0])
        hand = np.sign(_cross(ref_value[0], ref_value[1]))
    else:
        d1, hand = None, 1.0
    quads = _orient(quads, pts, hand)
    angles = _interior_angles(pts[quads])
    convex = np.sign(_cross(_edges(pts[quads]), np.roll(_edges(pts[quads]), -1, axis=1)))
    square = np.all(np.abs(angles - 90.0) <= tol["angle_tolerance_deg"], axis=1) & np.all(
        convex == hand, axis=1)
    quads = quads[square]
    if d1 is None and len(quads):
        d1 = _dominant_direction(quads, pts)
    rejected_side = 0
    candidate_sides = np.full(2, np.nan)
    if len(quads):
        quads = _roll_to_direction(quads, pts, d1)
        sides = np.linalg.norm(_edges(pts[quads]), axis=2)
        candidate_sides = np.array([np.median(sides[:, [0, 2]]), np.median(sides[:, [1, 3]])])
        good = _shape_ok(quads, pts, kind, ref_value, tol)
        rejected_side = int((~good).sum())
        quads = quads[good]
    return quads, hand, {"rejected_not_square": int((~square).sum()),
                         "rejected_shape": rejected_side, "cells": int(len(quads)),
                         "candidate_sides": candidate_sides}


def _shape_ok(quads, pts, kind: str, ref_value, tol: dict) -> np.ndarray:
    """Sides near the reference sides and opposite sides near-parallel (vacancies, grains)."""
    sides = np.linalg.norm(_edges(pts[quads]), axis=2)
    if kind == "vectors":
        ref_sides = np.linalg.norm(ref_value, axis=1)
    elif kind == "side":
        ref_sides = np.array([ref_value, ref_value])
    else:
        # Median of candidate sides: most candidates are real cells.
        ref_sides = np.array([np.median(sides[:, [0, 2]]), np.median(sides[:, [1, 3]])])
    dev = np.abs(sides / ref_sides[[0, 1, 0, 1]][None, :] - 1.0)
    e = _edges(pts[quads])
    skew = np.stack([np.linalg.norm(e[:, 0] + e[:, 2], axis=1) / ref_sides[0],
                     np.linalg.norm(e[:, 1] + e[:, 3], axis=1) / ref_sides[1]], axis=1)
    return np.all(dev <= tol["side_tolerance"], axis=1) & np.all(
        skew <= tol["parallelogram_tolerance"], axis=1)


def _cell_geometry(corners: np.ndarray) -> dict:
    """Per-cell corners, sides, angles, vectors, centres and area of (n, 4, 2) corners."""
    e = _edges(corners)
    return {"corners": corners, "sides": np.linalg.norm(e, axis=2),
            "angles": _interior_angles(corners), "vectors": _cell_vectors(corners),
            "centres": corners.mean(axis=1),
            "area": 0.5 * np.abs(_cross(corners, np.roll(corners, -1, axis=1)).sum(axis=1))}


def _reference_cell(geometry: dict, kind: str, ref_value, hand: float) -> np.ndarray:
    """The (2, 2) reference cell (rows r1, r2) of the strain analysis, px."""
    vectors, area = geometry["vectors"], geometry["area"]
    if kind == "vectors":
        return ref_value
    if len(vectors) == 0:
        return np.full((2, 2), np.nan)
    if kind in ("median", "hexagonal", "generic"):
        return np.median(vectors, axis=0)
    side = np.median(np.sqrt(area)) if kind == "square" else ref_value
    phi = np.median(np.arctan2(vectors[:, 0, 1], vectors[:, 0, 0]))
    u = np.array([np.cos(phi), np.sin(phi)])
    return side * np.stack([u, hand * np.array([-u[1], u[0]])])


def _strain(vectors: np.ndarray, reference: np.ndarray) -> dict:
    """:func:`~stemgpu.lattice.strain.strain_components`, with empty arrays for no cells."""
    if len(vectors):
        return strain_components(vectors, reference)
    z = np.zeros((0, 2, 2))
    return {"F": z, "strain": z, "strain_lattice": z, "rotation_deg": np.zeros(0),
            "tetragonal": np.zeros(0), "shear": np.zeros(0)}


def _assign_bsites(centres, x, b_mask, flagged, reference, bsite_max_distance: float):
    """Row of ``x`` of the B-site column of each cell (-1: none) and its displacement."""
    if b_mask is None:
        return (np.full(len(centres), -1, dtype=np.int64),
                np.full((len(centres), 2), np.nan))
    b_idx = np.flatnonzero(b_mask & ~flagged)
    ref_side = float(np.min(np.linalg.norm(reference, axis=1))) if len(centres) else 1.0
    local, disp = bsite_displacement(centres, x[b_idx],
                                     max_distance=bsite_max_distance * ref_side)
    return np.where(local >= 0, b_idx[np.maximum(local, 0)], -1), disp


def _no_bsite(b_site, kind: str):
    if b_site is not None:
        raise ValueError(f"b_site= is for the perovskite path (a B-site column at the centre of "
                         f"each A-site cell); lattice={kind!r} finds primitive cells only")
    return None


def _corner_intensities(intensities, species, corner_index, n: int):
    """(n_cells, 4) intensities of the corners when both intensities and species are given."""
    if intensities is None or species is None:
        return None
    inten = np.asarray(intensities, dtype=np.float64)
    if inten.shape != (n,):
        raise ValueError(
            f"intensities must hold one value per position ({n}); got shape {inten.shape}")
    return inten[corner_index]


def _gates(kind: str, ref_value, geometry: dict, candidate_sides, tol: dict, px,
           corner_values=None) -> dict:
    """Run the lattice gates (:mod:`stemgpu.lattice.gates`); the records of those passed."""
    vectors = geometry["vectors"]
    out: dict = {}
    if kind in ("square", "median", "side"):
        out.update(check_square(vectors, pixel_size=px))
    if corner_values is not None and kind not in ("hexagonal", "generic"):
        out.update(check_corner_checkerboard(corner_values))
    if kind == "hexagonal":
        out.update(check_hexagonal(vectors, pixel_size=px))
    expected = None
    if kind == "side":
        expected = np.array([ref_value, ref_value])
    elif kind == "vectors":
        expected = np.linalg.norm(ref_value, axis=1)
    elif kind in ("hexagonal", "generic") and ref_value is not None and len(vectors):
        lengths = np.median(np.linalg.norm(vectors, axis=2), axis=0)
        candidate_sides = lengths if kind == "hexagonal" else lengths[:1]
        expected = np.full(len(candidate_sides), ref_value)
    if expected is not None and candidate_sides is not None:
        out.update(check_lattice_parameter(candidate_sides, expected,
                                           tolerance=tol["side_tolerance"], pixel_size=px))
    return out


def _primitive_cells(pts: np.ndarray, kind: str, tol: dict):
    """Cells ``[p, p+a1, p+a1+a2, p+a2]`` of the two shortest lattice vectors (hexagonal /
    generic path): quads (n, 4) of point indices, handedness, counts."""
    a = _shortest_translations(pts, kind, tol)
    quads = _translation_quads(pts, a)
    counts = {"candidates": int(len(quads)), "lattice_vectors_px": a.tolist()}
    if len(quads):
        quads = quads[_primitive_ok(pts[quads], tol)]
    counts.update(rejected_shape=counts["candidates"] - int(len(quads)), cells=int(len(quads)))
    return quads, 1.0, counts


def _shortest_translations(pts: np.ndarray, kind: str, tol: dict) -> np.ndarray:
    """The two shortest lattice translations (rows a1, a2; a2 turns towards the col axis).

    A vector is a translation when it carries most points onto points (>= 60 %: a bond of a
    honeycomb carries only one sublattice, <= 50 %). Candidates are the differences to the
    12 nearest neighbours of the 8 points nearest the centroid, each refined as the median
    matched difference over up to 2000 points.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(pts)
    _, seeds = tree.query(pts.mean(axis=0), k=min(8, len(pts)))
    d, nn = tree.query(pts[np.atleast_1d(seeds)], k=min(13, len(pts)))
    cand = (pts[nn[:, 1:]] - pts[np.atleast_1d(seeds)][:, None, :]).reshape(-1, 2)
    sample = pts[:: max(1, len(pts) // 2000)]
    dist, idx = tree.query((sample[None] + cand[:, None]).reshape(-1, 2),
                           distance_upper_bound=0.25 * float(np.median(d[:, 1])))
    hit = np.isfinite(dist).reshape(len(cand), len(sample))
    diff = pts[np.minimum(idx, len(pts) - 1)].reshape(len(cand), len(sample), 2) - sample[None]
    with np.errstate(invalid="ignore"):
        refined = np.nanmedian(np.where(hit[..., None], diff, np.nan), axis=1)
    v = refined[hit.mean(axis=1) >= 0.6]
    if len(v) < 2:
        raise AnalysisError(f"no two lattice translations found among {len(pts)} positions: "
                            f"the points do not form a lattice ({kind!r} path)")
    length = np.linalg.norm(v, axis=1)
    short = length <= length.min() * (1.0 + tol["side_tolerance"])
    a1 = v[short][np.argmax(v[short, 0] / length[short])]  # closest to the +row axis
    sin = _cross(a1, v) / (np.linalg.norm(a1) * length)
    side = sin > 0.5  # 30 to 150 deg from a1, on the col-axis side
    if not side.any():
        raise AnalysisError(f"no second lattice translation found among {len(pts)} positions "
                            f"(only vectors along {np.round(a1, 2).tolist()} px)")
    v2, l2 = v[side], length[side]
    if kind == "hexagonal":
        a2 = v2[np.argmin(np.abs(_angle_between(a1, v2) - 120.0))]
    else:  # shortest; of near-equal ones the most obtuse
        near = l2 <= l2.min() * 1.03
        a2 = v2[near][np.argmax(_angle_between(a1, v2[near]))]
    return np.stack([a1, a2])


def _translation_quads(pts: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Quads ``[p, p+a1, p+a1+a2, p+a2]`` whose corners are all found (within a quarter of the
    shorter vector, stepping from corner to corner so that smooth strain is followed), on
    the largest sublattice connected by these steps (one of the two of a honeycomb)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    tree = cKDTree(pts)
    radius = 0.25 * float(np.min(np.linalg.norm(a, axis=1)))
    n = len(pts)

    def step(src, v):
        dist, j = tree.query(pts[np.maximum(src, 0)] + v, distance_upper_bound=radius)
        return np.where(np.isfinite(dist) & (src >= 0), j, -1)

    i0 = np.arange(n)
    i1, i3 = step(i0, a[0]), step(i0, a[1])
    i2 = step(i1, a[1])
    quads = np.stack([i0, i1, i2, i3], axis=1)
    quads = quads[np.all(quads >= 0, axis=1) & (step(i3, a[0]) == i2)]
    if len(quads) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    edges = np.concatenate([quads[:, [0, 1]], quads[:, [0, 3]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    main = np.argmax(np.bincount(comp[quads[:, 0]]))
    return quads[comp[quads[:, 0]] == main]


def _primitive_ok(corners: np.ndarray, tol: dict) -> np.ndarray:
    """Cells like the median cell: sides within ``side_tolerance`` of its sides, corner angles
    within ``angle_tolerance_deg`` of its angles, opposite sides parallel."""
    e = _edges(corners)
    sides = np.linalg.norm(e, axis=2)
    ref = np.array([np.median(sides[:, [0, 2]]), np.median(sides[:, [1, 3]])])
    angles = _interior_angles(corners)
    gamma = np.median(angles[:, [0, 2]])
    ref_angles = np.array([gamma, 180.0 - gamma, gamma, 180.0 - gamma])
    skew = np.stack([np.linalg.norm(e[:, 0] + e[:, 2], axis=1) / ref[0],
                     np.linalg.norm(e[:, 1] + e[:, 3], axis=1) / ref[1]], axis=1)
    return (np.all(np.abs(sides / ref[[0, 1, 0, 1]] - 1.0) <= tol["side_tolerance"], axis=1)
            & np.all(np.abs(angles - ref_angles) <= tol["angle_tolerance_deg"], axis=1)
            & np.all(skew <= tol["parallelogram_tolerance"], axis=1))


def _result(corner_index, g: dict, reference, comps: dict, bsite_index, disp, flagged, px,
            params: dict) -> UnitCells:
    """Assemble the :class:`UnitCells` of the kept cells (host NumPy arrays)."""
    angles, sides, vectors = g["angles"], g["sides"], g["vectors"]
    some = len(corner_index) > 0
    return UnitCells(
        corner_index=corner_index.reshape(-1, 4).astype(np.int64),
        corners=g["corners"].reshape(-1, 4, 2),
        centres=g["centres"].reshape(-1, 2),
        vectors=vectors.reshape(-1, 2, 2),
        sides=sides.reshape(-1, 4),
        smallest_side=sides.min(axis=1) if some else np.zeros(0),
        longest_side=sides.max(axis=1) if some else np.zeros(0),
        angles_deg=angles.reshape(-1, 4),
        angle_deviation_deg=_angle_between(vectors[:, 0], vectors[:, 1]) - 90.0,
        abs_angle_deviation_deg=np.abs(angles - 90.0).mean(axis=1) if some else np.zeros(0),
        area=g["area"],
        reference=np.asarray(reference, dtype=np.float64),
        deformation_gradient=comps["F"],
        strain=comps["strain"],
        strain_lattice=comps["strain_lattice"],
        rotation_deg=comps["rotation_deg"],
        tetragonal=comps["tetragonal"],
        shear=comps["shear"],
        bsite_index=bsite_index.astype(np.int64),
        bsite_displacement=disp,
        flagged=flagged,
        pixel_size_pm=px,
        parameters=params,
    )
