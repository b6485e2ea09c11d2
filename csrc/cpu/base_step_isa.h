// The per-instruction-set part of base_step.cpp: the loops of sgd_step_ and adam_step_.
// Multi-included inside each ISA namespace (foreach_isa.h), no include guard. It instantiates
// about 650 vectorised loops per instruction set (dtype x gradient source x Weighted SAM mode x
// optimizer flags), so each instruction set is compiled in a file of its own
// (base_step_{avx512,avx2,generic}.cpp), in parallel; sgd_range and adam_range are their
// entry points, declared for the host part in base_step.cpp.
#include "dtype.h"
#include "stream_store.h"

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

// Weighted SAM's terms (step_math.h), a template argument of the loops: kGradWeight mixes the
// gradient in grad into d, kSharpness applies the sharpness term after the base update. Both
// need a src (the caller checked), so the loops without one are compiled in plain mode only.
enum : int { kPlain = 0, kGradWeight = 1, kSharpness = 2 };
template <int kMode>
struct WsamMode {
  static constexpr int value = kMode;
};

// fn(WsamMode<mode>{}) for the terms whose weight is non-zero.
template <class Src, class Fn>
FF_INLINE void wsam_switch(float grad_weight, float sharpness_weight, const Fn& fn) {
  if constexpr (__is_same(Src, NoSrc)) {
    fn(WsamMode<kPlain>{});
  } else if (grad_weight != 0.0f) {
    if (sharpness_weight != 0.0f) fn(WsamMode<kGradWeight | kSharpness>{});
    else fn(WsamMode<kGradWeight>{});
  } else {
    if (sharpness_weight != 0.0f) fn(WsamMode<kSharpness>{});
    else fn(WsamMode<kPlain>{});
  }
}

// The effective gradient d of element j; g and s receive grad's and src's values when the
// sharpness term needs them (grad is only read when something uses it).
template <class S, class Src, int kWsam>
FF_INLINE float effective_grad(const typename S::T* __restrict grad, const typename Src::T* __restrict src,
                               int64_t j, float scale, float grad_weight, float* g, float* s) {
  if constexpr (__is_same(Src, NoSrc)) {
    return scale * S::load(grad[j]);
  } else {
    *s = Src::load(src[j]);
    if constexpr (kWsam != kPlain) *g = S::load(grad[j]);
    if constexpr ((kWsam & kGradWeight) != 0) return mixed_grad_math(scale, *s, grad_weight, *g);
    else return scale * *s;
  }
}

// The loops below take their pointers as __restrict parameters (GCC ignores restrict on
// locals), so they vectorise without alias checks. The boolean options of sgd_math/adam_math
// are template arguments, so they fold to constants: GCC cannot vectorise a select on a
// loop-invariant bool. maximize is applied as d * (+-1), which is exactly -d.
// With kW0 the new weights go to wout[j - j0] (w itself is not read then: write_streamed may
// hand the loop a tile to stream out).

template <class S, class Src, bool kW0, bool kMom, bool kFirst, bool kNesterov, bool kWrite, int kWsam>
inline void sgd_loop(typename S::T* w, const typename S::T* __restrict w0, typename S::T* __restrict grad,
                     const typename Src::T* __restrict src, typename S::T* __restrict mom, int64_t j0, int64_t j1,
                     const SGDParams& params, typename S::T* __restrict wout) {
  SGDParams p = params;
  const float sign = p.maximize ? -1.0f : 1.0f;
  p.maximize = false;
  p.has_momentum = kMom;
  p.first_step = kFirst;
  p.nesterov = kNesterov;
  for (int64_t j = j0; j < j1; ++j) {
    const float x = S::load(kW0 ? w0[j] : w[j]);
    float g = 0.0f, s = 0.0f;
    const float d = effective_grad<S, Src, kWsam>(grad, src, j, p.scale, p.grad_weight, &g, &s);
    if (kWrite) grad[j] = S::store(d);
    float b = (kMom && !kFirst) ? S::load(mom[j]) : 0.0f;
    float nw = sgd_math(x, d * sign, &b, p);
    if constexpr ((kWsam & kSharpness) != 0) nw = sharpness_math(nw, p.sharpness_weight, g, s);
    if (kMom) mom[j] = S::store(b);
    if (kW0) wout[j - j0] = S::store(nw);
    else w[j] = S::store(nw);
  }
}

template <class S, class Src, bool kMom, bool kFirst, bool kNesterov, int kWsam>
inline void sgd_flags(const StepPtrs<S, Src>& q, int64_t j0, int64_t j1, const SGDParams& p, bool write_grad,
                      bool stream) {
#define FF_SGD(kW0, kWrite, a, b, wout) \
  sgd_loop<S, Src, kW0, kMom, kFirst, kNesterov, kWrite, kWsam>(q.w, q.w0, q.grad, q.src, q.s1, a, b, p, wout)
  using T = typename S::T;
  if (q.w0 != nullptr) {
    write_streamed(q.w, j0, j1, stream, [&](int64_t a, int64_t b, T* out) {
      if (write_grad) FF_SGD(true, true, a, b, out);
      else FF_SGD(true, false, a, b, out);
    });
  } else {
    if (write_grad) FF_SGD(false, true, j0, j1, nullptr);
    else FF_SGD(false, false, j0, j1, nullptr);
  }
#undef FF_SGD
}

