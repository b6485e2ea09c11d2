"""The flatfused options the integrations share (the open_clip launcher's flags, the HF
Trainer's fields): their owners, defaults and checks, and the optimizer they build.

One table, so that a new option (the cheap schedules' ``flat_every`` and friends) is added
once: the open_clip launcher spells each key as a flag (``--nso-sigma``), the Trainer as a
field (``nso_sigma``); ``name_of`` turns a key into what the user wrote.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

import flatfused
from flatfused.optim.schedules import Schedule

OPTIMIZERS = ("nso", "sam", "asam", "wsam")
DISTRIBUTIONS = ("normal", "laplace", "uniform", "binomial", "cauchy")
PERTURB = ("all", "norm")

# Which optimizer each option belongs to.
OWNERS = {
    "nso_sigma": ("nso",), "nso_num_perturbs": ("nso",), "nso_lam": ("nso",),
    "nso_use_neg": ("nso",), "nso_shared_noise": ("nso",), "nso_distribution": ("nso",),
    "flat_seed": ("nso",),
    "sam_rho": ("sam", "asam", "wsam"), "sam_adaptive": ("sam", "wsam"),
    "wsam_gamma": ("wsam",), "wsam_decouple": ("wsam",),
    "flat_backend": OPTIMIZERS,
    # the cheap schedules (flatfused.optim.schedules); reuse is SAM's and NSO's
    "flat_every": OPTIMIZERS, "flat_window": OPTIMIZERS, "flat_reuse": ("nso", "sam", "asam"),
    "flat_perturb": OPTIMIZERS,
}
# NSO's: the CLIP setting of the NSO reference (its scripts use use_neg, lam 0, K 1; sigma
# 0.008 with AdamW); SAM's and WSAM's are the references'; the plain schedule.
DEFAULTS = {
    "nso_sigma": 0.008, "nso_num_perturbs": 1, "nso_lam": 0.0, "nso_use_neg": True,
    "nso_shared_noise": True, "nso_distribution": "normal", "flat_seed": None,
    "sam_rho": 0.05, "sam_adaptive": False, "wsam_gamma": 0.9, "wsam_decouple": True,
    "flat_backend": "auto", "flat_every": 1, "flat_window": None, "flat_reuse": None,
    "flat_perturb": "all",
}
HELP = {
    "flat_every": "the flat-minima step on every k-th step, one pass and a plain base step "
                  "in between (1: every step)",
    "flat_window": "START,STOP: full steps only while START <= step < STOP (optimizer steps; "
                   "'START,' for no end)",
    "flat_reuse": "LookSAM-style reuse on the cheap steps, its alpha (NSO, SAM)",
    "flat_perturb": "which parameters to perturb: all, or norm (the normalisation layers: "
                    "SAM-ON)",
}


class FlatOptionError(ValueError):
    """A flatfused option, or its combination with the framework's settings, is refused."""


def parse_window(text) -> tuple[int, int | None] | None:
    """``flat_window``: None, a (start, stop) pair, or "START,STOP" / "START," text."""
    if text is None or isinstance(text, (tuple, list)):
        return None if text is None else tuple(text)
    start, sep, stop = str(text).partition(",")
    try:
        return int(start), (int(stop) if stop.strip() else None) if sep else None
    except ValueError:
        raise FlatOptionError(f"flat_window takes START,STOP in optimizer steps ('START,' for "
                              f"no end), got {text!r}") from None


def check_owners(kind: str | None, given: list[str], name_of: Callable[[str], str],
                 optimizer_name: str) -> None:
    """Refuse options given without an optimizer, or for another one."""
    for key in given:
        owners = " or ".join(OWNERS[key])
        if kind is None:
            raise FlatOptionError(f"{name_of(key)} needs {optimizer_name} ({owners})")
        if kind not in OWNERS[key]:
            hint = " (asam is sam with sam_adaptive)" if key == "sam_adaptive" else ""
            raise FlatOptionError(f"{name_of(key)} applies to {optimizer_name} {owners}, "
                                  f"not {kind}{hint}")


