"""The passes of rigid registration, each over the batches of a frame source.

:func:`stemgpu.registration.register_rigid` validates its options into a :class:`Plan` and
then runs these passes in order: :func:`frame_to_frame` (the first estimate and the first
mean), one of :func:`pairs`, :func:`to_frame` or :func:`to_leave_one_out_mean`, optionally
:func:`polish`, and :func:`write_registered`. Each pass is a loop over batches around a
per-batch function (``frame_steps``, ``_pair_batch``, ``near_peaks``, ``leave_one_out``,
``_polish_step``) that takes a batch's spectra and what earlier passes produced (host shifts,
the summed spectra) and returns host arrays, so a batch could be computed anywhere.

A pass reads frames through a source with ``shape``, ``dtype``, ``lazy``, ``read(start,
stop)`` and ``batches(batch_size, desc, progress)`` (``rigid.FrameSource``) and their spectra
through :class:`Spectra`, which caches them between passes when they fit in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..backend import Backend, is_cupy_array
from . import _dft
from ._dft import half_spectrum_weights, hann_window, prepare_spectra

__all__ = ["half_spectrum_weights", "hann_window", "prepare_spectra",
    "Plan",
    "Spectra",
    "frame_to_frame",
    "measure_pair",
    "pairs",
    "polish",
    "recentre",
    "shift_batch",
    "shifted_total",
    "solve_pairs",
    "to_frame",
    "to_leave_one_out_mean",
    "write_registered",
]

#: Refinement passes search within this many px of the frame-to-frame estimate, whose error
#: (well below a pixel) is far smaller than any unit cell.
SEARCH_RADIUS = 4


@dataclass(frozen=True)
class Plan:
    """The options every pass shares, validated once by ``register_rigid``.

    ``limit`` is the frame-to-reference ``max_shift`` pair (None: no limit); ``window`` the
    (h, w) apodisation array or None; ``col_weights`` the rfft half-spectrum weights.
    """

    be: Backend
    shape: tuple  # (n, h, w)
    ref_index: int | None
    upsample: int
    normalization: str | None
    limit: tuple | None
    batch_size: int
    polish: bool
    progress: bool
    window: Any
    col_weights: Any
    #: Power of two the frames are multiplied by before their FFTs (exact, so the shifts
    #: do not change): brings values of ~1e30 (or ~1e-30) into complex64's range.
    scale: float = 1.0

    @property
    def frame_shape(self) -> tuple:
        return tuple(self.shape[1:])

    @property
    def pair_limit(self) -> tuple | None:
        """Limit of a frame-to-frame (pair) shift: twice the frame-to-reference one."""
        return None if self.limit is None else (2 * self.limit[0], 2 * self.limit[1])

    def scaled(self, frames):
        return frames if self.scale == 1.0 else frames * self.be.xp.asarray(
            self.scale, dtype=frames.dtype)

    def prepare(self, frames):
        """:func:`_dft.prepare_spectra` of the (scaled) frames with the plan's window."""
        return _dft.prepare_spectra(self.be, self.scaled(frames), self.window)

    def correlate(self, ref, mov, *, max_shift, upsample=None, **kwargs):
        """:func:`_dft.correlate_batch` with the plan's options (device results)."""
        return _dft.correlate_batch(
            self.be, ref, mov, self.frame_shape, max_shift=max_shift,
            upsample=self.upsample if upsample is None else upsample,
            normalization=self.normalization, col_weights=self.col_weights, **kwargs)


class Spectra:
    """Spectra of a source's batches, kept between passes when ``cache`` is true.

    ``get`` returns ``(S, F)``: ``S`` the windowed spectra used for correlation, ``F`` the
    plain spectra (only with ``plan.polish``, else None). The cache is keyed by the batch
    start, so every pass must read the source with the plan's batch size.
    """

    def __init__(self, plan: Plan, cache: bool):
        self.plan = plan
        self._cache = {} if cache else None

    def get(self, start, frames):
        if self._cache is not None and start in self._cache:
            return self._cache[start]
        be = self.plan.be
        spec = self.plan.prepare(frames)
        plain = (_dft.rfft2(be, self.plan.scaled(frames)).astype(be.xp.complex64, copy=False)
                 if self.plan.polish else None)
        if self._cache is not None:
            self._cache[start] = (spec, plain)
        return spec, plain

    def shifted_sum(self, spectra, shifts):
        """Sum over the batch of ``spectra`` (B, H, Wh) moved by host ``shifts`` (B, 2)."""
        be = self.plan.be
        # One expression, as before the passes were split: NumPy then multiplies into the
        # temporary ramp in place, whose rounding differs from a separate product.
        return (spectra * _dft.shift_ramp(be, be.asarray(shifts), self.plan.frame_shape)
                ).sum(axis=0)


