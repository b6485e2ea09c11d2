"""BatchNorm bypass for the extra (perturbed) forward passes of NSO / SAM.

The extra passes of a flat-minima step run the model at perturbed weights; they must not move
the BatchNorm running statistics. The usual trick is to set ``momentum = 0`` for those passes
(``running = (1 - 0) * running + 0 * batch``) and restore it afterwards.

- :func:`disable_running_stats` / :func:`enable_running_stats` are flatfused's version: they
  cover every ``torch.nn.modules.batchnorm._BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
  the lazy variants and user subclasses), and disabling twice in a row keeps the original
  momentum (the backup is taken only when the module is not already bypassed).
- The published NSO helpers (only ``nn.BatchNorm2d``) are in :mod:`flatfused.reference.bn`.

Known limitation of the momentum trick, shared with every reference: ``num_batches_tracked``
still counts the bypassed passes. It only matters for ``momentum=None`` (cumulative average)
modules, whose later updates are then weighted as if those passes had been averaged in.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "disable_running_stats",
    "enable_running_stats",
]

# Attribute names used on the modules. The published helpers use ``backup_momentum``; keeping the
# same name lets a model bypassed by one set of helpers be restored by the other.
_BACKUP = "backup_momentum"
_BYPASSED = "_flatfused_bn_bypassed"


def disable_running_stats(model: torch.nn.Module) -> None:
    """Freeze the running statistics of every ``_BatchNorm`` in ``model`` (momentum -> 0)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            # Back up unless this module is already bypassed (so disabling twice keeps the
            # original momentum). The momentum check covers a restore by other helpers.
            if not (getattr(module, _BYPASSED, False) and module.momentum == 0):
                setattr(module, _BACKUP, module.momentum)
                setattr(module, _BYPASSED, True)
            module.momentum = 0


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo :func:`disable_running_stats`: restore each ``_BatchNorm``'s backed-up momentum.

    Modules that were never disabled are left alone.
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm) and hasattr(module, _BACKUP):
            module.momentum = getattr(module, _BACKUP)
            setattr(module, _BYPASSED, False)
