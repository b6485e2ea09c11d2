"""Batches for a text model's Hessian: a tokenised local file, or generated token sequences.

Both give ``{"input_ids", "attention_mask", "labels"}`` tensors of ``N`` rows, checked against
the model's config (vocabulary, positions, labels) before anything is measured:

* ``.pt``: ``torch.save`` of a dict of tensors: ``input_ids`` (N, L) integers, optionally
  ``attention_mask`` (N, L) of 0/1 (default all 1) and ``labels``: (N,) class indices (or
  values for a one-label regression model) for a sequence classifier, (N, L) token ids with
  -100 for skipped tokens for a causal LM (default: ``input_ids``, -100 where the mask is 0).
* ``.jsonl``: one JSON object a line with the same keys as lists (``label`` is taken for
  ``labels``); sequences of different lengths are padded on the right (pad id, mask 0, LM
  label -100).
* generated (``random``): ``N`` sequences of ``seq_len`` tokens drawn uniformly from the
  vocabulary less its special tokens, with uniform class labels (or the tokens themselves for
  a causal LM), from a ``torch.Generator`` seeded with ``seed``.
"""
from __future__ import annotations

import json
import os

import torch

from .hf import IGNORE_INDEX

__all__ = ["load_tokenized", "generate", "to_batches"]


def _config_facts(config, task):
    vocab = int(config.vocab_size)
    positions = (getattr(config, "max_position_embeddings", None)
                 or getattr(config, "n_positions", None))
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if positions is not None and "roberta" in getattr(config, "model_type", ""):
        # RoBERTa numbers positions from padding_idx + 1: that many fewer tokens fit
        positions -= (0 if pad is None else int(pad)) + 1
    num_labels = getattr(config, "num_labels", None) if task == "sequence-classification" else None
    return vocab, positions, (0 if pad is None else int(pad)), num_labels


