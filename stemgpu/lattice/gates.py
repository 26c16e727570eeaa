"""Quality gates of the lattice analysis: refuse with a reason rather than report a wrong number.

A gate compares one figure of the data with a limit and raises :class:`AnalysisError` when it
is crossed, with a message that says what was found and what to check. Every gate also
returns a record ``{"value": ..., "limit": ..., "passed": ..., "bound": "max" | "min"}`` that
the caller keeps (e.g. ``UnitCells.parameters["gates"]``) so that a summary can warn when a
gate was close (:func:`gate_warnings`).

The gates and their limits
--------------------------
* **Square A-site cells** (perovskite path, "evaluation of squares only"): the median cell
  (median ``a1`` and median ``a2`` over the accepted cells) must have a side ratio
  ``max(|a1|, |a2|) / min(|a1|, |a2|) <= 1.2`` and ``|angle(a1, a2) - 90 deg| <= 6 deg``.
  Why 1.2: perovskite cells are square to a few per cent (PbTiO3, the most tetragonal common
  one, has c/a = 1.063; uncorrected scan distortion adds a few per cent), while a lattice of
  mixed A- and B-site columns taken as corners gives rectangles of ratio sqrt(2) = 1.414
  (the SrTiO3 ABF failure). 1.2 sits between, at least 0.14 from each. Why 6 deg: half the
  per-cell tolerance ``angle_tolerance_deg`` (12 deg); monoclinic distortions and scan shear
  are below 2 deg, so a median cell sheared by more is not the lattice the user analyses.
* **Hexagonal cells**: the median cell must have ``|a2| / |a1| <= 1.2`` and an angle within
  6 deg of 120 deg (for the same reasons: it is the shape of the lattice, not of one cell).
* **Lattice parameter**: when the user gives one (``lattice=`` in pm, or lattice vectors),
  the median side of the candidate cells along each cell vector must lie within
  ``side_tolerance`` (default 15 %) of it. Beyond that, more than half of the candidates
  would be rejected as non-cells, so the data are not the lattice the user named: wrong
  species at the corners, wrong contrast or a wrong pixel size.
* **One species at the corners** (:func:`check_corner_checkerboard`, when intensities are
  given): the corners of a cell must not alternate between two intensities. A- and B-site
  columns taken together as corners (similar ABF contrast) form a square lattice of side
  ``a / sqrt(2)`` that passes every geometric test, but its corners are a checkerboard of
  the two species.
* **Species separation** (:func:`check_separation`): intensity classes are accepted only when
  every pair of adjacent classes separates with Ashman's ``D >= 4`` (see
  :func:`class_separation` for the measurement behind the limit).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "HEXAGONAL_ANGLE_MAX_DEG",
    "SEPARATION_MIN",
    "SIDE_RATIO_MAX",
    "SQUARE_ANGLE_MAX_DEG",
    "CHECKERBOARD_MAX",
    "CLASS_FRACTION_MIN",
    "AnalysisError",
    "check_corner_checkerboard",
    "check_hexagonal",
    "check_lattice_parameter",
    "check_not_merged",
    "check_separation",
    "check_square",
    "class_separation",
    "gate_warnings",
    "median_cell",
]

#: Largest side ratio ``max(|a1|, |a2|) / min(|a1|, |a2|)`` of the median square or hexagonal
#: cell (see the module docstring).
SIDE_RATIO_MAX = 1.2
#: Largest ``|angle(a1, a2) - 90|`` of the median square cell, degrees.
SQUARE_ANGLE_MAX_DEG = 6.0
#: Largest ``|angle(a1, a2) - 120|`` of the median hexagonal cell, degrees.
HEXAGONAL_ANGLE_MAX_DEG = 6.0
#: Smallest Ashman's D between adjacent intensity classes (see :func:`class_separation`).
SEPARATION_MIN = 4.0
#: Largest checkerboard ratio of the corner intensities (see :func:`check_corner_checkerboard`).
CHECKERBOARD_MAX = 1.5
#: Fewest cells for the checkerboard gate (its ratio scatters more below).
_CHECKERBOARD_MIN_CELLS = 16

_CHECK = ("check the species at the corners (a_site=, or species= labels), the contrast "
          "(bright HAADF/ADF columns or dark ABF/BF columns) and the pixel size")


class AnalysisError(ValueError):
    """A stage ran but its result cannot be trusted or is empty; the message says what was
    found and what to check.

    A subclass of ``ValueError``, so ``except ValueError`` keeps catching refusals.

    Examples
    --------
    >>> from stemgpu.lattice.gates import AnalysisError
    >>> issubclass(AnalysisError, ValueError)
    True
    """


def median_cell(vectors) -> np.ndarray:
    """The median cell: medians of ``a1`` and of ``a2`` over cells (rows of a (2, 2) array).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import median_cell
    >>> v = np.array([[[10.0, 0.0], [0.0, 14.0]], [[10.2, 0.0], [0.0, 14.2]],
    ...               [[9.9, 0.0], [0.0, 14.1]]])
    >>> median_cell(v).tolist()
    [[10.0, 0.0], [0.0, 14.1]]
    """
    return np.median(np.asarray(vectors, dtype=np.float64).reshape(-1, 2, 2), axis=0)


def _shape(cell: np.ndarray) -> tuple[float, float, float, float]:
    """|a1|, |a2|, side ratio (longer / shorter) and angle(a1, a2) in degrees."""
    l1, l2 = np.linalg.norm(cell, axis=1)
    cross = cell[0, 0] * cell[1, 1] - cell[0, 1] * cell[1, 0]
    angle = float(np.degrees(np.arctan2(abs(cross), float(cell[0] @ cell[1]))))
    return float(l1), float(l2), float(max(l1, l2) / min(l1, l2)), angle


def _pm(length_px: float, pixel_size) -> str:
    return f"{length_px * pixel_size:.1f} pm" if pixel_size else f"{length_px:.2f} px"


def check_square(vectors, *, pixel_size=None) -> dict:
    """Refuse a median A-site cell that is not near-square (perovskite path).

    Parameters
    ----------
    vectors : (n, 2, 2) array
        Cell vectors (rows ``a1, a2``) px of the accepted cells; no gate for no cells.
    pixel_size : float, optional
        pm per pixel, for the message.

    Returns
    -------
    dict
        ``{"side_ratio": {"value", "limit", "passed"}, "angle_deviation_deg": {...}}``.

    Raises
    ------
    AnalysisError
        Side ratio above :data:`SIDE_RATIO_MAX` or angle more than
        :data:`SQUARE_ANGLE_MAX_DEG` from 90 deg.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import check_square
    >>> check_square(np.array([[[20.0, 0.0], [0.0, 20.4]]]))["side_ratio"]["passed"]
    True
    >>> check_square(np.array([[[19.0, 0.0], [0.0, 26.9]]]), pixel_size=14.6)
    Traceback (most recent call last):
    ...
    stemgpu.lattice.gates.AnalysisError: the median unit cell is not square: |a1| = 277.4 pm, ...
    """
    if len(vectors) == 0:
        return {}
    l1, l2, ratio, angle = _shape(median_cell(vectors))
    record = {"side_ratio": _record(ratio, SIDE_RATIO_MAX, baseline=1.0),
              "angle_deviation_deg": _record(abs(angle - 90.0), SQUARE_ANGLE_MAX_DEG)}
    if not all(r["passed"] for r in record.values()):
        raise AnalysisError(
            f"the median unit cell is not square: |a1| = {_pm(l1, pixel_size)}, |a2| = "
            f"{_pm(l2, pixel_size)} (ratio {ratio:.3f}, limit {SIDE_RATIO_MAX}), angle "
            f"{angle:.1f} deg (limit 90 +- {SQUARE_ANGLE_MAX_DEG:g}) over {len(vectors)} "
            f"cells; the perovskite path evaluates square A-site cells only: {_CHECK}; for "
            "another lattice pass lattice='generic' or its lattice vectors")
    return record


def check_hexagonal(vectors, *, pixel_size=None) -> dict:
    """Refuse a median cell that is not a 120-degree rhombus (hexagonal path).

    Parameters
    ----------
    vectors : (n, 2, 2) array
        Cell vectors (rows ``a1, a2``) px of the accepted cells; no gate for no cells.
    pixel_size : float, optional
        pm per pixel, for the message.

    Returns
    -------
    dict
        ``{"side_ratio": {...}, "angle_deviation_deg": {...}}`` (angle against 120 deg).

    Raises
    ------
    AnalysisError
        Side ratio above :data:`SIDE_RATIO_MAX` or angle more than
        :data:`HEXAGONAL_ANGLE_MAX_DEG` from 120 deg.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import check_hexagonal
    >>> v = np.array([[[20.0, 0.0], [-10.0, 10.0 * np.sqrt(3)]]])
    >>> round(check_hexagonal(v)["angle_deviation_deg"]["value"], 6)
    0.0
    """
    if len(vectors) == 0:
        return {}
    l1, l2, ratio, angle = _shape(median_cell(vectors))
    record = {"side_ratio": _record(ratio, SIDE_RATIO_MAX, baseline=1.0),
              "angle_deviation_deg": _record(abs(angle - 120.0), HEXAGONAL_ANGLE_MAX_DEG)}
    if not all(r["passed"] for r in record.values()):
        raise AnalysisError(
            f"the median cell is not hexagonal: |a1| = {_pm(l1, pixel_size)}, |a2| = "
            f"{_pm(l2, pixel_size)} (ratio {ratio:.3f}, limit {SIDE_RATIO_MAX}), angle "
            f"{angle:.1f} deg (limit 120 +- {HEXAGONAL_ANGLE_MAX_DEG:g}) over {len(vectors)} "
            f"cells: {_CHECK}; for another lattice pass lattice='generic'")
    return record


def check_lattice_parameter(sides, expected, *, tolerance: float, pixel_size=None) -> dict:
    """Refuse when the data's median cell sides differ from the expected ones.

    Parameters
    ----------
    sides : (2,) array
        Median side length along ``a1`` and along ``a2`` of the candidate cells, px.
    expected : (2,) array
        The sides the user's lattice implies, px.
    tolerance : float
        Largest accepted relative difference (``side_tolerance`` of :func:`stemgpu.unit_cells`).
    pixel_size : float, optional
        pm per pixel, for the message.

    Returns
    -------
    dict
        ``{"lattice_parameter": {"value": largest relative difference, "limit", "passed"}}``.

    Raises
    ------
    AnalysisError
        A relative difference above ``tolerance``.

    Examples
    --------
    >>> from stemgpu.lattice.gates import check_lattice_parameter
    >>> check_lattice_parameter([26.8, 26.7], [26.75, 26.75], tolerance=0.15)[
    ...     "lattice_parameter"]["passed"]
    True
    >>> check_lattice_parameter([18.9, 26.7], [26.75, 26.75], tolerance=0.15, pixel_size=14.6)
    Traceback (most recent call last):
    ...
    stemgpu.lattice.gates.AnalysisError: the lattice found does not match the lattice given: ...
    """
    s = np.asarray(sides, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return {}
    dev = float(np.max(np.abs(s / e - 1.0)))
    record = {"lattice_parameter": _record(dev, float(tolerance))}
    if not record["lattice_parameter"]["passed"]:
        raise AnalysisError(
            f"the lattice found does not match the lattice given: median sides "
            f"{_pm(s[0], pixel_size)} and {_pm(s[1], pixel_size)} against "
            f"{_pm(e[0], pixel_size)} and {_pm(e[1], pixel_size)} of the lattice_parameter= / "
            f"lattice= given (off by {dev:.1%}, limit {tolerance:.0%}): {_CHECK}")
    return record


def check_corner_checkerboard(corner_values, *, limit: float = CHECKERBOARD_MAX) -> dict:
    """Refuse cells whose corners alternate between two intensities (two species as corners).

    Per cell with corner intensities ``I0..I3`` (corners ``[o, o+a1, o+a1+a2, o+a2]``), the
    diagonal contrast ``c = |I0 + I2 - I1 - I3| / 2`` is compared with the spread along the
    diagonals ``s = (|I0 - I2| + |I1 - I3|) / 2``: ``ratio = median(c) / median(s)``. For
    one species with independent noise the ratio is about 0.7; for a checkerboard of two
    species differing by ``k`` noise standard deviations it is about ``k / 0.95``.

    Measured on fitted amplitudes (``tests/test_lattice_gates.py``): Sr corners of simulated
    HAADF SrTiO3 (64 cells, doses 200 and 1000), 0.57 to 0.86; Sr and Ti-O columns of
    simulated ABF SrTiO3 taken together (128 cells; dose 200, where their intensity split
    is refused at D = 3.3), 2.3 to 2.6, and 4.7 to 5.8 at dose 1000. For independent normal
    noise the ratio's 99.9th percentile is 1.66 over 16 cells and 1.05 over 64, so the
    limit :data:`CHECKERBOARD_MAX` = 1.5 is applied from 16 cells on.

    Parameters
    ----------
    corner_values : (n, 4) array
        Intensity of each cell's four corner columns.
    limit : float
        Largest accepted ratio.

    Returns
    -------
    dict
        ``{"corner_checkerboard": {"value": ratio, "limit", "passed"}}`` (empty for fewer
        than 16 cells).

    Raises
    ------
    AnalysisError
        A ratio above ``limit``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import check_corner_checkerboard
    >>> rng = np.random.default_rng(0)
    >>> one = 1.0 + 0.02 * rng.normal(size=(100, 4))
    >>> check_corner_checkerboard(one)["corner_checkerboard"]["passed"]
    True
    >>> check_corner_checkerboard(one + [0.1, 0.0, 0.1, 0.0])
    Traceback (most recent call last):
    ...
    stemgpu.lattice.gates.AnalysisError: the cell corners alternate between two intensities ...
    """
    v = np.asarray(corner_values, dtype=np.float64).reshape(-1, 4)
    if len(v) < _CHECKERBOARD_MIN_CELLS:
        return {}
    same = np.median(0.5 * (np.abs(v[:, 0] - v[:, 2]) + np.abs(v[:, 1] - v[:, 3])))
    cross = np.median(0.5 * np.abs(v[:, 0] + v[:, 2] - v[:, 1] - v[:, 3]))
    ratio = float(cross / same) if same > 0 else (float("inf") if cross > 0 else 0.0)
    record = {"corner_checkerboard": _record(ratio, limit)}
    if not record["corner_checkerboard"]["passed"]:
        raise AnalysisError(
            f"the cell corners alternate between two intensities (checkerboard ratio "
            f"{ratio:.2f}, limit {limit:g}, over {len(v)} cells): two species were taken as "
            "the corner (A-site) columns, e.g. A- and B-site columns of similar ABF contrast, "
            f"and the cells are those of the mixed lattice; {_CHECK}")
    return record


def _record(value: float, limit: float, baseline: float = 0.0) -> dict:
    """A gate record; ``baseline`` is the value of flawless data (1 for a side ratio)."""
    return {"value": float(value), "limit": float(limit), "passed": bool(value <= limit),
            "bound": "max", "baseline": float(baseline)}


def gate_warnings(records: dict, *, closeness: float = 0.8) -> list[str]:
    """One warning line per gate that passed but came close to its limit.

    A gate with an upper limit is close when its value has gone ``closeness`` of the way
    from its ``baseline`` (the value of flawless data: 0, or 1 for a side ratio) to the
    limit; one with a lower limit (the species separation) when its value is below
    ``limit / closeness``.

    Parameters
    ----------
    records : dict
        Gate records, e.g. ``UnitCells.parameters["gates"]`` or the return value of
        :func:`check_separation`.
    closeness : float
        Fraction of the limit (0 to 1) from which a passed gate is reported.

    Returns
    -------
    list of str

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import check_square, gate_warnings
    >>> gate_warnings(check_square(np.array([[[20.0, 0.0], [0.0, 23.5]]])))
    ['gate side_ratio close: 1.18 against the limit 1.2']
    >>> gate_warnings(check_square(np.array([[[20.0, 0.0], [0.0, 20.5]]])))
    []
    """
    out = []
    for name, r in records.items():
        if not r.get("passed", True):
            continue
        value, limit = float(r["value"]), float(r["limit"])
        base = float(r.get("baseline", 0.0))
        close = (value - base > closeness * (limit - base) if r.get("bound", "max") == "max"
                 else value < limit / closeness)
        if close:
            out.append(f"gate {name} close: {value:.3g} against the limit {limit:.3g}")
    return out


def class_separation(values, labels) -> dict:
    """Ashman's D between intensity classes adjacent in mean intensity.

    ``D = sqrt(2) |m1 - m2| / sqrt(s1^2 + s2^2)`` with the class means ``m`` and standard
    deviations ``s``; an infinite D for two classes without spread.

    Parameters
    ----------
    values : (N,) array
        Intensities.
    labels : (N,) array
        Class label of each value.

    Returns
    -------
    dict
        ``{(brighter label, dimmer label): D}`` for each adjacent pair, brightest first.

    Notes
    -----
    D > 2 separates a mixture of two normal classes (Ashman, Bird and Zepelin, J. Heredity
    1994). Classes found by splitting one normal population with k-means also reach
    ``D = 2.65`` (each half has mean +-0.80 s and spread 0.60 s), so the limit
    :data:`SEPARATION_MIN` must lie above that: measured on fitted column amplitudes
    (``benchmarks``-free, ``tests/test_lattice_gates.py``): simulated HAADF SrTiO3, Sr
    against Ti-O, D = 12 to 40 (dose 200 to 5000 counts); one species (square lattice) split
    in two, D = 2.6 to 3.1; simulated ABF SrTiO3 (Sr and Ti-O columns as dips of depth
    Z^(1/3), inverted), D = 2.8 to 3.3. ``D >= 4`` passes the first and fails the others.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import class_separation
    >>> d = class_separation(np.array([1.0, 1.1, 0.9, 0.5, 0.45, 0.55]),
    ...                      np.array(["A", "A", "A", "B", "B", "B"]))
    >>> {k: round(v, 2) for k, v in d.items()}
    {('A', 'B'): 6.32}
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    lab = np.asarray(labels).ravel()
    names = list(dict.fromkeys(lab.tolist()))
    means = np.array([x[lab == n].mean() for n in names])
    stds = np.array([x[lab == n].std(ddof=1) if (lab == n).sum() > 1 else 0.0 for n in names])
    order = np.argsort(-means)
    out = {}
    for i, j in zip(order[:-1], order[1:], strict=True):
        spread = np.hypot(stds[i], stds[j])
        gap = abs(means[i] - means[j])
        out[(names[i], names[j])] = float(np.sqrt(2.0) * gap / spread) if spread > 0 else (
            float("inf") if gap > 0 else 0.0)
    return out


