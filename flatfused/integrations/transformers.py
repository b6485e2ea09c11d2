"""flatfused's optimizers in the Hugging Face ``Trainer``: :class:`FlatTrainer` and
:class:`FlatTrainingArguments`.

    from flatfused.integrations.transformers import FlatTrainer, FlatTrainingArguments

    args = FlatTrainingArguments(output_dir="out", learning_rate=2e-5, max_grad_norm=1.0,
                                 flat_optimizer="nso", nso_sigma=0.008)   # was: TrainingArguments
    trainer = FlatTrainer(model=model, args=args, train_dataset=train)    # was: Trainer
    trainer.train()

The Trainer runs each micro-batch's forward and backward, clips, and calls
``optimizer.step()`` without a closure; a flat-minima step runs its forward-backward passes
itself (NSO with ``lam == 0`` has no pass at the current weights at all). So :class:`FlatTrainer`
changes four things and keeps the rest of the Trainer's loop (data, accumulation boundaries,
LR scheduler, callbacks, logging, evaluation, checkpoints):

- ``create_optimizer``: the Trainer builds its own optimizer (``args.optim``: AdamW with the
  Trainer's lr, betas, eps, weight decay and no-decay groups, by default; or the one passed as
  ``optimizers=``), which becomes the flatfused optimizer's base, and the wrapper is prepared
  for Accelerate (:class:`flatfused.integrations.accelerate.FlatAcceleratedOptimizer`).
- ``training_step`` keeps each micro-batch instead of running it; the Trainer's
  ``optimizer.step()`` at the accumulation boundary then runs one flatfused step whose closure
  is the Trainer's own ``training_step`` (``compute_loss`` and ``accelerator.backward``) over
  all micro-batches of that step, the earlier ones under ``no_sync``. Every pass sees the
  whole accumulated batch, and under DDP an NSO step synchronises gradients once.
- ``max_grad_norm`` becomes the optimizer's clipping (NSO and SAM ``max_grad_norm``, WSAM
  ``max_norm``), applied after unscaling to the update direction (NSO), the ascent-point
  gradient (SAM) or WSAM's gradients; the Trainer's own clipping before ``step()`` is off, and
  its ``grad_norm`` log entry is the norm the step clipped (taken inside the step).
- Logging: the loss the optimizer returned is logged as ``loss`` and under a key that says
  which loss it is, ``loss_perturbed`` (NSO with ``lam == 0``: the mean of the perturbed
  passes) or ``loss_clean`` (SAM, ASAM and WSAM: the first pass, at the current weights; NSO
  with ``lam > 0``: its clean pass).

Without ``flat_optimizer`` (and without a flatfused optimizer passed as ``optimizers=``)
:class:`FlatTrainer` is the plain Trainer.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

import flatfused
from flatfused import backends as _backends
from flatfused.optim.flat_optimizer import FlatOptimizer

from . import accelerate as _accelerate
from ._options import (DEFAULTS, DISTRIBUTIONS, HELP, OPTIMIZERS, OWNERS, PERTURB,
                       FlatOptionError, check_owners, check_values)
from ._options import make_optimizer as _make_optimizer

try:
    from transformers import Trainer, TrainingArguments
except ImportError as e:  # pragma: no cover - transformers is an optional dependency
    raise ImportError("flatfused.integrations.transformers needs Hugging Face transformers "
                      "(pip install transformers)") from e

# Trainer optimizers that update the weights outside step() (inside backward, or per layer in
# hooks), where a wrapper cannot run its passes.
_UNWRAPPABLE = ("lomo", "adalomo")
_TRUE = ("1", "y", "yes", "t", "true", "on")  # what the Trainer's strtobool reads as true


def _help(text: str, choices=None) -> dict:
    metadata = {"help": text}
    if choices is not None:
        metadata["choices"] = list(choices)
    return metadata


@dataclass
class FlatTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with flatfused's options (None: the default in :data:`DEFAULTS`).

    ``max_grad_norm`` clips inside the flatfused step (after unscaling); ``learning_rate``,
    ``weight_decay``, ``adam_beta1/2``, ``adam_epsilon``, ``optim``, ``lr_scheduler_type``,
    ``gradient_accumulation_steps``, ``bf16``/``fp16`` keep their Trainer meaning.
    """

    flat_optimizer: str | None = field(default=None, metadata=_help(
        "wrap the Trainer's optimizer into flatfused's NSO, SAM, ASAM or WSAM (absent: the "
        "plain Trainer)", OPTIMIZERS))
    nso_sigma: float | None = field(default=None, metadata=_help("NSO noise scale (0.008)"))
    nso_num_perturbs: int | None = field(default=None, metadata=_help(
        "NSO perturbations K per step (1)"))
    nso_lam: float | None = field(default=None, metadata=_help(
        "NSO weight of the clean gradient in [0, 1] (0: no clean pass)"))
    nso_use_neg: bool | None = field(default=None, metadata=_help(
        "NSO two-point estimate, w+u and w-u (true)"))
    nso_shared_noise: bool | None = field(default=None, metadata=_help(
        "every rank draws the same noise (true)"))
    nso_distribution: str | None = field(default=None, metadata=_help(
        "NSO noise distribution (normal)", DISTRIBUTIONS))
    flat_seed: int | None = field(default=None, metadata=_help(
        "NSO noise seed (the Trainer's seed; rank 0's is used on every rank)"))
    sam_rho: float | None = field(default=None, metadata=_help("SAM/ASAM/WSAM radius (0.05)"))
    sam_adaptive: bool | None = field(default=None, metadata=_help(
        "ASAM-style perturbation for SAM/WSAM (false; flat_optimizer asam sets it)"))
    wsam_gamma: float | None = field(default=None, metadata=_help("WSAM gamma in [0, 1) (0.9)"))
    wsam_decouple: bool | None = field(default=None, metadata=_help(
        "WSAM decoupled sharpness step (true)"))
    flat_backend: str | None = field(default=None, metadata=_help(
        "flatfused kernel backend (auto)", _backends.BACKENDS))
    flat_every: int | None = field(default=None, metadata=_help(HELP["flat_every"] + " (1)"))
    flat_window: str | None = field(default=None, metadata=_help(HELP["flat_window"]))
    flat_reuse: float | None = field(default=None, metadata=_help(HELP["flat_reuse"]))
    flat_perturb: str | None = field(default=None, metadata=_help(HELP["flat_perturb"] + " (all)",
                                                                  PERTURB))

    def __post_init__(self):
        # Before the Trainer's own checks: under DeepSpeed they import deepspeed.
        check_flat_arguments(self)
        super().__post_init__()
        if self.flat_optimizer is not None and self.fsdp_plugin_args is not None:
            raise FlatOptionError(
                f"flat_optimizer={self.flat_optimizer!r} does not run under the Trainer's FSDP: "
                "Accelerate builds the optimizer before sharding and then swaps its parameters "
                "for the shards, while flatfused lays out its flat buffers when the optimizer is "
                f"built; {_accelerate.SHARDING_ADVICE}")

    def flat_options(self) -> dict:
        """Every flatfused option, with the defaults filled in (``flat_seed``: the Trainer's
        ``seed`` when not given)."""
        options = {k: (getattr(self, k) if getattr(self, k) is not None else DEFAULTS[k])
                   for k in OWNERS}
        if options["flat_seed"] is None:
            options["flat_seed"] = int(self.seed)
        return options


