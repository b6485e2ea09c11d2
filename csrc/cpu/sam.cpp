// CPU kernels of the SAM / ASAM ops: grad_norm_sq_, sam_ascent_ (docs/kernels.md; per-element
// math in csrc/step_math.h). File layout: see rng.cpp.
#ifndef FF_ISA_BODY
#include <vector>

#include "parallel.h"
#define FF_ISA_BODY "sam.cpp"
#include "foreach_isa.h"

namespace flatfused {
namespace cpu {

// The sum is cut into chunks of a fixed size whatever the thread count, each chunk's partial
// is formed in a fixed lane order (grad_norm_sq_range), and the partials are added in chunk
// order: the result depends on n alone, so it is bit-identical run to run, thread count to
// thread count, and across the instruction sets (the same double additions, no FMA).
constexpr int64_t kNormChunk = 16384;

double grad_norm_sq(const void* grad, const void* w, DType dt, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  constexpr int64_t kGrainChunks = 2;  // 32768 elements, as parallel_elementwise
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * kNormChunk;
      const int64_t j1 = std::min<int64_t>(n, j0 + kNormChunk);
      FF_ISA_CALL(grad_norm_sq_range, grad, w, dt, j0, j1, &partial[static_cast<size_t>(c)]);
    }
  });
  double total = 0.0;
  for (const double p : partial) total += p;
  return total;
}

void sam_ascent(void* w, void* w0, void* grad, void* g0, DType dt, int64_t n, float scale, bool adaptive,
                bool zero_grad) {
  const bool stream = streams(n, element_size(dt) * (g0 != nullptr ? 4 : 3));
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(sam_ascent_range, w, w0, grad, g0, dt, j0, j1, scale, adaptive, zero_grad, stream);
  });
}

}  // namespace cpu
}  // namespace flatfused

#else  // per-ISA kernels
#include "dtype.h"
#include "stream_store.h"

// Sum of grad_norm_term over [j0, j1) in double: element j0 + 16 i + k goes to lane k, the lanes
// are then added pairwise in a fixed tree. Written as independent lanes so that the loop
// vectorises without reassociating anything (no -ffast-math).
template <class S, bool kW>
FF_INLINE double grad_norm_sq_impl(const typename S::T* __restrict grad, const typename S::T* __restrict w,
                                   int64_t j0, int64_t j1) {
  constexpr int kLanes = 16;
  double lane[kLanes];
  for (int k = 0; k < kLanes; ++k) lane[k] = 0.0;
  const auto term = [&](int64_t j) -> double {
    if constexpr (kW) return static_cast<double>(grad_norm_term(S::load(grad[j]), S::load(w[j])));
    else return static_cast<double>(grad_norm_term(S::load(grad[j])));
  };
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lane[k] += term(j + k);
  }
  for (int k = 0; j + k < j1; ++k) lane[k] += term(j + k);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) lane[k] += lane[k + width];
  }
  return lane[0];
}

inline void grad_norm_sq_range(const void* grad, const void* w, DType dt, int64_t j0, int64_t j1, double* out) {
  FF_DTYPE_SWITCH(dt, S, {
    using T = typename S::T;
    const T* g = static_cast<const T*>(grad);
    const T* pw = static_cast<const T*>(w);
    *out = pw != nullptr ? grad_norm_sq_impl<S, true>(g, pw, j0, j1) : grad_norm_sq_impl<S, false>(g, pw, j0, j1);
  });
}

// w0 = w and g0 = grad are bit copies (kCopy; otherwise the caller made them); w =
// sam_ascent_math(w, grad); then grad = 0 if asked.
template <class S, bool kAdaptive, bool kG0, bool kZero, bool kCopy>
FF_INLINE void sam_ascent_impl(typename S::T* __restrict w, typename S::T* __restrict w0,
                               typename S::T* __restrict grad, typename S::T* __restrict g0, int64_t j0, int64_t j1,
                               float scale) {
  using T = typename S::T;
  for (int64_t j = j0; j < j1; ++j) {
    const T x = w[j];
    const T g = grad[j];
    if (kCopy) w0[j] = x;
    if (kCopy && kG0) g0[j] = g;
    w[j] = S::store(sam_ascent_math(S::load(x), S::load(g), scale, kAdaptive));
    if (kZero) grad[j] = 0;
  }
}

// With stream, tile by tile: the copies go out with streaming stores first, then the tile (now
// in L1) is updated in place.
template <class S, bool kAdaptive, bool kG0, bool kZero>
inline void sam_ascent_loop(typename S::T* w, typename S::T* w0, typename S::T* grad, typename S::T* g0, int64_t j0,
                            int64_t j1, float scale, bool stream) {
  using T = typename S::T;
  if (!stream) {
    sam_ascent_impl<S, kAdaptive, kG0, kZero, true>(w, w0, grad, g0, j0, j1, scale);
    return;
  }
  constexpr int64_t kTile = stream_tile<T>();
  for (int64_t a = j0; a < j1; a += kTile) {
    const int64_t b = a + kTile < j1 ? a + kTile : j1;
    const int64_t bytes = (b - a) * static_cast<int64_t>(sizeof(T));
    copy_out(w0 + a, w + a, bytes, true);
    if (kG0) copy_out(g0 + a, grad + a, bytes, true);
    sam_ascent_impl<S, kAdaptive, kG0, kZero, false>(w, w0, grad, g0, a, b, scale);
  }
  stream_fence(true);
}

template <class S>
inline void sam_ascent_flags(typename S::T* w, typename S::T* w0, typename S::T* grad, typename S::T* g0, int64_t j0,
                             int64_t j1, float scale, bool adaptive, bool zero_grad, bool stream) {
#define FF_SAM(kAdaptive, kG0, kZero) \
  sam_ascent_loop<S, kAdaptive, kG0, kZero>(w, w0, grad, g0, j0, j1, scale, stream)
  if (adaptive) {
    if (g0 != nullptr) {
      if (zero_grad) FF_SAM(true, true, true);
      else FF_SAM(true, true, false);
    } else {
      if (zero_grad) FF_SAM(true, false, true);
      else FF_SAM(true, false, false);
    }
  } else {
    if (g0 != nullptr) {
      if (zero_grad) FF_SAM(false, true, true);
      else FF_SAM(false, true, false);
    } else {
      if (zero_grad) FF_SAM(false, false, true);
      else FF_SAM(false, false, false);
    }
  }
#undef FF_SAM
}

inline void sam_ascent_range(void* w, void* w0, void* grad, void* g0, DType dt, int64_t j0, int64_t j1,
                             float scale, bool adaptive, bool zero_grad, bool stream) {
  FF_DTYPE_SWITCH(dt, S, {
    using T = typename S::T;
    sam_ascent_flags<S>(static_cast<T*>(w), static_cast<T*>(w0), static_cast<T*>(grad), static_cast<T*>(g0), j0,
                        j1, scale, adaptive, zero_grad, stream);
  });
}
#endif
