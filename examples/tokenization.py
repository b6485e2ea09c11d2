"""Tokenizers without downloads: a word- or character-level vocabulary built from the data, or
a tokenizer saved in a local directory.

``LocalTokenizer`` answers the part of the Hugging Face tokenizer API the recipes use
(``tok(text, text_pair, truncation=True, max_length=n)`` giving ``input_ids`` and
``attention_mask``, ``decode``, ``pad_token_id``/``bos_token_id``/``eos_token_id``, ``len``,
``save_pretrained``), so the recipes run the same with either kind.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

__all__ = ["LocalTokenizer", "load_tokenizer", "LEVELS"]

LEVELS = ("word", "char")
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0, 1, 2, 3 in every LocalTokenizer
FILE = "local_tokenizer.json"
_WORD = re.compile(r"\w+|[^\w\s]")


class LocalTokenizer:
    """A vocabulary of words (lower-cased, punctuation apart) or characters, with ``<pad>``,
    ``<unk>``, ``<s>`` (begins every sequence) and ``</s>`` (ends it, and separates a pair)."""

    def __init__(self, tokens, level: str = "word"):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        tokens = list(tokens)
        if tokens[:len(SPECIALS)] != list(SPECIALS) or len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary starts with the special tokens "
                             f"{SPECIALS} and holds no token twice")
        self.level, self.tokens = level, tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.pad_token_id, self.unk_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2, 3

    @classmethod
    def build(cls, texts, level: str = "word", min_freq: int = 1) -> "LocalTokenizer":
        """The vocabulary of ``texts``: tokens seen at least ``min_freq`` times, most frequent
        first (ties in first-seen order), so the same texts give the same ids."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        counts = Counter()
        for text in texts:
            counts.update(_split(text, level))
        ordered = [t for t, n in counts.most_common() if n >= min_freq and t not in SPECIALS]
        return cls(list(SPECIALS) + ordered, level)

    def __len__(self):
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list:
        """Token ids of ``text``, without special tokens."""
        return [self.index.get(t, self.unk_token_id) for t in _split(text, self.level)]

    def __call__(self, text, text_pair=None, truncation: bool = False, max_length=None,
                 add_special_tokens: bool = True):
        """``{"input_ids", "attention_mask"}`` of ``<s> text </s>`` (``<s> text </s> pair </s>``);
        with ``truncation``, the longer part loses tokens from its end until ``max_length``
        fits."""
        first = self.encode(text)
        second = self.encode(text_pair) if text_pair is not None else None
        specials = (3 if second is not None else 2) if add_special_tokens else 0
        if truncation and max_length is not None:
            budget = max_length - specials
            if budget < (2 if second is not None else 1):
                raise ValueError(f"max_length {max_length} leaves no room for the text")
            while len(first) + len(second or ()) > budget:
                if second is not None and len(second) > len(first):
                    second.pop()
                else:
                    first.pop()
        ids = first if second is None else first + ([self.eos_token_id] if add_special_tokens
                                                    else []) + second
        if add_special_tokens:
            ids = [self.bos_token_id] + ids + [self.eos_token_id]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = [self.tokens[i] for i in ids
               if not (skip_special_tokens and i < len(SPECIALS))]
        return ("" if self.level == "char" else " ").join(out)

    def save_pretrained(self, directory) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, FILE), "w", encoding="utf-8") as f:
            json.dump({"level": self.level, "tokens": self.tokens}, f, ensure_ascii=False)

    @classmethod
    def from_pretrained(cls, directory) -> "LocalTokenizer":
        with open(os.path.join(directory, FILE), encoding="utf-8") as f:
            saved = json.load(f)
        return cls(saved["tokens"], saved["level"])


def _split(text: str, level: str):
    return list(text) if level == "char" else _WORD.findall(text.lower())


def load_tokenizer(directory=None, texts=(), level: str = "word"):
    """The tokenizer saved in ``directory`` (a LocalTokenizer's, or any Hugging Face tokenizer
    saved there: loaded with ``local_files_only``, never by a hub name), else a
    ``LocalTokenizer`` built from ``texts``."""
    if directory is None:
        return LocalTokenizer.build(texts, level)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"tokenizer directory {directory!r} does not exist (a local directory; "
                         "hub names are not loaded)")
    if os.path.isfile(os.path.join(directory, FILE)):
        return LocalTokenizer.from_pretrained(directory)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{directory!r} holds no tokenizer that transformers can load: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if tok.pad_token_id is None:  # GPT-2's has none: pad with the end-of-text token
        tok.pad_token = tok.eos_token
    return tok
