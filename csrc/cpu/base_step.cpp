// CPU kernels of the fused restore + base optimizer steps: sgd_step_, adam_step_
// (docs/kernels.md; per-element math in csrc/step_math.h). File layout: see rng.cpp.
#ifndef FF_ISA_BODY
#include "parallel.h"
#define FF_ISA_BODY "base_step.cpp"
#include "foreach_isa.h"

namespace flatfused {
namespace cpu {

void sgd_step(void* w, const void* w0, void* grad, const void* src, void* momentum_buffer, DType dt, DType src_dt,
              int64_t n, const SGDParams& p, bool write_grad) {
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(sgd_range, w, w0, grad, src, momentum_buffer, dt, src_dt, j0, j1, p, write_grad);
  });
}

void adam_step(void* w, const void* w0, void* grad, const void* src, void* exp_avg, void* exp_avg_sq, DType dt,
               DType src_dt, int64_t n, const AdamParams& p, bool write_grad) {
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(adam_range, w, w0, grad, src, exp_avg, exp_avg_sq, dt, src_dt, j0, j1, p, write_grad);
  });
}

}  // namespace cpu
}  // namespace flatfused

#else  // per-ISA kernels
#include "dtype.h"

// Pointers of one step. x_in is w0 when given, else w itself (read before w is written,
// element by element); src is null for NoSrc.
template <class S, class Src>
struct StepPtrs {
  typename S::T* w;
  const typename S::T* x_in;
  typename S::T* grad;
  const typename Src::T* src;
  typename S::T* s1;  // momentum buffer / exp_avg
  typename S::T* s2;  // exp_avg_sq
};

template <class S, class Src, bool kMom, bool kFirst, bool kWrite>
inline void sgd_impl(StepPtrs<S, Src> q, int64_t j0, int64_t j1, const SGDParams& params) {
  using T = typename S::T;
  SGDParams p = params;
  p.has_momentum = kMom;
  p.first_step = kFirst;
  T* w = q.w;
  const T* x_in = q.x_in;
  T* __restrict grad = q.grad;
  T* __restrict mom = q.s1;
  const typename Src::T* __restrict src = q.src;
  for (int64_t j = j0; j < j1; ++j) {
    const float x = S::load(x_in[j]);
    float g;
    if constexpr (__is_same(Src, NoSrc)) g = S::load(grad[j]);
    else g = Src::load(src[j]);
    const float d = p.scale * g;
    if (kWrite) grad[j] = S::store(d);
    float b = (kMom && !kFirst) ? S::load(mom[j]) : 0.0f;
    const float nw = sgd_math(x, d, &b, p);
    if (kMom) mom[j] = S::store(b);
    w[j] = S::store(nw);
  }
}

template <class S, class Src, bool kMom, bool kFirst>
inline void sgd_write(StepPtrs<S, Src> q, int64_t j0, int64_t j1, const SGDParams& p, bool write_grad) {
  if (write_grad) sgd_impl<S, Src, kMom, kFirst, true>(q, j0, j1, p);
  else sgd_impl<S, Src, kMom, kFirst, false>(q, j0, j1, p);
}

inline void sgd_range(void* w, const void* w0, void* grad, const void* src, void* mom, DType dt, DType src_dt,
                      int64_t j0, int64_t j1, const SGDParams& p, bool write_grad) {
  const void* x_in = w0 != nullptr ? w0 : w;
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      const StepPtrs<S, Src> q{static_cast<T*>(w), static_cast<const T*>(x_in), static_cast<T*>(grad),
                               static_cast<const typename Src::T*>(src), static_cast<T*>(mom), nullptr};
      if (mom == nullptr) sgd_write<S, Src, false, false>(q, j0, j1, p, write_grad);
      else if (p.first_step) sgd_write<S, Src, true, true>(q, j0, j1, p, write_grad);
      else sgd_write<S, Src, true, false>(q, j0, j1, p, write_grad);
    });
  });
}

template <class S, class Src, bool kWrite>
inline void adam_impl(StepPtrs<S, Src> q, int64_t j0, int64_t j1, const AdamParams& params) {
  using T = typename S::T;
  const AdamParams p = params;
  T* w = q.w;
  const T* x_in = q.x_in;
  T* __restrict grad = q.grad;
  T* __restrict exp_avg = q.s1;
  T* __restrict exp_avg_sq = q.s2;
  const typename Src::T* __restrict src = q.src;
  for (int64_t j = j0; j < j1; ++j) {
    const float x = S::load(x_in[j]);
    float g;
    if constexpr (__is_same(Src, NoSrc)) g = S::load(grad[j]);
    else g = Src::load(src[j]);
    const float d = p.scale * g;
    if (kWrite) grad[j] = S::store(d);
    float m = S::load(exp_avg[j]);
    float v = S::load(exp_avg_sq[j]);
    const float nw = adam_math(x, d, &m, &v, p);
    exp_avg[j] = S::store(m);
    exp_avg_sq[j] = S::store(v);
    w[j] = S::store(nw);
  }
}

inline void adam_range(void* w, const void* w0, void* grad, const void* src, void* exp_avg, void* exp_avg_sq,
                       DType dt, DType src_dt, int64_t j0, int64_t j1, const AdamParams& p, bool write_grad) {
  const void* x_in = w0 != nullptr ? w0 : w;
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      const StepPtrs<S, Src> q{static_cast<T*>(w),        static_cast<const T*>(x_in),
                               static_cast<T*>(grad),     static_cast<const typename Src::T*>(src),
                               static_cast<T*>(exp_avg), static_cast<T*>(exp_avg_sq)};
      if (write_grad) adam_impl<S, Src, true>(q, j0, j1, p);
      else adam_impl<S, Src, false>(q, j0, j1, p);
    });
  });
}
#endif
