"""numba kernels of the compiled CPU engine: the LM of :mod:`stemgpu.atoms.lm`, one fit per loop
iteration, threads over fits (``prange``).

Private: imported on first use by :mod:`stemgpu.atoms._compiled` (never at ``import stemgpu``
time, numba's import costs ~0.45 s). Every rule (damping, trial validity, accept / converge /
stuck, Fisher information with unidentifiable parameters dropped, final checks) follows the
specification in the docstring of :mod:`stemgpu.atoms.lm` and the order of operations of
``kernels/lm.cuh``. Constants and status codes are passed in from the registry
(:mod:`stemgpu.atoms.models`, :mod:`stemgpu.atoms.lm`) rather than read as globals, so the
on-disk cache (``cache=True``) cannot hold stale values when those modules change.

Layout of the small integer / float arrays the driver receives:

- ``consts`` (float64): LAMBDA0, LAMBDA_UP, LAMBDA_DOWN, LAMBDA_MIN, LAMBDA_MAX,
  DAMPING_FLOOR, FISHER_FLOOR, log(SIGMA_MIN), log(AMPLITUDE_MIN_COUNTS).
- ``codes`` (int64): CONVERGED, MAX_ITER, SINGULAR, OUT_OF_BOUNDS, DIVERGED.
- ``lay`` (int64): amplitude, row, col, background, number of widths, width indices...
- ``islog`` (int64, P): 1 where the internal parameter is the log of the natural one.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

MLE = 0
LSQ = 1
GAUSSIAN = 0
ELLIPTICAL = 1

# IEEE semantics (1/0 = inf, no exceptions from inside threads), as NumPy and CUDA.
_JIT = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}
# The two per-pixel sums (objective; gradient and normal matrix) may be regrouped and fused
# (reassociation and FMA contraction only: no finite-math or reciprocal shortcuts, so inf /
# NaN tests and the validity rules hold). Their rounding then differs from the array
# engine's by ~1e-16 relative, as NumPy's pairwise sums already do; measured 22 % less time
# per normal-matrix evaluation (31 x 31 window).
_JIT_SUM = {**_JIT, "fastmath": {"reassoc", "contract"}}


# --- per-fit factors of the models -------------------------------------------------------

@njit(**_JIT)
def _prepare(model_id, t, k, pre, ey, ex, ry, rx, qy, qx):
    """Per-fit constants (``pre``) and, for the isotropic model, the separable row / column
    factors (k + k exponentials per evaluation instead of k^2, as the array engine)."""
    if model_id == GAUSSIAN:
        a = math.exp(t[0])
        r = t[1]
        c = t[2]
        is2 = math.exp(-2.0 * t[3])
        pre[0] = a
        pre[1] = t[4]
        for i in range(k):
            dy = i - r
            dx = i - c
            ey[i] = math.exp(-0.5 * dy * dy * is2)
            ex[i] = math.exp(-0.5 * dx * dx * is2)
            ry[i] = dy * is2
            rx[i] = dx * is2
            qy[i] = dy * dy * is2
            qx[i] = dx * dx * is2
    else:
        pre[0] = math.exp(t[0])
        pre[1] = t[1]
        pre[2] = t[2]
        pre[3] = math.exp(-2.0 * t[3])
        pre[4] = math.exp(-2.0 * t[4])
        pre[5] = math.cos(t[5])
        pre[6] = math.sin(t[5])
        pre[7] = t[6]


@njit(**_JIT)
def _pixel(model_id, pre, i, j, ey, ex, ry, rx, qy, qx, jac, want_jac):
    """Model value (background included, offset not) at pixel (i, j); fills ``jac`` (d mu /
    d internal) when ``want_jac``. Same formulas and operation order as models.py."""
    if model_id == GAUSSIAN:
        g = (pre[0] * ey[i]) * ex[j]
        if want_jac:
            jac[0] = g
            jac[1] = g * ry[i]
            jac[2] = g * rx[j]
            jac[3] = g * (qy[i] + qx[j])
            jac[4] = 1.0
        return g + pre[1]
    a = pre[0]
    i1 = pre[3]
    i2 = pre[4]
    ct = pre[5]
    st = pre[6]
    dy = i - pre[1]
    dx = j - pre[2]
    u = ct * dy + st * dx
    v = -st * dy + ct * dx
    g = a * math.exp(-0.5 * (u * u * i1 + v * v * i2))
    if want_jac:
        jac[0] = g
        jac[1] = g * (u * ct * i1 - v * st * i2)
        jac[2] = g * (u * st * i1 + v * ct * i2)
        jac[3] = g * u * u * i1
        jac[4] = g * v * v * i2
        jac[5] = -g * u * v * (i1 - i2)
        jac[6] = 1.0
    return g + pre[7]


# --- objective and normal equations ------------------------------------------------------

@njit(**_JIT_SUM)
def _objective(model_id, est, t, k, dd, aux1, aux2, offs, pre, ey, ex, ry, rx, qy, qx, jac):
    """F(t): Poisson deviance (``aux1`` = d where positive else 0, ``aux2`` = 1/d there else 1)
    or weighted chi-square (``aux1`` = 1 / max(d, 1)); +inf for MLE when any mu <= 0."""
    _prepare(model_id, t, k, pre, ey, ex, ry, rx, qy, qx)
    s_lin = 0.0
    s_log = 0.0
    if model_id == GAUSSIAN and est == MLE:  # the hot path, written out
        a = pre[0]
        b = pre[1]
        for i in range(k):
            ay = a * ey[i]
            base = i * k
            for j in range(k):
                p = base + j
                mu = (ay * ex[j] + b) + offs[p]
                if not mu > 0.0:
                    return np.inf
                s_lin += mu - dd[p]
                s_log += aux1[p] * math.log(mu * aux2[p])
        return 2.0 * s_lin - 2.0 * s_log
    for i in range(k):
        for j in range(k):
            p = i * k + j
            mu = _pixel(model_id, pre, i, j, ey, ex, ry, rx, qy, qx, jac, False) + offs[p]
            if est == MLE:
                if not mu > 0.0:
                    return np.inf
                s_lin += mu - dd[p]
                s_log += aux1[p] * math.log(mu * aux2[p])
            else:
                r = dd[p] - mu
                s_lin += aux1[p] * r * r
    if est == MLE:
        return 2.0 * s_lin - 2.0 * s_log
    return s_lin


@njit(**_JIT_SUM)
def _grad_hess_gauss(est, final, t, k, dd, aux1, offs, pre, ey, ex, ry, rx, qy, qx, g, h):
    """Gradient and Fisher-scoring matrix (of F/2) of the isotropic model, scalar
    accumulators (the hot loop: 5 Jacobian terms and 15 products per pixel). ``final``: the
    MLE information at the end, weights ``1 / mu_safe`` (as :func:`_normal` mode 1)."""
    _prepare(GAUSSIAN, t, k, pre, ey, ex, ry, rx, qy, qx)
    a = pre[0]
    b = pre[1]
    g0 = g1 = g2 = g3 = g4 = 0.0
    h00 = h10 = h11 = h20 = h21 = h22 = 0.0
    h30 = h31 = h32 = h33 = h40 = h41 = h42 = h43 = h44 = 0.0
    for i in range(k):
        ay = a * ey[i]
        ryi = ry[i]
        qyi = qy[i]
        base = i * k
        for j in range(k):
            p = base + j
            j0 = ay * ex[j]
            mu = (j0 + b) + offs[p]
            j1 = j0 * ryi
            j2 = j0 * rx[j]
            j3 = j0 * (qyi + qx[j])
            if final:
                wh = 1.0 / (mu if mu > 0.0 else 1e-12)
                rg = 0.0
            elif est == MLE:
                wh = 1.0 / mu
                rg = 1.0 - dd[p] * wh
            else:
                wh = aux1[p]
                rg = -wh * (dd[p] - mu)
            g0 += j0 * rg
            g1 += j1 * rg
            g2 += j2 * rg
            g3 += j3 * rg
            g4 += rg
            w0 = j0 * wh
            w1 = j1 * wh
            w2 = j2 * wh
            w3 = j3 * wh
            h00 += w0 * j0
            h10 += w1 * j0
            h11 += w1 * j1
            h20 += w2 * j0
            h21 += w2 * j1
            h22 += w2 * j2
            h30 += w3 * j0
            h31 += w3 * j1
            h32 += w3 * j2
            h33 += w3 * j3
            h40 += w0
            h41 += w1
            h42 += w2
            h43 += w3
            h44 += wh
    g[0] = g0
    g[1] = g1
    g[2] = g2
    g[3] = g3
    g[4] = g4
    h[0] = h00
    h[5] = h10
    h[6] = h11
    h[10] = h20
    h[11] = h21
    h[12] = h22
    h[15] = h30
    h[16] = h31
    h[17] = h32
    h[18] = h33
    h[20] = h40
    h[21] = h41
    h[22] = h42
    h[23] = h43
    h[24] = h44
    for a_ in range(5):
        for b_ in range(a_ + 1, 5):
            h[a_ * 5 + b_] = h[b_ * 5 + a_]


@njit(**_JIT)
def _normal(model_id, est, mode, t, k, dd, aux1, offs, pre, ey, ex, ry, rx, qy, qx, jac,
            g, h, bmat):
    """Generic normal equations, any model. ``mode`` 0: gradient ``g`` and matrix ``h`` of the
    iteration (weights 1/mu or w). ``mode`` 1: the final information at ``t`` with
    ``mu_safe = mu if mu > 0 else 1e-12``: MLE ``h = J^T diag(1/mu_safe) J``; LSQ ``h = J^T
    diag(w) J`` and ``bmat = J^T diag(w^2 mu_safe) J``."""
    npar = g.shape[0]
    _prepare(model_id, t, k, pre, ey, ex, ry, rx, qy, qx)
    for a_ in range(npar):
        g[a_] = 0.0
        for b_ in range(npar):
            h[a_ * npar + b_] = 0.0
            bmat[a_ * npar + b_] = 0.0
    for i in range(k):
        for j in range(k):
            p = i * k + j
            mu = _pixel(model_id, pre, i, j, ey, ex, ry, rx, qy, qx, jac, True) + offs[p]
            wb = 0.0
            rg = 0.0
            if mode == 0:
                if est == MLE:
                    wh = 1.0 / mu
                    rg = 1.0 - dd[p] * wh
                else:
                    wh = aux1[p]
                    rg = -wh * (dd[p] - mu)
            else:
                mus = mu if mu > 0.0 else 1e-12
                if est == MLE:
                    wh = 1.0 / mus
                else:
                    wh = aux1[p]
                    wb = wh * wh * mus
            for a_ in range(npar):
                ja = jac[a_]
                g[a_] += ja * rg
                jw = ja * wh
                for b_ in range(a_ + 1):
                    h[a_ * npar + b_] += jw * jac[b_]
                if est == LSQ and mode == 1:
                    jb = ja * wb
                    for b_ in range(a_ + 1):
                        bmat[a_ * npar + b_] += jb * jac[b_]
    for a_ in range(npar):
        for b_ in range(a_ + 1, npar):
            h[a_ * npar + b_] = h[b_ * npar + a_]
            bmat[a_ * npar + b_] = bmat[b_ * npar + a_]


# --- small dense algebra -----------------------------------------------------------------

@njit(**_JIT)
def _chol_factor(a, low, npar):
    """A = L L^T (row-major), in the order of lm._cholesky_solve; False on a pivot <= 0."""
    ok = True
    for j in range(npar):
        s = a[j * npar + j]
        for q in range(j):
            s -= low[j * npar + q] * low[j * npar + q]
        ok = ok and (s > 0.0)
        ljj = math.sqrt(s if s > 0.0 else 1.0)
        low[j * npar + j] = ljj
        for i in range(j + 1, npar):
            v = a[i * npar + j]
            for q in range(j):
                v -= low[i * npar + q] * low[j * npar + q]
            low[i * npar + j] = v / ljj
    return ok


@njit(**_JIT)
def _chol_solve(low, b, x, y, npar):
    """Solve L L^T x = b; False when x is not finite."""
    for i in range(npar):
        v = b[i]
        for q in range(i):
            v -= low[i * npar + q] * y[q]
        y[i] = v / low[i * npar + i]
    ok = True
    for i in range(npar - 1, -1, -1):
        v = y[i]
        for q in range(i + 1, npar):
            v -= low[q * npar + i] * x[q]
        x[i] = v / low[i * npar + i]
        ok = ok and math.isfinite(x[i])
    return ok


@njit(**_JIT)
def _valid(t, k, lay, log_sigma_min, log_amp_min):
    """Trial validity (step 3 of the spec) on internal parameters."""
    for a_ in range(t.shape[0]):
        if not math.isfinite(t[a_]):
            return False
    for q in (1, 2):
        v = t[lay[q]]
        if not (v >= -0.5 and v <= k - 0.5):
            return False
    lmax = math.log(float(k))
    for w in range(lay[4]):
        v = t[lay[5 + w]]
        if not (v >= log_sigma_min and v <= lmax):
            return False
    return t[lay[0]] >= log_amp_min


# --- one fit -----------------------------------------------------------------------------

@njit(**_JIT)
def _fit_one(m, model_id, est, win, offset, has_off, fixed, has_fixed, origins, init, gain,
             max_iter, tol, consts, codes, lay, islog, params, errors, cov, chi2, n_iter,
             status, dd, aux1, aux2, offs, pre, ey, ex, ry, rx, qy, qx, jac, t, trial, g, mg,
             delta, ytmp, h, amat, low, bmat, inv, tmp, tr, drop, e_col, x_col):
    k = win.shape[1]
    npar = t.shape[0]
    lam0, up, down, lmin, lmax = consts[0], consts[1], consts[2], consts[3], consts[4]
    damp_floor, fisher_floor, log_smin, log_amin = consts[5], consts[6], consts[7], consts[8]
    st_conv, st_maxit, st_sing, st_oob, st_div = codes[0], codes[1], codes[2], codes[3], codes[4]
    # Data terms, fixed per fit (counts = data * gain).
    for i in range(k):
        for j in range(k):
            p = i * k + j
            d = float(win[m, i, j]) * gain
            dd[p] = d
            if est == MLE:
                if d > 0.0:
                    aux1[p] = d
                    aux2[p] = 1.0 / d
                else:
                    aux1[p] = 0.0
                    aux2[p] = 1.0
            else:
                aux1[p] = 1.0 / max(d, 1.0)
            offs[p] = float(offset[m, i, j]) * gain if has_off else 0.0
    # Natural -> internal (Model.to_internal).
    for a_ in range(npar):
        t[a_] = init[m, a_]
    t[lay[1]] -= origins[m, 0]
    t[lay[2]] -= origins[m, 1]
    t[lay[0]] *= gain
    t[lay[3]] *= gain
    for a_ in range(npar):
        if islog[a_]:
            t[a_] = math.log(t[a_])

    f = _objective(model_id, est, t, k, dd, aux1, aux2, offs, pre, ey, ex, ry, rx, qy, qx, jac)
    st = st_maxit
    it_done = 0
    lam = lam0
    active = math.isfinite(f) and _valid(t, k, lay, log_smin, log_amin)
    if not active:
        st = st_div
    stale = True  # g and h are those of t unless t moved (a rejected step leaves both)
    for it in range(max_iter):
        if not active:
            break
        if stale and model_id == GAUSSIAN:
            _grad_hess_gauss(est, False, t, k, dd, aux1, offs, pre, ey, ex, ry, rx, qy, qx, g,
                             h)
        elif stale:
            _normal(model_id, est, 0, t, k, dd, aux1, offs, pre, ey, ex, ry, rx, qy, qx, jac,
                    g, h, bmat)
        stale = False
        if has_fixed:  # held parameters: zero gradient, identity rows (lm._fix)
            for a_ in range(npar):
                if fixed[m, a_]:
                    g[a_] = 0.0
                    for b_ in range(npar):
                        h[a_ * npar + b_] = 0.0
                        h[b_ * npar + a_] = 0.0
            for a_ in range(npar):
                if fixed[m, a_]:
                    h[a_ * npar + a_] = 1.0
        dmax = h[0]
        for a_ in range(1, npar):
            dmax = max(dmax, h[a_ * npar + a_])
        for a_ in range(npar * npar):
            amat[a_] = h[a_]
        for a_ in range(npar):
            da = max(h[a_ * npar + a_], damp_floor * dmax)
            amat[a_ * npar + a_] = h[a_ * npar + a_] + lam * da
            mg[a_] = -g[a_]
        ok = _chol_factor(amat, low, npar)
        ok = _chol_solve(low, mg, delta, ytmp, npar) and ok
        for a_ in range(npar):
            trial[a_] = t[a_] + (delta[a_] if ok else 0.0)
        valid = ok and _valid(trial, k, lay, log_smin, log_amin)
        ft = np.inf
        if valid:
            ft = _objective(model_id, est, trial, k, dd, aux1, aux2, offs, pre, ey, ex, ry, rx,
                            qy, qx, jac)
        accept = valid and (ft < f)
        conv = accept and (f - ft <= tol * max(ft, 1.0))
        lam_new = max(lam / down, lmin) if accept else lam * up
        stuck = ok and (not accept) and lam_new > lmax
        if accept:
            for a_ in range(npar):
                t[a_] = trial[a_]
            f = ft
            stale = True
        lam = lam_new
        it_done = it + 1
        if conv or stuck:
            st = st_conv
        if not ok:
            st = st_sing
        active = not (conv or stuck or not ok)

    # Final information (MLE) or sandwich pieces (LSQ) at t.
    if model_id == GAUSSIAN and est == MLE:
        _grad_hess_gauss(est, True, t, k, dd, aux1, offs, pre, ey, ex, ry, rx, qy, qx, g, h)
    else:
        _normal(model_id, est, 1, t, k, dd, aux1, offs, pre, ey, ex, ry, rx, qy, qx, jac, g, h,
                bmat)
    dmax = h[0]
    for a_ in range(1, npar):
        dmax = max(dmax, h[a_ * npar + a_])
    for a_ in range(npar):
        drop[a_] = h[a_ * npar + a_] <= fisher_floor * dmax
        if has_fixed and fixed[m, a_]:
            drop[a_] = True
    for a_ in range(npar):
        for b_ in range(npar):
            keep = not drop[a_] and not drop[b_]
            if keep:
                amat[a_ * npar + b_] = h[a_ * npar + b_]
            else:
                amat[a_ * npar + b_] = 1.0 if (a_ == b_ and drop[a_]) else 0.0
                bmat[a_ * npar + b_] = 0.0
    ok = _chol_factor(amat, low, npar)
    for c in range(npar):
        for a_ in range(npar):
            e_col[a_] = 1.0 if a_ == c else 0.0
        ok = _chol_solve(low, e_col, x_col, ytmp, npar) and ok
        for a_ in range(npar):
            inv[a_ * npar + c] = x_col[a_]
    if est == LSQ:
        for a_ in range(npar):
            for b_ in range(npar):
                s = 0.0
                for q in range(npar):
                    s += inv[a_ * npar + q] * bmat[q * npar + b_]
                tmp[a_ * npar + b_] = s
        for a_ in range(npar):
            for b_ in range(npar):
                s = 0.0
                for q in range(npar):
                    s += tmp[a_ * npar + q] * inv[q * npar + b_]
                amat[a_ * npar + b_] = s
        for a_ in range(npar * npar):
            inv[a_] = amat[a_]
    for a_ in range(npar):
        tr[a_] = math.exp(t[a_]) if islog[a_] else 1.0
    tr[lay[0]] /= gain
    tr[lay[3]] /= gain
    for a_ in range(npar):
        for b_ in range(npar):
            keep = not drop[a_] and not drop[b_]
            v = inv[a_ * npar + b_] if keep else 0.0
            v = v * tr[a_] * tr[b_]
            if a_ == b_ and drop[a_]:
                v = np.inf
            if a_ == b_ and has_fixed and fixed[m, a_]:
                v = 0.0  # held, not estimated: no variance of its own
            if v != v:
                v = 0.0
            if not ok:
                v = np.inf
            cov[m, a_, b_] = v
    if not ok:
        st = st_sing
    running = st == st_conv or st == st_maxit
    r_loc = t[lay[1]]
    c_loc = t[lay[2]]
    if running and (r_loc < 0.0 or r_loc > k - 1 or c_loc < 0.0 or c_loc > k - 1):
        st = st_oob
    running = st == st_conv or st == st_maxit
    at_bound = t[lay[0]] <= log_amin + 0.01
    lk = math.log(float(k))
    for w in range(lay[4]):
        v = t[lay[5 + w]]
        at_bound = at_bound or v <= log_smin + 1e-3 or v >= lk - 1e-3
    if running and at_bound:
        st = st_div
    # Internal -> natural (Model.to_natural).
    for a_ in range(npar):
        params[m, a_] = math.exp(t[a_]) if islog[a_] else t[a_]
    params[m, lay[1]] += origins[m, 0]
    params[m, lay[2]] += origins[m, 1]
    params[m, lay[0]] /= gain
    params[m, lay[3]] /= gain
    for a_ in range(npar):
        errors[m, a_] = math.sqrt(cov[m, a_, a_])
    chi2[m] = f
    n_iter[m] = it_done
    status[m] = st


@njit(**_JIT)
def _run_block(blk, block, model_id, est, win, offset, has_off, fixed, has_fixed, origins, init,
               gain, max_iter, tol, consts, codes, lay, islog, params, errors, cov, chi2, n_iter,
               status):
    """Fits ``blk * block ...`` with one set of scratch arrays (no allocation per fit or
    per iteration)."""
    n_fits = win.shape[0]
    k = win.shape[1]
    npar = init.shape[1]
    kk = k * k
    dd = np.empty(kk)
    aux1 = np.empty(kk)
    aux2 = np.empty(kk)
    offs = np.empty(kk)
    pre = np.empty(8)
    ey = np.empty(k)
    ex = np.empty(k)
    ry = np.empty(k)
    rx = np.empty(k)
    qy = np.empty(k)
    qx = np.empty(k)
    jac = np.empty(npar)
    t = np.empty(npar)
    trial = np.empty(npar)
    g = np.empty(npar)
    mg = np.empty(npar)
    delta = np.empty(npar)
    ytmp = np.empty(npar)
    tr = np.empty(npar)
    e_col = np.empty(npar)
    x_col = np.empty(npar)
    drop = np.empty(npar, dtype=np.bool_)
    h = np.empty(npar * npar)
    amat = np.empty(npar * npar)
    low = np.zeros(npar * npar)
    bmat = np.empty(npar * npar)
    inv = np.empty(npar * npar)
    tmp = np.empty(npar * npar)
    stop = min(n_fits, (blk + 1) * block)
    for m in range(blk * block, stop):
        _fit_one(m, model_id, est, win, offset, has_off, fixed, has_fixed, origins, init, gain,
                 max_iter, tol, consts, codes, lay, islog, params, errors, cov, chi2, n_iter,
                 status, dd, aux1, aux2, offs, pre, ey, ex, ry, rx, qy, qx, jac, t, trial, g, mg,
                 delta, ytmp, h, amat, low, bmat, inv, tmp, tr, drop, e_col, x_col)


# One parallel entry per (model, estimator): the constants reach the inner loops at compile
# time, so the per-pixel branches on model and estimator are compiled away (measured 2x).

@njit(parallel=True, **_JIT)
def _batch_gaussian_mle(win, offset, has_off, fixed, has_fixed, origins, init, gain,
        max_iter, tol, consts, codes, lay, islog, block, params, errors, cov, chi2, n_iter, status):
    for blk in prange((win.shape[0] + block - 1) // block):
        _run_block(blk, block, GAUSSIAN, MLE, win, offset, has_off, fixed, has_fixed, origins,
                   init, gain, max_iter, tol, consts, codes, lay, islog, params, errors, cov,
                   chi2, n_iter, status)


@njit(parallel=True, **_JIT)
def _batch_gaussian_lsq(win, offset, has_off, fixed, has_fixed, origins, init, gain,
        max_iter, tol, consts, codes, lay, islog, block, params, errors, cov, chi2, n_iter, status):
    for blk in prange((win.shape[0] + block - 1) // block):
        _run_block(blk, block, GAUSSIAN, LSQ, win, offset, has_off, fixed, has_fixed, origins,
                   init, gain, max_iter, tol, consts, codes, lay, islog, params, errors, cov,
                   chi2, n_iter, status)


@njit(parallel=True, **_JIT)
def _batch_elliptical_mle(win, offset, has_off, fixed, has_fixed, origins, init, gain,
        max_iter, tol, consts, codes, lay, islog, block, params, errors, cov, chi2, n_iter, status):
    for blk in prange((win.shape[0] + block - 1) // block):
        _run_block(blk, block, ELLIPTICAL, MLE, win, offset, has_off, fixed, has_fixed, origins,
                   init, gain, max_iter, tol, consts, codes, lay, islog, params, errors, cov,
                   chi2, n_iter, status)


@njit(parallel=True, **_JIT)
def _batch_elliptical_lsq(win, offset, has_off, fixed, has_fixed, origins, init, gain,
        max_iter, tol, consts, codes, lay, islog, block, params, errors, cov, chi2, n_iter, status):
    for blk in prange((win.shape[0] + block - 1) // block):
        _run_block(blk, block, ELLIPTICAL, LSQ, win, offset, has_off, fixed, has_fixed, origins,
                   init, gain, max_iter, tol, consts, codes, lay, islog, params, errors, cov,
                   chi2, n_iter, status)


#: (model name, estimator) -> parallel entry point.
BATCH = {
    ("gaussian", "mle"): _batch_gaussian_mle,
    ("gaussian", "lsq"): _batch_gaussian_lsq,
    ("elliptical", "mle"): _batch_elliptical_mle,
    ("elliptical", "lsq"): _batch_elliptical_lsq,
}
