"""Simulated HAADF-STEM image stacks with exact ground truth.

The simulator renders every pixel analytically at the *true probe position* of that pixel
(never by resampling or Fourier-shifting an image), so tests of registration, fitting and
lattice analysis compare against truth that no algorithm of this library produced.

Scan model
----------
Positions are ``(row, col)`` in pixels of an ideal scan; the fast scan axis is ``col``.
The probe that records pixel ``(r, c)`` of frame ``f`` sits at the sample position

.. math:: s = A \\, (r,\\; c + j_{f,r} + \\phi(c)) + o_f

where ``A`` is the 2 x 2 scan-distortion matrix (identity for a perfect scan), ``j[f, r]`` the
per-line jitter along the fast axis, ``phi(c) = -b exp(-c / tau)`` the flyback settling at line
starts, and ``o[f]`` the frame offset (linear drift + random frame jitter). A column at sample
position ``x`` therefore appears in frame ``f`` near pixel ``A^-1 (x - o_f)``, and the shift
that registers frame ``f`` onto a reference frame (scikit-image sign convention, the shift to
*apply* to the moving frame) is ``A^-1 (o_f - o_ref)``: see :meth:`Truth.registration_shifts`.

Each column is a 2-D Gaussian of the probe width with a peak proportional to ``Z**1.7``
summed over the atoms of the column; ``dose`` is the expected count at the peak of the
brightest species (Sr in SrTiO3) above a constant background of ``background * dose``.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ._checks import check_choice, check_int, check_pair, check_real, fail
from ._progress import progress_bar

__all__ = ["Lattice", "Truth", "simulate_image", "simulate_stack"]

#: Intensity exponent of HAADF contrast (I ~ Z**1.7).
Z_EXPONENT = 1.7
#: Exponent of the dips of ABF contrast: depth ~ (sum of Z over the column)**(1/3), so light
#: atoms are visible and heavy columns differ little.
ABF_Z_EXPONENT = 1.0 / 3.0
_ATOMIC_NUMBER = {"O": 8, "Ti": 22, "Sr": 38, "Mn": 25, "La": 57, "Pb": 82, "Zr": 40,
                  "C": 6, "S": 16, "Mo": 42, "Se": 34, "W": 74}
_CONTRASTS = ("bright", "dark")
#: Default lattice parameter (pm) of each named lattice.
_NAMED_A_PM = {"srtio3": 390.5, "square": 390.5, "mos2": 316.0, "honeycomb": 246.0}


def _column_intensity(atoms: Sequence[str], contrast: str) -> float:
    """Bright (HAADF): sum of Z**1.7 over the column's atoms; dark (ABF): (sum Z)**(1/3)."""
    z = [_ATOMIC_NUMBER[a] for a in atoms]
    if contrast == "bright":
        return float(sum(v ** Z_EXPONENT for v in z))
    return float(sum(z) ** ABF_Z_EXPONENT)


#: Hexagonal lattice vectors (rows a1, a2; 120 deg apart) of unit length, (row, col).
_HEXAGONAL = np.array([[1.0, 0.0], [-0.5, np.sqrt(3.0) / 2.0]])


