"""Train CLIP with open_clip's own trainer and a flatfused optimizer chosen on the command line.

    python -m flatfused.integrations.open_clip <open_clip_train arguments> \\
        --flat-optimizer nso --nso-sigma 0.008
    torchrun --nproc_per_node 8 -m flatfused.integrations.open_clip <same arguments>

The launcher removes its own flags from the command line and runs the installed
``open_clip_train.main.main`` with the rest. Nothing of open_clip is edited: for the duration of
that call a few names that ``open_clip_train.main`` looks up are replaced (and restored after):

- ``parse_args``: open_clip's parser, then a check of the combination with the flatfused flags
  (a refused combination raises :class:`FlatOptionError` before anything is built).
- ``optim``: ``optim.AdamW(...)``, the one call by which open_clip builds its optimizer (weight
  decay groups, betas, eps), still builds that ``torch.optim.AdamW``; the launcher hands it to
  ``flatfused.NSO``/``SAM``/``WeightedSAM`` as a base optimizer *instance* and returns the
  wrapper. open_clip keeps that object as its optimizer, so its LR scheduler (which writes
  ``param_group["lr"]``; the wrapper shares the base's groups), ``optimizer.state_dict()`` in
  its checkpoints (AdamW's state plus flatfused's RNG position) and ``load_state_dict`` on
  ``--resume`` work unchanged.
- ``create_model_and_transforms``: records the model, which WSAM needs at construction.
- ``train_one_epoch``: :mod:`flatfused.integrations.open_clip_loop`'s. A flat-minima step runs
  its forward and backward passes itself (NSO with ``lam == 0`` has no pass at the current
  weights at all), so open_clip's per-batch ``forward; backward; clip; step`` cannot be kept around it; the
  replacement keeps open_clip's epoch (data, scheduler call per step, ``logit_scale`` clamp,
  log lines and TensorBoard/W&B keys) and runs each step as ``optimizer.step(closure)``, or
  ``scaler.step(optimizer, closure)`` with ``--precision amp``, where the closure is open_clip's
  forward, loss and backward for the batch under open_clip's autocast. ``--grad-clip-norm``
  becomes ``max_grad_norm`` (NSO: the update direction; SAM: the ascent-point gradient) or WSAM's
  ``max_norm``. ``--accum-freq k`` is open_clip's feature-cache accumulation, redone inside the
  closure at each pass's weights, so every pass sees the whole accumulated batch.
- ``torch.nn.parallel.DistributedDataParallel``: a subclass that drops ``device_ids`` naming
  the CPU, which open_clip 3.3 passes and DDP refuses (``torchrun ... --device cpu`` fails in
  plain open_clip); otherwise DDP as is.

Under ``torchrun`` the optimizer gets the DDP-wrapped model, so an NSO step synchronises
gradients once (the last pass averages the sum of all passes), and with ``--accum-freq`` the
micro-batches before the last of each pass run under ``no_sync`` too. Without
``--flat-optimizer`` the launcher runs plain open_clip (with the CPU DDP fix).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from dataclasses import dataclass, field

import torch

from flatfused import backends as _backends

from .open_clip_loop import PROG, train_one_epoch
from ._options import (DEFAULTS, DISTRIBUTIONS, HELP, OWNERS, PERTURB, FlatOptionError,
                       check_owners, check_values)
from ._options import make_optimizer as _make_optimizer

OPTIMIZERS = ("nso", "sam", "wsam")  # ASAM: --flat-optimizer sam --sam-adaptive


@dataclass
class FlatConfig:
    """The launcher's own flags (``None`` optimizer: plain open_clip)."""

    optimizer: str | None = None
    nso_sigma: float = 0.008
    nso_num_perturbs: int = 1
    nso_lam: float = 0.0
    nso_use_neg: bool = True
    nso_shared_noise: bool = True
    nso_distribution: str = "normal"
    flat_seed: int | None = None
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    wsam_gamma: float = 0.9
    wsam_decouple: bool = True
    flat_backend: str = "auto"
    flat_every: int = 1
    flat_window: str | None = None
    flat_reuse: float | None = None
    flat_perturb: str = "all"
    model_config_dirs: list[str] = field(default_factory=list)
    logs: str | None = None
    help: bool = False