def check_flat_arguments(args) -> None:
    """Refuse flatfused fields given without ``flat_optimizer`` or with another optimizer,
    values out of range, and Trainer settings a flatfused step cannot run with."""
    kind = args.flat_optimizer
    if kind is not None and kind not in OPTIMIZERS:
        raise FlatOptionError(f"flat_optimizer must be one of {', '.join(OPTIMIZERS)} (or None "
                              f"for the plain Trainer), got {kind!r}")
    check_owners(kind, [k for k in OWNERS if getattr(args, k) is not None], str,
                 "flat_optimizer")
    if kind is None:
        return
    _check_values(args)
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed:
        raise FlatOptionError(_accelerate.deepspeed_refusal(f"flat_optimizer={kind!r}",
                                                            deepspeed))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in _TRUE:
        raise FlatOptionError(_accelerate.deepspeed_refusal(
            f"flat_optimizer={kind!r} (ACCELERATE_USE_DEEPSPEED is set)", {}))
    optim = str(getattr(args.optim, "value", args.optim)).lower()
    if optim in _UNWRAPPABLE or optim.endswith("_layerwise"):
        raise FlatOptionError(f"flat_optimizer={kind!r} cannot wrap optim={optim!r}: it updates "
                              "the weights outside optimizer.step() (in backward or per layer), "
                              "where a flat-minima step cannot run its passes")


