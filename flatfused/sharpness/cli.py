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
import csv
import importlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import sys
import time

import torch

from .._argtypes import Parser, nonnegative, output_path, positive, seed
from . import hf, text_data
from .batches import _batch_size
from .layers import PARAMS, PRESETS, LayerSelector

MEASURES = ("trace", "eigs", "density", "keskar", "noise")
DEFAULT_MEASURES = ("trace", "eigs", "density")
LOSSES = {
    "cross_entropy": torch.nn.functional.cross_entropy,
    "mse": torch.nn.functional.mse_loss,
    "nll": torch.nn.functional.nll_loss,
    "bce_logits": torch.nn.functional.binary_cross_entropy_with_logits,
    "causal_lm": hf.causal_lm_loss,
}


# What --out receives (the plot in the --plot-format chosen).
OUTPUT_FILES = ("sharpness.json", "layer_traces.csv", "sharpness.png", "sharpness.pdf")


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# resolving the user's objects
# --------------------------------------------------------------------------------------------

def resolve(spec: str, what: str):
    """``module:attr`` (attr may be dotted) or ``path/to/file.py:attr`` -> the object."""
    if ":" not in spec:
        raise UsageError(f"--{what} must look like module:attribute (e.g. mypkg.models:resnet20), "
                         f"got {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"--{what} {spec!r}: both the module and the attribute are needed")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UsageError(f"--{what}: no file {module_name!r}")
            name = "_flatfused_user_" + os.path.splitext(os.path.basename(module_name))[0]
            spec_ = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[name] = module  # so pickling/dataclasses in that file can find it
            spec_.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # the console script does not add it, python -m does
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--{what}: cannot import {module_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--{what}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _json_kwargs(text, what) -> dict:
    if text is None:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--{what} must be a JSON object, e.g. '{{\"width\": 16}}': {exc}") from exc
    if not isinstance(kwargs, dict):
        raise UsageError(f"--{what} must be a JSON object, got {text!r}")
    return kwargs


def _check_call(fn, kwargs: dict, spec: str, what: str) -> None:
    """Refuses keyword arguments that ``fn``'s signature cannot take, naming the flag; calling
    it with them raised a TypeError from deep inside the call instead."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call tell
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--{what} {json.dumps(kwargs)} do not fit {spec}: {exc}") from None


def _strip_prefix(state_dict, model, prefix=None):
    """The entries of ``state_dict`` for ``model``. DistributedDataParallel saves
    ``module.``-prefixed keys, torch.compile ``_orig_mod.``; a LightningModule saves its
    submodules' under their attribute names (``model.``): the one top-level name whose entries
    are exactly the model's is taken, or ``prefix`` (--checkpoint-prefix) when given."""
    if prefix:
        picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not picked:
            raise UsageError(f"--checkpoint-prefix {prefix!r}: no entry of the checkpoint's "
                             f"state_dict starts with it (first keys: {sorted(state_dict)[:5]})")
        return picked
    own = set(model.state_dict())
    for pre in ("module.", "_orig_mod."):
        if state_dict and not (set(state_dict) & own) and all(k.startswith(pre) for k in state_dict):
            state_dict = {k[len(pre):]: v for k, v in state_dict.items()}
    if state_dict and not (set(state_dict) & own):
        heads = sorted({k.split(".", 1)[0] for k in state_dict if "." in k})
        fits = [h for h in heads
                if {k[len(h) + 1:] for k in state_dict if k.startswith(h + ".")} == own]
        if len(fits) == 1:
            return {k[len(fits[0]) + 1:]: v for k, v in state_dict.items()
                    if k.startswith(fits[0] + ".")}
    return state_dict


def load_checkpoint(path, allow_pickle: bool):
    if not os.path.isfile(path):
        raise UsageError(f"--checkpoint: no file {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    # An empty, truncated or foreign file fails in one of these, and a pickled module whose
    # class cannot be imported here in ImportError or AttributeError: none is a bug to trace.
    except (EOFError, RuntimeError, OSError, ValueError, ImportError, AttributeError,
            pickle.UnpicklingError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else \
            type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError) and not allow_pickle:
            raise UsageError(
                f"--checkpoint {path!r} holds more than tensors (e.g. a whole pickled module), "
                "which torch.load refuses by default because unpickling runs code; pass "
                f"--allow-pickle if you trust the file ({reason})") from exc
        raise UsageError(f"--checkpoint {path!r}: torch.load cannot read it ({reason})") from exc


def build_model(args) -> torch.nn.Module:
    model = None
    if args.hf_model is not None:
        if args.model is not None:
            raise UsageError("pass --model or --hf-model, not both")
        if args.model_kwargs is not None:
            raise UsageError("--model-kwargs applies to a --model factory, not to --hf-model")
        try:
            # with a checkpoint, it supplies what the directory lacks (a fine-tuned head)
            model = hf.load_local(args.hf_model, args.hf_task, complete=args.checkpoint is None)
        except ValueError as exc:
            raise UsageError(f"--hf-model: {exc}") from None
    elif args.hf_task is not None:
        raise UsageError("--hf-task applies to --hf-model")
    if args.model is not None:
        obj = resolve(args.model, "model")
        if isinstance(obj, torch.nn.Module):
            if args.model_kwargs is not None:
                raise UsageError("--model-kwargs given, but --model names a module object, "
                                 "not a factory")
            model = obj
        elif callable(obj):
            kwargs = _json_kwargs(args.model_kwargs, "model-kwargs")
            _check_call(obj, kwargs, args.model, "model-kwargs")
            # seeded here, after the import, which may itself draw random numbers
            torch.manual_seed(args.seed)
            model = obj(**kwargs)
            if not isinstance(model, torch.nn.Module):
                raise UsageError(f"--model {args.model!r} returned {type(model).__name__}, "
                                 "not a torch.nn.Module")
        else:
            raise UsageError(f"--model {args.model!r} is a {type(obj).__name__}: name a factory "
                             "(a callable returning an nn.Module) or an nn.Module object")
    if args.checkpoint is None:
        if model is None:
            raise UsageError("pass --model (a factory or module), --hf-model, --checkpoint, or "
                             "a model with a --checkpoint")
        if args.checkpoint_prefix is not None:
            raise UsageError("--checkpoint-prefix applies to a --checkpoint")
        return model
    ckpt = load_checkpoint(args.checkpoint, args.allow_pickle)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), torch.nn.Module):
        ckpt = ckpt["model"]
    if isinstance(ckpt, torch.nn.Module):
        if model is not None:
            raise UsageError("--checkpoint holds a whole module; drop --model/--hf-model (or "
                             "save a state_dict)")
        return ckpt
    if model is None:
        raise UsageError("--checkpoint holds a state_dict: pass --model (or --hf-model) to build "
                         "the network it fits")
    if not isinstance(ckpt, dict):
        raise UsageError(f"--checkpoint holds a {type(ckpt).__name__}; expected a state_dict, a "
                         "module, or a dict with a 'state_dict' or 'model' entry")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UsageError(f"--checkpoint: found no state_dict (top-level keys: {sorted(ckpt)[:10]}); "
                         "expected a state_dict or a dict with a 'state_dict' or 'model' entry")
    try:
        model.load_state_dict(_strip_prefix(ckpt, model, args.checkpoint_prefix))
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())  # one line
        raise UsageError(f"--checkpoint does not fit the model (--checkpoint-prefix picks the "
                         f"entries of a submodule): {reason}") from exc
    return model


