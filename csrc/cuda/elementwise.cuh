// Launch plumbing shared by the CUDA kernels: dtype load/store, 4-element packs, the
// one-counter-per-thread grid-stride loop and its launcher. No math here: the per-element math
// lives in csrc/philox.h and csrc/step_math.h, shared with the CPU kernels.
//
// Layout. Thread k of the (grid-stride) loop owns one "quad": the four elements
// j = 4k - phase + l, l = 0..3, that are in [0, n). For the RNG ops phase = base % 4, so the quad
// is exactly the elements of Philox counter offset + base / 4 + k and element l of the quad is
// output lane l: one Philox call per thread, all four values used. The other ops pick the phase
// that aligns their pointers. A quad entirely inside [0, n) whose pointers are all aligned to the
// quad (4 elements: 16 bytes for fp32/int32, 8 bytes for fp16/bf16) moves each tensor with one
// vector load/store; the ragged first and last quads, and every quad of a launch whose pointers
// are not quad-aligned, use masked scalar accesses. All index arithmetic is int64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <atomic>

#include "../philox.h"
#include "../step_math.h"
#include "launchers.h"

// Every kernel launch is FF_LAUNCH(grid, block, stream, kernel)(args...): a plain <<<>>> launch
// here; tests/cuda_emulation defines it to run these same kernels on the host.
#ifndef FF_LAUNCH
#define FF_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace flatfused {
namespace cuda_launchers {
namespace detail {

constexpr int kThreads = 256;      // threads per block
constexpr int kBlocksPerSm = 32;   // grid cap: kBlocksPerSm * SMs blocks, grid-stride beyond
constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------------------------
// dtype conversions: fp32 arithmetic, one round-to-nearest-even per stored result.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// Four consecutive elements, moved as one vector when aligned.

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <int kBytes>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};

// Elements j0 .. j0+3 of p. vec: the quad lies in [0, n) and p + j0 is quad-aligned, so one
// vector load. Otherwise masked scalar loads; lanes outside [0, n) are zero and never stored.
template <typename T>
__device__ __forceinline__ Pack4<T> load_pack(const T* p, int64_t j0, int64_t n, bool vec) {
  Pack4<T> r;
  if (vec) {
    using Raw = typename RawVec<sizeof(Pack4<T>)>::type;
    const Raw raw = *reinterpret_cast<const Raw*>(p + j0);
    memcpy(&r, &raw, sizeof(r));
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t j = j0 + l;
      r.v[l] = (j >= 0 && j < n) ? p[j] : T{};
    }
  }
  return r;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t j0, int64_t n, bool vec,
                                           const Pack4<T>& r) {
  if (vec) {
    using Raw = typename RawVec<sizeof(Pack4<T>)>::type;
    Raw raw;
    memcpy(&raw, &r, sizeof(r));
    *reinterpret_cast<Raw*>(p + j0) = raw;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t j = j0 + l;
      if (j >= 0 && j < n) p[j] = r.v[l];
    }
  }
}

template <typename T>
__device__ __forceinline__ void load4f(const T* p, int64_t j0, int64_t n, bool vec, float (&x)[4]) {
  const Pack4<T> r = load_pack(p, j0, n, vec);
#pragma unroll
  for (int l = 0; l < 4; ++l) x[l] = to_float(r.v[l]);
}

template <typename T>
__device__ __forceinline__ void store4f(T* p, int64_t j0, int64_t n, bool vec,
                                        const float (&x)[4]) {
  Pack4<T> r;
#pragma unroll
  for (int l = 0; l < 4; ++l) r.v[l] = from_float<T>(x[l]);
  store_pack(p, j0, n, vec, r);
}

// ---------------------------------------------------------------------------------------------
// Per-thread invariants.

struct NoCtx {};

// seed and first counter of a launch, read from the device rng tensor [seed, offset].
struct RngCtx {
  uint64_t seed;
  uint64_t counter0;  // offset + base / 4: the counter of quad k is counter0 + k
};

