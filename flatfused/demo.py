"""``flatfused demo``: SGD, SAM, NSO and their cheap schedules at matched compute on a small
noisy-label task.

The task is generated in code (nothing is downloaded): points on a curved low-dimensional
manifold in ``R^dim``, several Gaussian prototypes per class, a fraction of the training labels
replaced by a random other class, and a clean test set. A two-hidden-layer MLP large enough to
memorise the wrong labels is trained by each optimizer from the same initialisation, on the same
corrupted labels and the same batch order (a paired comparison per seed); then test accuracy,
the fraction of corrupted training labels it memorised, and four flatness measures on a fixed
subset of the (noisy) training set are reported as mean ± std over seeds, in a table, a JSON
file and plots.

Matched compute is counted, not assumed: every forward-backward pass of a batch is counted.
Every optimizer gets the passes of full SAM or NSO (K=1, ``use_neg``, ``lam=0``: two per step)
over ``--epochs`` epochs. SGD gets them by taking twice the steps (``--sgd-match steps``,
default) or twice the batch (``--sgd-match batch``, the same number of per-example gradients
in half the passes); the cheap schedules (``every``, a late window, LookSAM-style reuse) take as
many steps as fit in the budget (:mod:`flatfused.demo_variants`). The trade-off table says, for
each cheap schedule, how much of its full optimizer's gain over SGD (Hessian trace, test
accuracy) it keeps (:mod:`flatfused.demo_tradeoff`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import _argtypes
from ._argtypes import Parser, choices_list, nonnegative, output_path, positive
from ._progress import ProgressBar
from .demo_report import plot, summarise, table, verdicts
from .demo_task import corrupt_labels, make_model, make_task, measure, train
from .demo_tradeoff import kept_gains, plot_tradeoff, radius_verdicts, tradeoff_table
from .demo_variants import NAMES, VARIANTS, budget, full_steps, plan, planned_passes
from .optim.schedules import radius_for_every

OPTIMIZERS = NAMES
OUTPUT_FILES = ("results.json", "table.md", "demo.png", "tradeoff.png")  # what --out receives

# The default experiment. --quick shrinks it to a smoke test of the whole pipeline.
DEFAULTS = dict(seeds=3, first_seed=0, epochs=40, batch_size=128, n_train=2000, n_test=4000,
                dim=64, classes=10, width=256, label_noise=0.4, lr=0.05, momentum=0.9,
                weight_decay=5e-4, rho=0.4, sigma=0.08, ns_sigma=None, measure_size=512,
                trace_probes=40, eig_iters=30, keskar_steps=50, keskar_eps=5e-4,
                keskar_lr=0.1, ns_samples=64, every=5, late=0.3, reuse=0.7)
QUICK = dict(seeds=2, epochs=3, n_train=256, n_test=256, width=32, batch_size=64,
             measure_size=128, trace_probes=6, eig_iters=5, keskar_steps=5, ns_samples=4)


# ---------------------------------------------------------------------------------- reporting

# ---------------------------------------------------------------------------------- command

def _rate(text):
    value = nonnegative(float)(text)
    if not value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _fraction(text):
    value = positive(float)(text)
    if not value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _every(text):
    value = positive(int)(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be >= 2 (every=1 is the full optimizer), got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="flatfused demo",
        description="Train an MLP on a generated noisy-label task with SGD, SAM, NSO and their "
                    "cheap schedules at matched compute (forward-backward passes); report test "
                    "accuracy, flatness and the gains the cheap schedules keep (mean ± std over "
                    "seeds).")
    d = DEFAULTS
    p.add_argument("--seeds", type=positive(int), help=f"number of seeds (default {d['seeds']})")
    p.add_argument("--first-seed", type=_argtypes.seed, help="seeds are first-seed, +1, ...")
    p.add_argument("--optimizers", type=choices_list(OPTIMIZERS), default=list(OPTIMIZERS),
                   help="comma-separated subset of " + ",".join(OPTIMIZERS) + " (default all): "
                        "the -every ones take the full step every --every steps, -reuse adds "
                        "LookSAM-style reuse, -late the full step only in the last --late "
                        "fraction, -scaled with radius_for_every's rho x k / sigma x sqrt(k)")
    p.add_argument("--epochs", type=positive(int),
                   help=f"epochs of full SAM and NSO (default {d['epochs']}): their passes are "
                        "the budget every optimizer gets")
    p.add_argument("--sgd-match", choices=("steps", "batch"), default="steps",
                   help="how SGD gets the same gradient evaluations as the two-pass optimizers: "
                        "twice the steps (default) or twice the batch")
    p.add_argument("--batch-size", type=positive(int), help=f"default {d['batch_size']}")
    p.add_argument("--n-train", type=positive(int), help=f"training examples (default {d['n_train']})")
    p.add_argument("--n-test", type=positive(int), help=f"test examples (default {d['n_test']})")
    p.add_argument("--width", type=positive(int), help=f"MLP hidden width (default {d['width']})")
    p.add_argument("--label-noise", type=_rate,
                   help=f"fraction of training labels corrupted (default {d['label_noise']})")
    p.add_argument("--lr", type=positive(float), help=f"peak learning rate, cosine to 0 (default {d['lr']})")
    p.add_argument("--momentum", type=nonnegative(float), help=f"default {d['momentum']}")
    p.add_argument("--weight-decay", type=nonnegative(float), help=f"default {d['weight_decay']}")
    p.add_argument("--rho", type=nonnegative(float), help=f"SAM radius (default {d['rho']})")
    p.add_argument("--sigma", type=nonnegative(float),
                   help=f"NSO noise std, absolute, per weight (default {d['sigma']})")
    p.add_argument("--every", type=_every,
                   help="the -every schedules' k: the full step every k-th step "
                        f"(default {d['every']})")
    p.add_argument("--late", type=_fraction,
                   help=f"the -late schedules' final fraction of steps with full steps "
                        f"(default {d['late']})")
    p.add_argument("--reuse", type=positive(float),
                   help=f"the -reuse schedules' LookSAM alpha (default {d['reuse']})")
    p.add_argument("--ns-sigma", type=positive(float),
                   help="noise std of the noise-stability measurement (default: --sigma)")
    p.add_argument("--measure-size", type=positive(int),
                   help=f"training examples the flatness measures use (default {d['measure_size']})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive(int), default=1,
                   help="torch CPU threads (default 1)")
    # Checked while parsing (the default too), so a run never ends unable to save.
    p.add_argument("--out", type=output_path(directory=True, files=OUTPUT_FILES),
                   default="flatfused_demo", help="output folder (default ./flatfused_demo)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds), for tests")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config(args) -> argparse.Namespace:
    cfg = dict(DEFAULTS, **(QUICK if args.quick else {}))
    for key in cfg:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg = argparse.Namespace(**cfg)
    cfg.sgd_match, cfg.optimizers = args.sgd_match, args.optimizers
    if cfg.ns_sigma is None:
        cfg.ns_sigma = cfg.sigma
    if cfg.ns_sigma <= 0:
        raise ValueError("noise stability needs a sigma > 0: pass --ns-sigma when --sigma is 0")
    if cfg.measure_size > cfg.n_train:
        raise ValueError(f"--measure-size {cfg.measure_size} exceeds --n-train {cfg.n_train}")
    if cfg.label_noise > 0 and round(cfg.label_noise * cfg.n_train) == 0:
        raise ValueError(f"--label-noise {cfg.label_noise} corrupts no label of {cfg.n_train}")
    for name in cfg.optimizers:
        variant = VARIANTS[name]
        if variant.late:
            steps, _ = plan(variant, cfg)
            if round(cfg.late * steps) == 0:
                raise ValueError(f"--late {cfg.late} leaves {name} no full step in its {steps} "
                                 "steps: raise --late or --epochs")
    return cfg


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda[:N] or auto, got {text!r}")
    return device


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} torch thread{'s' if threads > 1 else ''}"


def run(cfg, device, progress_enabled=True) -> dict:
    """Train and measure every (optimizer, seed); returns the raw results and the passes."""
    x_train, y_train, x_test, y_test = make_task(cfg.n_train, cfg.n_test, cfg.dim, cfg.classes, 0)
    x_train, x_test, y_test = x_train.to(device), x_test.to(device), y_test.to(device)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    total = sum(plan(VARIANTS[n], cfg)[0] for n in cfg.optimizers) * len(seeds)
    progress = ProgressBar(total, enable=progress_enabled, unit="step")
    results = {name: [] for name in cfg.optimizers}
    passes = {name: [] for name in cfg.optimizers}
    try:
        for seed in seeds:
            y_noisy, flipped = corrupt_labels(y_train, cfg.label_noise, cfg.classes, seed)
            y_noisy, flipped = y_noisy.to(device), flipped.to(device)
            for name in cfg.optimizers:
                progress.set(f"{name} seed {seed}")
                t0 = time.perf_counter()
                model, count = train(cfg, name, seed, (x_train, y_noisy), device, progress)
                t1 = time.perf_counter()
                progress.set(f"{name} seed {seed}: measuring")
                r = measure(cfg, model, seed, (x_train, y_noisy), (x_test, y_test), flipped)
                results[name].append(dict(seed=seed, **r))
                passes[name].append(dict(passes=count.passes, examples=count.examples,
                                         train_s=t1 - t0, measure_s=time.perf_counter() - t1))
    finally:
        progress.close()
    return dict(results=results, compute=passes)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        cfg = config(args)
        device = _device(args.device)
    except ValueError as exc:
        print(f"flatfused demo: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    threads = torch.get_num_threads()
    # The model is small: one thread is about as fast as several on an idle CPU and many times
    # faster on a busy one, where spinning OpenMP workers compete with other processes.
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _demo(args, argv, cfg, device, out)
    finally:
        torch.set_num_threads(threads)


def _demo(args, argv, cfg, device, out: Path) -> int:
    command = "flatfused demo" + "".join(" " + shlex.quote(a) for a in argv)
    names = cfg.optimizers
    labels = {n: VARIANTS[n].label(cfg) for n in names}

    t0 = time.perf_counter()
    raw = run(cfg, device, not args.no_progress)
    wall = time.perf_counter() - t0

    results = raw["results"]
    summary = summarise(results, names)
    plans = _plans(cfg, names, raw["compute"])
    matched = all(p["matched"] for p in plans.values())
    kept = kept_gains(results, summary, names)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    params = sum(p.numel() for p in make_model(cfg.dim, cfg.width, cfg.classes, 0).parameters())
    verdict_lines = verdicts(results, summary, names, labels)
    radius_lines = radius_verdicts(results, summary, names, labels)
    load = _load()

    lines = [
        f"$ {command}",
        f"task: {cfg.classes}-class generated manifold data in R^{cfg.dim}, {cfg.n_train} train "
        f"({100 * cfg.label_noise:g}% labels corrupted) / {cfg.n_test} clean test; MLP "
        f"{cfg.dim}-{cfg.width}-{cfg.width}-{cfg.classes} ({params} parameters); seeds {seeds}",
        f"optimizers: SGD momentum {cfg.momentum}, weight decay {cfg.weight_decay}, lr {cfg.lr} "
        f"cosine to 0 over each optimizer's own steps; SAM rho {cfg.rho}; NSO sigma {cfg.sigma} "
        "(K=1, use_neg, lam=0), all on that SGD",
        *_schedule_lines(cfg, names),
        f"compute: every optimizer gets {budget(cfg)} forward-backward passes (full SAM/NSO's "
        f"{cfg.epochs} epochs x 2); "
        + ("SGD takes twice their steps; " if cfg.sgd_match == "steps" else
           "SGD takes twice their batch (the same example-gradients in half the passes); ")
        + "a cheap schedule takes the most steps whose passes fit (counted: "
        + ", ".join(f"{labels[n]} {plans[n]['passes']}" for n in names)
        + (") (matched)" if matched else ") (NOT matched)"),
        f"flatness measured on the first {cfg.measure_size} training examples with their noisy "
        f"labels: Hessian trace (Hutch++, {cfg.trace_probes} HVPs), top eigenvalue (power "
        f"iteration, <= {cfg.eig_iters}), Keskar sharpness (eps {cfg.keskar_eps}, "
        f"{cfg.keskar_steps} ascent steps, lr {cfg.keskar_lr}), noise stability "
        f"E[L(w+u)]-L(w), u ~ N(0, {cfg.ns_sigma:g}^2 I), {cfg.ns_samples} draws; "
        "'noisy labels fit' = corrupted training examples predicted as their wrong label",
        "",
        table(summary, names, labels),
        "",
        *verdict_lines,
        "",
        "compute-flatness trade-off: the gain kept is the fraction of the full optimizer's gain "
        "over SGD (Hessian trace down, test accuracy up) that a cheap schedule keeps at the same "
        "passes: ratio of the seed means (range of the paired per-seed ratios)",
        "",
        tradeoff_table(cfg, summary, names, plans, kept),
        "",
        *radius_lines,
        *([""] if radius_lines else []),
        f"wall time {wall:.1f} s on {device.type} ({_machine(device)})"
        + (f"; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the "
           "end" if load else ""),
    ]
    report = "\n".join(lines)
    print(report)

    record = dict(command=command, argv=argv, wall_time_s=wall, device=str(device),
                  machine=_machine(device), load_average=load, torch=torch.__version__,
                  seeds=seeds, config=vars(cfg), parameters=params, labels=labels,
                  schedule=plans, compute=raw["compute"], compute_matched=matched,
                  results=results, summary=summary, verdicts=verdict_lines, kept=kept,
                  radius_verdicts=radius_lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    (out / "table.md").write_text(report + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    if not args.no_plot:
        title = f"{command}  (mean ± std over {cfg.seeds} seeds)"
        png = plot(summary, names, labels, out / "demo.png", title)
        if png is None:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
        else:
            plot_tradeoff(cfg, summary, names, plans, out / "tradeoff.png",
                          title + "; hollow: radius scaled with k")
            print(f"wrote {png} and {out / 'tradeoff.png'}")
    return 0


def _plans(cfg, names, compute) -> dict:
    """Per optimizer: its steps, full steps, batch, radius and schedule as planned, the passes
    and example-gradients counted (the same in every seed, checked), and whether they match the
    budget: the passes within one full step's extra passes below it (a cheap schedule cannot
    always land on it exactly), or with ``--sgd-match batch`` SGD's example-gradients equal to
    full SAM's and NSO's."""
    out = {}
    for name in names:
        variant = VARIANTS[name]
        steps, batch = plan(variant, cfg)
        counted = {(c["passes"], c["examples"]) for c in compute[name]}
        if len(counted) != 1:
            raise RuntimeError(f"{name} made different passes in different seeds: {counted}")
        passes, examples = counted.pop()
        if passes != planned_passes(variant, cfg, steps):
            raise RuntimeError(f"{name} made {passes} passes, planned "
                               f"{planned_passes(variant, cfg, steps)}: the plan is wrong")
        sched = variant.schedule(cfg, steps) if variant.family != "sgd" else None
        full = 0 if sched is None else (steps if not variant.cheap else
                                        full_steps(sched, steps))
        if variant.family == "sgd" and cfg.sgd_match == "batch":
            matched = examples == 2 * cfg.epochs * cfg.n_train
        else:
            matched = budget(cfg) - (variant.full_passes() - 1) <= passes <= budget(cfg)
        out[name] = dict(steps=steps, batch=batch, full_steps=full, passes=passes,
                         examples=examples, passes_per_step=passes / steps,
                         radius=variant.radius(cfg), matched=matched,
                         schedule=None if sched is None else sched.state())
    return out


def _schedule_lines(cfg, names) -> list[str]:
    """What the cheap schedules are, and the radius choice, in the report's words."""
    cheap = [n for n in names if VARIANTS[n].cheap]
    if not cheap:
        return []
    lines = [f"cheap schedules: 'every {cfg.every}' = the full step on every {cfg.every}th step, "
             "a plain SGD step (one pass) between; 'reuse' = LookSAM-style reuse of the last "
             f"full step's gradient component orthogonal to the clean one, alpha {cfg.reuse:g}; "
             f"'last {100 * cfg.late:g}%' = plain SGD steps, then the full step on every step of "
             "the last part of training (where the cosine lr is small)"]
    rho = radius_for_every(cfg.rho, cfg.every, "sam")
    sigma = radius_for_every(cfg.sigma, cfg.every, "nso")
    lines.append(f"radius: a cheap schedule keeps its full optimizer's (rho {cfg.rho:g}, sigma "
                 f"{cfg.sigma:g}) unless marked 'rho x {cfg.every}' or "
                 f"'sigma x sqrt({cfg.every})': "
                 f"radius_for_every's rho {rho:.3g}, sigma {sigma:.3g}, which keeps the "
                 "time-averaged first-order flatness penalty of a full step on every step")
    lines.append("no SAM-ON row: the MLP has no normalisation layers, so param_filter="
                 "norm_parameters(model) would perturb nothing")
    return lines


def _load() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None
