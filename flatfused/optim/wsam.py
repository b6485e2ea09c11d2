"""Weighted SAM (Yue et al., KDD'23) with the reference ``WeightedSAM`` API, over flat buffers.

With ``alpha = gamma / (1 - gamma)``, ``g`` the gradient at ``w`` and ``g~`` the one at the
ascent point ``w + e`` (``e`` as in SAM, with ``sam_eps``):

- ``decouple=False``: the base step with ``alpha * g~ + (1 - alpha) * g`` (``gamma = 0.5`` is SAM);
- ``decouple=True``: the base step with ``g``, then ``w -= lr * alpha * (g~ - g)``.

``first_step`` is one norm pass and one pass that saves ``w`` and ``g`` and moves to ``w + e``;
``second_step`` restores ``w`` by copy (the reference subtracts ``e``, which drifts), and for SGD,
Adam and AdamW the restore, the mixture, the base update and the decoupled sharpness step are
one kernel. The optimizer keeps the saved weights and the saved gradient (the reference keeps
``e``, ``g`` and ``g~ - g``); ``step(closure)`` with ``decouple=False`` keeps only the saved
weights (see :meth:`WeightedSAM.step`).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .. import distributed as _dist
from ..bn import enable_running_stats
from . import amp as _amp
from .entry_point import drops_amp_attributes_on_error, entry_point
from .pass_watch import _PassWatch
from .sam import SharpnessAware, _check_rho
from .schedules import Schedule
from .step_state import StepPhase, StepRefused
from .validate import (flag, group_key, nonnegative, optional_nonnegative,
                       signal_nonfinite)


class WeightedSAM(SharpnessAware):
    """Weighted Sharpness-Aware Minimization, a drop-in for the reference ``WeightedSAM`` class.

    Args:
        model: the module being trained (``max_norm`` clips its parameters' gradients; ``step``
            freezes its BatchNorm running statistics during the second pass). A DDP or FSDP2
            module lets ``step`` skip redundant gradient synchronisation.
        base_optimizer: an optimizer instance over the model's parameters (the reference), or a
            ``torch.optim.Optimizer`` class built over ``model.parameters()`` with ``kwargs``.
        rho: neighbourhood radius (>= 0).
        gamma: weight of the sharpness term in ``[0, 1)``; ``alpha = gamma / (1 - gamma)``, kept
            in every group as ``"alpha"`` (``"wsam_alpha"`` when the base optimizer has an
            ``alpha`` of its own, RMSprop's, which the reference overwrites; ``rho`` likewise
            becomes ``"sam_rho"`` next to Adadelta).
        sam_eps: added to the gradient norm in the perturbation's denominator.
        adaptive: ASAM-style perturbation.
        decouple: decoupled sharpness step (see the module doc).
        max_norm: clip the model's gradients to this norm (clean and perturbed), as the reference.
        m_sharpness: under ``torch.distributed``, ``step`` perturbs each rank's weights with its
            own gradient (m-sharpness, the first pass runs without gradient synchronisation); by
            default the perturbation uses the averaged gradient.
        backend: as for :class:`flatfused.NSO`.
        every, window: a cheaper schedule for ``step(closure)`` (:mod:`flatfused.optim.schedules`):
            the WSAM step on every ``every``-th step inside ``window``, one pass and a plain base
            step otherwise (LookSAM's reuse is SAM's and NSO's: WSAM already mixes ``g`` and
            ``g~`` by ``gamma``).
        param_filter: perturb only some parameters, as for :class:`flatfused.SAM`.
    """

    def __init__(self, model: torch.nn.Module, base_optimizer, rho=0.05, gamma=0.9,
                 sam_eps=1e-12, adaptive=False, decouple=True, max_norm=None, *,
                 m_sharpness: bool = False, backend: str = "auto", every: int = 1,
                 window: tuple | None = None, param_filter=None, **kwargs):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"WeightedSAM's first argument is the model (an nn.Module), got "
                            f"{type(model).__name__}")
        rho = _check_rho(rho)
        gamma = nonnegative("gamma", gamma)
        if not gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        sam_eps = nonnegative("sam_eps", sam_eps)
        max_norm = optional_nonnegative("max_norm", max_norm)
        if "reuse" in kwargs:
            raise TypeError("WeightedSAM takes no reuse: LookSAM-style reuse is SAM's and NSO's "
                            "(WSAM already mixes the clean and the ascent-point gradient by gamma)")
        schedule = Schedule.build(every, window)
        self.decouple, self.max_norm = flag("decouple", decouple), max_norm
        self.m_sharpness = flag("m_sharpness", m_sharpness)
        self._warned_edits = False
        self._second_watch = None  # which parameters the second pass gives a gradient
        self._first_pass: tuple | None = None  # (watch, AMP scaling) of step(closure)'s first pass
        # RMSprop's alpha and Adadelta's rho would collide with WSAM's (the reference's defect).
        self.rho_key = group_key(base_optimizer, "rho", "sam_rho")
        self.alpha_key = group_key(base_optimizer, "alpha", "wsam_alpha")
        defaults = {self.rho_key: rho, self.alpha_key: gamma / (1.0 - gamma), "sam_eps": sam_eps,
                    "adaptive": flag("adaptive", adaptive)}
        if isinstance(base_optimizer, torch.optim.Optimizer):
            # The reference: group entries the base optimizer lacks come from kwargs.
            for group in base_optimizer.param_groups:
                for key, value in kwargs.items():
                    group.setdefault(key, value)
            super().__init__(None, base_optimizer, defaults, model=model, backend=backend,
                             schedule=schedule, param_filter=param_filter)
        else:
            super().__init__(model.parameters(), base_optimizer, defaults, model=model,
                             backend=backend, base_kwargs=kwargs, schedule=schedule,
                             param_filter=param_filter)

    def _check_groups(self) -> None:
        super()._check_groups()
        for group in self.param_groups:
            group.setdefault(self.alpha_key, self.defaults[self.alpha_key])
            group.setdefault("sam_eps", self.defaults["sam_eps"])
            alpha = float(group[self.alpha_key])
            if not alpha >= 0.0 or alpha == float("inf"):
                raise ValueError(f"alpha = gamma / (1 - gamma) must be finite and >= 0, got {alpha}")
            group["sam_eps"] = nonnegative("sam_eps", group["sam_eps"])

    checkpoint_kind = "WeightedSAM"

    def _check_group_entries(self, group: dict, where: str) -> None:
        super()._check_group_entries(group, where)
        if self.alpha_key in group:
            nonnegative(f"{where}['{self.alpha_key}']", group[self.alpha_key])
        if "sam_eps" in group:
            nonnegative(f"{where}['sam_eps']", group["sam_eps"])

    def _ascent_eps(self, group: dict) -> float:
        return group["sam_eps"]

    def _alphas(self) -> list[float]:
        """Each buffer's group ``alpha``."""
        return [float(self.param_groups[b.group_index][self.alpha_key]) for b in self._buffers]

    def _sharpness_steps(self, alphas: list[float]) -> list[float]:
        """Each buffer's ``lr * alpha``: the decoupled sharpness step's size."""
        return [float(self.param_groups[b.group_index]["lr"]) * a
                for b, a in zip(self._buffers, alphas)]

    def _all_reduce_mean(self) -> None:
        # Shards of sharded parameters are different slices on each rank: never averaged.
        unsharded = [buf for buf in self._buffers if not buf.sharded]
        if _dist.world_size() == 1 or not unsharded:
            return
        _dist.all_reduce_mean_([buf.grad for buf in unsharded])
        # A parameter with a gradient on some rank has one on every rank now (the average), as
        # DDP's reducer gives it; one without a gradient anywhere stays without (skipped alike).
        has_grad = torch.tensor([i not in buf.missing for buf in unsharded
                                 for i in range(len(buf.params))],
                                dtype=torch.int32, device=unsharded[0].device)
        _dist.all_reduce_max_(has_grad)
        flags = iter(has_grad.tolist())
        for buf in unsharded:
            buf.attach_missing([i for i in range(len(buf.params)) if next(flags)])

    def _clip(self) -> None:
        if self.max_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                 self.max_norm)

    @torch.no_grad()
    @entry_point
    def first_step(self, zero_grad: bool = False, *, sync: bool = True) -> None:
        """Move to ``w + e(w)`` (``e`` from the local gradient), then average the gradients across
        ranks (``sync``; the reference always does under ``torch.distributed``), clip them if
        ``max_norm`` is set, and save them as the clean gradient."""
        if self._calls == 1:
            self._refuse_under_schedule("first_step")
        self._refuse_open_step()
        self._prepare()
        self._check_groups()
        if not self._buffers:  # nothing to move: the second step has nothing to restore
            self._step.phase, self._step.w0_saved = StepPhase.ASCENDED, True
            return
        # The saved gradient is the averaged, clipped one: fuse its copy into the ascent only
        # when neither changes it.
        fused_save = not (sync and _dist.world_size() > 1) and self.max_norm is None
        keep = self._shared_grads() if zero_grad else None
        self._ascend(zero_grad=zero_grad and fused_save, save_grad=fused_save, keep=keep)
        if not fused_save:
            if sync:
                self._all_reduce_mean()
            self._clip()
            for buf in self._buffers:
                buf.check_grads()
                buf.state_buffer("g0").copy_(buf.grad)
        self._watch_second_pass()
        if zero_grad:
            self._zero_flat_grads(set_to_none=True)  # the reference's zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's. Inside ``step(closure)`` a call from the first pass's closure clears the
        gradients from before the step, as it does in the reference's step; one from the second
        pass is ignored (the step keeps the clean gradient in ``.grad`` then, and the
        reference's ``first_step(zero_grad=True)`` had already cleared it)."""
        if self._first_pass is None:  # set only while the first pass's closure runs
            super().zero_grad(set_to_none)
            return
        watch, amp = self._first_pass
        self._zero_flat_grads(set_to_none)
        if watch is not None:
            watch.restart()
        if amp is not None:
            amp.found.zero_()  # an overflow in the gradients just cleared no longer counts

    def _watch_second_pass(self) -> None:
        """Watch which parameters the coming second pass gives a gradient, where a watch can
        tell (:meth:`_can_watch_passes`)."""
        self._close_second_watch()
        if self._can_watch_passes():
            self._second_watch = _PassWatch(self._buffers)

    def _close_second_watch(self):
        watch, self._second_watch = self._second_watch, None
        if watch is not None:
            watch.close()
        return watch

    def _without_perturbed_gradient(self, clean: str | None = None,
                                    zero_clean: bool = False) -> list[list[int]]:
        """Per buffer, the parameters with a clean gradient that the second pass gave none (a
        branch it did not take). Their weighted gradient does not exist: the coupled form
        skips them (restored, not updated, as torch.optim skips a parameter without a
        gradient; the reference leaves them at the ascent point), the decoupled form takes the
        base step with the clean gradient and skips the sharpness term. ``clean``: the flat
        state holding the clean gradient (else ``.grad``, where the second pass left it
        unchanged for them). A parameter whose clean gradient is zero (one neither pass reached
        that kept a zeroed ``.grad``) steps as torch steps a zero gradient: it is left out,
        unless ``zero_clean`` (the two-call API, whose ``first_step(zero_grad=True)`` dropped
        its ``.grad`` as the reference's does: :meth:`_settle_without_perturbed_gradient`)."""
        watch = self._close_second_watch()
        if watch is None:
            return [[] for _ in self._buffers]
        found = []
        for buf in self._buffers:
            g = buf.grad if clean is None else buf.state[clean]
            found.append([i for i in watch.unreceived(buf)
                          if zero_clean or bool(buf.slot_view(g, i).any())])
        return found

    def _settle_without_perturbed_gradient(self, in_step: bool) -> None:
        """Apply :meth:`_without_perturbed_gradient` before a second step that reads ``g0``.
        Inside ``step(closure)`` (``in_step``) a parameter with a zero clean gradient steps
        with it, as in the coupled one-copy path and in torch; in the two-call API it stays
        without a gradient, as the reference leaves it."""
        for buf, indices in zip(self._buffers,
                                self._without_perturbed_gradient("g0", zero_clean=in_step)):
            if not indices:
                continue
            g0 = buf.state.get("g0")
            nonzero = [i for i in indices if bool(buf.slot_view(g0, i).any())]
            if self.decouple:
                # (a .grad the first step or the user's pass set to None made it missing: the
                # base step needs it)
                buf.attach_missing(indices)
                for i in indices:  # g~ := g: the sharpness term lr * alpha * (g~ - g) is 0
                    buf.slot_view(buf.grad, i).copy_(buf.slot_view(g0, i))
                buf.mark_grad_written()
            else:
                buf.drop_gradients(nonzero)
                buf.attach_missing([i for i in indices if i not in nonzero])  # zero slots

    @torch.no_grad()
    @entry_point
    def second_step(self, zero_grad: bool = False, *, sync: bool = True) -> None:
        """Average the perturbed gradient across ranks (``sync``), restore ``w`` (by copy), clip,
        and take the base step with the weighted gradient (plus the decoupled sharpness step)."""
        if self._calls == 1:
            self._refuse_under_schedule("second_step")
        self._second_step(zero_grad, sync, in_step=False)

    def _second_step(self, zero_grad: bool, sync: bool, in_step: bool) -> None:
        if not self._step.is_open:
            raise StepRefused("second_step needs a first_step before it")
        self._prepare()
        if sync:
            self._all_reduce_mean()
        self._clip()
        for buf in self._buffers:
            buf.check_grads()
        self._settle_without_perturbed_gradient(in_step)
        self._weighted_base_step(self._alphas())
        self._step_done()
        if zero_grad:
            self._zero_flat_grads(set_to_none=True)

    def _weighted_base_step(self, alphas: list[float]) -> None:
        """Restore ``w``, then the base step with the weighted gradient (and the decoupled
        sharpness step) from ``g0`` and the perturbed gradient in ``.grad``."""
        if self._base_step.can_fuse(self._buffers):
            # One kernel per buffer: restore, mixture, base update, decoupled sharpness step.
            if self.decouple:
                self._base_step(self._buffers, self._backends, "w0", "g0", 1.0, True,
                                sharpness_weight=self._sharpness_steps(alphas))
            else:
                self._base_step(self._buffers, self._backends, "w0", "g0",
                                [1.0 - a for a in alphas], True, grad_weight=alphas)
            return
        sharpness = []
        for buf, alpha in zip(self._buffers, alphas):
            g0 = buf.state["g0"]
            if self.decouple:
                sharpness.append(buf.grad - g0)
                buf.grad.copy_(g0)
            else:
                buf.grad.mul_(alpha).add_(g0, alpha=1.0 - alpha)
            buf.mark_grad_written()
        self._base_step(self._buffers, self._backends, "w0", None, 1.0, False)
        for buf, sharp, c in zip(self._buffers, sharpness, self._sharpness_steps(alphas)):
            buf.data.add_(sharp, alpha=-c)

    @torch.no_grad()
    @drops_amp_attributes_on_error
    @entry_point
    def step(self, closure: Callable | None = None):
        """Both passes: ``loss = closure()`` at ``w`` (BatchNorm statistics updated), the ascent,
        ``closure()`` at ``w + e`` (statistics frozen), the update; returns ``loss`` (NaN in its
        place when the second pass's loss was not finite).

        As in the reference, the first pass's gradient adds to what ``.grad`` holds when the
        step starts (the published usage runs a backward before ``step(closure)`` and
        ``zero_grad()`` after it, so the clean gradient counts that backward too); zero the
        gradients before the step, or in the closure, to use the closure's alone.

        Under DDP/FSDP2 gradients are averaged by the wrapper's own synchronisation (with
        ``m_sharpness`` the first pass runs unsynchronised and the ascent uses the local
        gradient). If the closure (or anything in the step) raises, the weights go back to
        ``w`` and the base optimizer's state is untouched: the base step runs after both passes.

        - ``decouple=False`` (without ``max_norm``): the clean gradient stays in ``.grad``,
          weighted by ``(1 - alpha) / alpha``, and the second pass adds to it, so ``.grad`` ends
          as the update direction over ``alpha`` (the base step rescales): one copy of the
          weights beyond the base optimizer's state;
        - otherwise the clean gradient is saved, as in the two-call API (two copies).

        A closure that writes ``.grad`` in place (gradient clipping, as Lightning does inside
        the closure, ``zero_grad(set_to_none=False)``, ``grad.mul_``) would edit the clean
        gradient waiting in ``.grad`` too. The first pass tells (the gradient buffer's version
        counter against autograd's own accumulations): such a step saves the clean gradient
        apart, so that each pass's writes act on its own gradient as in the reference, and warns
        once. Not detected in a first pass a DDP/FSDP2 wrapper synchronises (its reducer writes
        the gradients back itself): clip with ``max_norm`` there.
        """
        if closure is None:
            if self._step.is_open:  # the two-call loop's GradScaler.step(optimizer)
                return self._finish(self._amp_begin(uses_grads=True))
            raise StepRefused(
                "WeightedSAM.step needs a closure that runs a full forward and backward pass and "
                "returns the loss; or call first_step / second_step around your own passes; in "
                "the HF Trainer, Accelerate or Lightning, see flatfused.integrations")
        self._refuse_open_step()
        closure = torch.enable_grad()(closure)
        self._prepare()
        self._check_groups()
        if self.model is not None:
            enable_running_stats(self.model)  # the reference's step starts with BN stats on
        wrapper_syncs = _dist.syncs_gradients(self.model)
        if not self._full_step_due():  # the first pass alone, as a plain step
            return self._cheap_step(closure, zero_first=False, clip=self._clip,
                                    after_pass=None if wrapper_syncs else self._all_reduce_mean)
        if self.m_sharpness and _dist.is_fsdp2(self.model):
            raise RuntimeError("m_sharpness needs each rank's own full gradient, which FSDP2 does "
                               "not expose (it reduce-scatters); use DDP, or m_sharpness=False")
        # As in the reference, the first pass adds to the gradients already in .grad, unless
        # the closure's zero_grad() clears them (see zero_grad).
        amp = self._amp_begin(uses_grads=True)
        if amp is not None and not amp.grads_scaled:
            # unscale_ ran before the step: scale those gradients back up, so that the one
            # unscaling after the first pass (whose gradients are scaled) treats all alike
            for buf in self._buffers:
                if not buf.grad_is_zero():
                    buf.grad.mul_(amp.scale)
                    buf.mark_grad_written()
            amp.grads_scaled = True
        # Whether the closure writes .grad in place (see _PassWatch): then the clean
        # gradient must not wait in .grad for the second pass, which would edit it too.
        watch = None
        if (self._buffers and not any(buf.sharded for buf in self._buffers)
                and (self.m_sharpness or not wrapper_syncs)):
            watch = _PassWatch(self._buffers)
        self._first_pass = (watch, amp)
        try:
            if self.m_sharpness:
                with _dist.no_sync(self.model):
                    loss = self._pass(closure, watch=watch, restart=True)
            else:
                loss = self._pass(closure, watch=watch, restart=True)
        finally:
            self._first_pass = None
        if not self._buffers:
            return loss
        edits = watch is not None and watch.edited
        if edits and not self._warned_edits:
            self._warned_edits = True
            warnings.warn("WeightedSAM.step: the closure writes .grad in place (gradient clipping, "
                          "zero_grad(set_to_none=False), ...); the step keeps the clean gradient "
                          "in a buffer of its own (one more copy of the weights) so that those "
                          "writes act on each pass's gradient alone, as in the reference",
                          stacklevel=2)
        if amp is not None:
            # The ascent, the clipping and the saved gradient see unscaled gradients; the
            # second pass (scaled too) is unscaled by _finish.
            self._amp_unscale(amp)
            amp.grads_scaled = True
        alphas = self._alphas()
        # A .grad held outside the optimizer must keep the clean gradient, as the reference's
        # first_step(zero_grad=True) leaves it: the clean gradient cannot wait in .grad then.
        shared = any(self._shared_grads())
        if (not self.decouple and self.max_norm is None and min(alphas) > 0 and not edits
                and not shared):
            second_loss = self._step_accumulating(closure, amp, alphas, wrapper_syncs)
        else:
            if self.max_norm is None and not shared and self._can_watch_passes():
                # first_step(zero_grad=True) without releasing the zeroed gradients: in one
                # process the second pass's watch tells which parameters it reaches, which is
                # what the None would have told (as SAM's step, _first_step_for_closure).
                self._ascend(zero_grad=True, save_grad=True)
                self._watch_second_pass()
            else:  # averaging explicitly only what no wrapper averaged
                self.first_step(zero_grad=True, sync=self.m_sharpness or not wrapper_syncs)
            second_loss = self._pass(closure, bn_stats=False)
            self._finish(amp, sync=not wrapper_syncs, in_step=True)
        return signal_nonfinite(loss, [second_loss])

    def _take_second_step(self, sync: bool = True, in_step: bool = False) -> None:
        self._second_step(False, sync, in_step)

    def _on_abandon(self) -> None:
        self._close_second_watch()

    def _step_accumulating(self, closure, amp, alphas, wrapper_syncs):
        """The coupled step with the clean gradient kept in ``.grad`` (see :meth:`step`);
        returns the second pass's loss."""
        self._ascend(zero_grad=False, save_grad=False)
        # The second pass adds g~: .grad becomes (alpha g~ + (1 - alpha) g) / alpha (times the
        # loss scale under AMP, whose unscaling already divided g by it). Unsynchronised first
        # passes need no all-reduce of their own: the second pass's averages the sum.
        scale = amp.scale if amp is not None else 1.0
        for buf, alpha in zip(self._buffers, alphas):
            buf.grad.mul_((1.0 - alpha) / alpha * scale)
            buf.mark_grad_written()
        self._watch_second_pass()
        second_loss = self._pass(closure, bn_stats=False)
        if not wrapper_syncs:
            self._all_reduce_mean()
        self._prepare()
        for buf, indices in zip(self._buffers, self._without_perturbed_gradient()):
            buf.drop_gradients(indices)  # their (1 - alpha) / alpha * g alone: skipped
        if amp is not None:
            self._amp_unscale(amp)
            if _amp.overflowed(amp):
                self._abandon_step()
                return second_loss
        self._base_step(self._buffers, self._backends, "w0", None, alphas, True)
        self._step_done()
        return second_loss

    def __repr__(self) -> str:
        return (f"WeightedSAM(base_optimizer={type(self.base_optimizer).__name__}, "
                f"decouple={self.decouple}, backend={self.backend!r}, "
                f"groups={len(self.param_groups)})")


__all__ = ["WeightedSAM"]
