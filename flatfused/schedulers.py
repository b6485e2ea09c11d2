"""Schedules for flat-minima training: the knee (explore–exploit) LR schedule and NSO's sigma schedules.

``KneeLRScheduler`` is the explore–exploit schedule of "Wide-minima Density Hypothesis and the
Explore-Exploit Learning Rate Schedule" as a real ``torch.optim.lr_scheduler.LRScheduler``.
``SigmaScheduler`` drives the ``sigma`` of every param group of :class:`flatfused.NSO` with the
"linear" / "exp" schedules of the NSO reference trainer.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["KneeLRScheduler", "SigmaScheduler", "knee_lr", "sigma_schedule"]


def _check_steps(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def knee_lr(t: int, peak_lr: float, warmup_steps: int, explore_steps: int,
            total_steps: int | None) -> float:
    """The knee schedule's learning rate at step ``t`` (counting from 1).

    ``t <= W``: ``peak * t / W``; ``W < t <= W + E``: ``peak``; afterwards the linear decay
    ``max(0, peak - peak / (T - E - W) * (t - W - E))``. ``T = None`` means no decay phase: the
    LR stays at ``peak`` after the warmup. When ``T == W + E`` there is no decay phase either:
    the reference divides by zero there, flatfused returns 0 after step ``T``, as after the end
    of a decay.
    """
    W, E, T = warmup_steps, explore_steps, total_steps
    if t <= W:
        return peak_lr * t / W
    if T is None or t <= W + E:
        return peak_lr
    decay = T - E - W
    if decay <= 0:  # the reference's division by zero: no decay phase, the LR is 0 from here on
        return 0.0
    return max(0.0, peak_lr - peak_lr / decay * (t - W - E))


class KneeLRScheduler(LRScheduler):
    """Knee (explore–exploit) LR schedule, a drop-in for the reference ``KneeLRScheduler``.

    With ``W = warmup_steps``, ``E = explore_steps``, ``T = total_steps`` and ``t`` counting
    from 1 (the constructor sets the LR of ``t = 1``; every ``step()`` increments ``t``):

    * ``t <= W``: linear warmup ``peak_lr * t / W`` (with ``W = 0``: no warmup, ``peak_lr``
      from ``t = 1``);
    * ``W < t <= W + E``: the explore phase at ``peak_lr``;
    * afterwards the exploit phase, a linear decay ``max(0, peak - peak / (T - E - W) * (t - W - E))``
      reaching 0 at ``t = T`` and staying there.

    Example: ``peak_lr=0.1, W=2, E=4, T=10`` gives 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.075, 0.05,
    0.025, 0, 0, ...

    Without ``total_steps`` (the default ``None``) there is no exploit phase: after the warmup
    the LR stays at ``peak_lr`` until the end of training, so ``KneeLRScheduler(opt,
    peak_lr=0.1)`` trains at 0.1 and ``warmup_steps=W`` alone gives a warmup to a constant LR.
    A given ``total_steps`` is the length of the run: the LR is 0 after it, in every case.

    Departures from the reference (documented fixes):

    * it is a ``torch.optim.lr_scheduler.LRScheduler`` (``get_last_lr``, ``state_dict`` /
      ``load_state_dict``, ``last_epoch``, the closed form for ``step(epoch)``); as with every
      torch scheduler, restoring a checkpoint means loading the optimizer's state too (its
      param groups hold the current LR), or calling ``step`` again;
    * ``total_steps`` defaults to ``None`` (no decay), not 0: with the reference's default 0
      its formula divides by zero at the first step when ``W = E = 0`` and otherwise climbs
      above the peak after the explore phase;
    * ``T == W + E`` (no exploit phase) no longer divides by zero: the LR is ``peak_lr`` up to
      step ``T`` and 0 after it, as after the end of a decay;
    * arguments are validated: negative step counts or ``T < W + E`` raise ``ValueError``, and
      so does a ``T`` that would make the LR 0 from the first step (``T = 0``, or ``T = 1``
      without warmup or explore): leave ``total_steps`` unset for no decay.

    ``peak_lr`` may be one number for all param groups or a sequence with one per group. Any
    optimizer works, including wrappers that share a base optimizer's ``param_groups``
    (``flatfused.NSO``): attach the scheduler to either; the LR is written to the shared groups.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr, warmup_steps: int = 0,
                 explore_steps: int = 0, total_steps: int | None = None,
                 last_epoch: int = -1) -> None:
        n_groups = len(optimizer.param_groups)
        if isinstance(peak_lr, (list, tuple)):
            if len(peak_lr) != n_groups:
                raise ValueError(f"peak_lr has {len(peak_lr)} values for {n_groups} param groups")
            peaks = [_check_real("peak_lr", p) for p in peak_lr]
        else:
            peaks = [_check_real("peak_lr", peak_lr)] * n_groups
        self.peak_lrs = peaks
        self.peak_lr = peak_lr if isinstance(peak_lr, (list, tuple)) else peaks[0]
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps)
        self.explore_steps = _check_steps("explore_steps", explore_steps)
        self.total_steps = None if total_steps is None else _check_steps("total_steps", total_steps)
        if self.total_steps is not None:
            W, E, T = self.warmup_steps, self.explore_steps, self.total_steps
            if T < W + E:
                raise ValueError(
                    f"total_steps ({T}) must be >= warmup_steps + explore_steps ({W} + {E}), "
                    "or None (the default) for no decay")
            if W == 0 and E == 0 and T <= 1:  # the decay would reach 0 at or before step 1
                raise ValueError(
                    f"total_steps={T} with warmup_steps=0 and explore_steps=0 trains at LR 0 "
                    "from the first step; pass total_steps=None (the default) for no decay, or "
                    "the run's length in steps (>= 2) for a linear decay to 0")
        super().__init__(optimizer, last_epoch)

    def _lrs_at(self, t: int) -> list[float]:
        return [knee_lr(t, peak, self.warmup_steps, self.explore_steps, self.total_steps)
                for peak in self.peak_lrs]

    def get_lr(self) -> list[float]:
        # last_epoch is 0 after the constructor: t = last_epoch + 1.
        return self._lrs_at(self.last_epoch + 1)

    def _get_closed_form_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch + 1)


