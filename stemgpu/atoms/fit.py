"""Batched fitting of atom columns with calibrated per-atom uncertainties.

:func:`fit_atoms` extracts one k x k window per column (and per frame for a stack), fits all
of them at once with the batched Levenberg-Marquardt of :mod:`stemgpu.atoms.lm` (or the CUDA
kernel that reproduces it), optionally refits with the fitted neighbouring columns added to
each window's model, and reports positions with one-sigma errors from the Fisher information.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .._inputs import as_image
from .._progress import progress_bar
from ..backend import is_cupy_array, to_host
from .lm import LMOutput, lm_fit
from .models import CONVERGED, FLAT, MAX_ITER, OUT_OF_BOUNDS, SINGULAR, STATUS_NAMES, get_model
from .windows import default_window, extract_windows, render_peaks, window_origins

__all__ = ["AtomFit", "fit_atoms"]

_ESTIMATORS = ("mle", "lsq")
_NEIGHBOURS = ("subtract", "none")
_ENGINES = ("auto", "array", "kernel")
_SUBTRACT_PASSES = 2


@dataclass(frozen=True)
class AtomFit:
    """Fitted atom columns.

    Shapes use ``(...)`` = ``(N,)`` for an image or ``(F, N)`` for a stack.

    Attributes
    ----------
    positions : (..., 2) float64
        Fitted (row, col) in image pixels; NaN where the column was not fitted (see
        ``status``).
    position_errors : (..., 2)
        One-sigma uncertainties of ``positions`` (px) from the Fisher information.
    params, param_errors : (..., P)
        All natural parameters in ``param_names`` order, and their one-sigma errors.
    covariance : (..., P, P)
    param_names : tuple of str
    chi2 : (...,)
        Final objective: Poisson deviance (``"mle"``) or weighted chi-square (``"lsq"``).
    n_iter : (...,) int32
    status : (...,) int8
        Codes of :mod:`stemgpu.atoms.models` (0 converged, 1 max-iterations, 2 singular,
        3 out-of-bounds, 4 diverged, 5 flat window, 6 invalid input).
    counts_per_unit : float
        Gain used for the uncertainties (given or estimated).
    width_fixed : (...,) bool
        Columns whose free-width fit failed or ran to an implausible width (faint O columns
        at low dose) and were refitted with the width held at the median width of the other
        columns; their width error is 0 and their position errors are those of that model.
        Treat them as approximate: on SrTiO3 at 200 counts per Sr column (512 x 512) 74 of
        666 O columns took this path, with a position RMS of 0.77 px (0.36 px for the
        free-width O fits) and 19 of them more than 1 px off the truth.
    parameters : dict
        The options used.
    """

    positions: Any
    position_errors: Any
    params: Any
    param_errors: Any
    covariance: Any
    param_names: tuple[str, ...]
    chi2: Any
    n_iter: Any
    status: Any
    counts_per_unit: float
    width_fixed: Any = None
    parameters: dict = field(default_factory=dict)

    @property
    def converged(self):
        """Mask of fits that met the convergence test."""
        return self.status == CONVERGED

    def param(self, name: str):
        """One named parameter column, e.g. ``fit.param("sigma")``."""
        if name not in self.param_names:
            raise ValueError(f"name={name!r} is not a parameter; accepted: {self.param_names}")
        return self.params[..., self.param_names.index(name)]

    def status_counts(self) -> dict[str, int]:
        """Number of fits per status word."""
        st = to_host(self.status)
        return {STATUS_NAMES[c]: int((st == c).sum()) for c in STATUS_NAMES if (st == c).any()}

    def to_numpy(self) -> AtomFit:
        """A copy with every array moved to NumPy."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            is_array = is_cupy_array(v) or isinstance(v, np.ndarray)
            out[f.name] = to_host(v, copy=True) if is_array else v
        return replace(self, **out)


