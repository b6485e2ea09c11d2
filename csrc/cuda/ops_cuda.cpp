// CUDA implementations of the flatfused ops (docs/kernels.md; schemas in csrc/ops.cpp).
//
// Host code only: validates the arguments, sets the device guard, takes the current stream and
// calls the plain launchers of csrc/cuda/*.cu (launchers.h). The rng tensor stays on the device
// and is read by the kernels, so no op synchronises with the host (CUDA-graph capturable).
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that
// a minimal CUDA toolkit lacks).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../aliasing.h"
#include "launchers.h"

namespace {

namespace fl = flatfused::cuda_launchers;
namespace aliasing = flatfused::aliasing;

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The present tensor of an optional argument, or nullptr (undefined counts as absent).
const Tensor* present(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// 1-D, contiguous, n elements, on `device` (a CUDA device).
void check_vector(const char* op, const char* name, const Tensor& t, int64_t n,
                  const c10::Device& device) {
  TORCH_CHECK(t.defined(), "flatfused::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "flatfused::", op, " (CUDA): ", name,
              " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "flatfused::", op, ": ", name, " is on ", t.device(),
              " but the other tensors are on ", device);
  TORCH_CHECK(t.dim() == 1, "flatfused::", op, ": ", name, " must be 1-D, got ", t.dim(),
              " dimensions (sizes ", t.sizes(), ")");
  TORCH_CHECK(t.is_contiguous(), "flatfused::", op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == n, "flatfused::", op, ": ", name, " has ", t.numel(),
              " elements, expected ", n, " (all tensors must have the same length)");
}

// The first tensor sets the device and length; it must be a CUDA tensor.
c10::Device lead_device(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.defined(), "flatfused::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "flatfused::", op, " (CUDA): ", name,
              " must be a CUDA tensor, got one on ", t.device());
  return t.device();
}

fl::DType float_dtype(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fl::DType::kFloat32;
    case at::kHalf:
      return fl::DType::kFloat16;
    case at::kBFloat16:
      return fl::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "flatfused::", op, ": ", name,
                  " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return fl::DType::kFloat32;  // unreachable
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "flatfused::", op, ": ", name, " (",
              t.scalar_type(), ") must have the dtype of ", ref_name, " (", ref.scalar_type(),
              ")");
}

// src: fp32 (the accumulator) or the parameters' dtype.
fl::DType src_dtype(const char* op, const Tensor& src, const Tensor& ref) {
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == ref.scalar_type(),
              "flatfused::", op, ": src must be float32 or have the parameters' dtype (",
              ref.scalar_type(), "), got ", src.scalar_type());
  return float_dtype(op, "src", src);
}

// rng: int64 [seed, offset] on the kernel's device.
const int64_t* check_rng(const char* op, const Tensor& rng, const c10::Device& device) {
  TORCH_CHECK(rng.defined(), "flatfused::", op, ": rng is an undefined tensor");
  TORCH_CHECK(rng.scalar_type() == at::kLong, "flatfused::", op,
              ": rng must be an int64 tensor [seed, offset], got ", rng.scalar_type());
  TORCH_CHECK(rng.numel() == 2, "flatfused::", op,
              ": rng must hold 2 elements [seed, offset], got ", rng.numel());
  TORCH_CHECK(rng.device() == device, "flatfused::", op, ": rng must be on the kernel's device ",
              device, ", got ", rng.device());
  TORCH_CHECK(rng.is_contiguous(), "flatfused::", op, ": rng must be contiguous");
  return rng.data_ptr<int64_t>();
}

void check_base(const char* op, int64_t base) {
  TORCH_CHECK(base >= 0, "flatfused::", op, ": base must be >= 0, got ", base);
}

int check_dist(const char* op, int64_t dist) {
  TORCH_CHECK(dist >= 0 && dist <= 4, "flatfused::", op,
              ": dist must be 0 (normal), 1 (laplace), 2 (uniform), 3 (binomial) or 4 (cauchy), "
              "got ", dist);
  return static_cast<int>(dist);
}