@dataclass(frozen=True)
class Lattice:
    """A projected 2-D crystal lattice.

    Parameters
    ----------
    vectors_pm : (2, 2) array
        Rows are the lattice vectors a1, a2 as ``(row, col)`` components in picometres
        (before the rotation applied by the simulator).
    basis : (K, 2) array
        Fractional coordinates of the K columns of the unit cell along (a1, a2).
    species : sequence of str
        Name of each basis column (e.g. ``"Sr"``, ``"TiO"``).
    intensity : (K,) array
        Peak intensity of each column relative to the brightest one.
    bsite_species : str or None
        The species moved by a B-site displacement field (``"TiO"`` for SrTiO3).

    Examples
    --------
    >>> from stemgpu.synthetic import Lattice
    >>> sto = Lattice.srtio3()
    >>> sto.species
    ('Sr', 'TiO', 'O', 'O')
    >>> round(float(sto.intensity[1]), 3)
    0.466
    """

    vectors_pm: np.ndarray
    basis: np.ndarray
    species: tuple[str, ...]
    intensity: np.ndarray
    bsite_species: str | None = None

    def __post_init__(self):
        vec = np.asarray(self.vectors_pm, dtype=float)
        basis = np.atleast_2d(np.asarray(self.basis, dtype=float))
        inten = np.asarray(self.intensity, dtype=float).ravel()
        if vec.shape != (2, 2) or not np.all(np.isfinite(vec)) or abs(np.linalg.det(vec)) < 1e-9:
            raise ValueError(
                f"vectors_pm must be a finite, non-singular 2 x 2 array; got {self.vectors_pm!r}"
            )
        if basis.ndim != 2 or basis.shape[1] != 2 or len(basis) == 0:
            raise ValueError(f"basis must have shape (K, 2) with K >= 1; got shape {basis.shape}")
        if len(self.species) != len(basis) or len(inten) != len(basis):
            raise ValueError(
                f"species ({len(self.species)}) and intensity ({len(inten)}) must have one entry "
                f"per basis column ({len(basis)})"
            )
        if np.any(inten <= 0) or not np.all(np.isfinite(inten)):
            raise ValueError(f"intensity must be positive and finite; got {inten.tolist()}")
        object.__setattr__(self, "vectors_pm", vec)
        object.__setattr__(self, "basis", basis)
        object.__setattr__(self, "intensity", inten / inten.max())
        object.__setattr__(self, "species", tuple(str(s) for s in self.species))

    @classmethod
    def srtio3(cls, a_pm: float = 390.5, contrast: str = "bright") -> Lattice:
        """SrTiO3 viewed along [001]: Sr, Ti-O and two O columns per cell.

        ``contrast="bright"`` (HAADF): peaks ~ Z**1.7 summed over the column's atoms;
        ``"dark"`` (ABF): dip depths ~ (sum of Z)**(1/3) (Sr 1, Ti-O 0.93, O 0.60), so the O
        columns are visible and the Sr and Ti-O columns differ little.
        """
        contrast = check_choice(contrast, "contrast", _CONTRASTS)
        z = _ATOMIC_NUMBER
        if contrast == "bright":
            inten = [
                z["Sr"] ** Z_EXPONENT,
                z["Ti"] ** Z_EXPONENT + z["O"] ** Z_EXPONENT,
                z["O"] ** Z_EXPONENT,
                z["O"] ** Z_EXPONENT,
            ]
        else:
            inten = [_column_intensity(c, "dark") for c in (["Sr"], ["Ti", "O"], ["O"], ["O"])]
        return cls(
            vectors_pm=np.array([[a_pm, 0.0], [0.0, a_pm]]),
            basis=np.array([[0.0, 0.0], [0.5, 0.5], [0.5, 0.0], [0.0, 0.5]]),
            species=("Sr", "TiO", "O", "O"),
            intensity=np.array(inten),
            bsite_species="TiO",
        )

    @classmethod
    def square(cls, a_pm: float = 390.5, species: str = "X") -> Lattice:
        """A simple square lattice with one column per cell."""
        return cls(np.array([[a_pm, 0.0], [0.0, a_pm]]), np.zeros((1, 2)), (species,), np.ones(1))

    @classmethod
    def mos2(cls, a_pm: float = 316.0, contrast: str = "bright") -> Lattice:
        """2H-MoS2 viewed along [001]: a honeycomb of Mo and S2 columns (a = 316 pm).

        Lattice vectors 120 deg apart; Mo at fractional (1/3, 2/3), the S2 column (two S
        atoms on top of each other) at (2/3, 1/3). Bright (HAADF, Z**1.7): S2 is 0.39 of
        Mo; dark (ABF, (sum Z)**(1/3)): 0.91.

        Examples
        --------
        >>> from stemgpu.synthetic import Lattice
        >>> lat = Lattice.mos2()
        >>> lat.species, round(float(lat.intensity[1]), 3)
        (('Mo', 'S2'), 0.388)
        """
        contrast = check_choice(contrast, "contrast", _CONTRASTS)
        inten = [_column_intensity(["Mo"], contrast), _column_intensity(["S", "S"], contrast)]
        return cls(_HEXAGONAL * a_pm, np.array([[1 / 3, 2 / 3], [2 / 3, 1 / 3]]), ("Mo", "S2"),
                   np.array(inten))

    @classmethod
    def graphene(cls, a_pm: float = 246.0, species: str = "C") -> Lattice:
        """Graphene: a honeycomb of one species, two columns per cell (a = 246 pm).

        The two columns at fractional (1/3, 2/3) and (2/3, 1/3) are equally bright; the
        nearest-neighbour distance is ``a / sqrt(3)`` (142 pm), and the lattice vectors of
        the cells join columns of the same sublattice.

        Examples
        --------
        >>> from stemgpu.synthetic import Lattice
        >>> Lattice.graphene().species
        ('C', 'C')
        """
        return cls(_HEXAGONAL * a_pm, np.array([[1 / 3, 2 / 3], [2 / 3, 1 / 3]]),
                   (species, species), np.ones(2))


