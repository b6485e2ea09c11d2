// philox_bits_ and noise_ on CUDA (docs/kernels.md): the RNG spec of csrc/philox.h, one Philox
// counter (four elements) per thread.
#include "elementwise.cuh"

namespace flatfused {
namespace cuda_launchers {
namespace {

using detail::Pack4;
using detail::RngCtx;

struct PhiloxBitsOp {
  int32_t* out;
  const int64_t* rng;
  int64_t base;

  __device__ RngCtx prepare() const { return detail::read_rng(rng, base); }

  __device__ void operator()(const RngCtx& c, int64_t k, int64_t j0, int64_t n, bool vec) const {
    const Philox4 b = philox4x32_10(c.seed, c.counter0 + static_cast<uint64_t>(k));
    Pack4<int32_t> r;
#pragma unroll
    for (int l = 0; l < 4; ++l) r.v[l] = static_cast<int32_t>(b.x[l]);
    detail::store_pack(out, j0, n, vec, r);
  }
};

template <typename T>
struct NoiseOp {
  T* out;
  const int64_t* rng;
  int64_t base;
  int dist;

  __device__ RngCtx prepare() const { return detail::read_rng(rng, base); }

  __device__ void operator()(const RngCtx& c, int64_t k, int64_t j0, int64_t n, bool vec) const {
    float eps[4];
    noise4(c.seed, c.counter0 + static_cast<uint64_t>(k), dist, eps);
    detail::store4f(out, j0, n, vec, eps);
  }
};

}  // namespace

cudaError_t launch_philox_bits(int32_t* out, int64_t n, const int64_t* rng, int64_t base,
                               cudaStream_t stream) {
  if (n < 0 || base < 0 || (n > 0 && (out == nullptr || rng == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const int phase = static_cast<int>(base % 4);
  const bool vec = detail::quad_aligned(out, sizeof(int32_t), phase);
  return detail::launch_quads(PhiloxBitsOp{out, rng, base}, n, phase, vec, stream);
}

cudaError_t launch_noise(void* out, DType dtype, int64_t n, const int64_t* rng, int64_t base,
                         int dist, cudaStream_t stream) {
  if (n < 0 || base < 0 || dist < kNormal || dist > kCauchy ||
      (n > 0 && (out == nullptr || rng == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const int phase = static_cast<int>(base % 4);
  return detail::dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    T* o = static_cast<T*>(out);
    const bool vec = detail::quad_aligned(o, sizeof(T), phase);
    return detail::launch_quads(NoiseOp<T>{o, rng, base, dist}, n, phase, vec, stream);
  });
}

}  // namespace cuda_launchers
}  // namespace flatfused