// Surfaces the launcher's own CUDA API status, then any launch error.
void finish(cudaError_t status) {
  C10_CUDA_CHECK(status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void philox_bits_cuda(const Tensor& out, const Tensor& rng, int64_t base) {
  constexpr const char* op = "philox_bits_";
  const c10::Device device = lead_device(op, "out", out);
  const int64_t n = out.numel();
  check_vector(op, "out", out, n, device);
  TORCH_CHECK(out.scalar_type() == at::kInt, "flatfused::", op, ": out must be int32, got ",
              out.scalar_type());
  const int64_t* rng_ptr = check_rng(op, rng, device);
  check_base(op, base);
  aliasing::out_rng(op, out, rng);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_philox_bits(out.data_ptr<int32_t>(), n, rng_ptr, base, stream));
}

void noise_cuda(const Tensor& out, const Tensor& rng, int64_t base, int64_t dist) {
  constexpr const char* op = "noise_";
  const c10::Device device = lead_device(op, "out", out);
  const int64_t n = out.numel();
  check_vector(op, "out", out, n, device);
  const fl::DType dtype = float_dtype(op, "out", out);
  const int64_t* rng_ptr = check_rng(op, rng, device);
  check_base(op, base);
  const int d = check_dist(op, dist);
  aliasing::out_rng(op, out, rng);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_noise(out.data_ptr(), dtype, n, rng_ptr, base, d, stream));
}

void perturb_cuda(const Tensor& w, const Tensor& w0, const Tensor& rng, int64_t base,
                  int64_t dist, double sigma, bool save, const OptTensor& grad_opt) {
  constexpr const char* op = "perturb_";
  const c10::Device device = lead_device(op, "w", w);
  const int64_t n = w.numel();
  check_vector(op, "w", w, n, device);
  check_vector(op, "w0", w0, n, device);
  const fl::DType dtype = float_dtype(op, "w", w);
  check_same_dtype(op, "w0", w0, "w", w);
  const Tensor* grad = present(grad_opt);
  if (grad != nullptr) {
    check_vector(op, "grad", *grad, n, device);
    check_same_dtype(op, "grad", *grad, "w", w);
  }
  const int64_t* rng_ptr = check_rng(op, rng, device);
  check_base(op, base);
  const int d = check_dist(op, dist);
  aliasing::perturb(w, w0, grad, rng);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_perturb(w.data_ptr(), w0.data_ptr(), grad ? grad->data_ptr() : nullptr, dtype,
                            n, rng_ptr, base, d, static_cast<float>(sigma), save, stream));
}

void zero_cuda(const Tensor& grad) {
  constexpr const char* op = "zero_";
  const c10::Device device = lead_device(op, "grad", grad);
  const int64_t n = grad.numel();
  check_vector(op, "grad", grad, n, device);
  static_cast<void>(float_dtype(op, "grad", grad));  // the dtype check
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(cudaMemsetAsync(grad.data_ptr(), 0, grad.nbytes(), stream));
}

void accumulate_cuda(const Tensor& acc, const Tensor& grad, double weight, bool init,
                     bool zero_grad) {
  constexpr const char* op = "accumulate_";
  const c10::Device device = lead_device(op, "acc", acc);
  const int64_t n = acc.numel();
  check_vector(op, "acc", acc, n, device);
  check_vector(op, "grad", grad, n, device);
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "flatfused::", op, ": acc must be float32, got ",
              acc.scalar_type());
  const fl::DType grad_dtype = float_dtype(op, "grad", grad);
  aliasing::accumulate(acc, grad);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_accumulate(acc.data_ptr<float>(), grad.data_ptr(), grad_dtype, n,
                               static_cast<float>(weight), init, zero_grad, stream));
}

void accumulate_perturb_cuda(const Tensor& w, const Tensor& w0, const Tensor& acc,
                             const Tensor& grad, const Tensor& rng, int64_t base, int64_t dist,
                             double sigma, bool save, double weight, bool init, bool zero_grad) {
  constexpr const char* op = "accumulate_perturb_";
  const c10::Device device = lead_device(op, "w", w);
  const int64_t n = w.numel();
  check_vector(op, "w", w, n, device);
  check_vector(op, "w0", w0, n, device);
  check_vector(op, "acc", acc, n, device);
  check_vector(op, "grad", grad, n, device);
  const fl::DType dtype = float_dtype(op, "w", w);
  check_same_dtype(op, "w0", w0, "w", w);
  check_same_dtype(op, "grad", grad, "w", w);
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "flatfused::", op, ": acc must be float32, got ",
              acc.scalar_type());
  const int64_t* rng_ptr = check_rng(op, rng, device);
  check_base(op, base);
  const int d = check_dist(op, dist);
  aliasing::accumulate_perturb(w, w0, acc, grad, rng);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_accumulate_perturb(w.data_ptr(), w0.data_ptr(), acc.data_ptr<float>(),
                                       grad.data_ptr(), dtype, n, rng_ptr, base, d,
                                       static_cast<float>(sigma), save, static_cast<float>(weight),
                                       init, zero_grad, stream));
}

