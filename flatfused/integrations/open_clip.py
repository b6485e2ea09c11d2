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
- ``train_one_epoch``: :func:`train_one_epoch` below. A flat-minima step runs its forward and
  backward passes itself (NSO with ``lam == 0`` has no pass at the current weights at all), so
  open_clip's per-batch ``forward; backward; clip; step`` cannot be kept around it; the
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
import time
from dataclasses import dataclass, field

import torch

import flatfused
from flatfused import backends as _backends

from ._options import (DEFAULTS, DISTRIBUTIONS, HELP, OWNERS, PERTURB, FlatOptionError,
                       check_owners, check_values)
from ._options import make_optimizer as _make_optimizer

PROG = "python -m flatfused.integrations.open_clip"
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


def _kind(optimizer) -> str:
    if isinstance(optimizer, flatfused.NSO):
        return "nso"
    if isinstance(optimizer, flatfused.WeightedSAM):
        return "wsam"
    if isinstance(optimizer, flatfused.SAM):
        return "sam"
    raise TypeError(f"train_one_epoch of {PROG} needs a flatfused optimizer, got "
                    f"{type(optimizer).__name__}")


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


# ---------------------------------------------------------------------------- the training epoch

def _no_sync(model):
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _record(passes, losses: dict, total: torch.Tensor, logit_scale) -> None:
    entry = {name: value.detach() for name, value in losses.items()}
    entry["loss"] = total.detach()
    passes.append((entry, logit_scale.detach()))


def make_closure(model, micro_batches, loss, autocast, scaler, passes, sync_model=None):
    """Open_clip's forward, loss and backward for one step's batch, as a closure.

    One micro-batch: the forward and the loss under ``autocast``, then ``backward`` (of the
    scaled loss when ``scaler`` is given). Several (``--accum-freq``): open_clip's accumulation,
    at the weights of the call: the features of every micro-batch without gradients, then per
    micro-batch a forward with gradients whose loss takes the other micro-batches' cached
    features as negatives, and its backward; all but the last backward run without DDP's
    synchronisation (``sync_model``), so the call synchronises once. Each call appends its
    (detached) losses and logit scale to ``passes`` and returns the total loss.
    """
    def backward(total):
        (scaler.scale(total) if scaler is not None else total).backward()

    if len(micro_batches) == 1:
        images, texts = micro_batches[0]

        def closure():
            with autocast():
                out = model(images, texts)
                losses = loss(**out, output_dict=True)
                total = sum(losses.values())
            backward(total)
            _record(passes, losses, total, out["logit_scale"])
            return total
        return closure

    unshared = ("logit_scale", "logit_bias")

    def closure():
        cached = {}
        with torch.no_grad(), autocast():
            for images, texts in micro_batches:
                out = model(images, texts)
                for key, value in out.items():
                    if key not in unshared:
                        cached.setdefault(key, []).append(value)
        last = len(micro_batches) - 1
        for j, (images, texts) in enumerate(micro_batches):
            with (contextlib.nullcontext() if j == last else _no_sync(sync_model)):
                with autocast():
                    out = model(images, texts)
                    kept = {k: out.pop(k) for k in unshared if k in out}
                    inputs = {k: torch.cat(v[:j] + [out[k]] + v[j + 1:]) for k, v in cached.items()}
                    losses = loss(**inputs, **kept, output_dict=True)
                    total = sum(losses.values())
                backward(total)
        _record(passes, losses, total, kept["logit_scale"])
        return total
    return closure


