"""The cheap schedules (flatfused.optim.schedules) stated in plain PyTorch over the references.

:class:`ScheduledTrainer` drives a reference optimizer (:class:`~flatfused.reference.SAM`,
:class:`~flatfused.reference.NSM` through its trainer loop, or
:class:`~flatfused.reference.WeightedSAM`) on the schedule's full steps, and on the other steps
takes one forward-backward pass and the base optimizer's own ``step()`` with that gradient,
plus LookSAM's reused component: the statement flatfused's fused schedules are tested against,
one parameter at a time, with the reuse's dot products in fp32.
"""
from __future__ import annotations

import torch

from flatfused.optim.schedules import Schedule

from .bn import disable_running_stats, enable_running_stats

__all__ = ["ScheduledTrainer", "nso_filtered_step", "sam_filtered_step"]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum(torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(a, b))


class ScheduledTrainer:
    """``kind`` "sam", "nso" or "wsam"; ``optimizer`` the reference optimizer over ``model``;
    ``loss_fn(model, batch)`` the loss. NSO's full steps are the reference trainer's loop with
    ``lam``, ``num_perturbs`` and ``use_neg``; SAM's and WSAM's start with the clean pass."""

    def __init__(self, kind: str, model: torch.nn.Module, optimizer, loss_fn,
                 schedule: Schedule, *, lam: float = 0.0, num_perturbs: int = 1,
                 use_neg: bool = True, max_grad_norm: float | None = None):
        self.kind, self.model, self.optimizer, self.loss_fn = kind, model, optimizer, loss_fn
        self.schedule = schedule
        self.lam, self.num_perturbs, self.use_neg = lam, num_perturbs, use_neg
        self.max_grad_norm = max_grad_norm
        self.t = 0
        self.reused: list[torch.Tensor] | None = None  # g_v, one tensor per parameter

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _grads(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self, batch):
        full = self.schedule.full_step(self.t)
        loss = self._full(batch) if full else self._cheap(batch)
        self.t += 1
        return loss

    def _keep(self, flat_grad: list[torch.Tensor], clean: list[torch.Tensor]) -> None:
        """LookSAM: g_v = g_s - (<g_s, g> / |g|^2) g."""
        gg = _dot(clean, clean)
        coef = _dot(flat_grad, clean) / gg if gg > 0 else torch.zeros(())
        self.reused = [s.float() - coef * g.float() for s, g in zip(flat_grad, clean)]

    def _cheap(self, batch):
        base = self.optimizer.base_optimizer
        for p in self.params:
            p.grad = None
        enable_running_stats(self.model)
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        if self.schedule.reuses(self.t) and self.reused is not None:
            grads = self._grads()
            gn, vn = _dot(grads, grads).sqrt(), _dot(self.reused, self.reused).sqrt()
            factor = self.schedule.reuse * gn / vn if vn > 0 else torch.zeros(())
            with torch.no_grad():
                for p, v in zip(self.params, self.reused):
                    if p.grad is not None:
                        p.grad.add_((factor * v).to(p.grad.dtype))
        self._clip()
        base.step()
        return loss.detach()

    def _full(self, batch):
        recording = self.schedule.reuse is not None
        opt, model = self.optimizer, self.model
        for p in self.params:
            p.grad = None
        if self.kind in ("sam", "wsam"):
            enable_running_stats(model)
            loss = self.loss_fn(model, batch)
            loss.backward()
            clean = [g.detach().clone() for g in self._grads()]
            opt.first_step(zero_grad=True)
            disable_running_stats(model)
            self.loss_fn(model, batch).backward()
            if recording:
                self._keep([g.detach().clone() for g in self._grads()], clean)
            if self.kind == "sam":
                self._clip()
            opt.second_step(zero_grad=True)
            enable_running_stats(model)
            return loss.detach()
        # NSO: the reference trainer's loop, the direction read before the base step.
        K, lam = self.num_perturbs, self.lam
        uw = (1 - lam) / (2 * K) if self.use_neg else (1 - lam) / K
        enable_running_stats(model)
        clean_loss = self.loss_fn(model, batch)
        clean_loss.backward()
        clean = [g.detach().clone() for g in self._grads()]
        opt.store_gradients(zero_grad=True, store_weights=True, update_weight=lam)
        disable_running_stats(model)
        losses = []
        for _ in range(K):
            for store_perturb in (True, False) if self.use_neg else (True,):
                opt.first_step(zero_grad=True, store_perturb=store_perturb)
                value = self.loss_fn(model, batch)
                value.backward()
                losses.append(value.detach())
                opt.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
        enable_running_stats(model)
        # The direction lam * g + uw * sum: the reference's accumulator, per parameter.
        direction = [opt.state[p]["acc"].clone() if "acc" in opt.state[p] else torch.zeros_like(p)
                     for p in self.params]
        if recording:
            self._keep(direction, clean)
        if self.max_grad_norm is not None:
            norm = _dot(direction, direction).sqrt()
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            for p in self.params:
                if "acc" in opt.state[p]:
                    opt.state[p]["acc"].mul_(coef)
        opt.second_step(zero_grad=True)
        return clean_loss.detach() if lam > 0 else sum(losses) / len(losses)


