// The NSO pass kernels on CUDA (docs/kernels.md): perturb_, accumulate_, accumulate_perturb_.
// Per-element math: csrc/step_math.h; noise: csrc/philox.h. Launch plumbing:
// elementwise.cuh.
#include "elementwise.cuh"

namespace flatfused {
namespace cuda_launchers {
namespace {

using detail::NoCtx;
using detail::Pack4;
using detail::RngCtx;

// acc = (init ? 0 : acc) + weight * grad; if zero_grad: grad = 0. acc is fp32.
// Split into update (the loads and the math) and store so that accumulate_perturb_ can issue
// all its loads before its first store.
template <typename G>
struct AccumulateOp {
  float* acc;
  G* grad;
  float weight;
  bool init;
  bool zero_grad;

  // Host: whether every pointer is quad-aligned at this phase.
  bool quad_aligned(int phase) const {
    return detail::quad_aligned(acc, sizeof(float), phase) &&
           detail::quad_aligned(grad, sizeof(G), phase);
  }

  // a = the quad's new acc values.
  __device__ void update(int64_t j0, int64_t n, bool vec, float (&a)[4]) const {
    float g[4];
    detail::load4f(grad, j0, n, vec, g);
#pragma unroll
    for (int l = 0; l < 4; ++l) a[l] = 0.0f;
    if (!init) detail::load4f(acc, j0, n, vec, a);  // init never reads acc
#pragma unroll
    for (int l = 0; l < 4; ++l) a[l] = accumulate_math(a[l], g[l], weight, init);
  }

  __device__ void store(int64_t j0, int64_t n, bool vec, const float (&a)[4]) const {
    detail::store4f(acc, j0, n, vec, a);
    if (zero_grad) {
      const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      detail::store4f(grad, j0, n, vec, zero);
    }
  }

  __device__ NoCtx prepare() const { return NoCtx{}; }

  __device__ void operator()(const NoCtx&, int64_t, int64_t j0, int64_t n, bool vec) const {
    float a[4];
    update(j0, n, vec, a);
    store(j0, n, vec, a);
  }
};

// The accumulate part of perturb_ alone: nothing.
struct NoAccumulate {
  bool quad_aligned(int) const { return true; }
  __device__ void update(int64_t, int64_t, bool, float (&)[4]) const {}
  __device__ void store(int64_t, int64_t, bool, const float (&)[4]) const {}
};

// The accumulate part of perturb_ with grad: grad = 0.
template <typename G>
struct ZeroGrad {
  G* grad;
  bool quad_aligned(int phase) const { return detail::quad_aligned(grad, sizeof(G), phase); }
  __device__ void update(int64_t, int64_t, bool, float (&)[4]) const {}
  __device__ void store(int64_t j0, int64_t n, bool vec, const float (&)[4]) const {
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    detail::store4f(grad, j0, n, vec, zero);
  }
};

// [Acc: acc = (init ? 0 : acc) + weight * grad; if zero_grad: grad = 0;] then
// if save: w0 = w (bit copy); w = w0 + sigma * eps. One Philox counter per thread.
// perturb_ is PerturbOp<T, NoAccumulate> (with grad: ZeroGrad<T>), accumulate_perturb_ is
// PerturbOp<T, AccumulateOp<T>>.
// Every load of a quad precedes its first store (more loads in flight); for the one aliasing the
// schema allows, w0 that is w, this equals the spec's order (accumulate_, then perturb_).
template <typename T, typename Acc>
struct PerturbOp {
  T* w;
  T* w0;
  const int64_t* rng;
  int64_t base;
  float sigma;
  int dist;
  bool save;
  Acc accumulate;

  __device__ RngCtx prepare() const { return detail::read_rng(rng, base); }

  __device__ void operator()(const RngCtx& c, int64_t k, int64_t j0, int64_t n, bool vec) const {
    float a[4];
    accumulate.update(j0, n, vec, a);
    const Pack4<T> x = detail::load_pack<T>(save ? w : w0, j0, n, vec);
    accumulate.store(j0, n, vec, a);
    if (save) detail::store_pack(w0, j0, n, vec, x);
    float eps[4];
    noise4(c.seed, c.counter0 + static_cast<uint64_t>(k), dist, eps);
    float out[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = perturb_math(detail::to_float(x.v[l]), sigma, eps[l]);
    detail::store4f(w, j0, n, vec, out);
  }
};

// perturb_ and accumulate_perturb_: quads at phase base % 4, so quad k is Philox counter
// offset + base / 4 + k and its lane l is element 4k - phase + l.
template <typename T, typename Acc>
cudaError_t launch_perturb_op(T* w, T* w0, int64_t n, const int64_t* rng, int64_t base, int dist,
                              float sigma, bool save, const Acc& accumulate,
                              cudaStream_t stream) {
  const int phase = static_cast<int>(base % 4);
  const PerturbOp<T, Acc> op{w, w0, rng, base, sigma, dist, save, accumulate};
  const bool vec = detail::quad_aligned(w, sizeof(T), phase) &&
                   detail::quad_aligned(w0, sizeof(T), phase) && accumulate.quad_aligned(phase);
  return detail::launch_quads(op, n, phase, vec, stream);
}

bool valid_perturb_args(const void* w, const void* w0, int64_t n, const int64_t* rng,
                        int64_t base, int dist) {
  return n >= 0 && base >= 0 && dist >= kNormal && dist <= kCauchy &&
         (n == 0 || (w != nullptr && w0 != nullptr && rng != nullptr));
}

}  // namespace

cudaError_t launch_perturb(void* w, void* w0, void* grad, DType dtype, int64_t n,
                           const int64_t* rng, int64_t base, int dist, float sigma, bool save,
                           cudaStream_t stream) {
  if (!valid_perturb_args(w, w0, n, rng, base, dist)) return cudaErrorInvalidValue;
  return detail::dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if (grad != nullptr) {
      return launch_perturb_op(static_cast<T*>(w), static_cast<T*>(w0), n, rng, base, dist,
                               sigma, save, ZeroGrad<T>{static_cast<T*>(grad)}, stream);
    }
    return launch_perturb_op(static_cast<T*>(w), static_cast<T*>(w0), n, rng, base, dist, sigma,
                             save, NoAccumulate{}, stream);
  });
}

cudaError_t launch_accumulate_perturb(void* w, void* w0, float* acc, void* grad, DType dtype,
                                      int64_t n, const int64_t* rng, int64_t base, int dist,
                                      float sigma, bool save, float weight, bool init,
                                      bool zero_grad, cudaStream_t stream) {
  if (!valid_perturb_args(w, w0, n, rng, base, dist) ||
      (n > 0 && (acc == nullptr || grad == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return detail::dispatch_float(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    const AccumulateOp<T> accumulate{acc, static_cast<T*>(grad), weight, init, zero_grad};
    return launch_perturb_op(static_cast<T*>(w), static_cast<T*>(w0), n, rng, base, dist, sigma,
                             save, accumulate, stream);
  });
}

cudaError_t launch_accumulate(float* acc, void* grad, DType grad_dtype, int64_t n, float weight,
                              bool init, bool zero_grad, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (acc == nullptr || grad == nullptr))) return cudaErrorInvalidValue;
  return detail::dispatch_float(grad_dtype, [&](auto t) -> cudaError_t {
    using G = decltype(t);
    const AccumulateOp<G> op{acc, static_cast<G*>(grad), weight, init, zero_grad};
    const int phase = detail::aligning_phase(acc, sizeof(float));
    return detail::launch_quads(op, n, phase, op.quad_aligned(phase), stream);
  });
}

}  // namespace cuda_launchers
}  // namespace flatfused
