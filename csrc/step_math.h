// Per-element math of the fused optimizer kernels, written once for the CPU and CUDA launchers
// (the launchers only load, convert to float, call these, convert back and store).
// Semantics: docs/kernels.md. All arithmetic is fp32 whatever the storage dtype.
#pragma once
#include "philox.h"

namespace flatfused {

// perturb_: w = w0 + sigma * eps (sigma carries the sign of the pass).
FF_HD float perturb_math(float w0, float sigma, float eps) { return w0 + sigma * eps; }

// accumulate_: acc = (init ? 0 : acc) + weight * g.
FF_HD float accumulate_math(float acc, float g, float weight, bool init) {
  return init ? weight * g : acc + weight * g;
}

struct SGDParams {
  float scale;  // the gradient used is scale * src
  float lr, momentum, weight_decay;
  float one_minus_dampening;
  float grad_weight, sharpness_weight;  // Weighted SAM's terms (mixed_grad_math, sharpness_math)
  bool nesterov, maximize, first_step, has_momentum;
};

// Weighted SAM's second step fused into sgd_step_/adam_step_ (only with a src, the saved
// clean gradient g0; g is the gradient in grad). The effective gradient mixes both:
FF_HD float mixed_grad_math(float scale, float src, float grad_weight, float g) {
  return scale * src + grad_weight * g;
}
// and after the base update the decoupled sharpness term is applied to the new weight.
FF_HD float sharpness_math(float w, float sharpness_weight, float g, float src) {
  return w - sharpness_weight * (g - src);
}

// Host side: coefficients are formed in double and rounded once, as torch.optim forms them.
inline SGDParams make_sgd_params(double scale, double lr, double momentum, double dampening,
                                 double weight_decay, bool nesterov, bool maximize,
                                 bool first_step, bool has_momentum, double grad_weight = 0.0,
                                 double sharpness_weight = 0.0) {
  SGDParams p;
  p.scale = static_cast<float>(scale);
  p.lr = static_cast<float>(lr);
  p.momentum = static_cast<float>(momentum);
  p.weight_decay = static_cast<float>(weight_decay);
  p.one_minus_dampening = static_cast<float>(1.0 - dampening);
  p.grad_weight = static_cast<float>(grad_weight);
  p.sharpness_weight = static_cast<float>(sharpness_weight);
  p.nesterov = nesterov;
  p.maximize = maximize;
  p.first_step = first_step;
  p.has_momentum = has_momentum;
  return p;
}

// sgd_step_ after restore: x is the restored weight, d the effective gradient (already
// written back to grad when asked), buf the momentum buffer (ignored without momentum).
// Mirrors torch.optim.SGD's single-tensor loop.
FF_HD float sgd_math(float x, float d, float* buf, const SGDParams& p) {
  if (p.maximize) d = -d;
  if (p.weight_decay != 0.0f) d = d + p.weight_decay * x;
  if (p.has_momentum) {
    const float b = p.first_step ? d : p.momentum * (*buf) + p.one_minus_dampening * d;
    *buf = b;
    d = p.nesterov ? d + p.momentum * b : b;
  }
  return x - p.lr * d;
}

struct AdamParams {
  float scale;
  float beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2;
  float decay;                  // 1 - lr * weight_decay (AdamW)
  float grad_weight, sharpness_weight;
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  bool decoupled, maximize;     // decoupled: AdamW, else Adam's L2 penalty
};

inline AdamParams make_adam_params(double scale, double lr, double beta1, double beta2, double eps,
                                   double weight_decay, double step_size,
                                   double bias_correction2_sqrt, bool decoupled, bool maximize,
                                   double grad_weight = 0.0, double sharpness_weight = 0.0) {
  AdamParams p;
  p.scale = static_cast<float>(scale);
  p.beta2 = static_cast<float>(beta2);
  p.eps = static_cast<float>(eps);
  p.weight_decay = static_cast<float>(weight_decay);
  p.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  p.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  p.decay = static_cast<float>(1.0 - lr * weight_decay);
  p.step_size = static_cast<float>(step_size);
  p.bias_correction2_sqrt = static_cast<float>(bias_correction2_sqrt);
  p.grad_weight = static_cast<float>(grad_weight);
  p.sharpness_weight = static_cast<float>(sharpness_weight);
  p.decoupled = decoupled;
  p.maximize = maximize;
  return p;
}

// adam_step_ after restore; mirrors torch.optim.Adam/AdamW's single-tensor loop.
FF_HD float adam_math(float x, float d, float* m, float* v, const AdamParams& p) {
  if (p.maximize) d = -d;
  if (p.weight_decay != 0.0f) {
    if (p.decoupled) x = x * p.decay;
    else d = d + p.weight_decay * x;
  }
  const float mm = *m + p.one_minus_beta1 * (d - *m);
  const float vv = *v * p.beta2 + p.one_minus_beta2 * d * d;
  *m = mm;
  *v = vv;
  const float denom = sqrtf(vv) / p.bias_correction2_sqrt + p.eps;
  return x - p.step_size * (mm / denom);
}

// ---------------------------------------------------------------------------------- SAM

// grad_norm_sq_'s term of one element: v * v with v = |w| * g (ASAM) or g. The sum of the terms
// is formed in double by every backend; the term itself is fp32, so an overflow to inf here is
// an overflow the optimizer must see.
FF_HD float grad_norm_term(float g) { return g * g; }
FF_HD float grad_norm_term(float g, float w) {
  const float v = fabsf(w) * g;
  return v * v;
}

// sam_ascent_'s step length, from the accumulated squared norm (a device scalar).
FF_HD float sam_scale(float norm_sq, float rho, float eps) { return rho / (sqrtf(norm_sq) + eps); }

// sam_ascent_: w = x + e, e = ((adaptive ? x*x : 1) * g) * scale, in the reference SAM's
// order of evaluation (e_w = (p^2 if adaptive else 1) * p.grad * scale; p.add_(e_w)).
FF_HD float sam_ascent_math(float x, float g, float scale, bool adaptive) {
  const float e = ((adaptive ? x * x : 1.0f) * g) * scale;
  return x + e;
}

}  // namespace flatfused
