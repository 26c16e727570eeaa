"""Rigid (translation-only) registration of image stacks with sub-pixel accuracy.

The hot path is batched over frames on the backend's ``xp``: one real FFT of a (B, H, W)
batch, the cross-power against the reference, an on-device arg-max, a batched
matrix-multiply DFT refinement (Guizar-Sicairos et al. 2008) and one (B, 2) device-to-host
transfer per batch. Stacks that are not in memory (``h5py.Dataset``, ``np.memmap`` or any
object with ``.shape``, ``.dtype`` and frame slicing) are streamed in batches.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._inputs import as_stack, is_frame_source, resolve_pixel_size
from ..backend import Backend, is_cupy_array, resolve_backend
from . import _dft

__all__ = ["RigidResult", "apply_shifts", "register_rigid", "valid_region"]

_ORDERS = ("fourier", "spline")
_MODES = ("reference", "pairs")
_WINDOWS = ("hann", None)
_NORMALIZATIONS = (None, "phase")


@dataclass(frozen=True)
class RigidResult:
    """Result of :func:`register_rigid`.

    Attributes
    ----------
    shifts : (n, 2) float64 array
        Shift (row, col) in px that registers each frame onto the reference
        (scikit-image's sign: apply it to the frame, e.g. with ``scipy.ndimage.shift``).
    quality : (n,) float32 array
        Peak of the normalised cross-correlation of the windowed frame with its reference
        (1 = identical up to the shift; low values mean little shared signal).
    registered : (n, h, w) array, the ``out`` object, or None
        The shifted stack (None for a streamed stack registered without ``out``).
    mean : (h, w) array
        Mean of the registered frames.
    valid_region : (slice, slice)
        Rows and columns of the registered frames where every frame holds measured data
        (outside it the shift brought in mirrored or edge-clamped pixels).
    flagged : (n,) bool array
        Frames whose registration is doubtful: correlation peak below half the median
        quality, coarse peak on the ``max_shift`` limit or on the edge of the +-4 px box
        searched around the frame-to-frame estimate, or (pairs mode) fewer than half of the
        frame's pair measurements consistent with the solution.
    pixel_size_pm : float or None
    parameters : dict
        Every option used, for the record.
    """

    shifts: Any
    quality: Any
    registered: Any
    mean: Any
    valid_region: tuple
    flagged: Any
    pixel_size_pm: float | None
    parameters: dict = field(default_factory=dict)

    @property
    def shifts_pm(self):
        """Shifts in picometres (None without a pixel size)."""
        if self.pixel_size_pm is None:
            return None
        return self.shifts * self.pixel_size_pm

    def to_numpy(self) -> RigidResult:
        """A copy with NumPy arrays (a streamed ``registered`` target is kept as is)."""
        def conv(a):
            if a is None:
                return None
            if is_cupy_array(a):
                return a.get()
            if isinstance(a, np.ndarray):
                return np.array(a)
            return a

        return replace(self, shifts=conv(self.shifts), quality=conv(self.quality),
                       registered=conv(self.registered), mean=conv(self.mean),
                       flagged=conv(self.flagged), parameters=dict(self.parameters))


# --------------------------------------------------------------------------- input handling


def _check_frame_shapes(stack):
    # np.asarray of ragged frames raises NumPy's own message; name the frames instead.
    if isinstance(stack, list | tuple) and stack:
        shapes = [tuple(np.shape(f)) for f in stack]
        odd = [k for k, sh in enumerate(shapes) if sh != shapes[0]]
        if odd:
            raise ValueError(
                f"stack frames must all have the same shape; frame 0 is {shapes[0]} but "
                + ", ".join(f"frame {k} is {shapes[k]}" for k in odd[:5]))


class _Source:
    """Frames of an in-memory (backend) array or a lazy frame source, read in batches."""

    def __init__(self, stack, backend, pixel_size):
        self.lazy = is_frame_source(stack)
        if self.lazy:
            shape = tuple(int(s) for s in stack.shape)
            if len(shape) != 3:
                raise ValueError(
                    f"stack must be a 3-D stack (frames, rows, cols); got a source of shape "
                    f"{shape}")
            if shape[0] < 2:
                raise ValueError(f"stack must have at least 2 frames; got {shape[0]}")
            if shape[1] < 2 or shape[2] < 2:
                raise ValueError(f"stack frames must be at least 2 x 2 pixels; got {shape[1:]}")
            kind = np.dtype(stack.dtype).kind
            if kind not in "iubf":
                raise TypeError(
                    f"stack must hold real numbers (integer or float pixels); got dtype "
                    f"{stack.dtype}")
            self.data = stack
            self.be = resolve_backend(backend)
            self.pixel_size_pm = resolve_pixel_size(pixel_size,
                                                    getattr(stack, "pixel_size_pm", None))
            self.shape = shape
            fdt = np.dtype(stack.dtype)
            self.dtype = np.float64 if fdt == np.float64 else np.float32
        else:
            _check_frame_shapes(stack)
            cal = as_stack(stack, name="stack", backend=backend, pixel_size=pixel_size)
            self.data = cal.data
            self.be = cal.backend
            self.pixel_size_pm = cal.pixel_size_pm
            self.shape = tuple(int(s) for s in cal.data.shape)
            self.dtype = cal.data.dtype

    def read(self, start: int, stop: int):
        if not self.lazy:
            return self.data[start:stop]
        host = np.asarray(self.data[start:stop])
        host = host.astype(self.dtype, copy=False)
        bad = ~np.isfinite(host).reshape(host.shape[0], -1).all(axis=1)
        if bad.any():
            frames = ", ".join(str(start + i) for i in np.flatnonzero(bad)[:20])
            raise ValueError(
                f"stack has NaN or infinite pixels in frame(s) {frames}; "
                "replace or drop those frames first")
        return self.be.asarray(host)

    def batches(self, batch_size, desc=None, progress=False):
        n = self.shape[0]
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch", leave=False)
        for start in starts:
            stop = min(n, start + batch_size)
            yield start, stop, self.read(start, stop)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_choice(value, name, choices):
    if not any(value is c or value == c for c in choices):
        raise ValueError(f"{name}={value!r} is not accepted; use one of "
                         + ", ".join(repr(c) for c in choices))
    return value


def _check_max_shift(max_shift):
    if max_shift is None:
        return None
    try:
        pair = np.broadcast_to(np.asarray(max_shift, dtype=float), (2,))
    except (TypeError, ValueError):
        raise ValueError(
            f"max_shift must be None, a positive number of px or a (row, col) pair; "
            f"got {max_shift!r}") from None
    if not np.all(np.isfinite(pair)) or np.any(pair <= 0):
        raise ValueError(
            f"max_shift must be None, a positive number of px or a (row, col) pair; "
            f"got {max_shift!r}")
    return (float(pair[0]), float(pair[1]))


def _auto_batch(be: Backend, shape, batch_size):
    if batch_size != "auto":
        return _check_int(batch_size, "batch_size", 1)
    _, h, w = shape
    # ~48 bytes per pixel of working memory per frame (frame, spectra, correlation, padding).
    per_frame = 48 * h * w
    budget = be.free_memory() // 4 if be.is_gpu else min(be.free_memory() // 8, 256 * 2**20)
    return int(max(1, min(shape[0], budget // per_frame, 64)))


# --------------------------------------------------------------------------- shift application


def apply_shifts(stack, shifts, *, order="fourier", backend=None):
    """Shift every frame of a stack by its own sub-pixel (row, col) shift.

    Parameters
    ----------
    stack : (n, h, w) array
        NumPy or CuPy array (or sidpy Dataset).
    shifts : (n, 2) array
        Shift of each frame in px (content moves by ``+shift``, as ``scipy.ndimage.shift``).
    order : {"fourier", "spline"}
        ``"fourier"``: phase-ramp shift of the reflect-padded frame, exact for band-limited
        content (no blur); the default, since atomic columns are well sampled.
        ``"spline"``: interpolating cubic B-spline (as ``scipy.ndimage.shift(order=3)``), local
        support and no ripple from the frame edges but slight smoothing at half-pixel shifts.
    backend : {"numpy", "cupy", "auto"}, optional

    Returns
    -------
    (n, h, w) array on the backend, same float dtype as the input (float32 for integers).
    Border pixels whose source lies outside the frame are filled by reflection
    (``"fourier"``) or edge clamping (``"spline"``); see :attr:`RigidResult.valid_region`.

    Raises
    ------
    ValueError
        For a malformed stack, shifts of the wrong shape or non-finite shifts, or an unknown
        ``order``.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.registration.rigid import apply_shifts
    >>> stack = np.zeros((2, 32, 32), dtype="float32")
    >>> stack[:, 16, 16] = 1.0
    >>> out = apply_shifts(stack, [[0.0, 0.0], [2.0, -3.0]], order="spline", backend="numpy")
    >>> [tuple(int(i) for i in np.unravel_index(f.argmax(), f.shape)) for f in out]
    [(16, 16), (18, 13)]
    """
    _check_choice(order, "order", _ORDERS)
    cal = as_stack(stack, name="stack", min_frames=1, backend=backend)
    be = cal.backend
    s = np.asarray(be.to_numpy(shifts) if is_cupy_array(shifts) else shifts, dtype=float)
    if s.shape != (cal.data.shape[0], 2):
        raise ValueError(f"shifts must have shape ({cal.data.shape[0]}, 2) for this stack; "
                         f"got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("shifts must be finite; got NaN or infinite values in rows "
                         + ", ".join(str(i) for i in np.flatnonzero(~np.isfinite(s).all(1))))
    return _shift(be, cal.data, s, order)


def _shift(be, frames, shifts, order):
    """Shift a batch by host ``shifts`` (B, 2); the padding is decided on the host."""
    if order == "fourier":
        pad = int(math.ceil(float(np.abs(shifts).max()))) + 16 if len(shifts) else 16
        return _dft.fourier_shift_batch(be, frames, be.asarray(shifts), pad=pad)
    return _dft.spline_shift_batch(be, frames, be.asarray(shifts))


def valid_region(shifts, shape, order="fourier"):
    """Rows/cols (slice, slice) where every registered frame holds measured data.

    A registered pixel ``(r, c)`` of frame ``k`` samples the original frame at
    ``(r - shift_r, c - shift_c)``; the region keeps the pixels whose sample lies inside
    every frame, less one pixel for the interpolation stencil (both orders).

    Examples
    --------
    >>> from stemgpu.registration.rigid import valid_region
    >>> valid_region([[0.0, 0.0], [2.5, -1.2]], (2, 64, 64))
    (slice(4, 63, None), slice(1, 61, None))
    """
    s = np.asarray(shifts, dtype=float)
    _, h, w = shape
    margin = 1  # interpolation stencils reach one pixel beyond the sample position
    r0 = int(math.ceil(max(s[:, 0].max(), 0.0))) + margin
    r1 = int(math.floor(h - 1 + min(s[:, 0].min(), 0.0))) - margin
    c0 = int(math.ceil(max(s[:, 1].max(), 0.0))) + margin
    c1 = int(math.floor(w - 1 + min(s[:, 1].min(), 0.0))) - margin
    r1, c1 = max(r1, r0 - 1), max(c1, c0 - 1)
    return (slice(r0, r1 + 1), slice(c0, c1 + 1))


# --------------------------------------------------------------------------- registration


def _solve_pairs(n, i, j, d, ref_index, tolerance=0.5, max_iter=50):
    """Least-squares shifts from pairwise measurements with transitivity outlier rejection.

    ``d[p]`` measures ``s[j[p]] - s[i[p]]``. While some pair disagrees with the solution by
    more than ``tolerance`` px, the pairs with residuals above ``max(tolerance, half the
    largest residual)`` are dropped (as long as every frame keeps a pair) and the system is
    re-solved (after Savitzky et al. 2018). A fixed tolerance rather than a noise multiple:
    a single unit-cell jump spreads residuals of jump/n over every pair sharing a frame,
    which would inflate any robust scale estimate. Returns the shifts, the fraction of each
    frame's pairs kept, and the inlier mask.
    """
    m = len(i)
    inlier = np.ones(m, dtype=bool)
    a = np.zeros((m + 1, n))
    a[np.arange(m), j] += 1.0
    a[np.arange(m), i] -= 1.0
    if ref_index is None:
        a[m, :] = 1.0  # zero-mean gauge: the "mean" reference
    else:
        a[m, ref_index] = 1.0
    rhs = np.zeros((m + 1, 2))
    rhs[:m] = d
    s = np.zeros((n, 2))
    for _ in range(max_iter):
        rows = np.append(inlier, True)
        s, *_ = np.linalg.lstsq(a[rows], rhs[rows], rcond=None)
        resid = np.linalg.norm(d - (s[j] - s[i]), axis=1)
        worst = float(resid[inlier].max()) if inlier.any() else 0.0
        if worst <= tolerance:
            break
        drop = inlier & (resid > max(tolerance, 0.5 * worst))
        new = inlier & ~drop
        counts = np.bincount(i[new], minlength=n) + np.bincount(j[new], minlength=n)
        lonely = np.flatnonzero(counts == 0)
        if lonely.size:  # keep every frame connected to the system
            new |= drop & (np.isin(i, lonely) | np.isin(j, lonely))
        if np.array_equal(new, inlier):
            break
        inlier = new
    total = np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    good = np.bincount(i[inlier], minlength=n) + np.bincount(j[inlier], minlength=n)
    return s, good / np.maximum(total, 1), inlier


def register_rigid(
    stack,
    *,
    reference="mean",
    upsample=100,
    window="hann",
    normalization=None,
    max_shift=None,
    mode="reference",
    band=None,
    iterations=1,
    polish=False,
    batch_size="auto",
    order="fourier",
    out=None,
    keep_registered=True,
    pixel_size=None,
    progress=False,
    backend=None,
):
    """Register every frame of a stack onto a reference with sub-pixel accuracy.

    Parameters
    ----------
    stack : (n, h, w) array, sidpy.Dataset or lazy frame source
        NumPy/CuPy array or sidpy Dataset (integers are converted to float32). Any other
        object with ``.shape`` (3 entries), ``.dtype`` and ``__getitem__`` over frame slices
        returning NumPy arrays (``h5py.Dataset``, ``np.memmap``) is streamed in batches of
        ``batch_size`` frames and never held whole in memory.
    reference : int or "mean"
        Every mode starts from frame-to-previous-frame shifts, summed (consecutive frames
        differ little, so this follows drift over many unit cells without cell jumps: among
        near-equal lattice peaks the smallest frame-to-frame shift is taken, which assumes
        less than half a unit cell of motion between consecutive frames); later searches
        stay within 4 px of that estimate. With a frame index, each frame is then
        registered to that frame. With ``"mean"``, each frame is re-registered ``iterations``
        times to the mean of the other frames (leave-one-out, so that a frame's own noise
        does not pull its peak to the previous estimate), built from the windowed spectra
        moved by the current shifts. ``"mean"`` shifts are defined up to a constant; they
        are returned with zero mean.
    upsample : int
        Sub-pixel refinement factor (precision ~1/upsample px, then a parabolic vertex).
    window : {"hann", None}
        Apodisation before correlation (separable Hann); the window-weighted mean is
        subtracted from each frame. ``None`` only subtracts the frame mean.
    normalization : {None, "phase"}
        ``None``: plain cross-correlation (best on lattice images); ``"phase"``: phase
        correlation, which weights noisy high frequencies as much as the lattice peaks.
    max_shift : float or (row, col), optional
        Largest accepted shift magnitude per axis, px (frame-to-reference; twice that for
        frame-to-frame pairs). Guards against unit-cell jumps; frames whose peak sits on the
        limit are flagged.
    mode : {"reference", "pairs"}
        ``"pairs"``: measure the shifts between all pairs of frames (or those at most
        ``band`` frames apart), each searched near the difference of the frame-to-frame
        estimates, solve for per-frame shifts by least squares and reject pairs that violate
        transitivity by more than 0.5 px (Savitzky et al. 2018); ``reference`` then only
        fixes the constant (zero mean or zero at that frame).
    band : int, optional
        Largest frame distance of the pairs in ``"pairs"`` mode (default: all pairs).
    iterations : int
        Re-registrations to the mean for ``reference="mean"`` (default 1; a second one
        changed the error by < 5 % in our tests).
    polish : bool
        Finish with three Gauss-Newton steps of intensity least squares of each frame
        against the leave-one-out mean (uniform weights inside a tapered border), which uses
        all pixels equally instead of the Hann-weighted centre. On 20 x 512 x 512 SrTiO3 it
        lowered the RMS error from 0.0044 to 0.0026 px at 200 counts and from 0.022 to
        0.019 px at 20 counts, for about twice the time.
    batch_size : int or "auto"
        Frames per batch ("auto": a share of free memory).
    order : {"fourier", "spline"}
        Interpolation used to shift frames (see :func:`apply_shifts`).
    out : array-like, optional
        Where to write the registered frames (same shape; e.g. an ``h5py`` dataset or memmap
        for a streamed stack). Without it, registered frames are kept only for in-memory
        stacks (and only when ``keep_registered``).
    keep_registered : bool
        Return the registered stack for in-memory input (doubles the memory).
    pixel_size : float, optional
        Pixel size in pm (overrides the Dataset's calibration).
    progress : bool
        Show tqdm progress bars over the batches of each pass.
    backend : {"numpy", "cupy", "auto"}, optional

    Returns
    -------
    RigidResult

    Raises
    ------
    ValueError
        Not a 3-D stack, fewer than 2 frames, frames of different shapes, NaN/inf pixels
        (naming the frames), a reference index out of range, or an unknown option value.
    TypeError
        Unsupported container or dtype.

    Notes
    -----
    Plain cross-correlation with an apodisation window is the maximum-likelihood shift for
    white noise up to the window weighting; phase correlation whitens the spectrum and, on
    lattice images whose information sits in a few Bragg peaks, amplifies noise and can
    lock onto a neighbouring unit cell (M. Guizar-Sicairos, S. T. Thurman, J. R. Fienup,
    Opt. Lett. 33, 156 (2008), doi:10.1364/OL.33.000156; A. B. Yankovich et al., Nat.
    Commun. 5, 4155 (2014); B. H. Savitzky et al., Ultramicroscopy 191, 56 (2018),
    doi:10.1016/j.ultramic.2018.04.008).

    For a streamed stack with ``reference="mean"`` the frames are read ``iterations + 2``
    times (first pass: frame-to-previous shifts and the first mean; one pass per
    iteration, which also sums the next mean; a last pass writes ``out`` and the final
    mean), plus four passes with ``polish``; peak memory is a few batches.
    ``mode="pairs"`` keeps ``band`` frames of spectra in memory (all frames without
    ``band``).

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_stack
    >>> from stemgpu.registration.rigid import register_rigid
    >>> stack, truth = simulate_stack((4, 96, 96), frame_jitter_px=1.0, seed=2)
    >>> res = register_rigid(stack, backend="numpy")
    >>> err = res.shifts - truth.registration_shifts("mean")
    >>> bool(abs(err - err.mean(axis=0)).max() < 0.1)
    True
    >>> res.registered.shape, res.mean.shape
    ((4, 96, 96), (96, 96))
    """
    src = _Source(stack, backend, pixel_size)
    be = src.be
    xp = be.xp
    n, h, w = src.shape
    if isinstance(reference, str):
        if reference != "mean":
            raise ValueError(f"reference must be a frame index or 'mean'; got {reference!r}")
        ref_index = None
    elif isinstance(reference, numbers.Integral) and not isinstance(reference, bool):
        if not -n <= reference < n:
            raise ValueError(
                f"reference={reference} is out of range for a stack of {n} frames; accepted: "
                f"an index in [{-n}, {n - 1}] or 'mean'")
        ref_index = int(reference) % n
    else:
        raise ValueError(f"reference must be a frame index or 'mean'; got {reference!r}")
    upsample = _check_int(upsample, "upsample", 1)
    _check_choice(window, "window", _WINDOWS)
    _check_choice(normalization, "normalization", _NORMALIZATIONS)
    limit = _check_max_shift(max_shift)
    _check_choice(mode, "mode", _MODES)
    if band is not None:
        band = _check_int(band, "band", 1)
    iterations = _check_int(iterations, "iterations", 0)
    _check_choice(order, "order", _ORDERS)
    if not isinstance(polish, bool):
        raise ValueError(f"polish must be True or False; got {polish!r}")
    if out is not None:
        oshape = tuple(getattr(out, "shape", ()))
        if oshape != (n, h, w) or not hasattr(out, "__setitem__"):
            raise ValueError(
                f"out must be a writable array-like of shape {(n, h, w)}; got "
                f"{type(out).__name__} of shape {oshape}")
    bsize = _auto_batch(be, src.shape, batch_size)

    win = _dft.hann_window(xp, (h, w)) if window == "hann" else None
    colw = _dft.half_spectrum_weights(xp, w)
    corr_kw = {"upsample": upsample, "normalization": normalization, "col_weights": colw}
    pair_limit = None if limit is None else (2 * limit[0], 2 * limit[1])
    # Refinement passes search within this many px of the frame-to-frame estimate, whose
    # error (well below a pixel) is far smaller than any unit cell.
    search_radius = 4

    # In-memory stacks keep their spectra between passes when they fit comfortably.
    spec_bytes = 2 * n * h * (w // 2 + 1) * 8
    cache = {} if (not src.lazy and spec_bytes < be.free_memory() // 4) else None

    def spectra(start, stop, frames):
        # S: windowed spectra for correlation; F: plain spectra, needed only to polish.
        if cache is not None and start in cache:
            return cache[start]
        S = _dft.prepare_spectra(be, frames, win)
        F = _dft.rfft2(be, frames).astype(xp.complex64, copy=False) if polish else None
        if cache is not None:
            cache[start] = (S, F)
        return S, F

    quality = np.zeros(n, dtype=np.float32)
    # Sum over frames of the windowed spectra moved by each frame's shift: n times the
    # reference "mean" spectrum. Shifting the windowed frame (rather than windowing the
    # shifted frame) moves the window by the frame's few-pixel shift, which leaves the
    # peak position unbiased and makes the leave-one-out subtraction exact.
    acc = None
    at_limit = np.zeros(n, dtype=bool)
    inlier_fraction = None

    def accumulate(acc, F, shifts_dev):
        part = (F * _dft.shift_ramp(be, shifts_dev, (h, w))).sum(axis=0)
        return part if acc is None else acc + part

    def recentre(raw, acc):
        # Shifts are defined up to a constant: remove it, and from the summed spectra too.
        c = raw.mean(axis=0) if ref_index is None else raw[ref_index].copy()
        return raw - c, acc * _dft.shift_ramp(be, be.asarray(-c[None]), (h, w))[0]

    # ---- first pass: frame-to-frame estimate (and the first mean)
    shifts = np.zeros((n, 2))
    # Frame-to-previous-frame shifts, summed: consecutive frames differ by little, so
    # this first estimate follows drift over many unit cells without cell jumps.
    prev = None
    running = np.zeros(2)
    for start, stop, frames in src.batches(bsize, "frame-to-frame", progress):
        S, _ = spectra(start, stop, frames)
        ref = S[:-1] if prev is None else xp.concatenate([prev, S[:-1]], axis=0)
        mov = S[1:] if prev is None else S
        step = np.zeros((stop - start, 2))
        if mov.shape[0]:
            # The first estimate only builds the first mean: 0.1 px (plus vertex) is ample.
            d, q, _ = _dft.correlate_batch(be, ref, mov, (h, w), max_shift=pair_limit,
                                           prefer_small=True,
                                           **{**corr_kw, "upsample": min(upsample, 10)})
            step[stop - start - mov.shape[0]:] = be.to_numpy(d)
            quality[stop - mov.shape[0]:stop] = be.to_numpy(q)
        shifts[start:stop] = running + np.cumsum(step, axis=0)
        running = shifts[stop - 1].copy()
        acc = accumulate(acc, S, be.asarray(shifts[start:stop]))
        prev = S[-1:]
    quality[0] = quality[1]
    shifts, acc = recentre(shifts, acc)

    if mode == "pairs":
        chain = shifts
        bw = n - 1 if band is None else min(band, n - 1)
        window_S = None  # spectra of the last ``bw`` frames before the current batch
        pi, pj, pd, pq = [], [], [], []
        for start, stop, frames in src.batches(bsize, "pairs", progress):
            S, _ = spectra(start, stop, frames)
            ctx = S if window_S is None else xp.concatenate([window_S, S], axis=0)
            first = stop - ctx.shape[0]  # frame index of ctx[0]
            ii, jj = [], []
            for jf in range(start, stop):
                lo = max(0, jf - bw)
                ii.extend(range(lo, jf))
                jj.extend([jf] * (jf - lo))
            if ii:
                ii_a, jj_a = np.array(ii), np.array(jj)
                for p0 in range(0, len(ii_a), bsize):
                    sl = slice(p0, p0 + bsize)
                    ref = ctx[xp.asarray(ii_a[sl] - first)]
                    mov = ctx[xp.asarray(jj_a[sl] - first)]
                    guess = chain[jj_a[sl]] - chain[ii_a[sl]]
                    d, q, lim = _dft.correlate_batch(be, ref, mov, (h, w), max_shift=pair_limit,
                                                     centres=be.asarray(guess),
                                                     radius=search_radius, **corr_kw)
                    pd.append(be.to_numpy(d))
                    pq.append(be.to_numpy(q))
                    at_limit[jj_a[sl][be.to_numpy(lim)]] = True
                pi.append(ii_a)
                pj.append(jj_a)
            window_S = ctx[-bw:] if bw > 0 else None
        pi, pj = np.concatenate(pi), np.concatenate(pj)
        pd, pq = np.concatenate(pd), np.concatenate(pq)
        shifts, inlier_fraction, inl = _solve_pairs(n, pi, pj, pd, ref_index)
        qsum = np.bincount(pi[inl], pq[inl], n) + np.bincount(pj[inl], pq[inl], n)
        qcnt = np.bincount(pi[inl], minlength=n) + np.bincount(pj[inl], minlength=n)
        quality = (qsum / np.maximum(qcnt, 1)).astype(np.float32)
    elif ref_index is not None:
        ref_frames = src.read(ref_index, ref_index + 1)
        ref_S = _dft.prepare_spectra(be, ref_frames, win)[0]
        new = np.zeros_like(shifts)
        for start, stop, frames in src.batches(bsize, "register", progress):
            S, _ = spectra(start, stop, frames)
            d, q, lim = _dft.correlate_batch(be, ref_S, S, (h, w), max_shift=limit,
                                             centres=be.asarray(shifts[start:stop]),
                                             radius=search_radius, **corr_kw)
            new[start:stop] = be.to_numpy(d)
            quality[start:stop] = be.to_numpy(q)
            at_limit[start:stop] = be.to_numpy(lim)
        shifts = new
    elif mode == "reference":
        # Re-registration to the leave-one-out mean; the pass also builds the next mean.
        for _ in range(iterations):
            total = acc
            new = np.zeros_like(shifts)
            acc = None
            for start, stop, frames in src.batches(bsize, "register", progress):
                S, _ = spectra(start, stop, frames)
                own = S * _dft.shift_ramp(be, be.asarray(shifts[start:stop]), (h, w))
                loo = (total[None] - own) / (n - 1)
                d, q, lim = _dft.correlate_batch(be, loo, S, (h, w), max_shift=limit,
                                                 centres=be.asarray(shifts[start:stop]),
                                                 radius=search_radius, **corr_kw)
                new[start:stop] = be.to_numpy(d)
                quality[start:stop] = be.to_numpy(q)
                at_limit[start:stop] = be.to_numpy(lim)
                acc = accumulate(acc, S, be.asarray(new[start:stop]))
            shifts, acc = recentre(new, acc)

    if polish:
        acc = None  # the polish compares plain (unwindowed) frames: sum their spectra
        for start, stop, frames in src.batches(bsize, "mean", progress):
            _, F = spectra(start, stop, frames)
            acc = accumulate(acc, F, be.asarray(shifts[start:stop]))
        shifts = _polish(be, src, shifts, acc, bsize, spectra, accumulate, progress, ref_index)

    # ---- final pass: registered frames and their mean
    keep = out is None and keep_registered and not src.lazy
    registered = xp.empty((n, h, w), dtype=src.dtype) if keep else out
    mean_acc = xp.zeros((h, w), dtype=xp.float64)  # float64 sum over many frames
    for start, stop, frames in src.batches(bsize, "shift", progress):
        moved = _shift(be, frames, shifts[start:stop], order)
        mean_acc += moved.sum(axis=0, dtype=xp.float64)
        if registered is not None:
            if out is not None and not (be.is_gpu and is_cupy_array(out)):
                out[start:stop] = be.to_numpy(moved) if be.is_gpu else moved
            else:
                registered[start:stop] = moved
    mean_img = (mean_acc / n).astype(src.dtype)

    med = float(np.median(quality))
    flagged = (quality < 0.5 * med) | at_limit
    if inlier_fraction is not None:
        flagged |= inlier_fraction < 0.5
    params = {
        "reference": reference, "upsample": upsample, "window": window,
        "normalization": normalization, "max_shift": limit, "mode": mode, "band": band,
        "iterations": iterations if ref_index is None and mode == "reference" else 0,
        "polish": polish, "batch_size": bsize, "order": order, "backend": be.name,
        "streamed": src.lazy, "shape": (n, h, w),
    }
    return RigidResult(
        shifts=shifts, quality=quality, registered=registered, mean=mean_img,
        valid_region=valid_region(shifts, (n, h, w), order), flagged=flagged,
        pixel_size_pm=src.pixel_size_pm, parameters=params,
    )


def _polish(be, src, shifts, acc, bsize, spectra, accumulate, progress, ref_index, steps=3):
    """Gauss-Newton refinement of each shift by intensity least squares (see register_rigid).

    Each frame ``f_k`` shifted by ``s_k`` (Fourier) is compared with the leave-one-out mean
    ``m_k``; ``s_k += (J^T W J)^-1 J^T W (m_k - g_k)`` with ``J = -grad g_k``. The weight is a
    flat-top window whose cosine taper (1/8 of each side) hides the frame edges, where a
    Fourier shift wraps content around. ``acc`` holds the summed shifted spectra of the
    current shifts; each pass refines the shifts and sums the spectra for the next one.
    """
    xp = be.xp
    n, h, w = src.shape
    taper_r = 0.5 - 0.5 * np.cos(np.pi * np.clip(np.arange(h) / (h / 8.0), 0, 1))
    taper_r = np.minimum(taper_r, taper_r[::-1])
    taper_c = 0.5 - 0.5 * np.cos(np.pi * np.clip(np.arange(w) / (w / 8.0), 0, 1))
    taper_c = np.minimum(taper_c, taper_c[::-1])
    weight = xp.asarray(np.outer(taper_r, taper_c), dtype=xp.float32)
    wsum = weight.sum()
    fr = xp.asarray(np.fft.fftfreq(h), dtype=xp.float32)[:, None]
    fc = xp.asarray(np.fft.rfftfreq(w), dtype=xp.float32)[None, :]
    shifts = shifts.copy()
    for _ in range(steps):
        total = _dft.irfft2(be, acc, s=(h, w))
        new = shifts.copy()
        acc = None
        for start, stop, frames in src.batches(bsize, "polish", progress):
            _, F = spectra(start, stop, frames)
            G = F * _dft.shift_ramp(be, be.asarray(shifts[start:stop]), (h, w))
            g = _dft.irfft2(be, G, s=(h, w))
            loo = (total[None] - g) / (n - 1)
            # d g(x; s) / d s = -grad g
            jr = -_dft.irfft2(be, G * (2j * np.pi * fr), s=(h, w))
            jc = -_dft.irfft2(be, G * (2j * np.pi * fc), s=(h, w))
            resid = loo - g
            resid = resid - (resid * weight).sum(axis=(1, 2), keepdims=True) / wsum
            a11 = (weight * jr * jr).sum(axis=(1, 2))
            a12 = (weight * jr * jc).sum(axis=(1, 2))
            a22 = (weight * jc * jc).sum(axis=(1, 2))
            b1 = (weight * jr * resid).sum(axis=(1, 2))
            b2 = (weight * jc * resid).sum(axis=(1, 2))
            det = a11 * a22 - a12 * a12
            safe = xp.where(det > 0, det, 1.0)
            dr = xp.where(det > 0, (a22 * b1 - a12 * b2) / safe, 0.0)
            dc = xp.where(det > 0, (a11 * b2 - a12 * b1) / safe, 0.0)
            step = be.to_numpy(xp.stack([dr, dc], axis=1)).astype(float)
            new[start:stop] += np.clip(step, -0.5, 0.5)
            acc = accumulate(acc, F, be.asarray(new[start:stop]))
        c = new.mean(axis=0) if ref_index is None else new[ref_index].copy()
        shifts = new - c
        acc = acc * _dft.shift_ramp(be, be.asarray(-c[None]), (h, w))[0]
    return shifts
