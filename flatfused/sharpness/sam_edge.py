"""The SAM edge of stability (Bartlett, Long & Bousquet, "The dynamics of sharpness-aware minimization")."""
from __future__ import annotations

import math

import torch

__all__ = ["sam_edge"]


def sam_edge(grad_norm, rho, lr):
    """SAM's edge of stability ``(‖g‖ / (2ρ)) · (sqrt(1 + 8ρ / (η‖g‖)) − 1)``.

    Args:
        grad_norm: ``‖g‖``, the norm of the unperturbed minibatch gradient (>= 0); a number or
            a tensor (evaluated elementwise).
        rho: SAM's radius ρ (>= 0).
        lr: the step size η (> 0).

    It is evaluated in the algebraically equal form ``4 / (η · (1 + sqrt(1 + 8ρ / (η‖g‖))))``,
    which has no cancellation for small ρ and gives the limits exactly:

    * ``rho == 0``: ``2 / η``, gradient descent's edge (the limit ρ → 0), whatever ``‖g‖``;
    * ``grad_norm == 0`` with ``rho > 0``: ``0`` (the limit ‖g‖ → 0).

    A NaN ``grad_norm`` (a diverged step) gives NaN, so a tracker logs the row instead of
    failing.
    """
    if isinstance(grad_norm, torch.Tensor) or isinstance(rho, torch.Tensor) or isinstance(lr, torch.Tensor):
        g, r, eta = (torch.as_tensor(v, dtype=torch.get_default_dtype())
                     if not isinstance(v, torch.Tensor) else v for v in (grad_norm, rho, lr))
        if not torch.is_floating_point(g):
            g = g.to(torch.get_default_dtype())
        if bool((g < 0).any()) or bool((r < 0).any()) or bool((eta <= 0).any()):
            raise ValueError("sam_edge needs grad_norm >= 0, rho >= 0 and lr > 0")
        x = torch.where(r == 0, torch.zeros_like(g * r), 8 * r / (eta * g))  # inf where g == 0 < rho
        return 4 / (eta * (1 + torch.sqrt(1 + x)))
    g, r, eta = float(grad_norm), float(rho), float(lr)
    if math.isnan(g) and r >= 0 and eta > 0 and math.isfinite(r) and math.isfinite(eta):
        return math.nan
    if not (g >= 0 and r >= 0 and eta > 0) or not all(map(math.isfinite, (r, eta))):
        raise ValueError(f"sam_edge needs grad_norm >= 0, finite rho >= 0 and lr > 0, "
                         f"got grad_norm={grad_norm}, rho={rho}, lr={lr}")
    if r == 0:
        return 2.0 / eta
    if g == 0:
        return 0.0
    return 4.0 / (eta * (1.0 + math.sqrt(1.0 + 8.0 * r / (eta * g))))
