"""Vectors over a model's parameters (lists of tensors, one per parameter): the inner products,
normalisation, orthogonalisation and random probes the Hessian algorithms use."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

Vector = List[torch.Tensor]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product of two vectors (lists of tensors), accumulated in float64."""
    if not a:
        return 0.0
    dev = a[0].device
    parts = [torch.sum(x * y, dtype=torch.float64).to(dev) for x, y in zip(a, b)]
    return float(torch.stack(parts).sum())


def _axpy(alpha: float, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vector:
    """y + alpha * x (new tensors)."""
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def _scale(alpha: float, x: Sequence[torch.Tensor]) -> Vector:
    return [alpha * xi for xi in x]


def _normalize(x: Sequence[torch.Tensor]) -> Vector:
    n = math.sqrt(max(_dot(x, x), 0.0))
    return _scale(1.0 / n, x) if n > 0 else [xi.clone() for xi in x]


def _orthogonalize(x: Sequence[torch.Tensor], basis: Sequence[Sequence[torch.Tensor]],
                   passes: int = 2) -> Vector:
    """Remove from x its components along an orthonormal basis (Gram-Schmidt, twice)."""
    x = list(x)
    for _ in range(passes):
        for b in basis:
            x = _axpy(-_dot(x, b), b, x)
    return x


def _rademacher(params, gen: Optional[torch.Generator]) -> Vector:
    out = []
    for p in params:
        z = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) if gen is not None \
            else torch.randint(0, 2, p.shape, dtype=torch.int8)
        out.append(z.to(p.device).to(p.dtype).mul_(2).sub_(1))  # move 1 byte/element, expand there
    return out


def _gaussian(params, gen: Optional[torch.Generator]) -> Vector:
    out = []
    for p in params:
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32) if gen is not None \
            else torch.randn(p.shape, dtype=torch.float32)
        out.append(z.to(device=p.device, dtype=p.dtype))
    return out


def _generator(seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _check_vector(v, params, what) -> Vector:
    v = list(v)
    if len(v) != len(params) or any(not isinstance(x, torch.Tensor) or x.shape != p.shape
                                    for x, p in zip(v, params)):
        raise ValueError(f"{what} must be a list of tensors shaped like the selected parameters, "
                         "in named_parameters() order")
    if _dot(v, v) == 0 or not math.isfinite(_dot(v, v)):
        raise ValueError(f"{what} must be a finite, non-zero vector")
    return [x.detach().to(device=p.device, dtype=p.dtype) for x, p in zip(v, params)]


def _flatten(v: Vector, device, dtype) -> torch.Tensor:
    return torch.cat([x.reshape(-1).to(device=device, dtype=dtype) for x in v])


def _unflatten(flat: torch.Tensor, params) -> Vector:
    out, i = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[i:i + n].view(p.shape).to(device=p.device, dtype=p.dtype))
        i += n
    return out
