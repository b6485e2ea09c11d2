"""What the flat-minima wrappers share: a base optimizer, flat buffers, gradients and checkpoints.

A wrapper (NSO, SAM, ...) owns no update rule of its own: it runs extra passes around a base
``torch.optim`` optimizer whose ``param_groups`` (and ``state``) it shares, as the published
references do. This class builds that base (from a class and keyword arguments, or takes an
instance), flattens the parameters into buffers, resolves the backend per buffer, keeps the
buffers valid before every kernel, and checkpoints the base optimizer's state together with the
wrapper's own (``_extra_state``).
"""
from __future__ import annotations

import warnings

import torch

from .. import backends as _backends
from .. import ops
from .. import distributed as _dist
from ..bn import disable_running_stats, enable_running_stats
from ..flat import FlatBuffer, build_flat_buffers
from . import state_dict_checks as _checks
from .base_step import BaseStep
from .cheap_steps import CheapSteps
from .direction import Direction
from .entry_point import entry_point
from .param_filter import _param_filter
from .pass_watch import _PassWatch
from .schedules import Schedule
from .step_state import StepPhase, StepState
from .validate import check_loss


class FlatOptimizer(CheapSteps, Direction, torch.optim.Optimizer):
    # torch.amp.GradScaler hands the scale to step() instead of unscaling first (see amp.py).
    _step_supports_amp_scaling = True

    def __init__(self, params, base_optimizer, defaults: dict, *, model=None, backend="auto",
                 base_kwargs: dict | None = None, schedule: Schedule | None = None,
                 param_filter=None):
        base_kwargs = base_kwargs or {}
        self._param_filter = _param_filter(param_filter)
        self._unperturbed: frozenset = frozenset()  # (group, index) positions; see _build
        self.schedule = schedule or Schedule()
        self._steps_taken = 0  # completed steps (full or cheap): the schedule's clock
        if backend not in _backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {_backends.BACKENDS}")
        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
            params = params.parameters()
        self.model = model
        self.backend = backend
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(
                    f"keyword arguments {sorted(base_kwargs)} configure a base optimizer class; "
                    "an optimizer instance was given, configure it directly")
            if params is not None:
                given = {id(p) for g in _as_groups(params) for p in g["params"]}
                owned = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError("params differ from the base optimizer instance's parameters; "
                                     "pass params=None to use the instance's")
            super().__init__(base_optimizer.param_groups, dict(defaults))
            self.base_optimizer = base_optimizer
        else:
            if not (isinstance(base_optimizer, type)
                    and issubclass(base_optimizer, torch.optim.Optimizer)):
                raise TypeError("base_optimizer must be a torch.optim.Optimizer class or instance, "
                                f"got {base_optimizer!r}")
            super().__init__(params, dict(defaults, **base_kwargs))
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # The base's defaults too: schedulers read the wrapper's (OneCycleLR looks for
        # 'momentum' or 'betas').
        for key, value in self.base_optimizer.defaults.items():
            self.defaults.setdefault(key, value)
        self._in_step = False
        self.last_grad_norm: torch.Tensor | None = None  # the last clipped step's norm
        self._step = StepState()
        self._calls = 0
        self._link_base()
        self._build()

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults, state and param_groups: enough for its
        # own optimizers, but a wrapper would lose its base optimizer, flat buffers and RNG.
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def model(self) -> torch.nn.Module | None:
        """The module whose passes ``step(closure)`` runs: its BatchNorm layers are frozen in the
        perturbed passes, and a DDP/FSDP2 wrapper's synchronisation is skipped where the sum of
        the passes is averaged once. Settable, e.g. to the wrapped module after wrapping."""
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module | None) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self._model = model

    # ------------------------------------------------------------------ layout

    def _link_base(self) -> None:
        """Share the base optimizer's param groups and state (again, after it loaded a state dict)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._base_step = BaseStep(self.base_optimizer, owner=self)
        self._check_groups()

    def _check_groups(self) -> None:
        """Validate the wrapper's own entries of every param group (subclasses)."""

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group through the base optimizer's ``add_param_group``, so that it gets
        the base optimizer's defaults (``momentum``, ``betas``, ...) and checks, as well as the
        wrapper's own (``sigma``, ``rho``, ...). Its parameters are flattened at the next step.
        (The published wrappers inherit ``Optimizer.add_param_group``, which fills in only the
        wrapper's defaults, so their base step fails on the new group.)"""
        if not hasattr(self, "base_optimizer"):  # Optimizer.__init__ adding the first groups
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if self._step.is_open:
            raise self._step.refuse("add_param_group", "finish the step first (its flat buffers "
                                    "cannot change under it)")
        group = dict(param_group)
        for name, value in self.defaults.items():
            group.setdefault(name, value)
        self.base_optimizer.add_param_group(group)
        try:
            self._check_groups()
        except Exception:
            # The shared list (the base optimizer's): a refused group leaves no trace.
            self.param_groups[:] = [g for g in self.param_groups if g is not group]
            raise

    def _layout_key(self):
        """What the flat layout depends on: the groups, their parameters, and which of those are
        trained (freezing or unfreezing a parameter between steps flattens again)."""
        return tuple((id(g), len(g["params"]), tuple(p.requires_grad for p in g["params"]))
                     for g in self.param_groups)

    def _build(self) -> None:
        for gi, group in enumerate(self.param_groups):
            devices = {p.device for p in group["params"] if p.requires_grad}
            if len(devices) > 1:
                raise ValueError(f"param group {gi} mixes devices {sorted(map(str, devices))}; "
                                 "put parameters of different devices in different param groups")
            if any(p.is_sparse for p in group["params"]):
                raise ValueError("flatfused optimizers do not support sparse parameters")
        before = [p for buf in getattr(self, "_buffers", ()) for p in buf.params]
        for buf in getattr(self, "_buffers", ()):
            buf.remove_hooks()
        if self._param_filter is not None:
            # Positions, not objects: they survive copies and pickles of model and optimizer.
            self._unperturbed = frozenset(
                (gi, pi) for gi, group in enumerate(self.param_groups)
                for pi, p in enumerate(group["params"]) if not self._param_filter(p))
            if not getattr(self._param_filter, "keep", False):
                self._param_filter = None  # an iterable names these parameters only
        self._buffers, self._numel = build_flat_buffers(self.param_groups,
                                                        unperturbed=self._unperturbed)
        kept = {id(p) for buf in self._buffers for p in buf.params}
        for p in before:
            if id(p) not in kept:  # frozen since the last build: not perturbed, not updated
                p.grad = None
        self._backends = [self._resolve_backend(b) for b in self._buffers]
        self._layout = self._layout_key()
        self._base_step.init_state(self._buffers)
        self._on_build()

    def _on_build(self) -> None:
        """Reset what depends on the flat layout (subclasses)."""

    def _prepare(self, grads: bool = True) -> None:
        """Check that flat buffers still back every parameter (and gradient) before a kernel."""
        if self._layout != self._layout_key():
            if self._step.is_open:
                self._abandon_step()
                raise RuntimeError(
                    "the trained parameters changed during an open step (a parameter frozen or "
                    "unfrozen with requires_grad_, or a param group added to param_groups "
                    "directly); the weights were put back at w0 and the step abandoned: change "
                    "them between steps")
            self._build()  # a param group was added: flatten again (state is re-adopted lazily)
        for buf in self._buffers:
            buf.check_params()
            if grads:
                buf.check_grads()

    @property
    def flat_buffers(self) -> list[FlatBuffer]:
        return self._buffers

    @property
    def backends(self) -> list[str]:
        """The concrete backend of each flat buffer."""
        return list(self._backends)

    # ------------------------------------------------------------------ the open step

    @property
    def step_phase(self) -> StepPhase:
        """Where the current step is (:class:`flatfused.optim.step_state.StepPhase`):
        ``IDLE`` between steps."""
        return self._step.phase

    @torch.no_grad()
    def abandon_step(self) -> None:
        """Close the open step without taking it: the weights go back to ``w0`` exactly, the
        base optimizer is not stepped and NSO's RNG returns to where the step began (the next
        step draws that noise). Nothing to do between steps. The way out of a step a loop left
        open (an exception between the three calls, a ``continue``), before starting another
        or loading a checkpoint."""
        if self._step.is_open:
            self._abandon_step()

    @torch.no_grad()
    def _abandon_step(self) -> None:
        if self._step.moved:
            self._restore_weights()
        self._on_abandon()
        self._step.close()

    def _on_abandon(self) -> None:
        """Undo the open step's own bookkeeping (subclasses: RNG position, watches)."""

    def _step_done(self) -> None:
        """Close the step that completed (its base update applied) and count it."""
        self._step.close()
        self._steps_taken += 1


    @property
    def _moved_buffers(self) -> list:
        """The buffers a step moves (all, unless a param_filter leaves some out)."""
        return [buf for buf in self._buffers if buf.perturbed]

    @torch.no_grad()
    def _restore_weights(self) -> None:
        """Put back the weights saved in ``w0``."""
        for buf in self._moved_buffers:
            buf.data.copy_(buf.state["w0"])

    # ------------------------------------------------------------------ mixed precision

    def _drop_amp_attributes(self) -> None:
        """After a step that raised: ``GradScaler.step`` sets ``grad_scale`` and ``found_inf`` on
        the optimizer and deletes them only when the step returns; left behind, a later step
        without a scaler would still unscale by them."""
        for name in ("grad_scale", "found_inf"):
            self.__dict__.pop(name, None)

    # ------------------------------------------------------------------ gradients

    @entry_point
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place (the NSO reference's behaviour; SAM and Weighted SAM
        default to ``set_to_none=True``, as torch and their references); ignored inside
        ``step(closure)``. As torch's: every gradient is zeroed whatever wrote it, and with
        ``set_to_none`` a ``.grad`` tensor kept by the caller keeps its values and is no longer
        the parameter's."""
        if self._in_step:
            return
        self._prepare(grads=False)  # a moved or cast model: the clear error, before any kernel
        self._zero_flat_grads(set_to_none)

    def _zero_flat_grads(self, set_to_none: bool = False) -> None:
        """Zero the flat gradient buffers; ``set_to_none``: and make every ``.grad`` None (the
        slots stay the next backward's, see FlatBuffer.release_grads, unless someone kept a
        ``.grad``: that buffer is then left to them and replaced)."""
        shared = self._shared_grads() if set_to_none else None
        for i, (buf, backend) in enumerate(zip(self._buffers, self._backends)):
            buf.check_grads()
            if not (shared and shared[i]) and not buf.grad_is_zero():
                ops.kernel("zero_", backend)(grad=buf.grad)
                buf.mark_grad_zero()
        if set_to_none:
            self._release_grads(shared)

    def _shared_grads(self) -> list[bool]:
        """Per buffer, whether a ``.grad`` (or a view of one) is held outside the optimizer
        (FlatBuffer.grad_is_shared); sharded buffers never are (FSDP2 gives new gradients)."""
        return [not buf.sharded and buf.grad_is_shared() for buf in self._buffers]

    def _release_grads(self, shared: list[bool] | None = None) -> None:
        """Every ``.grad`` None over zeroed flat gradient buffers (FlatBuffer.release_grads); a
        buffer marked in ``shared`` (not zeroed) gets a fresh one instead, its memory left to
        whoever holds it."""
        for i, buf in enumerate(self._buffers):
            if buf.sharded:  # FSDP2 reduce-scatters into a new gradient: none to keep
                for p in buf.params:
                    p.grad = None
            else:
                buf.release_grads()
                if shared and shared[i]:
                    buf.replace_grad()

    def _resolve_backend(self, buf) -> str:
        """The concrete backend of one flat buffer. The compiled kernels take fp32, bf16 and
        fp16; float64 parameters run on the torch backend (float64 arithmetic), which ``auto``
        picks for them."""
        if buf.dtype not in ops.FLOAT_DTYPES:
            if buf.dtype != torch.float64:
                raise TypeError(f"flatfused optimizers take floating-point parameters (float32, "
                                f"bfloat16, float16; float64 on the torch backend), got "
                                f"{buf.dtype}")
            if self.backend == "auto":
                return _backends.resolve("torch", buf.device)
            if self.backend != "torch":
                raise TypeError(f"backend {self.backend!r} takes float32, bfloat16 and float16 "
                                f"parameters; float64 ones run on backend='torch' (which "
                                f"backend='auto' picks for them)")
        return _backends.resolve(self.backend, buf.device)

    def _pass(self, closure, bn_stats: bool = True, watch: "_PassWatch | None" = None,
              restart: bool = False):
        """Run one forward-backward pass of a step; ``bn_stats=False`` freezes BatchNorm running
        statistics (perturbed passes). Gradients replaced by the pass are gathered back.
        ``watch``: a :class:`_PassWatch` open for the pass (closed here). ``restart``: the pass
        adds to the gradients from before the step, and one the closure sets to None starts
        from zero, as outside a step (else it keeps the step's earlier passes' sum)."""
        self._in_step = True
        # Evaluated here, inside the caller's no_sync() if any (see FlatBuffer.check_grads).
        synced = _dist.ddp_syncs_now(self.model)
        for buf in self._buffers:
            buf.begin_pass(restart)
        try:
            try:
                loss = check_loss(self._closure_with_bn_stats(closure, bn_stats))
            finally:
                self._in_step = False
                for buf in self._buffers:
                    buf.end_closure()
                if watch is not None:
                    watch.close()
            for buf in self._buffers:
                buf.check_grads(accumulate=not restart, synced=synced)
        finally:
            for buf in self._buffers:
                buf.end_pass()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def _can_watch_passes(self) -> bool:
        """Whether a :class:`_PassWatch` tells which parameters a pass gives a gradient and
        whether the closure wrote ``.grad`` in place: one process (a DDP reducer writes the
        gradients back itself, and across ranks a gradient missing here may exist elsewhere)
        and unsharded buffers."""
        return (bool(self._buffers) and _dist.world_size() == 1
                and not any(buf.sharded for buf in self._buffers))

    def _closure_with_bn_stats(self, closure, bn_stats: bool):
        if self.model is None or bn_stats:
            return closure()
        disable_running_stats(self.model)
        try:
            return closure()
        finally:
            enable_running_stats(self.model)

    # ------------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict:
        """The wrapper's own state, saved under ``'flatfused'`` (subclasses)."""
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        """Restore :meth:`_extra_state` (subclasses)."""

    checkpoint_kind = "FlatOptimizer"  # the 'optimizer' entry of the checkpoint (subclasses)

    def _check_extra_state(self, extra: dict) -> None:
        """Validate a checkpoint's :meth:`_extra_state` before anything is loaded (subclasses
        check their own fields)."""

    def _check_group_entries(self, group: dict, where: str) -> None:
        """Validate the wrapper's own entries of a loaded param group (subclasses)."""

    @entry_point
    def state_dict(self) -> dict:
        """The base optimizer's state dict plus the wrapper's own state under ``'flatfused'``,
        at the top level and in each saved param group: tools that keep only ``'state'`` and
        ``'param_groups'`` (``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``)
        carry it in the groups. The live param groups are not touched."""
        if self._step.moved:
            warnings.warn(f"{type(self).__name__}.state_dict() while {self._step.describe()}: "
                          "a checkpoint of the model taken now holds the moved weights, not "
                          "w0; save between steps", RuntimeWarning, stacklevel=3)
        sd = self.base_optimizer.state_dict()
        extra = {"version": _checks.FORMAT_VERSION, "optimizer": self.checkpoint_kind,
                 "steps": self._steps_taken, "schedule": self.schedule.state(),
                 **self._extra_state()}
        for group in sd["param_groups"]:  # copies made by state_dict()
            group["flatfused"] = dict(extra)
        if self._has_reused():
            # At the top level only: a flat tensor per buffer has no place among param groups.
            extra["reuse_direction"] = [buf.state["gv"].clone() for buf in self._buffers]
        sd["flatfused"] = extra
        return sd

    @entry_point
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``; re-links the base optimizer's param groups.

        Everything is validated before anything is applied: a foreign checkpoint (another
        flatfused optimizer's, another base optimizer's state), a corrupted field or one from
        a newer flatfused is refused with an error naming the field, and a refused load changes
        nothing. A checkpoint of the bare base optimizer (no ``'flatfused'`` section) loads as
        the base optimizer's state. Refused while a step is open (see ``abandon_step``)."""
        if self._step.is_open:
            raise self._step.refuse("load_state_dict", "finish the step first")
        sd, extra = _checks.split_state_dict(state_dict)
        if extra is not None:
            _checks.check_extra_header(extra, sd["param_groups"], self.checkpoint_kind)
            _checks.check_schedule_state(extra, [buf.numel for buf in self._buffers])
            self._check_extra_state(extra)
        _checks.check_base_state(self.base_optimizer, sd, self._check_group_entries)
        saved_base, saved_self = self.base_optimizer.__dict__.copy(), self.__dict__.copy()
        try:
            self.base_optimizer.load_state_dict(sd)
            self._link_base()
            self._build()
            if extra is not None:
                self._steps_taken = int(extra.get("steps", 0))
                for buf, gv in zip(self._buffers, extra.get("reuse_direction") or ()):
                    buf.state_buffer("gv", torch.float32).copy_(gv)
                self._reused_norm = None
                self._load_extra_state(extra)
        except BaseException:
            # What validation could not foresee: the optimizer as it was, flattened again.
            self.base_optimizer.__dict__.clear()
            self.base_optimizer.__dict__.update(saved_base)
            self.__dict__.update(saved_self)
            self._link_base()
            self._build()
            raise


def _as_groups(params):
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    return [{"params": params}]
