// Compiles the file named by FF_ISA_BODY once per instruction set (see isa.h):
//   namespace flatfused::cpu::avx512   (x86: AVX-512 F/BW/DQ/VL + AVX2 + FMA), FF_ISA_LEVEL 2
//   namespace flatfused::cpu::avx2     (x86: AVX2 + FMA),                      FF_ISA_LEVEL 1
//   namespace flatfused::cpu::generic  (baseline of the target, any CPU),      FF_ISA_LEVEL 0
// The body is included inside the namespace, so it must not include system headers itself:
// everything it needs is included here first. Functions of the body get the target attributes
// through push/pop pragmas; they are only called after active_isa() said the CPU has them.
#ifndef FF_ISA_BODY
#error "define FF_ISA_BODY to the file to compile per instruction set"
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../philox.h"
#include "../step_math.h"
#include "isa.h"
#include "kernels.h"
#if FF_X86_DISPATCH
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags _mm512_undefined_*() inside its own intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#ifndef FF_INLINE
#define FF_INLINE inline __attribute__((always_inline))
#endif

#if FF_X86_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
#define FF_ISA_LEVEL 2
namespace flatfused {
namespace cpu {
namespace avx512 {
#include FF_ISA_BODY
}  // namespace avx512
}  // namespace cpu
}  // namespace flatfused
#undef FF_ISA_LEVEL
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define FF_ISA_LEVEL 1
namespace flatfused {
namespace cpu {
namespace avx2 {
#include FF_ISA_BODY
}  // namespace avx2
}  // namespace cpu
}  // namespace flatfused
#undef FF_ISA_LEVEL
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // FF_X86_DISPATCH

#define FF_ISA_LEVEL 0
namespace flatfused {
namespace cpu {
namespace generic {
#include FF_ISA_BODY
}  // namespace generic
}  // namespace cpu
}  // namespace flatfused
#undef FF_ISA_LEVEL

// FF_ISA_CALL(fn, args...): calls <isa>::fn(args...) for the active instruction set.
#ifndef FF_ISA_CALL
#if FF_X86_DISPATCH
#define FF_ISA_CALL(fn, ...)                                            \
  do {                                                                  \
    switch (::flatfused::cpu::active_isa()) {                           \
      case ::flatfused::cpu::Isa::kAvx512:                              \
        ::flatfused::cpu::avx512::fn(__VA_ARGS__);                      \
        break;                                                          \
      case ::flatfused::cpu::Isa::kAvx2:                                \
        ::flatfused::cpu::avx2::fn(__VA_ARGS__);                        \
        break;                                                          \
      default:                                                          \
        ::flatfused::cpu::generic::fn(__VA_ARGS__);                     \
    }                                                                   \
  } while (0)
#else
#define FF_ISA_CALL(fn, ...) ::flatfused::cpu::generic::fn(__VA_ARGS__)
#endif
#endif
