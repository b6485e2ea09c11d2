// Runtime instruction-set selection of the CPU kernels.
//
// Every kernel is compiled once per instruction set (foreach_isa.h): AVX-512 and AVX2+FMA on
// x86-64 (GCC/Clang target attributes, so the build needs no -march flag and the binary runs
// on any x86-64 CPU), and a portable "generic" version everywhere. The best set the CPU (and
// OS) supports is picked at first use; FLATFUSED_CPU_ISA=generic|avx2|avx512 or
// flatfused._C.set_cpu_isa() can lower it (for tests and comparisons), never raise it.
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <atomic>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(FLATFUSED_NO_SIMD_DISPATCH)
#define FF_X86_DISPATCH 1
#else
#define FF_X86_DISPATCH 0
#endif

namespace flatfused {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// Parses an ISA name; returns -1 when unknown.
inline int parse_isa(const char* name) {
  if (name == nullptr) return -1;
  if (strcmp(name, "avx512") == 0) return static_cast<int>(Isa::kAvx512);
  if (strcmp(name, "avx2") == 0) return static_cast<int>(Isa::kAvx2);
  if (strcmp(name, "generic") == 0 || strcmp(name, "scalar") == 0) return static_cast<int>(Isa::kGeneric);
  return -1;
}

// The best instruction set this CPU and OS support (libgcc checks XCR0 for the AVX states).
inline Isa detected_isa() {
#if FF_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return isa;
#else
  return Isa::kGeneric;
#endif
}

inline std::atomic<int>& active_isa_slot() {
  static std::atomic<int> slot([] {
    int isa = static_cast<int>(detected_isa());
    const int wanted = parse_isa(getenv("FLATFUSED_CPU_ISA"));
    if (wanted >= 0 && wanted < isa) isa = wanted;
    return isa;
  }());
  return slot;
}

// The instruction set the kernels use now.
inline Isa active_isa() { return static_cast<Isa>(active_isa_slot().load(std::memory_order_relaxed)); }

// Selects an instruction set by name, capped at what the CPU supports; returns the one in use.
inline Isa set_active_isa(const char* name) {
  int isa = parse_isa(name);
  if (name != nullptr && strcmp(name, "auto") == 0) isa = static_cast<int>(detected_isa());
  if (isa >= 0) {
    if (isa > static_cast<int>(detected_isa())) isa = static_cast<int>(detected_isa());
    active_isa_slot().store(isa, std::memory_order_relaxed);
  }
  return active_isa();
}

}  // namespace cpu
}  // namespace flatfused

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

// FF_ISA_DECLARE(declaration;): declares a per-instruction-set kernel in each ISA namespace,
// for a host part whose kernels are compiled in files of their own (FF_ISA_ONLY).
#define FF_ISA_DECLARE(...)     \
  namespace flatfused {         \
  namespace cpu {               \
  namespace avx512 {            \
  __VA_ARGS__                   \
  }                             \
  namespace avx2 {              \
  __VA_ARGS__                   \
  }                             \
  namespace generic {           \
  __VA_ARGS__                   \
  }                             \
  }                             \
  }
