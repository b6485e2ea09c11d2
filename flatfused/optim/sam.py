"""SAM and ASAM (Foret et al. 2021; Kwon et al. 2021) with the reference ``SAM`` API, over flat buffers.

``first_step`` moves to ``w + e`` with ``e = rho * (w**2 if adaptive else 1) * g /
(||(|w| if adaptive else 1) * g||_2 + 1e-12)``, the norm taken over every parameter of every group;
``second_step`` restores the saved weights by copy (exactly) and takes the base optimizer's step,
fused into one kernel for SGD/Adam/AdamW. The norm is one reduction per flat buffer, kept on the
device (no host synchronisation).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..bn import disable_running_stats, enable_running_stats
from .flat_optimizer import FlatOptimizer, nonnegative


def _check_rho(rho) -> float:
    return nonnegative("rho", rho)


class SAM(FlatOptimizer):
    """Sharpness-Aware Minimization, a drop-in for the reference ``SAM`` class.

    Args:
        params: parameters or param groups (or an ``nn.Module``: its parameters; the model is
            then used to freeze BatchNorm running statistics during the second pass of ``step``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built as
            ``base_optimizer(self.param_groups, **kwargs)``) or an instance.
        rho: neighbourhood radius (>= 0), stored in every param group.
        adaptive: ASAM (scale-invariant perturbation), stored in every param group.
        model, backend: as for :class:`flatfused.NSO`.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, *,
                 model: torch.nn.Module | None = None, backend: str = "auto", **kwargs):
        rho = _check_rho(rho)
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=bool(adaptive)),
                         model=model, backend=backend, base_kwargs=kwargs)

    def _check_groups(self) -> None:
        for group in self.param_groups:
            group["rho"] = _check_rho(group.get("rho", self.defaults["rho"]))
            group.setdefault("adaptive", self.defaults["adaptive"])

    def _on_build(self) -> None:
        self._has_weights = False

    def _grad_norm(self) -> torch.Tensor:
        """``||(|w| if adaptive else 1) * g||_2`` over all buffers, as a device tensor."""
        squares = []
        for buf in self._buffers:
            g = buf.grad.float()
            if self.param_groups[buf.group_index]["adaptive"]:
                g = buf.data.float().abs() * g
            squares.append(torch.linalg.vector_norm(g).square())
        device = self._buffers[0].device
        return torch.stack([s.to(device) for s in squares]).sum().sqrt()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save the weights and move to the ascent point ``w + e``."""
        self._prepare()
        self._check_groups()
        if not self._buffers:
            return
        norm = self._grad_norm()
        for buf in self._buffers:
            group = self.param_groups[buf.group_index]
            w0 = buf.state_buffer("w0")
            w0.copy_(buf.data)
            scale = (group["rho"] / (norm + 1e-12)).to(buf.device)
            e = buf.grad.float() * scale
            if group["adaptive"]:
                e = e * w0.float().square()
            buf.data.copy_(w0.float() + e)
        self._has_weights = True
        if zero_grad:
            self._zero_flat_grads()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights (by copy) and take the base step with the ascent-point gradient."""
        self._prepare()
        if not self._has_weights:
            raise RuntimeError("second_step needs a first_step before it")
        self._base_step(self._buffers, self._backends, "w0", None, 1.0, False)
        self._has_weights = False
        if zero_grad:
            self._zero_flat_grads()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """``first_step(zero_grad=True)``, ``closure()``, ``second_step()`` (the reference's step).

        As in the reference, the gradients of the first forward-backward pass must be in ``.grad``
        when ``step`` is called; the closure runs the second pass at the ascent point. Returns the
        closure's loss.
        """
        if closure is None:
            raise RuntimeError("SAM.step needs a closure that runs a forward and backward pass "
                               "(the gradients of the first pass must already be in .grad)")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        self._in_step = True
        try:
            if self.model is not None:
                disable_running_stats(self.model)
            loss = closure()
        except BaseException:
            self._restore_weights()
            self._has_weights = False
            raise
        finally:
            self._in_step = False
            if self.model is not None:
                enable_running_stats(self.model)
        for buf in self._buffers:
            buf.check_grads(accumulate=True)
        self.second_step()
        return loss

    def __repr__(self) -> str:
        return (f"SAM(base_optimizer={type(self.base_optimizer).__name__}, "
                f"backend={self.backend!r}, groups={len(self.param_groups)})")
