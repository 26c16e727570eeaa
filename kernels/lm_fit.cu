// __global__ entry point of the fused Levenberg-Marquardt fit (thin wrapper over lm.cuh).
//
// Kernel: stemgpu::lm_fit_kernel<TI, T, M, EST>
//   TI  image element type (float or double)
//   T   compute type (double: the lm.py spec; float: the float32 path of lm.cuh)
//   M   model struct (models.cuh; the registry's Model.cuda_struct)
//   EST estimator (0 = Poisson MLE, 1 = Poisson-weighted least squares)
// Parameters (device pointers, C-contiguous):
//   image        (n_frames, height, width) TI   the stack; windows are read in place
//   n_frames, height, width                      its shape
//   frame_index  (n_fits,) int32                 frame of each fit
//   origins      (n_fits, 2) int32               image (row, col) of each window's [0, 0]
//   init         (n_fits, P) double              natural initial parameters
//   n_fits, k                                    number of fits, window side (px)
//   gain, max_iter, tol                          as in stemgpu.atoms.lm.lm_fit
//   offset       (n_fits, k, k) T or nullptr     known additive model part (data units)
//   params, errors (n_fits, P) double; cov (n_fits, P, P) double; chi2 (n_fits,) double;
//   n_iter (n_fits,) int32; status (n_fits,) int8   outputs
// Launch configuration: 1-D grid, one thread per fit, blockDim.x = 128 (any multiple of 32
// works), gridDim.x = ceil(n_fits / blockDim.x); no shared memory; no synchronisation between
// threads, so every fit runs its own iterations without host round trips.
#include "common.cuh"
#include "window.cuh"
#include "lm.cuh"
#include "models.cuh"

namespace stemgpu {

template <typename TI, typename T, class M, int EST>
__global__ void lm_fit_kernel(const TI* __restrict__ image, int n_frames, int height, int width,
                              const int* __restrict__ frame_index,
                              const int* __restrict__ origins, const double* __restrict__ init,
                              long long n_fits, int k, double gain, int max_iter, double tol,
                              const T* __restrict__ offset, double* params, double* errors,
                              double* cov, double* chi2, int* n_iter, signed char* status) {
    long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= n_fits) return;
    fit_batch_entry<M, EST, TI, T>(n, image, n_frames, height, width, frame_index, origins,
                                   init, k, gain, max_iter, tol, offset, params, errors, cov,
                                   chi2, n_iter, status);
}

}  // namespace stemgpu