def _text_batches(args, model, device):
    """--text-data: a tokenised file or generated sequences, for a Hugging Face model."""
    if not hf.is_hf_model(model):
        raise UsageError("--text-data needs a Hugging Face model (--hf-model, or a --model "
                         "factory returning a transformers model)")
    task = args.hf_task or hf.task_of(model.config) or hf._task_of_class(model)
    if task is None:
        raise UsageError(f"--text-data: cannot tell whether {type(model).__name__} is a sequence "
                         f"classifier or a causal LM; pass --hf-task")
    if args.text_data != "random" and args.seq_len is not None:
        raise UsageError("--seq-len applies to --text-data random (a file's sequences have "
                         "their own length)")
    try:
        if args.text_data == "random":
            if not args.batches:
                raise UsageError("--text-data random needs a number of --batches (not 0)")
            data = text_data.generate(model.config, task, (args.batch_size or 128) * args.batches,
                                      args.seq_len or 32, args.seed)
        else:
            data = text_data.load_tokenized(args.text_data, model.config, task)
    except ValueError as exc:
        raise UsageError(f"--text-data: {exc}") from None
    return [tuple(_to(b, device) for b in batch)
            for batch in text_data.to_batches(data, args.batch_size or 128, args.batches)]


def _pair_of(batch):
    """A batch as ``(inputs, targets)``: a pair as it is, a dict with ``labels`` (Hugging Face
    style) split into the other entries and the labels."""
    if isinstance(batch, dict) and "labels" in batch:
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    raise UsageError(f"each batch must be an (inputs, targets) pair or a dict with 'labels', "
                     f"got a {type(batch).__name__}" + (f" of length {len(batch)}"
                                                       if isinstance(batch, (tuple, list)) else ""))


