"""Triton kernels of the ops that reset weights and gradients, which every optimizer uses:
``zero_`` and ``restore_`` (docs/kernels.md)."""
from __future__ import annotations

import triton
import triton.language as tl

from . import _common as nz


@triton.jit
def _zero_kernel(grad_ptr, n, BLOCK: tl.constexpr):
    j, interior = nz.elem_slots(tl.program_id(0), n, BLOCK)
    zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
    if interior:
        tl.store(grad_ptr + j, zero)
    else:
        tl.store(grad_ptr + j, zero, mask=j < n)


@triton.jit
def _restore(w_ptr, w0_ptr, grad_ptr, src_ptr, j, mask, scale,
             HAS_GRAD: tl.constexpr, HAS_SRC: tl.constexpr):
    """w = w0 (bit copy); if HAS_GRAD: grad = scale * (src if HAS_SRC else grad)."""
    tl.store(w_ptr + j, tl.load(w0_ptr + j, mask=mask), mask=mask)
    if HAS_GRAD:
        if HAS_SRC:
            g = nz.load_f32(src_ptr, j, mask)
        else:
            g = nz.load_f32(grad_ptr, j, mask)
        nz.store(grad_ptr, j, scale * g, mask)


@triton.jit
def _restore_kernel(w_ptr, w0_ptr, grad_ptr, src_ptr, n, scale,
                    HAS_GRAD: tl.constexpr, HAS_SRC: tl.constexpr, BLOCK: tl.constexpr):
    j, interior = nz.elem_slots(tl.program_id(0), n, BLOCK)
    if interior:
        _restore(w_ptr, w0_ptr, grad_ptr, src_ptr, j, None, scale, HAS_GRAD, HAS_SRC)
    else:
        _restore(w_ptr, w0_ptr, grad_ptr, src_ptr, j, j < n, scale, HAS_GRAD, HAS_SRC)


def zero_(grad):
    """``grad = 0``."""
    op = "zero_"
    nz.check_tensor(op, "grad", grad, None, None, nz.PARAM_DTYPES)
    nz.check_device(op, grad.device)
    n = grad.numel()
    if n == 0:
        return
    with nz.on_device(grad.device):
        _zero_kernel[nz.elem_grid(n)](grad, n, BLOCK=nz.ELEM_BLOCK, num_warps=nz.NUM_WARPS)


def restore_(w, w0, grad, src, scale):
    """``w = w0``; if grad given: ``grad = scale * (src if given else grad)``."""
    op = "restore_"
    nz.check_tensor(op, "w", w, None, None, nz.PARAM_DTYPES)
    n = w.numel()
    nz.check_tensor(op, "w0", w0, n, w.device, nz.PARAM_DTYPES)
    nz.check_same_dtype(op, "w", w, w0=w0)
    if grad is not None:
        nz.check_tensor(op, "grad", grad, n, w.device, nz.PARAM_DTYPES)
        nz.check_same_dtype(op, "w", w, grad=grad)
        if src is not None:
            nz.check_tensor(op, "src", src, n, w.device, nz.PARAM_DTYPES)
    nz.check_device(op, w.device)
    if n == 0:
        return
    has_grad = grad is not None
    has_src = has_grad and src is not None
    with nz.on_device(w.device):
        _restore_kernel[nz.elem_grid(n)](w, w0, grad if has_grad else w, src if has_src else w, n,
                                         float(scale), HAS_GRAD=has_grad, HAS_SRC=has_src,
                                         BLOCK=nz.ELEM_BLOCK, num_warps=nz.NUM_WARPS)
