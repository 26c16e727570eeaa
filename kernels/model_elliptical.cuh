// Model "elliptical" (rotated elliptical Gaussian + constant background), internal parameters
//   t = [log(amplitude*gain), row_local, col_local, log(sigma_1), log(sigma_2), angle,
//        background*gain]
// with u = cos(a)(y-r) + sin(a)(x-c), v = -sin(a)(y-r) + cos(a)(x-c):
//   mu(y, x) = A exp(-(u^2/s1^2 + v^2/s2^2)/2) + B
// Jacobian w.r.t. t (G = A exp(...)):
//   [G, G(u cos/s1^2 - v sin/s2^2), G(u sin/s1^2 + v cos/s2^2), G u^2/s1^2, G v^2/s2^2,
//    -G u v (1/s1^2 - 1/s2^2), 1]
// Must match MODELS["elliptical"] in stemgpu/atoms/models.py (checked by tests).
#pragma once
#include "common.cuh"

namespace stemgpu {

struct Elliptical {
    // Registry name and natural parameter order (stemgpu/atoms/models.py, checked by tests).
    static constexpr const char* NAME = "elliptical";
    static constexpr const char* PARAMS = "amplitude,row,col,sigma_1,sigma_2,angle,background";
    static constexpr int P = 7;
    static constexpr int AMP = 0;
    static constexpr int ROW = 1;
    static constexpr int COL = 2;
    static constexpr int BKG = 6;
    static constexpr int NW = 2;
    static constexpr int ANGLE = 5;
    SG_HD static int width(int i) { return 3 + i; }
    SG_HD static bool is_log(int i) { return i == 0 || i == 3 || i == 4; }

    template <typename T>
    struct Pre {
        T a, r, c, i1, i2, ct, st, b;
    };

    template <typename T>
    SG_HD static Pre<T> prepare(const double* t) {
        Pre<T> p;
        p.a = (T)sg_exp(t[0]);
        p.r = (T)t[1];
        p.c = (T)t[2];
        p.i1 = (T)sg_exp(-2.0 * t[3]);
        p.i2 = (T)sg_exp(-2.0 * t[4]);
        p.ct = (T)sg_cos(t[5]);
        p.st = (T)sg_sin(t[5]);
        p.b = (T)t[6];
        return p;
    }

    template <typename T>
    SG_HD static T value(const Pre<T>& p, T y, T x) {
        T dy = y - p.r, dx = x - p.c;
        T u = p.ct * dy + p.st * dx;
        T v = -p.st * dy + p.ct * dx;
        return p.a * sg_exp((T)(-0.5) * (u * u * p.i1 + v * v * p.i2)) + p.b;
    }

    template <typename T>
    SG_HD static T value_jac(const Pre<T>& p, T y, T x, T* jac) {
        T dy = y - p.r, dx = x - p.c;
        T u = p.ct * dy + p.st * dx;
        T v = -p.st * dy + p.ct * dx;
        T g = p.a * sg_exp((T)(-0.5) * (u * u * p.i1 + v * v * p.i2));
        jac[0] = g;
        jac[1] = g * (u * p.ct * p.i1 - v * p.st * p.i2);
        jac[2] = g * (u * p.st * p.i1 + v * p.ct * p.i2);
        jac[3] = g * u * u * p.i1;
        jac[4] = g * v * v * p.i2;
        jac[5] = -g * u * v * (p.i1 - p.i2);
        jac[6] = (T)1;
        return g + p.b;
    }
};

}  // namespace stemgpu
