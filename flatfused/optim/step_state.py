"""The open step of a flat-minima optimizer, as explicit state that every entry point consults.

A step moves the weights away from the ones it saved (``w0``) and brings them back at its end.
Between those two moments a loop can do anything: raise, ``continue``, load a checkpoint,
freeze a layer. :class:`StepState` records where the step is, so that each entry point can
refuse what would lose ``w0`` and any fault can put the weights back exactly.

Phases (``optimizer.step_phase``):

- ``IDLE``: no step open; the weights are the model's own.
- ``CLEAN_STORED`` (NSO's three-call API): ``store_gradients(store_weights=True)`` saved (or
  will save) ``w0`` and started the accumulator; the weights are still ``w0``.
- ``PERTURBED`` (NSO): the weights are ``w0 + u_k`` or ``w0 - u_k`` (``sign``).
- ``ACCUMULATED`` (NSO): a perturbed pass's gradient went into the accumulator; the weights
  are still where that pass ran.
- ``ASCENDED`` (SAM, Weighted SAM): the weights are at the ascent point ``w + e``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class StepPhase(str, enum.Enum):
    IDLE = "idle"
    CLEAN_STORED = "clean stored"
    PERTURBED = "perturbed"
    ACCUMULATED = "accumulated"
    ASCENDED = "ascended"

    def __str__(self) -> str:
        return self.value


class StepRefused(RuntimeError):
    """A call the open step cannot take; nothing changed and the step can still finish."""


@dataclass
class StepState:
    """Where the current step is. ``sign``: the perturbation the weights carry (+1, -1, or 0 at
    ``w0``); ``w0_saved``: ``w0`` holds the weights to restore (NSO defers the save into its
    first perturbation pass); ``rng_start``: NSO's (next offset, draw offset) at the step's
    start, where an abandoned step rewinds to."""

    phase: StepPhase = StepPhase.IDLE
    sign: int = 0
    w0_saved: bool = False
    rng_start: tuple | None = None

    @property
    def is_open(self) -> bool:
        return self.phase is not StepPhase.IDLE

    @property
    def moved(self) -> bool:
        """Whether the live weights differ from ``w0`` (a fault must restore them)."""
        return self.w0_saved and (self.sign != 0 or self.phase is StepPhase.ASCENDED)

    def close(self) -> None:
        self.phase, self.sign, self.w0_saved, self.rng_start = StepPhase.IDLE, 0, False, None

    def describe(self) -> str:
        where = {1: "w0 + u", -1: "w0 - u"}.get(self.sign, "w0")
        if self.phase is StepPhase.ASCENDED:
            where = "the ascent point w + e"
        return f"a step is open (phase '{self.phase}', weights at {where})"

    def refuse(self, action: str, way_out: str) -> StepRefused:
        """The error for ``action`` during the open step: what is open and how to close it."""
        return StepRefused(f"{action}: {self.describe()}; {way_out}, or call "
                           "optimizer.abandon_step() to put the weights back at w0 and close it")
