// CPU kernels of the fused restore + base optimizer steps: sgd_step_, adam_step_, with Weighted
// SAM's grad_weight / sharpness_weight terms (docs/kernels.md; per-element math in
// csrc/step_math.h). The host part; the per-instruction-set loops are base_step_isa.h, compiled
// once per instruction set in base_step_{avx512,avx2,generic}.cpp (the layout of rng.cpp, with
// the instruction sets in files of their own because they take minutes to compile).
#include "isa.h"
#include "kernels.h"
#include "parallel.h"

FF_ISA_DECLARE(
    void sgd_range(void* w, const void* w0, void* grad, const void* src, void* mom, DType dt, DType src_dt,
                   int64_t j0, int64_t j1, const SGDParams& p, bool write_grad, bool stream);
    void adam_range(void* w, const void* w0, void* grad, const void* src, void* exp_avg, void* exp_avg_sq,
                    DType dt, DType src_dt, int64_t j0, int64_t j1, const AdamParams& p, bool write_grad,
                    bool stream);)

namespace flatfused {
namespace cpu {

void sgd_step(void* w, const void* w0, void* grad, const void* src, void* momentum_buffer, DType dt, DType src_dt,
              int64_t n, const SGDParams& p, bool write_grad) {
  const int64_t bytes = element_size(dt) * (momentum_buffer != nullptr ? 4 : 3) + operand_bytes(src, src_dt);
  const bool stream = w0 != nullptr && streams(n, bytes);
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(sgd_range, w, w0, grad, src, momentum_buffer, dt, src_dt, j0, j1, p, write_grad, stream);
  });
}

void adam_step(void* w, const void* w0, void* grad, const void* src, void* exp_avg, void* exp_avg_sq, DType dt,
               DType src_dt, int64_t n, const AdamParams& p, bool write_grad) {
  const bool stream = w0 != nullptr && streams(n, element_size(dt) * 5 + operand_bytes(src, src_dt));
  parallel_elementwise(n, [&](int64_t j0, int64_t j1) {
    FF_ISA_CALL(adam_range, w, w0, grad, src, exp_avg, exp_avg_sq, dt, src_dt, j0, j1, p, write_grad, stream);
  });
}

}  // namespace cpu
}  // namespace flatfused
