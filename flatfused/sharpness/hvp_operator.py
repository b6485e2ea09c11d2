"""The Hessian-vector product operator over a model's selected parameters (autograd or central
finite differences), over one batch or a dataloader, and the parameter selection."""
from __future__ import annotations

from typing import List, Sequence

import torch

from .batches import _batch_size, _is_single_batch, _model_device, _pair, _to_device
from .vectors import Vector


def matrix_weights(name: str, param: torch.Tensor) -> bool:
    """A ``param_filter`` keeping conv and linear weights (the per-layer traces NSO reports)."""
    return param.dim() >= 2 and name.rsplit(".", 1)[-1] == "weight"


def _select_params(model, param_filter):
    names, params = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if param_filter is not None and not param_filter(name, p):
            continue
        names.append(name)
        params.append(p)
    if not params:
        raise ValueError("no parameters selected (none require grad, or param_filter rejected all)")
    return names, params


def _selection(model, param_filter, layers):
    """``(param_filter, blocks)``: ``layers`` (a LayerSelector or a preset name) resolved on the
    model into the filter of its parameters and ``{layer: parameter names}``; without
    ``layers``, ``param_filter`` as given and no grouping (each parameter its own block)."""
    if layers is None:
        return param_filter, None
    if param_filter is not None:
        raise ValueError("pass param_filter or layers, not both (a LayerSelector's include/"
                         "exclude patterns filter by name)")
    from .layers import LayerSelector

    selector = LayerSelector.coerce(layers)
    blocks = selector.blocks(model)
    names = {n for params in blocks.values() for n in params}
    return (lambda name, param: name in names), blocks


