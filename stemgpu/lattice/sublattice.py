"""Sublattice (species) assignment: by fitted intensity, by lattice position, or user labels.

HAADF intensity scales roughly as ``Z**1.7``, so in SrTiO3 [001] the Sr columns are about
twice as bright as the Ti-O columns and the O columns are faint: :func:`assign_by_intensity`
splits the intensities into classes with a 1-D k-means (deterministic, quantile start).
:func:`assign_by_lattice` labels columns by their fractional position in a known lattice
(useful when intensities overlap, e.g. at thick specimen regions). The labels feed
``stemgpu.unit_cells(..., species=labels)``; any user labels work there too (pass
``a_site=`` / ``b_site=`` to name the corner and centre species).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._checks import check_int, check_real
from .gates import SEPARATION_MIN, check_not_merged, check_separation

__all__ = ["DEFAULT_NAMES", "assign_by_intensity", "assign_by_lattice", "cell_edge_midpoints"]

#: Names given to intensity classes, brightest first.
DEFAULT_NAMES = ("A", "B", "O", "C3", "C4", "C5")


def _check_names(names, n: int) -> tuple[str, ...]:
    if names is None:
        if n > len(DEFAULT_NAMES):
            raise ValueError(f"n_classes={n} needs names= (at most {len(DEFAULT_NAMES)} default)")
        return DEFAULT_NAMES[:n]
    names = tuple(str(s) for s in names)
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"names must be {n} distinct labels; got {names!r}")
    return names


def assign_by_intensity(intensities, *, n_classes: int = 3,
                        names: Sequence[str] | None = None, max_iter: int = 100,
                        min_separation: float | None = SEPARATION_MIN) -> np.ndarray:
    """Label columns by intensity class with a 1-D k-means, brightest class first.

    The split is accepted only when the classes are really there: every pair of classes
    adjacent in intensity separates with Ashman's ``D >= min_separation`` and holds at least
    10 % of the columns (:func:`~stemgpu.lattice.gates.check_separation`), and a split into
    one class more does *not* also separate (else two species were merged into one class:
    :func:`~stemgpu.lattice.gates.check_not_merged`).

    Parameters
    ----------
    intensities : (N,) array
        Fitted column intensities (peak or integrated), any unit.
    n_classes : int
        Number of classes (3 for A-site / B-site / O in a perovskite viewed along [001]).
    names : sequence of str, optional
        Label of each class, brightest first; default ``("A", "B", "O")[:n_classes]``.
    max_iter : int
        Lloyd iterations (converges in a few for well-separated classes).
    min_separation : float or None
        Smallest accepted Ashman's D (default :data:`~stemgpu.lattice.gates.SEPARATION_MIN`,
        4); ``None`` labels without testing the split.

    Returns
    -------
    labels : (N,) str array

    Raises
    ------
    ValueError
        For non-finite intensities, fewer intensities than classes, or bad ``names``.
    AnalysisError
        Classes that do not separate, or one class more that does (a ``ValueError``).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.sublattice import assign_by_intensity
    >>> assign_by_intensity(np.array([1.0, 0.47, 0.07, 0.98, 0.5, 0.08])).tolist()
    ['A', 'B', 'O', 'A', 'B', 'O']

    One species split in two is refused:

    >>> one = np.random.default_rng(0).normal(1.0, 0.05, 100)
    >>> assign_by_intensity(one, n_classes=2)
    Traceback (most recent call last):
    ...
    stemgpu.lattice.gates.AnalysisError: the species split by intensity is not supported ...
    """
    x = np.asarray(intensities, dtype=np.float64).ravel()
    n = check_int(n_classes, "n_classes", minimum=1)
    labels_out = _check_names(names, n)
    if len(x) < n:
        raise ValueError(f"intensities must hold at least n_classes={n} values; got {len(x)}")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x))
        raise ValueError(
            f"intensities has {len(bad)} non-finite value(s) (first at index {bad[0]}); "
            "drop or flag failed fits first"
        )
    cls = _kmeans(x, n, max_iter)
    labels = np.asarray(labels_out, dtype=object)[cls].astype(str)
    if min_separation is not None and len(x) > n:
        check_separation(x, labels, min_separation=min_separation)
        # One class more must not also separate: else two species share a class.
        # The one-class-more split starts from the quantiles only: the many starts find the
        # best n-class split of unequal classes (ABF: O columns half of all), but for n + 1
        # they also split off the partial columns at the image edge of small images (a
        # 128^2 HAADF stack measured D = 4.3), which is no merged species.
        check_not_merged(x, _kmeans(x, n + 1, max_iter, multistart=False), n,
                         min_separation=min_separation)
    return labels


def _lloyd(x: np.ndarray, centres: np.ndarray, max_iter: int):
    """Lloyd iterations of 1-D k-means from ``centres``: (classes, centres, within-class SS)."""
    n = len(centres)
    cls = np.full(len(x), -1, dtype=np.int64)
    for _ in range(max_iter):  # iterations over classes, not over columns
        cls_new = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
        counts = np.bincount(cls_new, minlength=n)
        sums = np.bincount(cls_new, weights=x, minlength=n)
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.array_equal(cls_new, cls):
            break
        cls = cls_new
    return cls, centres, float(np.square(x - centres[cls]).sum())


def _kmeans(x: np.ndarray, n: int, max_iter: int, *, multistart: bool = True) -> np.ndarray:
    """1-D k-means: class index, 0 for the brightest.

    Started from the classes' quantiles and from every choice of ``n`` of ten quantiles
    between 5 % and 95 %; the partition with the least within-class sum of squares wins
    (the quantile start first, so a tie keeps it). One start is not enough when the classes
    differ much in size: with the O columns of an ABF image half of all columns, the
    quantile start merges Sr with Ti-O and leaves a class empty.
    """
    import itertools

    grid = np.quantile(x, np.linspace(0.05, 0.95, 10))
    starts = [np.quantile(x, (np.arange(n) + 0.5) / n)]
    if multistart:
        starts += [np.array(c) for c in itertools.combinations(grid, n)]
    best = None
    for start in starts:  # a few dozen starts over classes, each vectorised over columns
        cls, centres, ss = _lloyd(x, start.astype(float), max_iter)
        if best is None or ss < best[2] * (1 - 1e-12):
            best = (cls, centres, ss)
    cls, centres, _ = best
    order = np.argsort(-centres)  # brightest first
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank[cls]


def assign_by_lattice(positions, *, lattice_vectors, origin, basis, names: Sequence[str],
                      tolerance: float = 0.2) -> np.ndarray:
    """Label columns by their fractional position in a known lattice.

    Each column's fractional coordinates ``f = (x - origin) @ inv(V)`` (rows of ``V`` are the
    lattice vectors) are compared, modulo 1, with the basis sites; a column within
    ``tolerance`` (as a fraction of the shorter lattice vector) of a site gets its name,
    others get ``""``. This assumes the lattice is known to better than ``tolerance`` over
    the whole field of view: for strained or distorted data use :func:`assign_by_intensity`
    or correct the distortion first.

    Parameters
    ----------
    positions : (N, 2) array
        Column positions (row, col) px.
    lattice_vectors : (2, 2) array
        Rows a1, a2 in px.
    origin : (row, col)
        Position of one site of ``basis[0]`` (e.g. one A-site column), px.
    basis : (K, 2) array
        Fractional coordinates of the basis sites.
    names : sequence of K str
    tolerance : float

    Returns
    -------
    labels : (N,) str array

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.sublattice import assign_by_lattice
    >>> pos = np.array([[0.0, 0.0], [13.4, 13.4], [13.4, 0.1], [26.8, 26.7], [6.0, 20.0]])
    >>> assign_by_lattice(pos, lattice_vectors=np.eye(2) * 26.75, origin=(0, 0),
    ...                   basis=[[0, 0], [0.5, 0.5], [0.5, 0], [0, 0.5]],
    ...                   names=["Sr", "TiO", "O", "O"]).tolist()
    ['Sr', 'TiO', 'O', 'Sr', '']
    """
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"positions must have shape (N, 2); got {x.shape}")
    v = np.asarray(lattice_vectors, dtype=np.float64)
    if v.shape != (2, 2) or abs(np.linalg.det(v)) < 1e-12:
        raise ValueError(f"lattice_vectors must be a non-singular 2 x 2 array; got {v.tolist()}")
    b = np.atleast_2d(np.asarray(basis, dtype=np.float64))
    names = tuple(str(s) for s in names)
    if b.shape[1] != 2 or len(names) != len(b):
        raise ValueError(f"basis (K, 2) and names (K) must match; got {b.shape} and {len(names)}")
    frac = (x - np.asarray(origin, dtype=np.float64)) @ np.linalg.inv(v)
    d = frac[:, None, :] - b[None, :, :]
    d -= np.rint(d)  # periodic: nearest image of each site
    dist = np.linalg.norm(d @ v, axis=2)  # (N, K) in px
    best = np.argmin(dist, axis=1)
    ok = dist[np.arange(len(x)), best] <= tolerance * np.linalg.norm(v, axis=1).min()
    out = np.asarray(names, dtype=object)[best]
    out[~ok] = ""
    return out.astype(str)


def cell_edge_midpoints(cells, *, merge_distance: float = 1.0) -> np.ndarray:
    """Midpoints of the unit-cell edges, each shared edge once: the O columns of ABO3 [001].

    In a perovskite viewed along [001] the pure-O columns sit half-way between neighbouring
    A-site columns. They are too faint for peak finding at usual doses, but their tails pull
    fits of the B-site columns towards them; fitting them as well (started here) removes
    that bias (Atomap builds its O sublattice the same way, from the A-site planes).

    Parameters
    ----------
    cells : UnitCells
        From :func:`stemgpu.unit_cells` on the A-site columns.
    merge_distance : float
        Midpoints closer than this (px) are one edge shared by two cells.

    Returns
    -------
    (M, 2) float64
        Midpoints (row, col) in px.

    Raises
    ------
    ValueError
        A non-positive ``merge_distance``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.cells import unit_cells
    >>> from stemgpu.lattice.sublattice import cell_edge_midpoints
    >>> grid = np.stack(np.meshgrid(np.arange(3.0), np.arange(3.0), indexing="ij"), -1)
    >>> cells = unit_cells(grid.reshape(-1, 2) * 20 + 5)
    >>> cell_edge_midpoints(cells).shape  # 4 cells share 12 edges
    (12, 2)
    """
    from scipy.spatial import cKDTree

    check_real(merge_distance, "merge_distance", greater=0)
    corners = np.asarray(cells.to_numpy().corners, dtype=np.float64)
    if corners.size == 0:
        return np.zeros((0, 2))
    mids = (0.5 * (corners + np.roll(corners, -1, axis=1))).reshape(-1, 2)
    pairs = cKDTree(mids).query_pairs(merge_distance, output_type="ndarray")
    keep = np.ones(len(mids), dtype=bool)
    # Of every close pair keep the lower index: shared edges appear exactly twice.
    keep[pairs.max(axis=1)] = False
    return mids[keep]
