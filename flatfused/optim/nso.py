"""Noise Stability Optimization (NSO) with the reference ``NSM`` API, over flat buffers.

The update direction is ``lam * g(w) + uw * sum_k [g(w + u_k) (+ g(w - u_k))]`` with
``u_k ~ sigma * distribution`` and ``uw = (1 - lam) / (2K)`` with ``use_neg`` (two-point
estimate), else ``(1 - lam) / K``. The three reference calls (``store_gradients``,
``first_step``, ``second_step``) behave as the published code's; ``step(closure)`` runs the
whole schedule and skips what the reference API cannot: the clean pass when ``lam == 0``, the
accumulator (gradients of the perturbed passes add up in place in the flat gradient buffer),
and the separate restore (fused into the base update for SGD/Adam/AdamW).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .. import ops
from ..rng import distribution_code
from .. import distributed as _dist
from . import amp as _amp
from .entry_point import drops_amp_attributes_on_error, entry_point
from .flat_optimizer import FlatOptimizer
from .nso_accumulator import Accumulator, acc_dtype
from .nso_rng import MASK64, NoiseCursor
from .pass_watch import _PassWatch
from .schedules import Schedule
from .step_state import StepPhase, StepRefused
from .validate import flag, nonnegative, optional_nonnegative, signal_nonfinite

class NSO(NoiseCursor, Accumulator, FlatOptimizer):
    """Noise Stability Optimization, a drop-in for the reference ``NSM`` class.

    Args:
        params: parameters or param groups (or an ``nn.Module``: its parameters, and the model
            is used for the BatchNorm bypass of ``step(closure)``).
        base_optimizer: a ``torch.optim.Optimizer`` class, built as
            ``base_optimizer(self.param_groups, **kwargs)``, or an instance (then ``kwargs`` must
            be empty and ``params`` may be ``None``). SGD, Adam and AdamW run fused.
        sigma: noise scale (>= 0), stored in every param group.
        distribution: ``None``/"normal", "laplace", "uniform", "binomial" (mean 2, as the
            reference) or "cauchy" (no variance, as the reference).
        num_perturbs, lam, use_neg: the schedule ``step(closure)`` runs: ``num_perturbs``
            perturbations, the clean gradient's weight ``lam``, and the two-point estimate
            (``use_neg``). The defaults are the ones the NSO README documents (1, 0, True: two
            passes per step); the reference trainer file's own keyword values are ``lam=0.5,
            use_neg=False``.
        model: module whose BatchNorm running statistics ``step(closure)`` freezes during the
            perturbed passes.
        backend: "auto", "cuda", "triton", "cpu" or "torch".
        seed: Philox seed of the noise, an int in [0, 2**64) (default: drawn from torch's
            default generator).
        shared_noise: under ``torch.distributed``, every rank draws the same noise (rank 0's
            seed is broadcast; noise is indexed by global element, so a sharded run draws what
            an unsharded one does); ``False``: each rank perturbs with its own noise.
        max_grad_norm: clip the update direction to this norm (after unscaling under AMP),
            as ``clip_grad_norm_`` would between ``unscale_`` and ``step``: in
            ``step(closure)``, and in ``second_step``/``step()`` of the three-call API (whose
            direction is the accumulator, out of ``clip_grad_norm_``'s reach).
        every, window, reuse: a cheaper schedule for ``step(closure)``
            (:mod:`flatfused.optim.schedules`): the NSO step on every ``every``-th step inside
            ``window``, one pass and a plain base step otherwise, plus LookSAM-style reuse of
            the perturbed direction's component orthogonal to the clean gradient.
        param_filter: perturb only some parameters (a callable ``p -> bool``, or the parameters,
            e.g. ``flatfused.norm_parameters(model)``); the others are updated with the same
            direction but never moved, and their flat buffers skip the perturbation passes.
    """

    def __init__(self, params, base_optimizer, sigma=0.05, distribution=None, *,
                 num_perturbs: int = 1, lam: float = 0.0, use_neg: bool = True,
                 model: torch.nn.Module | None = None, backend: str = "auto",
                 seed: int | None = None, shared_noise: bool = True,
                 max_grad_norm: float | None = None, every: int = 1,
                 window: tuple | None = None, reuse: float | None = None,
                 param_filter=None, **kwargs):
        sigma = nonnegative("sigma", sigma)
        self.distribution = distribution_code(distribution)
        if isinstance(num_perturbs, bool) or not isinstance(num_perturbs, int) or num_perturbs < 1:
            raise ValueError(f"num_perturbs must be an int >= 1, got {num_perturbs!r}")
        lam = nonnegative("lam", lam)
        if not lam <= 1.0:
            raise ValueError(f"lam (weight of the clean gradient) must be in [0, 1], got {lam}")
        self.num_perturbs, self.lam, self.use_neg = num_perturbs, lam, flag("use_neg", use_neg)
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if not 0 <= seed <= MASK64:  # the noise functions refuse others alike
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self.shared_noise = flag("shared_noise", shared_noise)
        # Every rank holds rank 0's seed (checkpoints agree); per-rank noise derives from it.
        self.seed = _dist.broadcast_int(ops._as_int64(seed)) & MASK64
        self.max_grad_norm = optional_nonnegative("max_grad_norm", max_grad_norm)
        self._start_cursor()
        # Set once a step(closure) saw its closure write .grad in place: from then on every
        # step keeps its passes' gradients apart (see step).
        self._closure_edits = False
        super().__init__(params, base_optimizer, dict(sigma=sigma), model=model, backend=backend,
                         base_kwargs=kwargs, schedule=Schedule.build(every, window, reuse),
                         param_filter=param_filter)

    def _check_groups(self) -> None:
        for group in self.param_groups:
            group["sigma"] = nonnegative("sigma", group.get("sigma", self.defaults["sigma"]))

    def _on_build(self) -> None:
        self._build_rng()
        self._reset_accumulator()

    def _on_abandon(self) -> None:
        """The abandoned step never happened: its noise is drawn again by the next one."""
        if self._step.rng_start is not None:
            self._rewind_rng(self._step.rng_start)
        self._reset_accumulator()

    def _open(self) -> None:
        """Start a step at the current weights (``w0``, saved by the first perturbation)."""
        self._step.close()
        self._step.phase = StepPhase.CLEAN_STORED
        self._step.rng_start = (self._next_offset, self._draw_offset)
        self._reset_accumulator()

    # ------------------------------------------------------------------ noise

    def _group_sigmas(self) -> list[float]:
        # Groups' sigma may have been set directly (schedulers): validate before any kernel.
        # (a group added through the base optimizer's add_param_group has none yet: the default)
        return [nonnegative("sigma", group.setdefault("sigma", self.defaults["sigma"]))
                for group in self.param_groups]

    def _perturb(self, sign: float, save: bool, zero_grads: bool = False,
                 zero_acc: bool = False) -> None:
        """``zero_grads``: zero the gradient buffers in the same pass (unless already zero);
        ``zero_acc``: zero the accumulators instead."""
        sigmas = self._group_sigmas()
        for buf, backend in zip(self._buffers, self._backends):
            zero = zero_grads and not buf.grad_is_zero()
            if not buf.perturbed:  # left out by the param_filter: only the zeroing
                if zero:
                    ops.kernel("zero_", backend)(grad=buf.grad)
                    buf.mark_grad_zero()
                continue
            self._perturb_buffer(buf, backend, sign * sigmas[buf.group_index], save,
                                 buf.grad if zero else
                                 buf.state_buffer("acc", acc_dtype(buf)) if zero_acc else None)
            if zero:
                buf.mark_grad_zero()
        if save:
            self._step.w0_saved = True
        if zero_acc:
            self._acc_zeroed = True
        self._step.phase, self._step.sign = StepPhase.PERTURBED, (1 if sign > 0 else -1)

    def _perturb_minus(self, zero_grads: bool = False) -> None:
        """Move to ``w0 - u`` with the current draw's ``u``.

        On the CPU drawing the Gaussians costs more than the memory traffic (perturb_ is
        compute-bound there: 5.7 ms at 16M fp32 against 3.0 for a copy), so when the weights are
        still ``w0 + u`` the minus pass mirrors them, ``w = 2 w0 - w``, in one pass without noise
        (the same ``u`` up to the rounding of ``w0 + u``). On GPUs noise is cheaper than the 4
        extra bytes per element that mirroring reads, so they draw ``u`` again."""
        if self._step.sign <= 0:
            self._perturb(-1.0, save=False, zero_grads=zero_grads)
            return
        sigmas = self._group_sigmas()
        for buf, backend in zip(self._buffers, self._backends):
            zero = zero_grads and not buf.grad_is_zero()
            if not buf.perturbed:
                if zero:
                    ops.kernel("zero_", backend)(grad=buf.grad)
                    buf.mark_grad_zero()
                continue
            if buf.device.type == "cpu":
                buf.data.lerp_(buf.state_buffer("w0"), 2.0)  # w + 2 (w0 - w)
                if zero:
                    ops.kernel("zero_", backend)(grad=buf.grad)
            else:
                self._perturb_buffer(buf, backend, -sigmas[buf.group_index], False,
                                     buf.grad if zero else None)
            if zero:
                buf.mark_grad_zero()
        self._step.phase, self._step.sign = StepPhase.PERTURBED, -1

    def _perturb_buffer(self, buf, backend: str, sigma: float, save: bool,
                        grad: torch.Tensor | None = None) -> None:
        w0 = buf.state_buffer("w0")
        perturb = ops.kernel("perturb_", backend)
        rng = self._rng[buf.device]
        for seg in buf.segments:
            if seg.start == 0 and seg.length == buf.numel:  # the usual case: no narrow views
                perturb(w=buf.data, w0=w0, rng=rng, base=seg.base, dist=self.distribution,
                        sigma=sigma, save=save, grad=grad)
                continue
            perturb(w=buf.data.narrow(0, seg.start, seg.length),
                    w0=w0.narrow(0, seg.start, seg.length), rng=rng, base=seg.base,
                    dist=self.distribution, sigma=sigma, save=save,
                    grad=None if grad is None else grad.narrow(0, seg.start, seg.length))

    @entry_point
    def set_sigma(self, sigma) -> None:
        """Set ``sigma`` in every param group (reference API)."""
        sigma = nonnegative("sigma", sigma)
        for group in self.param_groups:
            group["sigma"] = sigma

    # ------------------------------------------------------------------ reference API

    @torch.no_grad()
    @entry_point
    def store_gradients(self, zero_grad: bool = False, store_weights: bool = False,
                        update_weight: float = 0.5) -> None:
        """``store_weights``: start a step (save ``w0``) and set ``acc = update_weight * grad``;
        else ``acc += update_weight * grad``."""
        self._refuse_under_schedule("store_gradients")
        if store_weights and self._step.moved:
            # Saving the perturbed weights as w0 would lose the real ones for good (a loop
            # that went on after an error or a `continue` in the middle of a step).
            raise self._step.refuse("store_gradients(store_weights=True) starts a new step",
                                    "finish the open one first (second_step)")
        if not store_weights and not self._step.is_open:
            raise StepRefused("store_gradients(store_weights=False) needs a previous "
                              "store_gradients(store_weights=True) in this step")
        weight = float(update_weight)
        self._prepare()
        if store_weights:
            # Saving w0 is deferred into the next perturbation's pass (perturb_ with save),
            # which reads w anyway; until then the weights are w0. (Only a change to the weights
            # between this call and the next first_step/second_step would tell the difference.)
            self._open()
        if weight == 0.0:
            # A zero weight drops the gradient unread (the trainer's clean pass with lam == 0):
            # acc is zeroed lazily, by the next accumulate. (The reference multiplies by 0, so a
            # non-finite clean gradient would poison its accumulator; here it does not.)
            if store_weights:
                self._acc_is_zero = True
                self._acc_scale = 1.0
            if zero_grad:
                self._zero_flat_grads()
        else:
            init = store_weights or self._acc_is_zero
            if (init and zero_grad and self._acc_zeroed and self._can_hand_over()
                    and not any(self._shared_grads())):
                self._hand_over_grads(weight)
            else:
                if init:
                    self._acc_scale = 1.0
                self._accumulate_grads(weight / self._acc_scale, init, zero_grad)
            self._acc_is_zero = False
        if not store_weights:
            self._step.phase = StepPhase.ACCUMULATED

    @torch.no_grad()
    @entry_point
    def first_step(self, zero_grad: bool = False, store_perturb: bool = True) -> None:
        """Move to ``w0 + u`` with fresh noise (``store_perturb``) or to ``w0 - u`` with the same ``u``."""
        self._refuse_under_schedule("first_step")
        if not self._step.is_open:
            raise StepRefused("first_step needs the weights saved by "
                              "store_gradients(store_weights=True) first")
        if not store_perturb and self._draw_offset is None:
            raise StepRefused("first_step(store_perturb=False) needs a previous "
                              "first_step(store_perturb=True) to mirror")
        self._prepare(grads=zero_grad)
        if store_perturb:
            self._new_draw()
        if store_perturb or not self._step.w0_saved:
            # When acc is still to start from zero, zero it in this pass (compute-bound on a
            # CPU, so nearly free): the next store_gradients can then hand the gradient buffer
            # over as the accumulator instead of copying it out.
            zero_acc = (store_perturb and self._acc_is_zero and not self._acc_zeroed
                        and self._can_hand_over())
            self._perturb(1.0 if store_perturb else -1.0, save=not self._step.w0_saved,
                          zero_grads=zero_grad and not zero_acc, zero_acc=zero_acc)
        else:
            self._perturb_minus(zero_grads=zero_grad)
        if zero_grad:
            self._zero_flat_grads()  # what the pass did not zero (skipped where it did)

    @torch.no_grad()
    @entry_point
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w0``, put the accumulated gradient in ``.grad`` and take the base step."""
        self._refuse_under_schedule("second_step")
        if not self._step.is_open:
            raise StepRefused("second_step needs store_gradients(store_weights=True) first")
        self._prepare()
        w0 = "w0" if self._step.w0_saved else None  # never perturbed: w0 is the current w
        accs = self._accumulators()
        if self._acc_is_zero:
            for acc, backend in zip(accs, self._backends):
                ops.kernel("zero_", backend)(grad=acc)
            self._acc_is_zero = False
            self._acc_scale = 1.0
        else:
            self._clip_grads(self.max_grad_norm, self._acc_scale, vectors=accs)
        fused = self._base_step(self._buffers, self._backends, w0, "acc", self._acc_scale,
                                not zero_grad)
        self._step_done()
        self._reset_accumulator()
        if zero_grad and not (fused and all(b.grad_is_zero() for b in self._buffers)):
            self._zero_flat_grads()

    def _finish_three_call(self) -> None:
        """``step()`` after the three-call passes: ``second_step()``, and under a GradScaler
        (``scaler.step(optimizer)``) the accumulated direction unscaled and checked first; if
        any pass overflowed, the step is abandoned (weights back to ``w0``, the RNG to where the
        step began, the base optimizer not stepped) and the scaler lowers the scale."""
        self._prepare()
        amp = self._amp_begin(uses_grads=False)
        if amp is not None:
            if not amp.grads_scaled:
                warnings.warn(
                    "flatfused.NSO: scaler.unscale_(optimizer) before step() unscaled .grad, but "
                    "the three-call API's update direction is the accumulator, which step() "
                    "unscales itself; clip it with NSO(..., max_grad_norm=...), not "
                    "clip_grad_norm_", RuntimeWarning, stacklevel=3)
            if not self._acc_is_zero:
                self._amp_unscale(amp, self._accumulators())
            if _amp.overflowed(amp):
                self._abandon_step()
                return
        self.second_step()

    # ------------------------------------------------------------------ step(closure)

    @torch.no_grad()
    @drops_amp_attributes_on_error
    @entry_point
    def step(self, closure: Callable | None = None):
        """One NSO step; ``closure`` does a forward and backward pass and returns the loss.

        The closure runs ``1 + K(1 + use_neg)`` times (``K(1 + use_neg)`` when ``lam == 0``,
        once when ``lam == 1``). It may call ``optimizer.zero_grad()`` (ignored inside the step,
        which owns the gradient buffer) or ``model.zero_grad()``; gradients present before the
        step are discarded. Returns the clean loss, or with ``lam == 0`` the mean loss of the
        perturbed passes; NaN in its place when another pass's loss was not finite. After the
        step ``.grad`` holds the update direction. If the closure (or anything in the step)
        raises, the weights go back to ``w0`` and nothing else changes (the step's noise is
        drawn again by the next one).

        The passes add up in ``.grad``. A closure that writes ``.grad`` in place (clipping,
        ``zero_grad(set_to_none=False)``, ``grad.mul_``) is told by its first pass (in one
        process); from then on each pass's gradient moves into an accumulator before the next,
        so that those writes act on each pass alone as in the three-call API (a warning, once).

        Without a closure, after the three-call API's ``store_gradients``/``first_step`` calls
        of a step, ``step()`` is ``second_step()``: what ``scaler.step(optimizer)`` calls in
        that loop under ``torch.amp.GradScaler`` (the accumulated direction is unscaled and
        checked; an overflow in any pass skips the whole step).
        """
        if closure is None:
            if self._step.is_open:
                return self._finish_three_call()
            raise StepRefused(
                "NSO.step needs a closure that runs a forward and backward pass and returns the "
                "loss (def closure(): loss = loss_fn(model(x), y); loss.backward(); return "
                "loss); or use store_gradients/first_step/second_step as the reference trainer "
                "does "
                "(step() without a closure then stands for second_step()); in the HF Trainer, "
                "Accelerate or Lightning, see flatfused.integrations")
        if self._step.is_open:
            raise self._step.refuse("step(closure) starts a new step",
                                    "finish the open three-call step first (second_step)")
        closure = torch.enable_grad()(closure)
        self._prepare()
        if not self._full_step_due():
            return self._cheap_step(closure, zero_first=True,
                                    clip=lambda: self._clip_grads(self.max_grad_norm))
        K, lam = self.num_perturbs, self.lam
        uw = (1.0 - lam) / (2 * K if self.use_neg else K)
        # LookSAM-style reuse keeps the clean gradient of this full step (a clean pass even
        # with lam == 0, synchronised on its own so that every rank keeps the same one).
        recording = self._reuse_due() and uw != 0.0
        # Gradients from before the step are discarded: zeroed now when a clean pass comes
        # first, else by the first perturbation's pass itself (perturb_ with grad).
        zero_in_perturb = lam == 0
        if lam > 0 or recording:
            self._zero_flat_grads()
        self._open()
        amp = self._amp_begin(uses_grads=False)
        # Under DDP/FSDP2 only the last pass synchronises: it averages the sum of all passes.
        # (FSDP2 keeps unsynchronised gradients out of .grad, so the clean pass, whose gradient
        # is rescaled in .grad below, synchronises on its own when lam > 0.)
        clean_pass = lam > 0 or recording
        n_passes = (1 if clean_pass else 0) + (K * (2 if self.use_neg else 1) if uw else 0)
        clean_syncs = clean_pass and uw and (recording or _dist.is_fsdp2(self.model))
        passes_left = [n_passes]
        # Passes add up in .grad, so a closure writing .grad in place (clipping, as Lightning
        # does inside the closure, zero_grad(set_to_none=False), grad.mul_) would write the
        # earlier passes' sum. The first pass starts from zero and tells (_PassWatch); then,
        # and in every later step, each pass's gradient moves into the accumulator before the
        # next pass, as in the three-call API.
        apart = self._closure_edits and n_passes > 1
        watch_first = n_passes > 1 and not apart and self._can_watch_passes()

        def run(weight: float, bn_stats: bool = True, sync: bool = False, keep: bool = False):
            nonlocal apart
            passes_left[0] -= 1
            first = passes_left[0] == n_passes - 1
            watch = _PassWatch(self._buffers) if first and watch_first else None
            if sync or passes_left[0] == 0:
                loss = self._pass(closure, bn_stats, watch=watch)
            else:
                with _dist.no_sync(self.model):
                    loss = self._pass(closure, bn_stats, watch=watch)
            if watch is not None and watch.edited:
                apart = self._closure_edits = True
                warnings.warn("NSO.step: the closure writes .grad in place (gradient clipping, "
                              "zero_grad(set_to_none=False), ...); from now on each pass's "
                              "gradient moves into an accumulator (one more copy of the "
                              "weights) so that those writes act on that pass's gradient "
                              "alone, as in the three-call API", RuntimeWarning, stacklevel=2)
            if keep:  # the clean gradient, for the reuse (fp32, unscaled with the rest)
                for buf in self._buffers:
                    buf.state_buffer("g0", torch.float32).copy_(buf.grad)
            if apart:  # the pass's gradient into the accumulator, .grad zeroed for the next
                self._accumulate_grads(weight, init=first, zero_grad=True)
            return loss

        clean_loss = None
        if clean_pass:
            loss = run(lam, sync=clean_syncs, keep=recording)
            clean_loss = loss if lam > 0 else None
        losses = []
        for k in range(K):
            self._new_draw()
            if uw == 0.0:
                continue  # lam == 1: keep the RNG position of the three-call loop
            self._perturb(1.0, save=(k == 0), zero_grads=zero_in_perturb and k == 0)
            if k == 0 and lam > 0 and not apart:
                for buf in self._buffers:  # the clean gradient enters the sum with weight lam
                    buf.grad.mul_(lam / uw)
                    buf.mark_grad_written()
            # Running statistics: from the clean pass, or the first perturbed pass when
            # there is none.
            losses.append(run(uw, bn_stats=not clean_pass and k == 0))
            if self.use_neg:
                self._perturb_minus()
                losses.append(run(uw, bn_stats=False))
        # The direction: scale * .grad, or the accumulator when the passes were kept apart.
        if apart:
            vectors, source, scale = self._accumulators(), "acc", 1.0
        else:
            vectors, source, scale = None, None, uw if uw else lam
        self._amp_unscale(amp, vectors)
        if recording:
            self._amp_unscale(amp, [buf.state["g0"] for buf in self._buffers])
        if amp is not None and _amp.overflowed(amp):
            self._abandon_step()  # skip the whole step: weights back, the same noise next step
        else:
            if recording:
                directions = vectors if vectors is not None else [b.grad for b in self._buffers]
                self._record_reuse(directions, [b.state["g0"] for b in self._buffers], scale)
            self._clip_grads(self.max_grad_norm, scale, vectors=vectors)
            self._base_step(self._buffers, self._backends,
                            "w0" if self._step.w0_saved else None, source, scale, True)
            self._step_done()
        if clean_loss is not None or not losses or any(loss is None for loss in losses):
            return signal_nonfinite(clean_loss, losses)
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ checkpoints

    checkpoint_kind = "NSO"

    def _check_group_entries(self, group: dict, where: str) -> None:
        if "sigma" in group:
            nonnegative(f"{where}['sigma']", group["sigma"])

    def __repr__(self) -> str:
        return (f"NSO(base_optimizer={type(self.base_optimizer).__name__}, "
                f"num_perturbs={self.num_perturbs}, lam={self.lam}, use_neg={self.use_neg}, "
                f"backend={self.backend!r}, groups={len(self.param_groups)})")



NSM = NSO