def _check_positions(positions, n_frames):
    if is_cupy_array(positions):
        positions = positions.get()
    try:
        pos = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"positions must be an array of (row, col) pairs; got {type(positions).__name__}"
        ) from None
    if pos.ndim == 2 and pos.shape[1] == 2:
        if pos.shape[0] == 0:
            raise ValueError("positions is empty (shape (0, 2)); there is nothing to fit")
        return np.broadcast_to(pos, (n_frames, *pos.shape)), False
    if pos.ndim == 3 and pos.shape[2] == 2 and pos.shape[0] == n_frames:
        if pos.shape[1] == 0:
            raise ValueError("positions is empty (shape (F, 0, 2)); there is nothing to fit")
        return pos, True
    raise ValueError(
        f"positions must have shape (N, 2) or (frames={n_frames}, N, 2); got {pos.shape}"
    )


def _estimate_gain(windows, mu, status_ok, n_params, xp):
    """Counts per data unit from the Poisson variance-to-mean relation of the residuals."""
    n = windows.shape[1] * windows.shape[2]
    r = (windows.reshape(windows.shape[0], -1) - mu)[status_ok]
    m = mu[status_ok]
    num = float(m.sum()) * (n - n_params) / n
    den = float((r * r).sum())
    if not (den > 0 and num > 0):
        return None
    return num / den


def _kernel_module():
    try:
        return importlib.import_module("stemgpu.atoms.cuda")
    except ImportError:
        return None


