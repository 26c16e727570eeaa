"""Drift versus jitter: split frame shifts into a smooth drift and the random jitter, in pm.

Answers the lecture's question "is the jitter true, or should we use a smooth fit?" with both
figures side by side: the *raw* frame-to-frame figures (every measured shift taken at face
value) and the figures *about a smooth fit* (linear, polynomial or smoothing-spline drift,
with the residual called jitter), plus the lag-1 autocorrelation of the residual, which is
near zero when the model has captured the drift and the residual is white jitter.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .._checks import check_choice, check_real
from .._inputs import resolve_pixel_size
from ..backend import HostCopyMixin, is_cupy_array, to_host

__all__ = ["XY", "DriftReport", "drift_report"]

_MODELS = ("linear", "poly", "spline")
#: Fewest residual degrees of freedom (frames minus the fit's) a jitter estimate needs.
_MIN_RESIDUAL_DOF = 1.0
#: Largest shift accepted, px: with a pixel size of at most 1e9 pm (_inputs) the sums of
#: squared offsets stay far from overflow.
_MAX_SHIFT_PX = 1e12


class XY(NamedTuple):
    """A calibrated figure along x (= image columns, fast scan) and y (= image rows)."""

    x: float
    y: float


@dataclass(frozen=True)
class DriftReport(HostCopyMixin):
    """Result of :func:`drift_report`. Arrays are (n, 2) in (row, col) = (y, x) order.

    Attributes
    ----------
    offsets_pm : (n, 2) float64
        Frame offsets relative to the reference (the registration shifts), pm.
    smooth_pm : (n, 2) float64
        The fitted smooth drift at each frame, pm.
    jitter_pm : (n, 2) float64
        ``offsets_pm - smooth_pm``: the jitter of each frame, pm.
    time : (n,) float64
        Frame index, or time in s when ``frame_time`` was given.
    used : (n,) bool
        Frames used in the fit and the statistics.
    jitter_std_pm : XY
        Standard deviation of the jitter about the smooth fit (degrees of freedom of the
        fit removed), pm.
    jitter_std_raw_pm : XY
        Frame-to-frame estimate, ``std(diff(offsets)) / sqrt(2)``: the jitter if every
        measured offset were true and the drift only a constant rate, pm.
    drift_rate_pm_per_frame, drift_rate_raw_pm_per_frame : XY
        Mean drift velocity from the smooth fit, and ``(last - first) / (n - 1)`` of the raw
        offsets (used frames), pm/frame.
    drift_rate_pm_per_s, drift_rate_raw_pm_per_s : XY or None
        The same in pm/s (None without ``frame_time``).
    residual_lag1 : XY
        Lag-1 autocorrelation of the jitter; values well above 0 (beyond ~2/sqrt(n)) mean the
        model missed part of the drift.
    model : str
    pixel_size_pm : float
    frame_time_s : float or None
    parameters : dict
        The options, plus ``smoothing_used`` and ``fit_dof`` (effective degrees of freedom of
        the smooth fit) per axis, in (row, col) order.
    """

    offsets_pm: Any
    smooth_pm: Any
    jitter_pm: Any
    time: Any
    used: Any
    jitter_std_pm: XY
    jitter_std_raw_pm: XY
    drift_rate_pm_per_frame: XY
    drift_rate_raw_pm_per_frame: XY
    drift_rate_pm_per_s: XY | None
    drift_rate_raw_pm_per_s: XY | None
    residual_lag1: XY
    model: str
    pixel_size_pm: float
    frame_time_s: float | None
    parameters: dict = field(default_factory=dict)

    @property
    def residual_white(self) -> bool:
        """True when neither axis' residual lag-1 autocorrelation exceeds ``2 / sqrt(n)``,
        i.e. the residual looks like independent frame jitter, not unmodelled drift."""
        limit = 2.0 / np.sqrt(max(int(self.used.sum()), 1))
        return bool(max(self.residual_lag1.x, self.residual_lag1.y) <= limit)

    @property
    def drift_rate_uncertainty_pm_per_frame(self) -> XY:
        """One-sigma standard error of ``drift_rate_pm_per_frame``.

        The rate is ``c^T y`` with ``c`` the difference of the hat-matrix rows of the last
        and first used frame over their separation, so its variance is ``s^2 |c|^2`` for white
        jitter of std ``s`` (``jitter_std_pm``); for a straight line this is the slope's
        standard error ``s / sqrt(sum (t - mean t)^2)``.
        """
        used = np.asarray(self.used, dtype=bool)
        fu = np.arange(len(used), dtype=float)[used]
        lams = self.parameters.get("smoothing_used") or [None, None]
        norms = []
        for lam in lams:  # (row, col) axes: a spline has its own smoothing per axis
            h = _hat(self.model, fu, self.parameters.get("degree") or 2, lam)
            c = (h[-1] - h[0]) / (fu[-1] - fu[0])
            norms.append(float(np.sqrt(np.sum(c * c))))
        return XY(x=self.jitter_std_pm.x * norms[1], y=self.jitter_std_pm.y * norms[0])

    def summary(self, as_text: bool = False):
        """The report's figures as a dict (or a few lines of text with ``as_text=True``)."""
        d = {
            "model": self.model,
            "frames": int(self.used.sum()),
            "jitter_std_x_pm": self.jitter_std_pm.x,
            "jitter_std_y_pm": self.jitter_std_pm.y,
            "jitter_std_raw_x_pm": self.jitter_std_raw_pm.x,
            "jitter_std_raw_y_pm": self.jitter_std_raw_pm.y,
            "drift_rate_x_pm_per_frame": self.drift_rate_pm_per_frame.x,
            "drift_rate_y_pm_per_frame": self.drift_rate_pm_per_frame.y,
            "drift_rate_raw_x_pm_per_frame": self.drift_rate_raw_pm_per_frame.x,
            "drift_rate_raw_y_pm_per_frame": self.drift_rate_raw_pm_per_frame.y,
            "residual_lag1_x": self.residual_lag1.x,
            "residual_lag1_y": self.residual_lag1.y,
            "residual_white": self.residual_white,
        }
        if self.drift_rate_pm_per_s is not None:
            d["drift_rate_x_pm_per_s"] = self.drift_rate_pm_per_s.x
            d["drift_rate_y_pm_per_s"] = self.drift_rate_pm_per_s.y
        if not as_text:
            return d
        lines = [
            f"drift model: {self.model} ({d['frames']} frames, {self.pixel_size_pm:g} pm/px)",
            f"jitter std about the fit:  x {self.jitter_std_pm.x:.3g} pm, "
            f"y {self.jitter_std_pm.y:.3g} pm",
            f"jitter std frame-to-frame: x {self.jitter_std_raw_pm.x:.3g} pm, "
            f"y {self.jitter_std_raw_pm.y:.3g} pm",
            f"drift rate (fit): x {self.drift_rate_pm_per_frame.x:.3g}, "
            f"y {self.drift_rate_pm_per_frame.y:.3g} pm/frame",
        ]
        if self.drift_rate_pm_per_s is not None:
            lines.append(f"drift rate (fit): x {self.drift_rate_pm_per_s.x:.3g}, "
                         f"y {self.drift_rate_pm_per_s.y:.3g} pm/s")
        lines.append(f"residual lag-1 autocorrelation: x {self.residual_lag1.x:.2f}, "
                     f"y {self.residual_lag1.y:.2f} (~0 for white jitter)")
        lines.append(
            "verdict: the residual is white frame-to-frame jitter about the smooth drift"
            if self.residual_white else
            "verdict: the residual is correlated between frames; the drift model misses "
            "part of the motion (try model='poly' or 'spline')")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary(as_text=True)

    def plot(self, ax=None):
        """Plot the trajectory (x and y offsets) with the smooth fit, and the jitter.

        With ``ax`` (one matplotlib Axes) only the trajectory panel is drawn into it;
        otherwise a new figure with two panels (trajectory, jitter) is made. Returns the
        figure.
        """
        import matplotlib.pyplot as plt

        unit = "s" if self.frame_time_s is not None else "frame"
        if ax is None:
            fig, (ax0, ax1) = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
        else:
            ax0, ax1, fig = ax, None, ax.figure
        for col, name, colour in ((1, "x", "C0"), (0, "y", "C1")):
            ax0.plot(self.time, self.offsets_pm[:, col], "o", ms=3, color=colour,
                     label=f"{name} measured")
            ax0.plot(self.time, self.smooth_pm[:, col], "-", color=colour,
                     label=f"{name} {self.model} fit")
            if ax1 is not None:
                std = self.jitter_std_pm.x if col == 1 else self.jitter_std_pm.y
                ax1.plot(self.time, self.jitter_pm[:, col], "o-", ms=3, color=colour,
                         label=f"{name} jitter, std {std:.3g} pm")
        ax0.set_ylabel("offset (pm)")
        ax0.legend(fontsize="small")
        if ax1 is not None:
            ax1.axhline(0.0, color="0.5", lw=0.8)
            ax1.set_ylabel("jitter (pm)")
            ax1.set_xlabel(f"time ({unit})")
            ax1.legend(fontsize="small")
        else:
            ax0.set_xlabel(f"time ({unit})")
        return fig