def _trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def sam_filtered_step(model, base: torch.optim.Optimizer, selected, loss_fn, batch, *,
                      rho: float, adaptive: bool = False, eps: float = 1e-12):
    """One SAM step perturbing only the parameters in ``selected`` (SAM-ON's form when they are
    the normalisation layers'): the ascent's norm and ``e`` over those alone, every parameter
    updated by ``base`` with its gradient at the perturbed point. Returns the clean loss."""
    params = _trainable(model)
    chosen = [p for p in params if any(p is q for q in selected)]
    for p in params:
        p.grad = None
    enable_running_stats(model)
    loss = loss_fn(model, batch)
    loss.backward()
    with torch.no_grad():
        scaled = [(p.abs() if adaptive else 1.0) * p.grad for p in chosen if p.grad is not None]
        norm = torch.norm(torch.stack([torch.norm(v, 2) for v in scaled]), 2)
        saved = []
        for p in chosen:
            if p.grad is None:
                continue
            saved.append((p, p.detach().clone()))
            p.add_((p * p if adaptive else 1.0) * p.grad * (rho / (norm + eps)))
    for p in params:
        p.grad = None
    disable_running_stats(model)
    loss_fn(model, batch).backward()
    with torch.no_grad():
        for p, w in saved:
            p.copy_(w)
    base.step()
    enable_running_stats(model)
    return loss.detach()


def nso_filtered_step(model, base: torch.optim.Optimizer, selected, loss_fn, batch, *,
                      sigma: float, noise_source):
    """One NSO step (K = 1, the two-point estimate, lam = 0) perturbing only the parameters in
    ``selected``, with the noise ``noise_source`` draws at each parameter's logical index (a
    :class:`~flatfused.reference.FlatfusedNoiseSource` over all the optimizer's parameters, as
    flatfused indexes them). Returns the mean loss of the two passes."""
    params = _trainable(model)
    chosen = [p for p in params if any(p is q for q in selected)]
    noise_source.new_draw()
    with torch.no_grad():
        saved = [(p, p.detach().clone(), noise_source(p) * sigma) for p in chosen]
    grads = [torch.zeros_like(p) for p in params]
    losses = []
    for sign, bn in ((1.0, True), (-1.0, False)):
        with torch.no_grad():
            for p, w, u in saved:
                p.copy_(w + sign * u)
        for p in params:
            p.grad = None
        (enable_running_stats if bn else disable_running_stats)(model)
        value = loss_fn(model, batch)
        value.backward()
        losses.append(value.detach())
        for g, p in zip(grads, params):
            if p.grad is not None:
                g.add_(p.grad, alpha=0.5)
    with torch.no_grad():
        for p, w, _ in saved:
            p.copy_(w)
    for g, p in zip(grads, params):
        p.grad = g
    base.step()
    enable_running_stats(model)
    return sum(losses) / 2
