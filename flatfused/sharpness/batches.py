"""Batches for the Hessian tools: one ``(inputs, targets)`` batch or an iterable of them, moved to
the model's device, with their sizes; and the eval mode the measurements run in."""
from __future__ import annotations

import torch


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(e, device) for e in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.size(0)) if inputs.dim() > 0 else 1
    if isinstance(inputs, (list, tuple)) and inputs:
        return _batch_size(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return _batch_size(next(iter(inputs.values())))
    raise TypeError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _is_single_batch(data) -> bool:
    """(inputs, targets) with a tensor (or tensor container) first -> one batch; anything else
    is an iterable of batches. Ambiguous case: a pair of pairs is read as two batches (wrap a
    single batch whose inputs and targets are both pairs in a list: ``[batch]``)."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], (torch.Tensor, dict, tuple, list))
            and not (isinstance(data[0], (tuple, list)) and len(data[0]) == 2
                     and isinstance(data[1], (tuple, list))))


def _pair(batch):
    """``batch`` as ``(inputs, targets)``, or a clear error."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    if isinstance(batch, torch.Tensor):
        what = f"a tensor of shape {tuple(batch.shape)}"
    elif isinstance(batch, (tuple, list)):
        what = f"a {type(batch).__name__} of {len(batch)}"
    else:
        what = f"a {type(batch).__name__}"
    raise ValueError(f"a batch must be an (inputs, targets) pair, got {what}; pass one batch as "
                     "(inputs, targets) or an iterable of such pairs")


class _EvalMode:
    """Put the model in eval mode; restore each module's previous mode on exit."""

    def __init__(self, model, restore=True):
        self.model, self.restore, self.modes = model, restore, None

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        if self.restore:
            for m, mode in self.modes:
                m.training = mode
        return False
