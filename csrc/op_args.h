// What each op accepts (docs/kernels.md), checked alike by the CPU and CUDA registrations
// (csrc/cpu/register.cpp, csrc/cuda/ops_cuda.cpp): one place for every op's argument checks,
// so the backends cannot drift apart and the checks the CUDA ops run are the ones the CPU tests
// exercise. A failed check raises a c10::Error (RuntimeError in Python) whose message starts
// with "flatfused.<op>: "; the memory-overlap rules come last (aliasing.h).
//
// Each per-op function returns what its kernels need beyond the tensors themselves: storage
// dtypes (as at::ScalarType; each backend maps them to its own enum) and the optional operands
// that are present.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "aliasing.h"
#include "dtype_code.h"
#include "philox.h"

namespace flatfused {
namespace op_args {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The present tensor of an optional argument, or null (an undefined tensor counts as absent).
inline const Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// The kernels' dtype code of a dtype the checks below accepted (fp32, bf16, fp16).
inline DType dtype_code(at::ScalarType t) {
  return t == at::kBFloat16 ? DType::kBFloat16 : t == at::kHalf ? DType::kFloat16 : DType::kFloat32;
}

inline const char* kind_name(c10::DeviceType kind) { return kind == c10::DeviceType::CPU ? "CPU" : "CUDA"; }

// The operands of one call of `op`. The lead operand sets the device (of the registration's
// kind) and the length n that every vector operand has.
class Operands {
 public:
  Operands(const char* op, c10::DeviceType kind, const char* lead_name, const Tensor& lead)
      : op_(op), lead_name_(lead_name), device_(kind) {
    TORCH_CHECK(lead.defined(), "flatfused.", op, ": ", lead_name, " is undefined");
    TORCH_CHECK(lead.device().type() == kind, "flatfused.", op, " (", kind_name(kind), " kernel): ", lead_name,
                " must be a ", kind_name(kind), " tensor, got one on ", lead.device());
    device_ = lead.device();
    n_ = lead.numel();
    vector(lead_name, lead);
  }

  // Defined, on the lead's device, 1-D, contiguous, n elements.
  void vector(const char* name, const Tensor& t) const {
    on_device(name, t);
    TORCH_CHECK(t.dim() == 1, "flatfused.", op_, ": ", name, " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "flatfused.", op_, ": ", name, " must be contiguous");
    TORCH_CHECK(t.numel() == n_, "flatfused.", op_, ": ", name, " has ", t.numel(), " elements but ", lead_name_,
                " has ", n_);
  }

  // A vector of a parameter dtype (float32, bfloat16, float16); returns it.
  at::ScalarType floating(const char* name, const Tensor& t) const {
    vector(name, t);
    const at::ScalarType dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "flatfused.", op_, ": ", name,
                " must be float32, bfloat16 or float16, got ", dt);
    return dt;
  }

  // A vector with the dtype of ref (a parameter-like operand).
  void like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) const {
    vector(name, t);
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "flatfused.", op_, ": ", name, " (", t.scalar_type(),
                ") must have the dtype of ", ref_name, " (", ref.scalar_type(), ")");
  }

  // An fp32 vector (an accumulator).
  void fp32(const char* name, const Tensor& t) const {
    vector(name, t);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "flatfused.", op_, ": ", name, " must be float32, got ",
                t.scalar_type());
  }

  // The gradient source src: fp32 (an accumulator) or the parameters' dtype; returns its dtype.
  at::ScalarType src(const Tensor& t, const Tensor& w) const {
    vector("src", t);
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == w.scalar_type(), "flatfused.", op_,
                ": src must be float32 or have the parameters' dtype (", w.scalar_type(), "), got ",
                t.scalar_type());
    return t.scalar_type();
  }

  // rng: int64 [seed, offset], contiguous, on the lead's device (the kernels read it there).
  void rng(const Tensor& t) const {
    on_device("rng", t);
    TORCH_CHECK(t.scalar_type() == at::kLong, "flatfused.", op_, ": rng must be int64 [seed, offset], got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.numel() == 2, "flatfused.", op_,
                ": rng must be a 1-D tensor of 2 elements [seed, offset], got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "flatfused.", op_, ": rng must be contiguous");
  }

  // The logical index of element 0 (docs/rng.md).
  void base(int64_t base) const {
    TORCH_CHECK(base >= 0, "flatfused.", op_, ": base (logical index of element 0) must be >= 0, got ", base);
  }

  int dist(int64_t dist) const {
    TORCH_CHECK(dist >= kNormal && dist <= kCauchy, "flatfused.", op_,
                ": dist must be 0 (normal), 1 (laplace), 2 (uniform), 3 (binomial) or 4 (cauchy), got ", dist);
    return static_cast<int>(dist);
  }

  // An fp32 scalar of shape [1] on the lead's device (a norm, read or accumulated on the device).
  void scalar(const char* name, const Tensor& t) const {
    on_device(name, t);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "flatfused.", op_, ": ", name, " must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.numel() == 1, "flatfused.", op_, ": ", name, " must have shape [1], got ",
                t.sizes());
  }

 private:
  void on_device(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.defined(), "flatfused.", op_, ": ", name, " is undefined");
    TORCH_CHECK(t.device() == device_, "flatfused.", op_, ": ", name, " is on ", t.device(), " but ", lead_name_,
                " is on ", device_);
  }

  const char* op_;
  const char* lead_name_;
  c10::Device device_;
  int64_t n_ = 0;
};

