"""Batched Levenberg-Marquardt for atom-column models: the specification and the array code.

This docstring is the contract the CUDA kernel (one thread per fit) reproduces exactly.

Inputs (per fit ``m``)
----------------------
``d`` : the k x k window in data units times ``gain`` (counts); ``o`` : optional k x k
known offset (neighbouring columns, counts = offset * gain) added to the model; pixel
coordinates ``y = 0..k-1`` (rows), ``x = 0..k-1`` (cols), flattened row-major (n = k*k);
``t`` : internal parameters from :meth:`Model.to_internal` (see :mod:`.models`); the model
is a peak (``Model.sign`` +1) or, for dark contrast, a dip ``B - A G`` (``sign`` -1), whose
trial steps that reach ``mu <= 0`` are invalid by the rule of step 3.
All arithmetic is float64 (sums over up to ~1000 pixels of counts; positions to 1e-4 px).

Objective ``F(t)`` with ``mu = model(t) + o``
--------------------------------------------
- ``"mle"`` (Poisson deviance, as Gpufit): ``F = 2 sum(mu - d) - 2 sum_{d>0} d log(mu/d)``.
  Gradient ``g = J^T (1 - d/mu)`` and Fisher-scoring Hessian ``H = J^T diag(1/mu) J``
  (both of ``F/2``). A trial with any ``mu <= 0`` is invalid.
- ``"lsq"`` (Poisson-weighted least squares): weights ``w = 1 / max(d, 1)`` fixed from the
  data; ``F = sum w (d - mu)^2``; ``g = -J^T w (d - mu)``; ``H = J^T diag(w) J``.

Iteration (``it = 0 .. max_iter-1``; every fit runs the same fixed steps)
-------------------------------------------------------------------------
0. ``lambda = 1e-3``; ``F = F(t)``; if ``F`` is not finite: status DIVERGED, stop.
1. Build ``g``, ``H`` at ``t``. Damping diagonal ``D_i = max(H_ii, 1e-9 * max_j H_jj)``
   (the floor keeps an unidentifiable direction, e.g. the angle of a round column, finite).
2. Solve ``(H + lambda diag(D)) delta = -g`` by Cholesky (no pivoting, order 0..P-1). A
   pivot ``<= 0`` or non-finite: status SINGULAR, stop.
3. Trial ``t' = t + delta``. It is *invalid* if any entry is non-finite, or local row/col is
   outside ``[-0.5, k - 0.5]``, or a width is outside ``[SIGMA_MIN, k]`` px, or the amplitude
   is below ``AMPLITUDE_MIN_COUNTS``, or (MLE) any ``mu' <= 0``. Otherwise ``F' = F(t')``.
4. Accept when valid and ``F' < F``: ``t = t'``, ``lambda = max(lambda / 10, 1e-7)``;
   converged (status CONVERGED, stop after updating) when ``F - F' <= tol * max(F', 1)``.
   Reject otherwise: ``lambda = lambda * 10``; if ``lambda > 1e10`` no step can lower F,
   the point is a minimum to working precision: status CONVERGED, stop.
5. ``n_iter = it + 1``. Fits still running after ``max_iter`` iterations: status MAX_ITER
   (their parameters and uncertainties are still reported).

After the loop (all fits, any status except SINGULAR-at-solve)
-------------------------------------------------------------
- Fisher information at the final ``t`` (with ``mu = model + o``): MLE ``I = J^T diag(1/mu) J``
  (expected Poisson information); LSQ sandwich ``A = J^T diag(w) J``,
  ``B = J^T diag(w^2 mu) J``, covariance ``A^-1 B A^-1`` (Poisson variance ``mu``).
  Parameters whose diagonal ``I_ii <= 1e-12 max_j I_jj`` (an unidentifiable angle) are
  removed before inverting by Cholesky and get infinite variance (the others are unaffected);
  a failed factorisation gives status SINGULAR and infinite errors.
- Natural covariance ``C = T cov T`` with ``T = diag(d natural / d internal)``;
  ``param_errors = sqrt(diag C)`` (one sigma).
- Final checks, in order, on fits with status CONVERGED or MAX_ITER: local row/col outside
  ``[0, k-1]`` -> OUT_OF_BOUNDS; a width within 0.1 % of a bound or the amplitude within
  1 % of ``AMPLITUDE_MIN_COUNTS`` -> DIVERGED.
- ``chi2`` is ``F`` at the final ``t`` (deviance for MLE, weighted chi-square for LSQ).

The array implementation below runs this on all fits at once (chunks of fits bound memory);
fits that stopped are frozen by masks, so results are independent of batch composition.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .models import (
    AMPLITUDE_MIN_COUNTS,
    CONVERGED,
    DIVERGED,
    MAX_ITER,
    OUT_OF_BOUNDS,
    SIGMA_MIN,
    SINGULAR,
    check_estimator,
    get_model,
)

__all__ = ["LMOutput", "inverse_spd", "lm_fit", "LAMBDA0", "LAMBDA_UP", "LAMBDA_DOWN",
           "LAMBDA_MIN", "LAMBDA_MAX", "DAMPING_FLOOR", "FISHER_FLOOR"]

LAMBDA0 = 1e-3
LAMBDA_UP = 10.0
LAMBDA_DOWN = 10.0
LAMBDA_MIN = 1e-7
LAMBDA_MAX = 1e10
DAMPING_FLOOR = 1e-9
FISHER_FLOOR = 1e-12
#: Trial bounds of step 3 on the internal (log) scale.
_LOG_SIGMA_MIN = math.log(SIGMA_MIN)
_LOG_AMP_MIN = math.log(AMPLITUDE_MIN_COUNTS)


class LMOutput(NamedTuple):
    """Result of :func:`lm_fit`, arrays on the input's backend."""

    params: Any  # (M, P) natural
    param_errors: Any  # (M, P)
    covariance: Any  # (M, P, P) natural
    chi2: Any  # (M,)
    n_iter: Any  # (M,) int32
    status: Any  # (M,) int8


