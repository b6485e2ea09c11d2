// CPU kernels of the NSO ops: perturb_, accumulate_, accumulate_perturb_ (docs/kernels.md).
// File layout: see rng.cpp (host part first, per-ISA kernels in the #else part).
#ifndef FF_ISA_BODY
#include "parallel.h"
#define FF_ISA_BODY "nso.cpp"
#include "foreach_isa.h"

namespace flatfused {
namespace cpu {

void perturb(void* w, void* w0, void* grad, DType dt, int64_t n, Rng rng, int64_t base, int dist, float sigma,
             bool save) {
  const bool stream = save && streams(n, element_size(dt) * (grad != nullptr ? 3 : 2));
  parallel_noise(n, base, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(perturb_range, w, w0, grad, dt, j0, j1, rng, base, dist, sigma, save, stream);
  });
}

void accumulate_perturb(void* w, void* w0, float* acc, void* grad, DType dt, int64_t n, Rng rng, int64_t base,
                        int dist, float sigma, bool save, float weight, bool init, bool zero_grad) {
  parallel_noise(n, base, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(accumulate_perturb_range, w, w0, acc, grad, dt, j0, j1, rng, base, dist, sigma, save, weight, init,
                zero_grad);
  });
}

void accumulate(float* acc, void* grad, DType dt, int64_t n, float weight, bool init, bool zero_grad) {
  const bool stream = init && streams(n, element_size(DType::kFloat32) + element_size(dt));
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(accumulate_range, acc, grad, dt, j0, j1, weight, init, zero_grad, stream);
  });
}

}  // namespace cpu
}  // namespace flatfused

#else  // per-ISA kernels
#include "dtype.h"
#include "noise_block.h"
#include "stream_store.h"

// acc points at the accumulator's element j0 (or at a tile standing for it: write_streamed).
template <class S, bool kInit, bool kZero>
FF_INLINE void accumulate_impl(float* __restrict acc, typename S::T* __restrict grad, int64_t j0, int64_t j1,
                               float weight) {
  for (int64_t j = j0; j < j1; ++j) {
    acc[j - j0] = accumulate_math(kInit ? 0.0f : acc[j - j0], S::load(grad[j]), weight, kInit);
    if (kZero) grad[j] = 0;
  }
}

template <class T>
FF_INLINE void prefetch_lines(const T* p, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(p + j, 1, 3);
}

// What perturb_impl does to the elements [j0, j1) of a noise block besides perturbing them:
// nothing (perturb_), zero grad (perturb_ with grad), or accumulate_ of acc/grad
// (accumulate_perturb_).
//
// kStrip: elements per noise block (a multiple of 4, strips end at logical multiples of it).
// perturb_ alone takes whole blocks (noise_block.h): it is compute-bound. With more memory
// traffic, strips of 128 (32 counters: one AVX-512 group of philox_groups, two AVX2 ones) with
// the lines of every array prefetched kPrefetch elements ahead let the traffic overlap with the
// Philox arithmetic instead of each block's loads waiting on DRAM after its noise was made:
// - accumulate_perturb_ moves 3x the bytes: in blocks it was slower than accumulate_ and
//   perturb_ one after the other (16M fp32, AVX-512, 1 thread: 1.1-1.3 ns/elem against 0.77;
//   in strips about 0.7);
// - perturb_ saving w0 and zeroing grad (step(closure)'s first pass with lam == 0): 16M fp32,
//   2 threads, medians of alternating runs: 6.7-8.3 ms in blocks, 6.4-6.9 in strips.
//   perturb_ saving w0 alone did not gain from strips (6.1-6.4 ms against 5.5-6.6 in blocks).
struct NoAccumulate {
  static constexpr int64_t kStrip = 4 * kBlockCounters;
  FF_INLINE void operator()(int64_t, int64_t) const {}
};

template <class T>
struct ZeroGrad {
  static constexpr int64_t kStrip = 128;
  static constexpr int64_t kPrefetch = 512;
  T* grad;
  bool stream;  // zero with streaming stores (the caller fences)
  FF_INLINE void operator()(int64_t j0, int64_t j1) const {
    zero_out(grad + j0, (j1 - j0) * static_cast<int64_t>(sizeof(T)), stream);
  }
  FF_INLINE void prefetch(int64_t j0, int64_t j1) const {
    if (!stream) prefetch_lines(grad, j0, j1);  // a streamed grad is never read
  }
};

template <class S, bool kInit, bool kZero>
struct Accumulate {
  static constexpr int64_t kStrip = 128;
  static constexpr int64_t kPrefetch = 512;
  float* acc;
  typename S::T* grad;
  float weight;
  FF_INLINE void operator()(int64_t j0, int64_t j1) const { into(j0, j1, acc + j0); }
  // The same, writing the accumulator's elements j0.. to out[0..).
  FF_INLINE void into(int64_t j0, int64_t j1, float* out) const {
    accumulate_impl<S, kInit, kZero>(out, grad, j0, j1, weight);
  }
  FF_INLINE void prefetch(int64_t j0, int64_t j1) const {
    prefetch_lines(acc, j0, j1);
    prefetch_lines(grad, j0, j1);
  }
};

