"""The published SAM / ASAM optimizer (davda54/sam), restated in plain PyTorch as an oracle and baseline.

This module reproduces the *behaviour and the cost* of the reference implementation of
Sharpness-Aware Minimization (docs/usage.md), so that flatfused's fused
optimizer can be validated against it and benchmarked against it:

- one Python loop over the parameters per operation, one small op (or several) per tensor;
- the gradient norm is a ``torch.stack`` of per-parameter norms, each moved to the device of the
  first parameter of the first group (the reference's "shared device", for model parallelism),
  followed by a norm of the stack: a host-side loop of ``2 * n_params + 1`` small kernels;
- one full per-parameter copy in ``self.state[p]["old_p"]`` (the weights before the
  perturbation), cloned afresh at every ``first_step``;
- ``second_step`` restores the weights by re-binding ``p.data`` to ``old_p`` (an exact restore,
  no subtraction, as the reference does; the parameter then aliases the saved copy until the
  next ``first_step`` clones it again);
- ``zero_grad`` is torch's default (``set_to_none=True``), which is what the reference's
  ``self.zero_grad()`` does on torch >= 2.0.

The update: with ``g`` the gradient at ``w``,
``e = rho * (w**2 if adaptive else 1) * g / (||(|w| if adaptive else 1) * g||_2 + 1e-12)``, the norm
taken over all parameters (with a gradient) of all groups, ``rho`` and ``adaptive`` read per group;
``first_step`` moves to ``w + e``; the caller computes the gradient there, and ``second_step``
restores ``w`` and runs the base optimizer's step with that gradient.

Reference behaviour kept on purpose: parameters whose ``.grad`` is ``None`` are skipped in both
steps (so a parameter that had a gradient at the clean pass but gets none at the perturbed pass
is *not* restored: it keeps its perturbation); ``step`` returns ``None`` (not the loss); the base
optimizer's state is not part of ``state_dict()``; BatchNorm is left to the training loop (see
:func:`sam_train_step`).

Changes from the published code, none of which alters the update:

- a negative (or NaN) ``rho`` raises ``ValueError`` (the reference uses ``assert``);
- a ``base_optimizer`` that is not a class raises ``TypeError`` saying so;
- ``step()`` without a closure raises ``RuntimeError`` (the reference uses ``assert``);
- ``first_step`` with no gradient at all raises ``RuntimeError`` (the reference fails inside
  ``torch.stack`` with an unrelated message).
"""
from __future__ import annotations

import torch

from ..bn import disable_running_stats, enable_running_stats

__all__ = ["SAM", "sam_train_step"]


def _check_rho(rho) -> None:
    if not rho >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid rho, should be non-negative: {rho}")


def _grad_norm(param_groups, what: str) -> torch.Tensor:
    """The reference's ``_grad_norm``: ``||(|w| if adaptive else 1) * g||_2`` over all groups,
    as a stack of per-parameter norms on the first parameter's device."""
    shared_device = param_groups[0]["params"][0].device  # the reference's "shared device"
    norms = [
        ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
        for group in param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    if not norms:
        raise RuntimeError(
            f"{what}.first_step: no parameter has a gradient; run a forward and backward pass first"
        )
    return torch.norm(torch.stack(norms), p=2)


class SAM(torch.optim.Optimizer):
    """The reference SAM optimizer (davda54/sam); ``adaptive=True`` is ASAM.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer: the base optimizer *class* (e.g. ``torch.optim.SGD``), built as
            ``base_optimizer(self.param_groups, **kwargs)``; both optimizers share ``param_groups``
            (LR schedulers may attach to either, the reference documents ``optimizer.base_optimizer``).
        rho: neighbourhood radius (>= 0); stored in every group (``group["rho"]``).
        adaptive: ASAM (element-wise ``w**2`` scaling of the ascent direction, ``|w| * g`` in the norm);
            stored in every group (``group["adaptive"]``).
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, ...).

    Two-step use (the reference's training loop is :func:`sam_train_step`)::

        loss_fn(model(x), y).backward();  opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward();  opt.second_step(zero_grad=True)
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        _check_rho(rho)
        if not isinstance(base_optimizer, type):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD (the reference "
                f"builds it as base_optimizer(param_groups, **kwargs)); got {type(base_optimizer).__name__}"
            )
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)

        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save ``w`` (``state[p]["old_p"]``, a clone) and move to ``w + e(w)``."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum w + e(w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved ``w`` (exactly, by re-binding ``p.data``), then the base step with the
        gradient taken at ``w + e(w)``."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # back to w (the reference re-binds, no subtraction)
        self.base_optimizer.step()  # the sharpness-aware update
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """``first_step(zero_grad=True)``, ``closure()``, ``second_step()``.

        The gradient of the clean pass must already be in ``.grad``; ``closure`` must run a full
        forward and backward pass (it is run under ``torch.enable_grad``). Returns ``None``, as the
        reference does. BatchNorm is not touched (see :func:`sam_train_step`).
        """
        if closure is None:
            raise RuntimeError(
                "SAM.step needs a closure that runs a full forward and backward pass (Sharpness Aware "
                "Minimization requires closure, but it was not provided); or call first_step / "
                "second_step around your own second forward-backward pass"
            )
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def _grad_norm(self) -> torch.Tensor:
        return _grad_norm(self.param_groups, "SAM")

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups  # re-link the shared groups


def sam_train_step(model: torch.nn.Module, optimizer: SAM, loss_fn, batch) -> float:
    """One step of the reference SAM trainer (davda54/sam's example loop); returns the clean loss.

    ``loss_fn(model, batch)`` returns the loss tensor. BatchNorm running statistics on for the
    clean pass, off (momentum 0, every ``_BatchNorm``, :mod:`flatfused.bn`) for the perturbed
    pass. As in the reference loop, they are switched back on only at the start of the next step.
    """
    enable_running_stats(model)
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.first_step(zero_grad=True)

    disable_running_stats(model)
    loss_fn(model, batch).backward()
    optimizer.second_step(zero_grad=True)
    return float(loss.detach())
