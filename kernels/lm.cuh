// Levenberg-Marquardt driver for one fit, as __host__ __device__ code.
//
// Reproduces, step for step, the specification in the docstring of stemgpu/atoms/lm.py
// (objective, damping floor, Cholesky without pivoting, trial validity, lambda schedule,
// convergence / stuck tests, Fisher information with unidentifiable parameters dropped, LSQ
// sandwich covariance, final OUT_OF_BOUNDS / DIVERGED checks).
//
// Precision: template T is the compute type of everything that runs per pixel or per
// iteration: model, objective, gradient, normal matrix, their sums, lambda, the accept /
// converge decisions, the Cholesky solves and the Fisher information.
// - T = double: the lm.py spec bit for bit (plain sums, unscaled Cholesky).
// - T = float (workstation GPUs, whose FP64 rate is 1/32-1/64 of FP32): sums are Neumaier-
//   compensated (Sum<float>), the MLE log term is log1p((mu - d) / d) (mu - d is exact for
//   mu within a factor 2 of d, so the term keeps float precision where mu ~ d), Cholesky
//   runs on the Jacobi-scaled matrix (unit diagonal: float pivots stay meaningful when
//   diagonals span many decades; identical in exact arithmetic), and the convergence
//   tolerance is max(tol, TOL_F32) (common.cuh). Parameters t, trial validity and the
//   natural covariance stay double: O(P) operations per iteration, none per pixel.
//
// Everything lives in registers: P <= 7, the normal matrix is P x P of T.
#pragma once
#include "common.cuh"
#include "window.cuh"