def _cholesky_solve(a, b, xp):
    """Solve a x = b for SPD a (m, P, P), b (m, P); returns x and an ok mask (m,)."""
    m, p = b.shape
    low = xp.zeros_like(a)
    ok = xp.ones(m, dtype=bool)
    for j in range(p):
        s = a[:, j, j] - (low[:, j, :j] ** 2).sum(axis=1)
        ok &= s > 0
        ljj = xp.sqrt(xp.where(s > 0, s, 1.0))
        low[:, j, j] = ljj
        for i in range(j + 1, p):
            low[:, i, j] = (a[:, i, j] - (low[:, i, :j] * low[:, j, :j]).sum(axis=1)) / ljj
    y = xp.zeros_like(b)
    for i in range(p):
        y[:, i] = (b[:, i] - (low[:, i, :i] * y[:, :i]).sum(axis=1)) / low[:, i, i]
    x = xp.zeros_like(b)
    for i in range(p - 1, -1, -1):
        x[:, i] = (y[:, i] - (low[:, i + 1:, i] * x[:, i + 1:]).sum(axis=1)) / low[:, i, i]
    ok &= xp.isfinite(x).all(axis=1)
    return x, ok


def inverse_spd(a, xp):
    """Batched inverse of symmetric positive definite matrices (m, P, P) and an ok mask (m,).

    Cholesky solves against the identity columns, unpivoted, in the order the kernel uses
    (``kernels/lm.cuh``); a matrix whose factorisation fails has ``ok`` False.

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.lm import inverse_spd
    >>> inv, ok = inverse_spd(np.array([[[4.0, 0.0], [0.0, 0.25]], [[1.0, 2.0], [2.0, 1.0]]]), np)
    >>> inv[0].tolist(), ok.tolist()
    ([[0.25, 0.0], [0.0, 4.0]], [True, False])
    """
    m, p, _ = a.shape
    inv = xp.zeros_like(a)
    ok = xp.ones(m, dtype=bool)
    for j in range(p):
        e = xp.zeros((m, p), dtype=a.dtype)
        e[:, j] = 1.0
        x, okj = _cholesky_solve(a, e, xp)
        inv[:, :, j] = x
        ok &= okj
    return inv, ok


