"""Hugging Face models in the sharpness tools: a saved model directory, dict batches, logits.

The Hessian tools call ``criterion(model(inputs), targets)``. A ``transformers`` model takes
its inputs as keyword arguments and returns a ``ModelOutput``; ``hf_logits(model)`` bridges
the two without wrapping the model (so parameter and layer names stay the model's own)::

    from flatfused.sharpness import hessian_trace
    from flatfused.sharpness.hf import causal_lm_loss, hf_logits

    batch = ({"input_ids": ids, "attention_mask": mask}, labels)
    with hf_logits(model):
        total, per_layer = hessian_trace(model, causal_lm_loss, batch, layers="linear",
                                         per_layer=True)

Models are loaded only from a local directory (``config.json`` and the weights, as
``save_pretrained`` writes them), never by a hub name, with eager attention: the fused
attention kernels have no double backward, which the Hessian-vector products need.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping

import torch

__all__ = ["TASKS", "load_local", "hf_logits", "causal_lm_loss", "is_hf_model", "task_of",
           "default_loss"]

# --hf-task: the Auto class that loads each kind of model.
TASKS = {"sequence-classification": "AutoModelForSequenceClassification",
         "causal-lm": "AutoModelForCausalLM"}

IGNORE_INDEX = -100  # the label of tokens the loss skips (padding, prompts), as in transformers


def is_hf_model(model) -> bool:
    """A ``transformers.PreTrainedModel`` (without importing transformers when it is not)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def task_of(config) -> str | None:
    """``"sequence-classification"`` or ``"causal-lm"`` from a config's ``architectures`` (what
    ``save_pretrained`` records), None when they say neither."""
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
    return None


def default_loss(model) -> str:
    """The loss a model's task trains with: ``causal_lm`` for a language model, ``mse`` for a
    one-output (regression) classifier, else ``cross_entropy``."""
    task = task_of(model.config) or _task_of_class(model)
    if task == "causal-lm":
        return "causal_lm"
    if getattr(model.config, "num_labels", 2) == 1:
        return "mse"
    return "cross_entropy"


def _task_of_class(model) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    return None


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info logging while loading: the command's stderr is its own."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_local(path, task: str | None = None, complete: bool = True) -> torch.nn.Module:
    """The model saved in the directory ``path``, by ``AutoModelForSequenceClassification`` or
    ``AutoModelForCausalLM`` (``task``, or what the config's ``architectures`` say), in eval
    mode, with eager attention. ``ValueError`` with the reason for anything that is not such a
    directory; nothing is ever downloaded. ``complete``: refuse weights that the directory
    lacks (transformers would initialise them at random, e.g. a classifier loaded as a causal
    LM); pass False when a checkpoint supplies them next."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory (a model saved with save_pretrained; "
                         "hub names are not loaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} has no config.json (save the model with save_pretrained)")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("loading a Hugging Face model needs transformers: pip install "
                         "transformers") from exc
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}/config.json cannot be read: {_first_line(exc)}") from exc
        task = task or task_of(config)
        if task is None:
            raise ValueError(f"{path}: config.json names the architectures "
                             f"{getattr(config, 'architectures', None)}, neither a sequence "
                             f"classifier nor a causal LM; pass the task ({', '.join(TASKS)})")
        auto = getattr(transformers, TASKS[task])
        try:
            model, info = auto.from_pretrained(path, local_files_only=True,
                                               attn_implementation="eager",
                                               output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{path}: {TASKS[task]} cannot load it: {_first_line(exc)}") from exc
    missing = sorted(set(info.get("missing_keys", ())) | {
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())})
    if complete and missing:
        raise ValueError(f"{path}: {TASKS[task]} finds no saved weights for {len(missing)} "
                         f"entries ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
                         f"), which it would initialise at random; is the task right?")
    return model.eval()


def _first_line(exc) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def hf_logits(model: torch.nn.Module):
    """While active, ``model(inputs)`` with a dict ``inputs`` calls ``model(**inputs)``, the
    model returns its ``logits`` (squeezed to one value per sample for a one-label sequence
    classifier, the shape its regression loss compares), and its attention runs eagerly (the
    fused kernels have no double backward). Hooks, removed on exit, and the attention put
    back: the model and its parameter names are unchanged."""
    squeeze = (_task_of_class(model) == "sequence-classification"
               and getattr(model.config, "num_labels", 2) == 1)
    attention = getattr(model.config, "_attn_implementation", None)
    switch = isinstance(attention, str) and attention != "eager" \
        and hasattr(model, "set_attn_implementation")

    def as_kwargs(module, args, kwargs):
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            return (), dict(args[0])
        return None

    def logits(module, args, kwargs, output):
        out = output.logits if hasattr(output, "logits") else output
        return out.squeeze(-1) if squeeze else out

    if switch:
        model.set_attn_implementation("eager")
    handles = [model.register_forward_pre_hook(as_kwargs, with_kwargs=True),
               model.register_forward_hook(logits, with_kwargs=True)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        if switch:
            model.set_attn_implementation(attention)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy as ``transformers`` computes a causal LM's loss: the logits at
    position t predict the label at t + 1, labels of -100 are skipped, mean over the tokens
    counted. ``ValueError`` when a batch has no token to count."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm expects logits (batch, length, vocab) and labels (batch, "
                         f"length), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        raise ValueError("causal_lm: every label after the first position is -100 (no token "
                         "to predict)")
    if shift_logits.dtype not in (torch.float32, torch.float64):  # half precision: upcast
        shift_logits = shift_logits.float()
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