def _fit(model, t, y, used, degree, smoothing):
    """Smooth fit of ``y`` (n,) over ``t``; returns the fit at all t and its degrees of freedom.

    For the smoothing spline the degrees of freedom are the trace of its hat matrix (the fit
    is linear in the data for a fixed smoothing parameter).
    """
    tu, yu = t[used], y[used]
    if model in ("linear", "poly"):
        deg = 1 if model == "linear" else degree
        # Centred, scaled time keeps the Vandermonde matrix well conditioned.
        c, s = tu.mean(), max(np.ptp(tu), 1e-300) / 2
        coef = np.polynomial.polynomial.polyfit((tu - c) / s, yu, deg)
        fit = np.polynomial.polynomial.polyval((t - c) / s, coef)
        return fit, deg + 1, None
    from scipy.interpolate import make_smoothing_spline

    lam = _gcv_lambda(tu, yu) if smoothing is None else float(smoothing)
    spl = make_smoothing_spline(tu, yu, lam=lam)
    return spl(t), _hat_trace(tu, lam), lam


def _hat(model, t, degree, lam):
    """Hat matrix H (fit = H y) of the smooth drift model over the used times ``t``."""
    if model in ("linear", "poly"):
        deg = 1 if model == "linear" else int(degree)
        c, s = t.mean(), max(np.ptp(t), 1e-300) / 2
        v = np.polynomial.polynomial.polyvander((t - c) / s, deg)
        return v @ np.linalg.pinv(v)
    from scipy.interpolate import make_smoothing_spline

    return make_smoothing_spline(t, np.eye(len(t)), lam=lam)(t)