void restore_cuda(const Tensor& w, const Tensor& w0, const OptTensor& grad_opt,
                  const OptTensor& src_opt, double scale) {
  constexpr const char* op = "restore_";
  const c10::Device device = lead_device(op, "w", w);
  const int64_t n = w.numel();
  check_vector(op, "w", w, n, device);
  check_vector(op, "w0", w0, n, device);
  const fl::DType dtype = float_dtype(op, "w", w);
  check_same_dtype(op, "w0", w0, "w", w);
  const Tensor* grad = present(grad_opt);
  const Tensor* src = present(src_opt);
  fl::DType sdtype = dtype;
  if (grad != nullptr) {
    check_vector(op, "grad", *grad, n, device);
    check_same_dtype(op, "grad", *grad, "w", w);
  }
  if (src != nullptr) {
    check_vector(op, "src", *src, n, device);
    sdtype = src_dtype(op, *src, w);
  }
  aliasing::restore(w, w0, grad, src);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  // src is only read when grad is given (grad = scale * src); without grad it is ignored.
  finish(fl::launch_restore(w.data_ptr(), w0.data_ptr(), grad ? grad->data_ptr() : nullptr,
                            (grad && src) ? src->data_ptr() : nullptr, dtype, sdtype, n,
                            static_cast<float>(scale), stream));
}

// What sgd_step_ and adam_step_ share: w, grad, the optional w0 and src, checked alike.
struct StepArgs {
  c10::Device device;
  int64_t n;
  fl::DType dtype, sdtype;
  const Tensor* w0;
  const Tensor* src;
};

StepArgs check_step(const char* op, const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                    const OptTensor& src_opt, double grad_weight, double sharpness_weight) {
  // Weighted SAM's terms mix grad with src (the saved gradient): they need one.
  TORCH_CHECK(present(src_opt) != nullptr || (grad_weight == 0.0 && sharpness_weight == 0.0),
              "flatfused::", op, ": grad_weight and sharpness_weight need src (the saved gradient), got "
              "grad_weight=", grad_weight, ", sharpness_weight=", sharpness_weight, " without src");
  const c10::Device device = lead_device(op, "w", w);
  const int64_t n = w.numel();
  check_vector(op, "w", w, n, device);
  const fl::DType dtype = float_dtype(op, "w", w);
  check_vector(op, "grad", grad, n, device);
  check_same_dtype(op, "grad", grad, "w", w);
  const Tensor* w0 = present(w0_opt);
  const Tensor* src = present(src_opt);
  if (w0 != nullptr) {
    check_vector(op, "w0", *w0, n, device);
    check_same_dtype(op, "w0", *w0, "w", w);
  }
  fl::DType sdtype = dtype;
  if (src != nullptr) {
    check_vector(op, "src", *src, n, device);
    sdtype = src_dtype(op, *src, w);
  }
  return StepArgs{device, n, dtype, sdtype, w0, src};
}

void sgd_step_cuda(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                   const OptTensor& src_opt, const OptTensor& momentum_buffer_opt, double scale,
                   double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool first_step, bool write_grad,
                   double grad_weight, double sharpness_weight) {
  constexpr const char* op = "sgd_step_";
  const StepArgs a = check_step(op, w, w0_opt, grad, src_opt, grad_weight, sharpness_weight);
  const c10::Device device = a.device;
  const int64_t n = a.n;
  const fl::DType dtype = a.dtype, sdtype = a.sdtype;
  const Tensor *w0 = a.w0, *src = a.src;
  const Tensor* buf = present(momentum_buffer_opt);
  if (buf != nullptr) {
    check_vector(op, "momentum_buffer", *buf, n, device);
    check_same_dtype(op, "momentum_buffer", *buf, "w", w);
  }
  aliasing::sgd_step(w, w0, grad, src, buf);
  if (n == 0) return;
  const flatfused::SGDParams p = flatfused::make_sgd_params(
      scale, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, buf != nullptr,
      grad_weight, sharpness_weight);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_sgd_step(w.data_ptr(), w0 ? w0->data_ptr() : nullptr, grad.data_ptr(),
                             src ? src->data_ptr() : nullptr, buf ? buf->data_ptr() : nullptr,
                             dtype, sdtype, n, p, write_grad, stream));
}

