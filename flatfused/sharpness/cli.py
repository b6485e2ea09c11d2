"""``flatfused sharpness``: measure a saved model's flatness on a dataset the user names.

    flatfused sharpness --model mypkg.models:resnet20 --checkpoint run/final.pt \\
        --data mypkg.data:cifar10_train --batch-size 128 --batches 4 \\
        --measure trace,eigs,density,keskar --sigma 0.01 --out results/
    flatfused sharpness --hf-model runs/roberta-final --text-data train.jsonl \\
        --batch-size 16 --batches 4 --layers linear --measure trace,eigs --out results/

The model, data and loss are Python import paths ``module:attribute`` (``module`` may also be a
``.py`` file path; the current directory is importable), or a saved Hugging Face model
directory with tokenised or generated text. Everything is measured on the same first
``--batches`` batches, which are read once and kept on the device, so every measurement sees
the same data. The model is measured in eval mode (BatchNorm running statistics, no dropout),
as the Hessian tools do. ``--layers`` and its refinements choose the parameters of the Hessian
measurements and group the per-layer traces (``flatfused/sharpness/layers.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from .._argtypes import Parser, nonnegative, output_path, positive, seed
from . import hf
from .batches import _batch_size
from .cli_inputs import LOSSES, UsageError, build_batches, build_loss, build_model
from .cli_report import _finite, plot, table, write_layer_csv
from .layers import PARAMS, PRESETS, LayerSelector

MEASURES = ("trace", "eigs", "density", "keskar", "noise")
DEFAULT_MEASURES = ("trace", "eigs", "density")


# What --out receives (the plot in the --plot-format chosen).
OUTPUT_FILES = ("sharpness.json", "layer_traces.csv", "sharpness.png", "sharpness.pdf")


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="flatfused sharpness",
        description="Measure a saved model's flatness on a dataset: Hessian trace (and per-layer "
                    "traces), top eigenvalues, spectral density, Keskar sharpness, noise stability.")
    src = p.add_argument_group("model and data")
    src.add_argument("--model", help="module:factory (a callable returning an nn.Module) or "
                                     "module:object (an nn.Module)")
    src.add_argument("--model-kwargs", help="JSON object of keyword arguments for the factory")
    src.add_argument("--checkpoint", help="torch.save file: a state_dict, a dict with a "
                                          "'state_dict'/'model' entry, or a whole module")
    src.add_argument("--allow-pickle", action="store_true",
                     help="load a checkpoint that is more than tensors (runs its pickled code: "
                          "trusted files only)")
    src.add_argument("--checkpoint-prefix",
                     help="take the checkpoint's state_dict entries under this prefix (e.g. "
                          "'model.' of a LightningModule; found by itself when unambiguous)")
    src.add_argument("--hf-model", metavar="DIR",
                     help="a Hugging Face model saved with save_pretrained (config.json and "
                          "weights; a local directory, never a hub name)")
    src.add_argument("--hf-task", choices=tuple(hf.TASKS),
                     help="how to load --hf-model (default: from config.json's architectures)")
    src.add_argument("--data",
                     help="module:attr giving (or a function returning) a Dataset, a DataLoader "
                          "or an iterable of (inputs, targets) batches or of dicts with 'labels'")
    src.add_argument("--text-data", metavar="FILE|random",
                     help="for a Hugging Face model: a tokenised .pt or .jsonl file, or random "
                          "(generated token sequences, --seq-len long, --batches x --batch-size)")
    src.add_argument("--seq-len", type=positive(int),
                     help="tokens per generated sequence for --text-data random (default 32)")
    src.add_argument("--data-kwargs", help="JSON object of keyword arguments for the data function")
    src.add_argument("--batch-size", type=positive(int), help="batch size for a Dataset (default 128)")
    src.add_argument("--batches", type=nonnegative(int), default=10,
                     help="measure on the first N batches (default 10; 0: all)")
    src.add_argument("--loss", default=None,
                     help=f"{', '.join(LOSSES)} or module:attr (a function or a loss class); "
                          "mean-reduced (default: a Hugging Face model's own, causal_lm or "
                          "cross_entropy, mse for one label; else cross_entropy)")
    src.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    src.add_argument("--seed", type=seed, default=0,
                     help="seed of the probes and the noise, in [0, 2**63) (default 0)")
    lay = p.add_argument_group(
        "layers (the parameters of trace, eigs and density, and the per-layer traces)")
    lay.add_argument("--layers", choices=tuple(PRESETS), default=None,
                     help="parameters: every trainable parameter its own block (default); "
                          "linear: the weights of the Linear and Conv1D layers outside "
                          "embeddings, LayerNorm and the pooler (the NSO papers' per-layer "
                          "traces); the options below refine a preset")
    lay.add_argument("--layer-types", metavar="TYPES",
                     help="comma-separated module class names (subclasses included), e.g. "
                          "Linear,Conv2d: a layer per such module")
    lay.add_argument("--include", metavar="REGEX",
                     help="keep the layers (parameters) whose name matches (re.search)")
    lay.add_argument("--exclude", metavar="REGEX",
                     help="drop the layers (parameters) whose name matches; '' clears a "
                          "preset's exclusion")
    lay.add_argument("--layer-params", choices=PARAMS, default=None,
                     help="with layer types: each layer's weight (default) or all its "
                          "parameters")
    m = p.add_argument_group("measurements")
    m.add_argument("--measure", default=None,
                   help=f"comma-separated from {', '.join(MEASURES)}, or all (default "
                        f"{','.join(DEFAULT_MEASURES)}, plus noise when --sigma is given); "
                        "trace includes the per-layer traces")
    m.add_argument("--hvp", choices=("autograd", "finite_difference"), default="autograd",
                   help="Hessian-vector products by double backward or finite differences")
    m.add_argument("--fd-eps", type=positive(float), default=1e-3,
                   help="finite-difference step along a unit vector (default 1e-3)")
    m.add_argument("--probes", type=positive(int), default=100, help="trace probes (default 100)")
    m.add_argument("--trace-method", choices=("hutchinson", "hutch++", "exact"),
                   default="hutchinson",
                   help="exact: one product per selected parameter entry (small models)")
    m.add_argument("--top-k", type=positive(int), default=3, help="top eigenvalues (default 3)")
    m.add_argument("--eig-method", choices=("power", "lanczos"), default="power")
    m.add_argument("--eig-iters", type=positive(int), default=100,
                   help="power: products per eigenvalue at most; lanczos: steps (default 100)")
    m.add_argument("--eig-tol", type=positive(float), default=1e-3)
    m.add_argument("--density-iters", type=positive(int), default=80, help="SLQ Lanczos steps")
    m.add_argument("--density-runs", type=positive(int), default=1, help="SLQ start vectors")
    m.add_argument("--keskar-epsilon", type=positive(float), default=1e-4)
    m.add_argument("--keskar-steps", type=nonnegative(int), default=100)
    m.add_argument("--keskar-lr", type=positive(float), default=1e-3)
    m.add_argument("--sigma", type=positive(float), help="noise scale of the noise stability")
    m.add_argument("--noise-samples", type=positive(int), default=32)
    o = p.add_argument_group("output")
    # Checked while parsing: an unwritable directory used to fail after every measurement.
    o.add_argument("--out", type=output_path(directory=True, files=OUTPUT_FILES),
                   help="directory for sharpness.json, layer_traces.csv and the plot (checked "
                        "before measuring)")
    o.add_argument("--plot-format", choices=("png", "pdf"), default="png")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    return p


def _measures(args):
    if args.measure is None:
        chosen = list(DEFAULT_MEASURES) + (["noise"] if args.sigma is not None else [])
    else:
        chosen = [s.strip() for s in args.measure.split(",") if s.strip()]
        if chosen == ["all"]:
            chosen = list(MEASURES)
        unknown = sorted(set(chosen) - set(MEASURES))
        if unknown or not chosen:
            raise UsageError(f"--measure: unknown {unknown or chosen!r}; choose from "
                             f"{', '.join(MEASURES)} or all")
    if "noise" in chosen and args.sigma is None:
        raise UsageError("the noise stability needs --sigma")
    return [m for m in MEASURES if m in chosen]


def layer_selector(args):
    """The LayerSelector of --layers and its refinements (None: every parameter, as before)."""
    refined = {k: v for k, v in (("types", args.layer_types), ("include", args.include),
                                 ("exclude", args.exclude), ("params", args.layer_params))
               if v is not None}
    if args.layers is None and not refined:
        return None
    if args.layers == "parameters" and "types" in refined:
        raise UsageError("--layers parameters selects parameters, --layer-types modules: "
                         "pass one of them")
    try:  # a preset's fields, those given replacing them; else only those given
        selector = LayerSelector.preset(args.layers, **refined) if args.layers else \
            LayerSelector(**refined)
    except ValueError as exc:
        raise UsageError(f"--layers: {exc}") from None
    if not selector.by_module and "params" in refined:
        raise UsageError("--layer-params applies to layers chosen by --layer-types (or "
                         "--layers linear)")
    return selector


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

def _stage(name, enabled):
    if enabled:
        sys.stderr.write(f"flatfused sharpness: {name} ...\n")
        sys.stderr.flush()


def measure(model, loss_fn, batches, measures, args) -> dict:
    """Every requested measurement on ``batches`` (a list of (inputs, targets)); the results as
    a JSON-ready dict. This is what the command runs, callable from Python."""
    from . import (hessian_trace, keskar_sharpness, mean_loss, noise_stability,
                   spectral_density, top_eigenvalues)

    progress = not args.no_progress
    data = batches[0] if len(batches) == 1 else batches
    params = [p for p in model.parameters() if p.requires_grad]
    res = {"num_params": sum(p.numel() for p in params),
           "param_bytes": sum(p.numel() * p.element_size() for p in params),
           "num_batches": len(batches),
           "num_samples": sum(_batch_size(b[0]) for b in batches),
           "measures": list(measures), "seconds": {}}
    selector = getattr(args, "layer_selector", None)
    blocks = (selector or LayerSelector()).blocks(model)
    sizes = dict(model.named_parameters())
    res["layers"] = {"preset": getattr(args, "layers", None),
                     **(selector or LayerSelector()).describe(),
                     "count": len(blocks),
                     "numel": sum(sizes[n].numel() for names in blocks.values() for n in names),
                     "parameters": {layer: list(names) for layer, names in blocks.items()},
                     "sizes": {layer: sum(sizes[n].numel() for n in names)
                               for layer, names in blocks.items()}}
    model.eval()
    with torch.no_grad():
        res["loss"] = mean_loss(model, loss_fn, batches)
    common = dict(seed=args.seed, progress=progress, hvp_method=args.hvp, fd_eps=args.fd_eps,
                  layers=selector)
    if "trace" in measures:
        t = time.perf_counter()
        exact = args.trace_method == "exact"
        # exact: the unit vectors share each pass over the data 64 at a time (same results)
        total, layers = hessian_trace(model, loss_fn, data, num_probes=args.probes,
                                      method=args.trace_method, per_layer=True,
                                      probe_chunk=64 if exact else 1, **common)
        res["trace"] = {"value": total, "method": args.trace_method,
                        "probes": None if exact else args.probes,
                        "products": res["layers"]["numel"] if exact else args.probes,
                        "per_layer": layers}
        res["seconds"]["trace"] = time.perf_counter() - t
    if "eigs" in measures:
        t = time.perf_counter()
        values = top_eigenvalues(model, loss_fn, data, k=args.top_k, method=args.eig_method,
                                 iters=args.eig_iters, tol=args.eig_tol, **common)
        res["top_eigenvalues"] = {"values": values, "method": args.eig_method,
                                  "iters": args.eig_iters}
        res["seconds"]["eigs"] = time.perf_counter() - t
    if "density" in measures:
        t = time.perf_counter()
        nodes, weights = spectral_density(model, loss_fn, data, iters=args.density_iters,
                                          n_v=args.density_runs, **common)
        res["density"] = {"nodes": nodes, "weights": weights, "iters": args.density_iters,
                          "runs": args.density_runs}
        res["seconds"]["density"] = time.perf_counter() - t
    if "keskar" in measures:
        _stage(f"Keskar sharpness ({args.keskar_steps} ascent steps)", progress)
        t = time.perf_counter()
        value = keskar_sharpness(model, loss_fn, batches, epsilon=args.keskar_epsilon,
                                 steps=args.keskar_steps, lr=args.keskar_lr)
        res["keskar"] = {"value": value, "epsilon": args.keskar_epsilon,
                         "steps": args.keskar_steps, "lr": args.keskar_lr}
        res["seconds"]["keskar"] = time.perf_counter() - t
    if "noise" in measures:
        _stage(f"noise stability ({args.noise_samples} draws)", progress)
        t = time.perf_counter()
        ns = noise_stability(model, loss_fn, batches, sigma=args.sigma,
                             num_samples=args.noise_samples, seed=args.seed)
        res["noise_stability"] = {"mean": ns.mean, "stderr": ns.stderr, "sigma": args.sigma,
                                  "samples": args.noise_samples}
        # second-order prediction E[L(w+u)] - L(w) ~ sigma^2/2 tr(H): the noise moves every
        # trainable parameter, so only a trace over all of them predicts it
        if "trace" in res and res["layers"]["numel"] == res["num_params"]:
            res["noise_stability"]["quadratic_prediction"] = args.sigma ** 2 / 2 * res["trace"]["value"]
        res["seconds"]["noise"] = time.perf_counter() - t
    return res


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help or an argparse error: return its status, do not exit
        return int(exc.code or 0)
    try:
        return _run(args)
    except (UsageError, ValueError) as exc:  # ValueError: the measurements' argument checks
        print(f"flatfused sharpness: error: {exc}", file=sys.stderr)
        return 2


def _check_loss(model, loss_fn, batch, spec) -> None:
    """One loss on the first batch, in eval mode as measured: a --loss, --model and --data that
    do not fit each other are refused in one line, not by a traceback from the first measure."""
    inputs, targets = batch
    model.eval()
    try:
        with torch.no_grad():
            loss = loss_fn(model(inputs), targets)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(f"--loss {spec} on the model's output for the first batch of --data "
                         f"failed ({type(exc).__name__}: {reason})") from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UsageError(f"--loss {spec} must give one number (mean-reduced), gave {shape}")


def _run(args) -> int:
    measures = _measures(args)
    args.layer_selector = layer_selector(args)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):  # meta or mps failed inside the first measurement
        raise UsageError(f"--device {args.device}: the measurements run on cpu or cuda")
    if args.loss is not None:
        build_loss(args.loss)  # a bad --loss is refused before the model is loaded
    model = build_model(args).to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError("the model has no parameters with requires_grad")
    if args.layer_selector is not None:
        try:
            args.layer_selector.blocks(model)
        except ValueError as exc:
            raise UsageError(f"--layers: {exc}") from None
    if args.loss is None:  # a transformers model's own loss, else cross entropy
        args.loss = hf.default_loss(model) if hf.is_hf_model(model) else "cross_entropy"
    loss_fn = build_loss(args.loss)
    batches = build_batches(args, device, model)
    # a transformers model is called with the batch's dict as keyword arguments, for its logits
    calling = hf.hf_logits(model) if hf.is_hf_model(model) else contextlib.nullcontext()
    with calling:
        _check_loss(model, loss_fn, batches[0], args.loss)
        res = measure(model, loss_fn, batches, measures, args)
    res.update(model=args.model, hf_model=args.hf_model, checkpoint=args.checkpoint,
               data=args.data, text_data=_text_data_label(args), loss_fn=args.loss,
               device=str(device), seed=args.seed, hvp=args.hvp,
               fd_eps=args.fd_eps if args.hvp == "finite_difference" else None)
    header = (f"flatfused sharpness: {res['num_params']:,} parameters ({res['param_bytes']:,} B), "
              f"{res['num_batches']} batches / {res['num_samples']} samples on {device}"
              + (" (generated tokens)" if args.text_data == "random" else ""))
    print(table(res, header))
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        json_path = os.path.join(args.out, "sharpness.json")
        written = [json_path]
        if "trace" in res:
            written.append(write_layer_csv(res, os.path.join(args.out, "layer_traces.csv")))
        if not args.no_plot:
            res["plot"] = plot(res, os.path.join(args.out, f"sharpness.{args.plot_format}"))
            if res["plot"]:
                written.append(res["plot"])
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(_finite(res), f, indent=1, allow_nan=False)
        print("wrote " + ", ".join(written))
    return 0


def _text_data_label(args):
    if args.text_data == "random":
        return f"random (generated: {args.seq_len or 32} tokens per sequence, seed {args.seed})"
    return args.text_data


