// The fused base-optimizer steps on CUDA (docs/kernels.md): sgd_step_, adam_step_.
// x = w0 if given else w; d = scale * (src if given else grad); if write_grad: grad = d; then
// sgd_math / adam_math of csrc/step_math.h on the fp32 d (not the rounded grad).
#include "elementwise.cuh"

namespace flatfused {
namespace cuda_launchers {
namespace {

using detail::NoCtx;

// Loads the restored weight x and the effective gradient d, writing d to grad when asked.
template <typename T, typename S>
__device__ __forceinline__ void restored_and_gradient(const T* w, const T* w0, T* grad,
                                                      const S* src, float scale, bool write_grad,
                                                      int64_t j0, int64_t n, bool vec,
                                                      float (&x)[4], float (&d)[4]) {
  detail::load4f<T>(w0 != nullptr ? w0 : w, j0, n, vec, x);
  if (src != nullptr) {
    detail::load4f(src, j0, n, vec, d);
  } else {
    detail::load4f<T>(grad, j0, n, vec, d);
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) d[l] = scale * d[l];
  if (write_grad) detail::store4f(grad, j0, n, vec, d);
}

template <typename T, typename S>
struct SgdStepOp {
  T* w;
  const T* w0;    // optional
  T* grad;
  const S* src;   // optional
  T* buf;         // optional: the momentum buffer, present iff p.has_momentum
  SGDParams p;
  bool write_grad;

  __device__ NoCtx prepare() const { return NoCtx{}; }

  __device__ void operator()(const NoCtx&, int64_t, int64_t j0, int64_t n, bool vec) const {
    float x[4], d[4];
    restored_and_gradient(w, w0, grad, src, p.scale, write_grad, j0, n, vec, x, d);
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // first_step initialises the buffer to d without reading it (torch.optim.SGD).
    if (p.has_momentum && !p.first_step) detail::load4f(buf, j0, n, vec, b);
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = sgd_math(x[l], d[l], &b[l], p);
    if (p.has_momentum) detail::store4f(buf, j0, n, vec, b);
    detail::store4f(w, j0, n, vec, x);
  }
};

template <typename T, typename S>
struct AdamStepOp {
  T* w;
  const T* w0;   // optional
  T* grad;
  const S* src;  // optional
  T* exp_avg;
  T* exp_avg_sq;
  AdamParams p;
  bool write_grad;

  __device__ NoCtx prepare() const { return NoCtx{}; }

  __device__ void operator()(const NoCtx&, int64_t, int64_t j0, int64_t n, bool vec) const {
    float x[4], d[4], m[4], v[4];
    restored_and_gradient(w, w0, grad, src, p.scale, write_grad, j0, n, vec, x, d);
    detail::load4f(exp_avg, j0, n, vec, m);
    detail::load4f(exp_avg_sq, j0, n, vec, v);
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = adam_math(x[l], d[l], &m[l], &v[l], p);
    detail::store4f(exp_avg, j0, n, vec, m);
    detail::store4f(exp_avg_sq, j0, n, vec, v);
    detail::store4f(w, j0, n, vec, x);
  }
};

}  // namespace

cudaError_t launch_sgd_step(void* w, const void* w0, void* grad, const void* src,
                            void* momentum_buffer, DType dtype, DType src_dtype, int64_t n,
                            const SGDParams& p, bool write_grad, cudaStream_t stream) {
  if (n < 0 || p.has_momentum != (momentum_buffer != nullptr) ||
      (n > 0 && (w == nullptr || grad == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return detail::dispatch_float_and_src(dtype, src_dtype, [&](auto t, auto s) -> cudaError_t {
    using T = decltype(t);
    using S = decltype(s);
    SgdStepOp<T, S> op{static_cast<T*>(w),   static_cast<const T*>(w0),
                       static_cast<T*>(grad), static_cast<const S*>(src),
                       static_cast<T*>(momentum_buffer), p, write_grad};
    const int phase = detail::aligning_phase(w, sizeof(T));
    const bool vec = detail::quad_aligned(op.w, sizeof(T), phase) &&
                     detail::quad_aligned(op.w0, sizeof(T), phase) &&
                     detail::quad_aligned(op.grad, sizeof(T), phase) &&
                     detail::quad_aligned(op.src, sizeof(S), phase) &&
                     detail::quad_aligned(op.buf, sizeof(T), phase);
    return detail::launch_quads(op, n, phase, vec, stream);
  });
}

cudaError_t launch_adam_step(void* w, const void* w0, void* grad, const void* src, void* exp_avg,
                             void* exp_avg_sq, DType dtype, DType src_dtype, int64_t n,
                             const AdamParams& p, bool write_grad, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (w == nullptr || grad == nullptr || exp_avg == nullptr ||
                          exp_avg_sq == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return detail::dispatch_float_and_src(dtype, src_dtype, [&](auto t, auto s) -> cudaError_t {
    using T = decltype(t);
    using S = decltype(s);
    AdamStepOp<T, S> op{static_cast<T*>(w),          static_cast<const T*>(w0),
                        static_cast<T*>(grad),       static_cast<const S*>(src),
                        static_cast<T*>(exp_avg),    static_cast<T*>(exp_avg_sq),
                        p,                           write_grad};
    const int phase = detail::aligning_phase(w, sizeof(T));
    const bool vec = detail::quad_aligned(op.w, sizeof(T), phase) &&
                     detail::quad_aligned(op.w0, sizeof(T), phase) &&
                     detail::quad_aligned(op.grad, sizeof(T), phase) &&
                     detail::quad_aligned(op.src, sizeof(S), phase) &&
                     detail::quad_aligned(op.exp_avg, sizeof(T), phase) &&
                     detail::quad_aligned(op.exp_avg_sq, sizeof(T), phase);
    return detail::launch_quads(op, n, phase, vec, stream);
  });
}

}  // namespace cuda_launchers
}  // namespace flatfused
