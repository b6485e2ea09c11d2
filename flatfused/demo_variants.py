"""The optimizers ``flatfused demo`` compares, and their step counts at matched compute.

Every optimizer gets the same budget of forward-backward passes: the passes of full SAM or NSO
(K=1, ``use_neg``, ``lam=0``: two per step) over ``epochs`` epochs. A cheap schedule
(:mod:`flatfused.optim.schedules`) makes fewer passes per step, so it takes more steps within
that budget: the most steps whose passes do not exceed it. Passes per step: SGD and a cheap
step 1; a full SAM step 2, and with reuse still 2 (its first pass is the clean gradient LookSAM
keeps); a full NSO step 2, with reuse 3 (the clean pass runs too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import NSO, SAM
from .optim.schedules import Schedule, radius_for_every

FAMILIES = ("sgd", "sam", "nso")


@dataclass(frozen=True)
class Variant:
    """One row of the demo: an optimizer family and its schedule. ``late``: the full step only
    in that final fraction of the optimizer's own steps; ``scaled``: the radius from
    :func:`radius_for_every` instead of the full optimizer's."""
    name: str
    family: str
    every: bool = False
    reuse: bool = False
    late: bool = False
    scaled: bool = False

    @property
    def cheap(self) -> bool:
        return self.every or self.late

    def label(self, cfg) -> str:
        if self.family == "sgd":
            return "SGD"
        text = self.family.upper()
        if self.every:
            text += f" every {cfg.every}"
        if self.reuse:
            text += f" + reuse {cfg.reuse:g}"
        if self.late:
            text += f" last {100 * cfg.late:g}%"
        if self.scaled:
            text += f", {self.radius_name} x{_factor(self.family, cfg.every)}"
        return text

    @property
    def radius_name(self) -> str:
        return "rho" if self.family == "sam" else "sigma"

    def radius(self, cfg) -> float | None:
        """SAM's rho or NSO's sigma (None for SGD)."""
        if self.family == "sgd":
            return None
        radius = cfg.rho if self.family == "sam" else cfg.sigma
        return radius_for_every(radius, cfg.every, self.family) if self.scaled else radius

    def schedule(self, cfg, steps: int) -> Schedule:
        """The schedule over ``steps`` steps: every ``cfg.every``-th step full, or the full step
        on every step of the last ``cfg.late`` fraction (a window that ends with training)."""
        window = (steps - round(cfg.late * steps), None) if self.late else None
        return Schedule.build(every=cfg.every if self.every else 1, window=window,
                              reuse=cfg.reuse if self.reuse else None)

    def full_passes(self) -> int:
        """Forward-backward passes of one full step."""
        if self.family == "sgd":
            return 1
        return 3 if self.family == "nso" and self.reuse else 2


def _factor(family: str, every: int) -> str:
    return f" {every}" if family == "sam" else f" sqrt({every})"


def _variants() -> tuple[Variant, ...]:
    out = [Variant("sgd", "sgd"), Variant("sam", "sam"), Variant("nso", "nso")]
    for family in ("sam", "nso"):
        out += [Variant(f"{family}-every", family, every=True),
                Variant(f"{family}-every-reuse", family, every=True, reuse=True),
                Variant(f"{family}-late", family, late=True)]
    for family in ("sam", "nso"):
        out += [Variant(f"{family}-every-scaled", family, every=True, scaled=True),
                Variant(f"{family}-every-reuse-scaled", family, every=True, reuse=True,
                        scaled=True)]
    return tuple(out)


VARIANTS = {v.name: v for v in _variants()}
NAMES = tuple(VARIANTS)


def full_steps(schedule: Schedule, steps: int) -> int:
    """How many of ``steps`` steps are full under ``schedule``: the count of
    ``Schedule.full_step`` (what the optimizer decides by) in closed form, for the bisection."""
    start, stop = schedule.window or (0, None)
    end = steps if stop is None else min(stop, steps)
    return 0 if end <= start else math.ceil((end - start) / schedule.every)


def budget(cfg) -> int:
    """The passes every optimizer gets: full SAM's or NSO's over ``cfg.epochs`` epochs."""
    return 2 * cfg.epochs * math.ceil(cfg.n_train / cfg.batch_size)


def planned_passes(variant: Variant, cfg, steps: int) -> int:
    if variant.family == "sgd":
        return steps
    if not variant.cheap:
        return variant.full_passes() * steps
    return steps + (variant.full_passes() - 1) * full_steps(variant.schedule(cfg, steps), steps)


def plan(variant: Variant, cfg) -> tuple[int, int]:
    """(steps, batch size) of ``variant`` at the matched budget."""
    if variant.family == "sgd":
        # SGD runs twice the epochs either way, so its example-gradients match the two-pass
        # optimizers' exactly even when the batch does not divide the training set.
        batch = cfg.batch_size if cfg.sgd_match == "steps" else 2 * cfg.batch_size
        return 2 * cfg.epochs * math.ceil(cfg.n_train / batch), batch
    if not variant.cheap:
        return cfg.epochs * math.ceil(cfg.n_train / cfg.batch_size), cfg.batch_size
    # planned_passes grows with the step count (each step adds one pass or a full step's), so
    # the largest count within the budget is found by bisection.
    total = budget(cfg)
    lo, hi = 1, total  # at least one pass per step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if planned_passes(variant, cfg, mid) <= total:
            lo = mid
        else:
            hi = mid - 1
    return lo, cfg.batch_size


def build(variant: Variant, cfg, model: torch.nn.Module, steps: int, seed: int):
    """The optimizer of ``variant`` over ``model``, on SGD with the demo's settings."""
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if variant.family == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    sched = variant.schedule(cfg, steps)
    kw = dict(every=sched.every, window=sched.window, reuse=sched.reuse)
    if variant.family == "sam":
        return SAM(model, torch.optim.SGD, rho=variant.radius(cfg), **kw, **base)
    return NSO(model, torch.optim.SGD, sigma=variant.radius(cfg), num_perturbs=1, lam=0.0,
               use_neg=True, seed=seed, **kw, **base)
