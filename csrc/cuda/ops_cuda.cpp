// CUDA implementations of the flatfused ops (docs/kernels.md; schemas in csrc/ops.cpp).
//
// Host code only: checks the arguments (csrc/op_args.h, shared with the CPU registration), sets
// the device guard, takes the current stream and calls the plain launchers of csrc/cuda/*.cu
// (launchers.h). The rng tensor stays on the device and is read by the kernels, so no op
// synchronises with the host (CUDA-graph capturable).
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that
// a minimal CUDA toolkit lacks).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../op_args.h"
#include "launchers.h"

namespace {

namespace fl = flatfused::cuda_launchers;
namespace op_args = flatfused::op_args;

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr c10::DeviceType kCuda = c10::DeviceType::CUDA;

// The launchers' dtype code of a dtype op_args accepted.
fl::DType code(at::ScalarType t) { return op_args::dtype_code(t); }

void* ptr(const Tensor* t) { return t != nullptr ? t->data_ptr() : nullptr; }

// The device of a checked op and its current stream; the guard makes the device current.
struct OnDevice {
  explicit OnDevice(const Tensor& lead)
      : guard(lead.device()), stream(c10::cuda::getCurrentCUDAStream(lead.device().index())) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
};

// Surfaces the launcher's own CUDA API status, then any launch error.
void finish(cudaError_t status) {
  C10_CUDA_CHECK(status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const int64_t* rng_ptr(const Tensor& rng) { return rng.data_ptr<int64_t>(); }

void philox_bits_cuda(const Tensor& out, const Tensor& rng, int64_t base) {
  op_args::philox_bits(kCuda, out, rng, base);
  if (out.numel() == 0) return;
  const OnDevice on(out);
  finish(fl::launch_philox_bits(out.data_ptr<int32_t>(), out.numel(), rng_ptr(rng), base, on.stream));
}

void noise_cuda(const Tensor& out, const Tensor& rng, int64_t base, int64_t dist) {
  const op_args::Noise a = op_args::noise(kCuda, out, rng, base, dist);
  if (out.numel() == 0) return;
  const OnDevice on(out);
  finish(fl::launch_noise(out.data_ptr(), code(a.dtype), out.numel(), rng_ptr(rng), base, a.dist, on.stream));
}

void perturb_cuda(const Tensor& w, const Tensor& w0, const Tensor& rng, int64_t base,
                  int64_t dist, double sigma, bool save, const OptTensor& grad_opt) {
  const op_args::Perturb a = op_args::perturb(kCuda, w, w0, rng, base, dist, grad_opt);
  if (w.numel() == 0) return;
  const OnDevice on(w);
  finish(fl::launch_perturb(w.data_ptr(), w0.data_ptr(), ptr(a.grad), code(a.dtype), w.numel(), rng_ptr(rng),
                            base, a.dist, static_cast<float>(sigma), save, on.stream));
}

void zero_cuda(const Tensor& grad) {
  op_args::zero(kCuda, grad);
  if (grad.numel() == 0) return;
  const OnDevice on(grad);
  finish(cudaMemsetAsync(grad.data_ptr(), 0, grad.nbytes(), on.stream));
}

void accumulate_cuda(const Tensor& acc, const Tensor& grad, double weight, bool init,
                     bool zero_grad) {
  const fl::DType grad_dtype = code(op_args::accumulate(kCuda, acc, grad));
  if (acc.numel() == 0) return;
  const OnDevice on(acc);
  finish(fl::launch_accumulate(acc.data_ptr<float>(), grad.data_ptr(), grad_dtype, acc.numel(),
                               static_cast<float>(weight), init, zero_grad, on.stream));
}

void accumulate_perturb_cuda(const Tensor& w, const Tensor& w0, const Tensor& acc,
                             const Tensor& grad, const Tensor& rng, int64_t base, int64_t dist,
                             double sigma, bool save, double weight, bool init, bool zero_grad) {
  const op_args::Perturb a = op_args::accumulate_perturb(kCuda, w, w0, acc, grad, rng, base, dist);
  if (w.numel() == 0) return;
  const OnDevice on(w);
  finish(fl::launch_accumulate_perturb(w.data_ptr(), w0.data_ptr(), acc.data_ptr<float>(),
                                       grad.data_ptr(), code(a.dtype), w.numel(), rng_ptr(rng), base,
                                       a.dist, static_cast<float>(sigma), save,
                                       static_cast<float>(weight), init, zero_grad, on.stream));
}

void restore_cuda(const Tensor& w, const Tensor& w0, const OptTensor& grad_opt,
                  const OptTensor& src_opt, double scale) {
  const op_args::Step a = op_args::restore(kCuda, w, w0, grad_opt, src_opt);
  if (w.numel() == 0) return;
  const OnDevice on(w);
  // w0 is passed even where it is w (a.w0 null): copying w onto itself changes nothing.
  finish(fl::launch_restore(w.data_ptr(), w0.data_ptr(), ptr(a.grad), ptr(a.src), code(a.dtype),
                            code(a.src_dtype), w.numel(), static_cast<float>(scale), on.stream));
}

void sgd_step_cuda(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                   const OptTensor& src_opt, const OptTensor& momentum_buffer_opt, double scale,
                   double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool first_step, bool write_grad,
                   double grad_weight, double sharpness_weight) {
  const op_args::Step a = op_args::sgd_step(kCuda, w, w0_opt, grad, src_opt, momentum_buffer_opt,
                                            grad_weight, sharpness_weight);
  if (w.numel() == 0) return;
  const flatfused::SGDParams p = flatfused::make_sgd_params(
      scale, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, a.state != nullptr,
      grad_weight, sharpness_weight);
  const OnDevice on(w);
  finish(fl::launch_sgd_step(w.data_ptr(), ptr(a.w0), grad.data_ptr(), ptr(a.src), ptr(a.state),
                             code(a.dtype), code(a.src_dtype), w.numel(), p, write_grad, on.stream));
}

void adam_step_cuda(const Tensor& w, const OptTensor& w0_opt, const Tensor& grad,
                    const OptTensor& src_opt, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                    double scale, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double step_size, double bias_correction2_sqrt,
                    bool decoupled, bool maximize, bool write_grad, double grad_weight,
                    double sharpness_weight) {
  const op_args::Step a = op_args::adam_step(kCuda, w, w0_opt, grad, src_opt, exp_avg, exp_avg_sq,
                                             grad_weight, sharpness_weight);
  if (w.numel() == 0) return;
  const flatfused::AdamParams p = flatfused::make_adam_params(
      scale, lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt, decoupled, maximize,
      grad_weight, sharpness_weight);
  const OnDevice on(w);
  finish(fl::launch_adam_step(w.data_ptr(), ptr(a.w0), grad.data_ptr(), ptr(a.src), exp_avg.data_ptr(),
                              exp_avg_sq.data_ptr(), code(a.dtype), code(a.src_dtype), w.numel(), p,
                              write_grad, on.stream));
}

void grad_norm_sq_cuda(const Tensor& out, const Tensor& grad, const OptTensor& w_opt) {
  const op_args::GradNormSq a = op_args::grad_norm_sq(kCuda, out, grad, w_opt);
  if (grad.numel() == 0) return;
  const OnDevice on(grad);
  // Scratch for the per-block partials: stream-ordered by the caching allocator, no sync.
  const Tensor partials = at::empty({fl::kGradNormSqPartials}, grad.options().dtype(at::kDouble));
  finish(fl::launch_grad_norm_sq(out.data_ptr<float>(), grad.data_ptr(), ptr(a.w), code(a.dtype),
                                 grad.numel(), partials.data_ptr<double>(), on.stream));
}

void sam_ascent_cuda(const Tensor& w, const Tensor& w0, const Tensor& grad, const OptTensor& g0_opt,
                     const Tensor& norm_sq, double rho, double eps, bool adaptive, bool zero_grad) {
  const op_args::SamAscent a = op_args::sam_ascent(kCuda, w, w0, grad, g0_opt, norm_sq);
  if (w.numel() == 0) return;
  const OnDevice on(w);
  finish(fl::launch_sam_ascent(w.data_ptr(), w0.data_ptr(), grad.data_ptr(), ptr(a.g0),
                               norm_sq.data_ptr<float>(), code(a.dtype), w.numel(), static_cast<float>(rho),
                               static_cast<float>(eps), adaptive, zero_grad, on.stream));
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