// ---------------------------------------------------------------------------- per op

inline void philox_bits(c10::DeviceType kind, const Tensor& out, const Tensor& rng, int64_t base) {
  const Operands a("philox_bits_", kind, "out", out);
  TORCH_CHECK(out.scalar_type() == at::kInt, "flatfused.philox_bits_: out must be int32, got ", out.scalar_type());
  a.rng(rng);
  a.base(base);
  aliasing::out_rng("philox_bits_", out, rng);
}

struct Noise {
  at::ScalarType dtype;
  int dist;
};

inline Noise noise(c10::DeviceType kind, const Tensor& out, const Tensor& rng, int64_t base, int64_t dist) {
  const Operands a("noise_", kind, "out", out);
  const Noise r{a.floating("out", out), a.dist(dist)};
  a.rng(rng);
  a.base(base);
  aliasing::out_rng("noise_", out, rng);
  return r;
}

struct Perturb {
  at::ScalarType dtype;  // of w, w0 and grad
  int dist;
  const Tensor* grad;    // perturb_'s optional grad
};

inline Perturb perturb(c10::DeviceType kind, const Tensor& w, const Tensor& w0, const Tensor& rng, int64_t base,
                       int64_t dist, const OptTensor& grad_opt) {
  const Operands a("perturb_", kind, "w", w);
  const Perturb r{a.floating("w", w), a.dist(dist), present(grad_opt)};
  a.like("w0", w0, "w", w);
  if (r.grad != nullptr) a.like("grad", *r.grad, "w", w);
  a.rng(rng);
  a.base(base);
  aliasing::perturb(w, w0, r.grad, rng);
  return r;
}

// Returns grad's dtype.
inline at::ScalarType zero(c10::DeviceType kind, const Tensor& grad) {
  const Operands a("zero_", kind, "grad", grad);
  return a.floating("grad", grad);
}

// Returns grad's dtype (acc is fp32).
inline at::ScalarType accumulate(c10::DeviceType kind, const Tensor& acc, const Tensor& grad) {
  const Operands a("accumulate_", kind, "acc", acc);
  a.fp32("acc", acc);
  const at::ScalarType dt = a.floating("grad", grad);
  aliasing::accumulate(acc, grad);
  return dt;
}

inline Perturb accumulate_perturb(c10::DeviceType kind, const Tensor& w, const Tensor& w0, const Tensor& acc,
                                  const Tensor& grad, const Tensor& rng, int64_t base, int64_t dist) {
  const Operands a("accumulate_perturb_", kind, "w", w);
  const Perturb r{a.floating("w", w), a.dist(dist), &grad};
  a.like("w0", w0, "w", w);
  a.like("grad", grad, "w", w);
  a.fp32("acc", acc);
  a.rng(rng);
  a.base(base);
  aliasing::accumulate_perturb(w, w0, acc, grad, rng);
  return r;
}

// The optional operands of restore_ and the base steps, with the dtypes of the parameters and of src.
struct Step {
  at::ScalarType dtype;
  at::ScalarType src_dtype;  // dtype when there is no src
  const Tensor* w0;          // the starting point; null: absent, or w itself (docs/kernels.md)
  const Tensor* grad;        // restore_'s optional grad (the base steps' grad is required)
  const Tensor* src;         // null when absent (restore_: also without grad, which ignores it)
  const Tensor* state;       // sgd_step_'s momentum buffer
};

