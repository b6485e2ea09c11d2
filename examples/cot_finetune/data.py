"""Chain-of-thought fine-tuning data for a causal LM: a local JSONL of question, rationale and
answer, or a generated arithmetic task with its rationales.

An example becomes ``prompt + completion``::

    prompt      Q: {question}\\nA:
    completion   {rationale} The answer is {answer}.

tokenised as ``<s> prompt completion </s>``; the labels are the tokens with the prompt (unless
``train_on_prompt``) and the padding set to -100, so the loss is that of the rationale and the
answer given the question.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import List, Optional

from flatfused.sharpness.text_data import jsonl_records

from ..text_data import IGNORE_INDEX, TokenizedDataset
from ..tokenization import LEVELS, load_tokenizer

__all__ = ["CoTExample", "CoTData", "read_cot_jsonl", "generate_arithmetic", "format_example",
           "tokenize_examples", "load_cot_data", "train_dataset"]

PROMPT = "Q: {question}\nA:"
COMPLETION = " {rationale} The answer is {answer}."


@dataclass(frozen=True)
class CoTExample:
    question: str
    rationale: str
    answer: str


@dataclass
class CoTData:
    """The recipe's data: ``train``/``eval`` datasets of dicts, the tokenizer, the examples."""

    train: TokenizedDataset
    eval: Optional[TokenizedDataset]
    tokenizer: object
    train_examples: List[CoTExample]
    eval_examples: List[CoTExample]
    source: str  # "generated: ..." or the file read
    max_length: int


def read_cot_jsonl(path) -> List[CoTExample]:
    """One JSON object a line with string ``question`` and ``rationale`` and an ``answer``
    (a string or a number); blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no file {path!r}")
    out = []
    for number, rec in jsonl_records(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{number}: expected an object")
        for key in ("question", "rationale"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise ValueError(f"{path}:{number}: {key!r} must be a non-empty string")
        answer = rec.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) \
                or not str(answer).strip():
            raise ValueError(f"{path}:{number}: 'answer' must be a non-empty string or "
                             "a number")
        out.append(CoTExample(rec["question"].strip(), rec["rationale"].strip(),
                              str(answer).strip()))
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


_ITEMS = ("apples", "marbles", "books", "coins", "stickers", "pencils")
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay")


def generate_arithmetic(num_examples: int, seed: int = 0) -> List[CoTExample]:
    """Two-step word problems (add, then take away or multiply) with the rationale of each
    step, standing in for the chain-of-thought sets (MultiArith-like)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = random.Random(seed)
    out = []
    for _ in range(num_examples):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(2, 40), rng.randint(2, 30)
        total = a + b
        if rng.random() < 0.5:
            c = rng.randint(1, total - 1)
            question = (f"{name} has {a} {item} and gets {b} more, then gives away {c}. "
                        f"How many {item} does {name} have now?")
            rationale = f"{name} has {a} + {b} = {total} {item}. Then {total} - {c} = {total - c}."
            answer = total - c
        else:
            c = rng.randint(2, 5)
            question = (f"{name} has {a} {item} and gets {b} more. A friend has {c} times as "
                        f"many. How many {item} does the friend have?")
            rationale = (f"{name} has {a} + {b} = {total} {item}. "
                         f"The friend has {total} * {c} = {total * c}.")
            answer = total * c
        out.append(CoTExample(question, rationale, str(answer)))
    return out


def format_example(example: CoTExample):
    """``(prompt, completion)`` of an example."""
    return (PROMPT.format(question=example.question),
            COMPLETION.format(rationale=example.rationale, answer=example.answer))


def tokenize_examples(examples, tokenizer, max_length: int, train_on_prompt: bool = False):
    """``(input_ids, labels)`` lists: ``<s> prompt completion </s>`` (a tokenizer without a
    beginning token starts with the prompt), labels -100 over the prompt unless
    ``train_on_prompt``. An example longer than ``max_length`` is an error that names it."""
    ids_out, labels_out = [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = tokenizer.eos_token_id
    for i, ex in enumerate(examples):
        prompt, completion = format_example(ex)
        p = _plain_ids(tokenizer, prompt)
        c = _plain_ids(tokenizer, completion)
        start = [bos] if bos is not None and bos != eos else []
        ids = start + p + c + [eos]
        if len(ids) > max_length:
            raise ValueError(f"example {i} has {len(ids)} tokens, more than max_length "
                             f"{max_length} (question: {ex.question[:40]!r}...)")
        masked = len(start) + len(p)
        labels = ids if train_on_prompt else [IGNORE_INDEX] * masked + ids[masked:]
        ids_out.append(ids)
        labels_out.append(list(labels))
    return ids_out, labels_out


def _plain_ids(tokenizer, text):
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "convert_tokens_to_ids"):
        return tokenizer.encode(text)  # a LocalTokenizer: no special tokens
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_cot_data(data_file=None, eval_file=None, tokenizer_dir=None,
                  tokenizer_level: str = "char", max_length: int = 256,
                  num_generated: int = 256, eval_fraction: float = 0.1, seed: int = 0,
                  train_on_prompt: bool = False) -> CoTData:
    """The recipe's data.

    * ``data_file`` (and ``eval_file``): JSONL of question/rationale/answer; without
      ``eval_file``, ``eval_fraction`` of the examples (a seeded shuffle) are held out.
      Without ``data_file``: ``generate_arithmetic(num_generated, seed)`` (``source`` says
      "generated").
    * Tokenizer: the one saved in ``tokenizer_dir`` (e.g. the model's), else a
      ``LocalTokenizer`` of ``tokenizer_level`` (``"char"`` or ``"word"``) built from the
      training texts.
    """
    if tokenizer_level not in LEVELS:
        raise ValueError(f"tokenizer_level must be one of {LEVELS}, got {tokenizer_level!r}")
    if data_file is None:
        if eval_file is not None:
            raise ValueError("eval_file goes with a data_file")
        examples = generate_arithmetic(num_generated, seed)
        source = f"generated: {num_generated} two-step arithmetic problems (seed {seed})"
    else:
        examples = read_cot_jsonl(data_file)
        source = os.fspath(data_file)
    if eval_file is not None:
        train_ex, eval_ex = examples, read_cot_jsonl(eval_file)
    else:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        held = round(eval_fraction * len(examples))
        if held == len(examples):
            raise ValueError("eval_fraction leaves no training example")
        eval_ex = [examples[i] for i in sorted(order[:held])]
        train_ex = [examples[i] for i in sorted(order[held:])]
    texts = ["".join(format_example(ex)) for ex in train_ex]
    tokenizer = load_tokenizer(tokenizer_dir, texts, level=tokenizer_level)
    pad = tokenizer.pad_token_id
    train = TokenizedDataset(*tokenize_examples(train_ex, tokenizer, max_length, train_on_prompt),
                             pad)
    evaluation = TokenizedDataset(*tokenize_examples(eval_ex, tokenizer, max_length,
                                                     train_on_prompt), pad) if eval_ex else None
    return CoTData(train, evaluation, tokenizer, train_ex, eval_ex, source, max_length)


def train_dataset(**kwargs) -> TokenizedDataset:
    """The training set of ``load_cot_data(**kwargs)``, for ``flatfused sharpness --data``."""
    return load_cot_data(**kwargs).train