def fit_atoms(image_or_stack, positions, *, model="gaussian", window=None, sigma=None,
              neighbours="subtract", estimator="mle", counts_per_unit=None, max_iter=50,
              tol=1e-7, engine="auto", progress=False, backend=None) -> AtomFit:
    """Fit a peak model to every atom column (and every frame) at once.

    Parameters
    ----------
    image_or_stack : (H, W) or (F, H, W) array or sidpy.Dataset
    positions : (N, 2) or (F, N, 2) array
        Initial (row, col) per column (shared by all frames, or per frame).
    model : {"gaussian", "elliptical"}
        See :mod:`stemgpu.atoms.models`. The elliptical model is started from an isotropic
        fit (its angle is undefined for round columns; its error is then reported as inf).
    window : int, optional
        Odd window size in px; default ``2 ceil(2.5 sigma) + 1``.
    sigma : float, optional
        Column width (px) for the initial guess; estimated from the image when omitted.
    neighbours : {"subtract", "none"}
        ``"subtract"``: after a first pass, refit every window with the fitted peaks of all
        other columns added to its model as a known offset (a batched approximation of a
        simultaneous fit; the Poisson statistics stay exact). Neighbours whose width is
        poorly determined (faint columns) are drawn at the median width; columns too close
        to the image edge for a window are not fitted but enter the model with a guessed
        peak (pass them in: their flux otherwise pulls the next columns inwards). Fits that
        then fail or run to an implausible width are refitted once in a +-1.25 sigma window with the
        width held at the median (``AtomFit.width_fixed``). ``"none"``: one plain pass.
    estimator : {"mle", "lsq"}
        Poisson maximum likelihood (deviance) or Poisson-weighted least squares.
    counts_per_unit : float, optional
        Detector gain (counts per data unit). Estimated from the variance-to-mean relation
        of the fit residuals when omitted; give it for data known to be in counts (``1``).
    max_iter : int
    tol : float
        Relative objective decrease that ends a fit.
    progress : bool
        A tqdm bar over the fitting passes (plain, neighbour passes, elliptical).
    engine : {"auto", "array", "kernel"}
        ``"kernel"`` uses the CUDA kernel (CuPy backend only); ``"auto"`` uses it when it is
        available on the CuPy backend, the array code otherwise.
    backend : {"numpy", "cupy", "auto"}, optional

    Returns
    -------
    AtomFit

    Raises
    ------
    ValueError
        Empty or malformed positions, an unknown option, a window that is even, smaller than
        5 px or larger than the image, a non-positive ``sigma`` or ``counts_per_unit``.

    Notes
    -----
    Uncertainties are ``sqrt(diag(I^-1))`` with ``I`` the expected Poisson Fisher
    information at the fitted parameters (MLE) or the sandwich covariance of the weighted
    least-squares estimator, scaled by the gain. Columns outside the image, too close to its
    edge for a full window, with NaN positions or flat windows are *not* fitted: their rows
    are NaN and ``status`` says why.

    Examples
    --------
    >>> from stemgpu.synthetic import simulate_image
    >>> from stemgpu.atoms.fit import fit_atoms
    >>> image, truth = simulate_image((64, 64), lattice="square", seed=1)
    >>> keep = truth.visible(0, margin=8)
    >>> fit = fit_atoms(image, truth.image_positions(0)[keep], counts_per_unit=1)
    >>> bool(fit.converged.all()), fit.positions.shape
    (True, (2, 2))
    """
    cal = as_image(image_or_stack, name="image_or_stack", backend=backend, allow_stack=True)
    be, xp = cal.backend, cal.backend.xp
    data = cal.data
    is_stack = data.ndim == 3
    stack = data if is_stack else data[None]
    f_n, h, w = stack.shape
    mdl = get_model(model)
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not known; accepted: 'mle', 'lsq'")
    if neighbours not in _NEIGHBOURS:
        raise ValueError(f"neighbours={neighbours!r} is not known; accepted: 'subtract', 'none'")
    if engine not in _ENGINES:
        raise ValueError(f"engine={engine!r} is not known; accepted: 'auto', 'array', 'kernel'")
    if not (isinstance(max_iter, int | np.integer) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1; got {max_iter!r}")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number; got {tol!r}")
    if counts_per_unit is not None and not (np.isfinite(counts_per_unit) and counts_per_unit > 0):
        raise ValueError(f"counts_per_unit must be a positive number; got {counts_per_unit!r}")
    pos, per_frame = _check_positions(positions, f_n)
    if sigma is None:
        from .find import estimate_sigma

        sigma = estimate_sigma(stack.mean(axis=0), backend=be)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of pixels; got {sigma!r}")
    k = default_window(sigma) if window is None else window
    if not isinstance(k, int | np.integer) or k < 5 or k % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 5 (px); got {window!r}")
    if k > min(h, w):
        raise ValueError(f"window={k} px is larger than the image ({h} x {w} px)")
    use_kernel = _choose_engine(engine, be)

    n_atoms = pos.shape[1]
    flat_pos = xp.asarray(pos.reshape(-1, 2))
    frames = xp.repeat(xp.arange(f_n), n_atoms)
    origins, status = window_origins(flat_pos, k, (h, w), xp)
    wins = extract_windows(stack, frames, origins, k, xp)
    flat = (wins.max(axis=(1, 2)) - wins.min(axis=(1, 2))) <= 0
    status = xp.where((status == -1) & flat, FLAT, status).astype(xp.int8)
    idx = xp.nonzero(status == -1)[0]  # the fits to run (one host sync)
    p = mdl.n_params
    m_total = flat_pos.shape[0]
    init = _initial_guess(wins[idx], flat_pos[idx], origins[idx], k, float(sigma), xp)
    org = origins[idx].astype(xp.float64)

    n_passes = 1 + (_SUBTRACT_PASSES if neighbours == "subtract" else 0) \
        + (1 if mdl.name == "elliptical" else 0)
    bar = progress_bar(progress, total=n_passes, desc=f"fit {int(idx.size)} columns",
                       unit="pass", leave=False)

    def run(mdl_, init_, gain_, offset_, small=False):
        result = _run(mdl_, init_, gain_, offset_, small)
        bar.update(1)
        return result

    def _run(mdl_, init_, gain_, offset_, small):
        kk = k1 if small else k
        o = origins[idx] + (k - kk) // 2
        if use_kernel is not None:
            return use_kernel.lm_fit_kernel(
                stack, frames[idx], o, init_, window=kk, model=mdl_.name,
                estimator=estimator, max_iter=max_iter, tol=tol, gain=gain_, offset=offset_)
        c0 = (k - kk) // 2
        return lm_fit(wins[idx][:, c0:c0 + kk, c0:c0 + kk], o.astype(xp.float64), init_,
                      model=mdl_, estimator=estimator, max_iter=max_iter, tol=tol,
                      gain=gain_, xp=xp, offset=offset_)

    gain = 1.0 if counts_per_unit is None else float(counts_per_unit)
    if int(idx.size) == 0:  # nothing fittable: every entry is flagged below
        out = LMOutput(xp.empty((0, p)), xp.empty((0, p)), xp.empty((0, p, p)), xp.empty(0),
                       xp.empty(0, dtype=xp.int32), xp.empty(0, dtype=xp.int8))
    else:
        iso = get_model("gaussian")
        k1 = k
        out = run(iso, init, gain, None)
        out_gain = gain  # the gain out's errors were computed with
        offset = None
        if neighbours == "subtract":
            if counts_per_unit is None:
                gain = _gain_from(iso, out, wins[idx], org, None, xp) or gain
            # Two refits: faint columns (O next to Sr) often fail the plain pass and only find
            # themselves once their bright neighbours are accounted for; the second refit then
            # includes them in their neighbours' models.
            guess = init
            fixed_rows = xp.zeros(out.status.shape, dtype=bool)
            for _ in range(_SUBTRACT_PASSES):
                # Untrusted fits (e.g. two overlapping columns merged into one) enter their
                # neighbours' models at their initial guess instead of the failed fit.
                ok = _plausible(out, init, k, float(sigma))
                nat = xp.where(ok[:, None], out.params, guess)
                # Faint columns' widths are noise; their errors would leak into neighbours.
                nat = _steady_widths(nat, out, ok, float(sigma), np.sqrt(out_gain / gain), xp)
                offset = _neighbour_offsets(iso, nat, frames[idx], org, k, stack.shape, xp,
                                            edge=(stack, flat_pos, frames, status, ok))
                # Columns not yet trusted restart from a guess on the window minus neighbours.
                guess = _initial_guess(wins[idx] - offset.astype(wins.dtype), flat_pos[idx],
                                       origins[idx], k, float(sigma), xp)
                out = run(iso, xp.where(ok[:, None], out.params, guess), gain, offset)
                out_gain = gain
            out, fixed_rows = _refit_fixed_width(
                out, wins[idx], flat_pos[idx], origins[idx], org, k, float(sigma), gain, offset,
                estimator, max_iter, tol, xp)
        else:
            fixed_rows = xp.zeros(out.status.shape, dtype=bool)
        if mdl.name == "elliptical":
            # Round start: sigma_1 = sigma_2, angle 0; the damping floor keeps the angle finite.
            start = xp.where(_usable(out)[:, None], out.params, init)
            ell = xp.stack([start[:, 0], start[:, 1], start[:, 2], start[:, 3] * 1.02,
                            start[:, 3] / 1.02, xp.zeros_like(start[:, 0]), start[:, 4]], axis=1)
            iso_out = out
            out = run(mdl, ell, gain, offset)
            if bool(fixed_rows.any()):
                # Held-width fits stay round with their width held (a free elliptical refit
                # would undo the hold that made them converge).
                out = _round_elliptical(out, iso_out, fixed_rows, xp)
        if counts_per_unit is None:
            est = _gain_from(mdl, out, wins[idx], org, offset, xp)
            if est is not None:
                # The Fisher information is proportional to the gain: rescale to the estimate.
                scale = gain / est
                out = out._replace(covariance=out.covariance * scale,
                                   param_errors=out.param_errors * np.sqrt(scale))
                gain = est

    params = xp.full((m_total, p), xp.nan)
    errors = xp.full((m_total, p), xp.nan)
    cov = xp.full((m_total, p, p), xp.nan)
    chi2 = xp.full(m_total, xp.nan)
    n_iter = xp.zeros(m_total, dtype=xp.int32)
    bar.close()
    width_fixed = xp.zeros(m_total, dtype=bool)
    if int(idx.size):
        width_fixed[idx] = fixed_rows
    params[idx], errors[idx], cov[idx] = out.params, out.param_errors, out.covariance
    chi2[idx], n_iter[idx] = out.chi2, out.n_iter
    status[idx] = out.status
    lead = (f_n, n_atoms) if (is_stack or per_frame) else (n_atoms,)
    rc = list(mdl.position)
    params = params.reshape(*lead, p)
    errors = errors.reshape(*lead, p)
    return AtomFit(
        positions=params[..., rc],
        position_errors=errors[..., rc],
        params=params,
        param_errors=errors,
        covariance=cov.reshape(*lead, p, p),
        param_names=mdl.param_names,
        chi2=chi2.reshape(lead),
        n_iter=n_iter.reshape(lead),
        status=status.reshape(lead),
        counts_per_unit=float(gain),
        width_fixed=width_fixed.reshape(lead),
        parameters={
            "model": mdl.name, "window": int(k), "sigma_init": float(sigma),
            "neighbours": neighbours, "estimator": estimator,
            "counts_per_unit": None if counts_per_unit is None else float(counts_per_unit),
            "counts_per_unit_estimated": counts_per_unit is None, "max_iter": int(max_iter),
            "tol": float(tol), "engine": "kernel" if use_kernel is not None else "array",
            "backend": be.name,
        },
    )