def build_parser() -> argparse.ArgumentParser:
    """The parser of the launcher's own flags (open_clip's are passed through untouched)."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                                description="Runs open_clip_train with a flatfused optimizer; "
                                            "every other argument goes to open_clip_train.")
    g = p.add_argument_group("flatfused (the rest of the arguments go to open_clip_train)")
    g.add_argument("--flat-optimizer", choices=OPTIMIZERS,
                   help="wrap open_clip's AdamW into NSO, SAM or WSAM (absent: plain open_clip)")
    g.add_argument("--nso-sigma", type=float, help="NSO noise scale (default 0.008)")
    g.add_argument("--nso-num-perturbs", type=int, help="NSO perturbations K per step (default 1)")
    g.add_argument("--nso-lam", type=float,
                   help="NSO weight of the clean gradient in [0, 1] (default 0: no clean pass)")
    g.add_argument("--nso-use-neg", action=argparse.BooleanOptionalAction,
                   help="NSO two-point estimate, w+u and w-u (default on)")
    g.add_argument("--nso-shared-noise", action=argparse.BooleanOptionalAction,
                   help="every rank draws the same noise (default on)")
    g.add_argument("--nso-distribution", choices=DISTRIBUTIONS, help="NSO noise (default normal)")
    g.add_argument("--sam-rho", type=float, help="SAM/WSAM radius (default 0.05)")
    g.add_argument("--sam-adaptive", action=argparse.BooleanOptionalAction,
                   help="ASAM-style perturbation for SAM/WSAM (default off)")
    g.add_argument("--wsam-gamma", type=float, help="WSAM gamma in [0, 1) (default 0.9)")
    g.add_argument("--wsam-decouple", action=argparse.BooleanOptionalAction,
                   help="WSAM decoupled sharpness step (default on)")
    g.add_argument("--flat-backend", choices=_backends.BACKENDS,
                   help="flatfused kernel backend (default auto)")
    g.add_argument("--flat-seed", type=int,
                   help="NSO noise seed (default: open_clip's --seed; rank 0's is used)")
    g.add_argument("--flat-every", type=int, help=HELP["flat_every"] + " (default 1)")
    g.add_argument("--flat-window", help=HELP["flat_window"])
    g.add_argument("--flat-reuse", type=float, help=HELP["flat_reuse"])
    g.add_argument("--flat-perturb", choices=PERTURB, help=HELP["flat_perturb"] + " (default all)")
    g.add_argument("--flat-model-config-dir", action="append", default=[], metavar="PATH",
                   help="register open_clip model configs (a JSON file or a directory of them) "
                        "so that --model can name them; repeatable")
    g.add_argument("--flat-logs", metavar="DIR",
                   help="open_clip's --logs, for torchrun, whose own parser takes --logs as an "
                        "abbreviation of its --logs-specs")
    g.add_argument("-h", "--help", action="store_true", help="this help, then open_clip's")
    return p


def split_args(argv) -> tuple[FlatConfig, list[str]]:
    """The launcher's flags as a :class:`FlatConfig`, and open_clip's arguments in their order.

    Only the launcher's exact option strings (``--opt`` or ``--opt=value``) are taken out, so
    open_clip's arguments are never re-parsed or reordered.
    """
    parser = build_parser()
    takes_value = {}
    for action in parser._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    ours, rest = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0] if token.startswith("--") else token
        if name in takes_value:
            ours.append(token)
            if takes_value[name] and "=" not in token:
                if i + 1 >= len(argv):
                    raise FlatOptionError(f"{name} needs a value")
                ours.append(argv[i + 1])
                i += 1
        else:
            rest.append(token)
        i += 1
    try:
        ns = parser.parse_args(ours)
    except SystemExit:  # argparse printed the reason
        raise FlatOptionError("invalid flatfused flag (see above)") from None
    return _config(ns), rest


def _config(ns) -> FlatConfig:
    given = {k for k in OWNERS if getattr(ns, k) is not None}
    kind = ns.flat_optimizer
    check_owners(kind, sorted(given), _flag, "--flat-optimizer")
    values = {k: (getattr(ns, k) if k in given else DEFAULTS[k]) for k in OWNERS}
    check_values(values, _flag)
    return FlatConfig(optimizer=kind, model_config_dirs=list(ns.flat_model_config_dir),
                      logs=ns.flat_logs, help=ns.help, **values)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _finite_nonnegative(flag: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise FlatOptionError(f"{flag} must be a finite number >= 0, got {value}")


def check_open_clip_args(config: FlatConfig, args) -> None:
    """Refuse open_clip settings the launcher cannot run with a flatfused optimizer."""
    if config.optimizer is None:
        return
    flag = f"--flat-optimizer {config.optimizer}"
    if getattr(args, "horovod", False):
        raise FlatOptionError(f"{flag} does not support --horovod; use torchrun (DDP)")
    opt = str(getattr(args, "opt", "adamw")).lower()
    if opt != "adamw":
        raise FlatOptionError(f"{flag} wraps open_clip's AdamW; --opt {args.opt} is not supported")
    if getattr(args, "distill_model", None) is not None or getattr(args, "distill_pretrained", None):
        raise FlatOptionError(f"{flag} does not support distillation (--distill-model)")
    if args.accum_freq < 1:
        raise FlatOptionError(f"--accum-freq must be >= 1, got {args.accum_freq}")
    if args.grad_clip_norm is not None:
        _finite_nonnegative("--grad-clip-norm", args.grad_clip_norm)


def make_optimizer(config: FlatConfig, base: torch.optim.Optimizer, model: torch.nn.Module,
                   args) -> torch.optim.Optimizer:
    """The flatfused optimizer around open_clip's ``base`` AdamW instance."""
    values = {k: getattr(config, k) for k in OWNERS}
    if values["flat_seed"] is None:
        values["flat_seed"] = int(args.seed)
    return _make_optimizer(config.optimizer, values, base, model, args.grad_clip_norm)