@dataclass(frozen=True)
class Truth:
    """Everything the simulator used, in pixels unless the name carries a unit.

    Attributes
    ----------
    positions : (N, 2) float64
        Column positions in sample coordinates (row, col), px. A column appears in frame
        ``f`` near ``image_positions(f)``.
    species : (N,) str array
    intensity : (N,) relative peak intensity (1 for the brightest species)
    offsets : (F, 2)
        Probe offset of each frame, ``drift + jitter``.
    drift, jitter : (F, 2)
        The smooth (linear) and random parts of ``offsets``.
    line_jitter : (F, H)
        Per-line offset of the probe along the fast axis (col), px.
    distortion : (2, 2)
        Scan-distortion matrix ``A``.
    lattice_vectors : (2, 2)
        Rows a1, a2 in sample pixels after rotation (before strain).
    displacement : (N, 2)
        Strain displacement plus B-site displacement applied to each column, px.
    bsite_displacement : (N, 2)
        The B-site part of ``displacement`` (zero for other species), px.
    removed_positions : (M, 2)
        Columns removed as vacancies (not rendered).
    contrast : {"bright", "dark"}
        Columns rendered as peaks above the background or as dips below it.
    """

    positions: np.ndarray
    species: np.ndarray
    intensity: np.ndarray
    offsets: np.ndarray
    drift: np.ndarray
    jitter: np.ndarray
    line_jitter: np.ndarray
    distortion: np.ndarray
    lattice_vectors: np.ndarray
    displacement: np.ndarray
    bsite_displacement: np.ndarray
    removed_positions: np.ndarray
    pixel_size_pm: float
    probe_sigma_pm: float
    dose: float | None
    background: float
    flyback_amplitude: float
    flyback_decay: float
    shape: tuple[int, int, int]
    lattice: Lattice
    rotation_deg: float
    parameters: dict = field(default_factory=dict)
    contrast: str = "bright"

    @property
    def probe_sigma_px(self) -> float:
        """Probe (column) Gaussian width in pixels."""
        return self.probe_sigma_pm / self.pixel_size_pm

    def image_positions(self, frame: int | None = None) -> np.ndarray:
        """Pixel positions ``A^-1 (x - o_f)`` of the columns in frame ``frame``.

        Line jitter and flyback are not included (they act per scan line). With
        ``frame=None`` the positions in every frame are returned, shape (F, N, 2).
        """
        ainv = np.linalg.inv(self.distortion)
        if frame is None:
            rel = self.positions[None, :, :] - self.offsets[:, None, :]
            return rel @ ainv.T
        return (self.positions - self.offsets[frame]) @ ainv.T

    def registration_shifts(self, reference: int | str = "mean") -> np.ndarray:
        """True shifts (F, 2) that register each frame onto the reference.

        Follows scikit-image's sign: applying ``shift[f]`` to frame ``f`` (e.g. with
        ``scipy.ndimage.shift``) moves its content onto the reference. ``reference`` is a
        frame index or ``"mean"`` (the frame at the mean offset).
        """
        if isinstance(reference, str):
            if reference != "mean":
                raise ValueError(f"reference must be a frame index or 'mean'; got {reference!r}")
            ref = self.offsets.mean(axis=0)
        else:
            ref = self.offsets[int(reference)]
        return (self.offsets - ref) @ np.linalg.inv(self.distortion).T

    def visible(self, frame: int = 0, margin: float = 0.0) -> np.ndarray:
        """Mask of columns whose image position lies at least ``margin`` px inside frame."""
        _, h, w = self.shape
        p = self.image_positions(frame)
        return (
            (p[:, 0] >= margin)
            & (p[:, 0] <= h - 1 - margin)
            & (p[:, 1] >= margin)
            & (p[:, 1] <= w - 1 - margin)
        )


#: Largest stack, in pixels: 2**31 float32 values are 8 GiB, more than any simulated test
#: stack needs, and the index arithmetic of the renderer stays within int64 by far.
_MAX_PIXELS = 2**31
#: Largest scan offset terms (line jitter, flyback lag), px: real ones are a fraction of a
#: pixel to a few px, and the rendering window of every column grows with their square.
_MAX_SCAN_PX = 32.0
#: Largest dose and background (counts): no detector pixel counts 1e12 electrons, and
#: Poisson draws fail near 1e19.
_MAX_COUNTS = 1e12


def _shape_error(shape):
    fail("shape", f"(frames, rows, cols) or (rows, cols) of integers, at most {_MAX_PIXELS} "
         "pixels in all, with every size >= 1", shape)


def _check_shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, str | bytes | dict) or not isinstance(shape, Iterable):
        _shape_error(shape)
    dims = []
    for s in shape:
        if isinstance(s, bool | np.bool_) or not isinstance(s, numbers.Real) \
                or not math.isfinite(s) or s != int(s):
            _shape_error(shape)
        dims.append(int(s))
    if len(dims) == 2:
        dims = [1, *dims]
    if len(dims) != 3 or min(dims) < 1 or math.prod(dims) > _MAX_PIXELS:
        _shape_error(shape)
    return tuple(dims)  # type: ignore[return-value]


def _as_float_array(value, name: str, accepted: str) -> np.ndarray:
    """``value`` as a finite float array, or the project's message naming ``name``."""
    if isinstance(value, str | bytes | dict):
        fail(name, accepted, value)
    try:
        a = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        fail(name, accepted, value)
    if not np.all(np.isfinite(a)):
        fail(name, accepted, value)
    return a


