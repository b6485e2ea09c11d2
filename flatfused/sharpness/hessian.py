"""Hessian tools: trace, top eigenvalues and spectral density of the training-loss Hessian.

Two APIs over one implementation:

* ``hessian`` -- the class of PyHessian (Yao et al. 2020) with its constructor and method
  signatures, so that an existing script ports by changing the import::

      from flatfused.sharpness.hessian import hessian
      H = hessian(model, criterion, data=(inputs, targets), cuda=True)
      top_eigenvalues, top_eigenvectors = H.eigenvalues(top_n=3)
      trace = sum(H.trace()) / len(H.trace())        # the caller averages, as in PyHessian
      nodes, weights = H.density(iter=100, n_v=1)

* functions with what PyHessian lacks: ``hvp`` (autograd or finite-difference Hessian-vector
  products; the finite-difference path needs only first-order gradients, so it runs on models
  whose wrappers do not support double backward, e.g. sharded ones), ``hessian_trace``
  (Hutchinson, Hutch++ or exact; per-layer traces that sum to the total; a parameter filter
  or a ``LayerSelector``, see ``layers.py``),
  ``top_eigenvalues`` (power iteration with deflation, or Lanczos), ``spectral_density``
  (stochastic Lanczos quadrature) and ``density_on_grid``. All are deterministic given ``seed``:
  random vectors come from a CPU ``torch.Generator`` and are moved to each parameter's device,
  so the same seed draws the same probes on any device.

Conventions (both APIs):

* The loss is ``criterion(model(inputs), targets)``, a *mean* over the batch. ``data`` is one
  ``(inputs, targets)`` batch; a dataloader is any iterable of such batches. Over a dataloader
  the Hessian is that of the mean loss over all samples: per-batch HVPs are weighted by batch
  size (``inputs.size(0)``). HVPs are accumulated batch by batch and detached, so memory does
  not grow with the number of batches or iterations (a PyHessian defect). With one batch the
  gradient graph is built once per call and reused for every product, as PyHessian does.
* The parameters are the model's parameters with ``requires_grad`` (optionally restricted by
  ``param_filter(name, param) -> bool``); the Hessian is the block over them, the others fixed.
  Vectors are lists of tensors, one per selected parameter, in ``named_parameters()`` order.
* The model is put in eval mode (BatchNorm uses running statistics, dropout is off). The class
  leaves it in eval mode as PyHessian does; the functions restore the previous mode on return.
* Inputs and targets are moved to the model's device. ``cuda=True`` in the class means "use
  the model's device" (PyHessian hard-codes ``.cuda()``; flatfused fixes that defect, so a CPU
  model works with the default ``cuda=True``). ``cuda`` is accepted and otherwise ignored.
* "Top" eigenvalues are those of largest magnitude (what power iteration finds), returned in
  decreasing magnitude, for both ``method="power"`` and ``method="lanczos"``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .algorithms import (_exact_trace, _hutchinson, _hutchpp, _lanczos, _power_iteration, _slq,
                         _tridiagonal)
from .batches import _EvalMode
from .density import density_on_grid
from .hvp_operator import _HVP, _operator, _selection, matrix_weights
from .vectors import (Vector, _axpy, _check_vector, _dot, _gaussian, _generator, _normalize,
                      _rademacher)

__all__ = [
    "hessian",
    "hvp",
    "hessian_trace",
    "top_eigenvalues",
    "spectral_density",
    "density_on_grid",
    "matrix_weights",
]


class hessian:  # noqa: N801 - PyHessian's name
    """PyHessian's ``hessian`` class (same constructor and methods), with its defects fixed.

    ``hessian(model, criterion, data=None, dataloader=None, cuda=True)``: exactly one of
    ``data`` (an ``(inputs, targets)`` batch) and ``dataloader`` (an iterable of them). The model
    is put in eval mode (and left there, as in PyHessian). Data go to the model's device whatever
    ``cuda`` says. Extra keyword-only arguments (not in PyHessian): ``seed`` (None: the global
    torch RNG, as PyHessian; an int: a private generator, reproducible), ``param_filter``.

    Random vectors are drawn from the global torch RNG unless ``seed`` is given.
    """

    def __init__(self, model, criterion, data=None, dataloader=None, cuda=True, *,
                 seed: Optional[int] = None, param_filter=None):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data and dataloader")
        self.model = model.eval()
        self.criterion = criterion
        self.cuda = cuda
        self._op = _HVP(model, criterion, data=data, dataloader=dataloader,
                        param_filter=param_filter)
        self.device = self._op.device
        self.full_dataset = self._op.full_dataset
        self.data, self.dataloader = data, dataloader
        self.params = self._op.params
        self.param_names = self._op.names
        self._gen = _generator(seed)

    def hv_product(self, v: Vector) -> Vector:
        """H v (one vector: a list of tensors shaped like ``self.params``)."""
        return self._op([v])[0]

    def dataloader_hv_product(self, v: Vector):
        """PyHessian's helper: (v^T H v, H v)."""
        hv = self.hv_product(v)
        return _dot(hv, v), hv

    def eigenvalues(self, maxIter=100, tol=1e-3, top_n=1):  # noqa: N803 - PyHessian's names
        """Top ``top_n`` eigenvalues (largest magnitude) by power iteration with deflation.

        Returns (list of floats, list of eigenvectors, each a list of per-parameter tensors).
        """
        if int(top_n) > self._op.dim:
            raise ValueError(f"top_n={top_n} exceeds the number of parameters ({self._op.dim})")
        return _power_iteration(self._op, int(top_n), int(maxIter), float(tol), self._gen)

    def trace(self, maxIter=100, tol=1e-3):  # noqa: N803
        """Per-probe Hutchinson estimates v^T H v (Rademacher v); stops when the running mean
        changes by less than ``tol`` relatively. The caller averages."""
        estimates, mean = [], 0.0
        for _ in range(int(maxIter)):
            z = _rademacher(self.params, self._gen)
            estimates.append(_dot(self.hv_product(z), z))
            new_mean = sum(estimates) / len(estimates)
            if abs(new_mean - mean) / (abs(mean) + 1e-6) < tol:
                return estimates
            mean = new_mean
        return estimates

    def trace_per_layer(self, maxIter=100):  # noqa: N803
        """Not in PyHessian: {parameter name: Hutchinson estimate of its diagonal-block trace}
        from ``maxIter`` Rademacher probes; the values sum to the full-trace estimate."""
        per_probe = _hutchinson(self._op, int(maxIter), self._gen)
        return {name: sum(p[i] for p in per_probe) / len(per_probe)
                for i, name in enumerate(self.param_names)}

    def density(self, iter=100, n_v=1):  # noqa: A002 - PyHessian's name
        """Stochastic Lanczos quadrature: (eigen_list_full, weight_list_full), each a list of
        ``n_v`` lists of ``iter`` entries (one per Rademacher start vector), as PyHessian's, so
        ``numpy.array`` of them is rectangular; each weight list sums to 1. When Lanczos finds
        an invariant subspace after ``m < iter`` steps (always when ``iter`` exceeds the number
        of parameters), the quadrature is already exact: the last node is repeated with weight
        0 up to ``iter`` entries."""
        nodes, weights = _slq(self._op, int(iter), int(n_v), self._gen)
        width = max(1, int(iter))
        for x, w in zip(nodes, weights):
            x.extend([x[-1]] * (width - len(x)))
            w.extend([0.0] * (width - len(w)))
        return nodes, weights


