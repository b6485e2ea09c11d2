// TORCH_LIBRARY_IMPL(flatfused, CPU): argument checks, then the raw kernels of kernels.h.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "../aliasing.h"
#include "../philox.h"
#include "kernels.h"

namespace flatfused {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

const Tensor* get(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

void check_flat(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "flatfused.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "flatfused.", op, " (CPU kernel): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 1, "flatfused.", op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "flatfused.", op, ": ", name, " must be contiguous");
}

void check_numel(const Tensor& t, int64_t n, const char* op, const char* name, const char* ref) {
  TORCH_CHECK(t.numel() == n, "flatfused.", op, ": ", name, " has ", t.numel(), " elements but ", ref, " has ",
              n);
}

DType param_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default:
      TORCH_CHECK(false, "flatfused.", op, ": ", name, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
  return DType::kFloat;
}

void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "flatfused.", op, ": ", name, " (", t.scalar_type(),
              ") must have the dtype of ", ref_name, " (", ref.scalar_type(), ")");
}

void check_fp32(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "flatfused.", op, ": ", name, " must be float32, got ",
              t.scalar_type());
}

// A parameter-like operand: flat, CPU, n elements, dtype of ref.
void check_param(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  check_flat(t, op, name);
  check_numel(t, ref.numel(), op, name, ref_name);
  check_same_dtype(t, ref, op, name, ref_name);
}

// The gradient source src: n elements, fp32 (an accumulator) or the parameters' dtype.
DType check_src(const Tensor& src, const Tensor& w, const char* op) {
  check_flat(src, op, "src");
  check_numel(src, w.numel(), op, "src", "w");
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == w.scalar_type(), "flatfused.", op,
              ": src must be float32 or have the parameters' dtype (", w.scalar_type(), "), got ",
              src.scalar_type());
  return param_dtype(src, op, "src");
}

Rng read_rng(const Tensor& rng, const char* op) {
  TORCH_CHECK(rng.defined() && rng.device().is_cpu(), "flatfused.", op,
              " (CPU kernel): rng must be a CPU tensor [seed, offset]");
  TORCH_CHECK(rng.scalar_type() == at::kLong, "flatfused.", op, ": rng must be int64 [seed, offset], got ",
              rng.scalar_type());
  TORCH_CHECK(rng.dim() == 1 && rng.numel() == 2, "flatfused.", op,
              ": rng must be a 1-D tensor of 2 elements [seed, offset], got shape ", rng.sizes());
  const int64_t* r = rng.const_data_ptr<int64_t>();
  return Rng{static_cast<uint64_t>(r[0]), static_cast<uint64_t>(r[rng.stride(0)])};
}

void check_base(int64_t base, const char* op) {
  TORCH_CHECK(base >= 0, "flatfused.", op, ": base (logical index of element 0) must be >= 0, got ", base);
}

void check_dist(int64_t dist, const char* op) {
  TORCH_CHECK(dist >= kNormal && dist <= kCauchy, "flatfused.", op,
              ": dist must be 0 (normal), 1 (laplace), 2 (uniform), 3 (binomial) or 4 (cauchy), got ", dist);
}

void philox_bits_cpu(const Tensor& out, const Tensor& rng, int64_t base) {
  const char* op = "philox_bits_";
  check_flat(out, op, "out");
  TORCH_CHECK(out.scalar_type() == at::kInt, "flatfused.", op, ": out must be int32, got ", out.scalar_type());
  const Rng r = read_rng(rng, op);
  check_base(base, op);
  aliasing::out_rng(op, out, rng);
  if (out.numel() == 0) return;
  philox_bits(out.mutable_data_ptr<int32_t>(), out.numel(), r, base);
}

void noise_cpu(const Tensor& out, const Tensor& rng, int64_t base, int64_t dist) {
  const char* op = "noise_";
  check_flat(out, op, "out");
  const DType dt = param_dtype(out, op, "out");
  const Rng r = read_rng(rng, op);
  check_base(base, op);
  check_dist(dist, op);
  aliasing::out_rng(op, out, rng);
  if (out.numel() == 0) return;
  noise(out.mutable_data_ptr(), dt, out.numel(), r, base, static_cast<int>(dist));
}

void perturb_cpu(const Tensor& w, const Tensor& w0, const Tensor& rng, int64_t base, int64_t dist, double sigma,
                 bool save, const OptTensor& grad_opt) {
  const char* op = "perturb_";
  check_flat(w, op, "w");
  const DType dt = param_dtype(w, op, "w");
  check_param(w0, w, op, "w0", "w");
  const Tensor* grad = get(grad_opt);
  const Rng r = read_rng(rng, op);
  check_base(base, op);
  check_dist(dist, op);
  if (grad != nullptr) check_param(*grad, w, op, "grad", "w");
  aliasing::perturb(w, w0, grad, rng);
  if (w.numel() == 0) return;
  perturb(w.mutable_data_ptr(), w0.mutable_data_ptr(), grad != nullptr ? grad->mutable_data_ptr() : nullptr, dt,
          w.numel(), r, base, static_cast<int>(dist), static_cast<float>(sigma), save);
}

