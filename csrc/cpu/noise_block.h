// The vectorised noise generator of the CPU kernels: Philox4x32-10 + uniform + Box-Muller for a
// block of consecutive counters into a small (L1-resident) buffer.
//
// Multi-included (after dtype.h) inside each ISA namespace by foreach_isa.h; no include guard.
// Provides, for the namespace's instruction set:
//   kBlockCounters                                   counters per block (4x as many elements)
//   philox_block(seed, first, count, uint32_t* bits) bits[4c + l] = lane l of counter first + c
//   noise_block(seed, first, count, dist, float* out) out[4c + l] = eps of that lane
// for 0 < count <= kBlockCounters; both may fill the buffer up to 4 * kBlockCounters entries.
//
// The integer bits are exactly philox4x32_10 of philox.h. Normal floats use our own branch-free
// logf / sincosf (Cephes polynomials, Cody-Waite reduction of th = 6.2831855f * u2): within a
// few ulps of libm over the domain used (u1 in [1e-7, 1], th in [0, 2pi]). The other
// distributions call philox.h's scalar uniform_to_distribution (libm) on vectorised bits.
//
// x86 vector layout: a Philox state vector holds 8 (AVX-512), 4 (AVX2) or 2 (SSE2) counters, one per
// 64-bit lane, each 32-bit word in the low half (the high half is don't-care), so the
// 32x32->64 products are single vpmuludq's. Box-Muller then runs on packed 32-bit vectors
// U1 = [x0[k], x2[k]] and U2 = [x1[k], x3[k]], and the results are interleaved back into lane
// order on the store.

constexpr int64_t kBlockCounters = 256;  // 1024 elements, 4 KiB of fp32 per buffer

// Triton's uint_to_uniform_float, exactly (see philox.h).
FF_INLINE float uniform_scalar(uint32_t b) {
  int32_t x = static_cast<int32_t>(b);
  x ^= (x >> 31);  // negatives folded with ~x
  return static_cast<float>(x) * 4.6566127342e-10f;
}

