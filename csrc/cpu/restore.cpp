// CPU kernels of the ops that reset weights and gradients, which every optimizer uses: zero_
// and restore_ (docs/kernels.md).
// File layout: see rng.cpp (host part first, per-ISA kernels in the #else part).
#ifndef FF_ISA_BODY
#include <cstring>

#include "parallel.h"
#define FF_ISA_BODY "restore.cpp"
#include "foreach_isa.h"

namespace flatfused {
namespace cpu {

void zero(void* grad, DType dt, int64_t n) {
  const int64_t size = element_size(dt);
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    std::memset(static_cast<char*>(grad) + j0 * size, 0, static_cast<size_t>((j1 - j0) * size));
  });
}

void restore(void* w, const void* w0, void* grad, const void* src, DType dt, DType src_dt, int64_t n,
             float scale) {
  // src is read only where grad is written
  const int64_t src_bytes = grad != nullptr ? operand_bytes(src, src_dt) : 0;
  const bool stream = w0 != nullptr && streams(n, element_size(dt) * (grad != nullptr ? 3 : 2) + src_bytes);
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(restore_range, w, w0, grad, src, dt, src_dt, j0, j1, scale, stream);
  });
}

}  // namespace cpu
}  // namespace flatfused

#else  // per-ISA kernels
#include "dtype.h"
#include "stream_store.h"

// w = w0 (a bit copy, streamed with stream; w0 null: it is w itself); if grad: grad = scale *
// (src if given else grad). Src is NoSrc, F32 or S.
template <class S, class Src, bool kGrad>
inline void restore_impl(typename S::T* __restrict w, const typename S::T* __restrict w0,
                         typename S::T* __restrict grad, const typename Src::T* __restrict src, int64_t j0,
                         int64_t j1, float scale, bool stream) {
  if (w0 != nullptr) {
    copy_out(w + j0, w0 + j0, (j1 - j0) * static_cast<int64_t>(sizeof(typename S::T)), stream);
    stream_fence(stream);
  }
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
                          int64_t j0, int64_t j1, float scale, bool stream) {
  if (grad == nullptr) src = nullptr;  // src is only read into grad
  FF_DTYPE_SWITCH(dt, S, {
    FF_SRC_SWITCH(src, src_dt, S, Src, {
      using T = typename S::T;
      T* pw = static_cast<T*>(w);
      const T* pw0 = static_cast<const T*>(w0);
      T* g = static_cast<T*>(grad);
      const typename Src::T* ps = static_cast<const typename Src::T*>(src);
      if (grad == nullptr) restore_impl<S, Src, false>(pw, pw0, g, ps, j0, j1, scale, stream);
      else restore_impl<S, Src, true>(pw, pw0, g, ps, j0, j1, scale, stream);
    });
  });
}
#endif
