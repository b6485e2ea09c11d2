"""The ``torch`` backend: every kernel of docs/kernels.md in plain PyTorch (the specification).

fp32 arithmetic throughout, one rounding to the storage dtype per result, mirroring
csrc/step_math.h line for line. float64 tensors (outside the compiled kernels' dtypes: the
optimizers' ``auto`` backend sends float64 parameters here) keep float64 arithmetic.
"""
from __future__ import annotations

import torch

from . import rng as _rng


def _math(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the arithmetic's dtype: fp32, or float64 for float64 tensors (no copy when it
    already is)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _seed_offset(rng: torch.Tensor) -> tuple[int, int]:
    seed, offset = rng.tolist()
    return int(seed), int(offset)


def philox_bits_(out, rng, base):
    seed, offset = _seed_offset(rng)
    out.copy_(_rng.philox_bits(out.numel(), seed, offset, base, out.device))


def noise_(out, rng, base, dist):
    seed, offset = _seed_offset(rng)
    out.copy_(_rng.noise(out.numel(), seed, offset, base, dist, out.device))


def perturb_(w, w0, rng, base, dist, sigma, save, grad=None):
    if save:
        w0.copy_(w)
    seed, offset = _seed_offset(rng)
    eps = _rng.noise(w.numel(), seed, offset, base, dist, w.device)
    w.copy_(_math(w0) + sigma * eps)
    if grad is not None:
        grad.zero_()


def zero_(grad):
    grad.zero_()


def accumulate_(acc, grad, weight, init, zero_grad):
    g = _math(grad)
    if init:
        acc.copy_(weight * g)
    else:
        acc.copy_(acc + weight * g)
    if zero_grad:
        grad.zero_()


def accumulate_perturb_(w, w0, acc, grad, rng, base, dist, sigma, save, weight, init,
                        zero_grad):
    accumulate_(acc, grad, weight, init, zero_grad)
    perturb_(w, w0, rng, base, dist, sigma, save)


def restore_(w, w0, grad, src, scale):
    w.copy_(w0)
    if grad is not None:
        grad.copy_(scale * _math(src if src is not None else grad))


def _restored_and_gradient(w, w0, grad, src, scale, write_grad, grad_weight, sharpness_weight):
    """(x, d, g, s): the restored weight, the effective gradient, and grad's / src's fp32 values
    when Weighted SAM's terms use them (grad is only read when something uses it)."""
    x = _math(w0 if w0 is not None else w)
    g = s = None
    if src is None:
        d = scale * _math(grad)
    else:
        s = _math(src)
        if grad_weight != 0 or sharpness_weight != 0:
            g = _math(grad).clone()  # write_grad overwrites grad below
        d = scale * s + grad_weight * g if grad_weight != 0 else scale * s
    if write_grad:
        grad.copy_(d)
    return x, d, g, s


def _sharpness(w, g, s, sharpness_weight):
    """Weighted SAM's decoupled term, applied to the updated fp32 weights."""
    return w - sharpness_weight * (g - s) if sharpness_weight != 0 else w


def sgd_step_(w, w0, grad, src, momentum_buffer, scale, lr, momentum, dampening, weight_decay,
              nesterov, maximize, first_step, write_grad, grad_weight=0.0, sharpness_weight=0.0):
    x, d, g, s = _restored_and_gradient(w, w0, grad, src, scale, write_grad, grad_weight,
                                        sharpness_weight)
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d + weight_decay * x
    if momentum_buffer is not None:
        b = d if first_step else momentum * _math(momentum_buffer) + (1.0 - dampening) * d
        momentum_buffer.copy_(b)
        d = d + momentum * b if nesterov else b
    w.copy_(_sharpness(x - lr * d, g, s, sharpness_weight))


def adam_step_(w, w0, grad, src, exp_avg, exp_avg_sq, scale, lr, beta1, beta2, eps, weight_decay,
               step_size, bias_correction2_sqrt, decoupled, maximize, write_grad, grad_weight=0.0,
               sharpness_weight=0.0):
    x, d, g, s = _restored_and_gradient(w, w0, grad, src, scale, write_grad, grad_weight,
                                        sharpness_weight)
    if maximize:
        d = -d
    if weight_decay != 0:
        if decoupled:
            x = x * (1.0 - lr * weight_decay)
        else:
            d = d + weight_decay * x
    m = _math(exp_avg)
    m = m + (1.0 - beta1) * (d - m)
    v = _math(exp_avg_sq) * beta2 + (1.0 - beta2) * d * d
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    denom = torch.sqrt(v) / bias_correction2_sqrt + eps
    w.copy_(_sharpness(x - step_size * (m / denom), g, s, sharpness_weight))


def grad_norm_sq_(out, grad, w):
    if grad.numel() == 0:
        return
    v = _math(grad) if w is None else _math(w).abs() * _math(grad)
    # fp32 terms (an overflow shows as inf), summed in double, added to out in fp32
    out.add_((v * v).sum(dtype=torch.float64).float())


def sam_ascent_(w, w0, grad, g0, norm_sq, rho, eps, adaptive, zero_grad):
    if w.numel() == 0:
        return
    # rho / t as a tensor division: Python's rho / t is reciprocal(t) * rho, rounded twice
    scale = torch.full_like(norm_sq, rho) / (norm_sq.sqrt() + eps)
    x, g = _math(w), _math(grad)
    e = ((x * x if adaptive else 1.0) * g) * scale
    new_w = x + e
    w0.copy_(w)
    if g0 is not None:
        g0.copy_(grad)
    w.copy_(new_w)
    if zero_grad:
        grad.zero_()