#: Smallest fraction of the columns a class must hold to count as a species (a smaller one
#: is a tail of outliers: edge columns with missing neighbours, failed fits).
CLASS_FRACTION_MIN = 0.1


#: Fewest members of a class whose spread counts in :func:`check_not_merged`.
_CLASS_SIZE_MIN = 3


def _separated(values, labels):
    """(weakest pair, its D, pairs, smallest class fraction, smallest class size)."""
    pairs = class_separation(values, labels)
    lab = np.asarray(labels).ravel()
    sizes = [int(np.sum(lab == n)) for n in set(lab.tolist())]
    fraction = min(sizes) / len(lab)
    if not pairs:
        return None, float("inf"), pairs, fraction, min(sizes)
    weakest, d = min(pairs.items(), key=lambda kv: kv[1])
    return weakest, d, pairs, fraction, min(sizes)


def check_separation(values, labels, *, min_separation: float = SEPARATION_MIN) -> dict:
    """Refuse intensity classes that do not separate.

    Accepted when every pair of classes adjacent in intensity has Ashman's
    ``D >= min_separation`` (:func:`class_separation`) and every class holds at least
    :data:`CLASS_FRACTION_MIN` of the values.

    Parameters
    ----------
    values : (N,) array
        Intensities (e.g. fitted column amplitudes).
    labels : (N,) array
        Class of each value (e.g. from :func:`~stemgpu.lattice.sublattice.assign_by_intensity`).
    min_separation : float
        Smallest accepted D between classes adjacent in intensity.

    Returns
    -------
    dict
        ``{"species_separation": {"value": smallest D, "limit", "passed", "pairs",
        "smallest_class_fraction"}}`` (empty for one class).

    Raises
    ------
    AnalysisError
        A pair of adjacent classes with D below ``min_separation``, or a class holding fewer
        than :data:`CLASS_FRACTION_MIN` of the values.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import check_separation
    >>> x = np.random.default_rng(0).normal(1.0, 0.1, 200)
    >>> check_separation(x, np.where(x > 1.0, "A", "B"))
    Traceback (most recent call last):
    ...
    stemgpu.lattice.gates.AnalysisError: the species split by intensity is not supported ...
    """
    weakest, d, pairs, fraction, _ = _separated(values, labels)
    if weakest is None:
        return {}
    record = {"species_separation": {
        "value": d, "limit": float(min_separation),
        "passed": bool(d >= min_separation and fraction >= CLASS_FRACTION_MIN),
        "bound": "min", "pairs": {f"{a}/{b}": v for (a, b), v in pairs.items()},
        "smallest_class_fraction": fraction}}
    if not record["species_separation"]["passed"]:
        hi, lo = weakest
        raise AnalysisError(
            f"the species split by intensity is not supported by the data: classes {hi!r} "
            f"and {lo!r} overlap (Ashman's D = {d:.2f}, needs >= {min_separation:g}) or a "
            f"class holds only {fraction:.0%} of the columns (needs >= "
            f"{CLASS_FRACTION_MIN:.0%}); the columns have about the same intensity (ABF/BF "
            "contrast, a thick or tilted specimen, or a single species) or a few outliers "
            "(edge columns, failed fits) make a class. Options: fewer classes (n_classes=1 "
            "for one species), species labels from the lattice (assign_by_lattice) or from "
            "the user (species=), or data in which the species differ in intensity (HAADF)")
    return record


