// CPU kernels of the NSO ops: perturb_, accumulate_, restore_ (docs/kernels.md).
// File layout: see rng.cpp (host part first, per-ISA kernels in the #else part).
#ifndef FF_ISA_BODY
#include "parallel.h"
#define FF_ISA_BODY "nso.cpp"
#include "foreach_isa.h"

namespace flatfused {
namespace cpu {

void perturb(void* w, void* w0, DType dt, int64_t n, Rng rng, int64_t base, int dist, float sigma, bool save) {
  parallel_noise(n, base, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(perturb_range, w, w0, dt, j0, j1, rng, base, dist, sigma, save);
  });
}

void accumulate(float* acc, void* grad, DType dt, int64_t n, float weight, bool init, bool zero_grad) {
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(accumulate_range, acc, grad, dt, j0, j1, weight, init, zero_grad);
  });
}

void restore(void* w, const void* w0, void* grad, const void* src, DType dt, DType src_dt, int64_t n,
             float scale) {
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(restore_range, w, w0, grad, src, dt, src_dt, j0, j1, scale);
  });
}

}  // namespace cpu
}  // namespace flatfused

#else  // per-ISA kernels
#include "dtype.h"
#include "noise_block.h"

// w0 may be w itself (w += sigma * eps): each element is read before it is written.
template <class S, bool kSave>
inline void perturb_impl(typename S::T* w, typename S::T* w0, int64_t j0, int64_t j1, Rng rng,
                         int64_t base, int dist, float sigma) {
  using T = typename S::T;
  for_each_noise_block(j0, j1, rng, base, dist, [&](int64_t j, int64_t cnt, const float* __restrict eps) {
    T* pw = w + j;
    T* pw0 = w0 + j;
    if (kSave) {
      for (int64_t k = 0; k < cnt; ++k) {
        const T v = pw[k];
        pw0[k] = v;
        pw[k] = S::store(perturb_math(S::load(v), sigma, eps[k]));
      }
    } else {
      for (int64_t k = 0; k < cnt; ++k) pw[k] = S::store(perturb_math(S::load(pw0[k]), sigma, eps[k]));
    }
  });
}

inline void perturb_range(void* w, void* w0, DType dt, int64_t j0, int64_t j1, Rng rng, int64_t base,
                          int dist, float sigma, bool save) {
  FF_DTYPE_SWITCH(dt, S, {
    using T = typename S::T;
    if (save) perturb_impl<S, true>(static_cast<T*>(w), static_cast<T*>(w0), j0, j1, rng, base, dist, sigma);
    else perturb_impl<S, false>(static_cast<T*>(w), static_cast<T*>(w0), j0, j1, rng, base, dist, sigma);
  });
}

template <class S, bool kInit, bool kZero>
inline void accumulate_impl(float* __restrict acc, typename S::T* __restrict grad, int64_t j0, int64_t j1,
                            float weight) {
  for (int64_t j = j0; j < j1; ++j) {
    acc[j] = accumulate_math(kInit ? 0.0f : acc[j], S::load(grad[j]), weight, kInit);
    if (kZero) grad[j] = 0;
  }
}

inline void accumulate_range(float* acc, void* grad, DType dt, int64_t j0, int64_t j1, float weight,
                             bool init, bool zero_grad) {
  FF_DTYPE_SWITCH(dt, S, {
    using T = typename S::T;
    T* g = static_cast<T*>(grad);
    if (init) {
      if (zero_grad) accumulate_impl<S, true, true>(acc, g, j0, j1, weight);
      else accumulate_impl<S, true, false>(acc, g, j0, j1, weight);
    } else {
      if (zero_grad) accumulate_impl<S, false, true>(acc, g, j0, j1, weight);
      else accumulate_impl<S, false, false>(acc, g, j0, j1, weight);
    }
  });
}

// w = w0 (a bit copy; w0 null: it is w itself); if grad: grad = scale * (src if given else grad).
// Src is NoSrc, F32 or S.
template <class S, class Src, bool kGrad>
inline void restore_impl(typename S::T* __restrict w, const typename S::T* __restrict w0,
                         typename S::T* __restrict grad, const typename Src::T* __restrict src, int64_t j0,
                         int64_t j1, float scale) {
  if (w0 != nullptr) __builtin_memcpy(w + j0, w0 + j0, static_cast<size_t>(j1 - j0) * sizeof(typename S::T));
  if (kGrad) {
    for (int64_t j = j0; j < j1; ++j) {
      float g;
      if constexpr (__is_same(Src, NoSrc)) g = S::load(grad[j]);
      else g = Src::load(src[j]);
      grad[j] = S::store(scale * g);
    }
  }
}

inline void restore_range(void* w, const void* w0, void* grad, const void* src, DType dt, DType src_dt,
                          int64_t j0, int64_t j1, float scale) {
  if (grad == nullptr) src = nullptr;  // src is only read into grad
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      T* pw = static_cast<T*>(w);
      const T* pw0 = static_cast<const T*>(w0);
      T* g = static_cast<T*>(grad);
      const typename Src::T* ps = static_cast<const typename Src::T*>(src);
      if (grad == nullptr) restore_impl<S, Src, false>(pw, pw0, g, ps, j0, j1, scale);
      else restore_impl<S, Src, true>(pw, pw0, g, ps, j0, j1, scale);
    });
  });
}
#endif
