"""SAM and ASAM (Foret et al. 2021; Kwon et al. 2021) with the reference ``SAM`` API, over flat buffers.

``first_step`` moves to ``w + e`` with ``e = rho * (w**2 if adaptive else 1) * g /
(||(|w| if adaptive else 1) * g||_2 + eps)``, the norm taken over every parameter of every group;
``second_step`` restores the saved weights by copy (exactly) and takes the base optimizer's step,
fused into one kernel for SGD/Adam/AdamW. The norm is one reduction pass per flat buffer into a
device scalar and the ascent one pass (save + move) per flat buffer: no host synchronisation.
:class:`SharpnessAware` holds what SAM and Weighted SAM share.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from . import amp as _amp
from .entry_point import drops_amp_attributes_on_error, entry_point
from .flat_optimizer import FlatOptimizer
from .pass_watch import _PassWatch
from .schedules import Schedule
from .step_state import StepPhase, StepRefused
from .validate import (flag, group_key, nonnegative, optional_nonnegative,
                       signal_nonfinite)


def _check_rho(rho) -> float:
    return nonnegative("rho", rho)


class SharpnessAware(FlatOptimizer):
    """The gradient-norm and ascent passes of SAM-style optimizers (``rho``/``adaptive`` per group)."""

    max_grad_norm: float | None = None
    rho_key = "rho"  # the param-group key of rho ("sam_rho" when the base optimizer has a rho)
    _recording = False  # this full step keeps its clean gradient for LookSAM-style reuse

    def _check_groups(self) -> None:
        key = self.rho_key
        for group in self.param_groups:
            group[key] = _check_rho(group.get(key, self.defaults[key]))
            group.setdefault("adaptive", self.defaults["adaptive"])

    checkpoint_kind = "SAM"

    def _check_group_entries(self, group: dict, where: str) -> None:
        if self.rho_key in group:
            nonnegative(f"{where}['{self.rho_key}']", group[self.rho_key])
        if "adaptive" in group:
            flag(f"{where}['adaptive']", group["adaptive"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``set_to_none=True`` by default, as torch's and the references' (whose
        ``first_step``/``second_step(zero_grad=True)`` call it): a parameter the next pass does
        not reach is then skipped by the update, not stepped with a zero gradient."""
        super().zero_grad(set_to_none)

    def _ascent_eps(self, group: dict) -> float:
        return 1e-12

    def _no_gradients(self) -> bool:
        """Whether no parameter (of any size) has a gradient: every ``.grad`` is None."""
        sized = [(buf, i) for buf in self._buffers for i, p in enumerate(buf.params) if p.numel()]
        return bool(sized) and all(i in buf.missing for buf, i in sized)

    def _check_has_gradients(self) -> None:
        if self._no_gradients():
            # The references fail here too (a norm over no gradients); moving nowhere and then
            # taking a plain base step would hide the missing backward.
            raise RuntimeError(f"{type(self).__name__}: no parameter has a gradient; the ascent "
                               "starts from the first pass's gradients: run loss.backward() "
                               "before first_step, or let step(closure) run the closure for it")

    def _refuse_open_step(self) -> None:
        if self._step.is_open:
            # A second ascent would save the ascent point as the weights to come back to.
            raise self._step.refuse("first_step starts a new step",
                                    "finish the open one first (second_step)")

    def _ascend(self, zero_grad: bool, save_grad: bool,
                keep: list[bool] | None = None) -> None:
        """Save ``w0`` (and the gradient as ``g0`` if ``save_grad``) and move to ``w + e``;
        ``zero_grad``: zero the gradients in the same pass, except the buffers marked in
        ``keep`` (a ``.grad`` held outside: they are released and replaced instead)."""
        self._check_has_gradients()
        # Under a param_filter the ascent is over the perturbed parameters alone (SAM-ON).
        norm_sq = self._grad_norm_sq(adaptive=True, perturbed_only=True)
        save_grad = save_grad or self._recording
        for i, (buf, backend) in enumerate(zip(self._buffers, self._backends)):
            group = self.param_groups[buf.group_index]
            g0 = buf.state_buffer("g0") if save_grad else None
            zero = zero_grad and not (keep and keep[i])
            if not buf.perturbed:  # not moved: only the saved gradient and the zeroing
                if g0 is not None:
                    g0.copy_(buf.grad)
                if zero:
                    ops.kernel("zero_", backend)(grad=buf.grad)
                    buf.mark_grad_zero()
                continue
            ops.kernel("sam_ascent_", backend)(
                w=buf.data, w0=buf.state_buffer("w0"), grad=buf.grad, g0=g0,
                norm_sq=norm_sq.to(buf.device), rho=float(group[self.rho_key]),
                eps=float(self._ascent_eps(group)), adaptive=bool(group["adaptive"]),
                zero_grad=bool(zero))
            if zero:
                buf.mark_grad_zero()
        self._step.phase, self._step.w0_saved = StepPhase.ASCENDED, True

    def _finish(self, amp, **second_step_kwargs) -> None:
        """Unscale and check the second pass (under AMP) and take the second step (which clips)."""
        self._prepare()
        if amp is not None:
            if amp.grads_scaled:
                self._amp_unscale(amp)
            if _amp.overflowed(amp):
                self._abandon_step()
                return
        self._take_second_step(**second_step_kwargs)

    def _take_second_step(self, **kwargs) -> None:
        self.second_step(**kwargs)  # (a subclass's own second_step, as the reference's step)


