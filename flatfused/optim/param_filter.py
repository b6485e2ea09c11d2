"""``param_filter``: which parameters a flat-minima optimizer perturbs (the others are only
updated)."""
from __future__ import annotations

import torch


def _param_filter(param_filter):
    """``param_filter`` as a predicate on parameters (None: every parameter is perturbed): a
    callable ``p -> bool``, or the parameters to perturb (e.g. :func:`norm_parameters`)."""
    if param_filter is None:
        return None
    if callable(param_filter):
        # (also decides for param groups added later)
        return _KeptFilter(param_filter)
    if isinstance(param_filter, torch.Tensor):
        raise TypeError("param_filter must be a callable or an iterable of parameters, got a "
                        "single tensor (wrap it in a list)")
    try:
        chosen = list(param_filter)
    except TypeError:
        raise TypeError("param_filter must be a callable p -> bool or an iterable of parameters, "
                        f"got {type(param_filter).__name__}") from None
    if not all(isinstance(p, torch.Tensor) for p in chosen):
        raise TypeError("param_filter's iterable must hold parameters (tensors)")
    ids = {id(p) for p in chosen}
    return lambda p: id(p) in ids


class _KeptFilter:
    """A callable filter, kept to decide for parameters added later (add_param_group)."""

    keep = True

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, p) -> bool:
        return bool(self.fn(p))


def norm_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters of ``model``'s normalisation layers (BatchNorm, LayerNorm, GroupNorm,
    InstanceNorm, RMSNorm): SAM-ON's choice of what to perturb (Mueller et al., 2023), for
    ``param_filter``."""
    kinds = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
             torch.nn.LocalResponseNorm)
    rms = getattr(torch.nn, "RMSNorm", None)
    kinds = kinds + ((rms,) if rms is not None else ())
    return [p for m in model.modules() if isinstance(m, kinds)
            for p in m.parameters(recurse=False)]