def _add(total, part):
    return part if total is None else total + part


def recentre(plan: Plan, raw, total, keep=None):
    """Remove the undetermined constant from the shifts, and from the summed spectra too.

    The constant is the mean shift (``reference="mean"``; over the ``keep`` frames when
    given) or the reference frame's shift.
    """
    if plan.ref_index is not None:
        c = raw[plan.ref_index].copy()
    else:
        c = raw.mean(axis=0) if keep is None else raw[keep].mean(axis=0)
    return raw - c, total * _dft.shift_ramp(plan.be, plan.be.asarray(-c[None]),
                                            plan.frame_shape)[0]


# --------------------------------------------------------------------------- first estimate


def frame_steps(plan: Plan, prev, spec):
    """Shift (B, 2) of each frame of a batch relative to the frame before it, and quality.

    ``prev`` holds the spectrum (1, H, Wh) of the frame before the batch (None for the first
    batch, whose first frame gets a zero step and zero quality).
    """
    be, xp = plan.be, plan.be.xp
    b = spec.shape[0]
    ref = spec[:-1] if prev is None else xp.concatenate([prev, spec[:-1]], axis=0)
    mov = spec[1:] if prev is None else spec
    step = np.zeros((b, 2))
    quality = np.zeros(b, dtype=np.float32)
    if mov.shape[0]:
        # The first estimate only builds the first mean: 0.1 px (plus vertex) is ample.
        d, q, _ = plan.correlate(ref, mov, max_shift=plan.pair_limit, prefer_small=True,
                                 upsample=min(plan.upsample, 10))
        step[b - mov.shape[0]:] = be.to_numpy(d)
        quality[b - mov.shape[0]:] = be.to_numpy(q)
    return step, quality


def frame_to_frame(plan: Plan, src, spectra: Spectra):
    """First pass: frame-to-previous-frame shifts, summed, and the summed shifted spectra.

    Consecutive frames differ by little, so this estimate follows drift over many unit
    cells without cell jumps. Returns recentred shifts (n, 2), quality (n,) and ``total``,
    the sum of the windowed spectra moved by each frame's shift (n times the "mean"
    reference spectrum). Shifting the windowed frame (rather than windowing the shifted
    frame) moves the window by the frame's few-pixel shift, which leaves the peak position
    unbiased and makes the leave-one-out subtraction exact.
    """
    n = plan.shape[0]
    shifts = np.zeros((n, 2))
    quality = np.zeros(n, dtype=np.float32)
    total, prev, running = None, None, np.zeros(2)
    for start, stop, frames in src.batches(plan.batch_size, "frame-to-frame", plan.progress):
        spec, _ = spectra.get(start, frames)
        step, quality[start:stop] = frame_steps(plan, prev, spec)
        shifts[start:stop] = running + np.cumsum(step, axis=0)
        running = shifts[stop - 1].copy()
        total = _add(total, spectra.shifted_sum(spec, shifts[start:stop]))
        prev = spec[-1:]
    quality[0] = quality[1]
    shifts, total = recentre(plan, shifts, total)
    return shifts, quality, total


def shifted_total(plan: Plan, src, spectra: Spectra, shifts, keep=None):
    """The summed windowed spectra moved by host ``shifts`` (n times the "mean" reference),
    of the ``keep`` frames only when given (host bool (n,))."""
    total = None
    for start, stop, frames in src.batches(plan.batch_size, "mean", plan.progress):
        spec, _ = spectra.get(start, frames)
        if keep is not None:
            spec = spec * plan.be.asarray(keep[start:stop].astype(np.float32))[:, None, None]
        total = _add(total, spectra.shifted_sum(spec, shifts[start:stop]))
    return total