#if FF_ISA_LEVEL >= 1 || (FF_X86_DISPATCH && defined(__SSE2__))
#define FF_VECTOR_NOISE 1
// ---------------------------------------------------------------------------------------------
// x86 vector wrappers: the only instruction-set-specific code; the math below is written once.
// The generic level uses SSE2 (part of x86-64) without FMA: a*b+c rounds twice there.
#if FF_ISA_LEVEL == 2
struct Vec {
  static constexpr int kCounters = 8;  // counters per Philox vector
  using U = __m512i;
  using F = __m512;
  static FF_INLINE U counters(uint64_t first) {
    return _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first)),
                            _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  }
  static FF_INLINE U zero() { return _mm512_setzero_si512(); }
  static FF_INLINE U set64(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
  static FF_INLINE U set32(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static FF_INLINE U mul_wide(U a, U k) { return _mm512_mul_epu32(a, k); }
  static FF_INLINE U srl64_32(U a) { return _mm512_srli_epi64(a, 32); }
  static FF_INLINE U xor3(U a, U b, U c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
  // [lo[k], hi[k]] as 32-bit pairs
  static FF_INLINE U pack(U lo, U hi) {
    return _mm512_mask_blend_epi32(0xAAAA, lo, _mm512_slli_epi64(hi, 32));
  }
  // out = a[0], b[0], a[1], b[1], ... as 64-bit units (a, b hold pairs of lanes)
  static FF_INLINE void store_interleave64(void* out, U a, U b) {
    const U i0 = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const U i1 = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    _mm512_storeu_si512(out, _mm512_permutex2var_epi64(a, i0, b));
    _mm512_storeu_si512(static_cast<char*>(out) + 64, _mm512_permutex2var_epi64(a, i1, b));
  }
  // out[4k + 0..3] = c[2k], s[2k], c[2k+1], s[2k+1]
  static FF_INLINE void store_interleave32(float* out, F c, F s) {
    const U i0 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const U i1 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const __m512d lo = _mm512_castps_pd(_mm512_unpacklo_ps(c, s));
    const __m512d hi = _mm512_castps_pd(_mm512_unpackhi_ps(c, s));
    _mm512_storeu_ps(out, _mm512_castpd_ps(_mm512_permutex2var_pd(lo, i0, hi)));
    _mm512_storeu_ps(out + 16, _mm512_castpd_ps(_mm512_permutex2var_pd(lo, i1, hi)));
  }
  static FF_INLINE F set(float v) { return _mm512_set1_ps(v); }
  static FF_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static FF_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static FF_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static FF_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a*b+c
  static FF_INLINE F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c-a*b
  static FF_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
  static FF_INLINE F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static FF_INLINE F cvt(U a) { return _mm512_cvtepi32_ps(a); }
  static FF_INLINE U bits(F a) { return _mm512_castps_si512(a); }
  static FF_INLINE F from_bits(U a) { return _mm512_castsi512_ps(a); }
  static FF_INLINE U add32(U a, U b) { return _mm512_add_epi32(a, b); }
  static FF_INLINE U and_(U a, U b) { return _mm512_and_si512(a, b); }
  static FF_INLINE U xor_(U a, U b) { return _mm512_xor_si512(a, b); }
  template <int k> static FF_INLINE U srl32(U a) { return _mm512_srli_epi32(a, k); }
  template <int k> static FF_INLINE U sra32(U a) { return _mm512_srai_epi32(a, k); }
  template <int k> static FF_INLINE U sll32(U a) { return _mm512_slli_epi32(a, k); }
  // bit 0 of sel set -> b, else a
  static FF_INLINE F select_odd(U sel, F a, F b) {
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(sel, _mm512_set1_epi32(1)), a, b);
  }
};
#elif FF_ISA_LEVEL == 0
struct Vec {
  static constexpr int kCounters = 2;
  using U = __m128i;
  using F = __m128;
  static FF_INLINE U counters(uint64_t first) {
    return _mm_add_epi64(_mm_set1_epi64x(static_cast<long long>(first)), _mm_set_epi64x(1, 0));
  }
  static FF_INLINE U zero() { return _mm_setzero_si128(); }
  static FF_INLINE U set64(uint64_t v) { return _mm_set1_epi64x(static_cast<long long>(v)); }
  static FF_INLINE U set32(uint32_t v) { return _mm_set1_epi32(static_cast<int>(v)); }
  static FF_INLINE U mul_wide(U a, U k) { return _mm_mul_epu32(a, k); }
  static FF_INLINE U srl64_32(U a) { return _mm_srli_epi64(a, 32); }
  static FF_INLINE U xor3(U a, U b, U c) { return _mm_xor_si128(_mm_xor_si128(a, b), c); }
  static FF_INLINE U pack(U lo, U hi) {
    return _mm_or_si128(_mm_and_si128(lo, _mm_set1_epi64x(0xffffffffll)), _mm_slli_epi64(hi, 32));
  }
  static FF_INLINE void store_interleave64(void* out, U a, U b) {
    _mm_storeu_si128(static_cast<U*>(out), _mm_unpacklo_epi64(a, b));
    _mm_storeu_si128(static_cast<U*>(out) + 1, _mm_unpackhi_epi64(a, b));
  }
  static FF_INLINE void store_interleave32(float* out, F c, F s) {
    _mm_storeu_ps(out, _mm_unpacklo_ps(c, s));
    _mm_storeu_ps(out + 4, _mm_unpackhi_ps(c, s));
  }
  static FF_INLINE F set(float v) { return _mm_set1_ps(v); }
  static FF_INLINE F add(F a, F b) { return _mm_add_ps(a, b); }
  static FF_INLINE F sub(F a, F b) { return _mm_sub_ps(a, b); }
  static FF_INLINE F mul(F a, F b) { return _mm_mul_ps(a, b); }
  static FF_INLINE F fma(F a, F b, F c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static FF_INLINE F fnma(F a, F b, F c) { return _mm_sub_ps(c, _mm_mul_ps(a, b)); }
  static FF_INLINE F max(F a, F b) { return _mm_max_ps(a, b); }
  static FF_INLINE F sqrt(F a) { return _mm_sqrt_ps(a); }
  static FF_INLINE F cvt(U a) { return _mm_cvtepi32_ps(a); }
  static FF_INLINE U bits(F a) { return _mm_castps_si128(a); }
  static FF_INLINE F from_bits(U a) { return _mm_castsi128_ps(a); }
  static FF_INLINE U add32(U a, U b) { return _mm_add_epi32(a, b); }
  static FF_INLINE U and_(U a, U b) { return _mm_and_si128(a, b); }
  static FF_INLINE U xor_(U a, U b) { return _mm_xor_si128(a, b); }
  template <int k> static FF_INLINE U srl32(U a) { return _mm_srli_epi32(a, k); }
  template <int k> static FF_INLINE U sra32(U a) { return _mm_srai_epi32(a, k); }
  template <int k> static FF_INLINE U sll32(U a) { return _mm_slli_epi32(a, k); }
  static FF_INLINE F select_odd(U sel, F a, F b) {
    const F mask = _mm_castsi128_ps(_mm_srai_epi32(_mm_slli_epi32(sel, 31), 31));
    return _mm_or_ps(_mm_and_ps(mask, b), _mm_andnot_ps(mask, a));
  }
};
#else
struct Vec {
  static constexpr int kCounters = 4;
  using U = __m256i;
  using F = __m256;
  static FF_INLINE U counters(uint64_t first) {
    return _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(first)),
                            _mm256_set_epi64x(3, 2, 1, 0));
  }
  static FF_INLINE U zero() { return _mm256_setzero_si256(); }
  static FF_INLINE U set64(uint64_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
  static FF_INLINE U set32(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static FF_INLINE U mul_wide(U a, U k) { return _mm256_mul_epu32(a, k); }
  static FF_INLINE U srl64_32(U a) { return _mm256_srli_epi64(a, 32); }
  static FF_INLINE U xor3(U a, U b, U c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static FF_INLINE U pack(U lo, U hi) { return _mm256_blend_epi32(lo, _mm256_slli_epi64(hi, 32), 0xAA); }
  static FF_INLINE void store_interleave64(void* out, U a, U b) {
    const U lo = _mm256_unpacklo_epi64(a, b);  // a0 b0 | a2 b2
    const U hi = _mm256_unpackhi_epi64(a, b);  // a1 b1 | a3 b3
    _mm256_storeu_si256(static_cast<U*>(out), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(static_cast<U*>(out) + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
  }
  static FF_INLINE void store_interleave32(float* out, F c, F s) {
    const F lo = _mm256_unpacklo_ps(c, s);  // c0 s0 c1 s1 | c4 s4 c5 s5
    const F hi = _mm256_unpackhi_ps(c, s);  // c2 s2 c3 s3 | c6 s6 c7 s7
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  static FF_INLINE F set(float v) { return _mm256_set1_ps(v); }
  static FF_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static FF_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static FF_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static FF_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static FF_INLINE F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static FF_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
  static FF_INLINE F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static FF_INLINE F cvt(U a) { return _mm256_cvtepi32_ps(a); }
  static FF_INLINE U bits(F a) { return _mm256_castps_si256(a); }
  static FF_INLINE F from_bits(U a) { return _mm256_castsi256_ps(a); }
  static FF_INLINE U add32(U a, U b) { return _mm256_add_epi32(a, b); }
  static FF_INLINE U and_(U a, U b) { return _mm256_and_si256(a, b); }
  static FF_INLINE U xor_(U a, U b) { return _mm256_xor_si256(a, b); }
  template <int k> static FF_INLINE U srl32(U a) { return _mm256_srli_epi32(a, k); }
  template <int k> static FF_INLINE U sra32(U a) { return _mm256_srai_epi32(a, k); }
  template <int k> static FF_INLINE U sll32(U a) { return _mm256_slli_epi32(a, k); }
  static FF_INLINE F select_odd(U sel, F a, F b) {
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(sel, 31)));
  }
};
#endif

using VU = Vec::U;
using VF = Vec::F;
constexpr int kGroups = 4;  // Philox vectors in flight (ILP across the multiply latency)
constexpr int64_t kGroupCounters = kGroups * Vec::kCounters;
static_assert(kBlockCounters % kGroupCounters == 0, "block must hold whole groups");

// kGroups Vecs in lockstep: every operation of the Box-Muller math is issued for all of them
// before the next one, so that their long dependency chains (log, sincos) overlap instead of
// waiting on the FMA latency: on Zen 4, 10% fewer cycles per normal with AVX-512, 22% with
// AVX2 (docs/benchmarks.md); the same operations in the same order, so bit-identical.
struct VecGroup {
  struct U { VU v[kGroups]; };
  struct F { VF v[kGroups]; };
// r.v[g] = Vec::op(args of vector g) for every g (plain loops: no lambdas, which Clang's
// target-attribute pragma in foreach_isa.h would not cover)
#define FF_GROUP_OP(R, name, params, ...)                     \
  static FF_INLINE R name params {                            \
    R r;                                                      \
    for (int g = 0; g < kGroups; ++g) r.v[g] = __VA_ARGS__;   \
    return r;                                                 \
  }
  FF_GROUP_OP(F, set, (float x), Vec::set(x))
  FF_GROUP_OP(U, set32, (uint32_t x), Vec::set32(x))
  FF_GROUP_OP(F, sqrt, (F a), Vec::sqrt(a.v[g]))
  FF_GROUP_OP(F, cvt, (U a), Vec::cvt(a.v[g]))
  FF_GROUP_OP(U, bits, (F a), Vec::bits(a.v[g]))
  FF_GROUP_OP(F, from_bits, (U a), Vec::from_bits(a.v[g]))
  FF_GROUP_OP(F, add, (F a, F b), Vec::add(a.v[g], b.v[g]))
  FF_GROUP_OP(F, sub, (F a, F b), Vec::sub(a.v[g], b.v[g]))
  FF_GROUP_OP(F, mul, (F a, F b), Vec::mul(a.v[g], b.v[g]))
  FF_GROUP_OP(F, max, (F a, F b), Vec::max(a.v[g], b.v[g]))
  FF_GROUP_OP(U, add32, (U a, U b), Vec::add32(a.v[g], b.v[g]))
  FF_GROUP_OP(U, and_, (U a, U b), Vec::and_(a.v[g], b.v[g]))
  FF_GROUP_OP(U, xor_, (U a, U b), Vec::xor_(a.v[g], b.v[g]))
  FF_GROUP_OP(F, fma, (F a, F b, F c), Vec::fma(a.v[g], b.v[g], c.v[g]))
  FF_GROUP_OP(F, fnma, (F a, F b, F c), Vec::fnma(a.v[g], b.v[g], c.v[g]))
  FF_GROUP_OP(F, select_odd, (U sel, F a, F b), Vec::select_odd(sel.v[g], a.v[g], b.v[g]))
  template <int k> FF_GROUP_OP(U, srl32, (U a), Vec::template srl32<k>(a.v[g]))
  template <int k> FF_GROUP_OP(U, sra32, (U a), Vec::template sra32<k>(a.v[g]))
  template <int k> FF_GROUP_OP(U, sll32, (U a), Vec::template sll32<k>(a.v[g]))
#undef FF_GROUP_OP
};

// Philox4x32-10 of counters first .. first + kGroupCounters - 1.
FF_INLINE void philox_groups(uint64_t seed, uint64_t first, VU (&x)[4][kGroups]) {
  const VU ka = Vec::set64(kPhiloxRoundA), kb = Vec::set64(kPhiloxRoundB);
  VU c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    c0[g] = Vec::counters(first + static_cast<uint64_t>(g * Vec::kCounters));
    c1[g] = Vec::srl64_32(c0[g]);
    c2[g] = Vec::zero();
    c3[g] = Vec::zero();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const VU vk0 = Vec::set64(k0), vk1 = Vec::set64(k1);
    for (int g = 0; g < kGroups; ++g) {
      const VU pb = Vec::mul_wide(c2[g], kb);
      const VU pa = Vec::mul_wide(c0[g], ka);
      c0[g] = Vec::xor3(Vec::srl64_32(pb), c1[g], vk0);
      c2[g] = Vec::xor3(Vec::srl64_32(pa), c3[g], vk1);
      c1[g] = pb;
      c3[g] = pa;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int g = 0; g < kGroups; ++g) {
    x[0][g] = c0[g];
    x[1][g] = c1[g];
    x[2][g] = c2[g];
    x[3][g] = c3[g];
  }
}

// The float math below is written once over a vector wrapper W: Vec, or VecGroup (kGroups Vecs).
template <class W>
FF_INLINE typename W::F v_uniform(typename W::U b) {
  b = W::xor_(b, W::template sra32<31>(b));
  return W::mul(W::cvt(b), W::set(4.6566127342e-10f));
}

// logf for normal positive x (Cephes logf polynomial, musl-style reduction to [sqrt(1/2), sqrt 2)).
template <class W>
FF_INLINE typename W::F v_log(typename W::F x) {
  using VU = typename W::U;
  using VF = typename W::F;
  VU ix = W::add32(W::bits(x), W::set32(0x3f800000u - 0x3f3504f3u));
  const VF k = W::cvt(W::add32(W::template srl32<23>(ix), W::set32(static_cast<uint32_t>(-0x7f))));
  ix = W::add32(W::and_(ix, W::set32(0x007fffffu)), W::set32(0x3f3504f3u));
  const VF f = W::sub(W::from_bits(ix), W::set(1.0f));
  const VF z = W::mul(f, f);
  VF y = W::set(7.0376836292E-2f);
  y = W::fma(y, f, W::set(-1.1514610310E-1f));
  y = W::fma(y, f, W::set(1.1676998740E-1f));
  y = W::fma(y, f, W::set(-1.2420140846E-1f));
  y = W::fma(y, f, W::set(1.4249322787E-1f));
  y = W::fma(y, f, W::set(-1.6668057665E-1f));
  y = W::fma(y, f, W::set(2.0000714765E-1f));
  y = W::fma(y, f, W::set(-2.4999993993E-1f));
  y = W::fma(y, f, W::set(3.3333331174E-1f));
  y = W::mul(W::mul(y, f), z);
  y = W::fma(k, W::set(-2.12194440e-4f), y);
  y = W::fma(W::set(-0.5f), z, y);
  return W::fma(k, W::set(0.693359375f), W::add(f, y));
}

// sin and cos of th in [0, 2pi] (any |th| < 2^22 works): Cody-Waite by pi/2, Cephes polynomials.
template <class W>
FF_INLINE void v_sincos(typename W::F th, typename W::F* s, typename W::F* c) {
  using VU = typename W::U;
  using VF = typename W::F;
  const VF magic = W::set(12582912.0f);  // 1.5 * 2^23: rounds to nearest, quadrant in the low bits
  const VF t = W::fma(th, W::set(0.636619772367581343f), magic);
  const VU q = W::bits(t);
  const VF k = W::sub(t, magic);
  VF y = W::fnma(k, W::set(1.5703125f), th);
  y = W::fnma(k, W::set(4.837512969970703125e-4f), y);
  y = W::fnma(k, W::set(7.54978995489188216e-8f), y);
  const VF z = W::mul(y, y);
  const VF ps = W::fma(W::fma(W::set(-1.9515295891E-4f), z, W::set(8.3321608736E-3f)), z,
                         W::set(-1.6666654611E-1f));
  const VF sn = W::fma(W::mul(y, z), ps, y);
  const VF pc = W::fma(W::fma(W::set(2.443315711809948E-5f), z, W::set(-1.388731625493765E-3f)),
                         z, W::set(4.166664568298827E-2f));
  const VF cs = W::fma(W::mul(z, z), pc, W::fma(W::set(-0.5f), z, W::set(1.0f)));
  const VF ss = W::select_odd(q, sn, cs);
  const VF cc = W::select_odd(q, cs, sn);
  const VU sign_s = W::template sll32<30>(W::and_(q, W::set32(2)));
  const VU sign_c = W::template sll32<30>(W::and_(W::add32(q, W::set32(1)), W::set32(2)));
  *s = W::from_bits(W::xor_(W::bits(ss), sign_s));
  *c = W::from_bits(W::xor_(W::bits(cc), sign_c));
}

inline void philox_block(uint64_t seed, uint64_t first, int64_t count, uint32_t* bits) {
  for (int64_t c = 0; c < count; c += kGroupCounters) {
    VU x[4][kGroups];
    philox_groups(seed, first + static_cast<uint64_t>(c), x);
    for (int g = 0; g < kGroups; ++g) {
      uint32_t* out = bits + 4 * (c + g * Vec::kCounters);
      Vec::store_interleave64(out, Vec::pack(x[0][g], x[1][g]), Vec::pack(x[2][g], x[3][g]));
    }
  }
}

inline void normal_block(uint64_t seed, uint64_t first, int64_t count, float* out) {
  using G = VecGroup;
  for (int64_t c = 0; c < count; c += kGroupCounters) {
    VU x[4][kGroups];
    philox_groups(seed, first + static_cast<uint64_t>(c), x);
    G::U b1, b2;
    for (int g = 0; g < kGroups; ++g) {
      b1.v[g] = Vec::pack(x[0][g], x[2][g]);
      b2.v[g] = Vec::pack(x[1][g], x[3][g]);
    }
    const G::F u1 = G::max(v_uniform<G>(b1), G::set(1.0e-7f));
    const G::F u2 = v_uniform<G>(b2);
    const G::F r = G::sqrt(G::mul(G::set(-2.0f), v_log<G>(u1)));
    G::F sn, cs;
    v_sincos<G>(G::mul(G::set(6.283185307179586f), u2), &sn, &cs);
    for (int g = 0; g < kGroups; ++g)
      Vec::store_interleave32(out + 4 * (c + g * Vec::kCounters), Vec::mul(r.v[g], cs.v[g]),
                              Vec::mul(r.v[g], sn.v[g]));
  }
}

#else  // generic level without SSE2 (non-x86)
// ---------------------------------------------------------------------------------------------
// Portable version: plain loops the compiler can vectorise for the baseline target (e.g. NEON).
#if defined(__FMA__) || defined(__aarch64__)
#define FF_FMA(a, b, c) __builtin_fmaf(a, b, c)
#else
#define FF_FMA(a, b, c) ((a) * (b) + (c))
#endif

FF_INLINE float s_log(float x) {
  uint32_t ix = float_to_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(ix >> 23) - 0x7f);
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = bits_to_float(ix) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292E-2f;
  y = FF_FMA(y, f, -1.1514610310E-1f);
  y = FF_FMA(y, f, 1.1676998740E-1f);
  y = FF_FMA(y, f, -1.2420140846E-1f);
  y = FF_FMA(y, f, 1.4249322787E-1f);
  y = FF_FMA(y, f, -1.6668057665E-1f);
  y = FF_FMA(y, f, 2.0000714765E-1f);
  y = FF_FMA(y, f, -2.4999993993E-1f);
  y = FF_FMA(y, f, 3.3333331174E-1f);
  y = y * f * z;
  y = FF_FMA(k, -2.12194440e-4f, y);
  y = FF_FMA(-0.5f, z, y);
  return FF_FMA(k, 0.693359375f, f + y);
}

FF_INLINE void s_sincos(float th, float* s, float* c) {
  const float magic = 12582912.0f;
  const float t = FF_FMA(th, 0.636619772367581343f, magic);
  const uint32_t q = float_to_bits(t);
  const float k = t - magic;
  float y = th - k * 1.5703125f;  // exact: k has 3 bits, the constant 8
  y = FF_FMA(-k, 4.837512969970703125e-4f, y);
  y = FF_FMA(-k, 7.54978995489188216e-8f, y);
  const float z = y * y;
  const float ps = FF_FMA(FF_FMA(-1.9515295891E-4f, z, 8.3321608736E-3f), z, -1.6666654611E-1f);
  const float sn = FF_FMA(y * z, ps, y);
  const float pc = FF_FMA(FF_FMA(2.443315711809948E-5f, z, -1.388731625493765E-3f), z, 4.166664568298827E-2f);
  const float cs = FF_FMA(z * z, pc, FF_FMA(-0.5f, z, 1.0f));
  // branch-free quadrant selection (odd quadrants swap sin and cos), so loops vectorise
  const uint32_t swap = (float_to_bits(sn) ^ float_to_bits(cs)) & (0u - (q & 1u));
  *s = bits_to_float((float_to_bits(sn) ^ swap) ^ ((q & 2u) << 30));
  *c = bits_to_float((float_to_bits(cs) ^ swap) ^ (((q + 1u) & 2u) << 30));
}
#undef FF_FMA

inline void philox_block(uint64_t seed, uint64_t first, int64_t count, uint32_t* __restrict bits) {
  for (int64_t c = 0; c < count; ++c) {
    const Philox4 b = philox4x32_10(seed, first + static_cast<uint64_t>(c));
    bits[4 * c + 0] = b.x[0];
    bits[4 * c + 1] = b.x[1];
    bits[4 * c + 2] = b.x[2];
    bits[4 * c + 3] = b.x[3];
  }
}

inline void normal_block(uint64_t seed, uint64_t first, int64_t count, float* __restrict out) {
  alignas(64) uint32_t bits[4 * kBlockCounters];
  philox_block(seed, first, count, bits);
  for (int64_t p = 0; p < 2 * count; ++p) {  // Box-Muller pairs (lanes 0,1 and 2,3)
    // u1 = max(u1, 1e-7) on the bit patterns (both are >= 0): a float compare here becomes a
    // branch around the log, which stops the loop from vectorising
    const uint32_t b1 = float_to_bits(uniform_scalar(bits[2 * p]));
    const uint32_t lo = 0x33D6BF95u;  // bits of 1.0e-7f
    const float u1 = bits_to_float(b1 > lo ? b1 : lo);
    const float u2 = uniform_scalar(bits[2 * p + 1]);
    const float r = sqrtf(-2.0f * s_log(u1));
    float sn, cs;
    s_sincos(6.283185307179586f * u2, &sn, &cs);
    out[2 * p] = r * cs;
    out[2 * p + 1] = r * sn;
  }
}
#endif  // FF_VECTOR_NOISE
#undef FF_VECTOR_NOISE

// eps of counters first .. first + count - 1 (4 per counter, lane order) for any distribution.
inline void noise_block(uint64_t seed, uint64_t first, int64_t count, int dist, float* __restrict out) {
  if (dist == kNormal) {
    normal_block(seed, first, count, out);
    return;
  }
  alignas(64) uint32_t bits[4 * kBlockCounters];
  philox_block(seed, first, count, bits);
  for (int64_t k = 0; k < 4 * count; ++k) out[k] = uniform_to_distribution(uniform_scalar(bits[k]), dist);
}

// Calls op(j, cnt, eps) over the elements [j0, j1) of a draw at rng, in blocks: element j has
// logical index base + j, eps[0 .. cnt) are the noise of elements j .. j + cnt - 1.
template <class Op>
FF_INLINE void for_each_noise_block(int64_t j0, int64_t j1, Rng rng, int64_t base, int dist, Op&& op) {
  alignas(64) float buf[4 * kBlockCounters];
  for (int64_t j = j0; j < j1;) {
    const int64_t i = base + j;
    const int64_t s = i & 3;
    const int64_t cnt = (j1 - j) < (4 * kBlockCounters - s) ? (j1 - j) : (4 * kBlockCounters - s);
    noise_block(rng.seed, rng.offset + static_cast<uint64_t>(i >> 2), (s + cnt + 3) >> 2, dist, buf);
    op(j, cnt, static_cast<const float*>(buf + s));
    j += cnt;
  }
}
