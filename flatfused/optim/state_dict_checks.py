"""Validation of a checkpoint before a flat-minima optimizer loads it.

``load_state_dict`` checks everything here first and applies nothing until all of it passed,
so a foreign or corrupted checkpoint is refused with a message naming the field and what was
expected, and a refused load changes nothing. The checks cover the wrapper's own section
(``'flatfused'``), the structure torch's ``Optimizer.load_state_dict`` relies on, the base
optimizer's hyperparameters, and the per-parameter state the fused SGD/Adam updates read.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Callable

import torch

from .base_step import fused_kind

# 1: no 'optimizer' entry; 2: the wrapper's kind is recorded.
FORMAT_VERSION = 2
_U64 = 1 << 64


def split_state_dict(state_dict) -> tuple[dict, dict | None]:
    """(the base optimizer's part, with copies of its groups; the wrapper's section or None).
    The section is at the top level or, where a tool kept only 'state' and 'param_groups'
    (``torch.distributed.checkpoint``), in each group."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    sd = dict(state_dict)
    extra = sd.pop("flatfused", None)
    groups = sd.get("param_groups")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError("state_dict['param_groups'] must be a list of dicts (a state_dict() of "
                         f"an optimizer), got {type(groups).__name__}")
    groups = [dict(g) for g in groups]
    for group in groups:
        saved = group.pop("flatfused", None)
        extra = saved if extra is None else extra
    sd["param_groups"] = groups
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"state_dict['flatfused'] must be a dict, got {type(extra).__name__}")
    return sd, None if extra is None else dict(extra)


def _kind_of_version_1(extra: dict, groups: list[dict]) -> str | None:
    """The optimizer that wrote a format-1 checkpoint, which did not record it."""
    if "seed" in extra:
        return "NSO"
    if any("sam_eps" in g for g in groups):
        return "WeightedSAM"
    if any("rho" in g or "sam_rho" in g for g in groups):
        return "SAM"
    return None


def check_extra_header(extra: dict, groups: list[dict], kind: str) -> None:
    version = extra.get("version")
    if isinstance(version, bool) or not isinstance(version, numbers.Integral):
        raise ValueError(f"state_dict['flatfused']['version'] must be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"state_dict['flatfused']['version'] is {version}: a checkpoint of a "
                         f"newer flatfused (this one reads versions 1 to {FORMAT_VERSION})")
    if version < 1:
        raise ValueError(f"state_dict['flatfused']['version'] must be >= 1, got {version}")
    written_by = extra.get("optimizer") if version >= 2 else _kind_of_version_1(extra, groups)
    if version >= 2 and not isinstance(written_by, str):
        raise ValueError("state_dict['flatfused']['optimizer'] must name the optimizer that "
                         f"wrote the checkpoint, got {written_by!r}")
    if written_by is not None and written_by != kind:
        raise ValueError(f"this checkpoint was written by flatfused.{written_by}; it cannot be "
                         f"loaded into flatfused.{kind} (its state means something else there)")


def check_schedule_state(extra: dict, buffer_numels: list[int]) -> None:
    """The cheap schedule's clock and, when saved, LookSAM's reused direction per flat buffer."""
    if "steps" in extra:
        steps = extra["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"state_dict['flatfused']['steps'] must be an int >= 0, got "
                             f"{steps!r}")
    reused = extra.get("reuse_direction")
    if reused is not None:
        if not isinstance(reused, (list, tuple)) or len(reused) != len(buffer_numels) or not all(
                isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == n
                for t, n in zip(reused, buffer_numels)):
            raise ValueError("state_dict['flatfused']['reuse_direction'] must hold one flat "
                             f"tensor per flat buffer, of {buffer_numels} elements")