def check_not_merged(values, more_labels, n_classes: int, *,
                     min_separation: float = SEPARATION_MIN) -> dict:
    """Refuse an ``n_classes`` split when a split into one class more also separates.

    Then two species with distinct intensities share one of the ``n_classes`` classes (e.g.
    A- and B-site columns as one class beside the O columns in ABF), and a lattice built on
    that class mixes sublattices.

    Parameters
    ----------
    values : (N,) array
        Intensities.
    more_labels : (N,) array
        Labels of a split into ``n_classes + 1`` classes.
    n_classes : int
        The number of classes asked for.
    min_separation : float
        As in :func:`check_separation`.

    Returns
    -------
    dict
        ``{"extra_class_separation": {"value": its smallest D, "limit", "passed"}}``.

    Raises
    ------
    AnalysisError
        The ``n_classes + 1`` classes all separate and each holds at least
        :data:`CLASS_FRACTION_MIN` of the values and at least 3 of them (a spread needs
        them).

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.lattice.gates import check_not_merged
    >>> x = np.repeat([1.0, 0.9, 0.4], 20) + np.random.default_rng(1).normal(0, 0.01, 60)
    >>> check_not_merged(x, np.repeat(["a", "b", "c"], 20), 2)
    Traceback (most recent call last):
    ...
    stemgpu.lattice.gates.AnalysisError: the intensities hold 3 separated classes ...
    """
    weakest, d, pairs, fraction, size = _separated(values, more_labels)
    if weakest is None or len(pairs) < n_classes:  # fewer classes present than asked for
        return {}
    merged = bool(d >= min_separation and fraction >= CLASS_FRACTION_MIN
                  and size >= _CLASS_SIZE_MIN)
    record = {"extra_class_separation": {"value": d, "limit": float(min_separation),
                                         "passed": not merged, "bound": "max"}}
    if merged:
        shown = ", ".join(f"{v:.1f}" for v in pairs.values())
        raise AnalysisError(
            f"the intensities hold {n_classes + 1} separated classes (Ashman's D {shown}) but "
            f"n_classes={n_classes} was asked: two species share one class (e.g. A- and "
            "B-site columns of similar ABF contrast beside the O columns) and a lattice "
            f"built on it mixes sublattices. Options: n_classes={n_classes + 1} with names=, "
            "species labels (assign_by_lattice or species=), or check the contrast")
    return record