def _check_values(args) -> None:
    check_values({k: getattr(args, k) for k in OWNERS}, str)
    for key, choices in (("nso_distribution", DISTRIBUTIONS), ("flat_backend", _backends.BACKENDS)):
        value = getattr(args, key)
        if value is not None and value not in choices:
            raise FlatOptionError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    for key in ("nso_use_neg", "nso_shared_noise", "sam_adaptive", "wsam_decouple"):
        value = getattr(args, key)
        if value is not None and not isinstance(value, bool):
            raise FlatOptionError(f"{key} must be True or False, got {value!r}")


def make_optimizer(kind: str, options: dict, base: torch.optim.Optimizer,
                   model: torch.nn.Module, max_grad_norm: float | None) -> FlatOptimizer:
    """The flatfused optimizer ``kind`` around the Trainer's ``base`` optimizer instance."""
    return _make_optimizer(kind, options, base, model, max_grad_norm)


def _clip_norm(optimizer: FlatOptimizer):
    """The clipping norm a flatfused optimizer applies in its step (None: none)."""
    name = "max_norm" if isinstance(optimizer, flatfused.WeightedSAM) else "max_grad_norm"
    return name, getattr(optimizer, name)


def loss_name(optimizer: FlatOptimizer) -> str:
    """The log key of the loss a flatfused step returns: which loss it is."""
    if isinstance(optimizer, flatfused.NSO) and optimizer.lam == 0.0:
        return "loss_perturbed"
    return "loss_clean"


