"""Triton ``sgd_step_`` and ``adam_step_`` (docs/kernels.md, csrc/step_math.h).

Each fuses the restore (``x = w0`` when given), the effective gradient ``d = scale * (src or
grad)`` (plus ``grad_weight * grad`` with a src; written back to ``grad`` when ``write_grad``),
the base optimizer's update and Weighted SAM's ``w -= sharpness_weight * (grad - src)``, in one
pass over memory. Scalars that torch forms in double on the host (``1 - dampening``,
``1 - beta1``, ``1 - beta2``, ``1 - lr * weight_decay``) are formed the same way here and enter
the kernel as fp32, like the specification in ``flatfused/_torch_ops.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _common as nz


@triton.jit
def _restored_and_gradient(w_ptr, w0_ptr, grad_ptr, src_ptr, j, mask, scale, grad_weight,
                           HAS_W0: tl.constexpr, HAS_SRC: tl.constexpr, WRITE_GRAD: tl.constexpr,
                           MIX: tl.constexpr, SHARP: tl.constexpr):
    """(x, d, g, s): x = w0 if given else w; d = scale * (src if given else grad), + grad_weight
    * grad if MIX (src given); if WRITE_GRAD: grad = d. g, s: grad's and src's values for the
    sharpness term (only meaningful with a src and MIX or SHARP)."""
    if HAS_W0:
        x = nz.load_f32(w0_ptr, j, mask)
    else:
        x = nz.load_f32(w_ptr, j, mask)
    if HAS_SRC:
        s = nz.load_f32(src_ptr, j, mask)
        if MIX or SHARP:
            g = nz.load_f32(grad_ptr, j, mask)
        else:
            g = s
        if MIX:
            d = scale * s + grad_weight * g
        else:
            d = scale * s
    else:
        g = nz.load_f32(grad_ptr, j, mask)
        s = g
        d = scale * g
    if WRITE_GRAD:
        nz.store(grad_ptr, j, d, mask)
    return x, d, g, s


@triton.jit
def _sharpness(w, g, s, sharpness_weight, SHARP: tl.constexpr):
    """Weighted SAM's decoupled term on the updated weights."""
    if SHARP:
        w = w - sharpness_weight * (g - s)
    return w


@triton.jit
def _sgd_math(x, d, buf, lr, momentum, one_minus_dampening, weight_decay,
              HAS_WD: tl.constexpr, HAS_BUF: tl.constexpr, NESTEROV: tl.constexpr,
              MAXIMIZE: tl.constexpr, FIRST_STEP: tl.constexpr):
    """torch.optim.SGD on one element; returns (new weight, new momentum buffer)."""
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        d = d + weight_decay * x
    b = buf
    if HAS_BUF:
        if FIRST_STEP:
            b = d
        else:
            b = momentum * buf + one_minus_dampening * d
        if NESTEROV:
            d = d + momentum * b
        else:
            d = b
    return x - lr * d, b


