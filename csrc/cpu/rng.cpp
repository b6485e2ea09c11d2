// CPU kernels of the RNG ops: philox_bits_ and noise_ (docs/kernels.md, docs/rng.md).
//
// Layout of every kernel file here (as in Highway's foreach_target): the file is compiled
// once normally (FF_ISA_BODY undefined: the host part, which splits work over threads) and
// includes itself through foreach_isa.h once per instruction set (the #else part: the
// per-ISA kernels, inside namespace flatfused::cpu::{avx512,avx2,generic}).
#ifndef FF_ISA_BODY
#include "parallel.h"
#define FF_ISA_BODY "rng.cpp"
#include "foreach_isa.h"

namespace flatfused {
namespace cpu {

void philox_bits(int32_t* out, int64_t n, Rng rng, int64_t base) {
  parallel_noise(n, base, [&](int64_t j0, int64_t j1) { FF_ISA_CALL(philox_bits_range, out, j0, j1, rng, base); });
}

void noise(void* out, DType dt, int64_t n, Rng rng, int64_t base, int dist) {
  const bool stream = streams(n, element_size(dt));
  parallel_noise(n, base, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(noise_range, out, dt, j0, j1, rng, base, dist, stream);
  });
}

}  // namespace cpu
}  // namespace flatfused

#else  // per-ISA kernels
#include "dtype.h"
#include "noise_block.h"
#include "stream_store.h"

inline void philox_bits_range(int32_t* out, int64_t j0, int64_t j1, Rng rng, int64_t base) {
  alignas(64) uint32_t buf[4 * kBlockCounters];
  for (int64_t j = j0; j < j1;) {
    const int64_t i = base + j;
    const int64_t s = i & 3;
    const int64_t cnt = (j1 - j) < (4 * kBlockCounters - s) ? (j1 - j) : (4 * kBlockCounters - s);
    philox_block(rng.seed, rng.offset + static_cast<uint64_t>(i >> 2), (s + cnt + 3) >> 2, buf);
    __builtin_memcpy(out + j, buf + s, static_cast<size_t>(cnt) * sizeof(int32_t));
    j += cnt;
  }
}

// With stream, each block is converted in an L1 tile and goes out with streaming stores.
template <class S>
inline void noise_impl(typename S::T* __restrict out, int64_t j0, int64_t j1, Rng rng, int64_t base, int dist,
                       bool stream) {
  using T = typename S::T;
  alignas(64) T tile[4 * kBlockCounters];
  for_each_noise_block(j0, j1, rng, base, dist, [&](int64_t j, int64_t cnt, const float* __restrict eps) {
    T* __restrict o = stream ? tile : out + j;
    for (int64_t k = 0; k < cnt; ++k) o[k] = S::store(eps[k]);
    if (stream) copy_out(out + j, tile, cnt * static_cast<int64_t>(sizeof(T)), true);
  });
  stream_fence(stream);
}

inline void noise_range(void* out, DType dt, int64_t j0, int64_t j1, Rng rng, int64_t base, int dist, bool stream) {
  FF_DTYPE_SWITCH(dt, S, noise_impl<S>(static_cast<typename S::T*>(out), j0, j1, rng, base, dist, stream));
}
#endif
