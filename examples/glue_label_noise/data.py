"""Sequence classification with label noise: a local GLUE-format file, or a generated task.

``load_task`` gives the tokenised training set with a fraction of its labels corrupted (fixed
seed), the clean evaluation set, the tokenizer and what was done; docs/recipes.md describes
the formats.
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..text_data import TokenizedDataset
from ..tokenization import load_tokenizer

__all__ = ["GlueFormat", "GLUE_TASKS", "NOISE_MODES", "TextClassificationTask", "read_labeled_file",
           "generate_task", "add_label_noise", "load_task", "train_dataset"]

NOISE_MODES = ("flip", "random")


@dataclass(frozen=True)
class GlueFormat:
    """Where a GLUE task's file keeps its texts and label, and its label names in class order
    (the order of the GLUE datasets on the Hugging Face hub)."""

    text_columns: Tuple[str, ...]
    label_column: str
    label_names: Tuple[str, ...]
    header: Optional[Tuple[str, ...]] = None  # the column names of a file without a header row


GLUE_TASKS = {
    "cola": GlueFormat(("sentence",), "label", ("0", "1"),
                       header=("source", "label", "original_label", "sentence")),
    "sst2": GlueFormat(("sentence",), "label", ("0", "1")),
    "mrpc": GlueFormat(("#1 String", "#2 String"), "Quality", ("0", "1")),
    "qqp": GlueFormat(("question1", "question2"), "is_duplicate", ("0", "1")),
    "mnli": GlueFormat(("sentence1", "sentence2"), "gold_label",
                       ("entailment", "neutral", "contradiction")),
    "qnli": GlueFormat(("question", "sentence"), "label", ("entailment", "not_entailment")),
    "rte": GlueFormat(("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "wnli": GlueFormat(("sentence1", "sentence2"), "label", ("0", "1")),
}
# STS-B's labels are similarity scores: label noise over classes does not apply to it.


@dataclass
class TextClassificationTask:
    """The recipe's data: ``train`` (labels noisy) and ``eval`` (clean) datasets of dicts, the
    tokenizer, the classes, the clean training labels and which ones were corrupted."""

    train: TokenizedDataset
    eval: Optional[TokenizedDataset]
    tokenizer: object
    label_names: Tuple[str, ...]
    clean_labels: torch.Tensor
    noisy_indices: torch.Tensor
    noise_rate: float
    noise_mode: str
    source: str  # "generated: ..." or the file read
    max_length: int
    texts: List[Tuple[str, ...]] = field(repr=False, default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ----------------------------------------------------------------------------- reading


def read_labeled_file(path, text_columns: Sequence[str], label_column: str,
                      header: Optional[Sequence[str]] = None):
    """``(texts, labels)`` of a TSV (``.tsv``, tab-separated, no quoting, as GLUE ships) or CSV
    (``.csv``) file with a header row (or the column names ``header``); texts are tuples of
    the ``text_columns``, labels the raw strings."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no file {path!r}")
    if path.endswith(".tsv"):
        fmt = dict(delimiter="\t", quoting=csv.QUOTE_NONE)
    elif path.endswith(".csv"):
        fmt = dict(delimiter=",")
    else:
        raise ValueError(f"{path!r}: a labelled file is .tsv or .csv")
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, **fmt)
        names = list(header) if header is not None else next(rows, None)
        if not names:
            raise ValueError(f"{path} is empty")
        wanted = list(text_columns) + [label_column]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"{path}: no column {missing} (columns: {names})")
        where = [names.index(c) for c in wanted]
        first = 1 if header is not None else 2
        for number, row in enumerate(rows, first):
            if not row:
                continue
            if len(row) != len(names):
                raise ValueError(f"{path}:{number}: {len(row)} fields, the header has "
                                 f"{len(names)}")
            values = [row[i] for i in where]
            texts.append(tuple(values[:-1]))
            labels.append(values[-1])
    if not texts:
        raise ValueError(f"{path} holds no rows")
    return texts, labels


def _label_ids(labels, names, path):
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not among {list(names)}")
    return [index[lab] for lab in labels]


