"""flatfused's optimizers (NSO, SAM/ASAM, WSAM) in PyTorch Lightning: one callback.

    trainer = lightning.Trainer(..., callbacks=[FlatOptimizerCallback()])

with ``configure_optimizers`` returning a flatfused optimizer (and, if wanted, an LR scheduler
attached to it). A flat-minima step runs its forward-backward passes itself, through the closure
Lightning hands to ``optimizer.step``; three places in Lightning assume one pass per step, and
at ``on_fit_start`` the callback adapts each of them, for flatfused optimizers only (any other
optimizer trains exactly as before):

- The precision plugin (:class:`_FlatPrecision`, mixed into the class of the trainer's plugin,
  which keeps its state and its checkpoint key): with a GradScaler (``"16-mixed"``) Lightning
  runs the closure once and then calls ``scaler.step(optimizer)`` without it; here the step is
  ``scaler.step(optimizer, closure)``, which unscales and checks every pass once and skips the
  whole step on overflow. Gradient clipping by norm (``gradient_clip_val``, or
  ``self.clip_gradients`` from ``configure_gradient_clipping``) becomes the optimizer's own
  clipping after unscaling (``max_grad_norm``; WSAM's ``max_norm``) for that step, instead of
  ``clip_grad_norm_`` on ``.grad`` inside each pass.
- The automatic optimization loop (:class:`_ReplayingAutomaticOptimization`): with
  ``accumulate_grad_batches > 1`` Lightning runs the earlier micro-batches' forward-backward
  outside the step, so the perturbed passes would see the last micro-batch alone. Here their
  closures are kept and every pass of the step runs all micro-batches of the step, the earlier
  ones without DDP gradient synchronisation (as Lightning's accumulation does).
- The optimizer's ``model`` becomes the module Lightning trains (the DDP wrapper under the DDP
  strategy), so that NSO synchronises gradients once per step and BatchNorm running statistics
  are frozen in the perturbed passes; and ``self.optimizers()`` forwards every attribute to the
  flatfused optimizer (:class:`_ForwardingLightningOptimizer`), so that manual optimization
  can call the three-call API on it without the wrapper keeping stale copies of its state.

What cannot work is refused with :class:`FlatLightningError` before the first step
(docs/lightning.md).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch

from .. import NSO, SAM, StepPhase, WeightedSAM

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure
    from lightning.pytorch.loops.optimization.automatic import _AutomaticOptimization
    from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
    from lightning.pytorch.plugins.precision import (DoublePrecision, HalfPrecision,
                                                     MixedPrecision, Precision)
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
    from lightning.pytorch.utilities import GradClipAlgorithmType
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
except ImportError as e:  # pragma: no cover - the integration is optional
    raise ImportError(f"flatfused.integrations.lightning needs PyTorch Lightning 2.x ({e}); "
                      "pip install lightning") from e

FLAT_OPTIMIZERS = (NSO, SAM, WeightedSAM)
__all__ = ["FlatOptimizerCallback", "FlatLightningError"]


class FlatLightningError(MisconfigurationException):
    """A Lightning setting that a flatfused optimizer cannot train with (the message says why
    and what to do instead)."""


def _unwrap(optimizer):
    """The optimizer itself, for Lightning's ``LightningOptimizer`` wrapper of it."""
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def is_flat(optimizer) -> bool:
    """Whether ``optimizer`` (or the optimizer a ``LightningOptimizer`` wraps) is flatfused's."""
    return isinstance(_unwrap(optimizer), FLAT_OPTIMIZERS)


def _clip_attribute(optimizer) -> str:
    """The optimizer's own clipping norm (after unscaling): WSAM keeps its reference's name."""
    return "max_norm" if isinstance(optimizer, WeightedSAM) else "max_grad_norm"


# ---------------------------------------------------------------------------- precision

