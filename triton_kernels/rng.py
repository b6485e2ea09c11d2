"""Triton ``philox_bits_`` and ``noise_`` (docs/kernels.md, docs/rng.md)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as nz


@triton.jit
def _philox_bits_kernel(out_ptr, rng_ptr, first_counter, n,
                        SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j, interior = nz.rng_slots(pid, n, SHIFT, BLOCK)
    bits = nz.bits_block(rng_ptr, first_counter + pid.to(tl.int64) * BLOCK, BLOCK)
    if interior:
        tl.store(out_ptr + j, bits)
    else:
        tl.store(out_ptr + j, bits, mask=(j >= 0) & (j < n))


@triton.jit
def _noise_kernel(out_ptr, rng_ptr, first_counter, n,
                  SHIFT: tl.constexpr, DIST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j, interior = nz.rng_slots(pid, n, SHIFT, BLOCK)
    eps = nz.noise_block(rng_ptr, first_counter + pid.to(tl.int64) * BLOCK, BLOCK, DIST)
    if interior:
        nz.store(out_ptr, j, eps, None)
    else:
        nz.store(out_ptr, j, eps, (j >= 0) & (j < n))


def philox_bits_(out, rng, base):
    """out (int32) = lane i % 4 of Philox(seed, offset + i // 4), i = base + j, bit-cast."""
    op = "philox_bits_"
    nz.check_tensor(op, "out", out, None, None, (torch.int32,))
    nz.check_rng(op, rng, out.device)
    base, _ = nz.check_base(op, base)
    nz.check_device(op, out.device)
    n = out.numel()
    if n == 0:
        return
    shift, first_counter, grid = nz.rng_layout(n, base)
    with nz.on_device(out.device):
        _philox_bits_kernel[grid](out, rng, first_counter, n, SHIFT=shift, BLOCK=nz.RNG_BLOCK,
                                  num_warps=nz.NUM_WARPS)


def noise_(out, rng, base, dist):
    """out (float dtype) = eps_i, the noise of distribution ``dist`` at i = base + j."""
    op = "noise_"
    nz.check_tensor(op, "out", out, None, None, nz.FLOAT_DTYPES)
    nz.check_rng(op, rng, out.device)
    base, dist = nz.check_base(op, base, dist)
    nz.check_device(op, out.device)
    n = out.numel()
    if n == 0:
        return
    shift, first_counter, grid = nz.rng_layout(n, base)
    with nz.on_device(out.device):
        _noise_kernel[grid](out, rng, first_counter, n, SHIFT=shift, DIST=dist, BLOCK=nz.RNG_BLOCK,
                            num_warps=nz.NUM_WARPS)