def _ddp_cpu_friendly():
    """DDP that ignores ``device_ids`` naming the CPU (DDP wants none for CPU modules)."""
    base = torch.nn.parallel.DistributedDataParallel

    class DistributedDataParallel(base):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    return DistributedDataParallel


class OpenClipRun:
    """One run of open_clip_train under the launcher: the patches, and what they saw."""

    def __init__(self, config: FlatConfig):
        self.config = config
        self.args = None  # open_clip's parsed arguments
        self.model = None  # the model open_clip built (before DDP)
        self.optimizer = None  # the flatfused optimizer open_clip trained with
        self.result = None  # what open_clip's main returned

    def _parse_args(self, original):
        def parse_args(argv):
            args = original(argv)
            check_open_clip_args(self.config, args)
            self.args = args
            return args
        return parse_args

    def _create_model(self, original):
        def create_model_and_transforms(*args, **kwargs):
            out = original(*args, **kwargs)
            self.model = out[0]
            return out
        return create_model_and_transforms

    def _adamw(self, params, **kwargs):
        base = torch.optim.AdamW(params, **kwargs)
        self.optimizer = make_optimizer(self.config, base, self.model, self.args)
        logging.info(f"flatfused: training with {self.optimizer!r} around open_clip's AdamW")
        return self.optimizer

    @contextlib.contextmanager
    def patched(self):
        """Replace the names ``open_clip_train.main`` looks up (see the module doc); restore them."""
        import open_clip_train.main as oc_main

        replaced = {"parse_args": self._parse_args(oc_main.parse_args)}
        if self.config.optimizer is not None:
            replaced["create_model_and_transforms"] = self._create_model(
                oc_main.create_model_and_transforms)
            replaced["optim"] = _OptimNamespace(self._adamw)
            replaced["train_one_epoch"] = train_one_epoch
        saved = {name: getattr(oc_main, name) for name in replaced}
        parallel = torch.nn.parallel
        saved_ddp = parallel.DistributedDataParallel
        try:
            for name, value in replaced.items():
                setattr(oc_main, name, value)
            parallel.DistributedDataParallel = _ddp_cpu_friendly()
            yield self
        finally:
            parallel.DistributedDataParallel = saved_ddp
            for name, value in saved.items():
                setattr(oc_main, name, value)


class _OptimNamespace:
    """``torch.optim`` as ``open_clip_train.main`` sees it, with ``AdamW`` building the wrapper."""

    def __init__(self, adamw):
        self.AdamW = adamw

    def __getattr__(self, name):
        return getattr(torch.optim, name)


# ---------------------------------------------------------------------------- entry points

def run(argv=None) -> OpenClipRun:
    """Run open_clip_train's ``main`` with the launcher's flags taken out of ``argv``."""
    config, rest = split_args(sys.argv[1:] if argv is None else argv)
    try:
        import open_clip
        import open_clip_train.main as oc_main
    except ImportError as e:
        raise FlatOptionError(f"open_clip's trainer is not importable ({e}); install it with "
                              "pip install 'open-clip-torch[training]'") from e
    if config.help:
        build_parser().print_help()
        print("\nopen_clip_train's arguments:\n")
        oc_main.parse_args(["--help"])  # prints and exits
    for path in config.model_config_dirs:
        open_clip.add_model_config(path)
    if config.logs is not None:
        rest = ["--logs", config.logs] + rest
    launcher = OpenClipRun(config)
    with launcher.patched():
        launcher.result = oc_main.main(rest)
    return launcher


def main(argv=None) -> int:
    try:
        launcher = run(argv)
    except FlatOptionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 1 if launcher.result == -1 else 0  # open_clip returns -1 when it refuses to start


if __name__ == "__main__":
    sys.exit(main())