def _pad_rows(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def jsonl_records(path):
    """``(line number, value)`` of each non-blank line of a JSON-lines file; a line that is not
    JSON is a ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None


def _read_jsonl(path, task, pad):
    ids, masks, labels = [], [], []
    for number, rec in jsonl_records(path):
        tokens = rec.get("input_ids") if isinstance(rec, dict) else None
        if not isinstance(tokens, list) or not tokens \
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError(f"{path}:{number}: expected an object with a non-empty "
                             "'input_ids' list of integers")
        n = len(rec["input_ids"])
        mask = rec.get("attention_mask", [1] * n)
        if not isinstance(mask, list) or len(mask) != n:
            raise ValueError(f"{path}:{number}: 'attention_mask' must be a list as long as "
                             "'input_ids'")
        label = rec.get("labels", rec.get("label"))
        if task == "causal-lm":
            label = rec["input_ids"] if label is None else label
            if not isinstance(label, list) or len(label) != n:
                raise ValueError(f"{path}:{number}: a causal LM's 'labels' must be a list as "
                                 "long as 'input_ids'")
            label = [t if m else IGNORE_INDEX for t, m in zip(label, mask)]
        elif label is None or isinstance(label, (list, dict, str, bool)):
            raise ValueError(f"{path}:{number}: a sequence classifier needs a numeric "
                             "'labels' (or 'label') per record")
        ids.append(rec["input_ids"])
        masks.append(mask)
        labels.append(label)
    if not ids:
        raise ValueError(f"{path} holds no records")
    out = {"input_ids": _pad_rows(ids, pad), "attention_mask": _pad_rows(masks, 0)}
    if task == "causal-lm":
        out["labels"] = _pad_rows(labels, IGNORE_INDEX)
    else:
        out["labels"] = torch.tensor(labels)
    return out


def _read_pt(path, task):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path}: torch.load cannot read it ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("input_ids"), torch.Tensor):
        raise ValueError(f"{path} must hold a dict with an 'input_ids' tensor")
    extra = sorted(set(obj) - {"input_ids", "attention_mask", "labels"})
    if extra:
        raise ValueError(f"{path}: unexpected entries {extra} (input_ids, attention_mask, labels)")
    out = {k: v for k, v in obj.items()}
    if not isinstance(out.get("attention_mask", torch.empty(0)), torch.Tensor) \
            or not isinstance(out.get("labels", torch.empty(0)), torch.Tensor):
        raise ValueError(f"{path}: attention_mask and labels must be tensors")
    return out


def _check(data, task, vocab, positions, num_labels, where):
    ids = data["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0:
        raise ValueError(f"{where}: input_ids must be a non-empty (N, L) integer tensor, got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    n, length = ids.shape
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{where}: input_ids hold {lo if lo < 0 else hi}, outside the model's "
                         f"vocabulary [0, {vocab})")
    if positions is not None and length > positions:
        raise ValueError(f"{where}: sequences of {length} tokens exceed the model's "
                         f"{positions} positions")
    mask = data.setdefault("attention_mask", torch.ones_like(ids))
    if mask.shape != ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{where}: attention_mask must be 0/1 and shaped like input_ids "
                         f"{tuple(ids.shape)}")
    data["attention_mask"] = mask.long()
    if task == "causal-lm":
        labels = data.setdefault("labels", ids.masked_fill(mask == 0, IGNORE_INDEX))
        if labels.shape != ids.shape or labels.dtype.is_floating_point:
            raise ValueError(f"{where}: a causal LM's labels must be integers shaped like "
                             f"input_ids {tuple(ids.shape)}")
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"{where}: labels hold {int(labels[bad][0])}, neither -100 nor in "
                             f"the vocabulary [0, {vocab})")
        data["labels"] = labels.long()
    else:
        if "labels" not in data:
            raise ValueError(f"{where}: a sequence classifier needs labels")
        labels = data["labels"]
        if labels.shape != (n,):
            raise ValueError(f"{where}: a sequence classifier's labels must be one per sequence "
                             f"({n},), got {tuple(labels.shape)}")
        if num_labels == 1:  # regression targets: floating point as given
            if not labels.dtype.is_floating_point:
                data["labels"] = labels.to(torch.get_default_dtype())
        else:
            if labels.dtype.is_floating_point and not bool((labels == labels.round()).all()):
                raise ValueError(f"{where}: class labels must be integers")
            labels = labels.long()
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_labels:
                raise ValueError(f"{where}: labels hold {lo if lo < 0 else hi}, outside the "
                                 f"model's {num_labels} classes")
            data["labels"] = labels
    return data


def load_tokenized(path, config, task: str) -> dict:
    """The tensors of a tokenised ``.pt`` or ``.jsonl`` file, checked against ``config``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no file {path!r}")
    vocab, positions, pad, num_labels = _config_facts(config, task)
    if path.endswith(".jsonl"):
        data = _read_jsonl(path, task, pad)
    elif path.endswith(".pt"):
        data = _read_pt(path, task)
    else:
        raise ValueError(f"{path!r}: a tokenised file is .pt (torch.save of tensors) or .jsonl")
    return _check(data, task, vocab, positions, num_labels, path)


def generate(config, task: str, num_samples: int, seq_len: int, seed: int) -> dict:
    """``num_samples`` random sequences of ``seq_len`` tokens (see the module's docstring)."""
    vocab, positions, _, num_labels = _config_facts(config, task)
    if positions is not None and seq_len > positions:
        raise ValueError(f"a sequence length of {seq_len} exceeds the model's {positions} "
                         "positions")
    special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    ordinary = torch.tensor([t for t in range(vocab) if t not in special])
    if ordinary.numel() == 0:
        raise ValueError("the vocabulary has only special tokens")
    gen = torch.Generator().manual_seed(int(seed))
    ids = ordinary[torch.randint(0, ordinary.numel(), (num_samples, seq_len), generator=gen)]
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "causal-lm":
        data["labels"] = ids.clone()
    elif num_labels == 1:
        data["labels"] = torch.randn(num_samples, generator=gen)
    else:
        data["labels"] = torch.randint(0, num_labels, (num_samples,), generator=gen)
    return _check(data, task, vocab, positions, num_labels, "generated data")


def to_batches(data: dict, batch_size: int, limit: int = 0):
    """``(inputs, labels)`` batches of ``batch_size`` rows in order, the first ``limit`` (0:
    all); inputs a dict of ``input_ids`` and ``attention_mask``."""
    n = data["input_ids"].shape[0]
    out = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        out.append(({"input_ids": data["input_ids"][rows],
                     "attention_mask": data["attention_mask"][rows]}, data["labels"][rows]))
        if limit and len(out) == limit:
            break
    return out
