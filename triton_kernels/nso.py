"""Triton ``perturb_``, ``accumulate_`` and ``accumulate_perturb_`` (docs/kernels.md,
csrc/step_math.h)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as nz


@triton.jit
def _perturb(w_ptr, w0_ptr, j, mask, eps, sigma, SAVE: tl.constexpr):
    """if SAVE: w0 = w (bit copy); w = w0 + sigma * eps."""
    if SAVE:
        w = tl.load(w_ptr + j, mask=mask)
        tl.store(w0_ptr + j, w, mask=mask)
        x = w.to(tl.float32)
    else:
        x = nz.load_f32(w0_ptr, j, mask)
    nz.store(w_ptr, j, x + sigma * eps, mask)


@triton.jit
def _accumulate(acc_ptr, grad_ptr, j, mask, weight, INIT: tl.constexpr, ZERO_GRAD: tl.constexpr):
    """acc = (INIT ? 0 : acc) + weight * grad; if ZERO_GRAD: grad = 0."""
    g = nz.load_f32(grad_ptr, j, mask)
    if INIT:
        acc = weight * g
    else:
        acc = nz.load_f32(acc_ptr, j, mask) + weight * g
    nz.store(acc_ptr, j, acc, mask)
    if ZERO_GRAD:
        nz.store(grad_ptr, j, tl.zeros_like(g), mask)


@triton.jit
def _accumulate_perturb(w_ptr, w0_ptr, acc_ptr, grad_ptr, j, mask, eps, sigma, weight,
                        SAVE: tl.constexpr, ACCUMULATE: tl.constexpr, INIT: tl.constexpr,
                        ZERO_GRAD: tl.constexpr):
    """if ACCUMULATE: the _accumulate body, else grad = 0 if ZERO_GRAD; then the _perturb body
    (the spec's order)."""
    if ACCUMULATE:
        _accumulate(acc_ptr, grad_ptr, j, mask, weight, INIT, ZERO_GRAD)
    elif ZERO_GRAD:
        nz.store(grad_ptr, j, tl.zeros_like(eps), mask)
    _perturb(w_ptr, w0_ptr, j, mask, eps, sigma, SAVE)


@triton.jit
def _perturb_kernel(w_ptr, w0_ptr, acc_ptr, grad_ptr, rng_ptr, first_counter, n, sigma, weight,
                    SHIFT: tl.constexpr, DIST: tl.constexpr, SAVE: tl.constexpr,
                    ACCUMULATE: tl.constexpr, INIT: tl.constexpr, ZERO_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """perturb_ (ACCUMULATE False: acc_ptr, weight, INIT unused; grad_ptr only with ZERO_GRAD) or
    accumulate_perturb_ (True), over the RNG layout of _common.py."""
    pid = tl.program_id(0)
    j, interior = nz.rng_slots(pid, n, SHIFT, BLOCK)
    eps = nz.noise_block(rng_ptr, first_counter + pid.to(tl.int64) * BLOCK, BLOCK, DIST)
    if interior:
        _accumulate_perturb(w_ptr, w0_ptr, acc_ptr, grad_ptr, j, None, eps, sigma, weight,
                            SAVE, ACCUMULATE, INIT, ZERO_GRAD)
    else:
        _accumulate_perturb(w_ptr, w0_ptr, acc_ptr, grad_ptr, j, (j >= 0) & (j < n), eps, sigma,
                            weight, SAVE, ACCUMULATE, INIT, ZERO_GRAD)


@triton.jit
def _accumulate_kernel(acc_ptr, grad_ptr, n, weight,
                       INIT: tl.constexpr, ZERO_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    j, interior = nz.elem_slots(tl.program_id(0), n, BLOCK)
    if interior:
        _accumulate(acc_ptr, grad_ptr, j, None, weight, INIT, ZERO_GRAD)
    else:
        _accumulate(acc_ptr, grad_ptr, j, j < n, weight, INIT, ZERO_GRAD)


def perturb_(w, w0, rng, base, dist, sigma, save, grad=None):
    """``if save: w0 = w``; ``w = w0 + sigma * eps_i`` with i = base + j; ``grad = 0`` if given."""
    op = "perturb_"
    nz.check_tensor(op, "w", w, None, None, nz.PARAM_DTYPES)
    n = w.numel()
    nz.check_tensor(op, "w0", w0, n, w.device, nz.PARAM_DTYPES)
    nz.check_same_dtype(op, "w", w, w0=w0)
    if grad is not None:
        nz.check_tensor(op, "grad", grad, n, w.device, nz.PARAM_DTYPES)
        nz.check_same_dtype(op, "w", w, grad=grad)
    nz.check_rng(op, rng, w.device)
    base, dist = nz.check_base(op, base, dist)
    nz.check_device(op, w.device)
    if n == 0:
        return
    shift, first_counter, grid = nz.rng_layout(n, base)
    with nz.on_device(w.device):
        _perturb_kernel[grid](w, w0, w, w if grad is None else grad, rng, first_counter, n,
                              float(sigma), 0.0, SHIFT=shift, DIST=dist, SAVE=bool(save),
                              ACCUMULATE=False, INIT=False, ZERO_GRAD=grad is not None,
                              BLOCK=nz.RNG_BLOCK, num_warps=nz.NUM_WARPS)


def accumulate_perturb_(w, w0, acc, grad, rng, base, dist, sigma, save, weight, init, zero_grad):
    """``accumulate_(acc, grad, weight, init, zero_grad)`` then ``perturb_(w, w0, rng, base,
    dist, sigma, save)`` in one pass: one read of grad and w0 / w per element."""
    op = "accumulate_perturb_"
    nz.check_tensor(op, "w", w, None, None, nz.PARAM_DTYPES)
    n = w.numel()
    nz.check_tensor(op, "w0", w0, n, w.device, nz.PARAM_DTYPES)
    nz.check_tensor(op, "acc", acc, n, w.device, (torch.float32,))
    nz.check_tensor(op, "grad", grad, n, w.device, nz.PARAM_DTYPES)
    nz.check_same_dtype(op, "w", w, w0=w0, grad=grad)
    nz.check_rng(op, rng, w.device)
    base, dist = nz.check_base(op, base, dist)
    nz.check_device(op, w.device)
    if n == 0:
        return
    shift, first_counter, grid = nz.rng_layout(n, base)
    with nz.on_device(w.device):
        _perturb_kernel[grid](w, w0, acc, grad, rng, first_counter, n, float(sigma), float(weight),
                              SHIFT=shift, DIST=dist, SAVE=bool(save), ACCUMULATE=True,
                              INIT=bool(init), ZERO_GRAD=bool(zero_grad), BLOCK=nz.RNG_BLOCK,
                              num_warps=nz.NUM_WARPS)


def accumulate_(acc, grad, weight, init, zero_grad):
    """``acc = (init ? 0 : acc) + weight * grad``; ``if zero_grad: grad = 0``."""
    op = "accumulate_"
    nz.check_tensor(op, "acc", acc, None, None, (torch.float32,))
    n = acc.numel()
    nz.check_tensor(op, "grad", grad, n, acc.device, nz.PARAM_DTYPES)
    nz.check_device(op, acc.device)
    if n == 0:
        return
    with nz.on_device(acc.device):
        _accumulate_kernel[nz.elem_grid(n)](acc, grad, n, float(weight), INIT=bool(init),
                                            ZERO_GRAD=bool(zero_grad), BLOCK=nz.ELEM_BLOCK,
                                            num_warps=nz.NUM_WARPS)
