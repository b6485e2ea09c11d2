"""The inputs of ``flatfused sharpness``: the user's model, checkpoint, data and loss, resolved
from import paths (``module:attribute``) or a saved Hugging Face model, each checked early with
a one-line :class:`UsageError` naming the flag."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pickle
import sys

import torch

from . import hf, text_data

LOSSES = {
    "cross_entropy": torch.nn.functional.cross_entropy,
    "mse": torch.nn.functional.mse_loss,
    "nll": torch.nn.functional.nll_loss,
    "bce_logits": torch.nn.functional.binary_cross_entropy_with_logits,
    "causal_lm": hf.causal_lm_loss,
}


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""



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
