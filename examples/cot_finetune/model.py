"""The language model: a local pretrained directory, or a tiny GPT-2 built from a config."""
from __future__ import annotations

import os

import torch

__all__ = ["tiny_gpt2", "load_model"]


def tiny_gpt2(vocab_size: int, max_length: int, pad_token_id: int = 0, bos_token_id: int = 2,
              eos_token_id: int = 3, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
              seed: int = 0):
    """A randomly initialised ``GPT2LMHeadModel`` (seeded) with ``max_length`` positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, pad_token_id=pad_token_id,
                        bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def load_model(data, model_dir=None, seed: int = 0, **tiny):
    """The model for ``data`` (a ``CoTData``): ``model_dir`` loaded with
    ``AutoModelForCausalLM`` (its tokenizer must be the data's: pass ``tokenizer_dir`` to
    ``load_cot_data``), else ``tiny_gpt2`` sized to the data's tokenizer (``tiny``: its
    sizes)."""
    tok = data.tokenizer
    if model_dir is None:
        bos = getattr(tok, "bos_token_id", None)
        return tiny_gpt2(len(tok), data.max_length, tok.pad_token_id,
                         tok.eos_token_id if bos is None else bos, tok.eos_token_id, seed=seed,
                         **tiny)
    if tiny:
        raise ValueError(f"{sorted(tiny)} size a tiny model; model_dir gives its own")
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir!r} is not a saved model (no config.json; a local "
                         "directory, hub names are not loaded)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, the model's embeddings "
                         f"{model.config.vocab_size}: load the model's own tokenizer "
                         "(tokenizer_dir)")
    return model