def _number(name: str, value, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise FlatOptionError(f"{name} must be {'an integer' if integer else 'a number'}, "
                              f"got {value!r}")
    return value


def check_values(values: dict, name_of: Callable[[str], str]) -> None:
    """Range checks of the options present (not None) in ``values``."""
    def given(key):
        return values.get(key) is not None

    for key in ("nso_sigma", "sam_rho"):
        if given(key) and not (math.isfinite(_number(name_of(key), values[key]))
                               and values[key] >= 0):
            raise FlatOptionError(f"{name_of(key)} must be a finite number >= 0, got "
                                  f"{values[key]}")
    if given("nso_num_perturbs") and _number(name_of("nso_num_perturbs"),
                                             values["nso_num_perturbs"], True) < 1:
        raise FlatOptionError(f"{name_of('nso_num_perturbs')} must be >= 1, got "
                              f"{values['nso_num_perturbs']}")
    if given("nso_lam") and not 0.0 <= _number(name_of("nso_lam"), values["nso_lam"]) <= 1.0:
        raise FlatOptionError(f"{name_of('nso_lam')} must be in [0, 1], got {values['nso_lam']}")
    if given("wsam_gamma") and not 0.0 <= _number(name_of("wsam_gamma"),
                                                  values["wsam_gamma"]) < 1.0:
        raise FlatOptionError(f"{name_of('wsam_gamma')} must be in [0, 1), got "
                              f"{values['wsam_gamma']}")
    if given("flat_seed") and not 0 <= _number(name_of("flat_seed"), values["flat_seed"],
                                               True) < 2**64:
        raise FlatOptionError(f"{name_of('flat_seed')} must be in [0, 2**64), got "
                              f"{values['flat_seed']}")
    if given("flat_perturb") and values["flat_perturb"] not in PERTURB:
        raise FlatOptionError(f"{name_of('flat_perturb')} must be one of {', '.join(PERTURB)}, "
                              f"got {values['flat_perturb']!r}")
    try:  # the schedule's own checks, with the option's name
        every = values.get("flat_every")
        Schedule.build(1 if every is None else every,
                                                 parse_window(values.get("flat_window")),
                                                 values.get("flat_reuse"))
    except ValueError as exc:
        raise FlatOptionError(f"{name_of('flat_every')}/{name_of('flat_window')}/"
                              f"{name_of('flat_reuse')}: {exc}") from None


def make_optimizer(kind: str, values: dict, base: torch.optim.Optimizer,
                   model: torch.nn.Module, max_grad_norm: float | None):
    """The flatfused optimizer ``kind`` around the framework's ``base`` optimizer instance;
    ``values`` holds every option (defaults filled in, ``flat_seed`` resolved)."""
    o = values
    schedule = dict(every=o["flat_every"], window=parse_window(o["flat_window"]))
    if o["flat_perturb"] == "norm":
        schedule["param_filter"] = flatfused.norm_parameters(model)
    if kind == "nso":
        distribution = None if o["nso_distribution"] == "normal" else o["nso_distribution"]
        return flatfused.NSO(None, base, sigma=o["nso_sigma"], distribution=distribution,
                             num_perturbs=o["nso_num_perturbs"], lam=o["nso_lam"],
                             use_neg=o["nso_use_neg"], model=model, backend=o["flat_backend"],
                             seed=o["flat_seed"], shared_noise=o["nso_shared_noise"],
                             max_grad_norm=max_grad_norm, reuse=o["flat_reuse"], **schedule)
    if kind in ("sam", "asam"):
        return flatfused.SAM(None, base, rho=o["sam_rho"],
                             adaptive=kind == "asam" or o["sam_adaptive"], model=model,
                             backend=o["flat_backend"], max_grad_norm=max_grad_norm,
                             reuse=o["flat_reuse"], **schedule)
    if kind == "wsam":
        return flatfused.WeightedSAM(model, base, rho=o["sam_rho"], gamma=o["wsam_gamma"],
                                     adaptive=o["sam_adaptive"], decouple=o["wsam_decouple"],
                                     max_norm=max_grad_norm, backend=o["flat_backend"],
                                     **schedule)
    raise FlatOptionError(f"unknown flat optimizer {kind!r}")