def build_batches(args, device, model=None):
    if args.text_data is not None:
        if args.data is not None or args.data_kwargs is not None:
            raise UsageError("pass --data or --text-data, not both")
        return _text_batches(args, model, device)
    if args.seq_len is not None:
        raise UsageError("--seq-len applies to --text-data random")
    if args.data is None:
        raise UsageError("pass --data (module:attr) or --text-data (a tokenised file or random)")
    obj = resolve(args.data, "data")
    from torch.utils.data import DataLoader, Dataset

    if not isinstance(obj, (Dataset, DataLoader, list, tuple)) and callable(obj):
        kwargs = _json_kwargs(args.data_kwargs, "data-kwargs")
        _check_call(obj, kwargs, args.data, "data-kwargs")
        obj = obj(**kwargs)
    elif args.data_kwargs is not None:
        raise UsageError("--data-kwargs given, but --data names data, not a function returning it")
    if isinstance(obj, Dataset):
        loader = DataLoader(obj, batch_size=args.batch_size or 128, shuffle=False)
    else:
        if args.batch_size is not None:
            raise UsageError("--batch-size applies to a Dataset; --data gave batches "
                             f"({type(obj).__name__}) whose size is already fixed")
        try:
            loader = iter(obj)
        except TypeError:
            raise UsageError(f"--data gave a {type(obj).__name__}: expected a Dataset, a DataLoader "
                             "or an iterable of (inputs, targets) batches") from None
    batches = []
    for batch in loader:
        batches.append(tuple(_to(b, device) for b in _pair_of(batch)))
        if args.batches and len(batches) == args.batches:
            break
    if not batches:
        raise UsageError("--data yielded no batches")
    return batches


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(e, device) for e in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def build_loss(spec):
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" not in spec:
        raise UsageError(f"--loss must be one of {sorted(LOSSES)} or module:attribute, got {spec!r}")
    obj = resolve(spec, "loss")
    if isinstance(obj, type):
        obj = obj()  # a loss class such as torch.nn.CrossEntropyLoss
    if not callable(obj):
        raise UsageError(f"--loss {spec!r} is not callable")
    return obj


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


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.6g}"
    return str(x)