void adam_step_cuda(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                    const OptTensor& src_opt, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                    double scale, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double step_size, double bias_correction2_sqrt,
                    bool decoupled, bool maximize, bool write_grad, double grad_weight,
                    double sharpness_weight) {
  constexpr const char* op = "adam_step_";
  const StepArgs a = check_step(op, w, w0_opt, grad, src_opt, grad_weight, sharpness_weight);
  const c10::Device device = a.device;
  const int64_t n = a.n;
  const fl::DType dtype = a.dtype, sdtype = a.sdtype;
  const Tensor *w0 = a.w0, *src = a.src;
  check_vector(op, "exp_avg", exp_avg, n, device);
  check_same_dtype(op, "exp_avg", exp_avg, "w", w);
  check_vector(op, "exp_avg_sq", exp_avg_sq, n, device);
  check_same_dtype(op, "exp_avg_sq", exp_avg_sq, "w", w);
  aliasing::adam_step(w, w0, grad, src, exp_avg, exp_avg_sq);
  if (n == 0) return;
  const flatfused::AdamParams p = flatfused::make_adam_params(
      scale, lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt, decoupled, maximize,
      grad_weight, sharpness_weight);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_adam_step(w.data_ptr(), w0 ? w0->data_ptr() : nullptr, grad.data_ptr(),
                              src ? src->data_ptr() : nullptr, exp_avg.data_ptr(),
                              exp_avg_sq.data_ptr(), dtype, sdtype, n, p, write_grad, stream));
}

// out / norm_sq of the SAM ops: the fp32 scalar of shape [1] on the kernel's device.
void check_scalar(const char* op, const char* name, const Tensor& t, const c10::Device& device) {
  TORCH_CHECK(t.defined(), "flatfused::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == device, "flatfused::", op, ": ", name, " must be on the kernel's device ",
              device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "flatfused::", op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == 1, "flatfused::", op, ": ", name,
              " must have shape [1], got ", t.sizes());
}

void grad_norm_sq_cuda(const Tensor& out, const Tensor& grad, const OptTensor& w_opt) {
  constexpr const char* op = "grad_norm_sq_";
  const c10::Device device = lead_device(op, "grad", grad);
  const int64_t n = grad.numel();
  check_vector(op, "grad", grad, n, device);
  const fl::DType dtype = float_dtype(op, "grad", grad);
  const Tensor* w = present(w_opt);
  if (w != nullptr) {
    check_vector(op, "w", *w, n, device);
    check_same_dtype(op, "w", *w, "grad", grad);
  }
  check_scalar(op, "out", out, device);
  aliasing::grad_norm_sq(out, grad, w);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  // Scratch for the per-block partials: stream-ordered by the caching allocator, no sync.
  const Tensor partials = at::empty({fl::kGradNormSqPartials}, grad.options().dtype(at::kDouble));
  finish(fl::launch_grad_norm_sq(out.data_ptr<float>(), grad.data_ptr(), w ? w->data_ptr() : nullptr,
                                 dtype, n, partials.data_ptr<double>(), stream));
}

void sam_ascent_cuda(const Tensor& w, const Tensor& w0, const Tensor& grad, const OptTensor& g0_opt,
                     const Tensor& norm_sq, double rho, double eps, bool adaptive, bool zero_grad) {
  constexpr const char* op = "sam_ascent_";
  const c10::Device device = lead_device(op, "w", w);
  const int64_t n = w.numel();
  check_vector(op, "w", w, n, device);
  const fl::DType dtype = float_dtype(op, "w", w);
  check_vector(op, "w0", w0, n, device);
  check_same_dtype(op, "w0", w0, "w", w);
  check_vector(op, "grad", grad, n, device);
  check_same_dtype(op, "grad", grad, "w", w);
  const Tensor* g0 = present(g0_opt);
  if (g0 != nullptr) {
    check_vector(op, "g0", *g0, n, device);
    check_same_dtype(op, "g0", *g0, "w", w);
  }
  check_scalar(op, "norm_sq", norm_sq, device);
  aliasing::sam_ascent(w, w0, grad, g0, norm_sq);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  finish(fl::launch_sam_ascent(w.data_ptr(), w0.data_ptr(), grad.data_ptr(), g0 ? g0->data_ptr() : nullptr,
                               norm_sq.data_ptr<float>(), dtype, n, static_cast<float>(rho),
                               static_cast<float>(eps), adaptive, zero_grad, stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(flatfused, CUDA, m) {
  m.impl("philox_bits_", &philox_bits_cuda);
  m.impl("noise_", &noise_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("zero_", &zero_cuda);
  m.impl("accumulate_", &accumulate_cuda);
  m.impl("accumulate_perturb_", &accumulate_perturb_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("grad_norm_sq_", &grad_norm_sq_cuda);
  m.impl("sam_ascent_", &sam_ascent_cuda);
}
