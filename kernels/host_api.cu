// Host build of the kernel math (CI without a GPU): compiled with
//   nvcc -x cu -shared -Xcompiler -fPIC -DSTEMGPU_HOST_BUILD <unit>.cu
// where <unit>.cu defines STEMGPU_MODEL_LIST from the Python registry and includes this file,
// and loaded with ctypes by tests/host_build.py. The very same __host__ __device__ functions
// as lm_fit.cu, looped over fits on the CPU. Every model table below is derived from the
// model list and the structs themselves (nothing to edit here for a new model).
#include "common.cuh"
#include "window.cuh"
#include "lm.cuh"
#include "models.cuh"

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

// The registry's model structs, in registry order (the model id is the position): the host
// build (tests/host_build.py) defines STEMGPU_MODEL_LIST from stemgpu.atoms.models.MODELS.
#ifndef STEMGPU_MODEL_LIST
#error "define STEMGPU_MODEL_LIST (the registry's cuda_struct names, in order); see tests/host_build.py"
#endif
template <class... Ms>
struct ModelList {
    static constexpr int size = sizeof...(Ms);
};
using Models = ModelList<STEMGPU_MODEL_LIST>;

template <class M>
struct Tag {
    using type = M;
};

// Calls f(Tag<M>{}) for the model at position id; false when there is none.
template <class F, class... Ms>
bool visit(int id, F&& f, ModelList<Ms...>) {
    int i = 0;
    bool found = false;
    ((i++ == id ? (f(Tag<Ms>{}), found = true) : false), ...);
    return found;
}

}  // namespace

extern "C" {

int stemgpu_model_count() { return Models::size; }
const char* stemgpu_model_name(int id) {
    const char* out = "";
    visit(id, [&](auto tag) { out = decltype(tag)::type::NAME; }, Models{});
    return out;
}
const char* stemgpu_model_params(int id) {
    const char* out = "";
    visit(id, [&](auto tag) { out = decltype(tag)::type::PARAMS; }, Models{});
    return out;
}
int stemgpu_model_nparams(int id) {
    int out = -1;
    visit(id, [&](auto tag) { out = decltype(tag)::type::P; }, Models{});
    return out;
}
// Index layout of a model: amplitude, row, col, background, angle (-1), n_widths, width0, width1.
void stemgpu_model_layout(int id, int* out) {
    visit(id, [&](auto tag) {
        using M = typename decltype(tag)::type;
        int v[8] = {M::AMP, M::ROW, M::COL, M::BKG, M::ANGLE, M::NW, M::width(0),
                    M::NW > 1 ? M::width(1) : -1};
        for (int i = 0; i < 8; ++i) out[i] = v[i];
    }, Models{});
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
    int rc = -1;
    visit(model, [&](auto tag) {
        using M = typename decltype(tag)::type;
        if (estimator == stemgpu::EST_MLE)
            rc = dispatch_dtype<M, stemgpu::EST_MLE>(SG_ARGS);
        else if (estimator == stemgpu::EST_LSQ)
            rc = dispatch_dtype<M, stemgpu::EST_LSQ>(SG_ARGS);
    }, Models{});
#undef SG_ARGS
    return rc;
}

}  // extern "C"