def _choose_engine(engine, be):
    if engine == "array":
        return None
    if engine == "kernel" and not be.is_gpu:
        raise ValueError(
            "engine='kernel' needs the CuPy backend (a CUDA device); use engine='array' or "
            "'auto' on NumPy"
        )
    mod = _kernel_module() if be.is_gpu else None
    if engine == "kernel" and mod is None:
        raise ValueError("engine='kernel' was requested but stemgpu.atoms.cuda is not available")
    return mod


def _with_rows(out, rows, new):
    """``out`` with its entries at ``rows`` replaced by those of ``new`` (one per row)."""
    fields = []
    for old, value in zip(out, new, strict=True):
        old = old.copy()
        old[rows] = value
        fields.append(old)
    return LMOutput(*fields)


def _round_elliptical(ell_out, iso_out, rows, xp):
    """Elliptical results for ``rows`` from isotropic ones: s1 = s2 = s, angle 0 (undefined)."""
    # isotropic (A, r, c, s, B) -> elliptical (A, r, c, s1, s2, th, B)
    emap = xp.asarray([0, 1, 2, 3, 6])
    r = xp.nonzero(rows)[0]
    iso = LMOutput(*(f[r] for f in iso_out))
    p_new = xp.zeros((len(r), 7))
    e_new = xp.zeros((len(r), 7))
    c_new = xp.zeros((len(r), 7, 7))
    p_new[:, emap] = iso.params
    e_new[:, emap] = iso.param_errors
    c_new[:, emap[:, None], emap[None, :]] = iso.covariance
    p_new[:, 4] = iso.params[:, 3]
    e_new[:, 5] = xp.inf
    c_new[:, 5, 5] = xp.inf
    return _with_rows(ell_out, r, iso._replace(params=p_new, param_errors=e_new,
                                               covariance=c_new))


