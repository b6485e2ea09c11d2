// restore_ on CUDA (docs/kernels.md), the reset of the weights (and rescale of the gradient)
// that every optimizer uses; zero_ is a cudaMemsetAsync (ops_cuda.cpp). Launch plumbing:
// elementwise.cuh.
#include "elementwise.cuh"

namespace flatfused {
namespace cuda_launchers {
namespace {

using detail::NoCtx;

// w = w0 (bit copy); if grad: grad = scale * (src if src else grad).
template <typename T, typename S>
struct RestoreOp {
  T* w;
  const T* w0;
  T* grad;       // optional
  const S* src;  // optional
  float scale;

  __device__ NoCtx prepare() const { return NoCtx{}; }

  __device__ void operator()(const NoCtx&, int64_t, int64_t j0, int64_t n, bool vec) const {
    detail::store_pack(w, j0, n, vec, detail::load_pack(w0, j0, n, vec));
    if (grad != nullptr) {
      float g[4];
      if (src != nullptr) {
        detail::load4f(src, j0, n, vec, g);
      } else {
        detail::load4f<T>(grad, j0, n, vec, g);
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) g[l] = scale * g[l];
      detail::store4f(grad, j0, n, vec, g);
    }
  }
};

}  // namespace

cudaError_t launch_restore(void* w, const void* w0, void* grad, const void* src, DType dtype,
                           DType src_dtype, int64_t n, float scale, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (w == nullptr || w0 == nullptr))) return cudaErrorInvalidValue;
  return detail::dispatch_float_and_src(dtype, src_dtype, [&](auto t, auto s) -> cudaError_t {
    using T = decltype(t);
    using S = decltype(s);
    RestoreOp<T, S> op{static_cast<T*>(w), static_cast<const T*>(w0), static_cast<T*>(grad),
                       static_cast<const S*>(src), scale};
    const int phase = detail::aligning_phase(w, sizeof(T));
    const bool vec = detail::quad_aligned(op.w, sizeof(T), phase) &&
                     detail::quad_aligned(op.w0, sizeof(T), phase) &&
                     detail::quad_aligned(op.grad, sizeof(T), phase) &&
                     detail::quad_aligned(op.src, sizeof(S), phase);
    return detail::launch_quads(op, n, phase, vec, stream);
  });
}

}  // namespace cuda_launchers
}  // namespace flatfused
