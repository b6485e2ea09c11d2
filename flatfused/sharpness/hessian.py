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
import numbers
import sys
from typing import Callable, List, Optional, Sequence

import torch

__all__ = [
    "hessian",
    "hvp",
    "hessian_trace",
    "top_eigenvalues",
    "spectral_density",
    "density_on_grid",
    "matrix_weights",
]

Vector = List[torch.Tensor]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def matrix_weights(name: str, param: torch.Tensor) -> bool:
    """A ``param_filter`` keeping conv and linear weights (the per-layer traces NSO reports)."""
    return param.dim() >= 2 and name.rsplit(".", 1)[-1] == "weight"


class _Progress:
    """tqdm when installed, else a one-line counter on stderr; a no-op when disabled."""

    def __init__(self, total: int, desc: str, enable: bool):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        self.enable = enable
        if not enable:
            return
        try:
            from tqdm.auto import tqdm  # optional dependency
            self.bar = tqdm(total=total, desc=desc, leave=False)
        except Exception:  # noqa: BLE001 - any import problem means "no tqdm"
            self.bar = None

    def update(self, n: int = 1):
        if not self.enable:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif sys.stderr.isatty():
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total}")
            sys.stderr.flush()
        elif self.n >= self.total or (10 * self.n) // self.total > (10 * (self.n - n)) // self.total:
            # a log file gets a line per tenth, not one carriage-returned line per product
            sys.stderr.write(f"{self.desc}: {self.n}/{self.total}\n")
            sys.stderr.flush()

    def close(self):
        if not self.enable:
            return
        if self.bar is not None:
            self.bar.close()
        elif sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(e, device) for e in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.size(0)) if inputs.dim() > 0 else 1
    if isinstance(inputs, (list, tuple)) and inputs:
        return _batch_size(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return _batch_size(next(iter(inputs.values())))
    raise TypeError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _is_single_batch(data) -> bool:
    """(inputs, targets) with a tensor (or tensor container) first -> one batch; anything else
    is an iterable of batches. Ambiguous case: a pair of pairs is read as two batches (wrap a
    single batch whose inputs and targets are both pairs in a list: ``[batch]``)."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], (torch.Tensor, dict, tuple, list))
            and not (isinstance(data[0], (tuple, list)) and len(data[0]) == 2
                     and isinstance(data[1], (tuple, list))))


def _pair(batch):
    """``batch`` as ``(inputs, targets)``, or a clear error."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    if isinstance(batch, torch.Tensor):
        what = f"a tensor of shape {tuple(batch.shape)}"
    elif isinstance(batch, (tuple, list)):
        what = f"a {type(batch).__name__} of {len(batch)}"
    else:
        what = f"a {type(batch).__name__}"
    raise ValueError(f"a batch must be an (inputs, targets) pair, got {what}; pass one batch as "
                     "(inputs, targets) or an iterable of such pairs")


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


class _EvalMode:
    """Put the model in eval mode; restore each module's previous mode on exit."""

    def __init__(self, model, restore=True):
        self.model, self.restore, self.modes = model, restore, None

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        if self.restore:
            for m, mode in self.modes:
                m.training = mode
        return False


def _check_vector(v, params, what) -> Vector:
    v = list(v)
    if len(v) != len(params) or any(not isinstance(x, torch.Tensor) or x.shape != p.shape
                                    for x, p in zip(v, params)):
        raise ValueError(f"{what} must be a list of tensors shaped like the selected parameters, "
                         "in named_parameters() order")
    if _dot(v, v) == 0 or not math.isfinite(_dot(v, v)):
        raise ValueError(f"{what} must be a finite, non-zero vector")
    return [x.detach().to(device=p.device, dtype=p.dtype) for x, p in zip(v, params)]


# --------------------------------------------------------------------------------------------
# the Hessian-vector-product operator
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# algorithms on an operator
# --------------------------------------------------------------------------------------------

def _power_iteration(op: _HVP, top_n, max_iter, tol, gen, progress=False, init=None,
                     stats=None):
    """``init``: start vector of the first eigenvalue (a warm start, e.g. the previous
    eigenvector during training); ``stats``: a dict that receives the number of products."""
    eigenvalues, eigenvectors = [], []
    bar = _Progress(top_n, "top eigenvalues", progress)
    products = 0
    for j in range(top_n):
        v = _gaussian(op.params, gen)
        if j == 0 and init is not None:
            v = [x.detach().to(device=p.device, dtype=p.dtype) for x, p in zip(init, op.params)]
        v = _normalize(v)
        eig = None
        for _ in range(max_iter):
            v = _normalize(_orthogonalize(v, eigenvectors))
            hv = op([v])[0]
            products += 1
            new = _dot(hv, v)
            v = _normalize(hv)
            del hv
            if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
                eig = new
                break
            eig = new
        eigenvalues.append(eig)
        eigenvectors.append(_normalize(_orthogonalize(v, eigenvectors)))
        bar.update()
    bar.close()
    if stats is not None:
        stats["products"] = products
    return eigenvalues, eigenvectors


def _lanczos(op: _HVP, iters, v0: Vector, keep_basis: bool, progress=False, desc="lanczos"):
    """Lanczos with full reorthogonalization. Returns (alphas, betas, basis or None)."""
    m = max(1, min(int(iters), op.dim))
    v = _normalize(v0)
    basis = [v]
    alphas, betas = [], []
    bar = _Progress(m, desc, progress)
    w = op([v])[0]
    alpha = _dot(w, v)
    w = _axpy(-alpha, v, w)
    alphas.append(alpha)
    bar.update()
    for _ in range(1, m):
        w = _orthogonalize(w, basis)
        beta = math.sqrt(max(_dot(w, w), 0.0))
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if beta <= 1e-10 * max(scale, 1e-30):  # invariant subspace: T is exact
            break
        v_prev, v = v, _scale(1.0 / beta, w)
        basis.append(v)
        betas.append(beta)
        w = op([v])[0]
        alpha = _dot(w, v)
        w = _axpy(-alpha, v, _axpy(-beta, v_prev, w))
        alphas.append(alpha)
        bar.update()
    bar.close()
    return alphas, betas, (basis if keep_basis else None)


def _tridiagonal(alphas, betas):
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        b = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t


def _slq(op: _HVP, iters, n_v, gen, progress=False):
    nodes, weights = [], []
    for k in range(n_v):
        alphas, betas, _ = _lanczos(op, iters, _rademacher(op.params, gen), keep_basis=False,
                                    progress=progress, desc=f"density {k + 1}/{n_v}")
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
        nodes.append(evals.tolist())
        weights.append((evecs[0, :] ** 2).tolist())
    return nodes, weights


def _hutchinson(op: _HVP, num_probes, gen, progress=False, chunk=1):
    """Per-probe, per-parameter z_l . (H z)_l (the diagonal-block estimates)."""
    per_probe = []
    bar = _Progress(num_probes, "hessian trace", progress)
    done = 0
    while done < num_probes:
        zs = [_rademacher(op.params, gen) for _ in range(min(chunk, num_probes - done))]
        for z, hz in zip(zs, op(zs)):
            per_probe.append([_dot([a], [b]) for a, b in zip(z, hz)])
        done += len(zs)
        bar.update(len(zs))
    bar.close()
    return per_probe


def _exact_trace(op: _HVP, progress=False, chunk=1):
    """Per-parameter diagonal-block traces from the unit vectors: sum_i (H e_i)_i, one product
    per selected entry, ``chunk`` products per pass over the data; summed in float64."""
    units = [(j, i) for j, p in enumerate(op.params) for i in range(p.numel())]
    traces = [0.0] * len(op.params)
    bar = _Progress(len(units), "hessian trace (exact)", progress)
    for start in range(0, len(units), chunk):
        part = units[start:start + chunk]
        vectors = []
        for j, i in part:
            v = [torch.zeros_like(p) for p in op.params]
            v[j].view(-1)[i] = 1
            vectors.append(v)
        for (j, i), hv in zip(part, op(vectors)):
            traces[j] += float(hv[j].reshape(-1)[i].double())
        bar.update(len(part))
    bar.close()
    return traces


def _flatten(v: Vector, device, dtype) -> torch.Tensor:
    return torch.cat([x.reshape(-1).to(device=device, dtype=dtype) for x in v])


def _unflatten(flat: torch.Tensor, params) -> Vector:
    out, i = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[i:i + n].view(p.shape).to(device=p.device, dtype=p.dtype))
        i += n
    return out


