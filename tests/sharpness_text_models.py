"""Tiny transformers for the per-layer Hessian tests, built from configs (nothing downloads),
and a ``--model`` factory for the Lightning-checkpoint test."""
import torch

VOCAB = 24
PAD = 1


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def roberta(num_labels=3, dtype=torch.float64, seed=0, pooler=False):
    """RoBERTa (or, with ``pooler``, BERT, whose classifier reads a pooler) with 4-wide hidden
    states: 284 weights in its Linear layers, so that the exact per-layer traces take few
    products."""
    from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    quiet_transformers()
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=4, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=8, max_position_embeddings=16, num_labels=num_labels,
              pad_token_id=PAD, attn_implementation="eager")
    if pooler:
        return BertForSequenceClassification(BertConfig(**kw)).to(dtype).eval()
    return RobertaForSequenceClassification(RobertaConfig(**kw)).to(dtype).eval()


def gpt2(dtype=torch.float64, seed=0):
    """GPT-2 with 4-wide hidden states: 384 weights in its Conv1D layers; the output layer
    shares the token embedding's matrix (tied weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    quiet_transformers()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=4, n_layer=2, n_head=2, n_positions=16,
                     bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def gpt2_factory():
    """The network a Lightning run fine-tuned (``--model sharpness_text_models:gpt2_factory``)."""
    return gpt2(dtype=torch.float32)