class SAM(SharpnessAware):
    """Sharpness-Aware Minimization, a drop-in for the reference ``SAM`` class.

    Args:
        params: parameters or param groups (or an ``nn.Module``: its parameters; the model is
            then used to freeze BatchNorm running statistics during the second pass of ``step``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built as
            ``base_optimizer(self.param_groups, **kwargs)``) or an instance.
        rho: neighbourhood radius (>= 0), stored in every param group as ``"rho"`` (as the
            reference), or as ``"sam_rho"`` when the base optimizer has a ``rho`` of its own
            (Adadelta), which the reference would overwrite (``optimizer.rho_key``).
        adaptive: ASAM (scale-invariant perturbation), stored in every param group.
        model, backend: as for :class:`flatfused.NSO`.
        max_grad_norm: clip the ascent-point gradient to this norm before the base step (after
            unscaling under AMP), i.e. ``clip_grad_norm_`` between ``unscale_`` and ``step``;
            applied by ``second_step`` however it is reached (``step``, ``step()``, directly).
        every, window, reuse: a cheaper schedule for ``step(closure)``
            (:mod:`flatfused.optim.schedules`): the SAM step on every ``every``-th step inside
            ``window``, a plain base step otherwise, plus LookSAM's reuse (``reuse`` = its
            alpha) of the ascent-point gradient's component orthogonal to the clean one.
        param_filter: perturb only some parameters (a callable ``p -> bool``, or the parameters,
            e.g. ``flatfused.norm_parameters(model)`` for SAM-ON); the ascent's norm and ``e``
            cover those alone, the others are updated with their ascent-point gradient.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, *,
                 model: torch.nn.Module | None = None, backend: str = "auto",
                 max_grad_norm: float | None = None, every: int = 1,
                 window: tuple | None = None, reuse: float | None = None,
                 param_filter=None, **kwargs):
        rho = _check_rho(rho)
        self.max_grad_norm = optional_nonnegative("max_grad_norm", max_grad_norm)
        self.rho_key = group_key(base_optimizer, "rho", "sam_rho")
        super().__init__(params, base_optimizer,
                         {self.rho_key: rho, "adaptive": flag("adaptive", adaptive)},
                         model=model, backend=backend, base_kwargs=kwargs,
                         schedule=Schedule.build(every, window, reuse), param_filter=param_filter)

    @torch.no_grad()
    @entry_point
    def first_step(self, zero_grad: bool = False) -> None:
        """Save the weights and move to the ascent point ``w + e``."""
        if self._calls == 1:
            self._refuse_under_schedule("first_step")
        self._refuse_open_step()
        self._prepare()
        self._check_groups()
        if self._buffers:
            keep = self._shared_grads() if zero_grad else None
            self._ascend(zero_grad, save_grad=False, keep=keep)
            if zero_grad:
                self._zero_flat_grads(set_to_none=True)  # the reference's zero_grad()
        else:  # nothing to move: the second step has nothing to restore
            self._step.phase, self._step.w0_saved = StepPhase.ASCENDED, True

    @torch.no_grad()
    @entry_point
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights (by copy) and take the base step with the ascent-point gradient."""
        if self._calls == 1:
            self._refuse_under_schedule("second_step")
        if not self._step.is_open:
            raise StepRefused("second_step needs a first_step before it")
        self._prepare()
        if self._recording:  # g~ and the clean gradient the ascent saved
            self._record_reuse([b.grad for b in self._buffers],
                               [b.state["g0"] for b in self._buffers])
        self._clip_grads(self.max_grad_norm)
        self._base_step(self._buffers, self._backends, "w0", None, 1.0, False)
        self._step_done()
        if zero_grad:
            self._zero_flat_grads(set_to_none=True)

    @torch.no_grad()
    @drops_amp_attributes_on_error
    @entry_point
    def step(self, closure: Callable | None = None):
        """``first_step(zero_grad=True)``, ``closure()``, ``second_step()`` (the reference's step).

        Two forms. The reference's: the gradients of the first forward-backward pass are in
        ``.grad`` when ``step`` is called, and the closure runs the second pass at the ascent
        point; returns the closure's loss. The frameworks' (Lightning, Accelerate, the HF
        Trainer, where the closure is the only forward-backward the optimizer gets): no
        parameter has a gradient at the call (every ``.grad`` None, as ``zero_grad()`` leaves
        them), so the closure runs the first pass too, with BatchNorm statistics updated, and
        the step returns that pass's loss (NaN in its place if the second pass's was not
        finite). Without a closure, after ``first_step`` and the second pass, ``step()`` is
        ``second_step()``: what ``GradScaler.step(optimizer)`` calls in the two-call loop.

        Under ``torch.amp.GradScaler`` (``scaler.step(optimizer, closure)``) both passes' gradients
        are unscaled once and checked; if either overflowed the weights go back to ``w`` and
        nothing else changes (the scaler then lowers the scale).

        Under a cheap schedule (``every``, ``window``), a cheap step is one pass and the base
        update with its gradient: in the reference's form the gradient is already in ``.grad``,
        so the closure is not called and the step returns None.
        """
        if closure is None:
            if self._step.is_open:
                return self._finish(self._amp_begin(uses_grads=True))
            raise StepRefused("SAM.step needs a closure that runs a forward and backward pass "
                              "(the gradients of the first pass must already be in .grad); "
                              "step() without one only completes a first_step; in the HF Trainer, "
                              "Accelerate or Lightning, see flatfused.integrations")
        self._refuse_open_step()
        closure = torch.enable_grad()(closure)
        self._prepare()
        if not self._full_step_due():
            no_grads = self._no_gradients()
            loss = self._cheap_step(closure, zero_first=False, run_pass=no_grads,
                                    clip=lambda: self._clip_grads(self.max_grad_norm))
            return loss
        self._recording = self._reuse_due()
        try:
            return self._full_step(closure)
        finally:
            self._recording = False

    def _full_step(self, closure):
        amp = self._amp_begin(uses_grads=True)
        first_loss = None
        if self._no_gradients():  # the frameworks' form: the closure runs the first pass too
            first_loss = self._pass(closure, restart=True)
            if amp is not None:
                amp.grads_scaled = True  # the closure's pass was scaled
        self._check_has_gradients()
        if amp is not None and amp.grads_scaled:
            self._amp_unscale(amp)  # the ascent then sees the true gradient
        watch = self._first_step_for_closure()
        try:
            loss = self._pass(closure, bn_stats=False, watch=watch)
        except BaseException:
            if watch is not None:
                self._release_grads()  # as first_step(zero_grad=True) would have left them
            raise  # (the step is abandoned: weights back at w)
        if watch is not None:
            for buf in self._buffers:
                buf.drop_gradients(watch.unreceived(buf))
        if amp is not None:
            amp.grads_scaled = True  # the closure's pass was scaled
        self._finish(amp)
        return loss if first_loss is None else signal_nonfinite(first_loss, [loss])

    def _first_step_for_closure(self) -> _PassWatch | None:
        """``first_step(zero_grad=True)`` before the closure's pass. The reference's zero_grad
        sets every ``.grad`` to None, the pass's hooks then attach each zeroed slot again, and
        the check after the pass walks every parameter (0.10-0.14 ms a step at 64 parameters,
        measured). In one process with unsharded buffers, where only autograd writes the
        gradients, the zeroed slots stay attached instead, and a watch on the pass tells what
        the None would have: which parameters the pass gives no gradient, made missing after
        it (the update skips them). Returns the watch, or None after a plain first_step (also
        when a subclass overrides first_step, which the reference's step calls)."""
        if (type(self).first_step is not SAM.first_step or not self._can_watch_passes()
                or any(self._shared_grads())):
            self.first_step(zero_grad=True)
            return None
        self._check_groups()
        self._ascend(zero_grad=True, save_grad=False)
        return _PassWatch(self._buffers)

    def __repr__(self) -> str:
        return (f"SAM(base_optimizer={type(self.base_optimizer).__name__}, "
                f"backend={self.backend!r}, groups={len(self.param_groups)})")