void sgd_range(void* w, const void* w0, void* grad, const void* src, void* mom, DType dt, DType src_dt,
                      int64_t j0, int64_t j1, const SGDParams& p, bool write_grad, bool stream) {
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      const StepPtrs<S, Src> q{static_cast<T*>(w), static_cast<const T*>(w0), static_cast<T*>(grad),
                               static_cast<const typename Src::T*>(src), static_cast<T*>(mom), nullptr};
      wsam_switch<Src>(p.grad_weight, p.sharpness_weight, [&](auto mode) {
        constexpr int kWsam = decltype(mode)::value;
        if (mom == nullptr) sgd_flags<S, Src, false, false, false, kWsam>(q, j0, j1, p, write_grad, stream);
        else if (p.first_step && p.nesterov) sgd_flags<S, Src, true, true, true, kWsam>(q, j0, j1, p, write_grad, stream);
        else if (p.first_step) sgd_flags<S, Src, true, true, false, kWsam>(q, j0, j1, p, write_grad, stream);
        else if (p.nesterov) sgd_flags<S, Src, true, false, true, kWsam>(q, j0, j1, p, write_grad, stream);
        else sgd_flags<S, Src, true, false, false, kWsam>(q, j0, j1, p, write_grad, stream);
      });
    });
  });
}

template <class S, class Src, bool kW0, bool kDecoupled, bool kWrite, int kWsam>
inline void adam_loop(typename S::T* w, const typename S::T* __restrict w0, typename S::T* __restrict grad,
                      const typename Src::T* __restrict src, typename S::T* __restrict exp_avg,
                      typename S::T* __restrict exp_avg_sq, int64_t j0, int64_t j1, const AdamParams& params,
                      typename S::T* __restrict wout) {
  AdamParams p = params;
  const float sign = p.maximize ? -1.0f : 1.0f;
  p.maximize = false;
  p.decoupled = kDecoupled;
  for (int64_t j = j0; j < j1; ++j) {
    const float x = S::load(kW0 ? w0[j] : w[j]);
    float g = 0.0f, s = 0.0f;
    const float d = effective_grad<S, Src, kWsam>(grad, src, j, p.scale, p.grad_weight, &g, &s);
    if (kWrite) grad[j] = S::store(d);
    float m = S::load(exp_avg[j]);
    float v = S::load(exp_avg_sq[j]);
    float nw = adam_math(x, d * sign, &m, &v, p);
    if constexpr ((kWsam & kSharpness) != 0) nw = sharpness_math(nw, p.sharpness_weight, g, s);
    exp_avg[j] = S::store(m);
    exp_avg_sq[j] = S::store(v);
    if (kW0) wout[j - j0] = S::store(nw);
    else w[j] = S::store(nw);
  }
}

template <class S, class Src, bool kDecoupled, int kWsam>
inline void adam_flags(const StepPtrs<S, Src>& q, int64_t j0, int64_t j1, const AdamParams& p, bool write_grad,
                       bool stream) {
#define FF_ADAM(kW0, kWrite, a, b, wout) \
  adam_loop<S, Src, kW0, kDecoupled, kWrite, kWsam>(q.w, q.w0, q.grad, q.src, q.s1, q.s2, a, b, p, wout)
  using T = typename S::T;
  if (q.w0 != nullptr) {
    write_streamed(q.w, j0, j1, stream, [&](int64_t a, int64_t b, T* out) {
      if (write_grad) FF_ADAM(true, true, a, b, out);
      else FF_ADAM(true, false, a, b, out);
    });
  } else {
    if (write_grad) FF_ADAM(false, true, j0, j1, nullptr);
    else FF_ADAM(false, false, j0, j1, nullptr);
  }
#undef FF_ADAM
}

void adam_range(void* w, const void* w0, void* grad, const void* src, void* exp_avg, void* exp_avg_sq,
                       DType dt, DType src_dt, int64_t j0, int64_t j1, const AdamParams& p, bool write_grad,
                       bool stream) {
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      const StepPtrs<S, Src> q{static_cast<T*>(w),        static_cast<const T*>(w0),
                               static_cast<T*>(grad),     static_cast<const typename Src::T*>(src),
                               static_cast<T*>(exp_avg), static_cast<T*>(exp_avg_sq)};
      wsam_switch<Src>(p.grad_weight, p.sharpness_weight, [&](auto mode) {
        constexpr int kWsam = decltype(mode)::value;
        if (p.decoupled) adam_flags<S, Src, true, kWsam>(q, j0, j1, p, write_grad, stream);
        else adam_flags<S, Src, false, kWsam>(q, j0, j1, p, write_grad, stream);
      });
    });
  });
}
