"""Batched fitting of atom columns with calibrated per-atom uncertainties.

:func:`fit_atoms` extracts one k x k window per column (and per frame for a stack), fits all
of them at once with the batched Levenberg-Marquardt of :mod:`stemgpu.atoms.lm` (or the CUDA
kernel that reproduces it), optionally refits with the fitted neighbouring columns added to
each window's model, and reports positions with one-sigma errors from the Fisher information.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import check_choice, check_int, fail
from .._inputs import as_image
from .._progress import progress_bar
from ..backend import HostCopyMixin, to_host
from . import _passes as passes
from .engines import make_engine
from .lm import LMOutput
from .models import CONTRASTS, CONVERGED, STATUS_NAMES, check_estimator, get_model, with_contrast
from .windows import default_window

__all__ = ["AtomFit", "fit_atoms"]

_NEIGHBOURS = ("subtract", "none")


@dataclass(frozen=True)
class AtomFit(HostCopyMixin):
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
    given_positions : (..., 2) float64
        The start positions as given, also for the columns not fitted (whose ``positions``
        are NaN): e.g. the columns too close to the edge for a window, which the neighbour
        model of a later fit (:func:`stemgpu.track_columns`) still needs.
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
    given_positions: Any = None

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


def _check_positions(positions, n_frames):
    try:
        pos = np.asarray(to_host(positions), dtype=np.float64)
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


def _check_positive(value, name, what="a positive number"):
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real) \
            or not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return value


def _check_window(window, sigma, h, w):
    k = default_window(sigma) if window is None else window
    if not isinstance(k, int | np.integer) or k < 5 or k % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 5 (px); got {window!r}")
    if k > min(h, w):
        raise ValueError(f"window={k} px is larger than the image ({h} x {w} px)")
    return k


def fit_atoms(image_or_stack, positions, *, model="gaussian", window=None, sigma=None,
              neighbours="subtract", estimator="mle", counts_per_unit=None, max_iter=50,
              tol=1e-7, engine="auto", contrast=None, reference=None, progress=False,
              backend=None) -> AtomFit:
    """Fit a peak model to every atom column (and every frame) at once.

    Parameters
    ----------
    image_or_stack : (H, W) or (F, H, W) array or sidpy.Dataset
    positions : (N, 2) or (F, N, 2) array, or FoundAtoms
        Initial (row, col) per column (shared by all frames, or per frame). A
        :class:`~stemgpu.atoms.find.FoundAtoms` also gives the column width ``sigma``
        measured by :func:`~stemgpu.find_atoms` (it is not estimated again) and the contrast
        it searched for.
    model : {"gaussian", "elliptical"}
        See :mod:`stemgpu.atoms.models`. The elliptical model is started from an isotropic
        fit (its angle is undefined for round columns; its error is then reported as inf).
        The dark variants ``"gaussian_dark"`` / ``"elliptical_dark"`` are the same as
        ``contrast="dark"``.
    window : int, optional
        Odd window size in px; default ``2 ceil(2.5 sigma) + 1``.
    sigma : float, optional
        Column width (px) for the initial guess; estimated from the image when omitted.
    reference : AtomFit, optional
        An isotropic fit of the same ``N`` columns on an image these frames average to (the
        registered mean): each window is then fitted once, started from the reference's
        parameters, with the reference's peaks of all other columns as the known neighbour
        model (instead of the neighbour passes; failed fits then get the held-width refit).
        For the frames of a registered stack (:func:`stemgpu.track_columns`); when every
        frame has the same positions, that model is rendered once for all frames.
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
        Iterations per fit. The plain pass before the neighbour refits of
        ``neighbours="subtract"`` is provisional and stops at ``min(max_iter, 20)``
        (``_passes.PROVISIONAL_ITER``): its fits only seed the neighbour model.
    tol : float
        Relative objective decrease that ends a fit.
    progress : bool
        A tqdm bar over the fitting passes (plain, neighbour passes, elliptical).
    contrast : {"bright", "dark", "auto"}, optional
        ``"bright"`` (HAADF / ADF): columns are peaks above the background,
        ``mu = B + A G``. ``"dark"`` (ABF / BF): columns are dips, ``mu = B - A G`` with the
        dip depth ``A >= 0`` reported as ``amplitude`` (the data are fitted as they are, not
        inverted: the Poisson model holds for the recorded counts). ``"auto"``: chosen from
        the (mean) image by :func:`~stemgpu.atoms.find.detect_contrast`. Default: the
        contrast of a :class:`~stemgpu.atoms.find.FoundAtoms` given as ``positions`` or of a
        ``"*_dark"`` model, else ``"bright"``. Recorded in ``parameters["contrast"]`` (and
        ``parameters["contrast_chosen"]``: ``"given"``, ``"auto"`` or ``"find_atoms"``).
        Dark fits run on the array code on every engine (the compiled and CUDA engines have
        no dip formulas; ``parameters["engine"]`` names the engine asked for).
    engine : {"auto", "array", "compiled", "kernel"}
        The :mod:`~stemgpu.atoms.engines` every pass fits through. ``"kernel"`` uses the
        CUDA kernel (CuPy backend only; its held-width refits run the array code, the kernel
        having no held-parameter mask); ``"compiled"`` the numba engine (NumPy backend);
        ``"array"`` the array code (the reference). ``"auto"``: the kernel on CuPy, the
        compiled engine on NumPy (the array code where numba cannot load).
    backend : {"numpy", "cupy", "auto"}, optional

    Returns
    -------
    AtomFit

    Raises
    ------
    ValueError
        Empty or malformed positions, an unknown option, a window that is even, smaller than
        5 px or larger than the image, a non-positive ``sigma`` or ``counts_per_unit``, a
        ``contrast`` that contradicts a ``"*_dark"`` model.

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

    Dark (ABF-like) columns, the contrast chosen from the image:

    >>> abf, t = simulate_image((64, 64), lattice="square", contrast="dark", background=4.0,
    ...                         seed=1)
    >>> dark = fit_atoms(abf, t.image_positions(0)[t.visible(0, margin=8)], contrast="auto")
    >>> dark.parameters["contrast"], bool(dark.converged.all())
    ('dark', True)
    """
    cal = as_image(image_or_stack, name="image_or_stack", backend=backend, allow_stack=True)
    be, xp = cal.backend, cal.backend.xp
    is_stack = cal.data.ndim == 3
    stack = cal.data if is_stack else cal.data[None]
    f_n, h, w = stack.shape
    mdl = get_model(model)
    contrast, chosen = _resolve_contrast(contrast, mdl, positions, stack, be)
    mdl = with_contrast(mdl, contrast)
    check_estimator(estimator)
    check_choice(neighbours, "neighbours", _NEIGHBOURS)
    # Levenberg-Marquardt converges in tens of steps; a larger cap only buys run time (and
    # 2**63 overflows the engines' int32/int64 counters).
    check_int(max_iter, "max_iter", minimum=1, maximum=10_000)
    _check_positive(tol, "tol")
    if counts_per_unit is not None:
        _check_positive(counts_per_unit, "counts_per_unit")
    if sigma is None and getattr(positions, "sigma", None) is not None:
        sigma = float(positions.sigma)  # FoundAtoms: find_atoms measured the width already
    pos, per_frame = _check_positions(getattr(positions, "positions", positions), f_n)
    if sigma is None:
        from .find import estimate_sigma

        sigma = estimate_sigma(stack.mean(axis=0), contrast=contrast, backend=be)
    _check_positive(sigma, "sigma", "a positive number of pixels")
    # The default window follows sigma: name sigma when it, not a tiny image, is too large.
    if window is None and (sigma > max(h, w) or 5 <= min(h, w) < default_window(sigma)):
        fail("sigma", f"a positive number of pixels whose window 2 ceil(2.5 sigma) + 1 fits "
             f"the image ({h} x {w} px)", sigma)
    k = _check_window(window, sigma, h, w)
    ref_nat = _reference_params(reference, pos, mdl, xp)
    fitter = make_engine(engine, be, stack, estimator=estimator, max_iter=max_iter, tol=tol)

    iso = passes.iso_model(contrast)
    cols = passes.prepare_columns(stack, pos, k, float(sigma), xp, iso)
    gain = 1.0 if counts_per_unit is None else float(counts_per_unit)
    n_passes = 1 if ref_nat is not None else 1 + (
        passes.SUBTRACT_PASSES if neighbours == "subtract" else 0) + (
        1 if mdl.name != iso.name else 0)
    bar = progress_bar(progress, total=n_passes, desc=f"fit {int(cols.idx.size)} columns",
                       unit="pass", leave=False)
    if int(cols.idx.size) == 0:  # nothing fittable: every entry is flagged below
        p = mdl.n_params
        out = LMOutput(xp.empty((0, p)), xp.empty((0, p)), xp.empty((0, p, p)), xp.empty(0),
                       xp.empty(0, dtype=xp.int32), xp.empty(0, dtype=xp.int8))
        fixed_rows = xp.zeros(0, dtype=bool)
    else:
        out, fixed_rows, gain = _fit_columns(fitter, cols, mdl, neighbours, gain,
                                             counts_per_unit is None, bar, ref_nat)
    bar.close()
    lead = (f_n, pos.shape[1]) if (is_stack or per_frame) else (pos.shape[1],)
    return _assemble(cols, out, fixed_rows, mdl, lead, gain, parameters={
        "model": with_contrast(mdl, "bright").name, "contrast": contrast,
        "contrast_chosen": chosen, "window": int(k), "sigma_init": float(sigma),
        "neighbours": neighbours, "estimator": estimator,
        "counts_per_unit": None if counts_per_unit is None else float(counts_per_unit),
        "counts_per_unit_estimated": counts_per_unit is None, "max_iter": int(max_iter),
        "tol": float(tol), "engine": fitter.name, "backend": be.name,
        "reference": reference is not None,
    })


def _reference_params(reference, pos, mdl, xp):
    """The reference fit's isotropic parameters per fitted row's column, (F * N, 5), or None."""
    if reference is None:
        return None
    if not isinstance(reference, AtomFit):
        raise TypeError(f"reference must be an AtomFit (a fit of the same columns); got "
                        f"{type(reference).__name__}")
    if mdl.n_params != passes.ISO.n_params or \
            tuple(reference.param_names) != passes.ISO.param_names:
        raise ValueError("reference: only isotropic ('gaussian') fits and references are "
                         "supported")
    ref = xp.asarray(reference.params, dtype=xp.float64)
    n = pos.shape[1]
    if ref.shape != (n, passes.ISO.n_params):
        raise ValueError(f"reference must be a fit of the same {n} columns on one image; got "
                         f"params of shape {tuple(ref.shape)}")
    return xp.tile(ref, (pos.shape[0], 1))


def _fit_columns(engine, cols, mdl, neighbours, gain, estimate_gain, bar, ref_nat=None):
    """The passes of :mod:`._passes` in order; returns the fits, the held-width rows and
    the gain the errors are computed with."""
    if ref_nat is not None:
        out, offset = passes.reference_pass(engine, cols, ref_nat[cols.idx], gain)
        bar.update(1)
        out, fixed_rows = passes.refit_fixed_width(engine, cols, out, gain, offset)
        if estimate_gain:
            out, gain = passes.rescale_to_estimated_gain(mdl, out, cols, offset, gain)
        return out, fixed_rows, gain
    out = passes.plain_pass(engine, cols, gain, max_iter=passes.PROVISIONAL_ITER
                            if neighbours == "subtract" else None)
    bar.update(1)
    offset = None
    fixed_rows = cols.xp.zeros(out.status.shape, dtype=bool)
    if neighbours == "subtract":
        out_gain = gain  # the gain out's errors were computed with
        if estimate_gain:
            gain = passes.gain_from(cols.iso, out, cols, None) or gain
        # Two refits: faint columns (O next to Sr) often fail the plain pass and only find
        # themselves once their bright neighbours are accounted for; the second refit then
        # includes them in their neighbours' models.
        guess = cols.init
        for _ in range(passes.SUBTRACT_PASSES):
            out, guess, offset = passes.neighbour_pass(engine, cols, out, guess, gain,
                                                       np.sqrt(out_gain / gain))
            out_gain = gain
            bar.update(1)
        out, fixed_rows = passes.refit_fixed_width(engine, cols, out, gain, offset)
    if mdl.name != cols.iso.name:
        out = passes.elliptical_pass(engine, cols, mdl, out, gain, offset, fixed_rows)
        bar.update(1)
    if estimate_gain:
        out, gain = passes.rescale_to_estimated_gain(mdl, out, cols, offset, gain)
    return out, fixed_rows, gain


def _resolve_contrast(contrast, mdl, positions, stack, be):
    """The contrast of the fit and how it was chosen (see ``fit_atoms(contrast=...)``)."""
    if contrast is not None:
        check_choice(contrast, "contrast", (*CONTRASTS, "auto"))
        if mdl.sign < 0 and contrast == "bright":
            raise ValueError(f"contrast='bright' contradicts model={mdl.name!r} (a dark "
                             "model); use model='gaussian'/'elliptical' with contrast=")
        if contrast == "auto":
            from .find import detect_contrast

            return detect_contrast(stack.mean(axis=0), backend=be), "auto"
        return contrast, "given"
    if mdl.sign < 0:
        return "dark", "given"
    found = getattr(positions, "contrast", None)
    if found in CONTRASTS:
        return found, "find_atoms"
    return "bright", "given"


def _assemble(cols, out, fixed_rows, mdl, lead, gain, parameters) -> AtomFit:
    """The AtomFit of every column: the fitted rows ``cols.idx`` from ``out``, NaN (and the
    status saying why) elsewhere; arrays shaped ``lead + (...)``."""
    xp, idx = cols.xp, cols.idx
    m_total, p = cols.status.shape[0], mdl.n_params
    params = xp.full((m_total, p), xp.nan)
    errors = xp.full((m_total, p), xp.nan)
    cov = xp.full((m_total, p, p), xp.nan)
    chi2 = xp.full(m_total, xp.nan)
    n_iter = xp.zeros(m_total, dtype=xp.int32)
    status = cols.status.copy()
    width_fixed = xp.zeros(m_total, dtype=bool)
    if int(idx.size):
        width_fixed[idx] = fixed_rows
    params[idx], errors[idx], cov[idx] = out.params, out.param_errors, out.covariance
    chi2[idx], n_iter[idx] = out.chi2, out.n_iter
    status[idx] = out.status
    rc = list(mdl.position)
    params = params.reshape(*lead, p)
    errors = errors.reshape(*lead, p)
    return AtomFit(
        positions=params[..., rc], position_errors=errors[..., rc], params=params,
        param_errors=errors, covariance=cov.reshape(*lead, p, p),
        param_names=mdl.param_names, chi2=chi2.reshape(lead), n_iter=n_iter.reshape(lead),
        status=status.reshape(lead), counts_per_unit=float(gain),
        width_fixed=width_fixed.reshape(lead), parameters=parameters,
        given_positions=cols.positions.reshape(*lead, 2))
