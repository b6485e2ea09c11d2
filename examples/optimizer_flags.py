"""The recipes' optimizer flags: ``--optimizer`` (one or a comma list, or ``--compare``) and the
flatfused hyper-parameters under the names ``FlatTrainingArguments`` and the open_clip launcher
use (``--nso-sigma``, ``--sam-rho``, ``--wsam-gamma``, ...), checked before anything is built.

The Hugging Face recipe hands them to ``FlatTrainingArguments`` (:func:`trainer_fields`); the
Lightning recipe builds the same optimizer around its own AdamW (:func:`build_optimizer`), with
the same defaults (``flatfused.integrations.transformers.DEFAULTS``).
"""
from __future__ import annotations

import argparse

from flatfused import backends
from flatfused._argtypes import comma_list, nonnegative, positive

OPTIMIZERS = ("adamw", "nso", "sam", "asam", "wsam")
COMPARED = ("adamw", "nso", "sam", "wsam")  # --compare

# flag -> (the optimizers it applies to, argparse keyword arguments); the field names are
# FlatTrainingArguments' (flatfused/integrations/transformers.py, _OWNERS).
FLAGS = {
    "nso_sigma": (("nso",), dict(type=nonnegative(float), help="NSO noise scale")),
    "nso_num_perturbs": (("nso",), dict(type=positive(int), help="NSO perturbations K per step")),
    "nso_lam": (("nso",), dict(type=nonnegative(float),
                               help="NSO weight of the clean gradient in [0, 1] (0: no clean "
                                    "pass)")),
    "nso_use_neg": (("nso",), dict(action=argparse.BooleanOptionalAction,
                                   help="NSO two-point estimate, w+u and w-u")),
    "nso_distribution": (("nso",), dict(choices=("normal", "laplace", "uniform", "binomial",
                                                 "cauchy"), help="NSO noise distribution")),
    "sam_rho": (("sam", "asam", "wsam"), dict(type=nonnegative(float),
                                              help="SAM/ASAM/WSAM radius")),
    "sam_adaptive": (("sam", "wsam"), dict(action=argparse.BooleanOptionalAction,
                                           help="ASAM-style perturbation for SAM/WSAM")),
    "wsam_gamma": (("wsam",), dict(type=nonnegative(float), help="WSAM gamma in [0, 1)")),
    "wsam_decouple": (("wsam",), dict(action=argparse.BooleanOptionalAction,
                                      help="WSAM decoupled sharpness step")),
    "flat_backend": (("nso", "sam", "asam", "wsam"),
                     dict(choices=backends.BACKENDS, help="flatfused kernel backend")),
    "flat_every": (("nso", "sam", "asam", "wsam"),
                   dict(type=positive(int), help="the flat-minima step on every k-th step, one "
                                                 "pass and a plain AdamW step between "
                                                 "(docs/schedules.md)")),
    "flat_reuse": (("nso", "sam", "asam"),
                   dict(type=nonnegative(float), help="LookSAM-style reuse of the last "
                                                      "perturbed direction on the cheap steps, "
                                                      "its alpha")),
}


def add_optimizer_flags(parser, defaults: dict) -> None:
    """``--optimizer``, ``--compare`` and the flatfused flags; ``defaults``: the recipe's own
    defaults for some of them (a recipe's tuned radius), shown in the help."""
    g = parser.add_argument_group("optimizer (AdamW is the base of every flatfused optimizer)")
    g.add_argument("--optimizer",
                   help=f"one of {', '.join(OPTIMIZERS)}, or a comma list run one after the other "
                        "on the same data (default nso)")
    g.add_argument("--compare", action="store_true",
                   help=f"--optimizer {','.join(COMPARED)}: one table")
    for key, (owners, kwargs) in FLAGS.items():
        text = kwargs["help"]
        default = defaults.get(key, _library_default(key))
        kwargs = dict(kwargs, help=f"{text} (default {default}; {'/'.join(owners)})")
        g.add_argument("--" + key.replace("_", "-"), default=None, **kwargs)


def _library_default(key):
    from flatfused.integrations.transformers import DEFAULTS

    return DEFAULTS[key]


def optimizer_settings(args, defaults: dict) -> tuple[list[str], dict]:
    """``(optimizers, options)``: the optimizers to run, in order, and every flatfused option
    (given, else the recipe's default, else the library's). ``SystemExit`` with one line for a
    flag no chosen optimizer takes, or a value out of range."""
    if args.compare:
        if args.optimizer is not None:
            raise SystemExit("pass --optimizer or --compare, not both")
        kinds = list(COMPARED)
    else:
        kinds = comma_list(args.optimizer or "nso", OPTIMIZERS, "--optimizer")
    options = {}
    for key, (owners, _) in FLAGS.items():
        value = getattr(args, key)
        if value is not None and not set(owners) & set(kinds):
            raise SystemExit(f"--{key.replace('_', '-')} applies to {'/'.join(owners)}, none of "
                             f"which is in --optimizer {','.join(kinds)}")
        options[key] = value if value is not None else defaults.get(key, _library_default(key))
    if not 0.0 <= options["nso_lam"] <= 1.0:
        raise SystemExit(f"--nso-lam must be in [0, 1], got {options['nso_lam']}")
    if not options["wsam_gamma"] < 1.0:
        raise SystemExit(f"--wsam-gamma must be in [0, 1), got {options['wsam_gamma']}")
    return kinds, options


def owned(kind: str, options: dict) -> dict:
    """The options of optimizer ``kind`` (those FlatTrainingArguments accepts with it)."""
    out = {k: v for k, v in options.items() if kind in FLAGS[k][0]}
    if kind == "asam":
        out.pop("sam_adaptive", None)  # asam is sam with sam_adaptive
    return out


def trainer_fields(kind: str, options: dict, seed: int) -> dict:
    """``FlatTrainingArguments`` fields for ``kind`` (adamw: the plain Trainer)."""
    if kind == "adamw":
        return {}
    fields = dict(flat_optimizer=kind, **owned(kind, options))
    if kind == "nso":
        fields["flat_seed"] = seed
    return fields


def build_optimizer(kind: str, options: dict, base, model, max_grad_norm, seed: int):
    """The optimizer ``kind`` around the AdamW instance ``base`` (adamw: ``base`` itself), as
    ``FlatTrainer`` builds it (``flatfused.integrations.transformers.make_optimizer``)."""
    if kind == "adamw":
        return base
    from flatfused.integrations.transformers import DEFAULTS, make_optimizer

    full = dict(DEFAULTS, **owned(kind, options), flat_seed=seed)
    return make_optimizer(kind, full, base, model, max_grad_norm)


def radius(kind: str, options: dict):
    """``(name, value)`` of the optimizer's radius, for tables (None for adamw)."""
    if kind == "nso":
        return "sigma", options["nso_sigma"]
    if kind in ("sam", "asam", "wsam"):
        return "rho", options["sam_rho"]
    return None