# --------------------------------------------------------------------------- generating

_FILLER = ("the", "a", "this", "that", "film", "story", "cast", "plot", "was", "is", "felt",
           "quite", "very", "and", "but", "with", "really", "overall", "scene", "ending")
_KEYWORDS = (("dull", "boring", "bad", "weak", "awful", "flat", "tedious", "poor"),
             ("great", "fun", "good", "warm", "superb", "sharp", "lovely", "bright"),
             ("strange", "odd", "curious", "weird", "unusual", "eerie", "quirky", "surreal"),
             ("loud", "fast", "wild", "intense", "frantic", "rapid", "noisy", "fierce"))


def generate_task(num_examples: int, num_classes: int = 2, seed: int = 0):
    """A learnable single-sentence task standing in for SST-2: each sentence mixes filler
    words with keywords of its class (three) and of one other class (at most two), so the
    label is the class most of its keywords belong to. ``(texts, labels, label_names)``."""
    if not 2 <= num_classes <= len(_KEYWORDS):
        raise ValueError(f"num_classes must be in [2, {len(_KEYWORDS)}], got {num_classes}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_examples):
        label = rng.randrange(num_classes)
        other = rng.choice([c for c in range(num_classes) if c != label])
        words = rng.sample(_KEYWORDS[label], 3) + rng.sample(_KEYWORDS[other], rng.randint(0, 2))
        words += rng.choices(_FILLER, k=rng.randint(3, 8))
        rng.shuffle(words)
        texts.append((" ".join(words) + " .",))
        labels.append(label)
    names = ("negative", "positive", "strange", "intense")[:num_classes]
    return texts, labels, names


# ---------------------------------------------------------------------------- the noise


def add_label_noise(labels, rate: float, num_classes: int, mode: str = "flip", seed: int = 0):
    """``(noisy labels, corrupted indices)``: ``round(rate * n)`` examples, drawn without
    replacement with a ``torch.Generator(seed)``, get a new label: ``"flip"`` another class
    than theirs, uniformly (exactly that many labels change); ``"random"`` a class drawn
    uniformly from all of them, which may be their own (the NSO image scripts' noise: about
    ``1 - 1/num_classes`` of them change)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"the noise rate must be in [0, 1], got {rate}")
    if mode not in NOISE_MODES:
        raise ValueError(f"the noise mode must be one of {NOISE_MODES}, got {mode!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    gen = torch.Generator().manual_seed(int(seed))
    count = round(float(rate) * labels.numel())
    picked = torch.randperm(labels.numel(), generator=gen)[:count].sort().values
    noisy = labels.clone()
    if mode == "flip":
        shift = torch.randint(1, num_classes, (count,), generator=gen)
        noisy[picked] = (labels[picked] + shift) % num_classes
    else:
        noisy[picked] = torch.randint(0, num_classes, (count,), generator=gen)
    return noisy, picked


# ------------------------------------------------------------------------------- load


def _encode(tokenizer, texts, max_length):
    return [tokenizer(*t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def load_task(train_file=None, eval_file=None, task: Optional[str] = None,
              text_columns: Optional[Sequence[str]] = None, label_column: Optional[str] = None,
              label_names: Optional[Sequence[str]] = None, tokenizer_dir=None, model_dir=None,
              noise_rate: float = 0.0, noise_mode: str = "flip", seed: int = 0,
              max_length: int = 128, num_generated: int = 512, num_classes: int = 2,
              eval_fraction: float = 0.2) -> TextClassificationTask:
    """The recipe's data.

    * ``train_file`` (and ``eval_file``): a GLUE task's ``train.tsv``/``dev.tsv`` with
      ``task`` naming its format (``GLUE_TASKS``), or any labelled TSV/CSV with
      ``text_columns``, ``label_column`` and optionally ``label_names`` (default: the
      training file's labels, sorted). Without ``train_file``: ``generate_task`` with
      ``num_generated`` examples of ``num_classes`` classes, ``eval_fraction`` of them held out
      (``source`` says "generated").
    * Tokenizer: the one saved in ``tokenizer_dir``, else in ``model_dir`` (a pretrained
      model's own vocabulary), else a word-level ``LocalTokenizer`` built from the training
      texts. Sequences are cut to ``max_length`` tokens.
    * ``noise_rate``/``noise_mode``/``seed``: ``add_label_noise`` on the training labels only.
    """
    if train_file is None:
        if eval_file is not None or task or text_columns or label_column or label_names:
            raise ValueError("eval_file, task, text_columns, label_column and label_names "
                             "describe a train_file; none was given")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        texts, labels, names = generate_task(num_generated, num_classes, seed)
        held = max(1, round(eval_fraction * len(texts)))
        eval_texts, eval_labels = texts[:held], labels[:held]
        texts, labels = texts[held:], labels[held:]
        source = (f"generated: {len(texts)} + {held} sentences of {num_classes} keyword "
                  f"classes (seed {seed})")
    else:
        fmt = _file_format(task, text_columns, label_column, label_names)
        texts, raw = read_labeled_file(train_file, fmt.text_columns, fmt.label_column, fmt.header)
        names = fmt.label_names or tuple(sorted(set(raw)))
        labels = _label_ids(raw, names, train_file)
        eval_texts = eval_labels = None
        if eval_file is not None:
            eval_texts, raw_eval = read_labeled_file(eval_file, fmt.text_columns,
                                                     fmt.label_column, fmt.header)
            eval_labels = _label_ids(raw_eval, names, eval_file)
        source = os.fspath(train_file)
    if len(names) < 2:
        raise ValueError(f"the labels name {len(names)} class; classification needs two or more")
    tokenizer = load_tokenizer(_tokenizer_dir(tokenizer_dir, model_dir),
                               [" ".join(t) for t in texts], level="word")
    noisy, picked = add_label_noise(labels, noise_rate, len(names), noise_mode, seed)
    pad = tokenizer.pad_token_id
    train = TokenizedDataset(_encode(tokenizer, texts, max_length), noisy.tolist(), pad)
    evaluation = None
    if eval_texts is not None:
        evaluation = TokenizedDataset(_encode(tokenizer, eval_texts, max_length), eval_labels, pad)
    return TextClassificationTask(train, evaluation, tokenizer, tuple(names),
                                  torch.tensor(labels), picked, float(noise_rate), noise_mode,
                                  source, max_length, texts)


def _file_format(task, text_columns, label_column, label_names) -> GlueFormat:
    if task is not None:
        if task == "stsb":
            raise ValueError("stsb is a regression task (similarity scores): label noise over "
                             "classes does not apply")
        if task not in GLUE_TASKS:
            raise ValueError(f"task must be one of {', '.join(GLUE_TASKS)}, got {task!r}")
        if text_columns or label_column:
            raise ValueError("pass task or text_columns/label_column, not both")
        fmt = GLUE_TASKS[task]
        return fmt if label_names is None else GlueFormat(fmt.text_columns, fmt.label_column,
                                                          tuple(label_names), fmt.header)
    if not text_columns or not label_column:
        raise ValueError("a train_file needs its GLUE task or its text_columns and label_column")
    if isinstance(text_columns, str):
        text_columns = (text_columns,)
    return GlueFormat(tuple(text_columns), label_column,
                      tuple(label_names) if label_names else ())


def _tokenizer_dir(tokenizer_dir, model_dir):
    if tokenizer_dir is not None:
        return tokenizer_dir
    if model_dir is not None:
        if not os.path.isdir(model_dir):
            raise ValueError(f"model directory {os.fspath(model_dir)!r} does not exist (a "
                             "local directory; hub names are not loaded)")
        return model_dir  # a pretrained model's embeddings need its own vocabulary
    return None


def train_dataset(**kwargs) -> TokenizedDataset:
    """The noisy training set of ``load_task(**kwargs)``: for ``flatfused sharpness --data
    examples.glue_label_noise:train_dataset --data-kwargs '{...}'``."""
    return load_task(**kwargs).train