class FlatTrainer(Trainer):
    """The Hugging Face ``Trainer`` with each optimizer step one flatfused ``step(closure)``
    (see the module doc): from ``FlatTrainingArguments.flat_optimizer``, or a flatfused
    optimizer passed as ``optimizers=(optimizer, scheduler)``."""

    _flat = False  # (until __init__ decides: the Trainer's own __init__ runs first)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kind = getattr(self.args, "flat_optimizer", None)
        given = _flat_of(self.optimizer)
        if kind is not None and given is not None:
            raise FlatOptionError(
                f"flat_optimizer={kind!r} builds the optimizer from the Trainer's; a flatfused "
                f"optimizer ({type(given).__name__}) was passed as optimizers= too: keep one")
        self._flat = kind is not None or given is not None
        if not self._flat:
            return
        if given is not None:
            _check_given_clipping(given, self.args.max_grad_norm)
        _accelerate.check_accelerator(self.accelerator, type(given).__name__ if given is not None
                                      else f"flat_optimizer={kind!r}")

    # ------------------------------------------------------------------ the optimizer

    def create_optimizer(self, model=None):
        if not self._flat:
            return super().create_optimizer(model)
        if _flat_of(self.optimizer) is None:
            opt_model = self.model if model is None else model
            # The Trainer's own choice and groups, or the optimizer passed as optimizers=.
            base = self.optimizer if self.optimizer is not None else \
                super().create_optimizer(model)
            if not isinstance(base, torch.optim.Optimizer):
                raise FlatOptionError(f"flat_optimizer={self.args.flat_optimizer!r} wraps a "
                                      f"torch.optim.Optimizer; the Trainer built "
                                      f"{type(base).__name__}")
            clip = self.args.max_grad_norm if self.args.max_grad_norm > 0 else None
            self.optimizer = make_optimizer(self.args.flat_optimizer, self.args.flat_options(),
                                            base, opt_model, clip)
        if not isinstance(self.optimizer, _accelerate.FlatAcceleratedOptimizer):
            self.optimizer = _accelerate.prepare_optimizer(self.accelerator, self.optimizer)
        return self.optimizer

    # ------------------------------------------------------------------ the step

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Keep the micro-batch for the optimizer step (which runs the Trainer's own
        ``training_step`` over the step's micro-batches in each of its passes); its loss is
        counted when that step returns it."""
        if not self._flat:
            return super().training_step(model, inputs, num_items_in_batch)
        # The step synchronises through the module the Trainer trains (DDP's wrapper).
        self.optimizer.optimizer.model = getattr(model, "_orig_mod", model)
        pass_ = functools.partial(super().training_step, model, inputs, num_items_in_batch)
        # Each micro-batch's loss is already divided by the number of micro-batches (or
        # normalised by the step's item count): the step's loss is their sum.
        self.optimizer.add_micro_batch(pass_, reduce="sum")
        return torch.zeros((), device=self.args.device)

    def _clip_grad_norm(self, model):
        if self._flat:
            return None  # max_grad_norm clips inside the step
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self._flat:
            return None  # before the step there are no gradients of it to measure
        return super()._get_grad_norm(model, grad_norm)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        if self._flat:
            self._count_step_loss(tr_loss)
            # The norm the step clipped (its update direction's, before clipping), as the
            # plain Trainer logs the norm it clipped; none without max_grad_norm.
            flat = _flat_of(self.optimizer)
            grad_norm, flat.last_grad_norm = flat.last_grad_norm, None
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _count_step_loss(self, tr_loss: torch.Tensor) -> None:
        """Add the loss of the step just taken to the Trainer's running loss (in place), with
        the Trainer's filter for a non-finite one."""
        loss, self.optimizer.last_loss = self.optimizer.last_loss, None
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach().to(tr_loss.device, tr_loss.dtype)
        if self.args.logging_nan_inf_filter and not torch.isfinite(loss):
            # The Trainer's filter: the average of the losses logged since the last log.
            tr_loss += tr_loss / max(self.state.global_step - self._globalstep_last_logged, 1)
        else:
            tr_loss += loss

    def log(self, logs, *args, **kwargs):
        if self._flat:
            name = loss_name(_flat_of(self.optimizer))
            for key in ("loss", "train_loss"):
                if key in logs:
                    logs[key.replace("loss", name)] = logs[key]
        return super().log(logs, *args, **kwargs)


def _flat_of(optimizer):
    """The flatfused optimizer in ``optimizer`` (itself, or inside Accelerate's wrapper)."""
    while optimizer is not None and not isinstance(optimizer, FlatOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _check_given_clipping(optimizer: FlatOptimizer, max_grad_norm: float) -> None:
    """A flatfused optimizer passed in: the Trainer's ``max_grad_norm`` becomes its clipping
    when it has none; a different one of its own is refused (two clip norms, one step)."""
    name, own = _clip_norm(optimizer)
    wanted = max_grad_norm if max_grad_norm and max_grad_norm > 0 else None
    if wanted is None or own == wanted:
        return
    if own is None:
        setattr(optimizer, name, float(wanted))
        return
    raise FlatOptionError(
        f"TrainingArguments.max_grad_norm={max_grad_norm} and the optimizer's {name}={own} "
        f"disagree; set one of them (max_grad_norm=0 leaves clipping to the optimizer)")