def _data_terms(d, xp):
    """Fixed per-pixel factors of the deviance: ``d`` where positive (else 0) and ``1 / d``
    there (else 1), so each evaluation is one multiply and one log per pixel."""
    pos = d > 0
    return xp.where(pos, d, 0.0), 1.0 / xp.where(pos, d, 1.0)


def _objective(d, mu, w, estimator, xp, terms=None):
    """F per fit; ``terms`` = :func:`_data_terms` of ``d`` (MLE), computed if not given."""
    if estimator == "mle":
        dpos, dinv = _data_terms(d, xp) if terms is None else terms
        positive = mu > 0
        # d log(mu / d) per pixel (not sum d log mu - sum d log d: at 1e6 counts per pixel
        # that difference of large sums loses ~1e-6 of F, near the convergence tolerance).
        dlog = (dpos * xp.log(xp.where(positive, mu, 1.0) * dinv)).sum(axis=1)
        f = 2.0 * (mu - d).sum(axis=1) - 2.0 * dlog
        return xp.where(positive.all(axis=1), f, xp.inf)
    r = d - mu
    return (w * r * r).sum(axis=1)


def _jtv(jac, v):
    """J^T v per fit, (m, P), as a batched matrix product (BLAS on NumPy)."""
    return (jac.transpose(0, 2, 1) @ v[:, :, None])[:, :, 0]


def _jtwj(jac, w):
    """J^T diag(w) J per fit, (m, P, P)."""
    return jac.transpose(0, 2, 1) @ (jac * w[:, :, None])


def _grad_hess(d, mu, jac, w, estimator, xp):
    if estimator == "mle":
        g = _jtv(jac, 1.0 - d / mu)
        h = _jtwj(jac, 1.0 / mu)
    else:
        g = -_jtv(jac, w * (d - mu))
        h = _jtwj(jac, w)
    return g, h


def _valid(t, model, k, xp):
    ok = xp.isfinite(t).all(axis=1)
    for i in model.position:
        ok &= (t[:, i] >= -0.5) & (t[:, i] <= k - 0.5)
    for i in model.widths:
        ok &= (t[:, i] >= _LOG_SIGMA_MIN) & (t[:, i] <= xp.log(float(k)))
    ok &= t[:, model.amplitude] >= _LOG_AMP_MIN
    return ok



def _fix(g, h, fixed, xp):
    """Remove fixed parameters from the normal equations: zero gradient, identity rows."""
    if fixed is None:
        return g, h
    free = ~fixed
    both = free[:, :, None] & free[:, None, :]
    eye = xp.eye(h.shape[1], dtype=bool)[None]
    h = xp.where(both, h, 0.0) + xp.where(eye & fixed[:, :, None], 1.0, 0.0)
    return xp.where(fixed, 0.0, g), h


