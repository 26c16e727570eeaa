"""Absolute quality gates of rigid registration: every doubtful frame gets a reason.

:func:`stemgpu.registration.register_rigid` calls :func:`relink` on the frame-to-frame
chain (frames that share no signal with their neighbour would otherwise carry a random
offset into every later frame) and :func:`judge` on the final shifts, which returns one
reason per frame (``""`` when the frame is fine) and corrects unit-cell jumps when the other
frames agree on where the frame belongs.

The peak test
-------------
``significance = quality * sqrt(n_eff)``, with ``n_eff = (sum w^2)^2 / sum w^4`` the pixel
count the window leaves (0.265 of the pixels for the Hann window; all of them without one).
For frames that share no signal, each lag of the normalised cross-correlation of windowed,
uncorrelated pixel noise is a zero-mean variable of standard deviation ``1 / sqrt(n_eff)``,
so the statistic is the peak in noise standard deviations. Measured against the
leave-one-out mean (6 frames, Poisson noise only, 8 seeds at 96^2 and 256^2, 2 at 512^2):
at most 4.8, 4.6 and 5.5; SrTiO3 at 20 counts per Sr column, same sizes: at least 40.9,
111.2 and 224.4, and a fine square lattice (150 pm cell, 10 px) at 20 counts at least 25.0,
70.8 and 144.6. :data:`MIN_SIGNIFICANCE` = 8 sits well above the noise and below a third of
the weakest lattice. (A robust z-score over the correlation surface itself does not separate
them: a lattice's surface is periodic, its spread is the lattice's, and the fine lattice
gave 2.0 against up to 6.0 for noise.) Pixel-correlated noise lowers ``n_eff``; data
resampled onto a finer grid should be binned back first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_SIGNIFICANCE", "effective_pixels", "judge", "relink", "unrelated"]

#: Peak significance (noise standard deviations) below which a frame is refused.
MIN_SIGNIFICANCE = 8.0
#: A frame whose quality is below this fraction of the median shares far less signal.
RELATIVE_QUALITY = 0.5
#: A frame off the drift trajectory by more than this fraction of the shortest translation
#: between strong peaks of a frame's autocorrelation (or 6 robust standard deviations of the
#: jitter of the other frames, whichever is larger) is a jump. For SrTiO3 at 14.6 pm the
#: shortest is the Sr -> Ti-O half diagonal, 18.9 px: 4.7 px. On clean 6-frame stacks with
#: 1-1.5 px jitter (20 seeds each) 5 sigma flagged 1-in-20 stacks, 6 sigma none.
JUMP_FRACTION = 0.25
JUMP_SIGMAS = 6.0


def effective_pixels(window, shape) -> float:
    """``(sum w^2)^2 / sum w^4`` of the apodisation window (the pixel count without one)."""
    if window is None:
        return float(shape[0] * shape[1])
    w2 = np.asarray(window, dtype=np.float64) ** 2
    return float(w2.sum() ** 2 / (w2 * w2).sum())


def significance(quality, n_eff):
    """Peak significance of each frame (see the module docstring)."""
    return np.asarray(quality, dtype=np.float64) * np.sqrt(n_eff)


def unrelated(quality, n_eff):
    """Frames (n,) bool whose peak is not significant or below half the median quality."""
    q = np.asarray(quality, dtype=np.float64)
    return (significance(q, n_eff) < MIN_SIGNIFICANCE) | (q < RELATIVE_QUALITY * np.median(q))


def relink(chain, step_quality, n_eff, measure):
    """Chain shifts that skip frame-to-frame links with no significant peak.

    ``chain`` (n, 2) are the summed frame-to-frame steps, ``step_quality`` (n,) the peak of
    each step (entry k for the link k-1 -> k). A link is weak when its peak is not
    significant or below half the best link quality. A frame behind a weak link is
    measured directly against the last frame tied to the chain (``measure(i, j)`` returns the
    step i -> j and its quality); when that peak passes the same tests (against the median of
    the strong links) the frame joins the chain there.
    Returns the new chain (not recentred) and a (n,) bool array of frames tied to the chain.
    When every link is significant the chain is returned unchanged.
    """
    n = chain.shape[0]
    # A link is strong when its peak stands out of the noise and is not far below the
    # best links (a frame of another lattice or orientation still correlates a little; the
    # best, not the median, since unrelated frames break two links each).
    best = float(np.max(step_quality[1:]))
    strong = (significance(step_quality, n_eff) >= MIN_SIGNIFICANCE) & (
        step_quality >= RELATIVE_QUALITY * best)
    strong[0] = False
    if strong[1:].all():
        return chain, np.ones(n, dtype=bool)
    typical = float(np.median(step_quality[1:][strong[1:]])) if strong[1:].any() else 0.0

    def ok(q):
        return significance(q, n_eff) >= MIN_SIGNIFICANCE and q >= RELATIVE_QUALITY * typical

    step = np.diff(chain, axis=0, prepend=chain[:1])
    out_link = np.append(strong[1:], False)
    # The chain starts at the first frame with a significant link to its successor.
    start = int(np.argmax(out_link)) if out_link.any() else 0
    new = chain.copy()
    tied = np.zeros(n, dtype=bool)
    tied[start] = True
    last = start
    for k in range(start + 1, n):
        if strong[k] and tied[k - 1]:
            new[k] = new[k - 1] + step[k]
        else:
            d, q = measure(last, k)
            if ok(q):
                new[k] = new[last] + d
            else:
                new[k] = new[k - 1] + step[k]
                continue
        tied[k] = True
        last = k
    for k in range(start - 1, -1, -1):  # frames before the start, measured against it
        d, q = measure(start, k)
        if ok(q):
            new[k] = new[start] + d
            tied[k] = True
    return new, tied


def _alias_vectors(mean_image, window):
    """Lags (m, 2) of the strong off-centre peaks of an image's autocorrelation (px, with a
    parabolic vertex): the translations onto which a correlation can jump."""
    from scipy.ndimage import maximum_filter

    m = np.asarray(mean_image, dtype=np.float64)
    wgt = np.ones_like(m) if window is None else np.asarray(window, dtype=np.float64)
    m = (m - (m * wgt).sum() / wgt.sum()) * wgt
    ac = np.fft.irfft2(np.abs(np.fft.rfft2(m)) ** 2, s=m.shape)
    # Divided by the window's own autocorrelation, whose fall-off would pull every peak
    # towards zero lag (by 0.5 px at 27 px in a 96 px Hann window); kept where it is large.
    aw = np.fft.irfft2(np.abs(np.fft.rfft2(wgt)) ** 2, s=m.shape)
    inside = aw > 0.25 * aw[0, 0]
    ac = np.where(inside, ac / np.where(inside, aw, 1.0), 0.0)
    if ac[0, 0] <= 0:
        return np.zeros((0, 2))
    peaks = (ac == maximum_filter(ac, size=5, mode="wrap")) & (ac > 0.2 * ac[0, 0])
    peaks[0, 0] = False
    r, c = np.nonzero(peaks)
    h, w = m.shape

    def vertex(left, mid, right):  # parabola through three samples, offset in px
        den = left - 2.0 * mid + right
        return np.where(den < 0, 0.5 * (left - right) / np.where(den < 0, den, 1.0), 0.0)

    dr = vertex(ac[(r - 1) % h, c], ac[r, c], ac[(r + 1) % h, c])
    dc = vertex(ac[r, (c - 1) % w], ac[r, c], ac[r, (c + 1) % w])
    return np.stack([r - h * (r > h // 2) + dr, c - w * (c > w // 2) + dc], axis=1)


def _trend(shifts, frames):
    """Robust straight line through each axis of the shifts (median of pairwise slopes)."""
    t = frames.astype(float)
    fit = np.zeros((len(t), 2))
    for ax in range(2):
        y = shifts[:, ax]
        i, j = np.triu_indices(len(t), 1)
        slope = float(np.median((y[j] - y[i]) / (t[j] - t[i]))) if len(i) else 0.0
        fit[:, ax] = slope * t + float(np.median(y - slope * t))
    return fit


def judge(shifts, quality, *, n_eff, limit, at_limit, inlier_fraction, tied, frame, window):
    """Reasons (n,) for doubtful frames and the shifts with unit-cell jumps corrected.

    Returns ``(shifts, reasons, corrected)``: ``reasons[k]`` is ``""`` for a frame that
    passed every gate, ``corrected`` maps frame index to the lattice translation (row, col)
    px removed from its shift. ``frame(k)`` returns frame ``k`` (host); the autocorrelation
    of the best frame gives the lattice translations.
    """
    n = shifts.shape[0]
    reasons = [[] for _ in range(n)]
    z = significance(quality, n_eff)
    med = float(np.median(quality))
    for k in range(n):
        if z[k] < MIN_SIGNIFICANCE:
            reasons[k].append(
                f"correlation peak not above noise ({z[k]:.1f} noise standard deviations, "
                f"threshold {MIN_SIGNIFICANCE:g})")
        elif quality[k] < RELATIVE_QUALITY * med:
            reasons[k].append(f"correlation peak {quality[k]:.3f} below half the median "
                              f"{med:.3f}: the frame shares little signal with the others")
        if not tied[k]:
            reasons[k].append("no significant correlation with the frames tied to the "
                              "frame-to-frame chain: its unit-cell offset is unknown")
        if limit is not None and (abs(shifts[k, 0]) >= limit[0]
                                  or abs(shifts[k, 1]) >= limit[1]):
            reasons[k].append(f"shift ({shifts[k, 0]:.2f}, {shifts[k, 1]:.2f}) px at or "
                              f"beyond max_shift {limit}")
        elif at_limit[k]:
            reasons[k].append("correlation peak on the edge of the search (max_shift, or "
                              "4 px around the frame-to-frame estimate)")
        if inlier_fraction is not None and inlier_fraction[k] < 0.5:
            reasons[k].append(f"only {inlier_fraction[k]:.0%} of its pair measurements "
                              "consistent with the solution")
    shifts = shifts.copy()
    corrected = {}
    ok = np.array([not r for r in reasons])
    if ok.sum() >= 3:
        frames = np.flatnonzero(ok)
        resid = shifts[frames] - _trend(shifts[frames], frames)
        dev = np.hypot(resid[:, 0], resid[:, 1])
        image = frame(int(frames[np.argmax(quality[frames])]))
        aliases = _alias_vectors(image, window)
        period = (float(np.hypot(aliases[:, 0], aliases[:, 1]).min()) if len(aliases)
                  else float(min(image.shape)))
        floor = JUMP_FRACTION * period
        # Jitter from the steps between the kept frames (drift per step removed by the
        # median), leaving out the steps into and out of frames already beyond the floor:
        # a line fitted through a few frames would leave too small residuals, and a jumped
        # frame would inflate the scatter of both its steps.
        steps = np.diff(shifts[frames], axis=0) / np.diff(frames)[:, None]
        clean = ~((dev > floor)[:-1] | (dev > floor)[1:])
        steps = steps[clean] if clean.sum() >= 2 else steps
        steps = steps - np.median(steps, axis=0)
        # RMS, not MAD: the outliers are out already, and a median of a few steps can
        # come out at half the jitter.
        scatter = float(np.sqrt(np.mean(steps**2) / 2.0))
        threshold = max(floor, JUMP_SIGMAS * scatter)
        majority = 2 * int((dev <= threshold).sum()) > len(frames)
        for idx, k in enumerate(frames):
            if dev[idx] <= threshold:
                continue
            miss = np.hypot(*(resid[idx][None] - aliases).T) if len(aliases) else np.array([])
            if majority and miss.size and miss.min() <= 0.5 * threshold:
                vec = aliases[int(np.argmin(miss))]
                shifts[k] -= vec
                corrected[int(k)] = (float(vec[0]), float(vec[1]))
            else:
                reasons[k].append(
                    f"shift {dev[idx]:.1f} px off the drift of the other frames (threshold "
                    f"{threshold:.1f} px) and no clear unit-cell translation explains it")
    return shifts, tuple("; ".join(r) for r in reasons), corrected
