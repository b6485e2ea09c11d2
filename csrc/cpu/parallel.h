// How the CPU kernels split work across at::parallel_for threads.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace flatfused {
namespace cpu {

// Noise ops: chunks whose boundaries are multiples of 4 in logical index (base + j), so no
// Philox counter is split across threads. fn(j0, j1) gets element ranges of [0, n).
template <class F>
inline void parallel_noise(int64_t n, int64_t base, const F& fn) {
  if (n <= 0) return;
  constexpr int64_t kGrainCounters = 2048;  // 8192 elements, a few microseconds of noise each
  const int64_t first = base >> 2;
  const int64_t last = (base + n - 1) >> 2;
  at::parallel_for(0, last - first + 1, kGrainCounters, [&](int64_t c0, int64_t c1) {
    const int64_t j0 = std::max<int64_t>(0, (first + c0) * 4 - base);
    const int64_t j1 = std::min<int64_t>(n, (first + c1) * 4 - base);
    if (j0 < j1) fn(j0, j1);
  });
}

// Memory-bound ops: chunks aligned to 16 elements (a cache line of fp32).
template <class F>
inline void parallel_elementwise(int64_t n, const F& fn) {
  if (n <= 0) return;
  constexpr int64_t kLine = 16;
  constexpr int64_t kGrainLines = 32768 / kLine;
  at::parallel_for(0, (n + kLine - 1) / kLine, kGrainLines, [&](int64_t l0, int64_t l1) {
    const int64_t j0 = l0 * kLine;
    const int64_t j1 = std::min<int64_t>(n, l1 * kLine);
    if (j0 < j1) fn(j0, j1);
  });
}

// A kernel writes its write-only outputs with streaming stores (stream_store.h) when all the
// arrays it touches together span at least stream_bytes() bytes. Default: twice the 32 MiB
// last-level cache of the machine we measured, so what a kernel writes would not have stayed
// cached until the next pass anyway. (Counting the whole footprint, not one array: ResNet-18's
// 11.2M fp32 parameters are 45 MB per array; streamed, on the 2-core AVX-512 VM, its step's
// adam_step_ from w0 took 0.49 ns/element against 0.55-0.59, perturb_ saving w0 and zeroing
// grad 0.38 against 0.40-0.42.) set_stream_bytes (kernels.h) changes it: tests lower it to
// cover the streamed paths at small sizes.
inline std::atomic<int64_t>& stream_bytes() {
  static std::atomic<int64_t> bytes{int64_t{64} << 20};
  return bytes;
}

// bytes_per_element: summed over every array the kernel reads or writes.
inline bool streams(int64_t n, int64_t bytes_per_element) {
  return n > 0 && n * bytes_per_element >= stream_bytes().load(std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace flatfused
