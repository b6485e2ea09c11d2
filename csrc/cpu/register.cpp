// TORCH_LIBRARY_IMPL(flatfused, CPU): the argument checks of csrc/op_args.h, then the raw kernels of
// kernels.h.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "../op_args.h"
#include "kernels.h"

namespace flatfused {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr c10::DeviceType kCpu = c10::DeviceType::CPU;

DType code(at::ScalarType t) { return op_args::dtype_code(t); }

void* ptr(const Tensor* t) { return t != nullptr ? t->mutable_data_ptr() : nullptr; }

// [seed, offset] of a checked rng tensor (on the CPU: read here, once per call).
Rng read_rng(const Tensor& rng) {
  const int64_t* r = rng.const_data_ptr<int64_t>();
  return Rng{static_cast<uint64_t>(r[0]), static_cast<uint64_t>(r[1])};
}

void philox_bits_cpu(const Tensor& out, const Tensor& rng, int64_t base) {
  op_args::philox_bits(kCpu, out, rng, base);
  if (out.numel() == 0) return;
  philox_bits(out.mutable_data_ptr<int32_t>(), out.numel(), read_rng(rng), base);
}

void noise_cpu(const Tensor& out, const Tensor& rng, int64_t base, int64_t dist) {
  const op_args::Noise a = op_args::noise(kCpu, out, rng, base, dist);
  if (out.numel() == 0) return;
  noise(out.mutable_data_ptr(), code(a.dtype), out.numel(), read_rng(rng), base, a.dist);
}

void perturb_cpu(const Tensor& w, const Tensor& w0, const Tensor& rng, int64_t base, int64_t dist, double sigma,
                 bool save, const OptTensor& grad_opt) {
  const op_args::Perturb a = op_args::perturb(kCpu, w, w0, rng, base, dist, grad_opt);
  if (w.numel() == 0) return;
  perturb(w.mutable_data_ptr(), w0.mutable_data_ptr(), ptr(a.grad), code(a.dtype), w.numel(), read_rng(rng), base,
          a.dist, static_cast<float>(sigma), save);
}

void zero_cpu(const Tensor& grad) {
  const DType dt = code(op_args::zero(kCpu, grad));
  if (grad.numel() == 0) return;
  zero(grad.mutable_data_ptr(), dt, grad.numel());
}

void accumulate_cpu(const Tensor& acc, const Tensor& grad, double weight, bool init, bool zero_grad) {
  const DType dt = code(op_args::accumulate(kCpu, acc, grad));
  if (acc.numel() == 0) return;
  accumulate(acc.mutable_data_ptr<float>(), grad.mutable_data_ptr(), dt, acc.numel(), static_cast<float>(weight),
             init, zero_grad);
}

void accumulate_perturb_cpu(const Tensor& w, const Tensor& w0, const Tensor& acc, const Tensor& grad,
                            const Tensor& rng, int64_t base, int64_t dist, double sigma, bool save, double weight,
                            bool init, bool zero_grad) {
  const op_args::Perturb a = op_args::accumulate_perturb(kCpu, w, w0, acc, grad, rng, base, dist);
  if (w.numel() == 0) return;
  accumulate_perturb(w.mutable_data_ptr(), w0.mutable_data_ptr(), acc.mutable_data_ptr<float>(),
                     grad.mutable_data_ptr(), code(a.dtype), w.numel(), read_rng(rng), base, a.dist,
                     static_cast<float>(sigma), save, static_cast<float>(weight), init, zero_grad);
}

void restore_cpu(const Tensor& w, const Tensor& w0, const OptTensor& grad_opt, const OptTensor& src_opt,
                 double scale) {
  const op_args::Step a = op_args::restore(kCpu, w, w0, grad_opt, src_opt);
  if (w.numel() == 0) return;
  // a.w0 is null where w0 is w: then w = w0 is a no-op.
  restore(w.mutable_data_ptr(), ptr(a.w0), ptr(a.grad), ptr(a.src), code(a.dtype), code(a.src_dtype), w.numel(),
          static_cast<float>(scale));
}

void sgd_step_cpu(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad, const OptTensor& src_opt,
                  const OptTensor& momentum_buffer_opt, double scale, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool first_step, bool write_grad,
                  double grad_weight, double sharpness_weight) {
  const op_args::Step a =
      op_args::sgd_step(kCpu, w, w0_opt, grad, src_opt, momentum_buffer_opt, grad_weight, sharpness_weight);
  if (w.numel() == 0) return;
  const SGDParams p = make_sgd_params(scale, lr, momentum, dampening, weight_decay, nesterov, maximize,
                                      first_step, a.state != nullptr, grad_weight, sharpness_weight);
  sgd_step(w.mutable_data_ptr(), ptr(a.w0), grad.mutable_data_ptr(), ptr(a.src), ptr(a.state), code(a.dtype),
           code(a.src_dtype), w.numel(), p, write_grad);
}

void adam_step_cpu(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad, const OptTensor& src_opt,
                   const Tensor& exp_avg, const Tensor& exp_avg_sq, double scale, double lr, double beta1,
                   double beta2, double eps, double weight_decay, double step_size, double bias_correction2_sqrt,
                   bool decoupled, bool maximize, bool write_grad, double grad_weight, double sharpness_weight) {
  const op_args::Step a =
      op_args::adam_step(kCpu, w, w0_opt, grad, src_opt, exp_avg, exp_avg_sq, grad_weight, sharpness_weight);
  if (w.numel() == 0) return;
  const AdamParams p = make_adam_params(scale, lr, beta1, beta2, eps, weight_decay, step_size,
                                        bias_correction2_sqrt, decoupled, maximize, grad_weight, sharpness_weight);
  adam_step(w.mutable_data_ptr(), ptr(a.w0), grad.mutable_data_ptr(), ptr(a.src), exp_avg.mutable_data_ptr(),
            exp_avg_sq.mutable_data_ptr(), code(a.dtype), code(a.src_dtype), w.numel(), p, write_grad);
}

void grad_norm_sq_cpu(const Tensor& out, const Tensor& grad, const OptTensor& w_opt) {
  const op_args::GradNormSq a = op_args::grad_norm_sq(kCpu, out, grad, w_opt);
  if (grad.numel() == 0) return;
  const double total = grad_norm_sq(grad.const_data_ptr(), ptr(a.w), code(a.dtype), grad.numel());
  float* o = out.mutable_data_ptr<float>();
  o[0] = o[0] + static_cast<float>(total);
}

void sam_ascent_cpu(const Tensor& w, const Tensor& w0, const Tensor& grad, const OptTensor& g0_opt,
                    const Tensor& norm_sq, double rho, double eps, bool adaptive, bool zero_grad) {
  const op_args::SamAscent a = op_args::sam_ascent(kCpu, w, w0, grad, g0_opt, norm_sq);
  if (w.numel() == 0) return;
  const float scale = sam_scale(norm_sq.const_data_ptr<float>()[0], static_cast<float>(rho), static_cast<float>(eps));
  sam_ascent(w.mutable_data_ptr(), w0.mutable_data_ptr(), grad.mutable_data_ptr(), ptr(a.g0), code(a.dtype),
             w.numel(), scale, adaptive, zero_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace flatfused

TORCH_LIBRARY_IMPL(flatfused, CPU, m) {
  using namespace flatfused::cpu;
  m.impl("philox_bits_", &philox_bits_cpu);
  m.impl("noise_", &noise_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("zero_", &zero_cpu);
  m.impl("accumulate_", &accumulate_cpu);
  m.impl("accumulate_perturb_", &accumulate_perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("grad_norm_sq_", &grad_norm_sq_cpu);
  m.impl("sam_ascent_", &sam_ascent_cpu);
}