def hvp(model, criterion, batches, vectors, method: str = "autograd", fd_eps: float = 1e-3,
        param_filter: Optional[Callable] = None, layers=None):
    """Hessian-vector products of the mean loss over ``batches``.

    ``batches``: one ``(inputs, targets)`` batch or an iterable of them (batch-size weighted).
    ``vectors``: one vector (a list of tensors shaped like the selected parameters) or a list of
    such vectors; the result has the same structure. ``method="finite_difference"`` uses the
    central difference of gradients at ``w +- fd_eps * v`` (two first-order passes per vector,
    plain ``backward()``, so it works where double backward does not, e.g. sharded wrappers
    whose parameters are the local shards). ``fd_eps`` is the step along ``v`` as given: scale
    it to the size of ``v`` (for a unit ``v`` in float32, 1e-2..1e-1 may be better). The weights
    are copied back exactly and every parameter's ``.grad`` is restored. ``layers``: a
    ``LayerSelector`` or preset name instead of ``param_filter`` (the same parameters as in
    ``hessian_trace``).
    """
    single = len(vectors) > 0 and isinstance(vectors[0], torch.Tensor)
    vecs = [vectors] if single else list(vectors)
    param_filter, _ = _selection(model, param_filter, layers)
    with _EvalMode(model):
        op = _operator(model, criterion, batches, param_filter, method, fd_eps)
        out = op(vecs)
        op.release()
    return out[0] if single else out


