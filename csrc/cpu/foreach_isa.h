// Compiles the file named by FF_ISA_BODY once per instruction set (see isa.h):
//   namespace flatfused::cpu::avx512   (x86: AVX-512 F/BW/DQ/VL + AVX2 + FMA), FF_ISA_LEVEL 2
//   namespace flatfused::cpu::avx2     (x86: AVX2 + FMA),                      FF_ISA_LEVEL 1
//   namespace flatfused::cpu::generic  (baseline of the target, any CPU),      FF_ISA_LEVEL 0
// With FF_ISA_ONLY defined to one level, only that instruction set's copy is compiled: a body
// too heavy for one translation unit gets a file per level, which the build runs in parallel
// (base_step.cpp; its host part declares the kernels with FF_ISA_DECLARE, isa.h).
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

#ifdef FF_ISA_ONLY
#define FF_ISA_WANTS(level) (FF_ISA_ONLY == (level))
#else
#define FF_ISA_WANTS(level) 1
#endif

#if FF_X86_DISPATCH && FF_ISA_WANTS(2)
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
#endif  // AVX-512

#if FF_X86_DISPATCH && FF_ISA_WANTS(1)
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
#endif  // AVX2

#if FF_ISA_WANTS(0)
#define FF_ISA_LEVEL 0
namespace flatfused {
namespace cpu {
namespace generic {
#include FF_ISA_BODY
}  // namespace generic
}  // namespace cpu
}  // namespace flatfused
#undef FF_ISA_LEVEL
#endif  // generic
#undef FF_ISA_WANTS
