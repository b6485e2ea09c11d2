"""Cheaper schedules: the flat-minima step on some steps only, a plain base step on the others.

Every flat-minima step costs at least two forward-backward passes. A :class:`Schedule` makes
``step(closure)`` take the full step only on some steps and a *cheap* step otherwise: one pass
at the current weights (one gradient synchronisation under DDP/FSDP2) and the base optimizer's
update with that gradient.

- ``every=k``: the full step on every k-th step (``k = 1``: every step, the plain optimizer).
- ``window=(start, stop)``: full steps only while ``start <= t < stop`` (``t`` counts the
  optimizer's completed steps from 0; ``stop=None`` for no end), cheap plain steps outside, e.g.
  the flat-minima phase in the last 30% of training only.
- ``reuse=alpha``: gradient reuse in the manner of LookSAM (Liu et al., 2022). Each full step
  keeps the component of its flat-minima gradient ``g_s`` orthogonal to the clean gradient
  ``g``, ``g_v = g_s - (<g_s, g> / |g|^2) g``; each cheap step inside the window then updates
  with ``g + alpha * (|g| / |g_v|) * g_v`` instead of ``g``. One more copy of the weights (``g_v``);
  NSO runs its clean pass on full steps for ``g`` even with ``lam == 0``.

The schedule applies to ``step(closure)``; the reference APIs' explicit calls (NSO's
``store_gradients``/``first_step``/``second_step``, SAM's and WSAM's ``first_step``/
``second_step``) are the caller's own schedule and refuse to run under a non-plain one.

Scaling the radius with ``k`` (:func:`radius_for_every`): a full step every ``k`` steps applies
the flatness penalty ``1/k`` of the time. To first order SAM's penalty is ``rho |grad L|``
(linear in ``rho``) and NSO's is ``sigma^2 tr(H) / 2`` (quadratic in ``sigma``), so keeping the
time-averaged penalty means ``rho * k`` and ``sigma * sqrt(k)``. It is a heuristic: larger radii
leave the regime where those expansions hold; docs/schedules.md reports what it does.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    every: int = 1
    window: tuple[int, int | None] | None = None
    reuse: float | None = None

    @classmethod
    def build(cls, every=1, window=None, reuse=None) -> "Schedule":
        """Validated: ``every`` an int >= 1, ``window`` None or (start >= 0, stop > start or
        None), ``reuse`` None or a finite number >= 0."""
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if window is not None:
            if not isinstance(window, (tuple, list)) or len(window) != 2:
                raise ValueError(f"window must be (start, stop) in steps, got {window!r}")
            start, stop = window
            if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
                raise ValueError(f"window's start must be an int >= 0, got {start!r}")
            if stop is not None and (isinstance(stop, bool) or not isinstance(
                    stop, numbers.Integral) or stop <= start):
                raise ValueError(f"window's stop must be None or an int > start, got {stop!r}")
            window = (int(start), None if stop is None else int(stop))
        if reuse is not None:
            if isinstance(reuse, (bool, str)) or not isinstance(reuse, numbers.Real) \
                    or not math.isfinite(float(reuse)) or float(reuse) < 0:
                raise ValueError(f"reuse (LookSAM's alpha) must be None or a finite number "
                                 f">= 0, got {reuse!r}")
            reuse = float(reuse)
        return cls(int(every), window, reuse)

    @property
    def plain(self) -> bool:
        """A full step on every step: the optimizer as published."""
        return self.every == 1 and self.window is None and self.reuse is None

    def in_window(self, t: int) -> bool:
        start, stop = self.window or (0, None)
        return t >= start and (stop is None or t < stop)

    def full_step(self, t: int) -> bool:
        """Whether step ``t`` (completed steps so far) is a full flat-minima step."""
        if not self.in_window(t):
            return False
        return (t - (self.window or (0, None))[0]) % self.every == 0

    def reuses(self, t: int) -> bool:
        """Whether cheap step ``t`` adds the reused component."""
        return self.reuse is not None and self.in_window(t)

    def state(self) -> dict:
        return {"every": self.every, "window": None if self.window is None else list(self.window),
                "reuse": self.reuse}


def radius_for_every(radius: float, every: int, kind: str) -> float:
    """The radius that keeps the time-averaged flatness penalty of a full step on every step
    when the full step runs every ``every`` steps: ``rho * every`` for SAM/ASAM/WSAM
    (``kind="sam"``), ``sigma * sqrt(every)`` for NSO (``kind="nso"``); see the module doc."""
    every = Schedule.build(every=every).every
    if kind == "sam":
        return float(radius) * every
    if kind == "nso":
        return float(radius) * math.sqrt(every)
    raise ValueError(f"kind must be 'sam' or 'nso', got {kind!r}")
