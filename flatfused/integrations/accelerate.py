"""flatfused's optimizers in a Hugging Face Accelerate training loop.

    from flatfused.integrations.accelerate import prepare

    optimizer = flatfused.NSO(model, torch.optim.AdamW, sigma=0.008, lr=1e-4, max_grad_norm=1.0)
    model, optimizer, loader, scheduler = prepare(accelerator, model, optimizer, loader,
                                                  scheduler)   # was: accelerator.prepare(...)
    for batch in loader:
        with accelerator.accumulate(model):
            def closure(batch=batch):
                loss = model(**batch).loss
                accelerator.backward(loss)
                return loss
            loss = optimizer.step(closure)    # None until the accumulated batch is complete
            scheduler.step()
            optimizer.zero_grad()

A flat-minima step runs every forward-backward pass itself, so the closure is the loop's
forward and backward; what accelerate 1.16's ``AcceleratedOptimizer`` does with it, and what
:class:`FlatAcceleratedOptimizer` does instead:

- ``step(closure)`` during ``accelerator.accumulate`` is a no-op until the last micro-batch:
  the closures of the earlier micro-batches would never run. Here they are kept, and at the
  last micro-batch one step runs them all in every pass (the earlier ones under
  ``accelerator.no_sync``), so that each pass sees the whole accumulated batch and, under DDP,
  an NSO step synchronises gradients once.
- ``scaler.step(optimizer, closure)`` (fp16) raises before the first step, since the
  ``GradScaler`` creates its scale at the first ``scale()``, which here happens inside the step;
  the scale is created when the optimizer is prepared.
- ``step_was_skipped`` (which ``accelerator.optimizer_step_was_skipped`` and the prepared LR
  scheduler read) is never set for an optimizer that handles scaling itself: a step flatfused
  skips on overflow advanced the scheduler. It is set here from the scale, which
  ``scaler.update()`` lowers exactly when the step was skipped.
- ``step`` returns None; here it returns the loss of the flatfused step.

Clipping is the optimizer's ``max_grad_norm=`` (WSAM: ``max_norm=``), applied after
unscaling: ``accelerator.clip_grad_norm_`` between the passes would clip the running sum of
the passes' gradients (and under fp16 unscale them twice), so it raises inside a step.
"""
from __future__ import annotations

import contextlib
import dis
import json
import os
import types

import torch

from ..optim.flat_optimizer import FlatOptimizer
from ..optim.sam import SAM
from ..optim.wsam import WeightedSAM

try:
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType
except ImportError as e:  # pragma: no cover - accelerate is an optional dependency
    raise ImportError("flatfused.integrations.accelerate needs Hugging Face Accelerate "
                      "(pip install accelerate)") from e


class FlatStepError(RuntimeError):
    """A flatfused step cannot run as the training loop asks; it did not happen (the weights
    are as before it)."""


# Why DeepSpeed cannot run a flat-minima step, by ZeRO stage (see docs/transformers.md).
_DEEPSPEED_WHY = {
    0: "DeepSpeed's engine owns the backward pass, the loss scaling and (with fp16/bf16) the "
       "fp32 master weights, and calls the client optimizer's step() without a closure, so a "
       "wrapper optimizer cannot run its passes at perturbed weights inside that step",
    1: "ZeRO stage 1 partitions the optimizer state and keeps fp32 master weights in its own "
       "flat partitions, which it steps without a closure, so a wrapper optimizer cannot run "
       "its passes at perturbed weights inside that step",
    2: "ZeRO stage 2 partitions the gradients and reduces them once per step, as they are "
       "produced, so a wrapper optimizer can neither add up several passes' gradients nor "
       "perturb and restore the weights it does not hold",
    3: "ZeRO stage 3 partitions the parameters and gradients and reduces once per step, so a "
       "wrapper optimizer can neither perturb and restore weights it does not hold nor add up "
       "several passes' gradients",
}
SHARDING_ADVICE = ("train with DDP (torchrun) instead, or shard with FSDP2 (torch's "
                   "fully_shard), which flatfused supports in a training loop that shards the "
                   "model before creating the optimizer (docs/design.md, 'Distributed')")


