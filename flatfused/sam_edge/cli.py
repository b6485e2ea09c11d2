"""``flatfused sam-edge image-classification|transformer``: the original's two commands.

Every flag of the original keeps its name, meaning and default, except where the default needs the
network or would measure nothing (docs/sam_edge.md lists each difference). Flags may be
written with underscores, as the original's, or with hyphens. Bad input is refused in one line
with exit status 2 before any data are read or any training is done.
"""
from __future__ import annotations

import os
import shlex
import sys
import tempfile

import torch

from .._argtypes import Parser, nonnegative, output_problem, positive, runnable_device, seed

PROG = "flatfused sam-edge"
EXPERIMENTS = ("image-classification", "transformer")

# (flag, the original's file name, key): the outputs, in the original's default folder (/tmp) unless
# --output_dir names another. The record is added here.
OUTPUTS = (
    ("eigs_curve_output", "eigs.pdf", "eigenvalues"),
    ("eigs_se_only_output", "eigs_se_only.pdf", "eigenvalues_se_only"),
    ("alignment_curve_output", "a.pdf", "alignments"),
    ("loss_curve_output", "ell.pdf", "loss"),
    ("raw_data_output", "raw.txt", "raw"),
    ("run_record_output", "sam_edge_run.json", "record"),
)
FIGURES = {"eigenvalues", "eigenvalues_se_only", "alignments", "loss"}

# The original's defaults that differ between its two commands. The transformer's check gap is
# None in the original, which never checks (and so writes no figure): 0.05 hours here.
DEFAULTS = {
    "image-classification": dict(time_limit_in_hours=4.0, hessian_check_gap=0.25,
                                 step_size=0.01, batch_size=None),
    "transformer": dict(time_limit_in_hours=1.0, hessian_check_gap=0.05, step_size=0.1,
                        batch_size=128),
}

USAGE = f"""usage: {PROG} <experiment> [flags]   ({PROG} <experiment> --help for the flags)

The experiments of "Sharpness-Aware Minimization and the Edge of Stability" (Long & Bartlett):
train with gradient descent (--rho 0) or SAM and log the Hessian's operator norm against the SAM
edge and 2/eta.

experiments:
  image-classification  an MLP or CNN on images, squared loss (default data: synthetic digits,
                        generated here; MNIST/CIFAR-10 from --data_dir)
  transformer           a character-level transformer language model (default text: CPython's
                        reference documentation)"""