def measure_pair(plan: Plan, src, i, j):
    """Step (2,) from frame ``i`` to frame ``j`` and its quality, by the frame-to-frame search.

    Used to tie a frame to the chain past frames that share no signal with it.
    """
    be = plan.be
    spec = plan.prepare(be.xp.concatenate([src.read(i, i + 1), src.read(j, j + 1)]))
    d, q, _ = plan.correlate(spec[:1], spec[1:], max_shift=plan.pair_limit, prefer_small=True,
                             upsample=min(plan.upsample, 10))
    return be.to_numpy(d)[0], float(be.to_numpy(q)[0])


# --------------------------------------------------------------------------- refinement


def near_peaks(plan: Plan, ref, mov, centres, max_shift):
    """Shifts, quality and at-limit flags (host) searched near host ``centres`` (B, 2)."""
    be = plan.be
    d, q, lim = plan.correlate(ref, mov, max_shift=max_shift, centres=be.asarray(centres),
                               radius=SEARCH_RADIUS)
    return be.to_numpy(d), be.to_numpy(q), be.to_numpy(lim)


def to_frame(plan: Plan, src, spectra: Spectra, centres):
    """Register every frame onto frame ``plan.ref_index``, near the shifts ``centres``.

    Returns shifts (n, 2), quality (n,) and at-limit flags (n,).
    """
    ref_index = plan.ref_index
    ref_spec = plan.prepare(src.read(ref_index, ref_index + 1))[0]
    n = plan.shape[0]
    shifts, quality, at_limit = np.zeros((n, 2)), np.zeros(n, np.float32), np.zeros(n, bool)
    for start, stop, frames in src.batches(plan.batch_size, "register", plan.progress):
        spec, _ = spectra.get(start, frames)
        shifts[start:stop], quality[start:stop], at_limit[start:stop] = near_peaks(
            plan, ref_spec, spec, centres[start:stop], plan.limit)
    return shifts, quality, at_limit


def leave_one_out(plan: Plan, total, spec, shifts, keep=None):
    """Spectra (B, H, Wh) of the mean of the other frames, from the summed spectra.

    With ``keep`` (host bool (B,) for the batch, ``count`` kept frames in all) ``total``
    sums the kept frames only, and a frame left out is compared with all of them.
    """
    be = plan.be
    own = spec * _dft.shift_ramp(be, be.asarray(shifts), plan.frame_shape)
    if keep is None:
        return (total[None] - own) / (plan.shape[0] - 1)
    k, count = keep
    w = be.asarray(k.astype(np.float32))[:, None, None]
    return (total[None] - own * w) / be.asarray((count - k).astype(np.float32))[:, None, None]


def to_leave_one_out_mean(plan: Plan, src, spectra: Spectra, shifts, quality, total,
                          iterations, keep=None):
    """Re-register every frame ``iterations`` times onto the mean of the other frames.

    Each iteration searches near the current shifts (the leave-one-out reference keeps a
    frame's own noise from pulling its peak to the previous estimate) and sums the spectra
    for the next mean. With ``keep`` (host bool (n,)) the mean is that of the kept frames
    only (``total`` must sum only them), and the shifts get zero mean over them. Returns
    shifts, quality, at-limit flags and the summed spectra.
    """
    n = plan.shape[0]
    quality, at_limit = quality.copy(), np.zeros(n, dtype=bool)
    count = None if keep is None else int(keep.sum())
    for _ in range(iterations):
        new, part_sum = np.zeros_like(shifts), None
        for start, stop, frames in src.batches(plan.batch_size, "register", plan.progress):
            spec, _ = spectra.get(start, frames)
            part = None if keep is None else (keep[start:stop], count)
            loo = leave_one_out(plan, total, spec, shifts[start:stop], part)
            new[start:stop], quality[start:stop], at_limit[start:stop] = near_peaks(
                plan, loo, spec, shifts[start:stop], plan.limit)
            kept = spec if keep is None else spec * plan.be.asarray(
                keep[start:stop].astype(np.float32))[:, None, None]
            part_sum = _add(part_sum, spectra.shifted_sum(kept, new[start:stop]))
        shifts, total = recentre(plan, new, part_sum, keep)
    return shifts, quality, at_limit, total


def _pair_indices(start, stop, bw):
    """Pairs (i, j), i < j, of every frame j of a batch with the ``bw`` frames before it."""
    ii, jj = [], []
    for jf in range(start, stop):
        lo = max(0, jf - bw)
        ii.extend(range(lo, jf))
        jj.extend([jf] * (jf - lo))
    return np.array(ii, dtype=int), np.array(jj, dtype=int)