def _check_distortion(distortion) -> np.ndarray:
    if distortion is None:
        return np.eye(2)
    a = _as_float_array(distortion, "distortion", "a finite 2 x 2 matrix")
    if a.shape != (2, 2):
        raise ValueError(f"distortion must be a finite 2 x 2 matrix; got {distortion!r}")
    if abs(np.linalg.det(a)) < 1e-6 or np.linalg.cond(a) > 1e6:
        raise ValueError(
            f"distortion must be non-singular (|det| >= 1e-6, condition number <= 1e6); got "
            f"{a.tolist()} with det {np.linalg.det(a):.3g}"
        )
    return a


def _lattice_sites(lattice: Lattice, vectors_px: np.ndarray, corners: np.ndarray):
    """All basis columns whose position falls inside the box spanned by ``corners``."""
    inv = np.linalg.inv(vectors_px)  # rows of vectors_px are a1, a2: x = n @ vectors_px
    frac = corners @ inv
    lo = np.floor(frac.min(axis=0)) - 1
    hi = np.ceil(frac.max(axis=0)) + 1
    n1, n2 = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    cells = np.stack([n1.ravel(), n2.ravel()], axis=1)
    frac_all = cells[:, None, :] + lattice.basis[None, :, :]
    pos = frac_all.reshape(-1, 2) @ vectors_px
    kinds = np.tile(np.arange(len(lattice.basis)), len(cells))
    box_lo, box_hi = corners.min(axis=0), corners.max(axis=0)
    inside = np.all((pos >= box_lo) & (pos <= box_hi), axis=1)
    return pos[inside], kinds[inside]


def _evaluate_field(value, positions: np.ndarray, name: str, scale: float = 1.0) -> np.ndarray:
    """Displacement (N, 2) px from None, a constant pair, a 2x2 gradient or a callable."""
    if value is None:
        return np.zeros_like(positions)
    if callable(value):
        out = np.asarray(value(positions.copy()), dtype=float) * scale
        if out.shape != positions.shape or not np.all(np.isfinite(out)):
            raise ValueError(
                f"{name} callable must return a finite array of shape {positions.shape}; "
                f"got shape {out.shape}"
            )
        return out
    arr = _as_float_array(value, name, "None, a finite (row, col) pair, a finite 2 x 2 "
                          "displacement gradient or a callable")
    if arr.shape == (2,):
        return np.broadcast_to(arr * scale, positions.shape).copy()
    if arr.shape == (2, 2):
        centre = positions.mean(axis=0) if len(positions) else np.zeros(2)
        return (positions - centre) @ arr.T * scale
    raise ValueError(
        f"{name} must be None, a (row, col) pair, a 2 x 2 displacement gradient or a callable; "
        f"got an array of shape {arr.shape}"
    )


