"""The best pure-PyTorch NSO, SAM/ASAM and WSAM we can write: the benchmarks' second yardstick.

``flatfused.reference`` reproduces the published code and its cost (per-tensor loops, clones,
CPU-sampled noise); these classes show what careful PyTorch alone achieves, so that the fused
kernels are measured against the strongest honest alternative, not only against the reference.
Same math as flatfused's optimizers (tests/tools/test_baselines.py checks them with shared noise),
built only from stock PyTorch ops:

- the parameters (one device, one dtype) are views of one flat buffer ``W`` and their gradients
  views of one flat buffer ``G``, so every operation is one op over all parameters;
- the base optimizer runs on a flat *anchor* copy ``A`` of the weights (its only parameter, with
  ``G`` as its gradient), with torch's fused implementation where there is one (SGD, Adam,
  AdamW), else ``foreach``; ``A`` is saved from ``W`` at the start of every step and ``W`` is
  restored from it by copy (exact, no subtraction);
- gradients of the extra passes accumulate in place in ``G`` (autograd adds into ``.grad``);
- NSO draws the noise with one ``normal_`` per perturbation into one flat fp32 buffer, which
  the minus pass of the two-point estimate reuses; every perturbation is one ``torch.add``
  whose fp32 result is rounded once to the parameter dtype, as flatfused's kernels do;
- WSAM's decoupled update needs the clean gradient ``g`` after the perturbed pass: the base
  step (which depends only on ``w`` and ``g``) is taken on ``A`` *before* the perturbed pass,
  and ``G`` is negated so that autograd leaves ``g~ - g`` in it. State beyond the base
  optimizer is then ``A`` alone (1x the parameter bytes), where the reference keeps 3x.

Observable differences from the references' APIs: only ``step(closure)`` is offered; one param
group; parameters must share a device and dtype; NSO draws normal noise only; WSAM has no
``max_norm``; after a WSAM step ``.grad`` holds ``g~ - g`` (decoupled) instead of ``g``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .bn import disable_running_stats, enable_running_stats

__all__ = ["FlatBaseline", "NSO", "SAM", "WeightedSAM"]

_FUSED_BASES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class FlatBaseline:
    """Flat ``W``/``G``/``A`` buffers and a base optimizer on ``A`` (see the module doc).

    ``base_optimizer`` is a ``torch.optim`` class built as ``base_optimizer([A], **kwargs)``.
    """

    def __init__(self, params, base_optimizer, model: torch.nn.Module | None = None, **kwargs):
        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
            params = params.parameters()
        self.model = model
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no parameter requires grad")
        kinds = {(p.device, p.dtype) for p in self.params}
        if len(kinds) != 1:
            raise ValueError(f"the baselines need one device and dtype, got {sorted(map(str, kinds))}")
        device, dtype = kinds.pop()
        numel = sum(p.numel() for p in self.params)
        self.numel = numel
        self.W = torch.empty(numel, device=device, dtype=dtype)
        self.G = torch.zeros(numel, device=device, dtype=dtype)
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                self.W[offset:offset + n].copy_(p.data.reshape(-1))
                p.data = self.W[offset:offset + n].view(p.shape)
                p.grad = self.G[offset:offset + n].view(p.shape)
                offset += n
        self.A = torch.nn.Parameter(self.W.clone())
        self.A.grad = self.G
        self.fused = False
        if base_optimizer in _FUSED_BASES and "foreach" not in kwargs and "fused" not in kwargs:
            try:
                self.base_optimizer = base_optimizer([self.A], fused=True, **kwargs)
                self.fused = True
            except (RuntimeError, ValueError):
                pass  # no fused implementation for this device or dtype
        if not self.fused:
            kwargs.setdefault("foreach", True)
            self.base_optimizer = base_optimizer([self.A], **kwargs)

    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero ``G`` in place (``set_to_none`` is ignored: the gradients are views of ``G``)."""
        self.G.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the optimizer keeps beyond the parameters and gradients (``A`` included)."""
        out = [self.A]
        for state in self.base_optimizer.state.values():
            out += [t for t in state.values() if isinstance(t, torch.Tensor)]
        return out

    def base_state_tensors(self) -> list[torch.Tensor]:
        return [t for state in self.base_optimizer.state.values()
                for t in state.values() if isinstance(t, torch.Tensor)]

    def _base_step(self, scale: float = 1.0) -> None:
        """The base update of ``A`` with gradient ``scale * G``."""
        if scale != 1.0:
            if self.fused:
                # Fused optimizers divide the gradient by ``grad_scale`` inside their kernel
                # (the AMP contract), which saves a full pass over G.
                self.base_optimizer.grad_scale = torch.tensor(1.0 / scale, device=self.G.device)
            else:
                self.G.mul_(scale)
        try:
            self.base_optimizer.step()
        finally:
            self.base_optimizer.grad_scale = None

    def _pass(self, closure, bn_stats: bool = True):
        if self.model is not None and not bn_stats:
            disable_running_stats(self.model)
            try:
                return closure()
            finally:
                enable_running_stats(self.model)
        return closure()


class NSO(FlatBaseline):
    """NSO's ``step(closure)`` (flatfused.NSO's schedule): ``K`` perturbations ``w0 ± sigma * eps``,
    update direction ``lam * g(w0) + uw * sum of the perturbed gradients``.

    ``noise_fn(out, draw)`` fills the flat fp32 ``out`` with the ``draw``-th perturbation's
    standard normals (default: one ``out.normal_()``); tests pass flatfused's Philox stream.
    """

    def __init__(self, params, base_optimizer, sigma: float = 0.05, *, num_perturbs: int = 1,
                 lam: float = 0.5, use_neg: bool = False, model=None,
                 noise_fn: Callable[[torch.Tensor, int], None] | None = None,
                 generator: torch.Generator | None = None, **kwargs):
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if num_perturbs < 1:
            raise ValueError(f"num_perturbs must be >= 1, got {num_perturbs}")
        super().__init__(params, base_optimizer, model=model, **kwargs)
        self.sigma, self.num_perturbs, self.lam, self.use_neg = float(sigma), num_perturbs, lam, use_neg
        self.E = torch.empty(self.numel, device=self.W.device, dtype=torch.float32)
        self.draws = 0
        self.noise_fn = noise_fn or (lambda out, draw: out.normal_(generator=generator))

    def state_tensors(self) -> list[torch.Tensor]:
        return super().state_tensors() + [self.E]

    def _perturb(self, sigma: float) -> None:
        """``W = A + sigma * E`` in fp32, rounded once; chunked when W is not fp32 (the mixed-dtype
        op would otherwise make a model-sized fp32 temporary)."""
        A, W, E = self.A, self.W, self.E
        for c in (_chunks(W.numel()) if W.dtype != E.dtype else (slice(None),)):
            torch.add(A[c], E[c], alpha=sigma, out=W[c])

    @torch.no_grad()
    def step(self, closure):
        K, lam = self.num_perturbs, self.lam
        uw = (1.0 - lam) / (2 * K if self.use_neg else K)
        closure = torch.enable_grad()(closure)
        A, W, G, E, sigma = self.A, self.W, self.G, self.E, self.sigma
        A.copy_(W)
        G.zero_()
        clean = self._pass(closure) if lam > 0 else None
        if uw == 0.0:
            self._base_step(lam)
            W.copy_(A)
            return clean
        try:
            for k in range(K):
                self.noise_fn(E, self.draws)
                self.draws += 1
                if k == 0 and lam > 0:
                    G.mul_(lam / uw)  # the clean gradient enters the sum with weight lam
                self._perturb(sigma)
                loss = self._pass(closure, bn_stats=(lam == 0 and k == 0))
                if self.use_neg:
                    self._perturb(-sigma)
                    self._pass(closure, bn_stats=False)
        except BaseException:
            W.copy_(A)
            raise
        self._base_step(uw)
        W.copy_(A)
        return clean if clean is not None else loss


# Elementwise temporaries are made chunk by chunk: a temporary the size of the model is a fresh
# mmap (glibc maps allocations above 32 MB) whose page faults cost more than the arithmetic.
_CHUNK = 1 << 20


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield slice(start, min(start + _CHUNK, n))


def _ascent_scale(W, G, rho, eps, adaptive):
    """``rho / (||(|w| if adaptive else 1) * g|| + eps)``: a Python float on the CPU (free there),
    a device tensor elsewhere (no host synchronisation)."""
    if adaptive:
        sq = sum(torch.linalg.vector_norm(W[c].float() * G[c]).square() for c in _chunks(W.numel()))
        norm = sq.sqrt()
    elif G.dtype != torch.float32:  # the fp32 upcast is a temporary: chunk it
        norm = sum(torch.linalg.vector_norm(G[c], dtype=torch.float32).square()
                   for c in _chunks(G.numel())).sqrt()
    else:
        norm = torch.linalg.vector_norm(G)
    scale = rho / (norm + eps)
    return float(scale) if W.device.type == "cpu" else scale


def _ascend(W, A, G, scale, adaptive):
    """``W = A + scale * (A**2 if adaptive else 1) * G``, rounded once to W's dtype."""
    for c in (_chunks(W.numel()) if adaptive else (slice(None),)):
        d = A[c].float().square().mul_(G[c]) if adaptive else G[c]
        if isinstance(scale, float):
            W[c].add_(d, alpha=scale)
        else:
            W[c].addcmul_(d, scale.to(torch.float32))


