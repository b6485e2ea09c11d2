// The one RNG spec of flatfused (docs/rng.md), shared by the C++ CPU and CUDA kernels.
//
// Philox4x32-10 with key (seed lo, seed hi) and counter (c lo, c hi, 0, 0): exactly what
// Triton's tl.randint4x(seed, c) computes, so every backend draws the same bits. Element i of
// a perturbation drawn at (seed, offset) uses counter offset + i / 4 and output lane i % 4.
// Floats are made the way Triton's rand4x/randn4x make them.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline __attribute__((always_inline))
#include <math.h>
#endif

namespace flatfused {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// Distributions of the NSO reference, all transforms of the same uniforms.
enum Distribution : int {
  kNormal = 0,    // N(0, 1), Box-Muller on lanes (0, 1) and (2, 3)
  kLaplace = 1,   // Laplace(0, 1/sqrt(2)), unit variance
  kUniform = 2,   // U(-sqrt(3), sqrt(3)), unit variance
  kBinomial = 3,  // Binomial(4, 0.5): mean 2, as the reference draws it
  kCauchy = 4,    // Cauchy(0, 1): no variance, as the reference draws it
};

struct Philox4 {
  uint32_t x[4];
};

FF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

FF_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(kPhiloxRoundB, p2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, p0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * p2;
    c3 = kPhiloxRoundA * p0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float: [0, 1) from the bits read as int32, negatives folded with ~x.
FF_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal (Box-Muller); lane pairs (0, 1) and (2, 3).
FF_HD void box_muller(float u1, float u2, float* n1, float* n2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  *n1 = r * cosf(th);
  *n2 = r * sinf(th);
}

// Non-normal distributions: one uniform per element, same lane.
FF_HD float uniform_to_distribution(float u, int dist) {
  switch (dist) {
    case kLaplace: {
      const float v = u - 0.5f;
      float t = 1.0f - 2.0f * fabsf(v);
      t = t > 1.0e-7f ? t : 1.0e-7f;
      const float mag = -0.70710678118654752f * logf(t);
      return v < 0.0f ? -mag : mag;
    }
    case kUniform:
      return (2.0f * u - 1.0f) * 1.7320508075688772f;
    case kBinomial:
      return static_cast<float>((u >= 0.0625f) + (u >= 0.3125f) + (u >= 0.6875f) + (u >= 0.9375f));
    case kCauchy: {
      const float uc = u > 1.0e-7f ? u : 1.0e-7f;
      return tanf(3.14159265358979323846f * (uc - 0.5f));
    }
    default:
      return 0.0f;
  }
}

// The four noise values of one counter. Scalar reference path; fast paths must agree with it.
FF_HD void noise4(uint64_t seed, uint64_t counter, int dist, float out[4]) {
  const Philox4 b = philox4x32_10(seed, counter);
  const float u0 = uint_to_uniform(b.x[0]), u1 = uint_to_uniform(b.x[1]);
  const float u2 = uint_to_uniform(b.x[2]), u3 = uint_to_uniform(b.x[3]);
  if (dist == kNormal) {
    box_muller(u0, u1, &out[0], &out[1]);
    box_muller(u2, u3, &out[2], &out[3]);
  } else {
    out[0] = uniform_to_distribution(u0, dist);
    out[1] = uniform_to_distribution(u1, dist);
    out[2] = uniform_to_distribution(u2, dist);
    out[3] = uniform_to_distribution(u3, dist);
  }
}

}  // namespace flatfused