def _hat_trace(t, lam):
    """Trace of the smoothing spline's hat matrix (one fit of all unit vectors at once)."""
    from scipy.interpolate import make_smoothing_spline

    return float(np.trace(make_smoothing_spline(t, np.eye(len(t)), lam=lam)(t)))


def _gcv_lambda(t, y):
    """Smoothing parameter minimising generalised cross-validation over a log grid."""
    from scipy.interpolate import make_smoothing_spline

    n = len(t)
    best, best_score = None, np.inf
    for lam in np.logspace(-4, 8, 49) * (np.ptp(t) / n) ** 3:
        fit = make_smoothing_spline(t, y, lam=lam)(t)
        tr = _hat_trace(t, lam)
        if tr > n - _MIN_RESIDUAL_DOF:  # (nearly) interpolating: no residual to call jitter
            continue
        score = n * np.sum((y - fit) ** 2) / (n - tr) ** 2
        if score < best_score:
            best, best_score = lam, score
    return best


def _lag1(r):
    r = r - r.mean()
    den = float(np.sum(r * r))
    return float(np.sum(r[1:] * r[:-1]) / den) if den > 0 else 0.0


def drift_report(shifts, *, pixel_size=None, frame_time=None, model="linear", degree=2,
                 smoothing=None, exclude=None):
    """Split registration shifts into a smooth drift and the frame jitter, in picometres.

    Parameters
    ----------
    shifts : (n, 2) array or RigidResult
        Shifts (row, col) in px from :func:`register_rigid` (the offset of each frame from
        the reference). A :class:`RigidResult` also supplies its pixel size and, unless
        ``exclude`` is given, excludes its flagged frames.
    pixel_size : float
        Pixel size in pm (required unless the RigidResult carries it).
    frame_time : float, optional
        Time between frames in s; adds drift rates in pm/s and plots against time.
    model : {"linear", "poly", "spline"}
        Smooth drift model: straight line, polynomial of ``degree``, or a cubic smoothing
        spline (smoothing by generalised cross-validation unless ``smoothing`` is given).
    degree : int
        Polynomial degree for ``model="poly"`` (default 2).
    smoothing : float, optional
        Smoothing parameter ``lam`` (>= 0) of :func:`scipy.interpolate.make_smoothing_spline`.
        A value so small that the spline leaves less than one residual degree of freedom
        (``smoothing=0`` interpolates every shift) is refused: no jitter can be measured.
    exclude : (n,) bool array, optional
        Frames left out of the fit and the statistics (their jitter is still reported).

    Returns
    -------
    DriftReport

    Raises
    ------
    ValueError
        Shifts not of shape (n, 2), non-finite shifts, too few frames for the model, no
        pixel size, a non-positive ``frame_time``, an unknown ``model``, a bad ``degree``, a
        ``smoothing`` that leaves no residual degrees of freedom.
    TypeError
        If ``shifts`` is neither an array nor a RigidResult.

    Notes
    -----
    The jitter std about the fit divides the residual sum of squares by ``n - p`` (``p`` the
    fit's degrees of freedom), so it is unbiased for white jitter. The raw estimate
    ``std(diff) / sqrt(2)`` assumes independent jitter on top of a constant drift rate; when
    the two agree and the residual lag-1 autocorrelation is near zero, the jitter is real
    frame-to-frame motion and a smooth drift fit describes the rest.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.registration.drift import drift_report
    >>> t = np.arange(10.0)
    >>> shifts = np.stack([0.1 * t, -0.05 * t], axis=1)
    >>> shifts[::2, 1] += 0.2
    >>> rep = drift_report(shifts, pixel_size=10.0, frame_time=2.0)
    >>> round(rep.drift_rate_pm_per_frame.y, 6), round(rep.drift_rate_pm_per_s.y, 6)
    (1.0, 0.5)
    >>> round(rep.jitter_std_raw_pm.y, 6)
    0.0
    """
    s, px_from_data, default_exclude = _shift_input(shifts)
    px = resolve_pixel_size(pixel_size, px_from_data, required=True, what="drift_report")
    model = check_choice(model, "model", _MODELS)
    if model == "poly" and (isinstance(degree, bool) or not isinstance(degree, numbers.Integral)
                            or degree < 1):
        raise ValueError(f"degree must be an integer >= 1 for model='poly'; got {degree!r}")
    ft = _check_frame_time(frame_time)
    n = len(s)
    exclude = _check_exclude(exclude, default_exclude, n)
    used = ~exclude
    # degree only counts for model="poly" (int(degree) of another model's None would fail)
    need = {"linear": 3, "spline": 5}[model] if model != "poly" else int(degree) + 2
    if used.sum() < need:
        raise ValueError(
            f"shifts: model={model!r} needs at least {need} frames (not excluded); got "
            f"{int(used.sum())}")
    if smoothing is not None and model == "spline":
        smoothing = check_real(smoothing, "smoothing", minimum=0)

    offsets = s * px
    frames = np.arange(n, dtype=float)
    time = frames * ft if ft is not None else frames
    smooth = np.empty_like(offsets)
    dofs = []
    lams = []
    for k in range(2):  # the two axes, not a loop over frames
        smooth[:, k], dof, lam = _fit(model, frames, offsets[:, k], used, degree, smoothing)
        dofs.append(float(dof))
        lams.append(lam)
    jitter = offsets - smooth
    nu = int(used.sum())
    if model == "spline" and nu - max(dofs) < _MIN_RESIDUAL_DOF:
        # An (almost) interpolating spline passes through every measured shift: its residual
        # is ~0 by construction and says nothing about the jitter (it would read 0 +- 0).
        raise ValueError(
            f"smoothing={smoothing!r} leaves {nu - max(dofs):.3g} residual degrees of freedom "
            f"(the spline uses {max(dofs):.4g} of {nu} frames): the fit passes through every "
            "shift (nearly), so no jitter can be measured; use a larger smoothing, or "
            "smoothing=None (chosen by cross-validation)")
    # Each axis has its own fit (a spline chooses its smoothing per axis): its own dof.
    std = np.sqrt((jitter[used] ** 2).sum(axis=0) / np.maximum(nu - np.asarray(dofs), 1.0))

    ou = offsets[used]
    fu = frames[used]
    # Differences of consecutive used frames only (a gap would change their variance).
    diffs = np.diff(ou, axis=0)[np.diff(fu) == 1]
    raw_std = diffs.std(axis=0, ddof=1) / np.sqrt(2.0) if len(diffs) > 1 else np.zeros(2)
    raw_rate = (ou[-1] - ou[0]) / (fu[-1] - fu[0])
    fit_rate = (smooth[used][-1] - smooth[used][0]) / (fu[-1] - fu[0])
    lag = [_lag1(jitter[used, k]) for k in range(2)]

    def xy(v):
        return XY(x=float(v[1]), y=float(v[0]))

    return DriftReport(
        offsets_pm=offsets, smooth_pm=smooth, jitter_pm=jitter, time=time, used=used,
        jitter_std_pm=xy(std), jitter_std_raw_pm=xy(raw_std),
        drift_rate_pm_per_frame=xy(fit_rate), drift_rate_raw_pm_per_frame=xy(raw_rate),
        drift_rate_pm_per_s=None if ft is None else xy(fit_rate / ft),
        drift_rate_raw_pm_per_s=None if ft is None else xy(raw_rate / ft),
        residual_lag1=XY(x=lag[1], y=lag[0]), model=model, pixel_size_pm=px,
        frame_time_s=ft,
        parameters={"model": model, "degree": int(degree) if model == "poly" else None,
                    "smoothing": smoothing, "smoothing_used": lams, "fit_dof": dofs,
                    "frame_time": ft,
                    "pixel_size_pm": px, "excluded": np.flatnonzero(exclude).tolist()},
    )


