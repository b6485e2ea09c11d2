// C entry points over the CUDA launchers (csrc/cuda/launchers.h) for ctypes, doing what
// csrc/cuda/ops_cuda.cpp does between its argument checks and the launch: the same scalar
// conversions and optimizer coefficients (csrc/step_math.h), a null stream. Each returns 0, the
// launcher's cudaError_t, or -1 for an error of the emulated kernel (ffe_error()).
#include "../../csrc/cuda/launchers.h"

#include "cuda_emulation.h"

namespace ff_emulation {
const char* error();
void clear_error();
void set_device(int device, int sm_count);
}  // namespace ff_emulation

namespace fl = flatfused::cuda_launchers;

namespace {

fl::DType dtype_of(int code) { return static_cast<fl::DType>(code); }

int finish(cudaError_t status) {
  if (status != cudaSuccess) return static_cast<int>(status);
  return ff_emulation::error()[0] == '\0' ? 0 : -1;
}

}  // namespace

extern "C" {

const char* ffe_error() { return ff_emulation::error(); }

void ffe_clear_error() { ff_emulation::clear_error(); }

void ffe_set_device(int device, int sm_count) { ff_emulation::set_device(device, sm_count); }

int ffe_philox_bits(int32_t* out, int64_t n, const int64_t* rng, int64_t base) {
  ff_emulation::clear_error();
  return finish(fl::launch_philox_bits(out, n, rng, base, nullptr));
}

int ffe_noise(void* out, int dtype, int64_t n, const int64_t* rng, int64_t base, int dist) {
  ff_emulation::clear_error();
  return finish(fl::launch_noise(out, dtype_of(dtype), n, rng, base, dist, nullptr));
}

int ffe_perturb(void* w, void* w0, void* grad, int dtype, int64_t n, const int64_t* rng,
                int64_t base, int dist, double sigma, bool save) {
  ff_emulation::clear_error();
  return finish(fl::launch_perturb(w, w0, grad, dtype_of(dtype), n, rng, base, dist,
                                   static_cast<float>(sigma), save, nullptr));
}

int ffe_accumulate(float* acc, void* grad, int grad_dtype, int64_t n, double weight, bool init,
                   bool zero_grad) {
  ff_emulation::clear_error();
  return finish(fl::launch_accumulate(acc, grad, dtype_of(grad_dtype), n,
                                      static_cast<float>(weight), init, zero_grad, nullptr));
}

int ffe_accumulate_perturb(void* w, void* w0, float* acc, void* grad, int dtype, int64_t n,
                           const int64_t* rng, int64_t base, int dist, double sigma, bool save,
                           double weight, bool init, bool zero_grad) {
  ff_emulation::clear_error();
  return finish(fl::launch_accumulate_perturb(
      w, w0, acc, grad, dtype_of(dtype), n, rng, base, dist, static_cast<float>(sigma), save,
      static_cast<float>(weight), init, zero_grad, nullptr));
}

int ffe_restore(void* w, const void* w0, void* grad, const void* src, int dtype, int src_dtype,
                int64_t n, double scale) {
  ff_emulation::clear_error();
  return finish(fl::launch_restore(w, w0, grad, src, dtype_of(dtype), dtype_of(src_dtype), n,
                                   static_cast<float>(scale), nullptr));
}

int ffe_sgd_step(void* w, const void* w0, void* grad, const void* src, void* momentum_buffer,
                 int dtype, int src_dtype, int64_t n, double scale, double lr, double momentum,
                 double dampening, double weight_decay, bool nesterov, bool maximize,
                 bool first_step, bool write_grad, double grad_weight, double sharpness_weight) {
  ff_emulation::clear_error();
  const flatfused::SGDParams p = flatfused::make_sgd_params(
      scale, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
      momentum_buffer != nullptr, grad_weight, sharpness_weight);
  return finish(fl::launch_sgd_step(w, w0, grad, src, momentum_buffer, dtype_of(dtype),
                                    dtype_of(src_dtype), n, p, write_grad, nullptr));
}

int ffe_adam_step(void* w, const void* w0, void* grad, const void* src, void* exp_avg,
                  void* exp_avg_sq, int dtype, int src_dtype, int64_t n, double scale, double lr,
                  double beta1, double beta2, double eps, double weight_decay, double step_size,
                  double bias_correction2_sqrt, bool decoupled, bool maximize, bool write_grad,
                  double grad_weight, double sharpness_weight) {
  ff_emulation::clear_error();
  const flatfused::AdamParams p = flatfused::make_adam_params(
      scale, lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt, decoupled,
      maximize, grad_weight, sharpness_weight);
  return finish(fl::launch_adam_step(w, w0, grad, src, exp_avg, exp_avg_sq, dtype_of(dtype),
                                     dtype_of(src_dtype), n, p, write_grad, nullptr));
}

int ffe_grad_norm_sq(float* out, const void* grad, const void* w, int dtype, int64_t n,
                     double* partials) {
  ff_emulation::clear_error();
  return finish(fl::launch_grad_norm_sq(out, grad, w, dtype_of(dtype), n, partials, nullptr));
}

int ffe_sam_ascent(void* w, void* w0, void* grad, void* g0, const float* norm_sq, int dtype,
                   int64_t n, double rho, double eps, bool adaptive, bool zero_grad) {
  ff_emulation::clear_error();
  return finish(fl::launch_sam_ascent(w, w0, grad, g0, norm_sq, dtype_of(dtype), n,
                                      static_cast<float>(rho), static_cast<float>(eps), adaptive,
                                      zero_grad, nullptr));
}

}  // extern "C"