class SAM(FlatBaseline):
    """SAM/ASAM's ``step(closure)``: the clean gradient must already be in ``.grad`` (as for the
    reference and flatfused.SAM); the closure runs the pass at the ascent point."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 model=None, **kwargs):
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, base_optimizer, model=model, **kwargs)
        self.rho, self.adaptive = float(rho), bool(adaptive)

    @torch.no_grad()
    def step(self, closure):
        closure = torch.enable_grad()(closure)
        A, W, G = self.A, self.W, self.G
        scale = _ascent_scale(W, G, self.rho, 1e-12, self.adaptive)
        A.copy_(W)
        _ascend(W, A, G, scale, self.adaptive)
        G.zero_()
        try:
            loss = self._pass(closure, bn_stats=False)
        except BaseException:
            W.copy_(A)
            raise
        self._base_step()
        W.copy_(A)
        return loss


class WeightedSAM(FlatBaseline):
    """Weighted SAM's ``step(closure)`` (restore by copy): runs the clean pass itself and returns
    its loss, like the reference. ``alpha = gamma / (1 - gamma)``.

    ``decouple=True``: base step with ``g``, then ``w -= lr * alpha * (g~ - g)``;
    ``decouple=False``: base step with ``alpha * g~ + (1 - alpha) * g``.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, gamma: float = 0.9,
                 sam_eps: float = 1e-12, adaptive: bool = False, decouple: bool = True, *,
                 model=None, **kwargs):
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        super().__init__(params, base_optimizer, model=model, **kwargs)
        self.rho, self.sam_eps, self.adaptive, self.decouple = float(rho), sam_eps, adaptive, decouple
        self.alpha = gamma / (1.0 - gamma)

    @torch.no_grad()
    def step(self, closure):
        closure = torch.enable_grad()(closure)
        A, W, G, alpha = self.A, self.W, self.G, self.alpha
        loss = self._pass(closure)
        scale = _ascent_scale(W, G, self.rho, self.sam_eps, self.adaptive)
        A.copy_(W)
        _ascend(W, A, G, scale, self.adaptive)
        try:
            if self.decouple:
                self._base_step()  # from w with g: it does not depend on the perturbed pass
                G.neg_()  # autograd adds g~: G = g~ - g, the sharpness direction
                self._pass(closure, bn_stats=False)
                lr = self.param_groups[0]["lr"]
                torch.add(A, G, alpha=-float(lr) * alpha, out=W)
                return loss
            if alpha > 0:
                G.mul_((1.0 - alpha) / alpha)
                self._pass(closure, bn_stats=False)
                self._base_step(alpha)
            else:  # gamma == 0: the update ignores the perturbed pass (which still runs)
                g = G.clone()
                self._pass(closure, bn_stats=False)
                G.copy_(g)
                self._base_step()
        except BaseException:
            W.copy_(A)
            raise
        W.copy_(A)
        return loss
