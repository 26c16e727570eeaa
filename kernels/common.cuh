// stemgpu kernels: shared definitions (status codes, LM constants, portable math).
//
// Everything here is usable from three compilers: NVRTC (CuPy RawModule at run time),
// nvcc device code, and nvcc/g++ host code (the CI host build loaded with ctypes).
// The numbers mirror stemgpu/atoms/models.py and stemgpu/atoms/lm.py; tests check they agree.
#pragma once

#if defined(__CUDACC__)
#define SG_HD __host__ __device__ __forceinline__
#else
#define SG_HD inline
#endif

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

namespace stemgpu {

// Per-fit status codes (int8), identical to stemgpu.atoms.models.
constexpr signed char ST_CONVERGED = 0;
constexpr signed char ST_MAX_ITER = 1;
constexpr signed char ST_SINGULAR = 2;
constexpr signed char ST_OUT_OF_BOUNDS = 3;
constexpr signed char ST_DIVERGED = 4;
constexpr signed char ST_FLAT = 5;
constexpr signed char ST_INVALID_INPUT = 6;

// LM constants, identical to stemgpu.atoms.lm / models.
constexpr double LAMBDA0 = 1e-3;
constexpr double LAMBDA_UP = 10.0;
constexpr double LAMBDA_DOWN = 10.0;
constexpr double LAMBDA_MIN = 1e-7;
constexpr double LAMBDA_MAX = 1e10;
constexpr double DAMPING_FLOOR = 1e-9;
constexpr double FISHER_FLOOR = 1e-12;
constexpr double SIGMA_MIN = 0.25;
constexpr double AMPLITUDE_MIN_COUNTS = 1e-3;

// Estimators (template argument EST of the LM driver).
constexpr int EST_MLE = 0;
constexpr int EST_LSQ = 1;

// Precision-explicit math: float arguments use the single-precision functions.
SG_HD float sg_exp(float x) { return expf(x); }
SG_HD double sg_exp(double x) { return exp(x); }
SG_HD float sg_log(float x) { return logf(x); }
SG_HD double sg_log(double x) { return log(x); }
SG_HD float sg_cos(float x) { return cosf(x); }
SG_HD double sg_cos(double x) { return cos(x); }
SG_HD float sg_sin(float x) { return sinf(x); }
SG_HD double sg_sin(double x) { return sin(x); }
SG_HD float sg_log1p(float x) { return log1pf(x); }
SG_HD double sg_log1p(double x) { return log1p(x); }
SG_HD float sg_sqrt(float x) { return sqrtf(x); }
SG_HD double sg_sqrt(double x) { return sqrt(x); }
SG_HD float sg_abs(float x) { return fabsf(x); }
SG_HD double sg_abs(double x) { return fabs(x); }
// x - x is 0 for finite x and NaN for +-inf / NaN (no fast-math anywhere, so this holds).
SG_HD bool sg_finite(double x) { return x - x == 0.0; }
SG_HD bool sg_finite(float x) { return x - x == 0.0f; }
SG_HD double sg_max(double a, double b) { return a > b ? a : b; }
SG_HD float sg_max(float a, float b) { return a > b ? a : b; }
SG_HD double sg_inf() {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(0x7ff0000000000000LL);
#else
    return HUGE_VAL;
#endif
}
SG_HD float sg_inff() {
#if defined(__CUDA_ARCH__)
    return __int_as_float(0x7f800000);
#else
    return HUGE_VALF;
#endif
}
// +inf in the type of the argument's overload (the float path never touches double).
SG_HD double sg_inf_like(double) { return sg_inf(); }
SG_HD float sg_inf_like(float) { return sg_inff(); }

// Float32 path (compute type float): the convergence test of lm_fit_one compares the change
// of F with max(max(tol, TOL_F32) * max(F', 1), NOISE_F32 * EPS_F32 * sum|mu - d|): the
// relative tolerance cannot go below float resolution, and the per-pixel rounding of the
// deviance terms (~eps32 |mu - d| each) grows with the counts, so the floor follows them.
constexpr float EPS_F32 = 1.1920929e-7f;
constexpr float TOL_F32 = 2.0f * EPS_F32;
constexpr float NOISE_F32 = 1.0f;

// Sums over pixels. Double: a plain sum (the lm.py spec, bit for bit). Float: Neumaier's
// compensated sum, so a float32 objective / gradient / normal matrix carries only the rounding
// of its terms (not of ~k^2 additions): the gradient vanishes at the fit, where its terms
// cancel, and objective differences of 1e-6 relative decide acceptance.
template <typename S>
struct Sum;

template <>
struct Sum<double> {
    double s = 0.0;
    SG_HD void add(double x) { s += x; }
    SG_HD double value() const { return s; }
};

template <>
struct Sum<float> {
    float s = 0.0f, c = 0.0f;
    SG_HD void add(float x) {
        float t = s + x;
        c += sg_abs(s) >= sg_abs(x) ? (s - t) + x : (x - t) + s;
        s = t;
    }
    SG_HD float value() const { return s + c; }
};

}  // namespace stemgpu