def _pair_batch(plan: Plan, ctx, first, ii, jj, chain):
    """Shifts, qualities and at-limit flags of pairs (ii, jj) whose spectra are in ``ctx``.

    ``ctx[k]`` is the spectrum of frame ``first + k``; each pair is searched near the
    difference of the ``chain`` (frame-to-frame) shifts, in chunks of the batch size.
    """
    xp = plan.be.xp
    ds, qs, lims = [], [], []
    for p0 in range(0, len(ii), plan.batch_size):
        sl = slice(p0, p0 + plan.batch_size)
        ref = ctx[xp.asarray(ii[sl] - first)]
        mov = ctx[xp.asarray(jj[sl] - first)]
        d, q, lim = near_peaks(plan, ref, mov, chain[jj[sl]] - chain[ii[sl]], plan.pair_limit)
        ds.append(d)
        qs.append(q)
        lims.append(lim)
    return np.concatenate(ds), np.concatenate(qs), np.concatenate(lims)


def pairs(plan: Plan, src, spectra: Spectra, chain, band):
    """Measure pairs of frames at most ``band`` apart (None: all) and solve for the shifts.

    Keeps the spectra of the last ``band`` frames between batches. Returns shifts,
    quality (mean over each frame's inlier pairs), at-limit flags and each frame's
    fraction of consistent pairs (see :func:`solve_pairs`).
    """
    xp = plan.be.xp
    n = plan.shape[0]
    bw = n - 1 if band is None else min(band, n - 1)
    at_limit = np.zeros(n, dtype=bool)
    before = None  # spectra of the last ``bw`` frames before the current batch
    pi, pj, pd, pq = [], [], [], []
    for start, stop, frames in src.batches(plan.batch_size, "pairs", plan.progress):
        spec, _ = spectra.get(start, frames)
        ctx = spec if before is None else xp.concatenate([before, spec], axis=0)
        ii, jj = _pair_indices(start, stop, bw)
        if len(ii):
            d, q, lim = _pair_batch(plan, ctx, stop - ctx.shape[0], ii, jj, chain)
            at_limit[jj[lim]] = True
            pi.append(ii)
            pj.append(jj)
            pd.append(d)
            pq.append(q)
        before = ctx[-bw:] if bw > 0 else None
    pi, pj = np.concatenate(pi), np.concatenate(pj)
    pd, pq = np.concatenate(pd), np.concatenate(pq)
    shifts, inlier_fraction, inl = solve_pairs(n, pi, pj, pd, plan.ref_index)
    qsum = np.bincount(pi[inl], pq[inl], n) + np.bincount(pj[inl], pq[inl], n)
    qcnt = np.bincount(pi[inl], minlength=n) + np.bincount(pj[inl], minlength=n)
    quality = (qsum / np.maximum(qcnt, 1)).astype(np.float32)
    return shifts, quality, at_limit, inlier_fraction


def solve_pairs(n, i, j, d, ref_index, tolerance=0.5, max_iter=50):
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


# --------------------------------------------------------------------------- polish


class _PolishGrid(NamedTuple):
    """Weight (flat top, cosine taper over 1/8 of each side), its sum, and frequencies."""

    weight: Any
    wsum: Any
    fr: Any
    fc: Any


def _polish_grid(plan: Plan) -> _PolishGrid:
    xp = plan.be.xp
    h, w = plan.frame_shape
    taper_r = 0.5 - 0.5 * np.cos(np.pi * np.clip(np.arange(h) / (h / 8.0), 0, 1))
    taper_r = np.minimum(taper_r, taper_r[::-1])
    taper_c = 0.5 - 0.5 * np.cos(np.pi * np.clip(np.arange(w) / (w / 8.0), 0, 1))
    taper_c = np.minimum(taper_c, taper_c[::-1])
    weight = xp.asarray(np.outer(taper_r, taper_c), dtype=xp.float32)
    return _PolishGrid(weight, weight.sum(),
                       xp.asarray(np.fft.fftfreq(h), dtype=xp.float32)[:, None],
                       xp.asarray(np.fft.rfftfreq(w), dtype=xp.float32)[None, :])