def _steady_widths(nat, out, ok, sigma, error_scale, xp):
    """Neighbour models with poorly determined widths drawn at the median trusted width.

    A faint column's fitted width scatters by tens of percent at usual doses; drawn into its
    bright neighbours' windows, that scatter becomes extra position noise of the bright
    columns (measured: 1.11x / 1.13x the Cramér-Rao bound for Sr / Ti-O with free widths,
    1.02x with the true neighbour parameters, 1.03x / 1.05x with this). Widths known to
    better than 5 % are kept: species whose columns really differ in width keep theirs.
    """
    if not bool(ok.any()):
        return nat
    s_ref = float(xp.median(out.params[ok, 3]))
    # error_scale puts errors computed with a provisional gain on the data's gain, so the
    # choice does not depend on the units of the image.
    noisy = ~(out.param_errors[:, 3] * error_scale < 0.05 * sigma)
    nat = nat.copy()
    nat[:, 3] = xp.where(noisy, s_ref, nat[:, 3])
    return nat


def _refit_fixed_width(out, wins, pos, origins, org, k, sigma, gain, offset, estimator,
                       max_iter, tol, xp):
    """Refit failed or implausibly wide/narrow isotropic fits with the width held.

    At low dose a faint column (O beside Sr) carries too little signal to pin its width, and
    a free-width fit can run to the window edge. Holding the width at the median of the
    trusted fits (all columns share the probe) keeps position, amplitude and background
    estimable. Only refits that converge replace the original result.
    """
    iso = get_model("gaussian")
    s_fit = out.params[:, 3]
    good = (out.status == CONVERGED) & (s_fit > 0.67 * sigma) & (s_fit < 1.5 * sigma)
    fixed_rows = xp.zeros(out.status.shape, dtype=bool)
    if not bool(good.any()):
        return out, fixed_rows
    s_ref = float(xp.median(s_fit[good]))
    bad = ~good & (out.status != SINGULAR)
    sel = xp.nonzero(bad)[0]
    if int(sel.size) == 0:
        return out, fixed_rows
    # A smaller window (+-1.25 sigma) keeps the shot noise of bright neighbours' flanks out.
    ks = min(k, 2 * int(np.ceil(1.25 * s_ref)) + 1)
    c0 = (k - ks) // 2
    sub = wins[sel][:, c0:c0 + ks, c0:c0 + ks]
    off = None if offset is None else offset[sel][:, c0:c0 + ks, c0:c0 + ks]
    w = sub if off is None else sub - off.astype(sub.dtype)
    start = _initial_guess(w, pos[sel], origins[sel] + c0, ks, s_ref, xp)
    start[:, 3] = s_ref
    fixed = xp.zeros(start.shape, dtype=bool)
    fixed[:, 3] = True
    re = lm_fit(sub, org[sel] + c0, start, model=iso, estimator=estimator,
                max_iter=max_iter, tol=tol, gain=gain, xp=xp, offset=off, fixed=fixed)
    take = re.status == CONVERGED
    rows = sel[take]
    fixed_rows[rows] = True
    return _with_rows(out, rows, LMOutput(*(f[take] for f in re))), fixed_rows