def deepspeed_stage(config) -> int | None:
    """The ZeRO stage of a DeepSpeed configuration: a dict, a path to its JSON file, or an
    accelerate ``DeepSpeedPlugin`` (0 when it names none; None when it cannot be read)."""
    if hasattr(config, "zero_stage"):  # accelerate's DeepSpeedPlugin
        return int(config.zero_stage or 0)
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    try:
        return int(config.get("zero_optimization", {}).get("stage", 0))
    except (AttributeError, TypeError, ValueError):  # "auto", a placeholder
        return None


def deepspeed_refusal(what: str, config) -> str:
    """The message refusing a flatfused optimizer under DeepSpeed (every ZeRO stage)."""
    stage = deepspeed_stage(config)
    if stage in _DEEPSPEED_WHY:
        where, why = f"ZeRO stage {stage}", _DEEPSPEED_WHY[stage]
    else:
        where, why = "ZeRO stage unknown", (
            f"{_DEEPSPEED_WHY[0]}; stages 2 and 3 moreover partition the gradients (and "
            "parameters) and reduce once per step")
    return f"{what} does not run under DeepSpeed ({where}): {why}; {SHARDING_ADVICE}"


def check_accelerator(accelerator, what: str) -> None:
    """Refuse the accelerator configurations a flatfused step cannot run under."""
    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if kind == DistributedType.DEEPSPEED or plugin is not None:
        raise FlatStepError(deepspeed_refusal(what, plugin if plugin is not None else {}))
    if kind == DistributedType.FSDP or getattr(accelerator, "is_fsdp2", False):
        raise FlatStepError(
            f"{what} does not run under Accelerate's FSDP: Accelerate builds the optimizer "
            "before sharding and then swaps its parameters for the shards, while flatfused's "
            f"flat buffers are laid out when the optimizer is built; {SHARDING_ADVICE}")
    if kind in (DistributedType.XLA, DistributedType.MEGATRON_LM):
        raise FlatStepError(f"{what} does not run under Accelerate's {kind.value} backend; "
                            "DDP and single-device runs are supported")


def _ensure_scale(scaler, device) -> None:
    """GradScaler creates its scale at the first ``scale()`` and ``step()`` refuses to run
    before; with every backward inside the step the first ``scale()`` would come too late."""
    if scaler is not None and scaler.is_enabled():
        scaler.scale(torch.zeros((), device=device))