def _polish_step(plan: Plan, grid: _PolishGrid, mean_total, plain, shifts):
    """One Gauss-Newton step (B, 2), host, for a batch of plain spectra at host ``shifts``.

    ``mean_total`` is the (H, W) sum of all frames at the current shifts.
    """
    be, xp = plan.be, plan.be.xp
    hw = plan.frame_shape
    g_spec = plain * _dft.shift_ramp(be, be.asarray(shifts), hw)
    g = _dft.irfft2(be, g_spec, s=hw)
    loo = (mean_total[None] - g) / (plan.shape[0] - 1)
    # d g(x; s) / d s = -grad g
    jr = -_dft.irfft2(be, g_spec * (2j * np.pi * grid.fr), s=hw)
    jc = -_dft.irfft2(be, g_spec * (2j * np.pi * grid.fc), s=hw)
    resid = loo - g
    weight = grid.weight
    resid = resid - (resid * weight).sum(axis=(1, 2), keepdims=True) / grid.wsum
    a11 = (weight * jr * jr).sum(axis=(1, 2))
    a12 = (weight * jr * jc).sum(axis=(1, 2))
    a22 = (weight * jc * jc).sum(axis=(1, 2))
    b1 = (weight * jr * resid).sum(axis=(1, 2))
    b2 = (weight * jc * resid).sum(axis=(1, 2))
    det = a11 * a22 - a12 * a12
    safe = xp.where(det > 0, det, 1.0)
    dr = xp.where(det > 0, (a22 * b1 - a12 * b2) / safe, 0.0)
    dc = xp.where(det > 0, (a11 * b2 - a12 * b1) / safe, 0.0)
    return be.to_numpy(xp.stack([dr, dc], axis=1)).astype(float)


def polish(plan: Plan, src, spectra: Spectra, shifts, steps=3):
    """Gauss-Newton refinement of each shift by intensity least squares (see register_rigid).

    Each frame ``f_k`` shifted by ``s_k`` (Fourier) is compared with the leave-one-out mean
    ``m_k``; ``s_k += (J^T W J)^-1 J^T W (m_k - g_k)`` with ``J = -grad g_k``. The weight is a
    flat-top window whose cosine taper (1/8 of each side) hides the frame edges, where a
    Fourier shift wraps content around. A first pass sums the plain (unwindowed) spectra
    moved by the current shifts; each step refines the shifts and sums them for the next.
    """
    bsize, progress = plan.batch_size, plan.progress
    total = None
    for start, stop, frames in src.batches(bsize, "mean", progress):
        _, plain = spectra.get(start, frames)
        total = _add(total, spectra.shifted_sum(plain, shifts[start:stop]))
    grid = _polish_grid(plan)
    shifts = shifts.copy()
    for _ in range(steps):
        mean_total = _dft.irfft2(plan.be, total, s=plan.frame_shape)
        new, total = shifts.copy(), None
        for start, stop, frames in src.batches(bsize, "polish", progress):
            _, plain = spectra.get(start, frames)
            step = _polish_step(plan, grid, mean_total, plain, shifts[start:stop])
            new[start:stop] += np.clip(step, -0.5, 0.5)
            total = _add(total, spectra.shifted_sum(plain, new[start:stop]))
        shifts, total = recentre(plan, new, total)
    return shifts


# --------------------------------------------------------------------------- output


def shift_batch(be, frames, shifts, order):
    """Shift a batch by host ``shifts`` (B, 2); the padding is decided on the host."""
    if order == "fourier":
        pad = int(math.ceil(float(np.abs(shifts).max()))) + 16 if len(shifts) else 16
        return _dft.fourier_shift_batch(be, frames, be.asarray(shifts), pad=pad)
    return _dft.spline_shift_batch(be, frames, be.asarray(shifts))


def write_registered(plan: Plan, src, shifts, order, target):
    """Last pass: shift every frame, write it to ``target`` (unless None), return the mean.

    ``target`` is a backend array or any writable array-like (an ``h5py`` dataset, a
    memmap): a host target of a GPU run receives host copies.
    """
    be, xp = plan.be, plan.be.xp
    n, h, w = plan.shape
    host_target = target is not None and be.is_gpu and not is_cupy_array(target)
    mean_acc = xp.zeros((h, w), dtype=xp.float64)  # float64 sum over many frames
    for start, stop, frames in src.batches(plan.batch_size, "shift", plan.progress):
        moved = shift_batch(be, frames, shifts[start:stop], order)
        mean_acc += moved.sum(axis=0, dtype=xp.float64)
        if target is not None:
            target[start:stop] = be.to_numpy(moved) if host_target else moved
    return (mean_acc / n).astype(src.dtype)