inline Step restore(c10::DeviceType kind, const Tensor& w, const Tensor& w0, const OptTensor& grad_opt,
                    const OptTensor& src_opt) {
  const Operands a("restore_", kind, "w", w);
  const at::ScalarType dt = a.floating("w", w);
  Step r{dt, dt, aliasing::unless_w(&w0, w), present(grad_opt), present(src_opt), nullptr};
  a.like("w0", w0, "w", w);
  if (r.grad != nullptr) {
    a.like("grad", *r.grad, "w", w);
    if (r.src != nullptr) r.src_dtype = a.src(*r.src, w);
  } else {
    r.src = nullptr;
  }
  aliasing::restore(w, w0, r.grad, r.src);
  return r;
}

// What sgd_step_ and adam_step_ share: w, grad, the optional w0 and src, and Weighted SAM's
// weights, which mix grad with src (the saved gradient) and so need one.
inline Step base_step(const Operands& a, const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                      const OptTensor& src_opt, double grad_weight, double sharpness_weight, const char* op) {
  const Tensor* src = present(src_opt);
  TORCH_CHECK(src != nullptr || (grad_weight == 0.0 && sharpness_weight == 0.0), "flatfused.", op,
              ": grad_weight and sharpness_weight need src (the saved gradient), got grad_weight=", grad_weight,
              ", sharpness_weight=", sharpness_weight, " without src");
  const at::ScalarType dt = a.floating("w", w);
  a.like("grad", grad, "w", w);
  const Tensor* w0 = present(w0_opt);
  if (w0 != nullptr) a.like("w0", *w0, "w", w);
  return Step{dt, src != nullptr ? a.src(*src, w) : dt, aliasing::unless_w(w0, w), &grad, src, nullptr};
}

inline Step sgd_step(c10::DeviceType kind, const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                     const OptTensor& src_opt, const OptTensor& momentum_buffer_opt, double grad_weight,
                     double sharpness_weight) {
  const Operands a("sgd_step_", kind, "w", w);
  Step r = base_step(a, w, w0_opt, grad, src_opt, grad_weight, sharpness_weight, "sgd_step_");
  r.state = present(momentum_buffer_opt);
  if (r.state != nullptr) a.like("momentum_buffer", *r.state, "w", w);
  aliasing::sgd_step(w, r.w0, grad, r.src, r.state);
  return r;
}

inline Step adam_step(c10::DeviceType kind, const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                      const OptTensor& src_opt, const Tensor& exp_avg, const Tensor& exp_avg_sq, double grad_weight,
                      double sharpness_weight) {
  const Operands a("adam_step_", kind, "w", w);
  const Step r = base_step(a, w, w0_opt, grad, src_opt, grad_weight, sharpness_weight, "adam_step_");
  a.like("exp_avg", exp_avg, "w", w);
  a.like("exp_avg_sq", exp_avg_sq, "w", w);
  aliasing::adam_step(w, r.w0, grad, r.src, exp_avg, exp_avg_sq);
  return r;
}

struct GradNormSq {
  at::ScalarType dtype;  // of grad and w
  const Tensor* w;       // null when absent
};

inline GradNormSq grad_norm_sq(c10::DeviceType kind, const Tensor& out, const Tensor& grad, const OptTensor& w_opt) {
  const Operands a("grad_norm_sq_", kind, "grad", grad);
  const GradNormSq r{a.floating("grad", grad), present(w_opt)};
  if (r.w != nullptr) a.like("w", *r.w, "grad", grad);
  a.scalar("out", out);
  aliasing::grad_norm_sq(out, grad, r.w);
  return r;
}

struct SamAscent {
  at::ScalarType dtype;  // of w, w0, grad and g0
  const Tensor* g0;      // null when absent
};

inline SamAscent sam_ascent(c10::DeviceType kind, const Tensor& w, const Tensor& w0, const Tensor& grad,
                            const OptTensor& g0_opt, const Tensor& norm_sq) {
  const Operands a("sam_ascent_", kind, "w", w);
  const SamAscent r{a.floating("w", w), present(g0_opt)};
  a.like("w0", w0, "w", w);
  a.like("grad", grad, "w", w);
  if (r.g0 != nullptr) a.like("g0", *r.g0, "w", w);
  a.scalar("norm_sq", norm_sq);
  aliasing::sam_ascent(w, w0, grad, r.g0, norm_sq);
  return r;
}

}  // namespace op_args
}  // namespace flatfused