def _global_names(code) -> set:
    """The global names ``code`` (and the functions nested in it) reads."""
    names = {ins.argval for ins in dis.get_instructions(code)
             if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _captured(closure) -> list:
    """The variables a closure reads from enclosing scopes and from its module, with their
    values now: ``(name, cell, value)``, where ``cell.cell_contents`` reads it again."""
    code = getattr(closure, "__code__", None)
    if code is None:  # functools.partial, a callable object: its arguments are bound already
        return []
    captured = []
    for name, cell in zip(code.co_freevars, getattr(closure, "__closure__", None) or ()):
        try:
            captured.append((name, cell, cell.cell_contents))
        except ValueError:  # not bound yet
            continue
    module = getattr(closure, "__globals__", {})
    for name in sorted(_global_names(code)):
        if name in module:
            captured.append((name, _GlobalCell(module, name), module[name]))
    return captured


class _GlobalCell:
    """A module-level variable read like a closure cell."""

    def __init__(self, module: dict, name: str):
        self.module, self.name = module, name

    @property
    def cell_contents(self):
        try:
            return self.module[self.name]
        except KeyError:
            raise ValueError(self.name) from None


def micro_batch_closure(closures, no_sync, reduce: str = "mean"):
    """One closure that runs ``closures`` (one per micro-batch) in turn, every one but the last
    under ``no_sync()``, and returns the ``reduce`` ("mean" or "sum") of their losses (None if
    none returned one). A step's every pass then covers the accumulated batch and, under DDP,
    only its last backward synchronises."""
    closures = list(closures)
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")

    def closure():
        losses = []
        last = len(closures) - 1
        for j, one in enumerate(closures):
            with (contextlib.nullcontext() if j == last else no_sync()):
                loss = one()
            if loss is not None:  # (detached: the step only reports it)
                losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if not losses:
            return None
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total / len(losses) if reduce == "mean" else total

    return closure


class FlatAcceleratedOptimizer(AcceleratedOptimizer):
    """Accelerate's optimizer wrapper for a flatfused optimizer (see the module doc).

    ``step(closure)`` keeps the closure while ``accelerator.accumulate`` accumulates and runs
    one flatfused step over all the kept closures at the last micro-batch, under the
    accelerator's ``GradScaler`` when there is one; it returns that step's loss (the flatfused
    optimizer's: NSO's clean loss, or with ``lam == 0`` the mean of its perturbed passes; SAM's
    and WSAM's first pass), averaged over the micro-batches, and None while accumulating.
    ``last_loss`` keeps the last step's. ``step()`` without a closure runs the closures given
    to :meth:`add_micro_batch`, or, with none, the flatfused optimizer's ``step()`` (which
    completes its reference API's calls).
    """

    def __init__(self, optimizer, accelerator, device_placement=None):
        if not isinstance(optimizer, FlatOptimizer):
            raise TypeError(f"FlatAcceleratedOptimizer wraps a flatfused optimizer (NSO, SAM, "
                            f"WeightedSAM), got {type(optimizer).__name__}")
        check_accelerator(accelerator, type(optimizer).__name__)
        if device_placement is None:
            device_placement = accelerator.device_placement
        super().__init__(optimizer, device_placement=device_placement, scaler=accelerator.scaler)
        self.accelerator = accelerator
        self.last_loss = None
        self._closures = []  # (closure, its captured variables) of the step being accumulated
        self._reduce = "mean"
        _ensure_scale(self.scaler, accelerator.device)

    def add_micro_batch(self, closure, reduce: str = "mean") -> None:
        """Keep ``closure`` (one micro-batch's forward and backward, returning its loss) for the
        next step; the step's loss is the ``reduce`` ("mean", or "sum" for losses already
        divided by the number of micro-batches) of theirs."""
        if not callable(closure):
            raise TypeError(f"the closure must be callable, got {type(closure).__name__}")
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        self._reduce = reduce
        self._closures.append((closure, _captured(closure)))

    def step(self, closure=None):
        if closure is not None:
            self.add_micro_batch(closure)
        if not self.gradient_state.sync_gradients:
            return None  # accumulating: the step runs at the last micro-batch
        kept, self._closures = self._closures, []
        if not kept:
            return self._flat_step(None)
        _check_unchanged(kept)
        model = self.sync_model()
        step_closure = micro_batch_closure([c for c, _ in kept],
                                           lambda: self.accelerator.no_sync(model),
                                           self._reduce)
        if isinstance(self.optimizer, (SAM, WeightedSAM)):
            # Every pass runs in the closure: gradients from before the step are not a first
            # pass (SAM would ascend along them, WSAM would add them to its clean gradient).
            self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = self._flat_step(step_closure)
        return self.last_loss

    def sync_model(self):
        """The module whose passes the step runs: the flatfused optimizer's ``model``, which
        under DDP must be the prepared (DDP) module, so that NSO synchronises gradients once per
        step and the micro-batches before the last run under ``no_sync``."""
        model = self.optimizer.model
        if self.accelerator.use_distributed and not isinstance(
                getattr(model, "_orig_mod", model), torch.nn.parallel.DistributedDataParallel):
            raise FlatStepError(
                "under DDP the flatfused optimizer needs the prepared (DDP) module to run its "
                "passes without synchronising each: prepare with "
                "flatfused.integrations.accelerate.prepare(accelerator, model, optimizer, ...), "
                "or set optimizer.model = model after accelerator.prepare (got "
                f"{type(model).__name__})")
        return model

    def _flat_step(self, closure):
        args = () if closure is None else (closure,)
        with _refuse_clipping(self.accelerator):
            if self.scaler is None:
                self._is_overflow = False
                return self.optimizer.step(*args)
            before = self.scaler.get_scale()
            loss = self.scaler.step(self.optimizer, *args)
            self.scaler.update()
            # update() lowers the scale exactly when a pass overflowed and the step was skipped.
            self._is_overflow = self.scaler.get_scale() < before
            return loss


def _check_unchanged(kept) -> None:
    """Refuse to run kept closures whose captured variables were rebound since they were kept:
    a closure reads them when it runs, so ``def closure(): ... batch ...`` in the loop would
    see the last micro-batch's ``batch`` in place of its own."""
    for j, (closure, captured) in enumerate(kept[:-1]):
        for name, cell, value in captured:
            try:
                now = cell.cell_contents
            except ValueError:
                now = None
            if now is not value:
                raise FlatStepError(
                    f"the closure kept at micro-batch {j + 1} of this step reads '{name}', which "
                    "the loop has rebound since; the step runs the kept closures at the last "
                    "micro-batch, so it would read the new value: bind it when the closure is "
                    f"made (def closure({name}={name}): ...)")


@contextlib.contextmanager
def _refuse_clipping(accelerator):
    """Inside a step, clipping ``.grad`` would act on the running sum of the passes (and under
    fp16 unscale it twice): refuse it there, pointing to the optimizer's own clipping."""
    def refuse(*args, **kwargs):
        raise FlatStepError(
            "accelerator.clip_grad_norm_/clip_grad_value_/unscale_gradients inside a flatfused "
            "step would act on the running sum of its passes' gradients; clip with the "
            "optimizer's max_grad_norm= (WeightedSAM: max_norm=), which clips the update "
            "after unscaling")

    names = ("clip_grad_norm_", "clip_grad_value_", "unscale_gradients")
    saved = {name: accelerator.__dict__[name] for name in names if name in accelerator.__dict__}
    for name in names:
        setattr(accelerator, name, refuse)
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(accelerator, name, saved[name])
            else:
                delattr(accelerator, name)


def prepare_optimizer(accelerator, optimizer, device_placement=None) -> FlatAcceleratedOptimizer:
    """``accelerator.prepare_optimizer`` for a flatfused optimizer: the
    :class:`FlatAcceleratedOptimizer` around it, registered with ``accelerator`` (so that
    ``accelerator.prepare`` passes it through, and a scheduler prepared with it, checkpoints and
    ``optimizer_step_was_skipped`` see it). Call it before ``accelerator.prepare``; under DDP
    then set ``optimizer.model`` to the prepared model (:func:`prepare` does both)."""
    if isinstance(optimizer, FlatAcceleratedOptimizer):
        return optimizer
    if isinstance(optimizer, AcceleratedOptimizer):
        raise FlatStepError("this optimizer was already prepared by accelerator.prepare; call "
                            "flatfused.integrations.accelerate.prepare (or prepare_optimizer) "
                            "on the flatfused optimizer instead")
    wrapped = FlatAcceleratedOptimizer(optimizer, accelerator, device_placement)
    wrapped._is_accelerate_prepared = True
    accelerator._optimizers.append(wrapped)
    return wrapped


def prepare(accelerator, *objects, device_placement=None):
    """``accelerator.prepare(*objects)`` with every flatfused optimizer among ``objects``
    prepared as a :class:`FlatAcceleratedOptimizer` whose ``model`` is the prepared module
    that holds its parameters (DDP's wrapper under DDP). Returns what ``accelerator.prepare``
    returns."""
    placements = device_placement or [None] * len(objects)
    objects = [prepare_optimizer(accelerator, obj, placement)
               if isinstance(obj, FlatOptimizer) else obj
               for obj, placement in zip(objects, placements)]
    result = accelerator.prepare(*objects, device_placement=device_placement)
    prepared = result if isinstance(result, tuple) else (result,)
    modules = [obj for obj in prepared if isinstance(obj, torch.nn.Module)]
    for opt in prepared:
        if isinstance(opt, FlatAcceleratedOptimizer):
            _link_model(opt.optimizer, modules, accelerator)
    return result


def _link_model(flat: FlatOptimizer, modules, accelerator) -> None:
    """Make the prepared module that holds ``flat``'s parameters its ``model``."""
    params = {id(p) for group in flat.param_groups for p in group["params"]}
    for module in modules:
        inner = accelerator.unwrap_model(module, keep_torch_compile=False)
        if flat.model is inner or params <= {id(p) for p in inner.parameters()}:
            flat.model = getattr(module, "_orig_mod", module)
            return