class _HVP:
    """H @ v for the mean loss over ``data`` (one batch) or ``dataloader`` (batches).

    ``method="autograd"``: double backward (Pearlmutter). With one batch the gradient graph is
    built once and reused; over a dataloader it is rebuilt per batch and freed after it, and the
    per-batch products are accumulated detached, weighted by batch size.
    ``method="finite_difference"``: ``(g(w + eps v) - g(w - eps v)) / (2 eps)`` with ordinary
    ``backward()`` calls, weights restored exactly (copied back) and existing ``.grad`` restored.
    """

    def __init__(self, model, criterion, data=None, dataloader=None, param_filter=None,
                 method="autograd", fd_eps=1e-3):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data and dataloader")
        if method not in ("autograd", "finite_difference"):
            raise ValueError(f"method must be 'autograd' or 'finite_difference', not {method!r}")
        if method == "finite_difference" and not fd_eps > 0:
            raise ValueError("fd_eps must be positive")
        self.model, self.criterion = model, criterion
        self.method, self.fd_eps = method, float(fd_eps)
        self.names, self.params = _select_params(model, param_filter)
        self.device = _model_device(model)
        self.full_dataset = data is None
        if dataloader is not None and iter(dataloader) is dataloader:
            dataloader = list(dataloader)  # a one-shot iterator: every product reads the data
        self.data, self.dataloader = data, dataloader
        self.dim = sum(p.numel() for p in self.params)
        self._grads = None  # cached first-order graph for a single batch (autograd)

    # -- data ---------------------------------------------------------------------------
    def batches(self):
        for batch in (self.dataloader if self.full_dataset else [self.data]):
            inputs, targets = _pair(batch)
            yield _to_device(inputs, self.device), _to_device(targets, self.device)

    def _loss(self, inputs, targets):
        return self.criterion(self.model(inputs), targets)

    # -- autograd -----------------------------------------------------------------------
    def _first_order(self, inputs, targets):
        with torch.enable_grad():
            loss = self._loss(inputs, targets)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return grads

    def _double_backward(self, grads, vectors, retain_last):
        """[H v for v in vectors] from one first-order graph."""
        idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = []
        for j, v in enumerate(vectors):
            if not idx:  # loss is (at most) linear in the parameters: H = 0
                out.append([torch.zeros_like(p) for p in self.params])
                continue
            retain = retain_last or j < len(vectors) - 1
            hv = torch.autograd.grad([grads[i] for i in idx], self.params,
                                     grad_outputs=[v[i].to(grads[i].dtype) for i in idx],
                                     retain_graph=retain, allow_unused=True)
            out.append([h.detach() if h is not None else torch.zeros_like(p)
                        for h, p in zip(hv, self.params)])
        return out

    def _autograd(self, vectors):
        if not self.full_dataset:
            if self._grads is None:
                inputs, targets = next(self.batches())
                self._grads = self._first_order(inputs, targets)
            return self._double_backward(self._grads, vectors, retain_last=True)
        acc, total = None, 0
        for inputs, targets in self.batches():
            n = _batch_size(inputs)
            grads = self._first_order(inputs, targets)
            hvs = self._double_backward(grads, vectors, retain_last=False)
            del grads
            if acc is None:
                acc = [[h * n for h in hv] for hv in hvs]
            else:
                for a, hv in zip(acc, hvs):
                    for t, h in zip(a, hv):
                        t.add_(h, alpha=n)
            total += n
        if acc is None:
            raise ValueError("the dataloader yielded no batches")
        return [[t / total for t in a] for a in acc]

    # -- finite differences ---------------------------------------------------------------
    def _gradient(self):
        """Gradient of the mean loss (over all batches) at the current weights via backward()."""
        for p in self.model.parameters():
            p.grad = None
        total = 0
        with torch.enable_grad():
            for inputs, targets in self.batches():
                n = _batch_size(inputs)
                loss = self._loss(inputs, targets)
                (loss * n if self.full_dataset else loss).backward()
                total += n
        scale = 1.0 / total if self.full_dataset else 1.0
        # Take autograd's fresh .grad tensors over (no copy) and drop every .grad, so that only
        # the returned gradient stays alive while the next one is computed.
        grads = []
        for p in self.params:
            g = p.grad
            p.grad = None
            grads.append(torch.zeros_like(p) if g is None else g.detach().mul_(scale))
        for p in self.model.parameters():
            p.grad = None
        return grads

    def _finite_difference(self, vectors):
        all_params = list(self.model.parameters())
        saved_grads = [p.grad for p in all_params]  # references: put back as they were
        for p in all_params:  # so backward() cannot accumulate into the saved gradients
            p.grad = None
        saved_w = [p.detach().clone() for p in self.params]
        eps = self.fd_eps
        out = []
        try:
            for v in vectors:
                grads = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for p, w0, vi in zip(self.params, saved_w, v):
                            p.copy_(w0)
                            p.add_(vi.to(p.dtype), alpha=sign * eps)
                    grads.append(self._gradient())
                out.append([gp.sub_(gm).div_(2 * eps) for gp, gm in zip(*grads)])
                del grads
        finally:
            with torch.no_grad():
                for p, w0 in zip(self.params, saved_w):
                    p.copy_(w0)
            for p, g in zip(all_params, saved_grads):
                p.grad = g
        return out

    # -- public -------------------------------------------------------------------------
    def __call__(self, vectors: Sequence[Vector]) -> List[Vector]:
        """H v for each v in ``vectors`` (one pass over the data for all of them)."""
        vectors = [list(v) for v in vectors]
        for v in vectors:
            if len(v) != len(self.params) or any(vi.shape != p.shape
                                                 for vi, p in zip(v, self.params)):
                raise ValueError("a vector must be a list of tensors shaped like the selected "
                                 "parameters, in named_parameters() order")
        if self.method == "finite_difference":
            return self._finite_difference(vectors)
        return self._autograd(vectors)

    def release(self):
        self._grads = None


def _operator(model, criterion, data, param_filter, method, fd_eps) -> _HVP:
    if _is_single_batch(data):
        return _HVP(model, criterion, data=data, param_filter=param_filter, method=method,
                    fd_eps=fd_eps)
    return _HVP(model, criterion, dataloader=data, param_filter=param_filter, method=method,
                fd_eps=fd_eps)