def flat_step(optimizer, closure, scaler, passes):
    """One step of a flatfused optimizer; the losses to log: the pass at the current weights
    (SAM's and WSAM's first, NSO's clean pass with ``lam > 0``), else the mean of NSO's passes."""
    kind = _kind(optimizer)
    if kind != "nso":  # NSO's step discards earlier gradients; SAM's and WSAM's use them
        optimizer.zero_grad()
    if kind == "sam":  # SAM's step ascends from the gradient of a first pass run before it
        closure()
    if scaler is not None:
        scaler.step(optimizer, closure)
        scaler.update()
    else:
        optimizer.step(closure)
    if kind == "nso" and optimizer.lam == 0.0:
        n = len(passes)
        losses = {k: sum(p[0][k] for p in passes) / n for k in passes[0][0]}
        return losses, sum(p[1] for p in passes) / n
    return passes[0]


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                    tb_writer=None):
    """``open_clip_train.train.train_one_epoch`` with every step ``optimizer.step(closure)``.

    The same epoch as open_clip's (same signature, data, per-step scheduler call, ``logit_scale``
    clamp, log line and TensorBoard/W&B keys); only the step differs (see the module doc).
    """
    from open_clip import get_input_dtype
    from open_clip_train import train as oc_train
    from open_clip_train.distributed import is_master
    from open_clip_train.precision import get_autocast

    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    # The optimizer synchronises through the module open_clip trains (DDP), not a compiled
    # wrapper of it.
    sync_model = getattr(model, "_orig_mod", model)
    optimizer.model = sync_model
    if scaler is not None:
        scaler.scale(torch.zeros((), device=device))  # GradScaler creates its scale lazily

    model.train()
    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    accum = args.accum_freq
    steps_per_epoch = dataloader.num_batches // accum
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))

    meters = {}
    batch_time, data_time = oc_train.AverageMeter(), oc_train.AverageMeter()
    end = time.time()
    micro_batches = []
    for i, (images, texts) in enumerate(dataloader):
        i_accum = i // accum
        step = steps_per_epoch * epoch + i_accum
        if not args.skip_scheduler:
            scheduler(step)
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        texts = texts.to(device=device, non_blocking=True)
        micro_batches.append((images, texts))
        data_time.update(time.time() - end)
        if len(micro_batches) < accum:
            continue

        passes = []
        closure = make_closure(model, micro_batches, loss, autocast, scaler, passes, sync_model)
        losses, logit_scale = flat_step(optimizer, closure, scaler, passes)
        micro_batches = []
        with torch.no_grad():  # open_clip clamps the temperature at ln(100) after each step
            oc_train.unwrap_model(model).logit_scale.clamp_(0, math.log(100))

        batch_time.update(time.time() - end)
        end = time.time()
        batch_count = i_accum + 1
        if not is_master(args) or (i_accum % args.log_every_n_steps != 0
                                   and batch_count != steps_per_epoch):
            continue
        batch_size = len(images)
        for name, value in losses.items():
            meters.setdefault(name, oc_train.AverageMeter()).update(value.item(), batch_size)
        scale_value = logit_scale.item()
        per_second = accum * args.batch_size * args.world_size / batch_time.val
        per_second_per_gpu = accum * args.batch_size / batch_time.val
        lr = optimizer.param_groups[0]["lr"]
        num_samples = batch_count * batch_size * accum * args.world_size
        loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})"
                            for name, m in meters.items())
        logging.info(
            f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{dataloader.num_samples} "
            f"({100.0 * batch_count / steps_per_epoch:.0f}%)] "
            f"Data (t): {data_time.avg:.3f} "
            f"Batch (t): {batch_time.avg:.3f}, {per_second:#g}/s, {per_second_per_gpu:#g}/s/gpu "
            f"LR: {lr:5f} Logit Scale: {scale_value:.3f} " + loss_log)
        log_data = {"data_time": data_time.val, "batch_time": batch_time.val,
                    "samples_per_second": per_second,
                    "samples_per_second_per_gpu": per_second_per_gpu,
                    "scale": scale_value, "lr": lr}
        log_data.update({name: m.val for name, m in meters.items()})
        log_data = {"train/" + name: value for name, value in log_data.items()}
        if tb_writer is not None:
            for name, value in log_data.items():
                tb_writer.add_scalar(name, value, step)
        if args.wandb:
            assert oc_train.wandb is not None, "Please install wandb."
            log_data["step"] = step
            oc_train.wandb.log(log_data, step=step)
        batch_time.reset()
        data_time.reset()


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
