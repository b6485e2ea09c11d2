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
  float scale;         // the gradient used is scale * src
  float lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step, has_momentum;
};

// sgd_step_ after restore: x is the restored weight, d the effective gradient (already
// written back to grad when asked), buf the momentum buffer (ignored without momentum).
// Mirrors torch.optim.SGD's single-tensor loop.
FF_HD float sgd_math(float x, float d, float* buf, const SGDParams& p) {
  if (p.maximize) d = -d;
  if (p.weight_decay != 0.0f) d = d + p.weight_decay * x;
  if (p.has_momentum) {
    const float b = p.first_step ? d : p.momentum * (*buf) + (1.0f - p.dampening) * d;
    *buf = b;
    d = p.nesterov ? d + p.momentum * b : b;
  }
  return x - p.lr * d;
}

struct AdamParams {
  float scale;
  float lr, beta1, beta2, eps, weight_decay;
  float step_size;               // lr / (1 - beta1^t)
  float bias_correction2_sqrt;   // sqrt(1 - beta2^t)
  bool decoupled, maximize;      // decoupled: AdamW, else Adam's L2 penalty
};

// adam_step_ after restore; mirrors torch.optim.Adam/AdamW's single-tensor loop.
FF_HD float adam_math(float x, float d, float* m, float* v, const AdamParams& p) {
  if (p.maximize) d = -d;
  if (p.weight_decay != 0.0f) {
    if (p.decoupled) x = x * (1.0f - p.lr * p.weight_decay);
    else d = d + p.weight_decay * x;
  }
  const float mm = *m + (1.0f - p.beta1) * (d - *m);
  const float vv = *v * p.beta2 + (1.0f - p.beta2) * d * d;
  *m = mm;
  *v = vv;
  const float denom = sqrtf(vv) / p.bias_correction2_sqrt + p.eps;
  return x - p.step_size * (mm / denom);
}

}  // namespace flatfused
