"""The fused kernels as functions: validation, backend dispatch and non-contiguous inputs.

Each function has the semantics of docs/kernels.md and one implementation per backend:
``torch`` (flatfused/_torch_ops.py), ``cpu``/``cuda`` (``torch.ops.flatfused``, csrc/) and
``triton`` (flatfused.triton_kernels). Tensors of any shape are accepted and processed in
row-major order; non-contiguous ones are computed on a contiguous copy and written back.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

from . import backends, schemas
from ._memory import share_elements, span
from . import rng as _rng

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "noise", "philox_bits", "noise_", "philox_bits_", "perturb_", "zero_", "accumulate_",
    "accumulate_perturb_", "restore_",
    "sgd_step_", "adam_step_", "grad_norm_sq_", "sam_ascent_", "rng_state", "kernel",
]


def kernel(name: str, backend: str):
    """The implementation of op ``name`` in a concrete backend (:mod:`flatfused.backends`)."""
    return backends.kernel(name, backend)


def rng_state(seed: int, offset: int, device="cpu") -> torch.Tensor:
    """The ``rng`` argument of the kernels: int64 ``[seed, offset]`` on ``device``."""
    seed, offset = _check_seed_offset(seed, offset)
    return torch.tensor([_as_int64(seed), _as_int64(offset)], dtype=torch.int64, device=device)


def _as_int64(value: int) -> int:
    """Two's-complement int64 holding the unsigned 64-bit ``value`` (the kernels read it back)."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _check_seed_offset(seed, offset) -> tuple[int, int]:
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value < (1 << 64):
            raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return seed, offset


