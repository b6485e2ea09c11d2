"""The local shard of a sharded (DTensor, e.g. FSDP2) parameter as a flat buffer of its own."""
from __future__ import annotations

import torch

from ..distributed import shard_groups
from .buffer import FlatBuffer
from .views import Segment


class ShardBuffer(FlatBuffer):
    """The local shard of one sharded (DTensor, e.g. FSDP2) parameter, used where it lives.

    FSDP2 all-gathers parameters from its own shard storage, so the shard cannot move into a
    shared flat buffer: this buffer's ``data`` and ``grad`` are 1-D views of the parameter's
    and the gradient's local tensors. Its segment's noise index is the shard's global element
    index, so a sharded run draws the noise an unsharded one draws. Its flat state (the base
    optimizer's moments included) is local; :meth:`views` wraps it as DTensors laid out like
    the parameter, which is what the base optimizer and distributed checkpointing expect.
    """

    sharded = True

    def check_params(self) -> None:
        p = self.params[0]
        local = p._local_tensor
        if local.data_ptr() != self.data.data_ptr() or local.numel() != self.numel:
            if local.numel() != self.numel or local.dtype != self.dtype:
                raise RuntimeError("a sharded parameter changed its local shape or dtype after the "
                                   "optimizer was created; create the optimizer after sharding")
            self.data = local.view(-1)

    def check_grads(self, accumulate: bool = False, synced: bool = False) -> None:
        """FSDP2 reduce-scatters a gradient into a new DTensor when ``.grad`` is None and adds
        into the one there otherwise: ``grad`` follows its local shard (no copy). A None
        ``.grad`` is missing, as in :meth:`FlatBuffer.check_grads`: ``grad`` is then zeros of
        this buffer's own (whoever dropped the gradient may still hold the old shard), or with
        ``accumulate`` the earlier passes' sum, attached again for FSDP2 to add into. Nothing is
        copied, so ``synced`` changes nothing here."""
        p = self.params[0]
        g = p.grad
        if g is None:
            if 0 in self.missing:
                return
            if accumulate:
                p.grad = self.views(self.grad)[0]
                return
            self.grad = torch.zeros_like(self.data)
            self.mark_grad_zero()
            self.missing.add(0)
            return
        self.missing.discard(0)
        local = g._local_tensor
        if local.data_ptr() != self.grad.data_ptr():
            if local.dtype != self.dtype or local.numel() != self.numel:
                raise RuntimeError(f"gradient shard of dtype {local.dtype} and {local.numel()} "
                                   f"elements does not match its parameter shard")
            self.grad = local.view(-1)
            self._zero_version = None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (this shard's size) as a DTensor sharded like the parameter, no copy."""
        from torch.distributed.tensor import DTensor

        p = self.params[0]
        return [DTensor.from_local(flat.view(self._shapes[0]), p.device_mesh, p.placements,
                                   run_check=False, shape=p.shape, stride=p.stride())]


def _is_sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def _shard_buffer(gi: int, p: torch.Tensor, param_base: int) -> ShardBuffer:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p._local_tensor
    if not local.is_contiguous():
        raise RuntimeError("flatfused supports sharded parameters with contiguous local shards "
                           "(FSDP2's default Shard(0) layout)")
    if not p.is_contiguous():
        raise RuntimeError("flatfused supports sharded parameters of contiguous global layout")
    local_shape, global_offset = compute_local_shape_and_global_offset(
        p.shape, p.device_mesh, p.placements)
    # The shard is a run of consecutive global elements only when it splits the leading dim.
    if any(size != full for size, full in zip(local_shape[1:], p.shape[1:])):
        raise RuntimeError("flatfused supports parameters sharded along their first dimension "
                           f"(FSDP2's Shard(0)); got placements {p.placements}")
    row = 1
    for size in p.shape[1:]:
        row *= size
    first = param_base + (global_offset[0] if global_offset else 0) * row
    missing = p.grad is None  # no gradient yet: FSDP2 gives one at its next reduce-scatter
    grad = torch.zeros_like(local).view(-1) if missing else p.grad._local_tensor.view(-1)
    buf = ShardBuffer(gi, [p], [0], [first], local.view(-1), grad,
                      [Segment(0, local.numel(), first)] if local.numel() else [])
    if missing:
        buf.missing.add(0)
    buf._shapes = [tuple(local.shape)]
    buf.shard_groups = shard_groups(p)
    return buf