def unsigned_64(where: str, value, optional: bool = False) -> None:
    """An integer in [0, 2**64): a Philox seed or counter offset."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where} must be an int in [0, 2**64), got {value!r}")
    if not 0 <= int(value) < _U64:
        raise ValueError(f"{where} must be in [0, 2**64), got {value}")


def _number(where: str, value, low: float = 0.0, high: float = math.inf,
            high_open: bool = False) -> None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low <= value and (value < high if high_open
                                                       else value <= high)):
        interval = f"[{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{where} must be a finite number in {interval}, got {value!r}")


def _check_step(where: str, value) -> None:
    """A step count: torch keeps it as a float tensor, which must hold a whole number >= 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where} must be a scalar step count, got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    _number(where, value)
    if float(value) != math.floor(float(value)):
        raise ValueError(f"{where} must be a whole number of steps, got {value!r}")


# The base optimizers' hyperparameters a corrupted checkpoint must not smuggle in.
_GROUP_NUMBERS = {"lr": (0.0, math.inf), "momentum": (0.0, math.inf),
                  "dampening": (0.0, math.inf), "weight_decay": (0.0, math.inf),
                  "eps": (0.0, math.inf)}


def _check_group_numbers(group: dict, where: str) -> None:
    for key, (low, high) in _GROUP_NUMBERS.items():
        if key in group:
            _number(f"{where}['{key}']", group[key], low, high)
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"{where}['betas'] must be a pair of numbers, got {betas!r}")
        for i, beta in enumerate(betas):
            _number(f"{where}['betas'][{i}]", beta, 0.0, 1.0, high_open=True)


def _fused_state_names(kind: str, group: dict) -> tuple[str, ...]:
    if kind == "sgd":
        return ("momentum_buffer",)
    return ("exp_avg", "exp_avg_sq", "step")


def check_base_state(base: torch.optim.Optimizer, sd: dict,
                     check_group_entries: Callable[[dict, str], None]) -> None:
    """The structure torch's ``load_state_dict`` maps onto the live parameters, the groups'
    numbers (the wrapper's own through ``check_group_entries``), and each parameter's state:
    step counts everywhere, and for the fused SGD/Adam/AdamW updates the tensors they read."""
    state = sd.get("state")
    if not isinstance(state, Mapping):
        raise ValueError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
    saved_groups, live_groups = sd["param_groups"], base.param_groups
    if len(saved_groups) != len(live_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, the optimizer "
                         f"{len(live_groups)}")
    param_of: dict = {}
    for gi, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        where = f"state_dict['param_groups'][{gi}]"
        ids = saved.get("params")
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"{where}['params'] must be a list of parameter ids")
        if len(ids) != len(live["params"]):
            raise ValueError(f"{where} has {len(ids)} parameters, the optimizer's group "
                             f"{len(live['params'])}")
        for pid, p in zip(ids, live["params"]):
            if pid in param_of:
                raise ValueError(f"{where}['params'] repeats parameter id {pid!r}")
            param_of[pid] = (p, saved)
        _check_group_numbers(saved, where)
        check_group_entries(saved, where)
    kind = fused_kind(base)
    for pid, entry in state.items():
        where = f"state_dict['state'][{pid!r}]"
        if pid not in param_of:
            raise ValueError(f"{where} belongs to no parameter of the checkpoint's param groups")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
        p, group = param_of[pid]
        if "step" in entry:
            _check_step(f"{where}['step']", entry["step"])
        if kind is None or not entry:
            continue
        names = _fused_state_names(kind, group)
        for name in names:
            value = entry.get(name, _MISSING)
            if value is _MISSING:
                raise ValueError(
                    f"{where} lacks '{name}', which torch.optim.{type(base).__name__} keeps for "
                    f"every parameter it stepped (a checkpoint of another base optimizer?)")
            if name == "step" or (value is None and name == "momentum_buffer"):
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"{where}['{name}'] must be a floating-point tensor, got "
                                 f"{type(value).__name__}")
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{where}['{name}'] has shape {tuple(value.shape)}, its "
                                 f"parameter {tuple(p.shape)}")


_MISSING = object()
