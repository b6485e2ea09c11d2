// Storage dtypes of the CPU kernels: load to fp32, store from fp32 with one rounding.
// Multi-included: compiled inside each ISA namespace (foreach_isa.h), no include guard, no
// system includes. Branch-free bit arithmetic, so the elementwise loops auto-vectorise; the
// conversions are c10's (BFloat16 round-to-nearest-even with NaN -> 0x7FC0; Half as in
// c10::detail::fp16_ieee_{from,to}_fp32_value), so results are bit-identical to torch's.

FF_INLINE float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
FF_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

struct F32 {
  using T = float;
  static constexpr DType kDType = DType::kFloat32;
  static FF_INLINE float load(T x) { return x; }
  static FF_INLINE T store(float x) { return x; }
};

struct BF16 {
  using T = uint16_t;
  static constexpr DType kDType = DType::kBFloat16;
  static FF_INLINE float load(T x) { return bits_to_float(static_cast<uint32_t>(x) << 16); }
  static FF_INLINE T store(float x) {
    const uint32_t u = float_to_bits(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<T>(x != x ? 0x7FC0u : rounded);
  }
};

struct F16 {
  using T = uint16_t;
  static constexpr DType kDType = DType::kFloat16;
  static FF_INLINE float load(T h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * bits_to_float(15u << 23);
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t mag = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
    return bits_to_float(sign | mag);
  }
  static FF_INLINE T store(float f) {
    const float scale_to_inf = bits_to_float(239u << 23);  // 0x1.0p+112f
    const float scale_to_zero = bits_to_float(17u << 23);  // 0x1.0p-110f
    float base = (bits_to_float(float_to_bits(f) & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<T>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// FF_DTYPE_SWITCH(dt, S, body): runs body with S bound to F32, BF16 or F16.
#ifndef FF_DTYPE_SWITCH
#define FF_DTYPE_SWITCH(dt, S, ...)  \
  switch (dt) {                      \
    case DType::kBFloat16: {         \
      using S = BF16;                \
      __VA_ARGS__;                   \
      break;                         \
    }                                \
    case DType::kFloat16: {             \
      using S = F16;                 \
      __VA_ARGS__;                   \
      break;                         \
    }                                \
    default: {                       \
      using S = F32;                 \
      __VA_ARGS__;                   \
    }                                \
  }
#endif

// The absent optional gradient source (src): kernels templated on it read grad instead.
struct NoSrc {
  using T = float;
  static FF_INLINE float load(T x) { return x; }
};

// FF_SRC_SWITCH(src, src_dt, S, Src, body): Src = NoSrc (src null), F32, or S (src in the
// parameters' dtype; the caller checked src_dt is fp32 or the parameters' dtype).
#ifndef FF_SRC_SWITCH
#define FF_SRC_SWITCH(src, src_dt, S, Src, ...) \
  if ((src) == nullptr) {                       \
    using Src = NoSrc;                          \
    __VA_ARGS__;                                \
  } else if ((src_dt) == DType::kFloat32) {       \
    using Src = F32;                            \
    __VA_ARGS__;                                \
  } else {                                      \
    using Src = S;                              \
    __VA_ARGS__;                                \
  }
#endif