def _check_finite(name, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_sigma(sigma) -> float:
    return _check_finite("sigma", sigma)


def _device_of(*tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def _check_same_numel(**tensors):
    sizes = {name: t.numel() for name, t in tensors.items() if t is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"tensors must have the same number of elements, got {sizes}")


def _check_dtype(name, t, allowed):
    if t is not None and t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def _count(name, value) -> int:
    """``value`` as an int >= 0 (a count or an element index), or a clear error (2.5, True,
    -1 and '3' are not silently taken)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)) and not (
            isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_base(base, n: int) -> int:
    """The logical index of element 0: an int with ``base + n`` within int64 (the kernels'
    index type)."""
    base = _count("base", base)
    if base + n > (1 << 63) - 1:
        raise ValueError(f"base + numel must fit in int64, got base={base}, numel={n}")
    return base


def _check_rng(rng, device):
    if rng.dtype != torch.int64 or rng.numel() != 2:
        raise ValueError("rng must be an int64 tensor [seed, offset] of 2 elements")
    if rng.device != device:
        raise ValueError(f"rng must be on the kernels' device {device}, got {rng.device}")


def _unless_same(w0, w):
    """``w0``, or None where it is ``w`` itself: the same elements in the same order (the ops
    that allow it read and write each element at one index)."""
    if w0 is None or not w0.numel() or w0.numel() != w.numel() or w0.device != w.device \
            or w0.data_ptr() != w.data_ptr():
        return w0
    if (w0.is_contiguous() and w.is_contiguous()) or (w0.shape == w.shape
                                                       and w0.stride() == w.stride()):
        return None
    return w0


def _check_disjoint(op, **operands):
    """``operands``: the op's tensors by name, as the caller passed them (before any contiguous
    copy); which of them the op writes is its schema's (:mod:`flatfused.schemas`). No written
    operand may share memory with another: the kernels stream through their operands in parallel
    chunks, so an overlap is a race, and a non-contiguous operand's copy written back afterwards
    would land on the other's elements. Operands whose spans meet are compared element by
    element unless both are dense (interleaved views do not overlap). The C++ ops check the
    same (csrc/aliasing.h), for every backend."""
    if torch.compiler.is_compiling():
        return  # fake tensors have no addresses; the registered ops check when they run
    written = schemas.schema(op).written
    present = [(name, t, name in written, span(t)) for name, t in operands.items()
               if t is not None and t.numel() and not t.is_meta]  # meta tensors have no memory
    for i, (a_name, a, a_written, (a_start, a_end)) in enumerate(present):
        for b_name, b, b_written, (b_start, b_end) in present[i + 1:]:
            if (a_written or b_written) and a.device == b.device and a_start < b_end \
                    and b_start < a_end and share_elements(a, b):
                raise ValueError(f"flatfused.{op}: {a_name} and {b_name} must not share memory")


class _Flat(contextlib.ExitStack):
    """Gives 1-D contiguous versions of tensors; copies back the mutated non-contiguous ones.

    A mutated tensor is refused when autograd would record it (grad mode on and the tensor
    requires grad: the kernels have no derivative, so a graph holding it would give silently
    wrong gradients; torch's in-place ops refuse a leaf alike), and its version counter is
    bumped afterwards, as an in-place op of torch's does (the compiled kernels write through
    raw pointers), so that a graph that saved it fails at backward instead of reading new
    values."""

    def __call__(self, t, mutated=False):
        if t is None:
            return None
        if mutated and not torch.compiler.is_compiling():
            if t.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(
                    "flatfused.ops: an operand the kernel writes requires grad; the kernels have "
                    "no derivative: call them under torch.no_grad() (as the optimizers do)")
            self.callback(torch.autograd.graph.increment_version, t)
        if t.is_contiguous():
            return t.view(-1)
        flat = t.contiguous().view(-1)
        if mutated:
            self.callback(lambda: t.copy_(flat.view(t.shape)))
        return flat


def _run(name, backend, device, *args):
    concrete = backends.resolve(backend, device)
    kernel(name, concrete)(*args)


# ---------------------------------------------------------------------------- RNG


def philox_bits_(out, rng, base=0, backend="auto"):
    """Fill int32 ``out`` with the raw Philox lanes of elements ``base ..``."""
    _check_dtype("out", out, (torch.int32,))
    _check_rng(rng, out.device)
    _check_disjoint("philox_bits_", out=out, rng=rng)
    with _Flat() as flat:
        fout = flat(out, True)
        _run("philox_bits_", backend, out.device, fout, rng, _check_base(base, out.numel()))
    return out


def noise_(out, rng, base=0, distribution=None, backend="auto"):
    """Fill ``out`` with the noise of elements ``base ..`` of the draw at ``rng``."""
    _check_dtype("out", out, FLOAT_DTYPES)
    _check_rng(rng, out.device)
    dist = _rng.distribution_code(distribution)
    _check_disjoint("noise_", out=out, rng=rng)
    with _Flat() as flat:
        fout = flat(out, True)
        _run("noise_", backend, out.device, fout, rng, _check_base(base, out.numel()), dist)
    return out


def philox_bits(numel, seed, offset=0, base=0, device="cpu", backend="auto") -> torch.Tensor:
    """int32 Philox lanes of elements ``base .. base+numel-1`` of the draw at ``(seed, offset)``."""
    out = torch.empty(_count("numel", numel), dtype=torch.int32, device=device)
    return philox_bits_(out, rng_state(seed, offset, out.device), base, backend)


def noise(numel, seed, offset=0, dtype=torch.float32, device="cpu", backend="auto",
          distribution=None, base=0) -> torch.Tensor:
    """The noise flatfused draws for ``numel`` elements at ``(seed, offset)`` (docs/rng.md).

    Element ``i`` uses Philox counter ``offset + (base + i) // 4`` and lane ``(base + i) % 4``;
    every backend returns the same values (bit-identical bits, floats within a few ulps).
    """
    out = torch.empty(_count("numel", numel), dtype=dtype, device=device)
    return noise_(out, rng_state(seed, offset, out.device), base, distribution, backend)


# ---------------------------------------------------------------------------- NSO


def perturb_(w, w0, rng, base=0, sigma=1.0, distribution=None, save=False, grad=None,
             backend="auto"):
    """``if save: w0 = w``; then ``w = w0 + sigma * eps`` (a negative sigma is the minus pass);
    ``grad = 0`` when given (the zeroing a step does before its first pass, in the same pass)."""
    _check_dtype("w", w, FLOAT_DTYPES)
    _check_param_like(w, w0=w0, grad=grad)
    _check_same_numel(w=w, w0=w0, grad=grad)
    device = _device_of(w, w0, grad)
    _check_rng(rng, device)
    dist = _rng.distribution_code(distribution)
    _check_disjoint("perturb_", grad=grad, w=w, w0=_unless_same(w0, w), rng=rng)
    with _Flat() as flat:
        fw, fw0, fgrad = flat(w, True), flat(w0, save), flat(grad, True)
        _run("perturb_", backend, device, fw, fw0, rng, _check_base(base, w.numel()), dist,
             _check_sigma(sigma), bool(save), fgrad)
    return w


def zero_(grad, backend="auto"):
    """``grad = 0`` (the zeroing of a gradient buffer before a step's first pass)."""
    _check_dtype("grad", grad, FLOAT_DTYPES)
    device = _device_of(grad)
    with _Flat() as flat:
        _run("zero_", backend, device, flat(grad, True))
    return grad


def accumulate_(acc, grad, weight=1.0, init=False, zero_grad=False, backend="auto"):
    """``acc = (0 if init else acc) + weight * grad`` (acc fp32); then ``grad = 0`` if asked."""
    _check_dtype("acc", acc, (torch.float32,))
    _check_dtype("grad", grad, FLOAT_DTYPES)
    _check_same_numel(acc=acc, grad=grad)
    device = _device_of(acc, grad)
    _check_disjoint("accumulate_", acc=acc, grad=grad)
    with _Flat() as flat:
        facc, fgrad = flat(acc, True), flat(grad, zero_grad)
        _run("accumulate_", backend, device, facc, fgrad, float(weight), bool(init),
             bool(zero_grad))
    return acc


def accumulate_perturb_(w, w0, acc, grad, rng, base=0, sigma=1.0, distribution=None, save=False,
                        weight=1.0, init=False, zero_grad=False, backend="auto"):
    """``accumulate_`` then ``perturb_`` in one pass (``store_gradients`` + ``first_step``)."""
    _check_dtype("w", w, FLOAT_DTYPES)
    _check_param_like(w, w0=w0, grad=grad)
    _check_dtype("acc", acc, (torch.float32,))
    _check_same_numel(w=w, w0=w0, acc=acc, grad=grad)
    device = _device_of(w, w0, acc, grad)
    _check_rng(rng, device)
    dist = _rng.distribution_code(distribution)
    _check_disjoint("accumulate_perturb_", acc=acc, grad=grad, w=w, w0=_unless_same(w0, w),
                    rng=rng)
    with _Flat() as flat:
        fw, fw0, facc, fgrad = flat(w, True), flat(w0, save), flat(acc, True), flat(grad, zero_grad)
        _run("accumulate_perturb_", backend, device, fw, fw0, facc, fgrad, rng,
             _check_base(base, w.numel()), dist,
             _check_sigma(sigma), bool(save), float(weight), bool(init), bool(zero_grad))
    return w


def restore_(w, w0, grad=None, src=None, scale=1.0, backend="auto"):
    """``w = w0``; if ``grad`` is given, ``grad = scale * (src if given else grad)``."""
    _check_dtype("w", w, FLOAT_DTYPES)
    _check_param_like(w, w0=w0, grad=grad)
    _check_dtype("src", src, FLOAT_DTYPES)
    _check_same_numel(w=w, w0=w0, grad=grad, src=src)
    if src is not None and grad is None:
        raise ValueError("src needs grad: it is copied into grad")
    device = _device_of(w, w0, grad, src)
    _check_disjoint("restore_", grad=grad, w=w, w0=_unless_same(w0, w), src=src)
    with _Flat() as flat:
        fw, fw0, fgrad, fsrc = flat(w, True), flat(w0), flat(grad, True), flat(src)
        _run("restore_", backend, device, fw, fw0, fgrad, fsrc, float(scale))
    return w


def _check_param_like(w, **tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype != w.dtype:
            raise TypeError(f"{name} must have the parameter's dtype {w.dtype}, got {t.dtype}")


def _check_wsam_weights(src, grad_weight, sharpness_weight) -> tuple[float, float]:
    grad_weight, sharpness_weight = float(grad_weight), float(sharpness_weight)
    if src is None and (grad_weight != 0 or sharpness_weight != 0):
        raise ValueError("grad_weight and sharpness_weight need src (the saved gradient g0), got "
                         f"grad_weight={grad_weight}, sharpness_weight={sharpness_weight} without src")
    return grad_weight, sharpness_weight


def sgd_step_(w, w0, grad, src=None, momentum_buffer=None, *, scale=1.0, lr, momentum=0.0,
              dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False,
              write_grad=False, grad_weight=0.0, sharpness_weight=0.0, backend="auto"):
    """Restore from ``w0`` (if given) and apply torch.optim.SGD's update with ``scale * src``.

    Weighted SAM (needs ``src``, the saved clean gradient): the gradient is ``scale * src +
    grad_weight * grad``, and after the update ``w -= sharpness_weight * (grad - src)``.
    """
    _check_dtype("w", w, FLOAT_DTYPES)
    _check_param_like(w, w0=w0, grad=grad, momentum_buffer=momentum_buffer)
    _check_dtype("src", src, FLOAT_DTYPES)
    _check_same_numel(w=w, w0=w0, grad=grad, src=src, momentum_buffer=momentum_buffer)
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("momentum != 0 needs a momentum_buffer")
    grad_weight, sharpness_weight = _check_wsam_weights(src, grad_weight, sharpness_weight)
    device = _device_of(w, w0, grad, src, momentum_buffer)
    _check_disjoint("sgd_step_", momentum_buffer=momentum_buffer, w=w, grad=grad,
                    w0=_unless_same(w0, w), src=src)
    with _Flat() as flat:
        fw, fw0, fgrad, fsrc = flat(w, True), flat(w0), flat(grad, write_grad), flat(src)
        fbuf = flat(momentum_buffer, True)
        _run("sgd_step_", backend, device, fw, fw0, fgrad, fsrc, fbuf, float(scale), float(lr),
             float(momentum), float(dampening), float(weight_decay), bool(nesterov),
             bool(maximize), bool(first_step), bool(write_grad), grad_weight, sharpness_weight)
    return w


def adam_coefficients(lr: float, beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """Adam's host-side coefficients at ``step``: ``(step_size, bias_correction2_sqrt)``,
    formed as torch.optim.Adam forms them (``** 0.5``, not ``math.sqrt``), so the fused step
    rounds as torch's does."""
    return lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5


def adam_step_(w, w0, grad, src=None, exp_avg=None, exp_avg_sq=None, *, scale=1.0, lr, beta1,
               beta2, eps, weight_decay=0.0, step, decoupled=True, maximize=False,
               write_grad=False, grad_weight=0.0, sharpness_weight=0.0, backend="auto"):
    """Restore from ``w0`` (if given) and apply Adam (``decoupled=False``) or AdamW's update at ``step``.

    ``grad_weight`` / ``sharpness_weight``: Weighted SAM's terms, as in ``sgd_step_``.
    """
    _check_dtype("w", w, FLOAT_DTYPES)
    _check_param_like(w, w0=w0, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _check_dtype("src", src, FLOAT_DTYPES)
    if exp_avg is None or exp_avg_sq is None:
        raise ValueError("adam_step_ needs exp_avg and exp_avg_sq")
    _check_same_numel(w=w, w0=w0, grad=grad, src=src, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    grad_weight, sharpness_weight = _check_wsam_weights(src, grad_weight, sharpness_weight)
    device = _device_of(w, w0, grad, src, exp_avg, exp_avg_sq)
    step_size, bias_correction2_sqrt = adam_coefficients(lr, beta1, beta2, step)
    _check_disjoint("adam_step_", exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, w=w, grad=grad,
                    w0=_unless_same(w0, w), src=src)
    with _Flat() as flat:
        fw, fw0, fgrad, fsrc = flat(w, True), flat(w0), flat(grad, write_grad), flat(src)
        fm, fv = flat(exp_avg, True), flat(exp_avg_sq, True)
        _run("adam_step_", backend, device, fw, fw0, fgrad, fsrc, fm, fv, float(scale), float(lr),
             float(beta1), float(beta2), float(eps), float(weight_decay), float(step_size),
             float(bias_correction2_sqrt), bool(decoupled), bool(maximize), bool(write_grad),
             grad_weight, sharpness_weight)
    return w


# ---------------------------------------------------------------------------- SAM


def _check_scalar(name, t, device):
    """``out`` / ``norm_sq``: an fp32 tensor of shape [1] on the kernels' device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor of shape [1], got dtype {t.dtype}")
    if tuple(t.shape) != (1,):
        raise ValueError(f"{name} must be a float32 tensor of shape [1], got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the kernels' device {device}, got {t.device}")


def grad_norm_sq_(out, grad, w=None, backend="auto"):
    """``out[0] += sum(v * v)`` with ``v = |w| * grad`` (ASAM's adaptive norm) or ``v = grad``.

    ``out`` is an fp32 tensor of shape [1] on the kernels' device: several buffers accumulate
    into one scalar with no host synchronisation. The terms are fp32 (an overflow gives inf,
    NaN propagates) and summed in double in an order fixed by the size: repeated calls give the
    same bits on every backend's device, whatever the thread count.
    """
    _check_dtype("grad", grad, FLOAT_DTYPES)
    if w is not None and w.dtype != grad.dtype:
        raise TypeError(f"w must have grad's dtype {grad.dtype}, got {w.dtype}")
    _check_same_numel(grad=grad, w=w)
    device = _device_of(grad, w)
    _check_scalar("out", out, device)
    _check_disjoint("grad_norm_sq_", out=out, grad=grad, w=w)
    with _Flat() as flat:
        fgrad, fw = flat(grad), flat(w)
        _run("grad_norm_sq_", backend, device, out, fgrad, fw)
    return out


def sam_ascent_(w, w0, grad, g0, norm_sq, rho, eps=1e-12, adaptive=False, zero_grad=False,
                backend="auto"):
    """SAM's ascent: ``w0 = w``; ``g0 = grad`` if given; ``w += ((w*w if adaptive else 1) * grad)
    * rho / (sqrt(norm_sq[0]) + eps)``; ``grad = 0`` if ``zero_grad``.

    ``norm_sq`` is the fp32 [1] tensor ``grad_norm_sq_`` accumulated, read on the device.
    """
    _check_dtype("w", w, FLOAT_DTYPES)
    _check_param_like(w, w0=w0, grad=grad, g0=g0)
    _check_same_numel(w=w, w0=w0, grad=grad, g0=g0)
    device = _device_of(w, w0, grad, g0)
    _check_scalar("norm_sq", norm_sq, device)
    rho, eps = _check_finite("rho", rho), _check_finite("eps", eps)
    _check_disjoint("sam_ascent_", norm_sq=norm_sq, g0=g0, w=w, w0=w0, grad=grad)
    with _Flat() as flat:
        fw, fw0, fgrad, fg0 = flat(w, True), flat(w0, True), flat(grad, zero_grad), flat(g0, True)
        _run("sam_ascent_", backend, device, fw, fw0, fgrad, fg0, norm_sq, rho, eps,
             bool(adaptive), bool(zero_grad))
    return w
