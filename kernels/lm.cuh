// Levenberg-Marquardt driver for one fit, as __host__ __device__ code.
//
// Reproduces, step for step, the specification in the docstring of stemgpu/atoms/lm.py
// (objective, damping floor, Cholesky without pivoting, trial validity, lambda schedule,
// convergence / stuck tests, Fisher information with unidentifiable parameters dropped, LSQ
// sandwich covariance, final OUT_OF_BOUNDS / DIVERGED checks).
//
// Precision: template T is the per-pixel arithmetic type of the Jacobian passes (gradient,
// normal matrix, Fisher information: float or double). The objective, the parameters, all sums
// over pixels, the Cholesky solves and the covariance are always double, so a float32 fit takes
// the same accept / converge decisions as the float64 one and differs only by the rounding of
// per-pixel Jacobian terms (the step direction).
//
// Everything lives in registers: P <= 7, the normal matrix is P x P doubles.
#pragma once
#include "common.cuh"
#include "window.cuh"

namespace stemgpu {

// Cholesky factor A = L L^T (row-major P x P, lower part of L used), in the order of
// lm._cholesky_solve; false when a pivot is <= 0 or NaN.
template <int P>
SG_HD bool chol_factor(const double* A, double* L) {
    bool ok = true;
    for (int j = 0; j < P; ++j) {
        double s = A[j * P + j];
        for (int q = 0; q < j; ++q) s -= L[j * P + q] * L[j * P + q];
        ok = ok && (s > 0.0);
        double ljj = sg_sqrt(s > 0.0 ? s : 1.0);
        L[j * P + j] = ljj;
        for (int i = j + 1; i < P; ++i) {
            double v = A[i * P + j];
            for (int q = 0; q < j; ++q) v -= L[i * P + q] * L[j * P + q];
            L[i * P + j] = v / ljj;
        }
    }
    return ok;
}

// Solve L L^T x = b; false when x is not finite.
template <int P>
SG_HD bool chol_solve(const double* L, const double* b, double* x) {
    double y[P];
    for (int i = 0; i < P; ++i) {
        double v = b[i];
        for (int q = 0; q < i; ++q) v -= L[i * P + q] * y[q];
        y[i] = v / L[i * P + i];
    }
    bool ok = true;
    for (int i = P - 1; i >= 0; --i) {
        double v = y[i];
        for (int q = i + 1; q < P; ++q) v -= L[q * P + i] * x[q];
        x[i] = v / L[i * P + i];
        ok = ok && sg_finite(x[i]);
    }
    return ok;
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

// Model value in double at pixel (i, j), offset included (jac unused: keeps T-only models
// from being instantiated twice when T is double).
template <class M, int EST, typename TI, typename T, typename J>
SG_HD double sg_eval_mu(const FitData<TI, T>& fd, const typename M::template Pre<double>& pre,
                        int i, int j, const J*) {
    double off = fd.offset ? (double)fd.offset[i * fd.k + j] * fd.gain : 0.0;
    return M::value(pre, (double)i, (double)j) + off;
}

// Objective F(t) (step 0 / 3 of the spec); +inf for MLE when any mu <= 0.
// Always evaluated in double, whatever T: accept / converge decisions compare objectives to a
// relative 1e-7, below float rounding of the model summed over the window, and must match the
// NumPy path's decisions.
template <class M, int EST, typename TI, typename T>
SG_HD double objective(const FitData<TI, T>& fd, const double* t) {
    typename M::template Pre<double> pre = M::template prepare<double>(t);
    double f = 0.0;
    bool pos = true;
    for (int i = 0; i < fd.k; ++i) {
        for (int j = 0; j < fd.k; ++j) {
            double d = (double)fd.win.at(i, j) * fd.gain;
            double off = fd.offset ? (double)fd.offset[i * fd.k + j] * fd.gain : 0.0;
            double mu = M::value(pre, (double)i, (double)j) + off;
            if (EST == EST_MLE) {
                pos = pos && (mu > 0.0);
                double safe = mu > 0.0 ? mu : 1.0;
                f += 2.0 * (mu - d);
                if (d > 0.0) f -= 2.0 * d * sg_log(safe / d);
            } else {
                double w = 1.0 / sg_max(d, 1.0);
                double r = d - mu;
                f += w * r * r;
            }
        }
    }
    if (EST == EST_MLE && !pos) return sg_inf();
    return f;
}

// Gradient g and Fisher-scoring normal matrix H (both of F/2) at t.
template <class M, int EST, typename TI, typename T>
SG_HD void grad_hess(const FitData<TI, T>& fd, const double* t, double* g, double* H) {
    constexpr int P = M::P;
    for (int a = 0; a < P; ++a) {
        g[a] = 0.0;
        for (int b = 0; b < P; ++b) H[a * P + b] = 0.0;
    }
    typename M::template Pre<T> pre = M::template prepare<T>(t);
    typename M::template Pre<double> pre_d = M::template prepare<double>(t);
    T jac[P];
    for (int i = 0; i < fd.k; ++i) {
        for (int j = 0; j < fd.k; ++j) {
            double d = (double)fd.win.at(i, j) * fd.gain;
            T vj = M::value_jac(pre, (T)i, (T)j, jac);
            // The residual weights come from the double model whatever T is: where the
            // gradient vanishes (the fitted position) is then set by double arithmetic; float
            // Jacobian rounding only perturbs the step direction.
            double mu = sizeof(T) == sizeof(double)
                            ? (double)vj + (double)offset_counts(fd, i, j)
                            : sg_eval_mu<M, EST>(fd, pre_d, i, j, jac);
            double rg, wh;
            if (EST == EST_MLE) {
                rg = 1.0 - d / mu;
                wh = 1.0 / mu;
            } else {
                double w = 1.0 / sg_max(d, 1.0);
                rg = -w * (d - mu);
                wh = w;
            }
            for (int a = 0; a < P; ++a) {
                double ja = (double)jac[a];
                g[a] += ja * rg;
                double jw = ja * wh;
                for (int b = 0; b <= a; ++b) H[a * P + b] += jw * (double)jac[b];
            }
        }
    }
    for (int a = 0; a < P; ++a)
        for (int b = a + 1; b < P; ++b) H[a * P + b] = H[b * P + a];
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

    double f = objective<M, EST>(fd, t);
    signed char status = ST_MAX_ITER;
    int n_iter = 0;
    double lam = LAMBDA0;
    bool active = sg_finite(f) && valid_params<M>(t, k);
    if (!active) status = ST_DIVERGED;

    double g[P], H[P * P], A[P * P], L[P * P], delta[P], trial[P], mg[P];
    for (int it = 0; it < max_iter && active; ++it) {
        grad_hess<M, EST>(fd, t, g, H);
        double dmax = H[0];
        for (int a = 1; a < P; ++a) dmax = sg_max(dmax, H[a * P + a]);
        for (int a = 0; a < P * P; ++a) A[a] = H[a];
        for (int a = 0; a < P; ++a) {
            double da = sg_max(H[a * P + a], DAMPING_FLOOR * dmax);
            A[a * P + a] = H[a * P + a] + lam * da;
            mg[a] = -g[a];
        }
        bool ok = chol_factor<P>(A, L);
        ok = chol_solve<P>(L, mg, delta) && ok;
        for (int a = 0; a < P; ++a) trial[a] = t[a] + (ok ? delta[a] : 0.0);
        bool valid = ok && valid_params<M>(trial, k);
        double ft = valid ? objective<M, EST>(fd, trial) : sg_inf();
        bool accept = valid && (ft < f);
        bool conv = accept && (f - ft <= tol * sg_max(ft, 1.0));
        double lam_new = accept ? sg_max(lam / LAMBDA_DOWN, LAMBDA_MIN) : lam * LAMBDA_UP;
        bool stuck = ok && !accept && lam_new > LAMBDA_MAX;
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
    double B[P * P];
    {
        for (int a = 0; a < P * P; ++a) {
            H[a] = 0.0;
            B[a] = 0.0;
        }
        typename M::template Pre<T> pre = M::template prepare<T>(t);
        T jac[P];
        for (int i = 0; i < k; ++i) {
            for (int j = 0; j < k; ++j) {
                double mu = (double)(M::value_jac(pre, (T)i, (T)j, jac) + offset_counts(fd, i, j));
                double mus = mu > 0.0 ? mu : 1e-12;
                double wa, wb = 0.0;
                if (EST == EST_MLE) {
                    wa = 1.0 / mus;
                } else {
                    double d = (double)data_counts(fd, i, j);
                    double w = 1.0 / sg_max(d, 1.0);
                    wa = w;
                    wb = w * w * mus;
                }
                for (int a = 0; a < P; ++a) {
                    double ja = (double)jac[a];
                    for (int b = 0; b <= a; ++b) {
                        H[a * P + b] += ja * wa * (double)jac[b];
                        if (EST == EST_LSQ) B[a * P + b] += ja * wb * (double)jac[b];
                    }
                }
            }
        }
        for (int a = 0; a < P; ++a)
            for (int b = a + 1; b < P; ++b) {
                H[a * P + b] = H[b * P + a];
                B[a * P + b] = B[b * P + a];
            }
    }
    bool drop[P];
    double dmax = H[0];
    for (int a = 1; a < P; ++a) dmax = sg_max(dmax, H[a * P + a]);
    for (int a = 0; a < P; ++a) drop[a] = H[a * P + a] <= FISHER_FLOOR * dmax;
    for (int a = 0; a < P; ++a)
        for (int b = 0; b < P; ++b) {
            bool keep = !drop[a] && !drop[b];
            A[a * P + b] = keep ? H[a * P + b] : ((a == b && drop[a]) ? 1.0 : 0.0);
            if (!keep) B[a * P + b] = 0.0;
        }
    // inv = A^-1 column by column (as lm.inverse_spd).
    double inv[P * P];
    bool ok = chol_factor<P>(A, L);
    for (int c = 0; c < P; ++c) {
        double e[P], x[P];
        for (int a = 0; a < P; ++a) e[a] = (a == c) ? 1.0 : 0.0;
        ok = chol_solve<P>(L, e, x) && ok;
        for (int a = 0; a < P; ++a) inv[a * P + c] = x[a];
    }
    if (EST == EST_LSQ) {
        double tmp[P * P];
        for (int a = 0; a < P; ++a)
            for (int b = 0; b < P; ++b) {
                double s = 0.0;
                for (int q = 0; q < P; ++q) s += inv[a * P + q] * B[q * P + b];
                tmp[a * P + b] = s;
            }
        for (int a = 0; a < P; ++a)
            for (int b = 0; b < P; ++b) {
                double s = 0.0;
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
            double v = keep ? inv[a * P + b] * tr[a] * tr[b] : 0.0 * tr[a] * tr[b];
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
    *chi2 = f;
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