def hessian_trace(model, criterion, data, num_probes: int = 100, method: str = "hutchinson",
                  param_filter: Optional[Callable] = None, per_layer: bool = False,
                  seed: int = 0, progress: bool = False, hvp_method: str = "autograd",
                  fd_eps: float = 1e-3, probe_chunk: int = 1, layers=None):
    """Trace of the loss Hessian over the selected parameters.

    ``method``: ``"hutchinson"`` (``num_probes`` Rademacher probes), ``"hutch++"``
    (``num_probes`` Hessian-vector products in all; much lower error when the spectrum decays;
    keeps about ``2 num_probes / 3`` parameter-sized vectors in memory) or ``"exact"`` (one
    product per selected parameter entry, with the unit vectors: exact up to rounding, for
    small models and checks; ``num_probes`` unused). Returns the trace (float), or
    ``(trace, {block name: trace of its diagonal block})`` with ``per_layer=True``; the blocks
    come from the same probes and sum to the total.
    ``layers``: a ``LayerSelector`` or a preset name (``"linear"``: the Linear/Conv1D weights
    outside embeddings, LayerNorm and the pooler, the per-layer traces of the NSO papers); the
    blocks are then its layers (module names), else each parameter (``param_filter`` selects
    which, e.g. ``matrix_weights``; not both).
    ``probe_chunk``: probes sharing one pass over the data (faster over a dataloader, more
    memory: about ``probe_chunk`` extra parameter-sized vectors). Hutchinson keeps a few
    parameter-sized vectors whatever ``num_probes``; Hutch++ keeps about ``2 num_probes / 3``
    (its sketch), see docs/sharpness.md for measured peaks.
    """
    if num_probes < 1:
        raise ValueError("num_probes must be >= 1")
    param_filter, groups = _selection(model, param_filter, layers)
    gen = _generator(seed)
    with _EvalMode(model):
        op = _operator(model, criterion, data, param_filter, hvp_method, fd_eps)
        if method == "exact":
            blocks = _exact_trace(op, progress, max(1, int(probe_chunk)))
        elif method == "hutchinson":
            per_probe = _hutchinson(op, int(num_probes), gen, progress, max(1, int(probe_chunk)))
            blocks = [sum(p[i] for p in per_probe) / len(per_probe) for i in range(len(op.params))]
        elif method in ("hutch++", "hutchpp"):
            blocks = _hutchpp(op, int(num_probes), gen, progress, max(1, int(probe_chunk)))
        else:
            raise ValueError(f"method must be 'hutchinson', 'hutch++' or 'exact', not {method!r}")
        op.release()
    total = float(sum(blocks))
    if not per_layer:
        return total
    by_param = dict(zip(op.names, blocks))
    if groups is None:
        return total, by_param
    return total, {layer: math.fsum(by_param[n] for n in names) for layer, names in groups.items()}


def top_eigenvalues(model, criterion, data, k: int = 1, method: str = "power",
                    iters: int = 100, tol: float = 1e-3, seed: int = 0,
                    param_filter: Optional[Callable] = None, return_eigenvectors: bool = False,
                    progress: bool = False, hvp_method: str = "autograd", fd_eps: float = 1e-3,
                    init: Optional[Vector] = None, layers=None):
    """The ``k`` eigenvalues of largest magnitude, in decreasing magnitude.

    ``method="power"``: power iteration with deflation (at most ``iters`` products per
    eigenvalue, stopping when the Rayleigh quotient changes by less than ``tol`` relatively).
    ``method="lanczos"``: ``iters`` Lanczos steps with full reorthogonalization (``tol`` unused);
    keeps ``iters`` parameter-sized vectors. Returns a list of floats, or ``(values, vectors)``
    with ``return_eigenvectors=True`` (each vector a list of per-parameter tensors, unit norm).
    ``init``: a start vector (shaped like the selected parameters) instead of a random one, e.g.
    the previous top eigenvector when tracking sharpness along training: the iteration then
    converges in a few products. ``layers``: the Hessian over a ``LayerSelector``'s parameters
    (or a preset name's) instead of ``param_filter``'s.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    param_filter, _ = _selection(model, param_filter, layers)
    gen = _generator(seed)
    with _EvalMode(model):
        op = _operator(model, criterion, data, param_filter, hvp_method, fd_eps)
        if k > op.dim:
            raise ValueError(f"k={k} exceeds the number of parameters ({op.dim})")
        if init is not None:
            init = _check_vector(init, op.params, "init")
        if method == "power":
            vals, vecs = _power_iteration(op, int(k), int(iters), float(tol), gen, progress,
                                          init=init)
        elif method == "lanczos":
            start = _gaussian(op.params, gen) if init is None else init
            alphas, betas, basis = _lanczos(op, max(int(iters), k), start,
                                            keep_basis=return_eigenvectors, progress=progress,
                                            desc="lanczos")
            evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
            order = torch.argsort(evals.abs(), descending=True)[:k]
            vals = [float(evals[i]) for i in order]
            vecs = None
            if return_eigenvectors:
                vecs = []
                for i in order:
                    y = evecs[:, i]
                    vec = [torch.zeros_like(p) for p in op.params]
                    for c, b in zip(y.tolist(), basis):
                        vec = _axpy(c, b, vec)
                    vecs.append(_normalize(vec))
        else:
            raise ValueError(f"method must be 'power' or 'lanczos', not {method!r}")
        op.release()
    return (vals, vecs) if return_eigenvectors else vals


def spectral_density(model, criterion, data, iters: int = 100, n_v: int = 1, seed: int = 0,
                     param_filter: Optional[Callable] = None, progress: bool = False,
                     hvp_method: str = "autograd", fd_eps: float = 1e-3, layers=None):
    """Stochastic Lanczos quadrature: ``(nodes, weights)``, each a list of ``n_v`` lists (one
    per Rademacher start vector, ``min(iters, dim)`` entries or fewer on early convergence).
    Each weight list sums to 1; ``sum(w * x)`` estimates ``trace / dim``. Smooth with
    ``density_on_grid``. ``layers``: as in ``top_eigenvalues``."""
    param_filter, _ = _selection(model, param_filter, layers)
    gen = _generator(seed)
    with _EvalMode(model):
        op = _operator(model, criterion, data, param_filter, hvp_method, fd_eps)
        out = _slq(op, int(iters), int(n_v), gen, progress)
        op.release()
    return out
