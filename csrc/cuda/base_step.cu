// The fused base-optimizer steps on CUDA (docs/kernels.md): sgd_step_, adam_step_.
// x = w0 if given else w; d = scale * (src if given else grad) (+ grad_weight * grad with a src);
// if write_grad: grad = d; then sgd_math / adam_math of csrc/step_math.h on the fp32 d (not the
// rounded grad), and Weighted SAM's sharpness term.
#include "elementwise.cuh"

namespace flatfused {
namespace cuda_launchers {
namespace {

using detail::NoCtx;

// Loads the restored weight x and the effective gradient d, writing d to grad when asked. With a
// src, s receives src and, when a Weighted SAM term needs it, g receives grad (else both stay 0).
// The weights are uniform over the launch, so the branches on them do not diverge.
template <typename T, typename S>
__device__ __forceinline__ void restored_and_gradient(const T* w, const T* w0, T* grad,
                                                      const S* src, float scale, float grad_weight,
                                                      float sharpness_weight, bool write_grad,
                                                      int64_t j0, int64_t n, bool vec,
                                                      float (&x)[4], float (&d)[4], float (&g)[4],
                                                      float (&s)[4]) {
  detail::load4f<T>(w0 != nullptr ? w0 : w, j0, n, vec, x);
#pragma unroll
  for (int l = 0; l < 4; ++l) g[l] = s[l] = 0.0f;
  if (src != nullptr) {
    detail::load4f(src, j0, n, vec, s);
    if (grad_weight != 0.0f || sharpness_weight != 0.0f) detail::load4f<T>(grad, j0, n, vec, g);
    if (grad_weight != 0.0f) {
#pragma unroll
      for (int l = 0; l < 4; ++l) d[l] = mixed_grad_math(scale, s[l], grad_weight, g[l]);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) d[l] = scale * s[l];
    }
  } else {
    detail::load4f<T>(grad, j0, n, vec, d);
#pragma unroll
    for (int l = 0; l < 4; ++l) d[l] = scale * d[l];
  }
  if (write_grad) detail::store4f(grad, j0, n, vec, d);
}

// Weighted SAM's decoupled term on the updated weights (sharpness_weight non-zero needs a src).
__device__ __forceinline__ void apply_sharpness(float sharpness_weight, const float (&g)[4],
                                                const float (&s)[4], float (&x)[4]) {
  if (sharpness_weight != 0.0f) {
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = sharpness_math(x[l], sharpness_weight, g[l], s[l]);
  }
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
    float x[4], d[4], g[4], s[4];
    restored_and_gradient(w, w0, grad, src, p.scale, p.grad_weight, p.sharpness_weight, write_grad,
                          j0, n, vec, x, d, g, s);
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // first_step initialises the buffer to d without reading it (torch.optim.SGD).
    if (p.has_momentum && !p.first_step) detail::load4f(buf, j0, n, vec, b);
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = sgd_math(x[l], d[l], &b[l], p);
    apply_sharpness(p.sharpness_weight, g, s, x);
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
    float x[4], d[4], g[4], s[4], m[4], v[4];
    restored_and_gradient(w, w0, grad, src, p.scale, p.grad_weight, p.sharpness_weight, write_grad,
                          j0, n, vec, x, d, g, s);
    detail::load4f(exp_avg, j0, n, vec, m);
    detail::load4f(exp_avg_sq, j0, n, vec, v);
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = adam_math(x[l], d[l], &m[l], &v[l], p);
    apply_sharpness(p.sharpness_weight, g, s, x);
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
      (n > 0 && (w == nullptr || grad == nullptr)) ||
      (src == nullptr && (p.grad_weight != 0.0f || p.sharpness_weight != 0.0f))) {
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
                          exp_avg_sq == nullptr)) ||
      (src == nullptr && (p.grad_weight != 0.0f || p.sharpness_weight != 0.0f))) {
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