void zero_cpu(const Tensor& grad) {
  const char* op = "zero_";
  check_flat(grad, op, "grad");
  const DType dt = param_dtype(grad, op, "grad");
  if (grad.numel() == 0) return;
  zero(grad.mutable_data_ptr(), dt, grad.numel());
}

void accumulate_cpu(const Tensor& acc, const Tensor& grad, double weight, bool init, bool zero_grad) {
  const char* op = "accumulate_";
  check_flat(acc, op, "acc");
  check_fp32(acc, op, "acc");
  check_flat(grad, op, "grad");
  check_numel(grad, acc.numel(), op, "grad", "acc");
  const DType dt = param_dtype(grad, op, "grad");
  aliasing::accumulate(acc, grad);
  if (acc.numel() == 0) return;
  accumulate(acc.mutable_data_ptr<float>(), grad.mutable_data_ptr(), dt, acc.numel(), static_cast<float>(weight),
             init, zero_grad);
}

void accumulate_perturb_cpu(const Tensor& w, const Tensor& w0, const Tensor& acc, const Tensor& grad,
                            const Tensor& rng, int64_t base, int64_t dist, double sigma, bool save, double weight,
                            bool init, bool zero_grad) {
  const char* op = "accumulate_perturb_";
  check_flat(w, op, "w");
  const DType dt = param_dtype(w, op, "w");
  check_param(w0, w, op, "w0", "w");
  check_param(grad, w, op, "grad", "w");
  check_flat(acc, op, "acc");
  check_fp32(acc, op, "acc");
  check_numel(acc, w.numel(), op, "acc", "w");
  const Rng r = read_rng(rng, op);
  check_base(base, op);
  check_dist(dist, op);
  aliasing::accumulate_perturb(w, w0, acc, grad, rng);
  if (w.numel() == 0) return;
  accumulate_perturb(w.mutable_data_ptr(), w0.mutable_data_ptr(), acc.mutable_data_ptr<float>(),
                     grad.mutable_data_ptr(), dt, w.numel(), r, base, static_cast<int>(dist),
                     static_cast<float>(sigma), save, static_cast<float>(weight), init, zero_grad);
}

void restore_cpu(const Tensor& w, const Tensor& w0, const OptTensor& grad_opt, const OptTensor& src_opt,
                 double scale) {
  const char* op = "restore_";
  check_flat(w, op, "w");
  const DType dt = param_dtype(w, op, "w");
  check_param(w0, w, op, "w0", "w");
  const Tensor* grad = get(grad_opt);
  const Tensor* src = get(src_opt);
  const bool w0_is_w = aliasing::same_vector(w0, w);  // w = w0 is a no-op
  DType src_dt = dt;
  if (grad != nullptr) {
    check_param(*grad, w, op, "grad", "w");
    if (src != nullptr) src_dt = check_src(*src, w, op);
  } else {
    src = nullptr;  // without grad, src is ignored (docs/kernels.md)
  }
  aliasing::restore(w, w0, grad, src);
  if (w.numel() == 0) return;
  restore(w.mutable_data_ptr(), w0_is_w ? nullptr : w0.const_data_ptr(), grad ? grad->mutable_data_ptr() : nullptr,
          src ? src->const_data_ptr() : nullptr, dt, src_dt, w.numel(), static_cast<float>(scale));
}

// w0 of sgd_step_/adam_step_: null when absent, or when it is w itself (then x = w either way).
const Tensor* start_point(const OptTensor& w0_opt, const Tensor& w) {
  const Tensor* w0 = get(w0_opt);
  if (w0 != nullptr && w0->numel() == w.numel() && w0->scalar_type() == w.scalar_type() && w.numel() > 0 &&
      w0->is_contiguous() && w0->const_data_ptr() == w.const_data_ptr())
    return nullptr;
  return w0;
}

// Common checks of sgd_step_/adam_step_: w, w0?, grad, src?, the Weighted SAM weights (which
// mix grad with src, so need a src); returns the dtype (and src's).
DType check_step(const char* op, const Tensor& w, const Tensor* w0, const Tensor& grad, const Tensor* src,
                 double grad_weight, double sharpness_weight, DType* src_dt) {
  TORCH_CHECK(src != nullptr || (grad_weight == 0.0 && sharpness_weight == 0.0), "flatfused.", op,
              ": grad_weight and sharpness_weight need src (the saved gradient), got grad_weight=", grad_weight,
              ", sharpness_weight=", sharpness_weight, " without src");
  check_flat(w, op, "w");
  const DType dt = param_dtype(w, op, "w");
  check_param(grad, w, op, "grad", "w");
  if (w0 != nullptr) check_param(*w0, w, op, "w0", "w");
  *src_dt = src != nullptr ? check_src(*src, w, op) : dt;
  return dt;
}

