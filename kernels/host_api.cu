// Host build of the kernel math (CI without a GPU): compiled with
//   nvcc -x cu -shared -Xcompiler -fPIC -DSTEMGPU_HOST_BUILD host_api.cu
// and loaded with ctypes by stemgpu.kernel_sources.build_host_library(). The very same
// __host__ __device__ functions as lm_fit.cu, looped over fits on the CPU.
#include "common.cuh"
#include "window.cuh"
#include "lm.cuh"
#include "model_gaussian.cuh"
#include "model_elliptical.cuh"

namespace {

template <class M, int EST, typename TI, typename T>
void run(const void* image, int n_frames, int height, int width, const int* frame_index,
         const int* origins, const double* init, long long n_fits, int k, double gain,
         int max_iter, double tol, const void* offset, double* params, double* errors,
         double* cov, double* chi2, int* n_iter, signed char* status) {
    for (long long n = 0; n < n_fits; ++n) {
        stemgpu::fit_batch_entry<M, EST, TI, T>(
            n, static_cast<const TI*>(image), n_frames, height, width, frame_index, origins,
            init, k, gain, max_iter, tol, static_cast<const T*>(offset), params, errors, cov,
            chi2, n_iter, status);
    }
}

template <class M, int EST>
int dispatch_dtype(int image_double, int compute_double, const void* image, int n_frames,
                   int height, int width, const int* fi, const int* org, const double* init,
                   long long n, int k, double gain, int max_iter, double tol,
                   const void* offset, double* p, double* e, double* c, double* x2, int* it,
                   signed char* st) {
    if (!image_double && !compute_double)
        run<M, EST, float, float>(image, n_frames, height, width, fi, org, init, n, k, gain,
                                  max_iter, tol, offset, p, e, c, x2, it, st);
    else if (!image_double && compute_double)
        run<M, EST, float, double>(image, n_frames, height, width, fi, org, init, n, k, gain,
                                   max_iter, tol, offset, p, e, c, x2, it, st);
    else if (image_double && compute_double)
        run<M, EST, double, double>(image, n_frames, height, width, fi, org, init, n, k, gain,
                                    max_iter, tol, offset, p, e, c, x2, it, st);
    else
        return -1;
    return 0;
}

const char* const kModelNames[] = {"gaussian", "elliptical"};
const char* const kParamNames[] = {
    "amplitude,row,col,sigma,background",
    "amplitude,row,col,sigma_1,sigma_2,angle,background",
};

}  // namespace

extern "C" {

int stemgpu_model_count() { return 2; }
const char* stemgpu_model_name(int id) { return (id >= 0 && id < 2) ? kModelNames[id] : ""; }
const char* stemgpu_model_params(int id) { return (id >= 0 && id < 2) ? kParamNames[id] : ""; }
int stemgpu_model_nparams(int id) {
    return id == stemgpu::Gaussian::ID ? stemgpu::Gaussian::P
         : id == stemgpu::Elliptical::ID ? stemgpu::Elliptical::P : -1;
}
// Index layout of a model: amplitude, row, col, background, angle (-1), n_widths, width0, width1.
void stemgpu_model_layout(int id, int* out) {
    if (id == stemgpu::Gaussian::ID) {
        using M = stemgpu::Gaussian;
        int v[8] = {M::AMP, M::ROW, M::COL, M::BKG, M::ANGLE, M::NW, M::width(0), -1};
        for (int i = 0; i < 8; ++i) out[i] = v[i];
    } else {
        using M = stemgpu::Elliptical;
        int v[8] = {M::AMP, M::ROW, M::COL, M::BKG, M::ANGLE, M::NW, M::width(0), M::width(1)};
        for (int i = 0; i < 8; ++i) out[i] = v[i];
    }
}
// Status codes in the order converged, max_iter, singular, out_of_bounds, diverged, flat,
// invalid_input.
void stemgpu_status_codes(int* out) {
    const signed char s[7] = {stemgpu::ST_CONVERGED, stemgpu::ST_MAX_ITER,
                              stemgpu::ST_SINGULAR, stemgpu::ST_OUT_OF_BOUNDS,
                              stemgpu::ST_DIVERGED, stemgpu::ST_FLAT,
                              stemgpu::ST_INVALID_INPUT};
    for (int i = 0; i < 7; ++i) out[i] = s[i];
}
// LM constants in the order LAMBDA0, LAMBDA_UP, LAMBDA_DOWN, LAMBDA_MIN, LAMBDA_MAX,
// DAMPING_FLOOR, FISHER_FLOOR, SIGMA_MIN, AMPLITUDE_MIN_COUNTS.
void stemgpu_lm_constants(double* out) {
    const double c[9] = {stemgpu::LAMBDA0, stemgpu::LAMBDA_UP, stemgpu::LAMBDA_DOWN,
                         stemgpu::LAMBDA_MIN, stemgpu::LAMBDA_MAX, stemgpu::DAMPING_FLOOR,
                         stemgpu::FISHER_FLOOR, stemgpu::SIGMA_MIN,
                         stemgpu::AMPLITUDE_MIN_COUNTS};
    for (int i = 0; i < 9; ++i) out[i] = c[i];
}

// Returns 0 on success, -1 for an unsupported (model, estimator, dtype) combination.
int stemgpu_host_lm_fit(int model, int estimator, int image_double, int compute_double,
                        const void* image, int n_frames, int height, int width,
                        const int* frame_index, const int* origins, const double* init,
                        long long n_fits, int k, double gain, int max_iter, double tol,
                        const void* offset, double* params, double* errors, double* cov,
                        double* chi2, int* n_iter, signed char* status) {
#define SG_ARGS                                                                             \
    image_double, compute_double, image, n_frames, height, width, frame_index, origins,    \
        init, n_fits, k, gain, max_iter, tol, offset, params, errors, cov, chi2, n_iter,  \
        status
    if (model == stemgpu::Gaussian::ID && estimator == stemgpu::EST_MLE)
        return dispatch_dtype<stemgpu::Gaussian, stemgpu::EST_MLE>(SG_ARGS);
    if (model == stemgpu::Gaussian::ID && estimator == stemgpu::EST_LSQ)
        return dispatch_dtype<stemgpu::Gaussian, stemgpu::EST_LSQ>(SG_ARGS);
    if (model == stemgpu::Elliptical::ID && estimator == stemgpu::EST_MLE)
        return dispatch_dtype<stemgpu::Elliptical, stemgpu::EST_MLE>(SG_ARGS);
    if (model == stemgpu::Elliptical::ID && estimator == stemgpu::EST_LSQ)
        return dispatch_dtype<stemgpu::Elliptical, stemgpu::EST_LSQ>(SG_ARGS);
#undef SG_ARGS
    return -1;
}

}  // extern "C"
