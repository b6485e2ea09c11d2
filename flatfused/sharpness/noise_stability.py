"""Noise stability of the loss, ``E_u[L(w + u)] − L(w)`` with Gaussian weight noise (what NSO minimises)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import ops
from .keskar import _preserved, mean_loss

__all__ = ["noise_stability", "NoiseStability"]


class NoiseStability(NamedTuple):
    """Monte-Carlo estimate of ``E_u[L(w + u)] − L(w)`` and its standard error."""

    mean: float
    stderr: float


def _as_batches(data_or_loader):
    """One batch ``(inputs, targets)`` → ``[batch]``; a one-shot iterator → a list; else as is."""
    if (isinstance(data_or_loader, (tuple, list)) and len(data_or_loader) == 2
            and isinstance(data_or_loader[0], torch.Tensor)):
        return [tuple(data_or_loader)]
    if iter(data_or_loader) is data_or_loader:  # a generator / iterator can be read only once
        return list(data_or_loader)
    return data_or_loader


def noise_stability(model: torch.nn.Module, criterion, data_or_loader, sigma: float,
                    num_samples: int = 32, seed: int = 0, backend: str = "auto") -> NoiseStability:
    """Estimate ``E_u[L(w + u)] − L(w)``, ``u ~ N(0, sigma² I)`` over the trainable parameters.

    Args:
        model: the network; its trainable (``requires_grad``) parameters are perturbed.
        criterion: mean-reduced loss ``criterion(model(x), y)``.
        data_or_loader: one batch ``(inputs, targets)`` or an iterable of such batches (a
            DataLoader; a one-shot iterator is read once into a list). ``L`` is the mean loss over
            it, batches weighted by their size.
        sigma: the noise scale (>= 0).
        num_samples: number of noise draws ``K`` (>= 1).
        seed: Philox seed. The noise is ``sigma · flatfused.ops.noise(numel, seed, offset)`` per
            parameter, in ``model.parameters()`` order, with one running offset advanced by
            ``ceil(numel / 4)`` per parameter and never reset between samples, so a seed gives
            the same draws on every backend and device.
        backend: the kernel backend of the noise draws.

    Returns:
        ``NoiseStability(mean, stderr)``: the mean over the ``K`` draws of ``L(w + u_k) − L(w)``
        and its standard error ``std_k / sqrt(K)`` (NaN for ``K = 1``).

    The losses are computed in eval mode under ``torch.no_grad()``; the model's weights (restored
    bit-exactly from a copy, not by subtraction), buffers, gradients and train/eval flags are
    restored afterwards. For a quadratic loss with Hessian ``H`` the expectation is
    ``sigma² / 2 · trace(H)``.
    """
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    batches = _as_batches(data_or_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    diffs = []
    with _preserved(model):
        model.eval()
        base = mean_loss(model, criterion, batches)
        saved = [p.detach().clone() for p in params]
        offset = 0
        for _ in range(num_samples):
            with torch.no_grad():
                for p, w in zip(params, saved):
                    n = p.numel()
                    u = ops.noise(n, seed, offset, dtype=torch.float32, device=p.device,
                                  backend=backend)
                    offset += (n + 3) // 4
                    p.copy_(w + sigma * u.view(p.shape).to(p.dtype))
            diffs.append(mean_loss(model, criterion, batches) - base)
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
    mean = math.fsum(diffs) / num_samples
    if num_samples == 1:
        return NoiseStability(mean, float("nan"))
    var = math.fsum((d - mean) ** 2 for d in diffs) / (num_samples - 1)
    return NoiseStability(mean, math.sqrt(var / num_samples))
