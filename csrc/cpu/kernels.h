// Entry points of the CPU kernels, free of torch headers (register.cpp validates the tensors
// and calls these with raw pointers). Semantics: docs/kernels.md. n is the element count of
// every tensor argument; optional pointers may be null (w0 of restore/sgd_step/adam_step is null
// when it is w itself: the step then starts from w; perturb's w0 may equal w). Storage dtype `dt` applies to every
// parameter-like buffer (w, w0, grad, momentum/Adam state); acc is fp32; src (the gradient
// source of the three-call API) has dtype `src_dt`: fp32 (an accumulator) or `dt`.
#pragma once

#include <stdint.h>

#include "../dtype_code.h"
#include "../step_math.h"

namespace flatfused {
namespace cpu {

using ::flatfused::DType;  // ../dtype_code.h

inline int64_t element_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Bytes per element of an optional operand (the streaming-store footprint, parallel.h).
inline int64_t operand_bytes(const void* t, DType dt) { return t != nullptr ? element_size(dt) : 0; }

struct Rng {
  uint64_t seed;    // rng[0], read as 64 bits
  uint64_t offset;  // rng[1]: Philox counter of logical element 0
};

// isa.cpp
// Name of the instruction set the kernels run with now ("avx512", "avx2", "generic").
const char* current_isa_name();
// Lowers (or restores, "auto") the instruction set; returns the one now in use.
const char* select_isa(const char* name);
// Sets the size in bytes from which write-only outputs use streaming stores (parallel.h);
// returns the previous one.
int64_t set_stream_bytes(int64_t bytes);

// rng.cpp
void philox_bits(int32_t* out, int64_t n, Rng rng, int64_t base);
void noise(void* out, DType dt, int64_t n, Rng rng, int64_t base, int dist);

// nso.cpp
// grad (dtype dt, may be null): zeroed in the same pass.
void perturb(void* w, void* w0, void* grad, DType dt, int64_t n, Rng rng, int64_t base, int dist, float sigma,
             bool save);
void accumulate(float* acc, void* grad, DType grad_dt, int64_t n, float weight, bool init,
                bool zero_grad);
// accumulate then perturb in one pass (grad has dtype dt; acc, grad share no memory with w, w0)
void accumulate_perturb(void* w, void* w0, float* acc, void* grad, DType dt, int64_t n, Rng rng, int64_t base,
                        int dist, float sigma, bool save, float weight, bool init, bool zero_grad);

// restore.cpp
// grad = 0: each thread's chunk with one memset (glibc streams large ones; docs/kernels.md).
void zero(void* grad, DType dt, int64_t n);
void restore(void* w, const void* w0, void* grad, const void* src, DType dt, DType src_dt, int64_t n,
             float scale);

// base_step.cpp
void sgd_step(void* w, const void* w0, void* grad, const void* src, void* momentum_buffer,
              DType dt, DType src_dt, int64_t n, const SGDParams& p, bool write_grad);
void adam_step(void* w, const void* w0, void* grad, const void* src, void* exp_avg,
               void* exp_avg_sq, DType dt, DType src_dt, int64_t n, const AdamParams& p,
               bool write_grad);

// sam.cpp
// Sum over j of grad_norm_term(grad[j], w[j]) (w null: of grad[j] alone), in double, in an order
// fixed by n (grad and w have dtype dt).
double grad_norm_sq(const void* grad, const void* w, DType dt, int64_t n);
// w0 = w; if g0: g0 = grad; w = sam_ascent_math(w, grad, scale, adaptive); if zero_grad: grad = 0.
// w, w0, grad, g0 share dtype dt and no memory.
void sam_ascent(void* w, void* w0, void* grad, void* g0, DType dt, int64_t n, float scale, bool adaptive,
                bool zero_grad);

}  // namespace cpu
}  // namespace flatfused
