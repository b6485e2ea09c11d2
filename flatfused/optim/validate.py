"""The optimizers' checks of their arguments and of what a closure returns: clear errors of the
library's own, before any kernel runs or any update is applied."""
from __future__ import annotations

import inspect
import math
import numbers

import torch

_FP32_MAX = float(torch.finfo(torch.float32).max)


def real(name: str, value) -> float:
    """``value`` as a float, or a clear error unless it is a real number (not a string or a
    bool, which ``float()`` would take)."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def nonnegative(name: str, value) -> float:
    """``value`` as a float, or a clear error unless it is a number >= 0 that the kernels' fp32
    arithmetic can hold (sigma, rho, ...: 1e300 would become inf there)."""
    number = real(name, value)
    if not math.isfinite(number) or number < 0 or number > _FP32_MAX:
        raise ValueError(f"{name} must be a finite number >= 0 (at most float32's largest, "
                         f"{_FP32_MAX:.4g}), got {value!r}")
    return number


def optional_nonnegative(name: str, value) -> float | None:
    """``None``, or :func:`nonnegative` (clipping norms and other optional limits)."""
    return None if value is None else nonnegative(name, value)


def flag(name: str, value) -> bool:
    """``value`` as a bool: True/False (or 0/1), not any truthy object (``use_neg='no'`` would
    be True)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return flag(name, value.item())
    raise TypeError(f"{name} must be True or False, got {value!r}")


def group_key(base_optimizer, name: str, fallback: str) -> str:
    """The param-group key for a wrapper's hyperparameter ``name``: ``name`` (the references'
    key), or ``fallback`` when the base optimizer has a hyperparameter of that name itself
    (Adadelta's ``rho``, RMSprop's ``alpha``), which the references silently overwrite."""
    if isinstance(base_optimizer, torch.optim.Optimizer):
        taken = name in base_optimizer.defaults
    else:
        try:
            taken = name in inspect.signature(base_optimizer).parameters
        except (TypeError, ValueError):
            taken = False
    return fallback if taken else name


def check_loss(loss):
    """The closure's return: the loss (a tensor or a real number) or None. Anything else is
    refused before the step applies an update it could not report a loss for."""
    if loss is None or isinstance(loss, torch.Tensor):
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return loss
    raise TypeError(f"the closure must return the loss (a tensor or a number) or None, got "
                    f"{type(loss).__name__}")


def signal_nonfinite(loss, others: list):
    """``loss``, or NaN in its place when any of ``others`` (the step's other passes' losses) is
    not finite: the one loss a step returns must not hide a pass that blew up. Tensors are
    compared on their device (no host synchronisation); the value is unchanged otherwise."""
    others = [o for o in others if o is not None]
    if loss is None or not others:
        return loss
    if isinstance(loss, torch.Tensor):
        finite = torch.stack([torch.isfinite(torch.as_tensor(o, device=loss.device)).all()
                              for o in others]).all()
        return torch.where(finite, loss, torch.full_like(loss, float("nan")))
    if all(math.isfinite(float(o)) for o in others):
        return loss
    return float("nan")