def _usable(out):
    return (out.status == CONVERGED) | (out.status == MAX_ITER)


def _initial_guess(wins, pos, origins, k, sigma, xp):
    """Background from the window border median, amplitude from the centre pixel."""
    border = xp.concatenate([wins[:, 0, :], wins[:, -1, :], wins[:, 1:-1, 0],
                             wins[:, 1:-1, -1]], axis=1)
    bg = xp.median(border, axis=1).astype(xp.float64)
    c = k // 2
    peak = wins[:, c - 1:c + 2, c - 1:c + 2].mean(axis=(1, 2)).astype(xp.float64)
    span = (wins.max(axis=(1, 2)) - wins.min(axis=(1, 2))).astype(xp.float64)
    amp = xp.maximum(peak - bg, 0.25 * span)
    sig = xp.full(pos.shape[0], sigma)
    return xp.stack([amp, pos[:, 0], pos[:, 1], sig, bg], axis=1)


def _plausible(out, init, k, sigma):
    """Fits trusted as neighbours: finished, moved < k/4 from the start, width in range."""
    moved = ((out.params[:, 1:3] - init[:, 1:3]) ** 2).sum(axis=1)
    s = out.params[:, 3]
    return _usable(out) & (moved < (0.5 * sigma) ** 2) & (s > 0.67 * sigma) & (s < 1.5 * sigma)