class _FlatPrecision:
    """Mixed into the class of the trainer's precision plugin (see :func:`adopt_precision`);
    for flatfused optimizers it replaces the step and the clipping, other optimizers go to the
    plugin's own methods."""

    # The optimizer's own clipping norm (set at construction) per optimizer, put back after
    # each step: clip_gradients sets the norm of one step.
    _flat_own_clip: dict

    def optimizer_step(self, optimizer, model, closure: Callable[[], Any], **kwargs):
        if not is_flat(optimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        optimizer = _unwrap(optimizer)
        own = self._own_clip(optimizer)
        try:
            return self._flat_step(optimizer, model, closure, **kwargs)
        finally:
            setattr(optimizer, _clip_attribute(optimizer), own)

    def _own_clip(self, optimizer):
        """The optimizer's own clipping norm, as it was when this plugin first saw it."""
        return self._flat_own_clip.setdefault(id(optimizer),
                                              getattr(optimizer, _clip_attribute(optimizer)))

    def _flat_step(self, optimizer, model, closure, **kwargs):
        scaler = getattr(self, "scaler", None)
        if optimizer.step_phase is not StepPhase.IDLE:
            # Manual optimization: training_step ran the three-call (NSO) or two-call (SAM,
            # WSAM) passes, and opt.step() closes the step: step() without a closure, which
            # under a GradScaler unscales and checks what the passes accumulated.
            closure()
            self._after_closure(model, optimizer)
            if scaler is None:
                return optimizer.step(**kwargs)
            output = scaler.step(optimizer, **kwargs)
            scaler.update()
            return output
        if closure is do_nothing_closure:
            raise FlatLightningError(
                f"{type(optimizer).__name__}.step() without a closure: a flat-minima step runs its "
                "own forward-backward passes. In manual optimization call opt.step(closure) with "
                "a closure that computes the loss, calls self.manual_backward(loss) and returns "
                "it; or close a three-call (NSO) or two-call (SAM, WSAM) step with opt.step()")
        automatic = isinstance(model, pl.LightningModule) and model.automatic_optimization
        if automatic and not isinstance(optimizer, NSO):
            # Lightning zeroes gradients inside the closure; SAM would take gradients left
            # from the previous step as its first pass (and WSAM add them to it).
            optimizer.zero_grad(set_to_none=True)
        wrapped = partial(self._wrap_closure, model, optimizer, closure)
        if scaler is None:
            return optimizer.step(closure=wrapped, **kwargs)
        _ensure_scale(scaler, next(p.device for g in optimizer.param_groups for p in g["params"]))
        output = scaler.step(optimizer, wrapped, **kwargs)  # (the closure positionally: see
        scaler.update()                                     # GradScaler.step)
        return output

    def clip_gradients(self, optimizer, clip_val=0.0,
                       gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        if not is_flat(optimizer):
            return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        if not clip_val or clip_val <= 0:
            return
        optimizer = _unwrap(optimizer)
        if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            raise FlatLightningError(_VALUE_CLIPPING)
        if not math.isfinite(clip_val):
            raise FlatLightningError(f"gradient_clip_val must be a finite number, got {clip_val!r}")
        self._own_clip(optimizer)
        setattr(optimizer, _clip_attribute(optimizer), float(clip_val))


def _ensure_scale(scaler, device) -> None:
    """GradScaler creates its scale at the first ``scale()`` and ``step()`` refuses to run
    before; with every backward inside the step the first ``scale()`` would come too late."""
    if scaler.is_enabled():
        scaler.scale(torch.zeros((), device=device))


_VALUE_CLIPPING = (
    "gradient_clip_algorithm='value' with a flatfused optimizer: it clips the update direction "
    "after unscaling, and only by norm (max_grad_norm; WSAM's max_norm); clipping each pass's "
    ".grad by value inside the step would clip partial sums (NSO) or the wrong pass (SAM). Use "
    "gradient_clip_algorithm='norm'")

_SUPPORTED_PRECISION = (MixedPrecision, HalfPrecision, DoublePrecision)


def adopt_precision(plugin: Precision) -> Precision:
    """Mix :class:`_FlatPrecision` into ``plugin``'s class, in place (idempotent). The class
    keeps its ``__qualname__``: Lightning saves the plugin's state (the GradScaler's) under it,
    so checkpoints move between plain and flatfused runs."""
    cls = type(plugin)
    if issubclass(cls, _FlatPrecision):
        return plugin
    if not (cls is Precision or issubclass(cls, _SUPPORTED_PRECISION)):
        raise FlatLightningError(
            f"the precision plugin {cls.__name__} is not supported with a flatfused optimizer; "
            "use precision '32-true', '16-mixed', 'bf16-mixed', '16-true', 'bf16-true' or "
            "'64-true'")
    plugin.__class__ = type(cls.__name__, (_FlatPrecision, cls),
                            {"__qualname__": cls.__qualname__, "__module__": __name__})
    plugin._flat_own_clip = {}
    return plugin


# ---------------------------------------------------------------------------- accumulation

class _StepClosure:
    """The closure of one optimizer step: every micro-batch's closure (training_step, zero_grad
    on the first, backward) in order, each pass of the step calling it anew; all but the last
    without DDP gradient synchronisation. Returns the step's loss (the sum of the micro-batches'
    losses, which Lightning divides by ``accumulate_grad_batches``)."""

    def __init__(self, closures: list, strategy):
        self.closures = closures
        self.strategy = strategy

    def __call__(self):
        total = None
        last = len(self.closures) - 1
        for i, closure in enumerate(self.closures):
            with _block_parallel_sync_behavior(self.strategy, block=i < last):
                loss = closure()
            if loss is None:
                raise FlatLightningError(
                    "training_step returned None inside a flatfused optimizer's step: each pass "
                    "of the step needs the loss of every micro-batch (skipping the step from "
                    "one pass would leave the others' gradients). Return the loss")
            total = loss if total is None else total + loss
        return total


class _ReplayingAutomaticOptimization(_AutomaticOptimization):
    """Lightning's automatic optimization (swapped in as the class of the loop's instance, which
    keeps its progress counters); for a flatfused optimizer the micro-batches of an accumulated
    step are kept and run inside the step (:class:`_StepClosure`)."""

    _flat_deferred: list

    def run(self, optimizer, batch_idx, kwargs):
        if not is_flat(optimizer):
            return super().run(optimizer, batch_idx, kwargs)
        closure = self._make_closure(kwargs, optimizer, batch_idx)
        trainer = self.trainer
        if batch_idx % trainer.accumulate_grad_batches == 0:
            # Where Lightning zeroes the gradients: micro-batches left from a group that never
            # stepped (on_train_batch_start returned -1) are dropped, as their gradients are.
            self._flat_deferred = []
        if (not trainer.strategy.handles_gradient_accumulation
                and trainer.fit_loop._should_accumulate()):
            self._flat_deferred.append(closure)  # its pass runs inside the step
            return {}
        closures, self._flat_deferred = self._flat_deferred + [closure], []
        self._optimizer_step(batch_idx, _StepClosure(closures, trainer.strategy))
        result = closure.consume_result()
        return {} if result.loss is None else result.asdict()


def adopt_loop(trainer) -> None:
    """Make the trainer's automatic-optimization loop a :class:`_ReplayingAutomaticOptimization`
    (in place, idempotent), with no micro-batch kept."""
    loop = trainer.fit_loop.epoch_loop.automatic_optimization
    if not isinstance(loop, _ReplayingAutomaticOptimization):
        if type(loop) is not _AutomaticOptimization:
            raise FlatLightningError(
                f"the trainer's automatic optimization loop is a {type(loop).__name__}, not "
                "Lightning's own: flatfused cannot run accumulated micro-batches inside its step")
        loop.__class__ = _ReplayingAutomaticOptimization
    loop._flat_deferred = []


# ---------------------------------------------------------------------------- self.optimizers()

class _ForwardingLightningOptimizer(LightningOptimizer):
    """``LightningOptimizer`` whose attributes, but for its own, are the wrapped optimizer's.

    Lightning's wrapper has the optimizer's class among its bases, so ``opt.first_step()``
    runs the optimizer's method with the wrapper as ``self``, and every attribute it sets (NSO's
    RNG position, the open step's bookkeeping) would land on the wrapper, where the optimizer,
    its ``state_dict()`` and Lightning's checkpoints never see it."""

    _OWN = frozenset({"_optimizer", "_strategy", "_on_before_step", "_on_after_step",
                      "__class__", "__dict__"})

    def __getattribute__(self, name):
        if name in _ForwardingLightningOptimizer._OWN or name in LightningOptimizer.__dict__:
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_optimizer"), name)

    def __setattr__(self, name, value):
        if name in _ForwardingLightningOptimizer._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._optimizer, name, value)


def adopt_lightning_optimizer(wrapper) -> None:
    """Make a ``LightningOptimizer`` a :class:`_ForwardingLightningOptimizer` (in place)."""
    if isinstance(wrapper, _ForwardingLightningOptimizer):
        return
    cls = type(wrapper._optimizer)
    wrapper.__class__ = type("Lightning" + cls.__name__, (_ForwardingLightningOptimizer, cls), {})


# ---------------------------------------------------------------------------- the callback

def check_strategy(strategy) -> None:
    """Refuse strategies other than one device or DDP, on a CPU or a CUDA GPU."""
    if (not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
            or isinstance(strategy, DeepSpeedStrategy)
            or strategy.root_device.type not in ("cpu", "cuda")):
        raise FlatLightningError(
            f"the strategy {type(strategy).__name__} on {strategy.root_device.type} is not "
            "supported with a flatfused optimizer; use a single device or strategy='ddp' "
            "(CPU or CUDA). (FSDP/DeepSpeed shard or step the optimizer themselves)")


def check_automatic(trainer, pl_module, optimizer) -> None:
    """Refuse the automatic-optimization settings a flat-minima step cannot honour."""
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise FlatLightningError(
            "training_step(dataloader_iter) fetches a batch at each call, and a flat-minima step "
            "calls training_step once per pass: each pass would see another batch. Take "
            "training_step(batch, batch_idx)")
    clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
    if clip is not None and clip > 0:
        if algorithm == GradClipAlgorithmType.VALUE:
            raise FlatLightningError(_VALUE_CLIPPING)
        if not math.isfinite(clip):
            raise FlatLightningError(f"gradient_clip_val must be a finite number, got {clip!r}")
        attribute = _clip_attribute(optimizer)
        own = getattr(optimizer, attribute)
        if own is not None and own != clip:
            raise FlatLightningError(
                f"Trainer(gradient_clip_val={clip}) and {type(optimizer).__name__}("
                f"{attribute}={own}): gradient_clip_val sets {attribute} for every step; "
                "set only one of them")


class FlatOptimizerCallback(Callback):
    """Lets Lightning train with flatfused's NSO, SAM/ASAM and WSAM (see the module doc).

    Add it to the trainer's callbacks; it changes nothing for other optimizers. Lightning's
    precision modes, ``gradient_clip_val`` (by norm), ``accumulate_grad_batches``, LR
    schedulers, the DDP strategy and checkpoint resume then work as in a plain run, and
    manual optimization can call ``opt.step(closure)`` or the three-call API on
    ``self.optimizers()``, under AMP too (docs/lightning.md).
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        flat = [opt for opt in trainer.optimizers if is_flat(opt)]
        if not flat:
            return
        check_strategy(trainer.strategy)
        automatic = pl_module.automatic_optimization
        if automatic:
            check_automatic(trainer, pl_module, flat[0])
        plugin = trainer.strategy.precision_plugin = adopt_precision(
            trainer.strategy.precision_plugin)
        for optimizer in flat:
            plugin._flat_own_clip[id(optimizer)] = getattr(optimizer, _clip_attribute(optimizer))
            # The module Lightning runs the passes through: the DDP wrapper (NSO then syncs
            # once per step), or the LightningModule itself. A model of the user's own stays.
            if optimizer.model is None or optimizer.model is pl_module:
                optimizer.model = trainer.strategy.model
        wrappers = pl_module.optimizers()  # what self.optimizers() returns
        for wrapper in wrappers if isinstance(wrappers, list) else [wrappers]:
            if is_flat(wrapper):
                adopt_lightning_optimizer(wrapper)
        if automatic:
            adopt_loop(trainer)
