"""Private helpers of rigid registration: windows, batched cross-correlation and sub-pixel
peak refinement by matrix-multiply DFT (Guizar-Sicairos et al. 2008), and batched shifts.

Everything here works on a batch of frames ``(B, H, W)`` on the array namespace of a
:class:`stemgpu.backend.Backend` and never copies to the host; callers decide when to move
the (B, 2) results.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import numpy as np

__all__ = [
    "correlate_batch",
    "fourier_shift_batch",
    "half_spectrum_weights",
    "hann_window",
    "prepare_spectra",
    "shift_ramp",
    "spline_shift_batch",
    "upsampled_correlation",
]

TWO_PI = 2.0 * math.pi
#: Relative height below the highest correlation peak within which ``prefer_small`` picks
#: the smallest shift (lattice translations differ by < 1 %; other peaks are far lower).
PEAK_TOLERANCE = 0.05


def rfft2(be, a, s=None):
    return be.fft.rfft2(a, s=s, axes=(-2, -1), **be.fft_kwargs)


def irfft2(be, a, s):
    return be.fft.irfft2(a, s=s, axes=(-2, -1), **be.fft_kwargs)


def hann_window(xp, shape, dtype="float32"):
    """Separable periodic 2-D Hann window ``w[r, c] = hann(r) * hann(c)``.

    The periodic form (zero at index 0 only) keeps the window's Fourier transform to three
    taps per axis; a separable window keeps the frame corners, unlike a radial one.
    """
    h, w = shape
    wr = 0.5 - 0.5 * np.cos(TWO_PI * np.arange(h) / h)
    wc = 0.5 - 0.5 * np.cos(TWO_PI * np.arange(w) / w)
    return xp.asarray(np.outer(wr, wc), dtype=dtype)


def half_spectrum_weights(xp, width, dtype="float32"):
    """Weights (Wh,) that turn a sum over an rfft half-spectrum into the full-spectrum sum.

    Columns 0 and (for even ``width``) ``width // 2`` appear once in the full spectrum, all
    others twice (as the column and its Hermitian mirror).
    """
    wh = width // 2 + 1
    wgt = np.full(wh, 2.0)
    wgt[0] = 1.0
    if width % 2 == 0:
        wgt[-1] = 1.0
    return xp.asarray(wgt, dtype=dtype)


def prepare_spectra(be, frames, window):
    """Spectra used for correlation: rfft2 of ``window * (frame - weighted mean)``.

    Subtracting the window-weighted mean makes the DC term exactly zero, so the window's own
    shape does not add a broad peak at zero shift to every correlation.
    """
    xp = be.xp
    if window is None:
        centred = frames - frames.mean(axis=(-2, -1), keepdims=True)
        return rfft2(be, centred)
    level = (frames * window).sum(axis=(-2, -1), keepdims=True) / window.sum()
    return rfft2(be, (frames - level) * window).astype(xp.complex64, copy=False)


def _frequencies(xp, n, real_half=False):
    """Integer frequencies (signed for full axes, 0..n//2 for the rfft axis) as float64."""
    if real_half:
        return xp.arange(n // 2 + 1, dtype=xp.float64)
    return xp.asarray(np.fft.fftfreq(n, 1.0 / n), dtype=xp.float64)


def shift_ramp(be, shifts, shape):
    """Phase ramps (B, H, W//2+1) that shift real frames of ``shape`` by ``shifts`` (B, 2).

    Multiplying an rfft2 spectrum by the ramp and inverting moves the content by ``+shift``
    (``scipy.ndimage.fourier_shift`` convention). Phases are formed in float64 (frequency x
    shift reaches hundreds of radians) and only the unit phasors are stored as complex64.
    """
    xp = be.xp
    h, w = shape
    s = xp.asarray(shifts, dtype=xp.float64)
    fr = _frequencies(xp, h)
    fc = _frequencies(xp, w, real_half=True)
    ph_r = xp.exp(-1j * TWO_PI * (s[:, 0:1] * fr[None, :] / h)).astype(xp.complex64)
    ph_c = xp.exp(-1j * TWO_PI * (s[:, 1:2] * fc[None, :] / w)).astype(xp.complex64)
    return ph_r[:, :, None] * ph_c[:, None, :]


@functools.lru_cache(maxsize=1)
def _blas_controller_class():
    """threadpoolctl's ThreadpoolController, or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController


_BLAS_LOCK = threading.Lock()
_BLAS_STATE = {"users": 0, "limiter": None}


@contextlib.contextmanager
def _blas_limited():
    # threadpoolctl's limit is process-wide and restores what it saw on entry: nested or
    # overlapping uses from several threads would restore each other's settings (and leave
    # the process at one thread). The first user sets it, the last one restores it.
    with _BLAS_LOCK:
        if _BLAS_STATE["users"] == 0:
            # a fresh controller: a BLAS loaded since (SciPy's own, on first use) is seen too
            _BLAS_STATE["limiter"] = _blas_controller_class()().limit(limits=1,
                                                                      user_api="blas")
        _BLAS_STATE["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["users"] -= 1
            if _BLAS_STATE["users"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


def one_blas_thread(be):
    """Context running host matrix products on one BLAS thread (no-op on a GPU or without
    threadpoolctl). Uses are counted: nested or overlapping ones (several threads) limit once
    and restore once, when the last one leaves.

    The matrix-DFT products are a few MFLOP each: threaded OpenBLAS gains ~1 ms on them on
    a quiet machine, but its workers then spin for ~0.1 s per call, and on a busy one (or
    next to numba's threads in the demons kernels that follow) a 2 ms product took 10-200 ms.
    One thread also makes the products' rounding independent of the thread count (the same
    shifts in process and on single-threaded dask workers).
    """
    if be.is_gpu or _blas_controller_class() is None:
        return contextlib.nullcontext()
    return _blas_limited()


def _wrap_signed(index, n):
    return index - n * (index > n // 2)


def upsampled_correlation(be, cp, shape, centres, upsample, npts, col_weights):
    """Cross-correlation sampled on a fine grid around ``centres`` by matrix-multiply DFT.

    Parameters
    ----------
    cp : (B, H, W//2+1) complex
        Half-spectrum cross-power ``R * conj(M)``.
    shape : (H, W)
    centres : (B, 2) float64
        Shift (row, col) at the centre of each sampled region, px.
    upsample : float
        Samples per pixel.
    npts : int
        Samples per axis (odd), centred on ``centres``.
    col_weights : (W//2+1,)
        :func:`half_spectrum_weights`, so that the half-spectrum sum equals the full one.

    Returns
    -------
    (B, npts, npts) float32
        ``c(x) = sum_k CP(k) exp(+2 pi i k.x / N)`` at ``x = centre + (i - npts//2)/upsample``.
        The correlation of two real images is real: its half-spectrum sum is its real part.
    """
    xp = be.xp
    h, w = shape
    offs = (xp.arange(npts, dtype=xp.float64) - npts // 2) / float(upsample)
    c = xp.asarray(centres, dtype=xp.float64)
    xr = c[:, 0:1] + offs[None, :]  # (B, npts)
    xc = c[:, 1:2] + offs[None, :]
    fr = _frequencies(xp, h)
    fc = _frequencies(xp, w, real_half=True)
    # Reduce phases modulo 2 pi in float64 before forming complex64 kernels.
    pr = xp.mod(xr[:, :, None] * fr[None, None, :] / h, 1.0) * TWO_PI  # (B, npts, H)
    pc = xp.mod(fc[None, :, None] * xc[:, None, :] / w, 1.0) * TWO_PI  # (B, Wh, npts)
    kr = xp.exp(1j * pr).astype(xp.complex64)
    kc = (xp.exp(1j * pc) * col_weights[None, :, None]).astype(xp.complex64)
    with one_blas_thread(be):
        out = xp.matmul(xp.matmul(kr, cp.astype(xp.complex64, copy=False)), kc)
    return out.real


def _parabolic_offset(xp, left, mid, right):
    """Vertex of the parabola through three equally spaced samples, in sample units."""
    denom = left - 2.0 * mid + right
    safe = xp.where(xp.abs(denom) > 0, denom, 1.0)
    off = xp.where(xp.abs(denom) > 0, 0.5 * (left - right) / safe, 0.0)
    return xp.clip(off, -0.5, 0.5)


def _grid_peak(be, values, upsample, centres):
    """Arg-max of (B, n, n) samples, refined by a parabola through the neighbours (px)."""
    xp = be.xp
    b, n, _ = values.shape
    flat = values.reshape(b, -1)
    idx = xp.argmax(flat, axis=1)
    ir, ic = idx // n, idx % n
    peak = flat[xp.arange(b), idx]
    irc = xp.clip(ir, 1, n - 2)
    icc = xp.clip(ic, 1, n - 2)
    bi = xp.arange(b)
    # Parabolic vertex only where the maximum is interior (else keep the grid point).
    dr = _parabolic_offset(xp, values[bi, irc - 1, ic], values[bi, irc, ic],
                           values[bi, irc + 1, ic])
    dc = _parabolic_offset(xp, values[bi, ir, icc - 1], values[bi, ir, icc],
                           values[bi, ir, icc + 1])
    dr = xp.where(irc == ir, dr, 0.0)
    dc = xp.where(icc == ic, dc, 0.0)
    rows = centres[:, 0] + (ir - n // 2 + dr) / upsample
    cols = centres[:, 1] + (ic - n // 2 + dc) / upsample
    return xp.stack([rows, cols], axis=1), peak


def _energy(spec, col_weights):
    """Sum of squares of the real image whose rfft2 half-spectrum is ``spec`` (times H*W)."""
    return ((spec.real**2 + spec.imag**2) * col_weights).sum(axis=(-2, -1))


def correlate_batch(be, ref_spec, mov_spec, shape, *, upsample=100, normalization=None,
                    max_shift=None, col_weights=None, centres=None, radius=None,
                    prefer_small=False):
    """Shifts (B, 2) registering each moving frame onto its reference, and the peak NCC.

    ``ref_spec`` is (H, Wh) or (B, H, Wh); ``mov_spec`` (B, H, Wh) (from
    :func:`prepare_spectra`). The coarse (integer) peak comes from one batched inverse FFT,
    restricted to ``|shift| <= max_shift`` per axis when given; when ``centres`` (B, 2) and
    ``radius`` are given it is searched only within ``radius`` px of the centres, on a small
    matrix-DFT grid (the peak of a lattice repeats every unit cell: searching near a
    previous estimate prevents a jump to a neighbour cell, whose peak can be higher because
    the window favours small shifts). With ``prefer_small`` the FFT search takes the
    peak nearest zero shift among those within ``PEAK_TOLERANCE`` of the highest (for frames
    known to move by less than half a unit cell, e.g. consecutive frames). The peak is
    refined
    in two matrix-DFT stages (1/10 px over +-0.7 px, then 1/``upsample`` px over +-1
    stage-one step, where the stage-one parabolic vertex lies) and a final parabola through
    the fine grid's maximum.
    Two small stages cost ~4x less than one 1.5 px wide stage at the final spacing and
    sample the same smooth peak.

    Returns
    -------
    shifts : (B, 2) float64, the shift (scikit-image sign) of each moving frame
    quality : (B,) float32, peak of the normalised cross-correlation of the windowed frames
    at_limit : (B,) bool, coarse peak on the ``max_shift`` or search-box boundary
    """
    xp = be.xp
    h, w = shape
    if col_weights is None:
        col_weights = half_spectrum_weights(xp, w)
    cp = ref_spec * xp.conj(mov_spec)
    if normalization == "phase":
        eps = 100 * np.finfo(np.float32).eps
        cp = cp / xp.maximum(xp.abs(cp), eps * xp.abs(cp).max())
        ref_energy = mov_energy = _energy(cp, col_weights)
    else:
        ref_energy = _energy(ref_spec, col_weights)
        mov_energy = _energy(mov_spec, col_weights)
    b = cp.shape[0]
    at_limit = xp.zeros(b, dtype=bool)
    if max_shift is not None:
        lim_r, lim_c = max_shift
    if centres is not None:
        # Local search: integer lags within ``radius`` of the previous estimate, evaluated
        # by matrix DFT on a (2r+1)^2 grid; no inverse FFT of the whole correlation needed.
        cen = xp.rint(xp.asarray(centres, dtype=xp.float64))
        npts = 2 * int(radius) + 1
        grid = upsampled_correlation(be, cp, shape, cen, 1.0, npts, col_weights)
        offs = xp.arange(npts, dtype=xp.float64) - radius
        if max_shift is not None:
            okr = xp.abs(cen[:, 0:1] + offs[None, :]) <= lim_r
            okc = xp.abs(cen[:, 1:2] + offs[None, :]) <= lim_c
            grid = xp.where(okr[:, :, None] & okc[:, None, :], grid, -xp.inf)
        idx = xp.argmax(grid.reshape(b, -1), axis=1)
        ir, ic = idx // npts, idx % npts
        coarse = cen + xp.stack([offs[ir], offs[ic]], axis=1)
        at_limit = (ir == 0) | (ir == npts - 1) | (ic == 0) | (ic == npts - 1)
        int_peak = grid.reshape(b, -1)[xp.arange(b), idx]
    else:
        corr = irfft2(be, cp, s=(h, w))
        if max_shift is not None:
            rr = xp.abs(_wrap_signed(xp.arange(h), h)) <= lim_r
            cc = xp.abs(_wrap_signed(xp.arange(w), w)) <= lim_c
            corr = xp.where((rr[:, None] & cc[None, :])[None], corr, -xp.inf)
        flat = corr.reshape(b, -1)
        if prefer_small:
            # A lattice correlates with itself at every unit-cell translation, with peaks
            # that differ by well under 1 % in large frames: sampled on the integer grid,
            # a neighbour cell's peak can come out highest. Take the pixel nearest zero
            # shift among those within ``PEAK_TOLERANCE`` of the highest (it lies on the
            # peak nearest zero), then the maximum within 3 px of it (that peak's top).
            top = flat.max(axis=1)
            lag_r = _wrap_signed(xp.arange(h), h)
            lag_c = _wrap_signed(xp.arange(w), w)
            dist = (lag_r[:, None] ** 2 + lag_c[None, :] ** 2).astype(xp.float32)
            near = corr >= (top - PEAK_TOLERANCE * xp.abs(top))[:, None, None]
            seed = xp.argmax(xp.where(near, -dist[None], -xp.inf).reshape(b, -1), axis=1)
            d = xp.arange(-3, 4)
            rows = (seed // w)[:, None] + d[None, :]
            cols = (seed % w)[:, None] + d[None, :]
            box = corr[xp.arange(b)[:, None, None], (rows % h)[:, :, None],
                       (cols % w)[:, None, :]]
            k = xp.argmax(box.reshape(b, -1), axis=1)
            idx = (rows[xp.arange(b), k // 7] % h) * w + cols[xp.arange(b), k % 7] % w
        else:
            idx = xp.argmax(flat, axis=1)
        coarse = xp.stack([_wrap_signed(idx // w, h), _wrap_signed(idx % w, w)], axis=1)
        coarse = coarse.astype(xp.float64)
        int_peak = flat[xp.arange(b), idx] * (h * w)
    if max_shift is not None:
        at_limit = at_limit | (xp.abs(coarse[:, 0]) >= math.floor(lim_r)) | (
            xp.abs(coarse[:, 1]) >= math.floor(lim_c))
    if upsample <= 1:
        shifts, peak = coarse, int_peak
    else:
        u1 = min(float(upsample), 10.0)
        n1 = 2 * int(math.ceil(0.7 * u1)) + 1
        vals = upsampled_correlation(be, cp, shape, coarse, u1, n1, col_weights)
        shifts, peak = _grid_peak(be, vals, u1, coarse)
        if upsample > u1:
            n2 = 2 * int(math.ceil(upsample / u1)) + 1
            vals = upsampled_correlation(be, cp, shape, shifts, upsample, n2, col_weights)
            shifts, peak = _grid_peak(be, vals, float(upsample), shifts)
    denom = xp.sqrt(ref_energy * mov_energy)
    quality = xp.where(denom > 0, peak / xp.where(denom > 0, denom, 1.0), 0.0)
    return shifts, quality.astype(xp.float32), at_limit


def fourier_shift_batch(be, frames, shifts, *, pad=None):
    """Shift each frame of (B, H, W) by its (row, col) shift with a Fourier phase ramp.

    The frames are first extended by reflection (``pad`` px per side, default
    ``ceil(max|shift|) + 16``) to a fast FFT length, the mirrored margin fading to the frame
    mean, so that the periodic wrap brings in content continuous with the frame instead of
    the opposite edge: this keeps Gibbs ripple at the borders small (measured on rendered
    lattices: 1.2 % of the peak at the valid-region edge, 0.1 % 16 px inside). Band-limited
    content is moved exactly (no blur). Pixels whose source lies outside the frame hold
    mirrored data; callers report them as invalid rather than treating them as measurements.
    """
    xp = be.xp
    _, h, w = frames.shape
    s = xp.asarray(shifts, dtype=xp.float64)
    if pad is None:  # callers holding host shifts pass ``pad`` and avoid this device sync
        pad = int(math.ceil(float(xp.abs(s).max()))) + 16 if s.size else 16
    pad_r = min(pad, h - 1)
    pad_c = min(pad, w - 1)
    from scipy.fft import next_fast_len

    hp = next_fast_len(h + 2 * pad_r, real=True)
    wp = next_fast_len(w + 2 * pad_c, real=True)
    r0 = (hp - h) // 2
    c0 = (wp - w) // 2
    r0, c0 = min(r0, h - 1), min(c0, w - 1)
    r1 = min(hp - h - r0, h - 1)
    c1 = min(wp - w - c0, w - 1)
    hp, wp = h + r0 + r1, w + c0 + c1
    padded = xp.pad(frames, ((0, 0), (r0, r1), (c0, c1)), mode="reflect")
    # Fade the mirrored margin to the frame mean, so that the periodic wrap in the middle of
    # the margin joins two equal values instead of two unrelated mirrored rows (a jump whose
    # Gibbs ripple would reach far into the frame).
    level = frames.mean(axis=(1, 2), keepdims=True)
    fade = xp.asarray(np.outer(_fade(h, r0, r1), _fade(w, c0, c1)), dtype=frames.dtype)
    padded = level + (padded - level) * fade
    spec = rfft2(be, padded) * shift_ramp(be, s, (hp, wp))
    out = irfft2(be, spec, s=(hp, wp))[:, r0:r0 + h, c0:c0 + w]
    return xp.ascontiguousarray(out.astype(frames.dtype, copy=False))


def _fade(n, before, after):
    """1 over the frame, a raised cosine down to 0 across each margin."""
    out = np.ones(n + before + after)
    if before:
        out[:before] = 0.5 - 0.5 * np.cos(np.pi * np.arange(before) / before)
    if after:
        out[n + before:] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(after) + 1) / after)
    return out


def _bspline3_weights(xp, t):
    """Cubic B-spline weights for taps at offsets -1, 0, 1, 2 of a fractional position t."""
    t2 = t * t
    t3 = t2 * t
    w0 = (1.0 - t) ** 3 / 6.0
    w1 = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w3 = t3 / 6.0
    return (w0, w1, w2, w3)


def _spline_axis(xp, coeffs, shift, axis):
    """Evaluate prefiltered cubic B-spline coefficients at ``index - shift`` along ``axis``."""
    b = coeffs.shape[0]
    n = coeffs.shape[axis]
    neg = -xp.asarray(shift, dtype=xp.float64)
    base = xp.floor(neg)
    t = (neg - base).astype(coeffs.dtype)
    base = base.astype(xp.int64)
    weights = _bspline3_weights(xp, t)
    pos = xp.arange(n, dtype=xp.int64)
    bi = xp.arange(b)[:, None]
    out = None
    for tap, wt in zip((-1, 0, 1, 2), weights, strict=True):
        idx = xp.clip(pos[None, :] + base[:, None] + tap, 0, n - 1)  # (B, n)
        if axis == 1:
            term = coeffs[bi, idx, :] * wt[:, None, None]
        else:
            term = coeffs[bi[:, :, None], xp.arange(coeffs.shape[1])[None, :, None],
                          idx[:, None, :]] * wt[:, None, None]
        out = term if out is None else out + term
    return out


def spline_shift_batch(be, frames, shifts):
    """Shift each frame by its (row, col) shift with interpolating cubic B-splines.

    Equivalent to ``scipy.ndimage.shift(frame, shift, order=3)`` in the frame interior,
    batched over frames (per-frame integer offsets and tap weights, one gather per tap).
    Samples beyond the frame edge are clamped to the edge coefficients (reported invalid).
    """
    xp = be.xp
    nd = be.ndimage
    s = xp.asarray(shifts, dtype=xp.float64)
    coeffs = nd.spline_filter1d(frames, order=3, axis=1, output=xp.float32, mode="mirror")
    coeffs = nd.spline_filter1d(coeffs, order=3, axis=2, output=xp.float32, mode="mirror")
    tmp = _spline_axis(xp, coeffs, s[:, 0], axis=1)
    out = _spline_axis(xp, tmp, s[:, 1], axis=2)
    return out.astype(frames.dtype, copy=False)
