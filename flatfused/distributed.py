"""What the optimizers need from torch.distributed: averaging, and switching a wrapper's sync off.

Multi-pass steps (NSO, WSAM) run some forward-backward passes whose gradients need not be
averaged on their own: their sum is averaged once, by the last pass. ``no_sync`` switches the
gradient synchronisation of a DDP module (``no_sync()``) or an FSDP2 module
(``set_requires_gradient_sync``) off for such a pass; for anything else it does nothing.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist


def exit_without_teardown() -> None:
    """End a finished worker process now (status 0), skipping the interpreter's teardown: gloo's
    threads, still owned by modules (DDP's reducer) when it runs, sometimes abort the process
    there ("terminate called without an active exception", about 1 run in 10 on a 2-core VM).
    Call it only after the work succeeded and its results were written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def world_size() -> int:
    """The default process group's size, or 1 outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_fsdp2(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(model, FSDPModule)


def syncs_gradients(model) -> bool:
    """Whether ``model`` averages gradients across ranks itself during backward (DDP, FSDP2)."""
    if world_size() == 1 or model is None:
        return False
    return isinstance(model, torch.nn.parallel.DistributedDataParallel) or is_fsdp2(model)


def ddp_syncs_now(model) -> bool:
    """Whether a backward through ``model`` now runs DDP's reducer, which averages what each
    ``.grad`` holds (outside ``no_sync()``)."""
    return (isinstance(model, torch.nn.parallel.DistributedDataParallel)
            and bool(model.require_backward_grad_sync))


@contextlib.contextmanager
def no_sync(model):
    """Run backward passes without the wrapper's gradient synchronisation (DDP, FSDP2); the
    gradients accumulate locally and the next synchronised backward averages the sum."""
    if not syncs_gradients(model):
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def all_reduce_mean_(tensors) -> None:
    """Average each tensor across ranks in place (SUM then divide: gloo has no AVG)."""
    n = world_size()
    if n == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(n)


def all_reduce_max_(tensor: torch.Tensor) -> None:
    """Element-wise maximum across ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def broadcast_int(value: int, src: int = 0) -> int:
    """``value`` as rank ``src`` has it (e.g. a seed every rank must share)."""
    if world_size() == 1:
        return value
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def shard_groups(p: torch.Tensor) -> tuple:
    """The process groups over which a sharded (DTensor) parameter's shards make up the whole:
    those of the mesh dimensions it is sharded along. Under HSDP the other dimensions hold
    replicas, which a sum over all ranks would count more than once."""
    mesh = p.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(p.placements)
                 if placement.is_shard())


def reduce_over_shards_(partial: torch.Tensor, groups: tuple, op: str = "sum") -> torch.Tensor:
    """Reduce a per-shard partial over the shards, in place, with ``op`` "sum" (a squared
    norm's) or "max" (an overflow flag's): all-reduced over each group of :func:`shard_groups`
    in turn (a no-op outside torch.distributed). Every rank passes the same groups in the same
    order."""
    if groups and world_size() > 1:
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        for group in groups:
            dist.all_reduce(partial, op=reduce_op, group=group)
    return partial
