"""The published Weighted SAM (WSAM, KDD'23) optimizer, restated in plain PyTorch as an oracle and baseline.

This module reproduces the *behaviour and the cost* of the reference implementation (KDD'23;
docs/usage.md), so that flatfused's fused optimizer can be validated against it and
benchmarked against it:

- one Python loop over the parameters per operation (five loops per step), one small op (or
  several) per tensor; the gradient norm is a ``torch.stack`` of per-parameter norms on the first
  parameter's device, as in SAM (:mod:`flatfused.reference.sam`);
- per parameter, ``self.state[p]`` holds the perturbation ``"e_w"``, a clone of the clean
  gradient ``"grad"`` and, with ``decouple=True``, the sharpness ``"sharpness" = g~ - g``: up to
  three full copies besides the parameter;
- under ``torch.distributed`` every gradient is all-reduced (``AVG``) one parameter at a time, in
  ``first_step`` *after* the perturbation was computed from the local gradient (so a first
  forward-backward in ``model.no_sync()`` gives m-sharpness) and again in ``second_step``;
- the optional clipping is ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)``, over
  the *model's* parameters (not the optimizer's), applied to the clean gradient before it is
  saved and to the perturbed gradient after the restore.

The update, with ``alpha = gamma / (1 - gamma)``, ``g`` the (averaged, clipped) gradient at ``w``
and ``g~`` the one at ``w + e``:

- ``decouple=False``: ``.grad = alpha * g~ + (1 - alpha) * g`` (i.e. ``g + alpha (g~ - g)``), then
  the base step; ``gamma = 0.5`` (``alpha = 1``) is SAM;
- ``decouple=True``: ``.grad = g``, the base step, then ``w <- w - lr * alpha * (g~ - g)`` with
  the group's ``lr`` (an SGD-style sharpness step, also under Adam).

The one documented reference defect, kept by default: the reference restores ``w`` from
``w + e`` *by subtraction* (``p -= e_w``), which in floating point is not ``w`` (the error is up to
half an ulp of ``|w + e|`` per element per step, so it grows with ``rho`` and accumulates over
steps). ``restore="copy"`` instead saves ``state[p]["old_p"] = w.clone()`` in ``first_step`` and
copies it back (one more full copy per parameter), which is what flatfused does; everything else is
identical, so the two modes isolate the effect of that defect.

Other reference behaviour kept on purpose: parameters whose ``.grad`` is ``None`` are skipped;
``zero_grad`` is torch's default (``set_to_none=True``); ``step(closure)`` leaves the BatchNorm
running statistics *off* at its end (they are switched on again at the start of the next step;
call :func:`flatfused.bn.enable_running_stats` after the last one); the optimizer does not
override ``load_state_dict``, so after loading, its ``param_groups`` are new dicts no longer shared
with the base optimizer (whose own state is not part of ``state_dict()`` either).

Changes from the published code, none of which alters the update:

- a negative (or NaN) ``rho``, a ``gamma`` outside ``[0, 1)`` or an unknown ``restore`` raises
  ``ValueError`` (the reference asserts on ``rho`` and divides by zero for ``gamma = 1``);
- a ``base_optimizer`` that is not an optimizer *instance* raises ``TypeError`` saying so;
- ``step()`` without a closure raises ``RuntimeError`` (the reference uses ``assert``);
- ``first_step`` with no gradient at all raises ``RuntimeError``;
- the BatchNorm bypass of ``step(closure)`` uses flatfused's helpers (:mod:`flatfused.bn`,
  every ``_BatchNorm``, the same ``backup_momentum`` attribute as the reference's helpers).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..bn import disable_running_stats, enable_running_stats
from .sam import _check_rho, _grad_norm

__all__ = ["WeightedSAM"]

RESTORE_MODES = ("subtract", "copy")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class WeightedSAM(torch.optim.Optimizer):
    """The reference Weighted SAM optimizer (KDD'23).

    Args:
        model: the module being trained (its ``parameters()`` are clipped with ``max_norm``; its
            BatchNorm layers are bypassed by ``step(closure)``). A DDP module makes
            ``model.no_sync()`` available for m-sharpness.
        base_optimizer: an optimizer *instance* over the model's parameters (e.g.
            ``torch.optim.SGD(model.parameters(), lr=0.1)``); this optimizer uses its
            ``param_groups`` (the same group dicts, which also get ``rho``, ``alpha``,
            ``sam_eps`` and ``adaptive``).
        rho: neighbourhood radius (>= 0).
        gamma: weight of the sharpness term, in ``[0, 1)``; ``alpha = gamma / (1 - gamma)``. The
            paper recommends 0.8-0.95; ``gamma = 0.5`` with ``decouple=False`` is SAM.
        sam_eps: added to the gradient norm in the denominator of the perturbation.
        adaptive: ASAM-style perturbation (``w**2 * g``, norm of ``|w| * g``).
        decouple: decoupled sharpness step (see the module doc).
        max_norm: if not ``None``, ``clip_grad_norm_(model.parameters(), max_norm)`` on the clean
            and on the perturbed gradient.
        restore: ``"subtract"`` (the reference, default: ``w = (w + e) - e``, which drifts) or
            ``"copy"`` (exact: ``w`` saved in ``state[p]["old_p"]`` and copied back).
        **kwargs: group defaults for parameters missing them (the reference passes them to
            ``torch.optim.Optimizer``; the base optimizer's defaults take precedence).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        gamma: float = 0.9,
        sam_eps: float = 1e-12,
        adaptive: bool = False,
        decouple: bool = True,
        max_norm: float | None = None,
        restore: str = "subtract",
        **kwargs,
    ):
        _check_rho(rho)
        if not 0.0 <= gamma < 1.0:  # also rejects NaN
            raise ValueError(f"Invalid gamma, should be in [0, 1): {gamma}")
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer instance such as "
                "torch.optim.SGD(model.parameters(), lr=0.1) (WSAM uses its param_groups); got "
                f"{base_optimizer!r}"
            )
        self.model = model
        self.base_optimizer = base_optimizer
        self.decouple = decouple
        self.max_norm = max_norm
        self.restore = restore
        alpha = gamma / (1 - gamma)
        defaults = dict(rho=rho, alpha=alpha, sam_eps=sam_eps, adaptive=adaptive, **kwargs)
        defaults.update(self.base_optimizer.defaults)
        super().__init__(self.base_optimizer.param_groups, defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e(w)`` (``e`` from the local gradient); then average the gradients across
        ranks if distributed, clip them if ``max_norm`` is set, and save them (``state[p]["grad"]``)."""
        grad_norm = self._grad_norm()
        copy = self.restore == "copy"
        distributed = _distributed()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + group["sam_eps"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                if copy:
                    self.state[p]["old_p"] = p.data.clone()
                p.add_(e_w, alpha=1.0)  # climb to the local maximum w + e(w)
                self.state[p]["e_w"] = e_w
                if distributed:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["grad"] = p.grad.detach().clone()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Average the perturbed gradient if distributed, restore ``w``, clip, form the update
        gradient and run the base step (plus the decoupled sharpness step)."""
        copy = self.restore == "copy"
        distributed = _distributed()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if distributed:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
                if copy:
                    p.copy_(self.state[p]["old_p"])  # exact restore
                else:
                    p.add_(self.state[p]["e_w"], alpha=-1.0)  # the reference: (w + e) - e != w

        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.decouple:
                    p.grad.mul_(group["alpha"]).add_(self.state[p]["grad"], alpha=1.0 - group["alpha"])
                else:
                    self.state[p]["sharpness"] = p.grad.detach().clone() - self.state[p]["grad"]
                    p.grad.mul_(0.0).add_(self.state[p]["grad"], alpha=1.0)

        self.base_optimizer.step()  # the sharpness-aware update

        if self.decouple:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    p.add_(self.state[p]["sharpness"], alpha=-group["lr"] * group["alpha"])

        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """BN stats on; ``loss = closure()``; ``first_step(zero_grad=True)``; BN stats off;
        ``closure()``; ``second_step()``; returns ``loss``.

        ``closure`` must run a full forward and backward pass and return the loss; it runs under
        ``torch.enable_grad``. The BatchNorm running statistics stay off after the step (reference
        behaviour, see the module doc).
        """
        if closure is None:
            raise RuntimeError(
                "WeightedSAM.step needs a closure that runs a full forward and backward pass and "
                "returns the loss (Sharpness Aware Minimization requires closure, but it was not "
                "provided); or call first_step / second_step around your own passes"
            )
        closure = torch.enable_grad()(closure)

        enable_running_stats(self.model)
        loss = closure()
        self.first_step(zero_grad=True)

        disable_running_stats(self.model)
        closure()
        self.second_step()
        return loss

    def _grad_norm(self) -> torch.Tensor:
        return _grad_norm(self.param_groups, "WeightedSAM")

