// The SAM / ASAM kernels on CUDA (docs/kernels.md): grad_norm_sq_, sam_ascent_.
// Per-element math: csrc/step_math.h; launch plumbing: elementwise.cuh.
#include "elementwise.cuh"

namespace flatfused {
namespace cuda_launchers {
namespace {

using detail::kThreads;
using detail::Pack4;

constexpr int kWarps = kThreads / 32;

// Sum of v over the block, in a fixed order (shuffle tree in each warp, then warp 0 over the
// warps' sums): the same bits on every run. The result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Pass 1 of grad_norm_sq_: block b writes partials[b], the sum over the quads k = b * kThreads +
// t + i * gridDim.x * kThreads of its threads t. Quads start at element 0 whatever the pointers'
// alignment (vec only changes how a quad is loaded), so which element lands in which partial
// depends on n and the grid, and the grid on n alone.
template <typename T, bool kHasW>
__global__ void __launch_bounds__(kThreads)
    grad_norm_sq_partials_kernel(const T* grad, const T* w, int64_t n, bool vec_ok,
                                 double* partials) {
  const int64_t nquads = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  double acc = 0.0;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < nquads;
       k += stride) {
    const int64_t j0 = 4 * k;
    const bool vec = vec_ok && j0 + 4 <= n;
    float g[4], x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    detail::load4f(grad, j0, n, vec, g);
    if (kHasW) detail::load4f(w, j0, n, vec, x);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (j0 + l < n) {
        acc += static_cast<double>(kHasW ? grad_norm_term(g[l], x[l]) : grad_norm_term(g[l]));
      }
    }
  }
  const double sum = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// Pass 2: one block adds the partials (thread t: partials t, t + kThreads, ... in order, then
// block_sum) and out[0] += the sum rounded to fp32.
__global__ void __launch_bounds__(kThreads)
    grad_norm_sq_finish_kernel(const double* partials, int count, float* out) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  const double sum = block_sum(acc);
  if (threadIdx.x == 0) out[0] = out[0] + static_cast<float>(sum);
}

// sam_ascent_: the step length is read from the device scalar once per thread.
struct ScaleCtx {
  float scale;
};

template <typename T>
struct SamAscentOp {
  T* w;
  T* w0;
  T* grad;
  T* g0;  // optional
  const float* norm_sq;
  float rho, eps;
  bool adaptive, zero_grad;

  __device__ ScaleCtx prepare() const { return ScaleCtx{sam_scale(*norm_sq, rho, eps)}; }

  __device__ void operator()(const ScaleCtx& c, int64_t, int64_t j0, int64_t n, bool vec) const {
    const Pack4<T> x = detail::load_pack(w, j0, n, vec);
    const Pack4<T> g = detail::load_pack(grad, j0, n, vec);
    detail::store_pack(w0, j0, n, vec, x);
    if (g0 != nullptr) detail::store_pack(g0, j0, n, vec, g);
    float nw[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      nw[l] = sam_ascent_math(detail::to_float(x.v[l]), detail::to_float(g.v[l]), c.scale, adaptive);
    }
    detail::store4f(w, j0, n, vec, nw);
    if (zero_grad) {
      const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      detail::store4f(grad, j0, n, vec, zero);
    }
  }
};

}  // namespace

cudaError_t launch_grad_norm_sq(float* out, const void* grad, const void* w, DType dtype, int64_t n,
                                double* partials, cudaStream_t stream) {
  if (n < 0 || out == nullptr || partials == nullptr || (n > 0 && grad == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  const int64_t nquads = (n + 3) / 4;
  int64_t blocks = (nquads + kThreads - 1) / kThreads;
  if (blocks > kGradNormSqPartials) blocks = kGradNormSqPartials;
  return detail::dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    const T* g = static_cast<const T*>(grad);
    const T* pw = static_cast<const T*>(w);
    const bool vec_ok = detail::quad_aligned(g, sizeof(T), 0) && detail::quad_aligned(pw, sizeof(T), 0);
    const dim3 grid(static_cast<unsigned int>(blocks));
    if (pw != nullptr) {
      FF_LAUNCH(grid, kThreads, stream, grad_norm_sq_partials_kernel<T, true>)(g, pw, n, vec_ok,
                                                                             partials);
    } else {
      FF_LAUNCH(grid, kThreads, stream, grad_norm_sq_partials_kernel<T, false>)(g, pw, n, vec_ok,
                                                                              partials);
    }
    FF_LAUNCH(1, kThreads, stream, grad_norm_sq_finish_kernel)(partials, static_cast<int>(blocks), out);
    return cudaSuccess;
  });
}

cudaError_t launch_sam_ascent(void* w, void* w0, void* grad, void* g0, const float* norm_sq,
                              DType dtype, int64_t n, float rho, float eps, bool adaptive,
                              bool zero_grad, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (w == nullptr || w0 == nullptr || grad == nullptr || norm_sq == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return detail::dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    const SamAscentOp<T> op{static_cast<T*>(w), static_cast<T*>(w0), static_cast<T*>(grad),
                            static_cast<T*>(g0), norm_sq, rho, eps, adaptive, zero_grad};
    const int phase = detail::aligning_phase(w, sizeof(T));
    const bool vec = detail::quad_aligned(op.w, sizeof(T), phase) &&
                     detail::quad_aligned(op.w0, sizeof(T), phase) &&
                     detail::quad_aligned(op.grad, sizeof(T), phase) &&
                     detail::quad_aligned(op.g0, sizeof(T), phase);
    return detail::launch_quads(op, n, phase, vec, stream);
  });
}

}  // namespace cuda_launchers
}  // namespace flatfused
