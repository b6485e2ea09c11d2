"""Triton ``grad_norm_sq_`` and ``sam_ascent_`` (docs/kernels.md, csrc/step_math.h).

``grad_norm_sq_`` is deterministic without atomics: each program writes the double sum of its
block's fp32 terms to a scratch tensor, then one program adds those partials in a fixed order
into ``out`` on the device (two launches, no host synchronisation). ``sam_ascent_`` reads the
squared norm from its device scalar inside the kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as nz

# Partials added per iteration of the finishing program.
FINISH_BLOCK = 1024


@triton.jit
def _grad_norm_sq_block(grad_ptr, w_ptr, j, mask, HAS_W: tl.constexpr):
    """Double sum of the block's fp32 terms v * v, v = |w| * g (HAS_W) or g; masked slots
    (mask None: none) add 0."""
    v = nz.load_f32(grad_ptr, j, mask)
    if HAS_W:
        v = tl.abs(nz.load_f32(w_ptr, j, mask)) * v
    term = v * v
    if mask is not None:
        term = tl.where(mask, term, 0.0)
    return tl.sum(term.to(tl.float64), axis=0)


@triton.jit
def _grad_norm_sq_partials_kernel(grad_ptr, w_ptr, partials_ptr, n, HAS_W: tl.constexpr,
                                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j, interior = nz.elem_slots(pid, n, BLOCK)
    if interior:
        total = _grad_norm_sq_block(grad_ptr, w_ptr, j, None, HAS_W)
    else:
        total = _grad_norm_sq_block(grad_ptr, w_ptr, j, j < n, HAS_W)
    tl.store(partials_ptr + pid, total)


@triton.jit
def _grad_norm_sq_finish_kernel(partials_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """out[0] += the sum of the partials, rounded to fp32: slot k of acc takes partials k, k +
    BLOCK, ... in order, then one tl.sum (a fixed tree)."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, count, BLOCK):
        k = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + k, mask=k < count, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr, tl.load(out_ptr) + total.to(tl.float32))


@triton.jit
def _sam_ascent(w_ptr, w0_ptr, grad_ptr, g0_ptr, j, mask, scale,
                ADAPTIVE: tl.constexpr, HAS_G0: tl.constexpr, ZERO_GRAD: tl.constexpr):
    """w0 = w, g0 = grad (bit copies); w = x + ((x*x if ADAPTIVE else 1) * g) * scale; grad = 0."""
    w = tl.load(w_ptr + j, mask=mask)
    grad = tl.load(grad_ptr + j, mask=mask)
    tl.store(w0_ptr + j, w, mask=mask)
    if HAS_G0:
        tl.store(g0_ptr + j, grad, mask=mask)
    x = w.to(tl.float32)
    g = grad.to(tl.float32)
    if ADAPTIVE:
        e = ((x * x) * g) * scale
    else:
        e = g * scale
    nz.store(w_ptr, j, x + e, mask)
    if ZERO_GRAD:
        nz.store(grad_ptr, j, tl.zeros_like(g), mask)


@triton.jit
def _sam_ascent_kernel(w_ptr, w0_ptr, grad_ptr, g0_ptr, norm_sq_ptr, n, rho, eps,
                       ADAPTIVE: tl.constexpr, HAS_G0: tl.constexpr, ZERO_GRAD: tl.constexpr,
                       BLOCK: tl.constexpr):
    # IEEE sqrt and division, as the specification's torch ops
    scale = tl.div_rn(rho, tl.sqrt_rn(tl.load(norm_sq_ptr)) + eps)
    j, interior = nz.elem_slots(tl.program_id(0), n, BLOCK)
    if interior:
        _sam_ascent(w_ptr, w0_ptr, grad_ptr, g0_ptr, j, None, scale, ADAPTIVE, HAS_G0, ZERO_GRAD)
    else:
        _sam_ascent(w_ptr, w0_ptr, grad_ptr, g0_ptr, j, j < n, scale, ADAPTIVE, HAS_G0,
                    ZERO_GRAD)


def _check_scalar(op, name, t, device):
    """``out`` / ``norm_sq``: fp32, shape [1], on the kernel's device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32 or tuple(t.shape) != (1,):
        raise ValueError(f"{op}: {name} must be a float32 tensor of shape [1], got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")


def grad_norm_sq_(out, grad, w):
    """``out[0] += sum(v * v)``, ``v = |w| * grad`` (w given) or ``grad`` (docs/kernels.md)."""
    op = "grad_norm_sq_"
    nz.check_tensor(op, "grad", grad, None, None, nz.PARAM_DTYPES)
    n = grad.numel()
    if w is not None:
        nz.check_tensor(op, "w", w, n, grad.device, nz.PARAM_DTYPES)
        nz.check_same_dtype(op, "grad", grad, w=w)
    _check_scalar(op, "out", out, grad.device)
    nz.check_device(op, grad.device)
    if n == 0:
        return
    grid = nz.elem_grid(n)
    partials = torch.empty(grid[0], dtype=torch.float64, device=grad.device)
    with nz.on_device(grad.device):
        _grad_norm_sq_partials_kernel[grid](grad, w if w is not None else grad, partials, n,
                                            HAS_W=w is not None, BLOCK=nz.ELEM_BLOCK,
                                            num_warps=nz.NUM_WARPS)
        _grad_norm_sq_finish_kernel[(1,)](partials, out, grid[0], BLOCK=FINISH_BLOCK,
                                          num_warps=nz.NUM_WARPS)


def sam_ascent_(w, w0, grad, g0, norm_sq, rho, eps, adaptive, zero_grad):
    """SAM's ascent with the step length ``rho / (sqrt(norm_sq[0]) + eps)`` read on the device."""
    op = "sam_ascent_"
    nz.check_tensor(op, "w", w, None, None, nz.PARAM_DTYPES)
    n = w.numel()
    nz.check_tensor(op, "w0", w0, n, w.device, nz.PARAM_DTYPES)
    nz.check_tensor(op, "grad", grad, n, w.device, nz.PARAM_DTYPES)
    if g0 is not None:
        nz.check_tensor(op, "g0", g0, n, w.device, nz.PARAM_DTYPES)
    nz.check_same_dtype(op, "w", w, w0=w0, grad=grad, g0=g0)
    _check_scalar(op, "norm_sq", norm_sq, w.device)
    nz.check_device(op, w.device)
    if n == 0:
        return
    with nz.on_device(w.device):
        _sam_ascent_kernel[nz.elem_grid(n)](
            w, w0, grad, g0 if g0 is not None else w0, norm_sq, n, float(rho), float(eps),
            ADAPTIVE=bool(adaptive), HAS_G0=g0 is not None, ZERO_GRAD=bool(zero_grad),
            BLOCK=nz.ELEM_BLOCK, num_warps=nz.NUM_WARPS)