@triton.jit
def _adam_math(x, d, m, v, lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
               decay, step_size, bias_correction2_sqrt,
               HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """torch.optim.Adam / AdamW on one element; returns (new weight, exp_avg, exp_avg_sq)."""
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        if DECOUPLED:
            x = x * decay  # decay = 1 - lr * weight_decay
        else:
            d = d + weight_decay * x
    m = m + one_minus_beta1 * (d - m)
    v = v * beta2 + one_minus_beta2 * d * d
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps  # IEEE, as torch
    return x - step_size * tl.div_rn(m, denom), m, v


@triton.jit
def _sgd_step(w_ptr, w0_ptr, grad_ptr, src_ptr, buf_ptr, j, mask,
              scale, lr, momentum, one_minus_dampening, weight_decay, grad_weight,
              sharpness_weight,
              HAS_W0: tl.constexpr, HAS_SRC: tl.constexpr, HAS_BUF: tl.constexpr,
              HAS_WD: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
              FIRST_STEP: tl.constexpr, WRITE_GRAD: tl.constexpr, MIX: tl.constexpr,
              SHARP: tl.constexpr):
    x, d, g, s = _restored_and_gradient(w_ptr, w0_ptr, grad_ptr, src_ptr, j, mask, scale,
                                        grad_weight, HAS_W0, HAS_SRC, WRITE_GRAD, MIX, SHARP)
    buf = tl.zeros_like(d)  # first step: the buffer is initialised to d, not read
    if HAS_BUF:
        if not FIRST_STEP:
            buf = nz.load_f32(buf_ptr, j, mask)
    w, buf = _sgd_math(x, d, buf, lr, momentum, one_minus_dampening, weight_decay,
                       HAS_WD, HAS_BUF, NESTEROV, MAXIMIZE, FIRST_STEP)
    if HAS_BUF:
        nz.store(buf_ptr, j, buf, mask)
    nz.store(w_ptr, j, _sharpness(w, g, s, sharpness_weight, SHARP), mask)


@triton.jit
def _sgd_step_kernel(w_ptr, w0_ptr, grad_ptr, src_ptr, buf_ptr, n,
                     scale, lr, momentum, one_minus_dampening, weight_decay, grad_weight,
                     sharpness_weight,
                     HAS_W0: tl.constexpr, HAS_SRC: tl.constexpr, HAS_BUF: tl.constexpr,
                     HAS_WD: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                     FIRST_STEP: tl.constexpr, WRITE_GRAD: tl.constexpr, MIX: tl.constexpr,
                     SHARP: tl.constexpr, BLOCK: tl.constexpr):
    j, interior = nz.elem_slots(tl.program_id(0), n, BLOCK)
    if interior:
        _sgd_step(w_ptr, w0_ptr, grad_ptr, src_ptr, buf_ptr, j, None,
                  scale, lr, momentum, one_minus_dampening, weight_decay, grad_weight,
                  sharpness_weight, HAS_W0, HAS_SRC, HAS_BUF, HAS_WD, NESTEROV, MAXIMIZE,
                  FIRST_STEP, WRITE_GRAD, MIX, SHARP)
    else:
        _sgd_step(w_ptr, w0_ptr, grad_ptr, src_ptr, buf_ptr, j, j < n,
                  scale, lr, momentum, one_minus_dampening, weight_decay, grad_weight,
                  sharpness_weight, HAS_W0, HAS_SRC, HAS_BUF, HAS_WD, NESTEROV, MAXIMIZE,
                  FIRST_STEP, WRITE_GRAD, MIX, SHARP)


@triton.jit
def _adam_step(w_ptr, w0_ptr, grad_ptr, src_ptr, m_ptr, v_ptr, j, mask,
               scale, lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
               decay, step_size, bias_correction2_sqrt, grad_weight, sharpness_weight,
               HAS_W0: tl.constexpr, HAS_SRC: tl.constexpr, HAS_WD: tl.constexpr,
               DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, WRITE_GRAD: tl.constexpr,
               MIX: tl.constexpr, SHARP: tl.constexpr):
    x, d, g, s = _restored_and_gradient(w_ptr, w0_ptr, grad_ptr, src_ptr, j, mask, scale,
                                        grad_weight, HAS_W0, HAS_SRC, WRITE_GRAD, MIX, SHARP)
    m = nz.load_f32(m_ptr, j, mask)
    v = nz.load_f32(v_ptr, j, mask)
    w, m, v = _adam_math(x, d, m, v, lr, one_minus_beta1, beta2, one_minus_beta2, eps,
                         weight_decay, decay, step_size, bias_correction2_sqrt,
                         HAS_WD, DECOUPLED, MAXIMIZE)
    nz.store(m_ptr, j, m, mask)
    nz.store(v_ptr, j, v, mask)
    nz.store(w_ptr, j, _sharpness(w, g, s, sharpness_weight, SHARP), mask)


@triton.jit
def _adam_step_kernel(w_ptr, w0_ptr, grad_ptr, src_ptr, m_ptr, v_ptr, n,
                      scale, lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                      decay, step_size, bias_correction2_sqrt, grad_weight, sharpness_weight,
                      HAS_W0: tl.constexpr, HAS_SRC: tl.constexpr, HAS_WD: tl.constexpr,
                      DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                      MIX: tl.constexpr, SHARP: tl.constexpr, BLOCK: tl.constexpr):
    j, interior = nz.elem_slots(tl.program_id(0), n, BLOCK)
    if interior:
        _adam_step(w_ptr, w0_ptr, grad_ptr, src_ptr, m_ptr, v_ptr, j, None,
                   scale, lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                   decay, step_size, bias_correction2_sqrt, grad_weight, sharpness_weight,
                   HAS_W0, HAS_SRC, HAS_WD, DECOUPLED, MAXIMIZE, WRITE_GRAD, MIX, SHARP)
    else:
        _adam_step(w_ptr, w0_ptr, grad_ptr, src_ptr, m_ptr, v_ptr, j, j < n,
                   scale, lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                   decay, step_size, bias_correction2_sqrt, grad_weight, sharpness_weight,
                   HAS_W0, HAS_SRC, HAS_WD, DECOUPLED, MAXIMIZE, WRITE_GRAD, MIX, SHARP)


def _check_step_tensors(op, w, w0, grad, src, **state):
    nz.check_tensor(op, "w", w, None, None, nz.PARAM_DTYPES)
    n = w.numel()
    nz.check_tensor(op, "grad", grad, n, w.device, nz.PARAM_DTYPES)
    if w0 is not None:
        nz.check_tensor(op, "w0", w0, n, w.device, nz.PARAM_DTYPES)
    if src is not None:
        nz.check_tensor(op, "src", src, n, w.device, nz.PARAM_DTYPES)
    for name, t in state.items():
        if t is not None:
            nz.check_tensor(op, name, t, n, w.device, nz.PARAM_DTYPES)
    nz.check_same_dtype(op, "w", w, w0=w0, grad=grad, **state)
    return n


def _check_wsam_weights(op, src, grad_weight, sharpness_weight):
    """(grad_weight, sharpness_weight) as floats; both mix grad with src, so need one."""
    grad_weight, sharpness_weight = float(grad_weight), float(sharpness_weight)
    if src is None and (grad_weight != 0.0 or sharpness_weight != 0.0):
        raise ValueError(f"{op}: grad_weight and sharpness_weight need src (the saved gradient)")
    return grad_weight, sharpness_weight


def sgd_step_(w, w0, grad, src, momentum_buffer, scale, lr, momentum, dampening, weight_decay,
              nesterov, maximize, first_step, write_grad, grad_weight=0.0, sharpness_weight=0.0):
    """Restore, effective gradient and torch.optim.SGD's update in one pass (docs/kernels.md)."""
    op = "sgd_step_"
    n = _check_step_tensors(op, w, w0, grad, src, momentum_buffer=momentum_buffer)
    grad_weight, sharpness_weight = _check_wsam_weights(op, src, grad_weight, sharpness_weight)
    nz.check_device(op, w.device)
    if n == 0:
        return
    has_buf = momentum_buffer is not None
    with nz.on_device(w.device):
        _sgd_step_kernel[nz.elem_grid(n)](
            w, w0 if w0 is not None else w, grad, src if src is not None else grad,
            momentum_buffer if has_buf else w, n,
            float(scale), float(lr), float(momentum), 1.0 - float(dampening), float(weight_decay),
            grad_weight, sharpness_weight,
            HAS_W0=w0 is not None, HAS_SRC=src is not None, HAS_BUF=has_buf,
            HAS_WD=float(weight_decay) != 0.0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
            FIRST_STEP=bool(first_step), WRITE_GRAD=bool(write_grad), MIX=grad_weight != 0.0,
            SHARP=sharpness_weight != 0.0, BLOCK=nz.ELEM_BLOCK, num_warps=nz.NUM_WARPS)


def adam_step_(w, w0, grad, src, exp_avg, exp_avg_sq, scale, lr, beta1, beta2, eps, weight_decay,
               step_size, bias_correction2_sqrt, decoupled, maximize, write_grad, grad_weight=0.0,
               sharpness_weight=0.0):
    """Restore, effective gradient and torch.optim.Adam/AdamW's update in one pass."""
    op = "adam_step_"
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t is None:
            raise ValueError(f"{op}: {name} is required")
    n = _check_step_tensors(op, w, w0, grad, src, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    grad_weight, sharpness_weight = _check_wsam_weights(op, src, grad_weight, sharpness_weight)
    nz.check_device(op, w.device)
    if n == 0:
        return
    lr, weight_decay = float(lr), float(weight_decay)
    with nz.on_device(w.device):
        _adam_step_kernel[nz.elem_grid(n)](
            w, w0 if w0 is not None else w, grad, src if src is not None else grad,
            exp_avg, exp_avg_sq, n,
            float(scale), lr, 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps),
            weight_decay, 1.0 - lr * weight_decay, float(step_size), float(bias_correction2_sqrt),
            grad_weight, sharpness_weight,
            HAS_W0=w0 is not None, HAS_SRC=src is not None, HAS_WD=weight_decay != 0.0,
            DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize), WRITE_GRAD=bool(write_grad),
            MIX=grad_weight != 0.0, SHARP=sharpness_weight != 0.0,
            BLOCK=nz.ELEM_BLOCK, num_warps=nz.NUM_WARPS)