def _shift_input(shifts):
    """Host (n, 2) float shifts, and the pixel size and flagged frames of a RigidResult."""
    px_from_data = None
    default_exclude = None
    if hasattr(shifts, "shifts") and hasattr(shifts, "flagged"):
        px_from_data = shifts.pixel_size_pm
        default_exclude = to_host(shifts.flagged)
        shifts = shifts.shifts
    if is_cupy_array(shifts):
        shifts = shifts.get()
    if not (isinstance(shifts, np.ndarray) or isinstance(shifts, list | tuple)):
        raise TypeError(
            f"shifts must be an (n, 2) array of px or a RigidResult; got {type(shifts).__name__}")
    try:
        s = np.asarray(shifts, dtype=float)
    except (TypeError, ValueError):  # strings, ragged lists: not NumPy's message
        raise ValueError("shifts must be an (n, 2) array of numbers (row, col) in px; got "
                         f"{type(shifts).__name__} {_short(shifts)}") from None
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"shifts must have shape (n, 2) (row, col) in px; got {s.shape}")
    if not np.all(np.isfinite(s)):
        bad = np.flatnonzero(~np.isfinite(s).all(axis=1))
        raise ValueError(f"shifts must be finite; frames {bad.tolist()[:20]} are not")
    if s.size and np.abs(s).max() > _MAX_SHIFT_PX:  # squares of larger ones overflow
        bad = np.flatnonzero((np.abs(s) > _MAX_SHIFT_PX).any(axis=1))
        raise ValueError(f"shifts must be at most {_MAX_SHIFT_PX:g} px in magnitude (larger "
                         f"than any image); frames {bad.tolist()[:20]} are not")
    return s, px_from_data, default_exclude


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_frame_time(frame_time):
    if frame_time is None:
        return None
    if isinstance(frame_time, bool | str | bytes) or getattr(frame_time, "ndim", 0) != 0:
        raise ValueError(f"frame_time must be a positive number of s; got {frame_time!r}")
    try:
        ft = float(frame_time)
    except (TypeError, ValueError):
        raise ValueError(f"frame_time must be a positive number of s; got {frame_time!r}"
                         ) from None
    if not np.isfinite(ft) or ft <= 0:
        raise ValueError(f"frame_time must be a positive number of s; got {frame_time!r}")
    return ft


def _check_exclude(exclude, default_exclude, n):
    if exclude is None:
        exclude = default_exclude if default_exclude is not None else np.zeros(n, dtype=bool)
    raw = np.asarray(exclude)
    # A mask, not frame indices: [3, 5] would silently read as "exclude everything".
    if raw.dtype.kind not in "biu" or (raw.dtype.kind in "iu" and not np.isin(raw, (0, 1)).all()):
        raise ValueError(f"exclude must be a boolean mask of shape ({n},); got "
                         f"{_short(exclude)} (dtype {raw.dtype})")
    exclude = raw.astype(bool)
    if exclude.shape != (n,):
        raise ValueError(f"exclude must be a boolean mask of shape ({n},); got {exclude.shape}")
    return exclude