def table(res: dict, header: str) -> str:
    rows = [("loss", _fmt(res["loss"]))]
    if "trace" in res:
        tr = res["trace"]
        count = f"{tr['products']} products" if tr["probes"] is None else f"{tr['probes']} probes"
        rows.append((f"Hessian trace ({tr['method']}, {count})", _fmt(tr["value"])))
        lay = res.get("layers")
        if lay and lay.get("types"):
            what = "weights" if lay["params"] == "weight" else "parameters"
            rows.append((f"  over {lay['count']} layers ({'/'.join(lay['types'])} {what}), "
                         f"{lay['numel']:,} parameters", ""))
        rows += [(f"  {name}", _fmt(v)) for name, v in tr["per_layer"].items()]
    if "top_eigenvalues" in res:
        ev = res["top_eigenvalues"]
        for i, v in enumerate(ev["values"]):
            rows.append((f"eigenvalue {i + 1} ({ev['method']})", _fmt(v)))
    if "density" in res:
        d = res["density"]
        nodes = [x for run in d["nodes"] for x in run]
        mean = sum(x * w for n, ws in zip(d["nodes"], d["weights"])
                   for x, w in zip(n, ws)) / len(d["nodes"])
        rows.append((f"density: Ritz values in ({d['iters']} steps x {d['runs']})",
                     f"[{_fmt(min(nodes))}, {_fmt(max(nodes))}]"))
        rows.append(("density: mean eigenvalue (trace / P)", _fmt(mean)))
    if "keskar" in res:
        k = res["keskar"]
        rows.append((f"Keskar sharpness (eps {k['epsilon']:g}, {k['steps']} steps)", _fmt(k["value"])))
    if "noise_stability" in res:
        ns = res["noise_stability"]
        rows.append((f"noise stability (sigma {ns['sigma']:g}, {ns['samples']} draws)",
                     f"{_fmt(ns['mean'])} +- {_fmt(ns['stderr'])}"))
        if "quadratic_prediction" in ns:
            rows.append(("  sigma^2/2 * trace (quadratic model)", _fmt(ns["quadratic_prediction"])))
    width = max(len(name) for name, _ in rows)
    lines = [header, f"{'quantity':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def plot(res: dict, path: str) -> str | None:
    """The eigenvalue density (log scale), the per-layer traces and the top eigenvalues, as
    far as they were measured; None when none was."""
    from . import _plot
    from .density import density_on_grid

    panels = [k for k in ("density", "trace", "top_eigenvalues") if k in res]
    if not panels:
        return None
    _plot.check_path(path)
    # the per-layer panel grows with the layers, so that each keeps a readable label
    heights = [max(3.0, 0.8 + 0.14 * len(res["trace"]["per_layer"])) if k == "trace" else 3.0
               for k in panels]
    fig, axes = _plot.figure(len(panels), heights=heights)
    for ax, kind in zip((a[0] for a in axes), panels):
        if kind == "density":
            d = res["density"]
            grid, dens = density_on_grid(d["nodes"], d["weights"])  # PyHessian-like defaults
            ax.semilogy(grid.tolist(), (dens + 1e-12).tolist())
            ax.set_ylim(bottom=float(dens.max()) * 1e-6)  # six decades, not the numerical floor
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density (SLQ)")
            ax.set_title("Hessian eigenvalue density", fontsize=10)
        elif kind == "trace":
            layers = res["trace"]["per_layer"]
            ax.barh(range(len(layers)), list(layers.values()))
            ax.set_yticks(range(len(layers)), list(layers), fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("trace of the diagonal block")
            ax.set_title(f"per-layer Hessian traces (total {res['trace']['value']:.4g})", fontsize=10)
        else:
            values = res["top_eigenvalues"]["values"]
            ax.bar([str(i + 1) for i in range(len(values))], values)
            ax.set_xlabel("rank")
            ax.set_ylabel("eigenvalue")
            ax.set_title("top Hessian eigenvalues", fontsize=10)
    return _plot.save(fig, path)


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


def write_layer_csv(res: dict, path: str) -> str:
    """The per-layer traces, one row per layer in the model's order (``index, layer, trace,
    numel, parameters``), then a ``total`` row with their sum (no index)."""
    lay = res["layers"]

    def number(x):  # full precision; NaN/inf as an empty field, as the tracker's CSV
        return repr(float(x)) if math.isfinite(x) else ""

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "layer", "trace", "numel", "parameters"])
        for i, (layer, value) in enumerate(res["trace"]["per_layer"].items()):
            writer.writerow([i, layer, number(value), lay["sizes"][layer],
                             " ".join(lay["parameters"][layer])])
        writer.writerow(["", "total", number(res["trace"]["value"]), lay["numel"], ""])
    return path


def _finite(x):
    """NaN/inf as null: strict JSON has neither."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