def _linspace_at(start: float, stop: float, num: int, i: int) -> float:
    """Element ``i`` of ``numpy.linspace(start, stop, num)`` (float64, same arithmetic)."""
    if num == 1:
        return start
    if i == num - 1:
        return stop
    step = (stop - start) / (num - 1)
    return i * step + start if step != 0 else i / (num - 1) * (stop - start) + start


def sigma_schedule(sigma: float, epochs: int, mode: str, epoch: int) -> float:
    """The NSO trainer's sigma at ``epoch`` (from 0), holding the last value after ``epochs``.

    ``"linear"``: ``linspace(0, sigma, epochs)[epoch]``;
    ``"exp"``: ``exp(linspace(log 1e-5, log sigma, epochs))[epoch]``.
    """
    i = min(max(int(epoch), 0), epochs - 1)
    if mode == "linear":
        return _linspace_at(0.0, sigma, epochs, i)
    if mode == "exp":
        return math.exp(_linspace_at(math.log(1e-5), math.log(sigma), epochs, i))
    raise ValueError(f"mode must be 'linear' or 'exp', got {mode!r}")


class SigmaScheduler:
    """Sets ``group["sigma"]`` of every param group of an NSO optimizer along a schedule.

    ``mode="linear"``: ``linspace(0, sigma, epochs)[t]``; ``mode="exp"``:
    ``exp(linspace(log 1e-5, log sigma, epochs))[t]`` (the NSO reference trainer's schedules),
    with ``t`` the epoch counted from 0: the constructor sets the value of ``t = 0`` and each
    ``step()`` increments ``t``; after ``epochs`` values the last one (``sigma``) is held.
    As in numpy, ``epochs == 1`` gives the start value (0 for "linear", 1e-5 for "exp").

    The API follows torch's LR schedulers: ``step()``, ``get_last_sigma()``, ``last_epoch``,
    ``state_dict()`` / ``load_state_dict()``. ``load_state_dict`` also writes the restored
    epoch's sigma into the param groups (the schedule is a closed form, so this is the value
    the checkpointed optimizer held).

    Raises ``ValueError`` when a param group of ``optimizer`` has no ``"sigma"`` (i.e. it is not
    :class:`flatfused.NSO` or another optimizer whose groups carry a noise scale).
    """

    def __init__(self, optimizer, sigma: float, epochs: int, mode: str = "linear",
                 last_epoch: int = -1) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise TypeError(f"{type(optimizer).__name__} has no param_groups")
        missing = [i for i, g in enumerate(groups) if "sigma" not in g]
        if missing:
            raise ValueError(
                f"SigmaScheduler needs an optimizer whose param groups carry 'sigma' "
                f"(e.g. flatfused.NSO); param_groups {missing} of {type(optimizer).__name__} "
                "have none")
        if mode not in ("linear", "exp"):
            raise ValueError(f"mode must be 'linear' or 'exp', got {mode!r}")
        self.sigma = _check_real("sigma", sigma, positive=(mode == "exp"))
        self.epochs = _check_steps("epochs", epochs)
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an int >= -1, got {last_epoch!r}")
        self.optimizer = optimizer
        self.mode = mode
        self.last_epoch = int(last_epoch)
        self.step()

    def get_sigma(self) -> float:
        """The schedule's sigma at ``last_epoch``."""
        return sigma_schedule(self.sigma, self.epochs, self.mode, self.last_epoch)

    def _apply(self) -> None:
        value = self.get_sigma()
        for group in self.optimizer.param_groups:
            group["sigma"] = value
        self._last_sigma = [group["sigma"] for group in self.optimizer.param_groups]

    def step(self) -> None:
        """Advance one epoch and write the new sigma into every param group."""
        self.last_epoch += 1
        self._apply()

    def get_last_sigma(self) -> list[float]:
        """The sigma last written, one per param group."""
        return list(self._last_sigma)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        self._apply()
