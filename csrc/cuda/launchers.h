// Plain C++ entry points of the CUDA kernels (csrc/cuda/*.cu), called by csrc/cuda/ops_cuda.cpp.
//
// Raw pointers, int64 sizes, a dtype enum and a stream: no torch headers, so the .cu files
// compile in seconds. The caller validates its arguments (docs/kernels.md) and checks launch
// errors with C10_CUDA_KERNEL_LAUNCH_CHECK(); a launcher returns the status of the CUDA API
// calls it makes itself (device attribute queries) and never calls cudaGetLastError.
//
// Conventions shared by every launcher:
// - n elements, all tensors 1-D contiguous of length n, on the current device; n == 0 launches
//   nothing.
// - rng points to the device int64 pair [seed, offset]; the kernels read it on the device (no
//   host sync, CUDA-graph capturable). Element j uses Philox counter offset + (base + j) / 4,
//   lane (base + j) % 4; base >= 0.
// - Optional tensors are nullptr when absent.
// - fp32 arithmetic (csrc/step_math.h), one rounding to the storage dtype per result.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../dtype_code.h"
#include "../step_math.h"

namespace flatfused {
namespace cuda_launchers {

// Storage dtype of a floating tensor.
using ::flatfused::DType;  // ../dtype_code.h

// philox_bits_: out[j] = lane (base+j)%4 of Philox(seed, offset + (base+j)/4), bit-cast to int32.
cudaError_t launch_philox_bits(int32_t* out, int64_t n, const int64_t* rng, int64_t base,
                               cudaStream_t stream);

// noise_: out[j] = eps_{base+j} of distribution dist (csrc/philox.h).
cudaError_t launch_noise(void* out, DType dtype, int64_t n, const int64_t* rng, int64_t base,
                         int dist, cudaStream_t stream);

// perturb_: if save: w0 = w (bit copy); w = w0 + sigma * eps; if grad (may be null): grad = 0.
// w, w0 and grad share dtype.
cudaError_t launch_perturb(void* w, void* w0, void* grad, DType dtype, int64_t n,
                           const int64_t* rng, int64_t base, int dist, float sigma, bool save,
                           cudaStream_t stream);

// accumulate_perturb_: accumulate_ then perturb_ in one pass: acc (fp32) = (init ? 0 : acc) +
// weight * grad; if zero_grad: grad = 0; if save: w0 = w (bit copy); w = w0 + sigma * eps.
// w, w0 and grad share dtype.
cudaError_t launch_accumulate_perturb(void* w, void* w0, float* acc, void* grad, DType dtype,
                                      int64_t n, const int64_t* rng, int64_t base, int dist,
                                      float sigma, bool save, float weight, bool init,
                                      bool zero_grad, cudaStream_t stream);

// accumulate_: acc (fp32) = (init ? 0 : acc) + weight * grad; if zero_grad: grad = 0.
cudaError_t launch_accumulate(float* acc, void* grad, DType grad_dtype, int64_t n, float weight,
                              bool init, bool zero_grad, cudaStream_t stream);

// restore_: w = w0 (bit copy); if grad: grad = scale * (src if src else grad).
// w, w0, grad have dtype `dtype`; src has `src_dtype` (fp32, or `dtype`).
cudaError_t launch_restore(void* w, const void* w0, void* grad, const void* src, DType dtype,
                           DType src_dtype, int64_t n, float scale, cudaStream_t stream);

// sgd_step_: x = w0 if w0 else w; d = p.scale * (src if src else grad), plus p.grad_weight * grad
// when non-zero (mixed_grad_math); if write_grad: grad = d; w = sgd_math(x, d, momentum_buffer),
// then sharpness_math when p.sharpness_weight is non-zero. p.has_momentum must equal
// (momentum_buffer != nullptr); non-zero WSAM weights need src.
cudaError_t launch_sgd_step(void* w, const void* w0, void* grad, const void* src,
                            void* momentum_buffer, DType dtype, DType src_dtype, int64_t n,
                            const SGDParams& p, bool write_grad, cudaStream_t stream);

// adam_step_: as sgd_step_ (Weighted SAM terms included), with w = adam_math(x, d, exp_avg,
// exp_avg_sq) as the base update.
cudaError_t launch_adam_step(void* w, const void* w0, void* grad, const void* src, void* exp_avg,
                             void* exp_avg_sq, DType dtype, DType src_dtype, int64_t n,
                             const AdamParams& p, bool write_grad, cudaStream_t stream);

// grad_norm_sq_: out[0] (fp32, device) += sum_j grad_norm_term(grad[j], w[j]) (w null: of grad[j]),
// summed in double in an order that depends on n alone (no atomics): kGradNormSqPartials blocks
// at most write per-block partials into `partials` (device, kGradNormSqPartials doubles, scratch),
// then one block adds them in a fixed order into out. grad and w share dtype.
constexpr int64_t kGradNormSqPartials = 1024;
cudaError_t launch_grad_norm_sq(float* out, const void* grad, const void* w, DType dtype, int64_t n,
                                double* partials, cudaStream_t stream);

// sam_ascent_: scale = sam_scale(*norm_sq, rho, eps) read on the device; w0 = w, g0 = grad (bit
// copies; g0 optional); w = sam_ascent_math(w, grad, scale, adaptive); if zero_grad: grad = 0.
// w, w0, grad, g0 share dtype.
cudaError_t launch_sam_ascent(void* w, void* w0, void* grad, void* g0, const float* norm_sq,
                              DType dtype, int64_t n, float rho, float eps, bool adaptive,
                              bool zero_grad, cudaStream_t stream);

}  // namespace cuda_launchers
}  // namespace flatfused
