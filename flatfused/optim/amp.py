"""Mixed precision for multi-pass optimizers under ``torch.amp.GradScaler``.

PyTorch's contract for optimizers that handle scaling themselves (``_step_supports_amp_scaling``):
``scaler.step(optimizer, closure)`` checks the gradients present *before* the call, sets
``optimizer.grad_scale`` (the scale, or ``None`` if the user already called
``scaler.unscale_(optimizer)``) and ``optimizer.found_inf``, and calls ``optimizer.step``;
``scaler.update()`` then lowers the scale if an overflow was recorded.

A flat-minima step runs forward-backward passes *inside* ``step``, which that pre-check cannot
see, and the contract has no channel for reporting their overflow back. So the step finds the
``GradScaler`` that called it (its caller's frame) and adds its own overflow flag to the
scaler's per-optimizer ``found_inf`` record, which is what ``update()`` reads. Each step
unscales every gradient once, checks them all, and syncs the host once to decide: if any pass
overflowed, the step restores the weights and changes nothing else (base optimizer state, RNG
position), and the scaler lowers the scale.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from .. import distributed as _dist


@dataclass
class AmpStep:
    """The scaling of one optimizer step."""

    scale: float  # the factor the passes inside the step scale their losses by
    grads_scaled: bool  # whether .grad holds scaled gradients (at first: those from before the step)
    found: torch.Tensor  # fp32 [] overflow flag (> 0: some gradient was not finite)
    scaler: torch.amp.GradScaler | None
    key: int  # the scaler's key for the optimizer
    shard_groups: tuple = ()  # process groups whose ranks hold other shards of the gradients


def _calling_grad_scaler() -> torch.amp.GradScaler | None:
    """The ``GradScaler`` whose ``step`` called this optimizer step, if any."""
    code = torch.amp.GradScaler.step.__code__
    frame = sys._getframe(1)
    for _ in range(12):  # step -> no_grad/profiling wrappers -> GradScaler.step
        if frame is None:
            return None
        if frame.f_code is code:
            scaler = frame.f_locals.get("self")
            return scaler if isinstance(scaler, torch.amp.GradScaler) else None
        frame = frame.f_back
    return None


def begin(optimizer, device: torch.device, uses_grads: bool) -> AmpStep | None:
    """The step's scaling (``None`` without a GradScaler), from the attributes
    ``GradScaler.step`` set on ``optimizer``; ``uses_grads``: whether the step uses the
    gradients present before it (SAM's first pass), whose overflow the scaler already checked."""
    if not hasattr(optimizer, "found_inf") and getattr(optimizer, "grad_scale", None) is None:
        return None
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    scaler = _calling_grad_scaler()
    if scaler is not None:
        scale = scaler.get_scale()
    elif grad_scale is not None:
        scale = float(grad_scale)
        warnings.warn("flatfused: grad_scale is set but no GradScaler called this step; an "
                      "overflow inside the step skips it but cannot lower the scale",
                      RuntimeWarning, stacklevel=3)
    else:
        scale = 1.0
    found = torch.zeros((), dtype=torch.float32, device=device)
    if found_inf is not None and uses_grads:
        # (GradScaler passes the int 0 when no parameter had a gradient to check)
        found += torch.as_tensor(found_inf).to(device=device, dtype=torch.float32).reshape(())
    return AmpStep(scale, grad_scale is not None, found, scaler, id(optimizer))


def unscale_(amp: AmpStep, grads: list[torch.Tensor]) -> None:
    """Divide ``grads`` (flat gradient buffers) by the scale in place and record non-finite values."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, tensors in by_device.items():
        # fp64 reciprocal, as GradScaler computes it, then fp32 (the kernel's type).
        inv = torch.full((), 1.0 / amp.scale, dtype=torch.float32, device=device)
        found = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, inv)
        amp.found += found.to(amp.found.device)


def overflowed(amp: AmpStep) -> bool:
    """Whether any pass overflowed on any shard (one host sync). The scaler's record for this
    optimizer becomes this step's verdict, so that ``update()`` lowers the scale exactly when
    the step was skipped (its own pre-check saw only the gradients from before the step)."""
    _dist.reduce_over_shards_(amp.found, amp.shard_groups, op="max")
    if amp.scaler is not None:
        record = amp.scaler._per_optimizer_states[amp.key]  # see the module doc
        per_device = record["found_inf_per_device"]
        for flag in per_device.values():
            flag.zero_()
        if per_device:
            flag = next(iter(per_device.values()))
            flag.copy_(amp.found.to(flag.device, flag.dtype))
        else:
            per_device[amp.found.device] = amp.found
    return bool(amp.found.item() > 0)