// w0 may be w itself (w += sigma * eps): each element is read before it is written.
// Acc: NoAccumulate or Accumulate<S, ...> (acc and grad share no memory with w, w0).
// stream (with kSave): w0 is written with streaming stores; the caller fences.
template <class S, bool kSave, class Acc>
FF_INLINE void perturb_impl(typename S::T* w, typename S::T* w0, int64_t j0, int64_t j1, Rng rng, int64_t base,
                            int dist, float sigma, bool stream, const Acc& accumulate) {
  using T = typename S::T;
  static_assert(Acc::kStrip % 4 == 0 && Acc::kStrip <= 4 * kBlockCounters, "strips hold whole counters");
  const auto block = [&](int64_t j, int64_t cnt, const float* __restrict eps) {
    accumulate(j, j + cnt);
    T* pw = w + j;
    T* pw0 = w0 + j;
    if (kSave && stream) {
      copy_out(pw0, pw, cnt * static_cast<int64_t>(sizeof(T)), true);
      for (int64_t k = 0; k < cnt; ++k) pw[k] = S::store(perturb_math(S::load(pw[k]), sigma, eps[k]));
    } else if (kSave) {
      for (int64_t k = 0; k < cnt; ++k) {
        const T v = pw[k];
        pw0[k] = v;
        pw[k] = S::store(perturb_math(S::load(v), sigma, eps[k]));
      }
    } else {
      for (int64_t k = 0; k < cnt; ++k) pw[k] = S::store(perturb_math(S::load(pw0[k]), sigma, eps[k]));
    }
  };
  if constexpr (Acc::kStrip == 4 * kBlockCounters) {
    for_each_noise_block(j0, j1, rng, base, dist, block);
  } else {
    for (int64_t a = j0; a < j1;) {  // strips end at logical multiples of kStrip
      const int64_t end = ((base + a) / Acc::kStrip + 1) * Acc::kStrip - base;
      const int64_t b = end < j1 ? end : j1;
      const int64_t p0 = a + Acc::kPrefetch < j1 ? a + Acc::kPrefetch : j1;
      const int64_t p1 = b + Acc::kPrefetch < j1 ? b + Acc::kPrefetch : j1;
      accumulate.prefetch(p0, p1);
      prefetch_lines(w, p0, p1);
      if (!(kSave && stream)) prefetch_lines(w0, p0, p1);  // a streamed w0 is never read
      for_each_noise_block(a, b, rng, base, dist, block);
      a = b;
    }
  }
}

template <class S, class Acc>
inline void perturb_save_switch(void* w, void* w0, int64_t j0, int64_t j1, Rng rng, int64_t base, int dist,
                                float sigma, bool save, bool stream, const Acc& accumulate) {
  using T = typename S::T;
  T* pw = static_cast<T*>(w);
  T* pw0 = static_cast<T*>(w0);
  if (save) perturb_impl<S, true>(pw, pw0, j0, j1, rng, base, dist, sigma, stream, accumulate);
  else perturb_impl<S, false>(pw, pw0, j0, j1, rng, base, dist, sigma, false, accumulate);
}

inline void perturb_range(void* w, void* w0, void* grad, DType dt, int64_t j0, int64_t j1, Rng rng, int64_t base,
                          int dist, float sigma, bool save, bool stream) {
  FF_DTYPE_SWITCH(dt, S, {
    using T = typename S::T;
    if (grad != nullptr) {
      perturb_save_switch<S>(w, w0, j0, j1, rng, base, dist, sigma, save, stream, ZeroGrad<T>{static_cast<T*>(grad), stream});
    } else {
      perturb_save_switch<S>(w, w0, j0, j1, rng, base, dist, sigma, save, stream, NoAccumulate{});
    }
  });
  stream_fence(stream);
}

// fn(Accumulate<S, init, zero_grad>{acc, grad, weight}) with the flags as template arguments.
template <class S, class Fn>
FF_INLINE void accumulate_switch(float* acc, void* grad, float weight, bool init, bool zero_grad, const Fn& fn) {
  using T = typename S::T;
  T* g = static_cast<T*>(grad);
  if (init) {
    if (zero_grad) fn(Accumulate<S, true, true>{acc, g, weight});
    else fn(Accumulate<S, true, false>{acc, g, weight});
  } else {
    if (zero_grad) fn(Accumulate<S, false, true>{acc, g, weight});
    else fn(Accumulate<S, false, false>{acc, g, weight});
  }
}

// stream (init only: acc is then write-only): acc is written with streaming stores.
inline void accumulate_range(float* acc, void* grad, DType dt, int64_t j0, int64_t j1, float weight,
                             bool init, bool zero_grad, bool stream) {
  FF_DTYPE_SWITCH(dt, S, {
    accumulate_switch<S>(acc, grad, weight, init, zero_grad, [&](const auto& accumulate) {
      write_streamed(acc, j0, j1, stream, [&](int64_t a, int64_t b, float* out) { accumulate.into(a, b, out); });
    });
  });
}

// accumulate_ then perturb_, per noise block: acc, grad, w0 and w are each streamed once.
inline void accumulate_perturb_range(void* w, void* w0, float* acc, void* grad, DType dt, int64_t j0, int64_t j1,
                                     Rng rng, int64_t base, int dist, float sigma, bool save, float weight,
                                     bool init, bool zero_grad) {
  FF_DTYPE_SWITCH(dt, S, {
    accumulate_switch<S>(acc, grad, weight, init, zero_grad, [&](const auto& accumulate) {
      perturb_save_switch<S>(w, w0, j0, j1, rng, base, dist, sigma, save, false, accumulate);
    });
  });
}

#endif
