"""Each flat buffer's hooks on its parameters: attaching a missing gradient's slot before
autograd accumulates into it, refusing sparse gradients and parameters cast or moved after
flattening, and noting where autograd accumulated into a slot; and which buffer owns a
parameter (one flat optimizer at a time)."""
from __future__ import annotations

import weakref

import torch

# The buffer each parameter was last flattened into, by id(parameter): (a weak reference to the
# parameter, to tell a reused id; the owning buffer's weak reference). A parameter belongs to
# one flat optimizer at a time: one created later over the same parameters takes them over, and
# the earlier one's hooks stand down (it refuses to step them, see FlatBuffer.check_params).
# Kept here rather than on the parameter, whose __dict__ pickles with the model.
_owners: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner_of(p: torch.Tensor) -> weakref.ref | None:
    entry = _owners.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def _moved_message(p: torch.Tensor, buf) -> str:
    return (f"a parameter of shape {tuple(p.shape)} moved from {buf.device}/{buf.dtype} to "
            f"{p.device}/{p.dtype} after the optimizer flattened it (model.to(), .double(), "
            "...); create the optimizer after moving or casting the model")


def _grad_pointers(params: list[torch.Tensor]) -> list[int | None]:
    return [None if (g := p.grad) is None else g.data_ptr() for p in params]


def _refuse_sparse(grad: torch.Tensor) -> None:
    # Without this, autograd would silently add a sparse gradient into the dense flat buffer.
    if grad.is_sparse:
        raise RuntimeError(
            "flatfused optimizers do not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
            "use dense gradients or torch.optim.SparseAdam for those parameters")


def _gradient_hook(buffer_ref: weakref.ref, i: int):
    """The hook on parameter ``i`` of a flat buffer: it runs before autograd accumulates a
    gradient into the parameter. It refuses sparse gradients, and where ``.grad`` is None it
    attaches the parameter's slot of the flat gradient buffer (see FlatBuffer.install_hooks)."""
    def hook(grad: torch.Tensor) -> None:
        _refuse_sparse(grad)
        buf = buffer_ref()
        if buf is None:
            return
        p = buf.params[i]
        if _owner_of(p) is not buffer_ref:  # taken over by a newer optimizer's buffer
            return
        if not buf.sharded and (p.dtype != buf.dtype or p.device != buf.device):
            # Before autograd meets the slot's dtype (its own message names no cause).
            raise RuntimeError(_moved_message(p, buf))
        if p.grad is None:
            buf._attach_before_accumulation(i)
        if buf.fed is not None:
            if p.grad is not None and p.grad.data_ptr() == buf._slot_pointers()[i]:
                buf._slot_is_grad.add(i)
            else:
                buf._slot_is_grad.discard(i)
        if buf.received is not None:  # counting (see FlatBuffer.count_accumulations)
            buf.received.add(i)
            buf.accumulations += 1
    return hook


def _accumulated_hook(buffer_ref: weakref.ref, i: int):
    """The hook that runs after autograd accumulated into parameter ``i`` (not after a
    ``torch.autograd.grad``): see ``FlatBuffer.fed``."""
    def hook(_: torch.Tensor) -> None:
        buf = buffer_ref()
        if (buf is not None and buf.fed is not None and i in buf._slot_is_grad
                and _owner_of(buf.params[i]) is buffer_ref):
            buf.fed.add(i)
    return hook


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
