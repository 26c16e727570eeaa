// Model "gaussian" (isotropic Gaussian + constant background), internal parameters
//   t = [log(amplitude*gain), row_local, col_local, log(sigma), background*gain]
//   mu(y, x) = A exp(-((y-r)^2 + (x-c)^2) / (2 s^2)) + B
// Jacobian w.r.t. t, with q = ((y-r)^2 + (x-c)^2)/s^2 and G = A exp(-q/2):
//   [G, G (y-r)/s^2, G (x-c)/s^2, G q, 1]
// Must match MODELS["gaussian"] in stemgpu/atoms/models.py (checked by tests).
#pragma once
#include "common.cuh"

namespace stemgpu {

struct Gaussian {
    // Registry name and natural parameter order (stemgpu/atoms/models.py, checked by tests).
    static constexpr const char* NAME = "gaussian";
    static constexpr const char* PARAMS = "amplitude,row,col,sigma,background";
    static constexpr int P = 5;
    static constexpr int AMP = 0;
    static constexpr int ROW = 1;
    static constexpr int COL = 2;
    static constexpr int BKG = 4;
    static constexpr int NW = 1;  // number of widths
    static constexpr int ANGLE = -1;
    SG_HD static int width(int) { return 3; }
    SG_HD static bool is_log(int i) { return i == 0 || i == 3; }

    // Per-fit quantities computed once per parameter vector, not per pixel.
    template <typename T>
    struct Pre {
        T a, r, c, is2, b;
    };

    template <typename T>
    SG_HD static Pre<T> prepare(const double* t) {
        Pre<T> p;
        p.a = (T)sg_exp(t[0]);
        p.r = (T)t[1];
        p.c = (T)t[2];
        p.is2 = (T)sg_exp(-2.0 * t[3]);
        p.b = (T)t[4];
        return p;
    }

    template <typename T>
    SG_HD static T value(const Pre<T>& p, T y, T x) {
        T dy = y - p.r, dx = x - p.c;
        return p.a * sg_exp((T)(-0.5) * (dy * dy + dx * dx) * p.is2) + p.b;
    }

    template <typename T>
    SG_HD static T value_jac(const Pre<T>& p, T y, T x, T* jac) {
        T dy = y - p.r, dx = x - p.c;
        T q = (dy * dy + dx * dx) * p.is2;
        T g = p.a * sg_exp((T)(-0.5) * q);
        jac[0] = g;
        jac[1] = g * dy * p.is2;
        jac[2] = g * dx * p.is2;
        jac[3] = g * q;
        jac[4] = (T)1;
        return g + p.b;
    }
};

}  // namespace stemgpu
