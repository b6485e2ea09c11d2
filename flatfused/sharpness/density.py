"""The Gaussian-smoothed spectral density from stochastic Lanczos quadrature's nodes and weights."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

# PyHessian's kernel variance factor (``sigma_squared`` of its ``density_generate``).
_PYHESSIAN_SIGMA_SQUARED = 1e-5
# The default kernel spans at least this many grid spacings, so that the sampled Gaussians are
# resolved (neither missed between grid points nor double counted) even on a coarse grid.
_MIN_KERNEL_BINS = 3
# Nodes closer than this, relative to their magnitude, are drawn as one: the grid then keeps a
# spacing far above float64's resolution instead of collapsing onto a few representable values.
_MIN_RELATIVE_SPREAD = 1e-6


def density_on_grid(nodes, weights, num_bins: int = 10000, sigma: Optional[float] = None,
                    margin: float = 0.01):
    """Gaussian-smoothed spectral density from SLQ ``(nodes, weights)``: PyHessian's
    ``density_generate`` (``density_plot.py``) with a kernel that scales with the spectrum.
    Returns ``(grid, density)``, float64 tensors of ``num_bins`` values: the average over the
    start vectors of ``sum_i w_i N(x; x_i, sigma^2)``, normalised so that its trapezoid
    integral over ``grid`` is 1.

    * Grid: ``num_bins`` points over ``[min - margin * s, max + margin * s]``, ``min``, ``max``
      and ``s = max - min`` over the nodes of all runs (nodes closer than 1e-6 of their
      magnitude, e.g. a single one, count as spread over that much around their midpoint, over
      1 if they are all 0). PyHessian pads the means over runs of each run's min and max by an
      absolute 0.01 instead, so some nodes may fall off its grid.
    * Kernel: PyHessian's Gaussian has the variance ``1e-5 * max(1, R)`` in eigenvalue units,
      ``R`` the grid's range: its width depends on the units of the loss, and relative to the
      spectrum it narrows as ``sqrt(1e-5 / R)``, below one of its 10000 grid bins once ``R``
      exceeds about 1000. flatfused applies PyHessian's rule to the spectrum measured in units
      of ``R``: the default ``sigma = sqrt(1e-5) * R`` (about ``R / 316``, some 32 bins of the
      default grid), PyHessian's kernel exactly when ``R = 1``, and at least 3 grid spacings
      for a small ``num_bins``. The default ``margin`` then pads the grid by about 3 sigma, as
      PyHessian's 0.01 does at ``R <= 1``.
    * Normalisation: as in PyHessian, the sum of the kernels is divided by its integral over
      the grid (PyHessian's a rectangle sum, flatfused's the trapezoid rule: they differ by
      half a bin at each end), which puts back the tails that reach past the grid.
    * ``sigma`` given: the kernel's standard deviation in eigenvalue units (PyHessian's
      ``sigma_squared`` is a variance factor). It must be at least the grid spacing
      ``(max - min)(1 + 2 margin) / (num_bins - 1)``, else ``ValueError`` naming the
      ``num_bins`` that resolves it: a narrower Gaussian falls between grid points, so spikes
      are missed or counted twice. ``num_bins`` is not widened silently because the cost grows
      as ``num_bins`` times the number of nodes.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if len(nodes) != len(weights) or len(nodes) == 0:
        raise ValueError(f"nodes and weights must hold the same number (>= 1) of runs, got "
                         f"{len(nodes)} and {len(weights)}")
    for i, (n, w) in enumerate(zip(nodes, weights)):
        if len(n) != len(w):
            raise ValueError(f"run {i} has {len(n)} nodes but {len(w)} weights")
    flat_nodes = torch.tensor([float(v) for n in nodes for v in n], dtype=torch.float64)
    flat_w = torch.tensor([float(v) for w in weights for v in w], dtype=torch.float64) / len(nodes)
    if flat_nodes.numel() == 0:
        raise ValueError("no nodes: every run is empty")
    if not bool(torch.isfinite(flat_nodes).all()):
        raise ValueError("the nodes must be finite")
    if (not bool(torch.isfinite(flat_w).all()) or bool((flat_w < 0).any())
            or float(flat_w.sum()) <= 0):
        raise ValueError("the weights must be finite, >= 0 and not all 0")
    lo, hi = float(flat_nodes.min()), float(flat_nodes.max())
    spread = hi - lo
    # every node 0: nothing sets a scale, so take PyHessian's unit one
    floor = _MIN_RELATIVE_SPREAD * max(abs(lo), abs(hi)) or 1.0
    if spread < floor:
        mid = (lo + hi) / 2
        lo, hi, spread = mid - floor / 2, mid + floor / 2, floor
    lo, hi = lo - margin * spread, hi + margin * spread
    num_bins = int(num_bins)
    grid = torch.linspace(lo, hi, num_bins, dtype=torch.float64)
    spacing = (hi - lo) / (num_bins - 1)
    if sigma is None:
        sigma = max(math.sqrt(_PYHESSIAN_SIGMA_SQUARED) * (hi - lo), _MIN_KERNEL_BINS * spacing)
    else:
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
        if sigma < spacing:
            need = math.ceil((hi - lo) / sigma) + 1
            raise ValueError(
                f"sigma={sigma:g} is narrower than the grid spacing {spacing:g} "
                f"({num_bins} bins over [{lo:g}, {hi:g}]): the Gaussians would fall between "
                f"grid points; pass num_bins >= {need}, a larger sigma, or sigma=None")
    dens = torch.zeros_like(grid)
    chunk = 256  # nodes per broadcast: bounds the temporary at chunk * num_bins values
    for i in range(0, flat_nodes.numel(), chunk):
        x, w = flat_nodes[i:i + chunk, None], flat_w[i:i + chunk, None]
        dens += (w * torch.exp(-0.5 * ((grid - x) / sigma) ** 2)).sum(0)
    return grid, dens / torch.trapezoid(dens, grid)