def _render_frame(
    h: int,
    w: int,
    positions: np.ndarray,
    amplitude: np.ndarray,
    sigma: float,
    distortion: np.ndarray,
    offset: np.ndarray,
    line_jitter: np.ndarray,
    fly_b: float,
    fly_tau: float,
    radius: int,
) -> np.ndarray:
    """Noise-free frame: sum of column Gaussians at each pixel's true probe position."""
    ainv = np.linalg.inv(distortion)
    q = (positions - offset) @ ainv.T  # where each column lands in pixel space
    keep = (
        (q[:, 0] > -radius - 1) & (q[:, 0] < h + radius) & (q[:, 1] > -radius - 1)
        & (q[:, 1] < w + radius)
    )
    q, amp = q[keep], amplitude[keep]
    out = np.zeros(h * w, dtype=np.float64)
    if len(q) == 0:
        return out.reshape(h, w)
    d = np.arange(-radius, radius + 1)
    dr, dc = (g.ravel() for g in np.meshgrid(d, d, indexing="ij"))
    inv2s2 = 1.0 / (2.0 * sigma * sigma)
    block = max(1, 2_000_000 // len(dr))
    for start in range(0, len(q), block):
        qb, ab = q[start : start + block], amp[start : start + block]
        r0 = np.rint(qb[:, 0]).astype(np.int64)
        c0 = np.rint(qb[:, 1]).astype(np.int64)
        rows = r0[:, None] + dr[None, :]
        cols = c0[:, None] + dc[None, :]
        valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        rows_c = np.clip(rows, 0, h - 1)
        cols_c = np.clip(cols, 0, w - 1)
        # Pixel offsets from the column's nominal pixel position are small numbers, so the
        # probe-minus-column vector keeps full precision: s - x = A @ ((r, c_eff) - q).
        u = rows - qb[:, 0:1]
        v = cols - qb[:, 1:2] + line_jitter[rows_c]
        if fly_b != 0.0:
            v = v - fly_b * np.exp(-cols_c / fly_tau)
        sr = distortion[0, 0] * u + distortion[0, 1] * v
        sc = distortion[1, 0] * u + distortion[1, 1] * v
        val = ab[:, None] * np.exp(-(sr * sr + sc * sc) * inv2s2)
        idx = rows_c * w + cols_c
        out += np.bincount(idx[valid], weights=val[valid], minlength=h * w)
    return out.reshape(h, w)


def simulate_stack(
    shape: Sequence[int] = (10, 256, 256),
    *,
    lattice: Lattice | str = "SrTiO3",
    lattice_parameter_pm: float | None = None,
    rotation_deg: float = 0.0,
    pixel_size_pm: float = 14.6,
    probe_sigma_pm: float = 50.0,
    dose: float | None = 200.0,
    background: float = 0.05,
    read_noise: float = 0.0,
    drift_px: Sequence[float] | float = (0.0, 0.0),
    frame_jitter_px: Sequence[float] | float = 0.0,
    line_jitter_px: float = 0.0,
    flyback_px: float = 0.0,
    flyback_decay_px: float = 8.0,
    distortion=None,
    strain=None,
    bsite_displacement_pm=None,
    vacancies: float = 0.0,
    origin_px: Sequence[float] | None = None,
    seed: int | np.random.Generator | None = 0,
    progress: bool = False,
    contrast: str = "bright",
) -> tuple[np.ndarray, Truth]:
    """Simulate a HAADF-STEM image stack with exact ground truth.

    Parameters
    ----------
    shape : (frames, rows, cols) or (rows, cols)
        Stack size.
    lattice : Lattice or "SrTiO3", "square", "MoS2" or "honeycomb"
        Projected crystal; ``lattice_parameter_pm`` rescales the named lattices. ``"MoS2"``
        is :meth:`Lattice.mos2` (Mo and S2 on a honeycomb), ``"honeycomb"`` is
        :meth:`Lattice.graphene` (one species on a honeycomb).
    lattice_parameter_pm : float, optional
        Lattice parameter of the named lattices (default 390.5 pm for SrTiO3 and square,
        316 pm for MoS2, 246 pm for the honeycomb).
    rotation_deg : float
        In-plane rotation of the lattice vectors, degrees.
    pixel_size_pm : float
        Pixel size of the ideal scan (default 14.6 pm).
    probe_sigma_pm : float
        Gaussian width (sigma) of every column image (default 50 pm).
    dose : float or None
        Expected counts at the peak of the brightest column above background; Poisson noise
        is drawn at this dose. ``None`` renders the noise-free expectation in these units
        with ``dose=1``.
    background : float
        Constant background as a fraction of ``dose``.
    read_noise : float
        Standard deviation of additive Gaussian detector noise, in counts.
    drift_px : float or (row, col)
        Linear drift of the probe offset, px per frame; offsets are centred on the middle frame.
    frame_jitter_px : float or (row, col)
        Standard deviation of the random per-frame offset, px.
    line_jitter_px : float
        Standard deviation of the per-scan-line offset along the fast axis (col), px.
    flyback_px, flyback_decay_px : float
        Flyback settling: the probe lags by ``flyback_px * exp(-col / flyback_decay_px)``
        at line starts.
    distortion : (2, 2) array, optional
        Scan-distortion matrix ``A`` (see the module docstring). Identity when omitted.
    strain : None, (2, 2) array or callable
        A 2 x 2 displacement gradient (applied about the centre of the columns) or a callable
        mapping positions (N, 2) px to displacements (N, 2) px.
    bsite_displacement_pm : None, (row, col) pair or callable
        Displacement of the B-site columns (Ti-O in SrTiO3) in pm: a constant pair or a
        callable mapping positions (N, 2) px to displacements (N, 2) pm.
    vacancies : float
        Fraction of columns removed at random (kept in ``truth.removed_positions``).
    origin_px : (row, col), optional
        Sample position of the lattice origin; default a random sub-pixel position.
    seed : int, Generator or None
        Random seed (noise, jitter, vacancies, origin).
    progress : bool
        Show a tqdm progress bar over frames.
    contrast : {"bright", "dark"}
        ``"bright"`` (HAADF/ADF): columns are peaks above the background. ``"dark"``
        (ABF-like): columns are dips of depth ``dose * intensity`` below a bright level of
        ``background * dose``, so ``background`` must be above 1 (e.g. 4); the named
        lattices then use ABF depths ``~ (sum Z)**(1/3)`` (:meth:`Lattice.srtio3`), a given
        :class:`Lattice` its ``intensity`` as depths. Noise is Poisson on the counts
        either way; ``truth.intensity`` holds the depths.

    Returns
    -------
    stack : ndarray, float32, shape (frames, rows, cols)
    truth : Truth

    Raises
    ------
    ValueError
        For a zero-size or malformed ``shape``, a negative ``dose`` or ``read_noise``, a
        non-positive ``pixel_size_pm`` or ``probe_sigma_pm``, a singular ``distortion``, or a
        ``vacancies`` fraction outside [0, 1).

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_stack
    >>> stack, truth = simulate_stack((3, 64, 64), frame_jitter_px=0.5, seed=1)
    >>> stack.shape, stack.dtype.name
    ((3, 64, 64), 'float32')
    >>> truth.registration_shifts().shape
    (3, 2)

    Dark (ABF-like) SrTiO3: the columns are dips below a bright background.

    >>> abf, t = simulate_stack((1, 64, 64), contrast="dark", background=4.0, dose=None)
    >>> bool(abf.max() <= 4.0 and abf.min() < 3.2), t.contrast
    (True, 'dark')
    """
    n, h, w = _check_shape(shape)
    o = _check_options(pixel_size_pm=pixel_size_pm, probe_sigma_pm=probe_sigma_pm, dose=dose,
                       background=background, read_noise=read_noise, drift_px=drift_px,
                       frame_jitter_px=frame_jitter_px, line_jitter_px=line_jitter_px,
                       flyback_px=flyback_px, flyback_decay_px=flyback_decay_px,
                       vacancies=vacancies, contrast=contrast, frame=(n, h, w))
    a_mat = _check_distortion(distortion)
    if not (seed is None or isinstance(seed, np.random.Generator)):
        check_int(seed, "seed", minimum=0)
    rotation_deg = check_real(rotation_deg, "rotation_deg")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    lat = _resolve_lattice(lattice, lattice_parameter_pm, o["contrast"])
    _check_cell_size(lat, o["pixel"])
    scan = _scan_offsets(rng, n, h, o)
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    vectors_px = lat.vectors_pm @ rot.T / o["pixel"]
    box_corners = _sample_box(h, w, a_mat, scan["offsets"], o)
    origin = (
        rng.uniform(0.0, 1.0, size=2) * np.abs(vectors_px).sum(axis=0)
        if origin_px is None
        else np.array(check_pair(origin_px, "origin_px"))
    )
    cols = _place_columns(lat, vectors_px, box_corners, origin, strain, bsite_displacement_pm,
                          o, rng)
    stack = _render_stack(rng, (n, h, w), cols, a_mat, scan, o, progress)
    truth = Truth(
        positions=cols["positions"],
        species=cols["species"],
        intensity=cols["amplitude"],
        offsets=scan["offsets"],
        drift=scan["drift"],
        jitter=scan["jitter"],
        line_jitter=scan["line_jitter"],
        distortion=a_mat,
        lattice_vectors=vectors_px,
        displacement=cols["displacement"],
        bsite_displacement=cols["bsite_displacement"],
        removed_positions=cols["removed"],
        pixel_size_pm=o["pixel"],
        probe_sigma_pm=o["sigma_pm"],
        dose=o["dose"],
        background=o["background"],
        flyback_amplitude=o["fly_b"],
        flyback_decay=o["fly_tau"],
        shape=(n, h, w),
        lattice=lat,
        rotation_deg=float(rotation_deg),
        contrast=o["contrast"],
        parameters={
            "read_noise": o["read_noise"],
            "drift_px": o["drift"].tolist(),
            "frame_jitter_px": o["jit_sigma"].tolist(),
            "line_jitter_px": o["line_sigma"],
            "vacancies": o["vacancies"],
            "seed": seed if isinstance(seed, int | None) else "generator",
        },
    )
    return stack, truth


# ----------------------------------------------------------------------------- passes

def _check_options(*, pixel_size_pm, probe_sigma_pm, dose, background, read_noise, drift_px,
                   frame_jitter_px, line_jitter_px, flyback_px, flyback_decay_px,
                   vacancies, contrast, frame) -> dict:
    """The scalar and pair options of :func:`simulate_stack`, checked and converted.

    The bounds keep the work of rendering in proportion to the frame: a probe, a drift or a
    jitter larger than the frame records no image of the lattice, and each column is rendered
    in a window that grows with the probe width and the scan offsets.
    """
    n, h, w = frame
    long_side = max(h, w, 4)  # small frames get the bounds of a 4 px one
    pixel = check_real(pixel_size_pm, "pixel_size_pm", greater=0)
    sigma_pm = check_real(probe_sigma_pm, "probe_sigma_pm", greater=0)
    # The probe in px: narrower than 1e-3 px is point sampling (and 1 / sigma**2 overflows
    # near 1e-154); wider than a quarter of the frame (or 32 px) resolves no lattice.
    sigma_max = min(_MAX_SCAN_PX, max(4.0, long_side / 4.0))
    if not 1e-3 <= sigma_pm / pixel <= sigma_max:
        fail("probe_sigma_pm / pixel_size_pm", f"a probe width in px >= 0.001 and <= "
             f"{sigma_max:g} (a quarter of the frame size, at least 4, at most 32)",
             f"{sigma_pm!r} pm / {pixel!r} pm")
    # Beyond a frame per frame (drift) or a frame's size (jitter) consecutive frames share
    # nothing; the sample box, hence the column count, grows with them.
    drift = np.array(check_pair(drift_px, "drift_px"))
    if np.any(np.abs(drift) > long_side):
        fail("drift_px", f"at most the frame size ({long_side} px) per frame", drift_px)
    jit_sigma = np.array(check_pair(frame_jitter_px, "frame_jitter_px", minimum=0))
    if np.any(jit_sigma > long_side):
        fail("frame_jitter_px", f"a standard deviation >= 0 and <= the frame size "
             f"({long_side} px)", frame_jitter_px)
    scan_max = min(_MAX_SCAN_PX, max(4.0, w / 4.0))  # about a quarter of a line at most
    vac = check_real(vacancies, "vacancies", minimum=0)
    if vac >= 1.0:
        fail("vacancies", "a fraction in [0, 1)", vacancies)
    contrast = check_choice(contrast, "contrast", _CONTRASTS)
    if contrast == "dark" and not check_real(background, "background", minimum=0) > 1.0:
        fail("background", "a number > 1 with contrast='dark' (the bright level as a multiple "
             "of dose, above the deepest dip)", background)
    return {
        "contrast": contrast,
        "pixel": pixel,
        "sigma_pm": sigma_pm,
        "dose": None if dose is None else _counts(check_real(dose, "dose", greater=0),
                                                  "dose"),
        "background": _counts(check_real(background, "background", minimum=0), "background"),
        "read_noise": _counts(check_real(read_noise, "read_noise", minimum=0), "read_noise"),
        "line_sigma": check_real(line_jitter_px, "line_jitter_px", minimum=0,
                                 maximum=scan_max / 4.0),  # its largest draw is ~4 sigma
        "fly_b": check_real(flyback_px, "flyback_px", minimum=-scan_max, maximum=scan_max),
        "fly_tau": check_real(flyback_decay_px, "flyback_decay_px", greater=0),
        "drift": drift,
        "jit_sigma": jit_sigma,
        "vacancies": vac,
    }


def _counts(value: float, name: str) -> float:
    if value > _MAX_COUNTS:
        fail(name, f"at most {_MAX_COUNTS:g} counts", value)
    return value


def _check_cell_size(lat: Lattice, pixel: float) -> None:
    """Cells of at least half a pixel: finer lattices are not resolved by the scan (Nyquist
    needs two px per period) and the column count grows as the inverse square."""
    a_pm = float(np.linalg.norm(lat.vectors_pm, axis=1).min())
    if not a_pm >= 0.5 * pixel:
        fail("lattice_parameter_pm / pixel_size_pm", "a lattice cell of at least 0.5 px",
             f"{a_pm!r} pm / {pixel!r} pm")


def _resolve_lattice(lattice, lattice_parameter_pm, contrast: str = "bright") -> Lattice:
    """A :class:`Lattice` from a Lattice or a name, rescaled by ``lattice_parameter_pm``."""
    if isinstance(lattice, Lattice):
        return lattice
    if isinstance(lattice, str) and lattice.lower() in _NAMED_A_PM:
        key = lattice.lower()
        a_pm = _NAMED_A_PM[key] if lattice_parameter_pm is None else lattice_parameter_pm
        # 1e12 pm (1 m) is far beyond any field of view; below 1 pm, a thousandth of the
        # shortest bond, the cell is refused here (the cell-size check follows).
        a_pm = check_real(a_pm, "lattice_parameter_pm", greater=0, maximum=1e12)
        if a_pm < 1.0:
            fail("lattice_parameter_pm", "at least 1 pm", lattice_parameter_pm)
        if key == "srtio3":
            return Lattice.srtio3(a_pm, contrast=contrast)
        if key == "mos2":
            return Lattice.mos2(a_pm, contrast=contrast)
        if key == "honeycomb":
            return Lattice.graphene(a_pm)
        return Lattice.square(a_pm)
    raise ValueError(f"lattice must be a Lattice, 'SrTiO3' or 'square' (or 'MoS2', "
                     f"'honeycomb'); got {lattice!r}")


def _scan_offsets(rng, n: int, h: int, o: dict) -> dict:
    """Frame offsets (linear drift centred on the middle frame plus jitter), line jitter."""
    t = np.arange(n) - (n - 1) / 2.0
    drift_part = t[:, None] * o["drift"][None, :]
    jitter_part = rng.normal(size=(n, 2)) * o["jit_sigma"][None, :]
    line_sigma = o["line_sigma"]
    line_jit = rng.normal(scale=line_sigma, size=(n, h)) if line_sigma > 0 else np.zeros((n, h))
    return {"offsets": drift_part + jitter_part, "drift": drift_part, "jitter": jitter_part,
            "line_jitter": line_jit}


def _sample_box(h: int, w: int, a_mat, offsets, o: dict) -> np.ndarray:
    """Corners of a sample box covering every probe position of every frame, with tails."""
    sigma_px = o["sigma_pm"] / o["pixel"]
    margin = 8.0 * sigma_px + 4.0 * o["line_sigma"] + abs(o["fly_b"]) + 2.0
    corners_pix = np.array([[0, 0], [0, w - 1], [h - 1, 0], [h - 1, w - 1]], dtype=float)
    all_corners = (corners_pix @ a_mat.T)[None, :, :] + offsets[:, None, :]
    all_corners = all_corners.reshape(-1, 2)
    box = np.array(
        [all_corners.min(axis=0) - margin, all_corners.max(axis=0) + margin]
    )
    return np.array([box[0], [box[0, 0], box[1, 1]], [box[1, 0], box[0, 1]], box[1]])


def _place_columns(lat: Lattice, vectors_px, box_corners, origin, strain,
                   bsite_displacement_pm, o: dict, rng) -> dict:
    """Column positions, species and amplitudes in the box: strain, B-site field, vacancies."""
    pos, kinds = _lattice_sites(lat, vectors_px, box_corners - origin)
    pos = pos + origin
    strain_disp = _evaluate_field(strain, pos, "strain")
    is_b = np.array([lat.species[k] == lat.bsite_species for k in kinds], dtype=bool)
    b_disp = np.zeros_like(pos)
    if bsite_displacement_pm is not None:
        if lat.bsite_species is None:
            raise ValueError("bsite_displacement_pm needs a lattice with bsite_species set")
        b_disp[is_b] = _evaluate_field(bsite_displacement_pm, pos[is_b], "bsite_displacement_pm",
                                       scale=1.0 / o["pixel"])
    cols = {"positions": pos + strain_disp + b_disp, "displacement": strain_disp + b_disp,
            "bsite_displacement": b_disp, "amplitude": lat.intensity[kinds],
            "species": np.array([lat.species[k] for k in kinds]), "removed": np.zeros((0, 2))}
    if o["vacancies"] > 0:
        drop = rng.random(len(pos)) < o["vacancies"]
        cols["removed"] = cols["positions"][drop]
        for key in ("positions", "displacement", "bsite_displacement", "amplitude", "species"):
            cols[key] = cols[key][~drop]
    return cols


def _render_stack(rng, shape, cols: dict, a_mat, scan: dict, o: dict, progress: bool):
    """Every frame rendered at the true probe positions, plus Poisson and read noise."""
    n, h, w = shape
    sigma_px = o["sigma_pm"] / o["pixel"]
    line_jit, fly_b = scan["line_jitter"], o["fly_b"]
    ainv_norm = np.linalg.norm(np.linalg.inv(a_mat), 2)
    max_line = float(np.abs(line_jit).max()) if o["line_sigma"] > 0 else 0.0
    radius = int(np.ceil(6.0 * sigma_px * ainv_norm + max_line + abs(fly_b) + 1.0))
    dose = o["dose"]
    scale = 1.0 if dose is None else dose
    stack = np.empty((n, h, w), dtype=np.float32)
    bar = progress_bar(progress, total=n, desc="simulate", unit="frame")

    def render(f):
        return _render_frame(
            h, w, cols["positions"], cols["amplitude"], sigma_px, a_mat, scan["offsets"][f],
            line_jit[f], fly_b, o["fly_tau"], radius,
        )

    for f, clean in enumerate(_in_order(render, n)):
        if o["contrast"] == "bright":
            expected = scale * (o["background"] + clean)
        else:  # dips below the bright level; overlapping dips never go below zero counts
            expected = scale * np.maximum(o["background"] - clean, 0.0)
        if dose is not None:
            frame = rng.poisson(expected).astype(np.float64)
            if o["read_noise"] > 0:
                frame += rng.normal(scale=o["read_noise"], size=frame.shape)
        else:
            frame = expected
        stack[f] = frame
        bar.update(1)
    bar.close()
    return stack


def _in_order(render, n):
    """``render(f)`` for f = 0 .. n - 1, yielded in order, computed a few frames ahead on one
    thread per CPU core (NumPy's array loops release the GIL). Noise is drawn by the caller
    in frame order from the one generator, so the stack is the serial one, bit for bit."""
    from .backend import resolve_backend

    workers = min(n, resolve_backend("numpy").cpu_workers)
    if workers <= 1:
        yield from (render(f) for f in range(n))
        return
    with ThreadPoolExecutor(workers) as pool:
        ahead = deque(pool.submit(render, f) for f in range(min(n, 2 * workers)))
        for f in range(n):
            clean = ahead.popleft().result()
            if f + len(ahead) + 1 < n:
                ahead.append(pool.submit(render, f + len(ahead) + 1))
            yield clean


def simulate_image(shape: Sequence[int] = (256, 256), **kwargs) -> tuple[np.ndarray, Truth]:
    """Simulate one frame: :func:`simulate_stack` with a single frame, returned as 2-D.

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_image
    >>> image, truth = simulate_image((64, 64), dose=None)
    >>> image.shape
    (64, 64)
    """
    dims = tuple(int(s) for s in shape)
    if len(dims) != 2:
        raise ValueError(f"shape must be (rows, cols) for one image; got {shape!r}")
    stack, truth = simulate_stack((1, *dims), **kwargs)
    return stack[0], truth