def _parser(experiment: str) -> Parser:
    d = DEFAULTS[experiment]
    p = Parser(prog=f"{PROG} {experiment}", allow_abbrev=False,
               description="Flags may be written with underscores (as the original's) or hyphens.")
    seed_flags = p.add_argument_group("the original's flags")
    add = seed_flags.add_argument
    add("--rho", type=nonnegative(float), default=0.0,
        help="SAM's radius, the distance to the point where the gradient is taken; 0 (the "
             "default): plain gradient descent")
    add("--time_limit_in_hours", type=positive(float), default=d["time_limit_in_hours"],
        help=f"training time limit (default {d['time_limit_in_hours']})")
    add("--hessian_check_gap", type=positive(float), default=None,
        help=f"hours between checks of the Hessian (default {d['hessian_check_gap']}; "
             "--hessian_check_steps instead counts steps)")
    add("--step_size", type=positive(float), default=d["step_size"],
        help=f"learning rate eta (default {d['step_size']})")
    add("--batch_size", type=positive(int), default=d["batch_size"],
        help="batch size (default: the whole training set, as the original's 60000 on MNIST)"
        if d["batch_size"] is None else f"batch size (default {d['batch_size']})")
    if experiment == "image-classification":
        add("--nn_architecture", type=str.upper, choices=("MLP", "CNN"), default="MLP",
            help="MLP or CNN (default MLP)")
        add("--dataset", choices=("synthetic_digits", "mnist", "cifar10"),
            default="synthetic_digits",
            help="synthetic_digits (default: generated here, MNIST-shaped), or mnist or cifar10 "
                 "read from --data_dir (the original downloads them; nothing is downloaded here)")
        add("--mlp_depth", type=positive(int), default=4,
            help="number of dense layers of the MLP, at least 2 (default 4)")
        add("--mlp_width", type=positive(int), default=1000, help="MLP width (default 1000)")
        add("--cnn_num_blocks", type=positive(int), default=2,
            help="CNN blocks, each ending in a 2x2 max-pool (default 2)")
        add("--cnn_layers_per_block", type=positive(int), default=1,
            help="convolutions per block (default 1)")
        add("--cnn_feature_multiplier", type=positive(int), default=16,
            help="channels of the first block, doubled in each next one (default 16)")
        add("--mini_training_set_num_batches", type=positive(int), default=None,
            help="train on the first this many batches only (default: the whole set)")
        add("--mini_test_set_num_batches", type=positive(int), default=None,
            help="test on the first this many batches only (default: the whole set)")
    else:
        add("--training_data", default=None,
            help="ASCII text file to train on (default: CPython's reference documentation, "
                 "its first 90%%)")
        add("--test_data", default=None, help="ASCII text file to test on (with --training_data)")
        add("--num_layers", type=positive(int), default=6, help="transformer layers (default 6)")
        add("--num_heads", type=positive(int), default=8, help="attention heads (default 8)")
        add("--key_size", type=positive(int), default=32, help="key size per head (default 32)")
        add("--model_size", type=positive(int), default=128, help="model size (default 128)")
        add("--sequence_length", type=positive(int), default=64,
            help="characters of context (default 64)")
    for flag, name, key in OUTPUTS[:5]:
        what = {"eigenvalues": "the figure of the Hessian's operator norm, the SAM edge and 2/eta",
                "eigenvalues_se_only": "the same figure without 2/eta",
                "alignments": "the figure of the gradient's and the SAM gradient's alignment "
                              "with the top eigenvector",
                "loss": "the figure of the training loss",
                "raw": "the raw data, one line per check"}[key]
        if key in FIGURES:
            what += " (.pdf or .png)"
        add(f"--{flag}", default=None,
            help=f"where to write {what} (default {_in_tmp(name)}; '' writes none)")
    add("--num_principal_components", type=positive(int), default=1,
        help="number of top Hessian eigenvalues to compute (default 1)")

    added = p.add_argument_group("added here")
    add = added.add_argument
    add("--hessian_check_steps", type=positive(int), default=None,
        help="check the Hessian every this many steps (the first at step 0) instead of by "
             "time: reproducible runs")
    add("--num_steps", type=positive(int), default=None,
        help="stop after this many training steps (default: only the time limit stops)")
    add("--seed", type=seed, default=0,
        help="seed of the initialisation, the batch order and the power iteration (default 0)")
    add("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    add("--threads", type=positive(int), default=None,
        help=f"torch CPU threads (default: torch's, {torch.get_num_threads()} here); on a "
             "busy machine 1 can be much faster")
    if experiment == "image-classification":
        add("--data_dir", default=None,
            help="local MNIST or CIFAR-10 in torchvision's layout (the folder given to "
                 "torchvision's MNIST/CIFAR10 as root, or the folder with the files)")
    add("--output_dir", default=None,
        help=f"write every output into this folder, under the original's file names (default "
             f"{tempfile.gettempdir()})")
    add("--figure_format", choices=("pdf", "png"), default="pdf",
        help="the format of the figures whose path is not given (default pdf, the original's)")
    add("--run_record_output", default=None,
        help=f"where to write the JSON record of the run: arguments, environment, outcome "
             f"(default {_in_tmp(OUTPUTS[5][1])}; '' writes none)")
    return p


def _in_tmp(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), name)


def _normalize(argv, parser) -> list:
    """``--time-limit-in-hours=1`` -> ``--time_limit_in_hours=1`` for the parser's own flags."""
    out, known = [], set(parser._option_string_actions)
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--"):
            name, sep, value = token.partition("=")
            underscored = "--" + name[2:].replace("-", "_")
            if underscored in known:
                token = underscored + sep + value
        out.append(token)
    return out


def _resolve_outputs(args) -> dict:
    """Each output's path by key ('' for none), checked writable now, before any work."""
    folder = args.output_dir
    if folder is not None:
        problem = output_problem(folder, directory=True)
        if problem:
            raise SystemExit(f"--output_dir {folder!r}: cannot write there: {problem}")
    paths = {}
    for flag, name, key in OUTPUTS:
        given = getattr(args, flag)
        if given is None and key in FIGURES:
            name = os.path.splitext(name)[0] + "." + args.figure_format
        path = given if given is not None else os.path.join(folder or tempfile.gettempdir(), name)
        if path == "":
            paths[key] = ""
            continue
        where = f"--{flag} {path!r}" + ("" if given is not None else " (its default)")
        if key in FIGURES and os.path.splitext(path)[1].lower() not in (".pdf", ".png"):
            raise SystemExit(f"{where}: a figure's file name must end in .pdf or .png")
        # output_dir is created when the outputs are written: check the files as if it existed.
        problem = output_problem(path)
        if problem:
            raise SystemExit(f"{where}: cannot write it: {problem}")
        paths[key] = path
    chosen = [os.path.abspath(p) for p in paths.values() if p]
    if len(set(chosen)) < len(chosen):
        twice = sorted({p for p in chosen if chosen.count(p) > 1})
        raise SystemExit(f"two outputs would be written to the same file: {', '.join(twice)}")
    return paths