def _hutchpp(op: _HVP, num_probes, gen, progress=False, chunk=1):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with per-block traces.

    k = num_probes // 3 sketch vectors S give Q = orth(H S); the rest (num_probes - 2k) are
    Rademacher probes G projected off Q. For the diagonal block l (selector P_l),
        tr(P_l H) = sum_i (q_i)_l . ((2I - QQ^T) H q_i)_l                           (exact)
                  + mean_j (g_j)_l . ((I - QQ^T) H (I - QQ^T) g_j)_l                 (unbiased)
    which sums over l to the usual Hutch++ estimate tr(Q^T H Q) + mean_j g~_j^T H g~_j.
    Returns the per-parameter estimates.

    Memory: the sketch H S and Q are the only k-column matrices (the QR needs both at once);
    the q_i and g_j products are streamed ``chunk`` vectors at a time, so the peak is about
    2k + 3 chunk parameter-sized vectors. The random draws are in the same order as when
    everything is materialised (S, then G after Q), so a seed gives the same estimate.
    """
    if num_probes < 3:
        raise ValueError("hutch++ needs num_probes >= 3")
    k = num_probes // 3
    n_g = num_probes - 2 * k
    chunk = max(1, int(chunk))
    dev = op.params[0].device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in op.params) else torch.float32
    sizes = [p.numel() for p in op.params]
    bar = _Progress(num_probes, "hessian trace (hutch++)", progress)

    hs = torch.empty(sum(sizes), k, device=dev, dtype=dtype)
    for i0 in range(0, k, chunk):
        s = [_rademacher(op.params, gen) for _ in range(min(chunk, k - i0))]
        for i, v in enumerate(op(s)):
            hs[:, i0 + i] = _flatten(v, dev, dtype)
        del s
        bar.update(min(chunk, k - i0))
    q, _ = torch.linalg.qr(hs)
    del hs

    def blockwise(a, b):  # per-parameter sums of a*b (a, b flat vectors)
        return [float(x.sum()) for x in torch.split(a * b, sizes)]

    exact = [0.0] * len(sizes)
    for i0 in range(0, q.shape[1], chunk):
        cols = range(i0, min(i0 + chunk, q.shape[1]))
        for i, hv in zip(cols, op([_unflatten(q[:, i], op.params) for i in cols])):
            hq = _flatten(hv, dev, dtype)
            del hv
            hq = 2 * hq - q @ (q.T @ hq)
            exact = [e + b for e, b in zip(exact, blockwise(q[:, i], hq))]
        bar.update(len(cols))
    stoch = [0.0] * len(sizes)
    for j0 in range(0, n_g, chunk):
        gs = [_flatten(_rademacher(op.params, gen), dev, dtype)
              for _ in range(min(chunk, n_g - j0))]
        projected = [_unflatten(g - q @ (q.T @ g), op.params) for g in gs]
        for g, hv in zip(gs, op(projected)):
            hg = _flatten(hv, dev, dtype)
            del hv
            stoch = [t + b for t, b in zip(stoch, blockwise(g, hg - q @ (q.T @ hg)))]
        del gs, projected
        bar.update(min(chunk, n_g - j0))
    bar.close()
    return [e + s_ / n_g for e, s_ in zip(exact, stoch)]


# --------------------------------------------------------------------------------------------
# the PyHessian-compatible class
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# the functional API
# --------------------------------------------------------------------------------------------

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
