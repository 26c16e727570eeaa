"""Column tracking: every column fitted in every frame, and what the frames say about it.

The frames of a registered stack are repeated measurements of the same columns. Fitting each
column in each frame (one batched :func:`~stemgpu.atoms.fit.fit_atoms` call over ``F x N``
windows) gives per-frame positions with Fisher-information error bars, and the scatter of a
column over the frames is an *empirical* precision that can be set beside them, on real data,
without ground truth. Their ratio per species, the calibration ratio, is 1 when the error
bars are right.

The passes, each a function of arrays only (host NumPy; ``F x N`` values):

- :func:`frame_motion`: the common displacement of all columns in a frame (a registration
  residual), which is removed before the scatter is measured;
- :func:`calibration_ratios`: observed frame-to-frame scatter / predicted per-frame error per
  species, with its chi-square confidence interval;
- :func:`column_outliers`: columns that jump (a step in position), are lost (fits fail from
  some frame on: a hop or a vacancy), change intensity in a step or fade with dose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_batch_size, check_int, check_real
from ..backend import HostCopyMixin, to_host
from .models import CONVERGED

__all__ = [
    "COLUMN_FLAGS",
    "FRAME_FIT_FIELDS",
    "CalibrationRatio",
    "ColumnTracks",
    "assess_tracks",
    "calibration_ratios",
    "column_outliers",
    "frame_motion",
    "prepare_tracking",
    "track_columns",
]

#: Column flag bits of :attr:`ColumnTracks.column_flags`.
COLUMN_FLAGS = {
    1: "jump",        # a significant step in position
    2: "lost",        # fitted in early frames, not in later ones (hop, vacancy, damage)
    4: "intensity step",
    8: "fading",      # amplitude falls steadily with dose
    16: "unfitted",   # fitted in fewer than 3 frames
    32: "erratic",    # frame scatter far beyond the column's error bars
}


@dataclass(frozen=True)
class CalibrationRatio:
    """Observed frame-to-frame scatter over the predicted per-frame error, for one species.

    ``ratio = sqrt(sum z^2 / dof)`` with ``z`` the per-frame deviation of a column from its
    own mean (after removing the frames' common motion) over its Fisher-information error;
    ``low`` / ``high`` are the central chi-square interval at ``level`` for ``dof``.
    """

    species: str
    ratio: float
    low: float
    high: float
    dof: int
    n_columns: int
    level: float = 0.6827

    def __str__(self) -> str:
        return (f"{self.species}: {self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"({self.n_columns} columns, {self.dof} dof)")


@dataclass(frozen=True)
class ColumnTracks(HostCopyMixin):
    """Every column in every frame (host NumPy arrays).

    Attributes
    ----------
    positions, position_errors : (F, N, 2) float64
        Per-frame fitted (row, col) and one-sigma errors (px); NaN where not fitted.
    amplitudes, amplitude_errors : (F, N) float64
    status : (F, N) int8
        Fit status codes (:mod:`stemgpu.atoms.models`).
    species : (N,) str
    mean_positions : (N, 2)
        Mean over the frames in which the column was fitted, common motion removed.
    scatter : (N, 2)
        Frame-to-frame standard deviation per column and axis (px), common motion removed.
    predicted : (N, 2)
        Root-mean-square per-frame Fisher error per column and axis (px).
    motion, motion_errors : (F, 2)
        Common displacement of the columns in each frame and its error (px).
    calibration : dict of str -> CalibrationRatio
        Per species, over the columns not flagged.
    column_flags : (N,) int
        Bits of :data:`COLUMN_FLAGS`; ``column_reasons`` says why, in words.
    column_reasons : (N,) str
    frame_flagged : (F,) bool
        Frames whose columns move together beyond their errors or whose fits fail;
        ``frame_reasons`` says why.
    frame_reasons : (F,) str
    counts_per_unit : float
        Gain used for the per-frame errors.
    parameters : dict
    """

    positions: Any
    position_errors: Any
    amplitudes: Any
    amplitude_errors: Any
    status: Any
    species: Any
    mean_positions: Any
    scatter: Any
    predicted: Any
    motion: Any
    motion_errors: Any
    calibration: dict
    column_flags: Any
    column_reasons: Any
    frame_flagged: Any
    frame_reasons: Any
    counts_per_unit: float
    parameters: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        """Number of frames tracked."""
        return int(self.positions.shape[0])

    @property
    def trajectories(self):
        """(N, F, 2) per-column trajectories: position in each frame minus the frame's motion."""
        return np.transpose(self.positions - self.motion[:, None, :], (1, 0, 2))

    def flagged_columns(self) -> dict[str, int]:
        """Number of columns per flag name."""
        return {name: int(((self.column_flags & bit) != 0).sum())
                for bit, name in COLUMN_FLAGS.items() if ((self.column_flags & bit) != 0).any()}

    def summary(self) -> dict[str, Any]:
        """Calibration ratios and flag counts, for a report."""
        return {"frames": self.n_frames, "columns": int(self.positions.shape[1]),
                "calibration": {k: (v.ratio, v.low, v.high) for k, v in
                                self.calibration.items()},
                "columns_flagged": self.flagged_columns(),
                "frames_flagged": int(self.frame_flagged.sum())}


# ----------------------------------------------------------------------------- passes


def _weights(errors, usable):
    """Inverse-variance weights of the usable entries; 0 elsewhere and where an error is
    zero or not finite (such an entry carries no weight rather than all of it)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(usable, 1.0 / np.square(errors), 0.0)
    return np.where(np.isfinite(w), w, 0.0)


def frame_motion(positions, errors, usable):
    """Common displacement of all usable columns in each frame (inverse-variance weighted).

    Parameters
    ----------
    positions, errors : (F, N, 2) arrays
        Per-frame positions and their errors (px).
    usable : (F, N) bool
        Entries that take part (converged fits of unflagged columns).

    Returns
    -------
    motion, motion_errors : (F, 2)
        The frame's mean deviation from the columns' own means, and its standard error.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.track import frame_motion
    >>> rng = np.random.default_rng(0)
    >>> pos = rng.normal(0, 0.01, (5, 200, 2)) + np.arange(200)[None, :, None]
    >>> pos[3] += 0.2                                 # frame 3 shifted by 0.2 px
    >>> m, e = frame_motion(pos, np.full_like(pos, 0.01), np.ones((5, 200), bool))
    >>> bool(abs(m[3, 0] - 0.16) < 0.01), bool(abs(m[0, 0] + 0.04) < 0.01)
    (True, True)
    """
    w = _weights(errors, usable[..., None])
    x = np.where(usable[..., None], positions, 0.0)
    col_mean = (w * x).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-300)
    dev = np.where(usable[..., None], x - col_mean[None], 0.0)
    wsum = w.sum(axis=1)
    motion = (w * dev).sum(axis=1) / np.maximum(wsum, 1e-300)
    err = 1.0 / np.sqrt(np.maximum(wsum, 1e-300))
    motion = np.where(wsum > 0, motion, np.nan)
    # The motion is measured relative to the column means, which include the frame itself.
    return motion - np.nanmean(motion, axis=0), np.where(wsum > 0, err, np.inf)


def calibration_ratios(positions, errors, usable, species, *, level=0.6827):
    """Per-species ratio of the observed frame-to-frame scatter to the predicted error.

    Parameters
    ----------
    positions, errors : (F, N, 2)
        Per-frame positions with the frames' common motion removed, and their errors.
    usable : (F, N) bool
    species : (N,) str
    level : float
        Confidence level of the interval.

    Returns
    -------
    ratios : dict of str -> CalibrationRatio
        Species with at least one column usable in 2 or more frames.
    scatter, predicted : (N, 2)
        Per column: frame standard deviation and root-mean-square predicted error.

    Notes
    -----
    Each column contributes ``sum_f ((x_f - xbar) / sigma_f)^2`` with ``n_f - 1`` degrees of
    freedom per axis (``xbar`` the inverse-variance weighted mean); under correct error bars
    the sum over columns is chi-square distributed with the summed dof. The interval assumes
    independent frames; scan noise correlated between neighbouring columns widens it.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.track import calibration_ratios
    >>> rng = np.random.default_rng(1)
    >>> err = np.full((20, 300, 2), 0.05)
    >>> pos = rng.normal(0, 0.05, err.shape)
    >>> r, s, p = calibration_ratios(pos, err, np.ones((20, 300), bool), np.array(["A"] * 300))
    >>> 0.97 < r["A"].ratio < 1.03
    True
    """
    from scipy.stats import chi2

    species = np.asarray(species).astype(str)
    # Not _weights: a zero error bar among the usable entries must make the ratio infinite
    # (a claim of infinite precision the frames contradict), not drop out of it.
    w = np.where(usable[..., None], 1.0 / np.square(errors), 0.0)
    x = np.where(usable[..., None], positions, 0.0)
    n_f = usable.sum(axis=0)
    xbar = (w * x).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-300)
    z2 = np.where(usable[..., None], np.square(x - xbar[None]) * w, 0.0).sum(axis=0)  # (N, 2)
    dev2 = np.where(usable[..., None], np.square(x - xbar[None]), 0.0).sum(axis=0)
    dof_col = np.maximum(n_f - 1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scatter = np.sqrt(dev2 / dof_col[:, None])
        predicted = np.sqrt(np.where(usable[..., None], np.square(errors), 0.0).sum(axis=0)
                            / n_f[:, None])
    scatter[dof_col == 0] = np.nan
    predicted[n_f == 0] = np.nan
    tail = 0.5 * (1.0 - level)
    ratios = {}
    for name in sorted(set(species.tolist())):  # a handful of species, not a loop over atoms
        sel = (species == name) & (dof_col > 0)
        dof = int(2 * dof_col[sel].sum())
        if dof == 0:
            continue
        r2 = float(z2[sel].sum()) / dof
        lo = np.sqrt(r2 * dof / chi2.ppf(1.0 - tail, dof))
        hi = np.sqrt(r2 * dof / chi2.ppf(tail, dof))
        ratios[name] = CalibrationRatio(name, float(np.sqrt(r2)), float(lo), float(hi), dof,
                                        int(sel.sum()), float(level))
    return ratios, scatter, predicted


def _best_step(values, errors, usable):
    """Largest two-segment mean difference per column, over all split frames.

    ``values``, ``errors``: (F, N, D). Returns the z of the best split (combined over D),
    the split frame and the relative change of the first component (after / before - 1).
    """
    w = _weights(errors, usable[..., None])
    x = np.where(usable[..., None], values, 0.0)
    cw = np.cumsum(w, axis=0)
    cx = np.cumsum(w * x, axis=0)
    tw, tx = cw[-1], cx[-1]
    # Split after frame t (t = 0 .. F-2): "before" = frames 0..t.
    wb, xb = cw[:-1], cx[:-1]
    wa, xa = tw[None] - wb, tx[None] - xb
    with np.errstate(invalid="ignore", divide="ignore"):
        mb, ma = xb / wb, xa / wa
        z2 = np.square(ma - mb) / (1.0 / wb + 1.0 / wa)
    z2 = np.where((wb > 0) & (wa > 0), z2, 0.0).sum(axis=-1)  # (F-1, N)
    t = np.argmax(z2, axis=0)
    cols = np.arange(values.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = ma[t, cols, 0] / mb[t, cols, 0] - 1.0
    return np.sqrt(z2[t, cols]), t + 1, rel


def _scatter_tail(positions, errors, usable):
    """Chi-square tail probability of each column's scatter about its weighted mean."""
    from scipy.stats import chi2

    w = _weights(errors, usable[..., None])
    x = np.where(usable[..., None], positions, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xbar = (w * x).sum(axis=0) / w.sum(axis=0)
        z2 = np.where(usable[..., None], np.square(x - xbar[None]) * w, 0.0).sum(axis=(0, 2))
    dof = 2 * np.maximum(usable.sum(axis=0) - 1, 0)
    return np.where(dof > 0, chi2.sf(z2, np.maximum(dof, 1)), 1.0)


def column_outliers(positions, errors, amplitudes, amplitude_errors, fitted, *,
                    jump_z=6.0, fade_z=5.0, fade_fraction=0.2, erratic_p=1e-6, scale=None):
    """Flag columns whose trajectory says something happened to them.

    Parameters
    ----------
    positions, errors : (F, N, 2)
        Per-frame positions (common motion removed) and errors, px.
    amplitudes, amplitude_errors : (F, N)
    fitted : (F, N) bool
        Converged fits.
    jump_z : float
        A step in position (best split of the series into two means) is a jump when its
        significance exceeds ``jump_z`` (combined over both axes, errors scaled by ``scale``).
    fade_z, fade_fraction : float
        A steady amplitude decrease is "fading" when the slope is ``fade_z`` sigma below zero
        and the fitted change over the series is at least ``fade_fraction``; an amplitude
        step of the same size and ``jump_z`` significance is an "intensity step".
    erratic_p : float
        A column is "erratic" when its frame scatter about its own mean is beyond its error
        bars at this chi-square tail probability (``2 (n - 1)`` dof for ``n`` frames); with
        correct error bars a fraction ``erratic_p`` of the columns is flagged by chance.
    scale : (N,) array, optional
        Error scale per column (e.g. the species' calibration ratio when it exceeds 1).

    Returns
    -------
    flags : (N,) int
        Bits of :data:`COLUMN_FLAGS`.
    reasons : (N,) str

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.track import column_outliers
    >>> rng = np.random.default_rng(2)
    >>> f, n = 20, 50
    >>> err = np.full((f, n, 2), 0.05)
    >>> pos = rng.normal(0, 0.05, (f, n, 2))
    >>> pos[10:, 7, 1] += 1.0                        # column 7 jumps by 1 px at frame 10
    >>> amp = rng.normal(100, 1, (f, n))
    >>> amp[:, 3] *= np.linspace(1, 0.5, f)          # column 3 fades
    >>> flags, why = column_outliers(pos, err, amp, np.ones((f, n)), np.ones((f, n), bool))
    >>> np.flatnonzero(flags).tolist(), why[7].split(" (")[0], why[3].split(" (")[0]
    ([3, 7], 'jump at frame 10', 'fading')
    """
    f_n, n = fitted.shape
    s = np.ones(n) if scale is None else np.maximum(np.asarray(scale, dtype=float), 1.0)
    flags = np.zeros(n, dtype=np.int64)
    reasons = np.full(n, "", dtype=object)
    count = fitted.sum(axis=0)
    flags[count < 3] |= 16
    # Lost: fitted at the start, then failing from some frame on (and not recovering).
    tail_failed = np.cumsum(fitted[::-1], axis=0)[::-1] == 0  # no fit from this frame on
    lost_from = np.where(tail_failed.any(axis=0), np.argmax(tail_failed, axis=0), f_n)
    lost = (lost_from < f_n) & (lost_from >= 2) & (count >= 2)
    flags[lost] |= 2
    z, t, _ = _best_step(positions, errors * s[None, :, None], fitted)
    jump = (z > jump_z) & (count >= 4)
    flags[jump] |= 1
    p_scatter = _scatter_tail(positions, errors * s[None, :, None], fitted)
    flags[(p_scatter < erratic_p) & ~jump & (count >= 3)] |= 32
    amp_err = amplitude_errors * s[None, :]
    za, ta, rel = _best_step(amplitudes[..., None], amp_err[..., None], fitted)
    # Linear trend of the amplitude against frame index, inverse-variance weighted.
    fr = np.arange(f_n, dtype=float)[:, None]
    w = _weights(amp_err, fitted)
    a = np.where(fitted, amplitudes, 0.0)
    sw, swx, swy = w.sum(0), (w * fr).sum(0), (w * a).sum(0)
    swxx, swxy = (w * fr * fr).sum(0), (w * fr * a).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        det = sw * swxx - swx ** 2
        slope = (sw * swxy - swx * swy) / det
        slope_err = np.sqrt(sw / det)
        level = swy / sw
        first = level - slope * swx / sw  # the fitted line at frame 0
        change = slope * max(f_n - 1, 1) / first
        fading = (slope / slope_err < -fade_z) & (change <= -fade_fraction) & (count >= 4)
        # A step explains a sudden change better than a line: the residual chi-square decides.
        line = level + slope * (fr - swx / sw)
        chi_line = (w * np.square(a - line)).sum(0)
        chi_step = (w * np.square(a - level)).sum(0) - np.square(za)
    big_step = (za > jump_z) & (np.abs(rel) >= fade_fraction) & (count >= 4)
    step_better = chi_step < chi_line
    flags[big_step & (step_better | ~fading)] |= 4
    flags[fading & ~(big_step & step_better)] |= 8
    for i in np.flatnonzero(flags):  # words for the flagged few, not a loop over all atoms
        words = []
        if flags[i] & 1:
            words.append(f"jump at frame {int(t[i])} ({z[i]:.1f} sigma)")
        if flags[i] & 2:
            words.append(f"lost from frame {int(lost_from[i])}")
        if flags[i] & 4:
            words.append(f"intensity step at frame {int(ta[i])} ({100 * rel[i]:+.0f} %)")
        if flags[i] & 8:
            words.append(f"fading ({100 * change[i]:+.0f} % over the series)")
        if flags[i] & 16:
            words.append(f"fitted in {int(count[i])} frame(s)")
        if flags[i] & 32:
            words.append(f"scatter beyond its error bars (p = {p_scatter[i]:.1e})")
        reasons[i] = "; ".join(words)
    return flags, reasons.astype(str)


def _frame_gates(motion, motion_errors, fitted, usable_cols, frame_z, fail_fraction):
    """Frames whose columns move together beyond their errors, or whose fits fail."""
    f_n = fitted.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.sqrt(np.square(motion / motion_errors).sum(axis=1))
    fail = 1.0 - fitted[:, usable_cols].mean(axis=1) if usable_cols.any() else np.ones(f_n)
    flagged = (z > frame_z) | (fail > fail_fraction) | ~np.isfinite(z)
    reasons = np.full(f_n, "", dtype=object)
    for f in np.flatnonzero(flagged):  # the flagged few frames
        words = []
        if not np.isfinite(z[f]) or z[f] > frame_z:
            words.append(f"columns move together by ({motion[f, 0]:+.3f}, {motion[f, 1]:+.3f})"
                         f" px ({z[f]:.1f} sigma): registration residual")
        if fail[f] > fail_fraction:
            words.append(f"{100 * fail[f]:.0f} % of the column fits failed")
        reasons[f] = "; ".join(words)
    return flagged, reasons.astype(str)


# ----------------------------------------------------------------------------- public


def track_columns(stack, positions, *, species=None, sigma=None, window=None,
                  estimator="mle", counts_per_unit=None, model="gaussian", jump_z=6.0,
                  fade_z=5.0, fade_fraction=0.2, erratic_p=1e-6, frame_z=6.0,
                  fail_fraction=0.2, level=0.6827, batch_frames="auto", engine="auto",
                  progress=False, backend=None) -> ColumnTracks:
    """Fit every column in every frame of a registered stack, and check the error bars.

    Parameters
    ----------
    stack : (F, H, W) array or sidpy.Dataset
        Registered frames (after rigid or demons registration), F >= 3.
    positions : (N, 2) array or AtomFit
        Column positions on the registered mean (e.g. ``analysis.atoms``); an
        :class:`~stemgpu.atoms.fit.AtomFit` also gives the width and window, and only its
        converged columns are tracked.
    species : (N,) str, optional
        Label per column (e.g. ``analysis.species``); calibration ratios are per species.
    sigma, window, estimator, counts_per_unit, model, engine, backend
        As for :func:`~stemgpu.atoms.fit.fit_atoms` (the width and window default to those
        of an AtomFit given as ``positions``). The gain is estimated from the frames when
        ``counts_per_unit`` is omitted.
    jump_z, fade_z, fade_fraction, erratic_p : float
        Thresholds of :func:`column_outliers`.
    frame_z : float
        A frame is flagged when the common motion of its columns exceeds ``frame_z`` sigma.
    fail_fraction : float
        ... or when more than this fraction of its column fits fail.
    level : float
        Confidence level of the calibration ratios' intervals.
    batch_frames : int or "auto"
        Frames fitted per batch. ``"auto"``: all at once for an in-memory stack, batches
        sized to the backend's memory budget for a lazy frame source
        (:func:`stemgpu.open_frames`, an h5py dataset, a memmap), which is read batch by batch
        so a stack larger than memory can be tracked. With several batches and no
        ``counts_per_unit`` the gain is estimated on the first batch and held for the others.
    progress : bool
        A progress bar over the frame batches (one batch: over the fitting passes).

    Returns
    -------
    ColumnTracks

    Raises
    ------
    ValueError
        Fewer than 3 frames, malformed positions or species, out-of-range thresholds.

    Notes
    -----
    All ``F x N`` fits run in one batched call (the engines' frame-index path). Given the
    mean's :class:`~stemgpu.atoms.fit.AtomFit` (isotropic), each window is fitted once,
    started from the mean's parameters with the mean's fitted peaks of all other columns as
    the neighbour model (``fit_atoms(reference=...)``): the mean is better determined than any
    frame, so its neighbour model adds little noise to a frame's fit, and the fits start near
    their end; the mean's columns too close to the image edge for a window are not tracked
    but enter every frame's neighbour model as guessed edge peaks, as in the mean's own fit
    (pass every column of the image to that fit). Given plain positions, every frame gets
    ``fit_atoms``' own neighbour passes.
    Columns flagged by :func:`column_outliers` are left out of the
    frame motion and the calibration ratios. A calibration ratio above 1 means the frames
    scatter more than the error bars predict (unmodelled noise such as scan jitter left by
    the registration, or an underestimated gain); below 1, that the registration has
    absorbed part of the noise (demons with a small field smoothing) or the gain is
    overestimated.

    Examples
    --------
    >>> import stemgpu
    >>> from stemgpu.atoms.track import track_columns
    >>> stack, truth = stemgpu.simulate_stack((6, 96, 96), seed=3)
    >>> pos = truth.image_positions(0)[truth.visible(0, margin=10)]
    >>> tracks = track_columns(stack, pos, species=truth.species[truth.visible(0, margin=10)])
    >>> tracks.positions.shape[:2], sorted(tracks.calibration)
    ((6, 36), ['O', 'Sr', 'TiO'])
    """
    check_batch_size(batch_frames, "batch_frames")
    start, species, fit_kw, gates = prepare_tracking(
        stack, positions, species=species, sigma=sigma, window=window, estimator=estimator,
        model=model, engine=engine, backend=backend, jump_z=jump_z, fade_z=fade_z,
        fade_fraction=fade_fraction, erratic_p=erratic_p, frame_z=frame_z,
        fail_fraction=fail_fraction, level=level)
    fit = _fit_frames(stack, start, batch_frames, counts_per_unit, progress, fit_kw)
    return assess_tracks(fit, species, gates)


def prepare_tracking(stack, positions, *, species, sigma, window, estimator, model, engine,
                     backend, jump_z, fade_z, fade_fraction, erratic_p, frame_z,
                     fail_fraction, level):
    """The checked inputs of :func:`track_columns`: ``(start, species, fit keywords, gates)``
    (shared with the distributed twin, which runs the same fits as tasks)."""
    from .fit import AtomFit

    f_n = int(getattr(stack, "shape", (0,))[0]) if len(getattr(stack, "shape", ())) == 3 else 0
    if f_n < 3:
        raise ValueError(f"stack must be a (frames, rows, cols) stack of >= 3 frames; got "
                         f"shape {tuple(getattr(stack, 'shape', ()))!r}")
    for name, v in (("jump_z", jump_z), ("fade_z", fade_z), ("frame_z", frame_z)):
        check_real(v, name, greater=0)
    check_real(fade_fraction, "fade_fraction", greater=0, maximum=1)
    check_real(fail_fraction, "fail_fraction", greater=0, maximum=1)
    check_real(erratic_p, "erratic_p", greater=0, maximum=0.5)
    check_real(level, "level", greater=0, maximum=0.9999)
    start, reference, edge_pos = positions, None, None
    if isinstance(positions, AtomFit):
        ok = to_host(positions.status) == CONVERGED
        from .models import get_model

        isotropic = len(get_model(model).widths) == 1  # peaks or dips
        if positions.params.ndim == 2 and isotropic \
                and positions.parameters.get("model", "gaussian") == "gaussian":
            reference, edge_pos = _reference_with_edges(positions.to_numpy(), ok)
        if species is not None:
            species = np.asarray(species)[ok] if len(species) == len(ok) else species
        if sigma is None:
            sigma = float(np.nanmedian(to_host(positions.param("sigma"))[ok])) \
                if "sigma" in positions.param_names else None
        window = positions.parameters.get("window") if window is None else window
        start = to_host(positions.positions)[ok]
    start = np.asarray(to_host(start), dtype=np.float64)
    if start.ndim != 2 or start.shape[1] != 2 or len(start) == 0:
        raise ValueError(f"positions must be an (N, 2) array of (row, col) or an AtomFit; got "
                         f"shape {start.shape}")
    n = len(start)
    species = np.full(n, "-") if species is None else np.asarray(species).astype(str)
    if species.shape != (n,):
        raise ValueError(f"species must have one label per column ({n}); got shape "
                         f"{species.shape}")
    if window is not None:
        window = check_int(window, "window", minimum=5)
    if edge_pos is not None and len(edge_pos):
        # Appended after the tracked columns: fitted nowhere (their windows cross the edge),
        # they enter every frame's neighbour model as guessed edge peaks, as in the mean's
        # fit; assess_tracks keeps the first len(species) columns.
        start = np.concatenate([start, edge_pos])
    fit_kw = dict(model=model, window=window, sigma=sigma, estimator=estimator, engine=engine,
                  backend=backend, reference=reference)
    gates = dict(jump_z=jump_z, fade_z=fade_z, fade_fraction=fade_fraction, erratic_p=erratic_p,
                 frame_z=frame_z, fail_fraction=fail_fraction, level=level)
    return start, species, fit_kw, gates


def _reference_with_edges(fit, ok):
    """The reference of :func:`prepare_tracking`: the converged columns of a one-image fit,
    then its columns too close to the image edge for a window (no parameters; their given
    positions, (E, 2), are returned too)."""
    from .models import OUT_OF_BOUNDS

    given = None if fit.given_positions is None else np.asarray(fit.given_positions)
    edge = np.zeros_like(ok) if given is None else (
        (np.asarray(fit.status) == OUT_OF_BOUNDS) & np.isfinite(given).all(axis=1))
    ref = _columns(fit, np.concatenate([np.flatnonzero(ok), np.flatnonzero(edge)]))
    return ref, (None if given is None else given[edge])


def _columns(fit, keep, axis=0):
    """The AtomFit of the columns ``keep`` (mask, indices or slice) of a fit: its arrays
    with the column axis ``axis`` (0 for a one-image fit, 1 for a stack fit)."""
    import dataclasses

    n = fit.positions.shape[axis]
    index = (slice(None),) * axis + (keep,)
    return dataclasses.replace(fit, **{
        f.name: getattr(fit, f.name)[index] for f in dataclasses.fields(fit)
        if isinstance(getattr(fit, f.name), np.ndarray)
        and getattr(fit, f.name).shape[axis:axis + 1] == (n,)})



#: The AtomFit fields with a leading frame axis: what the frame batches of a stack fit
#: are concatenated along (here, and by the distributed twin in ``stemgpu.app.distributed``).
FRAME_FIT_FIELDS = ("positions", "position_errors", "params", "param_errors", "covariance",
                    "chi2", "n_iter", "status", "width_fixed", "given_positions")


def _fit_frames(stack, start, batch_frames, counts_per_unit, progress, fit_kw):
    """One batched fit over all frames, or over frame batches read one at a time."""
    import dataclasses

    from .._inputs import is_frame_source
    from .._progress import progress_bar
    from ..backend import resolve_backend
    from .fit import fit_atoms

    f_n, n = int(stack.shape[0]), len(start)
    lazy = is_frame_source(stack)
    if batch_frames == "auto" and not lazy:
        batch = f_n
    else:
        # ~256 B of fitting work space per frame pixel (windows, models, Jacobians).
        batch = resolve_backend(fit_kw["backend"]).frames_per_batch(
            tuple(stack.shape), 256, batch_size=batch_frames)
    starts = range(0, f_n, batch)
    if len(starts) == 1:
        return fit_atoms(stack if not lazy else np.asarray(stack[:], dtype=np.float32),
                         np.broadcast_to(start, (f_n, n, 2)), counts_per_unit=counts_per_unit,
                         progress=progress, **fit_kw).to_numpy()
    parts, gain = [], counts_per_unit
    bar = progress_bar(progress, total=len(starts), desc=f"track {n} columns", unit="batch",
                       leave=False)
    for a in starts:  # frame batches: the memory bound of a stack larger than memory
        b = min(f_n, a + batch)
        frames = np.asarray(stack[a:b], dtype=np.float32) if lazy else stack[a:b]
        part = fit_atoms(frames,
                         np.broadcast_to(start, (b - a, n, 2)), counts_per_unit=gain,
                         **fit_kw).to_numpy()
        gain = part.counts_per_unit if gain is None else gain
        parts.append(part)
        bar.update(1)
    bar.close()
    merged = {f: np.concatenate([getattr(p, f) for p in parts]) for f in FRAME_FIT_FIELDS}
    params = {**parts[0].parameters, "batch_frames": int(batch),
              "counts_per_unit_from_first_batch": counts_per_unit is None}
    return dataclasses.replace(parts[0], parameters=params, **merged)


def assess_tracks(fit, species, gates) -> ColumnTracks:
    """The passes after the batched fit: motion, outliers, calibration, frame gates.

    ``fit`` may carry more columns than ``species`` (the edge columns appended by
    :func:`prepare_tracking`): only the first ``len(species)`` are assessed."""
    n = len(species)
    if fit.positions.shape[1] != n:
        fit = _columns(fit, slice(0, n), axis=1)
    pos, err = fit.positions, fit.position_errors
    amp, amp_err = fit.param("amplitude"), fit.param_errors[..., fit.param_names.index(
        "amplitude")]
    fitted = (fit.status == CONVERGED) & np.isfinite(err).all(axis=-1) & (err > 0).all(axis=-1)
    # Motion from all fitted columns first; outliers then; motion again without them.
    motion, motion_err = frame_motion(pos, err, fitted)
    moved = pos - np.nan_to_num(motion)[:, None, :]
    ratios, _, _ = calibration_ratios(moved, err, fitted, species, level=gates["level"])
    scale = np.array([ratios[s].ratio if s in ratios else 1.0 for s in species])
    flags, reasons = column_outliers(
        moved, err, amp, amp_err, fitted, jump_z=gates["jump_z"], fade_z=gates["fade_z"],
        fade_fraction=gates["fade_fraction"], erratic_p=gates["erratic_p"], scale=scale)
    good_cols = flags == 0
    # Held-width refits carry the errors of a simpler model (approximate, see AtomFit): they
    # are tracked and flagged like the others but do not enter the calibration.
    held = np.zeros_like(fitted) if fit.width_fixed is None else np.asarray(fit.width_fixed)
    usable = fitted & good_cols[None, :]
    motion, motion_err = frame_motion(pos, err, usable)
    moved = pos - np.nan_to_num(motion)[:, None, :]
    ratios, scatter, predicted = calibration_ratios(moved, err, usable & ~held, species,
                                                    level=gates["level"])
    frame_flagged, frame_reasons = _frame_gates(motion, motion_err, fitted, good_cols,
                                                gates["frame_z"], gates["fail_fraction"])
    w = _weights(err, usable[..., None])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pos = (w * np.where(usable[..., None], moved, 0.0)).sum(0) / w.sum(0)
    return ColumnTracks(
        positions=pos, position_errors=err, amplitudes=amp, amplitude_errors=amp_err,
        status=fit.status, species=species, mean_positions=mean_pos, scatter=scatter,
        predicted=predicted, motion=motion, motion_errors=motion_err, calibration=ratios,
        column_flags=flags, column_reasons=reasons, frame_flagged=frame_flagged,
        frame_reasons=frame_reasons, counts_per_unit=float(fit.counts_per_unit),
        parameters={**gates, **fit.parameters, "n_frames": int(pos.shape[0])})