def _lm_chunk(d, off, t, model, estimator, max_iter, tol, k, xp, fixed=None):
    """Run the specified LM on one chunk; returns internal t, F, n_iter, status and the LSQ
    weights ``w`` (None for MLE)."""
    m = d.shape[0]
    w = 1.0 / xp.maximum(d, 1.0) if estimator == "lsq" else None
    dpos, dinv = _data_terms(d, xp) if estimator == "mle" else (None, None)

    def value(tt, dd_idx):
        mu = model.value_on_grid(tt, k, xp)
        return mu + off[dd_idx] if off is not None else mu

    def objective(dd, mu, dd_idx):
        terms = None if dpos is None else (dpos[dd_idx], dinv[dd_idx])
        return _objective(dd, mu, None if w is None else w[dd_idx], estimator, xp, terms)

    all_idx = xp.arange(m)
    f = objective(d, value(t, all_idx), all_idx)
    status = xp.full(m, MAX_ITER, dtype=xp.int8)
    n_iter = xp.zeros(m, dtype=xp.int32)
    lam = xp.full(m, LAMBDA0)
    active = xp.isfinite(f) & _valid(t, model, k, xp)
    status[~active] = DIVERGED
    for it in range(max_iter):
        idx = xp.nonzero(active)[0]
        if idx.size == 0:
            break
        ti, di = t[idx], d[idx]
        wi = w[idx] if w is not None else None
        mu, jac = model.value_and_jacobian_on_grid(ti, k, xp)
        if off is not None:
            mu = mu + off[idx]
        g, h = _grad_hess(di, mu, jac, wi, estimator, xp)
        g, h = _fix(g, h, None if fixed is None else fixed[idx], xp)
        diag = xp.diagonal(h, axis1=1, axis2=2)
        dmp = xp.maximum(diag, DAMPING_FLOOR * diag.max(axis=1, keepdims=True))
        a = h + (lam[idx, None] * dmp)[:, :, None] * xp.eye(model.n_params)[None]
        delta, ok_solve = _cholesky_solve(a, -g, xp)
        trial = ti + xp.where(ok_solve[:, None], delta, 0.0)
        valid = ok_solve & _valid(trial, model, k, xp)
        f_trial = objective(di, value(trial, idx), idx)
        fi = f[idx]
        accept = valid & (f_trial < fi)
        conv = accept & (fi - f_trial <= tol * xp.maximum(f_trial, 1.0))
        lam_new = xp.where(accept, xp.maximum(lam[idx] / LAMBDA_DOWN, LAMBDA_MIN),
                           lam[idx] * LAMBDA_UP)
        stuck = ok_solve & ~accept & (lam_new > LAMBDA_MAX)
        t[idx] = xp.where(accept[:, None], trial, ti)
        f[idx] = xp.where(accept, f_trial, fi)
        lam[idx] = lam_new
        n_iter[idx] = it + 1
        st = status[idx]
        st = xp.where(conv | stuck, CONVERGED, st)
        st = xp.where(~ok_solve, SINGULAR, st)
        status[idx] = st.astype(xp.int8)
        active[idx] = ~(conv | stuck | ~ok_solve)
    return t, f, n_iter, status, w