void sgd_step_cpu(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad, const OptTensor& src_opt,
                  const OptTensor& momentum_buffer_opt, double scale, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool first_step, bool write_grad,
                  double grad_weight, double sharpness_weight) {
  const char* op = "sgd_step_";
  const Tensor* w0 = start_point(w0_opt, w);
  const Tensor* src = get(src_opt);
  const Tensor* buf = get(momentum_buffer_opt);
  DType src_dt;
  const DType dt = check_step(op, w, w0, grad, src, grad_weight, sharpness_weight, &src_dt);
  if (buf != nullptr) check_param(*buf, w, op, "momentum_buffer", "w");
  aliasing::sgd_step(w, w0, grad, src, buf);
  if (w.numel() == 0) return;
  const SGDParams p = make_sgd_params(scale, lr, momentum, dampening, weight_decay, nesterov, maximize,
                                      first_step, buf != nullptr, grad_weight, sharpness_weight);
  sgd_step(w.mutable_data_ptr(), w0 ? w0->const_data_ptr() : nullptr, grad.mutable_data_ptr(),
           src ? src->const_data_ptr() : nullptr, buf ? buf->mutable_data_ptr() : nullptr, dt, src_dt, w.numel(), p,
           write_grad);
}

void adam_step_cpu(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad, const OptTensor& src_opt,
                   const Tensor& exp_avg, const Tensor& exp_avg_sq, double scale, double lr, double beta1,
                   double beta2, double eps, double weight_decay, double step_size, double bias_correction2_sqrt,
                   bool decoupled, bool maximize, bool write_grad, double grad_weight, double sharpness_weight) {
  const char* op = "adam_step_";
  const Tensor* w0 = start_point(w0_opt, w);
  const Tensor* src = get(src_opt);
  DType src_dt;
  const DType dt = check_step(op, w, w0, grad, src, grad_weight, sharpness_weight, &src_dt);
  check_param(exp_avg, w, op, "exp_avg", "w");
  check_param(exp_avg_sq, w, op, "exp_avg_sq", "w");
  aliasing::adam_step(w, w0, grad, src, exp_avg, exp_avg_sq);
  if (w.numel() == 0) return;
  const AdamParams p = make_adam_params(scale, lr, beta1, beta2, eps, weight_decay, step_size,
                                        bias_correction2_sqrt, decoupled, maximize, grad_weight, sharpness_weight);
  adam_step(w.mutable_data_ptr(), w0 ? w0->const_data_ptr() : nullptr, grad.mutable_data_ptr(),
            src ? src->const_data_ptr() : nullptr, exp_avg.mutable_data_ptr(), exp_avg_sq.mutable_data_ptr(),
            dt, src_dt, w.numel(), p, write_grad);
}

// out / norm_sq of the SAM ops: the fp32 scalar, shape [1], on the CPU.
void check_scalar(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "flatfused.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "flatfused.", op, " (CPU kernel): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "flatfused.", op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == 1, "flatfused.", op, ": ", name, " must have shape [1], got ",
              t.sizes());
}

void grad_norm_sq_cpu(const Tensor& out, const Tensor& grad, const OptTensor& w_opt) {
  const char* op = "grad_norm_sq_";
  check_scalar(out, op, "out");
  check_flat(grad, op, "grad");
  const DType dt = param_dtype(grad, op, "grad");
  const Tensor* w = get(w_opt);
  if (w != nullptr) check_param(*w, grad, op, "w", "grad");
  aliasing::grad_norm_sq(out, grad, w);
  if (grad.numel() == 0) return;
  const double total = grad_norm_sq(grad.const_data_ptr(), w ? w->const_data_ptr() : nullptr, dt, grad.numel());
  float* o = out.mutable_data_ptr<float>();
  o[0] = o[0] + static_cast<float>(total);
}

void sam_ascent_cpu(const Tensor& w, const Tensor& w0, const Tensor& grad, const OptTensor& g0_opt,
                    const Tensor& norm_sq, double rho, double eps, bool adaptive, bool zero_grad) {
  const char* op = "sam_ascent_";
  check_flat(w, op, "w");
  const DType dt = param_dtype(w, op, "w");
  check_param(w0, w, op, "w0", "w");
  check_param(grad, w, op, "grad", "w");
  const Tensor* g0 = get(g0_opt);
  check_scalar(norm_sq, op, "norm_sq");
  if (g0 != nullptr) check_param(*g0, w, op, "g0", "w");
  aliasing::sam_ascent(w, w0, grad, g0, norm_sq);
  if (w.numel() == 0) return;
  const float scale = sam_scale(norm_sq.const_data_ptr<float>()[0], static_cast<float>(rho), static_cast<float>(eps));
  sam_ascent(w.mutable_data_ptr(), w0.mutable_data_ptr(), grad.mutable_data_ptr(), g0 ? g0->mutable_data_ptr() : nullptr,
             dt, w.numel(), scale, adaptive, zero_grad);
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