__device__ __forceinline__ RngCtx read_rng(const int64_t* rng, int64_t base) {
  RngCtx c;
  c.seed = static_cast<uint64_t>(rng[0]);
  c.counter0 = static_cast<uint64_t>(rng[1]) + static_cast<uint64_t>(base >> 2);
  return c;
}

// ---------------------------------------------------------------------------------------------
// The kernel: one quad per thread, grid-stride. F provides
//   __device__ Ctx prepare() const;                            // once per thread
//   __device__ void operator()(const Ctx&, int64_t k, int64_t j0, int64_t n, bool vec) const;
// kVec: every pointer of the launch is quad-aligned for this phase (else all accesses scalar).

template <bool kVec, typename F>
__global__ void __launch_bounds__(kThreads)
    quad_kernel(const F f, const int64_t n, const int phase, const int64_t nquads) {
  const auto ctx = f.prepare();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nquads;
       k += stride) {
    const int64_t j0 = 4 * k - phase;
    const bool vec = kVec && j0 >= 0 && j0 + 4 <= n;
    f(ctx, k, j0, n, vec);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Whether p - phase elements is aligned to a quad of elem_size-byte elements (nullptr: yes).
inline bool quad_aligned(const void* p, size_t elem_size, int phase) {
  if (p == nullptr) return true;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) - static_cast<uintptr_t>(phase) * elem_size;
  return a % (4 * elem_size) == 0;
}

// The phase (0..3) that quad-aligns p, for the ops free to choose it (no RNG).
inline int aligning_phase(const void* p, size_t elem_size) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / elem_size) % 4);
}

// Grid cap for the current device: kBlocksPerSm blocks per SM.
inline cudaError_t max_blocks(int64_t* out) {
  static std::atomic<int> sm_count[kMaxDevices];  // 0: not queried yet
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int sms = (dev >= 0 && dev < kMaxDevices) ? sm_count[dev].load(std::memory_order_relaxed) : 0;
  if (sms <= 0) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    if (sms <= 0) sms = 1;
    if (dev >= 0 && dev < kMaxDevices) sm_count[dev].store(sms, std::memory_order_relaxed);
  }
  *out = static_cast<int64_t>(sms) * kBlocksPerSm;
  return cudaSuccess;
}

// One launch over n elements at the given phase. Launch errors are left for the caller's
// C10_CUDA_KERNEL_LAUNCH_CHECK(); the returned status covers the device queries.
template <typename F>
cudaError_t launch_quads(const F& f, int64_t n, int phase, bool vec, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t nquads = (n + phase + 3) / 4;
  int64_t cap = 0;
  const cudaError_t err = max_blocks(&cap);
  if (err != cudaSuccess) return err;
  int64_t blocks = (nquads + kThreads - 1) / kThreads;
  if (blocks > cap) blocks = cap;
  const dim3 grid(static_cast<unsigned int>(blocks));
  if (vec) {
    FF_LAUNCH(grid, kThreads, stream, quad_kernel<true, F>)(f, n, phase, nquads);
  } else {
    FF_LAUNCH(grid, kThreads, stream, quad_kernel<false, F>)(f, n, phase, nquads);
  }
  return cudaSuccess;
}

// Calls fn(T{}) with T the storage type of d.
template <typename Fn>
cudaError_t dispatch_float(DType d, Fn&& fn) {
  switch (d) {
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat16:
      return fn(__half{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(T{}, S{}): T the storage type of d, S that of src_d, which must be fp32 or d.
template <typename Fn>
cudaError_t dispatch_float_and_src(DType d, DType src_d, Fn&& fn) {
  if (src_d != d && src_d != DType::kFloat32) return cudaErrorInvalidValue;
  return dispatch_float(d, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (src_d == d) return fn(T{}, T{});
    return fn(T{}, float{});
  });
}

}  // namespace detail
}  // namespace cuda_launchers
}  // namespace flatfused