def lm_fit(windows, origins, init, *, model="gaussian", estimator="mle", max_iter=50,
           tol=1e-7, gain=1.0, xp=None, offset=None, chunk=None, fixed=None) -> LMOutput:
    """Fit one model per window with the batched LM specified in this module's docstring.

    Parameters
    ----------
    windows : (M, k, k) array
        Pixel data in data units (multiplied by ``gain`` to give counts).
    origins : (M, 2) array
        Image (row, col) of each window's ``[0, 0]`` pixel.
    init : (M, P) array
        Natural initial parameters (model order, image coordinates).
    model : str or Model
    estimator : {"mle", "lsq"}
    max_iter : int
    tol : float
        Relative objective decrease that ends a fit (step 4 of the spec).
    gain : float
        Counts per data unit.
    xp : module
        Array namespace (numpy or cupy) of the inputs.
    offset : (M, k, k) array, optional
        Known additive model part in data units (fitted neighbouring columns).
    chunk : int, optional
        Fits processed together (bounds memory: ~chunk * k^2 * P * 8 bytes per working
        array). Default 1024 on NumPy (the arrays of a chunk stay in the CPU caches: ~1.2x
        faster than 4096) and 16384 on CuPy (large batches, ~0.6 GB per Jacobian copy at
        k = 25 and P = 7).
    fixed : (M, P) bool array, optional
        Parameters held at their initial value (removed from the normal equations); their
        errors are reported as 0 and the others' errors are those of the reduced model.

    Returns
    -------
    LMOutput

    Examples
    --------
    >>> import numpy as np
    >>> from stemgpu.atoms.lm import lm_fit
    >>> yy, xx = np.mgrid[0:11, 0:11]
    >>> win = (100 * np.exp(-((yy - 5.3) ** 2 + (xx - 4.8) ** 2) / 8.0) + 10)[None]
    >>> out = lm_fit(win, np.zeros((1, 2)), np.array([[90.0, 5, 5, 1.8, 8]]), xp=np)
    >>> np.round(out.params[0, 1:3], 3).tolist(), int(out.status[0])
    ([5.3, 4.8], 0)
    """
    if xp is None:
        import numpy as xp  # noqa: N813
    mdl = get_model(model)
    check_estimator(estimator)
    if chunk is None:
        chunk = 1024 if xp is np else 16384
    windows = xp.asarray(windows)
    m_total, k = windows.shape[0], windows.shape[1]
    p = mdl.n_params
    origins = xp.asarray(origins, dtype=xp.float64)
    gain = float(gain)
    params = xp.empty((m_total, p))
    errors = xp.empty((m_total, p))
    covs = xp.empty((m_total, p, p))
    chi2 = xp.empty(m_total)
    n_iter = xp.empty(m_total, dtype=xp.int32)
    status = xp.empty(m_total, dtype=xp.int8)
    for s in range(0, m_total, chunk):
        sl = slice(s, min(s + chunk, m_total))
        d = windows[sl].reshape(-1, k * k).astype(xp.float64) * gain
        off = None
        if offset is not None:
            off = xp.asarray(offset[sl]).reshape(-1, k * k).astype(xp.float64) * gain
        t0 = mdl.to_internal(xp.asarray(init[sl]), origins[sl], gain, xp)
        fx = None if fixed is None else xp.asarray(fixed[sl], dtype=bool)
        # Rejected trials may overflow exp(); they are masked, so silence NumPy's warnings.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            t, f, it, st, w = _lm_chunk(d, off, t0, mdl, estimator, int(max_iter),
                                        float(tol), k, xp, fixed=fx)
        mu, jac = mdl.value_and_jacobian_on_grid(t, k, xp)
        if off is not None:
            mu = mu + off
        mu_safe = xp.where(mu > 0, mu, 1e-12)
        if estimator == "mle":
            fisher = _jtwj(jac, 1.0 / mu_safe)
        else:
            fisher = _jtwj(jac, w)
        diag = xp.diagonal(fisher, axis1=1, axis2=2)
        drop = diag <= FISHER_FLOOR * diag.max(axis=1, keepdims=True)
        if fx is not None:
            drop = drop | fx
        eye = xp.eye(p)[None]
        keep2 = (~drop[:, :, None]) & (~drop[:, None, :])
        fis = xp.where(keep2, fisher, 0.0) + eye * drop[:, :, None]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            inv, ok = inverse_spd(fis, xp)
        if estimator == "lsq":
            b = _jtwj(jac, w * w * mu_safe)
            b = xp.where(keep2, b, 0.0)
            inv = inv @ b @ inv
        inv = xp.where(keep2, inv, 0.0)
        tr = mdl.natural_derivative(t, gain, xp)
        cov = inv * tr[:, :, None] * tr[:, None, :]
        cov = xp.where((eye > 0) & drop[:, :, None], xp.inf, cov)
        if fx is not None:  # held, not estimated: no variance of their own
            cov = xp.where((eye > 0) & fx[:, :, None], 0.0, cov)
        cov = xp.where(xp.isnan(cov), 0.0, cov)
        cov = xp.where(ok[:, None, None], cov, xp.inf)
        st = xp.where(~ok, SINGULAR, st)
        running = (st == CONVERGED) | (st == MAX_ITER)
        pos_bad = xp.zeros_like(running)
        for i in mdl.position:
            pos_bad |= (t[:, i] < 0) | (t[:, i] > k - 1)
        st = xp.where(running & pos_bad, OUT_OF_BOUNDS, st)
        running = (st == CONVERGED) | (st == MAX_ITER)
        at_bound = t[:, mdl.amplitude] <= _LOG_AMP_MIN + 0.01
        for i in mdl.widths:
            at_bound |= (t[:, i] <= _LOG_SIGMA_MIN + 1e-3) | (t[:, i] >= xp.log(float(k)) - 1e-3)
        st = xp.where(running & at_bound, DIVERGED, st)
        params[sl] = mdl.to_natural(t, origins[sl], gain, xp)
        covs[sl] = cov
        errors[sl] = xp.sqrt(xp.diagonal(cov, axis1=1, axis2=2))
        chi2[sl] = f
        n_iter[sl] = it
        status[sl] = st.astype(xp.int8)
    return LMOutput(params, errors, covs, chi2, n_iter, status)
