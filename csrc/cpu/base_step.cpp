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

// Pointers of one step; src is null for NoSrc, w0 null when the step starts from w itself.
template <class S, class Src>
struct StepPtrs {
  typename S::T* w;
  const typename S::T* w0;
  typename S::T* grad;
  const typename Src::T* src;
  typename S::T* s1;  // momentum buffer / exp_avg
  typename S::T* s2;  // exp_avg_sq
};

// The loops below take their pointers as __restrict parameters (GCC ignores restrict on
// locals), so they vectorise without alias checks. The boolean options of sgd_math/adam_math
// are template arguments, so they fold to constants: GCC cannot vectorise a select on a
// loop-invariant bool. maximize is applied as d * (+-1), which is exactly -d.

template <class S, class Src, bool kW0, bool kMom, bool kFirst, bool kNesterov, bool kWrite>
inline void sgd_loop(typename S::T* w, const typename S::T* __restrict w0, typename S::T* __restrict grad,
                     const typename Src::T* __restrict src, typename S::T* __restrict mom, int64_t j0, int64_t j1,
                     const SGDParams& params) {
  SGDParams p = params;
  const float sign = p.maximize ? -1.0f : 1.0f;
  p.maximize = false;
  p.has_momentum = kMom;
  p.first_step = kFirst;
  p.nesterov = kNesterov;
  for (int64_t j = j0; j < j1; ++j) {
    const float x = S::load(kW0 ? w0[j] : w[j]);
    float g;
    if constexpr (__is_same(Src, NoSrc)) g = S::load(grad[j]);
    else g = Src::load(src[j]);
    const float d = p.scale * g;
    if (kWrite) grad[j] = S::store(d);
    float b = (kMom && !kFirst) ? S::load(mom[j]) : 0.0f;
    const float nw = sgd_math(x, d * sign, &b, p);
    if (kMom) mom[j] = S::store(b);
    w[j] = S::store(nw);
  }
}

template <class S, class Src, bool kMom, bool kFirst, bool kNesterov>
inline void sgd_flags(const StepPtrs<S, Src>& q, int64_t j0, int64_t j1, const SGDParams& p, bool write_grad) {
#define FF_SGD(kW0, kWrite) \
  sgd_loop<S, Src, kW0, kMom, kFirst, kNesterov, kWrite>(q.w, q.w0, q.grad, q.src, q.s1, j0, j1, p)
  if (q.w0 != nullptr) {
    if (write_grad) FF_SGD(true, true);
    else FF_SGD(true, false);
  } else {
    if (write_grad) FF_SGD(false, true);
    else FF_SGD(false, false);
  }
#undef FF_SGD
}

inline void sgd_range(void* w, const void* w0, void* grad, const void* src, void* mom, DType dt, DType src_dt,
                      int64_t j0, int64_t j1, const SGDParams& p, bool write_grad) {
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      const StepPtrs<S, Src> q{static_cast<T*>(w), static_cast<const T*>(w0), static_cast<T*>(grad),
                               static_cast<const typename Src::T*>(src), static_cast<T*>(mom), nullptr};
      if (mom == nullptr) sgd_flags<S, Src, false, false, false>(q, j0, j1, p, write_grad);
      else if (p.first_step && p.nesterov) sgd_flags<S, Src, true, true, true>(q, j0, j1, p, write_grad);
      else if (p.first_step) sgd_flags<S, Src, true, true, false>(q, j0, j1, p, write_grad);
      else if (p.nesterov) sgd_flags<S, Src, true, false, true>(q, j0, j1, p, write_grad);
      else sgd_flags<S, Src, true, false, false>(q, j0, j1, p, write_grad);
    });
  });
}

template <class S, class Src, bool kW0, bool kDecoupled, bool kWrite>
inline void adam_loop(typename S::T* w, const typename S::T* __restrict w0, typename S::T* __restrict grad,
                      const typename Src::T* __restrict src, typename S::T* __restrict exp_avg,
                      typename S::T* __restrict exp_avg_sq, int64_t j0, int64_t j1, const AdamParams& params) {
  AdamParams p = params;
  const float sign = p.maximize ? -1.0f : 1.0f;
  p.maximize = false;
  p.decoupled = kDecoupled;
  for (int64_t j = j0; j < j1; ++j) {
    const float x = S::load(kW0 ? w0[j] : w[j]);
    float g;
    if constexpr (__is_same(Src, NoSrc)) g = S::load(grad[j]);
    else g = Src::load(src[j]);
    const float d = p.scale * g;
    if (kWrite) grad[j] = S::store(d);
    float m = S::load(exp_avg[j]);
    float v = S::load(exp_avg_sq[j]);
    const float nw = adam_math(x, d * sign, &m, &v, p);
    exp_avg[j] = S::store(m);
    exp_avg_sq[j] = S::store(v);
    w[j] = S::store(nw);
  }
}

template <class S, class Src, bool kDecoupled>
inline void adam_flags(const StepPtrs<S, Src>& q, int64_t j0, int64_t j1, const AdamParams& p, bool write_grad) {
#define FF_ADAM(kW0, kWrite) \
  adam_loop<S, Src, kW0, kDecoupled, kWrite>(q.w, q.w0, q.grad, q.src, q.s1, q.s2, j0, j1, p)
  if (q.w0 != nullptr) {
    if (write_grad) FF_ADAM(true, true);
    else FF_ADAM(true, false);
  } else {
    if (write_grad) FF_ADAM(false, true);
    else FF_ADAM(false, false);
  }
#undef FF_ADAM
}

inline void adam_range(void* w, const void* w0, void* grad, const void* src, void* exp_avg, void* exp_avg_sq,
                       DType dt, DType src_dt, int64_t j0, int64_t j1, const AdamParams& p, bool write_grad) {
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      const StepPtrs<S, Src> q{static_cast<T*>(w),        static_cast<const T*>(w0),
                               static_cast<T*>(grad),     static_cast<const typename Src::T*>(src),
                               static_cast<T*>(exp_avg), static_cast<T*>(exp_avg_sq)};
      if (p.decoupled) adam_flags<S, Src, true>(q, j0, j1, p, write_grad);
      else adam_flags<S, Src, false>(q, j0, j1, p, write_grad);
    });
  });
}
#endif
