"""The published NSO BatchNorm helpers, which only touch ``nn.BatchNorm2d`` (a defect: other
``_BatchNorm`` modules keep updating their running statistics during the perturbed passes).
flatfused's fixed helpers live in :mod:`flatfused.bn` and are re-exported here; both use the
reference's ``backup_momentum`` attribute, so either set restores what the other disabled.
"""
from __future__ import annotations

import torch

from ..bn import _BACKUP, disable_running_stats, enable_running_stats

__all__ = [
    "disable_running_stats",
    "enable_running_stats",
    "reference_disable_running_stats",
    "reference_enable_running_stats",
]


def reference_disable_running_stats(model: torch.nn.Module) -> None:
    """The published NSO helper: momentum -> 0 on ``nn.BatchNorm2d`` modules only."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            setattr(module, _BACKUP, module.momentum)
            module.momentum = 0


def reference_enable_running_stats(model: torch.nn.Module) -> None:
    """The published NSO helper: restore the momentum of ``nn.BatchNorm2d`` modules only."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d) and hasattr(module, _BACKUP):
            module.momentum = getattr(module, _BACKUP)
