"""The classifier: a local pretrained model directory, or a tiny RoBERTa built from a config."""
from __future__ import annotations

import os

import torch

__all__ = ["tiny_roberta", "load_model"]


def tiny_roberta(vocab_size: int, num_labels: int, max_length: int, pad_token_id: int = 0,
                 bos_token_id: int = 2, eos_token_id: int = 3, hidden_size: int = 32,
                 num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 64,
                 seed: int = 0):
    """A randomly initialised ``RobertaForSequenceClassification`` (seeded) for sequences of
    up to ``max_length`` tokens (RoBERTa numbers positions from ``pad_token_id + 1``)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           intermediate_size=intermediate_size,
                           max_position_embeddings=max_length + pad_token_id + 1,
                           num_labels=num_labels, pad_token_id=pad_token_id,
                           bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(config)


def load_model(task, model_dir=None, seed: int = 0, **tiny):
    """The model for ``task`` (a ``TextClassificationTask``): ``model_dir`` loaded with
    ``AutoModelForSequenceClassification`` and ``num_labels`` of the task (a base model gets
    a new, seeded head), else ``tiny_roberta`` sized to the task's tokenizer (``tiny``: its
    sizes)."""
    if model_dir is None:
        tok = task.tokenizer
        return tiny_roberta(len(tok), task.num_labels, task.max_length, tok.pad_token_id,
                            tok.bos_token_id, tok.eos_token_id, seed=seed, **tiny)
    if tiny:
        raise ValueError(f"{sorted(tiny)} size a tiny model; model_dir gives its own")
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir!r} is not a saved model (no config.json; a local "
                         "directory, hub names are not loaded)")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=task.num_labels, local_files_only=True)
    if len(task.tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(task.tokenizer)} tokens, the model's "
                         f"embeddings {model.config.vocab_size}: use the model's own tokenizer")
    return model
