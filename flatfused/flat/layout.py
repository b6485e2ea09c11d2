"""Flattening the param groups into buffers: one per (group, device, dtype, perturbed), in group
order, with each parameter's noise index; refusing what flattening would untie."""
from __future__ import annotations

import torch

from .._memory import overlapping_pairs
from .buffer import FlatBuffer
from .hooks import _grad_pointers
from .shards import _is_sharded, _shard_buffer
from .views import Segment, _is_dense, view_like


def build_flat_buffers(param_groups, first_base: int = 0,
                       unperturbed=frozenset()) -> tuple[list[FlatBuffer], int]:
    """Flatten every parameter that requires grad, per (group, device, dtype, perturbed), in
    group order; ``unperturbed`` holds the (group index, index in the group) of the parameters
    a flat-minima optimizer only updates, without perturbing them.

    Sharded (DTensor) parameters get a :class:`ShardBuffer` each. Returns the buffers and the
    total number of (global) elements: the size of the noise index space.
    """
    _check_distinct(param_groups)
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad and p.is_meta:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is on the meta device (no memory to "
                    "train); materialise the model first (model.to_empty(device=...) and "
                    "initialise or load it), then create the optimizer")
    buffers: list[FlatBuffer] = []
    base = first_base
    for gi, group in enumerate(param_groups):
        buckets: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
        for pi, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            moved = (gi, pi) not in unperturbed
            if _is_sharded(p):
                buffers.append(_shard_buffer(gi, p, base))
                buffers[-1].perturbed = moved
            else:
                buckets.setdefault((p.device, p.dtype, moved), []).append((p, base))
            base += p.numel()
        for (device, dtype, moved), entries in buckets.items():
            buffers.append(_flatten(gi, device, dtype, entries))
            buffers[-1].perturbed = moved
    return buffers, base - first_base


def _check_distinct(param_groups) -> None:
    """Refuse what flattening would silently untie: each parameter that requires grad gets its
    own slot of a new buffer, so one listed twice would be updated twice, and parameters that
    share memory (views of one tensor) would stop sharing it after the first step."""
    params: dict[int, torch.Tensor] = {}
    for group in param_groups:
        for p in group["params"]:
            if id(p) in params:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears more than once in "
                                 "the param groups; list each parameter once")
            params[id(p)] = p
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params.values():
        # Sharded parameters live in their own shards; meta tensors have no memory to share.
        if not _is_sharded(p) and not p.is_meta:
            by_device.setdefault(p.device, []).append(p)
    for same_device in by_device.values():
        for i, j in overlapping_pairs(same_device):
            a, b = same_device[i], same_device[j]
            if a.requires_grad or b.requires_grad:  # frozen parameters are not moved
                raise ValueError(
                    f"parameters of shapes {tuple(a.shape)} and {tuple(b.shape)} share memory "
                    "(views of one tensor); a flat-buffer optimizer gives each its own storage, "
                    "which would untie them. Tie weights by using one Parameter object in both "
                    "places, or give each parameter its own storage")


def _flatten(gi, device, dtype, entries) -> FlatBuffer:
    params = [p for p, _ in entries]
    offsets, segments, total = [], [], 0
    for p, b in entries:
        offsets.append(total)
        last = segments[-1] if segments else None
        if last is not None and last.base + last.length == b:
            last.length += p.numel()
        else:
            segments.append(Segment(total, p.numel(), b))
        total += p.numel()
    data = torch.empty(total, dtype=dtype, device=device)
    grad = torch.zeros(total, dtype=dtype, device=device)
    buf = FlatBuffer(gi, params, offsets, [b for _, b in entries], data, grad,
                     [s for s in segments if s.length > 0])
    buf._shapes = [tuple(p.shape) for p in params]
    old_grads = []
    with torch.no_grad():
        for p, o in zip(params, offsets):
            if not _is_dense(p.data):
                p.data = p.data.contiguous()
            view = view_like(data, p, o)
            view.copy_(p.data)
            old_grads.append(p.grad)
            p.data = view
        # The cached views (FlatBuffer.grad_is_shared), made once every parameter has its final
        # strides.
        for i, (p, old_grad, gview) in enumerate(zip(params, old_grads, buf.attached_views(grad))):
            if old_grad is not None:
                if old_grad.is_sparse:
                    raise RuntimeError("flatfused optimizers do not support sparse gradients")
                gview.copy_(old_grad)
                p.grad = gview
            elif p.numel() == 0:
                p.grad = gview
            else:
                buf.missing.add(i)  # no gradient yet: attached by the hook when one comes
        del gview, old_grad
    buf.install_hooks()
    buf._grad_ptrs = _grad_pointers(params)
    return buf