def _check(experiment: str, args) -> None:
    """The combinations the parser cannot see, refused before any data are read."""
    if args.hessian_check_gap is not None and args.hessian_check_steps is not None:
        raise SystemExit("give --hessian_check_gap (hours) or --hessian_check_steps (steps), "
                         "not both")
    if experiment == "image-classification":
        if args.dataset == "synthetic_digits" and args.data_dir is not None:
            raise SystemExit("--data_dir is read for --dataset mnist or cifar10; the default "
                             "dataset, synthetic_digits, is generated")
        if args.dataset != "synthetic_digits" and args.data_dir is None:
            raise SystemExit(f"--dataset {args.dataset} is read from local files: pass --data_dir "
                             "(torchvision's layout; nothing is downloaded), or leave --dataset "
                             "out for the generated synthetic digits")
        if args.nn_architecture == "MLP" and args.mlp_depth < 2:
            raise SystemExit(f"--mlp_depth must be at least 2 (an input and an output layer), "
                             f"got {args.mlp_depth}")
        for flag in ("mini_training_set_num_batches", "mini_test_set_num_batches"):
            if getattr(args, flag) is not None and args.batch_size is None:
                raise SystemExit(f"--{flag} counts batches: give --batch_size with it")
    else:
        if (args.training_data is None) != (args.test_data is None):
            raise SystemExit("give --training_data and --test_data together (or neither, for "
                             "the default text)")


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--device {text!r}: give cpu, cuda, cuda:N or auto")
    return runnable_device(text)  # refuses cuda where there is none


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    experiment = argv[0].replace("_", "-")
    if experiment not in EXPERIMENTS:
        raise SystemExit(f"unknown experiment {argv[0]!r}; choose image-classification (or "
                         f"image_classification) or transformer (see {PROG} --help)")
    parser = _parser(experiment)
    args = parser.parse_args(_normalize(argv[1:], parser))
    _check(experiment, args)
    device = _device(args.device)
    outputs = _resolve_outputs(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(experiment, args, device, outputs, PROG.split() + argv)
    finally:
        torch.set_num_threads(threads)


def _run(experiment: str, args, device: torch.device, outputs: dict, command: list) -> int:
    from . import experiment as exp
    from . import record, tasks
    from .data import DataError

    gap_hours = args.hessian_check_gap
    if gap_hours is None and args.hessian_check_steps is None:
        gap_hours = DEFAULTS[experiment]["hessian_check_gap"]
    env = record.environment(device)
    try:
        task = (tasks.image_classification if experiment == "image-classification"
                else tasks.transformer)(args, device)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    parameters = sum(p.numel() for p in task.model.parameters())
    print(f"data: {task.data}")
    print(f"model: {task.model.architecture}, {parameters} parameters, on {device} "
          f"({env.get('gpu') or env['cpu']}, {env['torch_threads']} torch threads)")
    for key in ("record", "raw"):
        if outputs[key]:
            os.makedirs(os.path.dirname(os.path.abspath(outputs[key])), exist_ok=True)
    schedule = exp.Schedule(
        step_size=args.step_size, rho=args.rho, time_limit_s=3600.0 * args.time_limit_in_hours,
        check_gap_s=None if gap_hours is None else 3600.0 * gap_hours,
        check_every=args.hessian_check_steps, num_steps=args.num_steps,
        num_principal_components=args.num_principal_components, seed=args.seed)
    result = exp.run(task, schedule, device, outputs, log=lambda line: print(line, flush=True))
    test_name, test_value = result.test
    print(f"stopped: {result.stopped} after {result.steps} steps and {len(result.rows)} checks "
          f"({result.wall_seconds:.1f} s)")
    print(f"{test_name.replace('_', ' ')}: {test_value:.5g}")
    if not result.rows:
        print("no check was made, so no figure was drawn")
    if outputs["record"]:
        resolved = dict(vars(args), hessian_check_gap=gap_hours, batch_size=task.batch_size)
        resolved.update({flag: outputs[key] for flag, _, key in OUTPUTS})
        env["load_average_at_end"] = record.load_average()
        record.write(outputs["record"], {
            "experiment": experiment,
            "command": shlex.join(command),
            "arguments": resolved,
            "data": task.data,
            "model": {"architecture": task.model.architecture, "parameters": parameters},
            "batch_size": task.batch_size,
            "optimizer": result.optimizer,
            "measurement": result.measurement,
            "environment": env,
            "result": {"stopped": result.stopped, "steps": result.steps,
                       "checks": len(result.rows), "wall_seconds": result.wall_seconds,
                       test_name: test_value,
                       "last_check": result.rows[-1] if result.rows else None},
            "columns": list(exp.columns(args.num_principal_components)),
            "outputs": {k: v for k, v in outputs.items() if v},
        })
    written = [p for k, p in outputs.items() if p and (k not in FIGURES or p in result.figures)]
    print("wrote: " + ", ".join(written))
    return 130 if result.stopped == "interrupted" else 0