def _edge_peaks(stack, pos, frames, status, nat, ok, fitted, xp):
    """Guessed peaks of columns too close to the image edge for a window, or None.

    Their flux reaches the windows of the next columns inwards; left out of the neighbour
    model it pulls those columns outwards (measured on a noise-free SrTiO3 image: O columns
    one cell from the edge 0.88 px off without these peaks). Amplitude from the 3 x 3 mean
    at the given position minus the fitted peaks there (``fitted``, (F, H, W)) and the median
    fitted background; width the median fitted width.
    """
    f_n, h, w = stack.shape
    edge = (status == OUT_OF_BOUNDS) & xp.isfinite(pos).all(axis=1)
    # "Inside the image" as in window_origins: pixel centres +- 0.5
    edge &= (pos[:, 0] >= -0.5) & (pos[:, 0] <= h - 0.5) & (pos[:, 1] >= -0.5) & (
        pos[:, 1] <= w - 0.5)
    rows = xp.nonzero(edge)[0]
    if int(rows.size) == 0 or not bool(ok.any()):
        return None
    p = pos[rows]
    r0 = xp.rint(p).astype(xp.int64)
    d = xp.arange(-1, 2)
    rr = xp.clip(r0[:, 0, None, None] + d[None, :, None], 0, h - 1)
    cc = xp.clip(r0[:, 1, None, None] + d[None, None, :], 0, w - 1)
    fr = frames[rows][:, None, None]
    peak = (stack[fr, rr, cc].astype(xp.float64) - fitted[fr, rr, cc]).mean(axis=(1, 2))
    bg = float(xp.median(nat[ok, 4]))
    amp = xp.maximum(peak - bg, 0.0)
    sig = xp.full(amp.shape, float(xp.median(nat[ok, 3])))
    guess = xp.stack([amp, p[:, 0], p[:, 1], sig, xp.zeros_like(amp)], axis=1)
    keep = amp > 0
    return guess[keep], frames[rows][keep]


def _neighbour_offsets(mdl, nat, frames, origins, k, shape, xp, edge=None):
    """Peaks of all *other* columns (params ``nat``) on each window, data units, (M, k, k).

    ``edge`` = (stack, positions, frames, status, ok) of all columns adds guessed peaks of
    the columns too close to the image edge to be fitted (see :func:`_edge_peaks`).
    """
    good = xp.isfinite(nat).all(axis=1)
    sig_max = float(xp.nanmax(xp.where(good[:, None], nat[:, list(mdl.widths)], xp.nan)))
    radius = int(max(k // 2, np.ceil(4.0 * min(sig_max, k))))
    full = render_peaks(mdl, nat, frames, shape, radius, xp)
    extra = None if edge is None else _edge_peaks(*edge[:4], nat, edge[4], full, xp)
    if extra is not None and int(extra[0].shape[0]):
        full += render_peaks(mdl, extra[0], extra[1], shape, radius, xp)
    wins = extract_windows(full, frames, origins.astype(xp.int64), k, xp)
    d = xp.arange(k, dtype=xp.float64)
    yy, xx = (g.ravel() for g in xp.meshgrid(d, d, indexing="ij"))
    t = mdl.to_internal(xp.where(good[:, None], nat, 1.0), origins, 1.0, xp)
    t[:, mdl.background] = 0.0
    own = mdl.value(t, yy, xx, xp).reshape(-1, k, k)
    return wins - xp.where(good[:, None, None], own, 0.0)


def _gain_from(mdl, out, wins, origins, offset, xp):
    k = wins.shape[1]
    d = xp.arange(k, dtype=xp.float64)
    yy, xx = (g.ravel() for g in xp.meshgrid(d, d, indexing="ij"))
    good = out.status == CONVERGED
    if not bool(good.any()):
        return None
    t = mdl.to_internal(xp.where(good[:, None], out.params, 1.0), origins, 1.0, xp)
    mu = mdl.value(t, yy, xx, xp)
    if offset is not None:
        mu = mu + offset.reshape(mu.shape)
    return _estimate_gain(wins, mu, good, mdl.n_params, xp)