namespace stemgpu {

// Cholesky factor A = L L^T (row-major P x P, lower part of L used), in the order of
// lm._cholesky_solve; false when a pivot is <= 0 or NaN.
template <int P, typename S>
SG_HD bool chol_factor(const S* A, S* L) {
    bool ok = true;
    for (int j = 0; j < P; ++j) {
        S s = A[j * P + j];
        for (int q = 0; q < j; ++q) s -= L[j * P + q] * L[j * P + q];
        ok = ok && (s > (S)0);
        S ljj = sg_sqrt(s > (S)0 ? s : (S)1);
        L[j * P + j] = ljj;
        for (int i = j + 1; i < P; ++i) {
            S v = A[i * P + j];
            for (int q = 0; q < j; ++q) v -= L[i * P + q] * L[j * P + q];
            L[i * P + j] = v / ljj;
        }
    }
    return ok;
}

// Solve L L^T x = b; false when x is not finite.
template <int P, typename S>
SG_HD bool chol_solve(const S* L, const S* b, S* x) {
    S y[P];
    for (int i = 0; i < P; ++i) {
        S v = b[i];
        for (int q = 0; q < i; ++q) v -= L[i * P + q] * y[q];
        y[i] = v / L[i * P + i];
    }
    bool ok = true;
    for (int i = P - 1; i >= 0; --i) {
        S v = y[i];
        for (int q = i + 1; q < P; ++q) v -= L[q * P + i] * x[q];
        x[i] = v / L[i * P + i];
        ok = ok && sg_finite(x[i]);
    }
    return ok;
}

// Factor an SPD system for spd_solve. Double: chol_factor of A itself (the spec); `sc`
// unused. Float: chol_factor of D A D with D = diag(1 / sqrt(A_ii)) (sc holds D); a diagonal
// <= 0 or NaN fails, as the unscaled pivot would.
template <int P>
SG_HD bool spd_factor(const double* A, double* L, double*) {
    return chol_factor<P>(A, L);
}

template <int P>
SG_HD bool spd_factor(const float* A, float* L, float* sc) {
    float As[P * P];
    bool pos = true;
    for (int a = 0; a < P; ++a) {
        float d = A[a * P + a];
        pos = pos && d > 0.0f;
        sc[a] = d > 0.0f ? 1.0f / sg_sqrt(d) : 1.0f;
    }
    for (int a = 0; a < P; ++a)
        for (int b = 0; b < P; ++b) As[a * P + b] = A[a * P + b] * sc[a] * sc[b];
    return chol_factor<P>(As, L) && pos;
}

// Solve A x = b with the factor of spd_factor; false when x is not finite.
template <int P>
SG_HD bool spd_solve(const double* L, const double*, const double* b, double* x) {
    return chol_solve<P>(L, b, x);
}

template <int P>
SG_HD bool spd_solve(const float* L, const float* sc, const float* b, float* x) {
    float bs[P], y[P];
    for (int a = 0; a < P; ++a) bs[a] = b[a] * sc[a];
    bool ok = chol_solve<P>(L, bs, y);
    for (int a = 0; a < P; ++a) x[a] = y[a] * sc[a];
    return ok;
}

// Relative convergence tolerance in the compute type (see TOL_F32).
SG_HD double conv_tol(double tol, double) { return tol; }
SG_HD float conv_tol(double tol, float) {
    float t = (float)tol;
    return t > TOL_F32 ? t : TOL_F32;
}

// The per-fit inputs the driver needs besides the parameters.
template <typename TI, typename T>
struct FitData {
    Window<TI> win;
    const T* offset;  // k*k row-major, data units, or nullptr
    double gain;      // counts per data unit
    int k;
};

template <typename TI, typename T>
SG_HD T data_counts(const FitData<TI, T>& fd, int i, int j) {
    return (T)fd.win.at(i, j) * (T)fd.gain;
}

template <typename TI, typename T>
SG_HD T offset_counts(const FitData<TI, T>& fd, int i, int j) {
    return fd.offset ? fd.offset[i * fd.k + j] * (T)fd.gain : (T)0;
}

// Objective F(t) (step 0 / 3 of the spec) in T; +inf for MLE when any mu <= 0.
// `resid` (float path only; 0 for double) gets sum |mu - d| in counts: the scale of the float
// rounding of F (see lm_fit_one's convergence test).
template <class M, int EST, typename TI, typename T>
SG_HD T objective(const FitData<TI, T>& fd, const double* t, T* resid) {
    typename M::template Pre<T> pre = M::template prepare<T>(t);
    Sum<T> f;
    T res = (T)0;
    bool pos = true;
    for (int i = 0; i < fd.k; ++i) {
        for (int j = 0; j < fd.k; ++j) {
            T d = data_counts(fd, i, j);
            T mu = M::value(pre, (T)i, (T)j) + offset_counts(fd, i, j);
            if (EST == EST_MLE) {
                pos = pos && (mu > (T)0);
                T safe = mu > (T)0 ? mu : (T)1;
                if constexpr (sizeof(T) == sizeof(double)) {
                    f.add((T)2 * (mu - d));
                    if (d > (T)0) f.add(-((T)2 * d * sg_log(safe / d)));
                } else {
                    // One term per pixel: 2 (mu - d) - 2 d log1p((mu - d) / d); its two parts
                    // cancel where mu ~ d, so each is formed without rounding mu / d.
                    T e = safe - d;
                    T dev = (T)2 * (mu - d);
                    if (d > (T)0) dev -= (T)2 * d * sg_log1p(e / d);
                    f.add(dev);
                    res += sg_abs(e);
                }
            } else {
                T w = (T)1 / sg_max(d, (T)1);
                T r = d - mu;
                f.add(w * r * r);
                // float rounding of r (~eps mu) enters F as 2 w r eps mu ~ 2 |r| eps
                if constexpr (sizeof(T) != sizeof(double)) res += sg_abs(r) * sg_max(mu, d) * w;
            }
        }
    }
    *resid = res;
    if (EST == EST_MLE && !pos) return sg_inf_like((T)0);
    return f.value();
}

// Gradient g and Fisher-scoring normal matrix H (both of F/2) at t, in T.
template <class M, int EST, typename TI, typename T>
SG_HD void grad_hess(const FitData<TI, T>& fd, const double* t, T* g, T* H) {
    constexpr int P = M::P;
    Sum<T> gs[P], hs[P * (P + 1) / 2];
    typename M::template Pre<T> pre = M::template prepare<T>(t);
    T jac[P];
    for (int i = 0; i < fd.k; ++i) {
        for (int j = 0; j < fd.k; ++j) {
            T d = data_counts(fd, i, j);
            T mu = M::value_jac(pre, (T)i, (T)j, jac) + offset_counts(fd, i, j);
            T rg, wh;
            if (EST == EST_MLE) {
                rg = (T)1 - d / mu;
                wh = (T)1 / mu;
            } else {
                T w = (T)1 / sg_max(d, (T)1);
                rg = -w * (d - mu);
                wh = w;
            }
            int ab = 0;
            for (int a = 0; a < P; ++a) {
                T ja = jac[a];
                gs[a].add(ja * rg);
                T jw = ja * wh;
                for (int b = 0; b <= a; ++b) hs[ab++].add(jw * jac[b]);
            }
        }
    }
    int ab = 0;
    for (int a = 0; a < P; ++a) {
        g[a] = gs[a].value();
        for (int b = 0; b <= a; ++b) H[a * P + b] = H[b * P + a] = hs[ab++].value();
    }
}

// Trial validity (step 3): finite, centre inside [-0.5, k-0.5], widths in [SIGMA_MIN, k],
// amplitude >= AMPLITUDE_MIN_COUNTS (all on internal parameters).
template <class M>
SG_HD bool valid_params(const double* t, int k) {
    bool ok = true;
    for (int a = 0; a < M::P; ++a) ok = ok && sg_finite(t[a]);
    ok = ok && t[M::ROW] >= -0.5 && t[M::ROW] <= k - 0.5;
    ok = ok && t[M::COL] >= -0.5 && t[M::COL] <= k - 0.5;
    const double lmin = sg_log(SIGMA_MIN), lmax = sg_log((double)k);
    for (int w = 0; w < M::NW; ++w) {
        double v = t[M::width(w)];
        ok = ok && v >= lmin && v <= lmax;
    }
    ok = ok && t[M::AMP] >= sg_log(AMPLITUDE_MIN_COUNTS);
    return ok;
}

// One complete fit. `init` natural parameters (image coordinates, data units); outputs are
// natural parameters, one-sigma errors, natural covariance (P*P), objective, iterations, status.
template <class M, int EST, typename TI, typename T>
SG_HD void lm_fit_one(const FitData<TI, T>& fd, double orow, double ocol, const double* init,
                      int max_iter, double tol, double* params, double* errors, double* cov,
                      double* chi2, int* n_iter_out, signed char* status_out) {
    constexpr int P = M::P;
    const int k = fd.k;
    const double gain = fd.gain;
    double t[P];
    for (int a = 0; a < P; ++a) t[a] = init[a];
    t[M::ROW] -= orow;
    t[M::COL] -= ocol;
    t[M::AMP] *= gain;
    t[M::BKG] *= gain;
    for (int a = 0; a < P; ++a)
        if (M::is_log(a)) t[a] = sg_log(t[a]);

    constexpr bool F32 = sizeof(T) != sizeof(double);
    const T tol_t = conv_tol(tol, (T)0);
    const T inf = sg_inf_like((T)0);
    T res = (T)0, res_t = (T)0;
    T f = objective<M, EST>(fd, t, &res);
    signed char status = ST_MAX_ITER;
    int n_iter = 0;
    T lam = (T)LAMBDA0;
    bool active = sg_finite(f) && valid_params<M>(t, k);
    if (!active) status = ST_DIVERGED;

    T g[P], H[P * P], A[P * P], L[P * P], sc[P], delta[P], mg[P];
    double trial[P];
    for (int it = 0; it < max_iter && active; ++it) {
        grad_hess<M, EST>(fd, t, g, H);
        T dmax = H[0];
        for (int a = 1; a < P; ++a) dmax = sg_max(dmax, H[a * P + a]);
        for (int a = 0; a < P * P; ++a) A[a] = H[a];
        for (int a = 0; a < P; ++a) {
            T da = sg_max(H[a * P + a], (T)DAMPING_FLOOR * dmax);
            A[a * P + a] = H[a * P + a] + lam * da;
            mg[a] = -g[a];
        }
        bool ok = spd_factor<P>(A, L, sc);
        ok = spd_solve<P>(L, sc, mg, delta) && ok;
        for (int a = 0; a < P; ++a) trial[a] = t[a] + (ok ? (double)delta[a] : 0.0);
        bool valid = ok && valid_params<M>(trial, k);
        T ft = valid ? objective<M, EST>(fd, trial, &res_t) : inf;
        bool accept = valid && (ft < f);
        bool conv;
        if constexpr (F32) {
            // Float objectives carry a rounding of up to ~0.4 eps32 * sum |mu - d| (measured;
            // random per pixel): the convergence threshold does not go below it, so an
            // accepted step whose decrease is rounding noise ends the fit instead of walking
            // on; so does a rejected, nearly undamped Gauss-Newton step (lambda <= LAMBDA0)
            // that raises F by no more than that: no step can lower F beyond its rounding
            // (the float counterpart of the lambda > LAMBDA_MAX test, without its ~17
            // rejections). Both also need the quadratic model's predicted decrease
            // (<= -2 g.delta) below the threshold: near a saddle of the (widths, angle)
            // plane a step can gain little while the gradient is real, and the fit must go on.
            T thr = sg_max(tol_t * sg_max(ft, (T)1), NOISE_F32 * EPS_F32 * res_t);
            T pred = (T)0;
            for (int a = 0; a < P; ++a) pred -= (T)2 * g[a] * delta[a];
            conv = valid && pred <= thr &&
                   (accept ? f - ft <= thr : ft - f <= thr && lam <= (T)LAMBDA0);
        } else {
            conv = accept && (f - ft <= tol_t * sg_max(ft, (T)1));
        }
        T lam_new = accept ? sg_max(lam / (T)LAMBDA_DOWN, (T)LAMBDA_MIN) : lam * (T)LAMBDA_UP;
        bool stuck = ok && !accept && lam_new > (T)LAMBDA_MAX;
        if (accept) {
            for (int a = 0; a < P; ++a) t[a] = trial[a];
            f = ft;
        }
        lam = lam_new;
        n_iter = it + 1;
        if (conv || stuck) status = ST_CONVERGED;
        if (!ok) status = ST_SINGULAR;
        active = !(conv || stuck || !ok);
    }

    // Fisher information (MLE) or the LSQ sandwich pieces A (-> H) and B at the final t.
    T B[P * P];
    {
        Sum<T> hs[P * (P + 1) / 2], bs[P * (P + 1) / 2];
        typename M::template Pre<T> pre = M::template prepare<T>(t);
        T jac[P];
        for (int i = 0; i < k; ++i) {
            for (int j = 0; j < k; ++j) {
                T mu = M::value_jac(pre, (T)i, (T)j, jac) + offset_counts(fd, i, j);
                T mus = mu > (T)0 ? mu : (T)1e-12;
                T wa, wb = (T)0;
                if (EST == EST_MLE) {
                    wa = (T)1 / mus;
                } else {
                    T d = data_counts(fd, i, j);
                    T w = (T)1 / sg_max(d, (T)1);
                    wa = w;
                    wb = w * w * mus;
                }
                int ab = 0;
                for (int a = 0; a < P; ++a) {
                    T ja = jac[a];
                    for (int b = 0; b <= a; ++b, ++ab) {
                        hs[ab].add(ja * wa * jac[b]);
                        if (EST == EST_LSQ) bs[ab].add(ja * wb * jac[b]);
                    }
                }
            }
        }
        int ab = 0;
        for (int a = 0; a < P; ++a)
            for (int b = 0; b <= a; ++b, ++ab) {
                H[a * P + b] = H[b * P + a] = hs[ab].value();
                B[a * P + b] = B[b * P + a] = bs[ab].value();
            }
    }
    bool drop[P];
    T dmax = H[0];
    for (int a = 1; a < P; ++a) dmax = sg_max(dmax, H[a * P + a]);
    for (int a = 0; a < P; ++a) drop[a] = H[a * P + a] <= (T)FISHER_FLOOR * dmax;
    for (int a = 0; a < P; ++a)
        for (int b = 0; b < P; ++b) {
            bool keep = !drop[a] && !drop[b];
            A[a * P + b] = keep ? H[a * P + b] : ((a == b && drop[a]) ? (T)1 : (T)0);
            if (!keep) B[a * P + b] = (T)0;
        }
    // inv = A^-1 column by column (as lm.inverse_spd).
    T inv[P * P];
    bool ok = spd_factor<P>(A, L, sc);
    for (int c = 0; c < P; ++c) {
        T e[P], x[P];
        for (int a = 0; a < P; ++a) e[a] = (a == c) ? (T)1 : (T)0;
        ok = spd_solve<P>(L, sc, e, x) && ok;
        for (int a = 0; a < P; ++a) inv[a * P + c] = x[a];
    }
    if (EST == EST_LSQ) {
        T tmp[P * P];
        for (int a = 0; a < P; ++a)
            for (int b = 0; b < P; ++b) {
                T s = (T)0;
                for (int q = 0; q < P; ++q) s += inv[a * P + q] * B[q * P + b];
                tmp[a * P + b] = s;
            }
        for (int a = 0; a < P; ++a)
            for (int b = 0; b < P; ++b) {
                T s = (T)0;
                for (int q = 0; q < P; ++q) s += tmp[a * P + q] * inv[q * P + b];
                A[a * P + b] = s;
            }
        for (int a = 0; a < P * P; ++a) inv[a] = A[a];
    }
    double tr[P];
    for (int a = 0; a < P; ++a) tr[a] = M::is_log(a) ? sg_exp(t[a]) : 1.0;
    tr[M::AMP] /= gain;
    tr[M::BKG] /= gain;
    for (int a = 0; a < P; ++a)
        for (int b = 0; b < P; ++b) {
            bool keep = !drop[a] && !drop[b];
            double v = keep ? (double)inv[a * P + b] * tr[a] * tr[b] : 0.0 * tr[a] * tr[b];
            if (a == b && drop[a]) v = sg_inf();
            if (v != v) v = 0.0;
            if (!ok) v = sg_inf();
            cov[a * P + b] = v;
        }
    if (!ok) status = ST_SINGULAR;

    bool running = status == ST_CONVERGED || status == ST_MAX_ITER;
    bool pos_bad = t[M::ROW] < 0.0 || t[M::ROW] > k - 1 || t[M::COL] < 0.0 ||
                   t[M::COL] > k - 1;
    if (running && pos_bad) status = ST_OUT_OF_BOUNDS;
    running = status == ST_CONVERGED || status == ST_MAX_ITER;
    bool at_bound = t[M::AMP] <= sg_log(AMPLITUDE_MIN_COUNTS) + 0.01;
    for (int w = 0; w < M::NW; ++w) {
        double v = t[M::width(w)];
        at_bound = at_bound || v <= sg_log(SIGMA_MIN) + 1e-3 || v >= sg_log((double)k) - 1e-3;
    }
    if (running && at_bound) status = ST_DIVERGED;

    for (int a = 0; a < P; ++a) params[a] = M::is_log(a) ? sg_exp(t[a]) : t[a];
    params[M::ROW] += orow;
    params[M::COL] += ocol;
    params[M::AMP] /= gain;
    params[M::BKG] /= gain;
    for (int a = 0; a < P; ++a) errors[a] = sg_sqrt(cov[a * P + a]);
    *chi2 = (double)f;
    *n_iter_out = n_iter;
    *status_out = status;
}

// Fit number `n` of a batch: window from the image, then lm_fit_one. Shared by the CUDA
// kernel (one thread per fit) and the host build (a loop over n).
template <class M, int EST, typename TI, typename T>
SG_HD void fit_batch_entry(long long n, const TI* image, int n_frames, int height, int width,
                           const int* frame_index, const int* origins, const double* init,
                           int k, double gain, int max_iter, double tol, const T* offset,
                           double* params, double* errors, double* cov, double* chi2,
                           int* n_iter, signed char* status) {
    constexpr int P = M::P;
    FitData<TI, T> fd;
    fd.offset = offset ? offset + n * (long long)k * k : nullptr;
    fd.gain = gain;
    fd.k = k;
    const int r0 = origins[2 * n], c0 = origins[2 * n + 1];
    if (!make_window(image, n_frames, height, width, frame_index[n], r0, c0, k, &fd.win)) {
        for (int a = 0; a < P; ++a) {
            params[n * P + a] = init[n * P + a];
            errors[n * P + a] = sg_inf();
            for (int b = 0; b < P; ++b) cov[(n * P + a) * P + b] = sg_inf();
        }
        chi2[n] = sg_inf();
        n_iter[n] = 0;
        status[n] = ST_OUT_OF_BOUNDS;
        return;
    }
    lm_fit_one<M, EST>(fd, (double)r0, (double)c0, init + n * P, max_iter, tol, params + n * P,
                       errors + n * P, cov + n * P * P, chi2 + n, n_iter + n, status + n);
}

}  // namespace stemgpu
