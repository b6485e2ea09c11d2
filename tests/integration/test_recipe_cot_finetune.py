"""examples/cot_finetune: question/rationale/answer files, the generated arithmetic task, the
prompt-masked tokenisation, the split, the tokenizers and the tiny GPT-2."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: examples/

from examples.cot_finetune import (CoTExample, format_example,  # noqa: E402
                                   generate_arithmetic, load_cot_data, load_model,
                                   read_cot_jsonl, tokenize_examples)
from examples.tokenization import LocalTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_generated_problems_are_correct_and_seeded():
    problems = generate_arithmetic(200, seed=3)
    for ex in problems:
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", ex.rationale)
        assert len(steps) == 2, ex.rationale
        for a, op, b, c in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        assert steps[1][0] == steps[0][3]  # the second step starts from the first's result
        assert ex.answer == steps[1][3]
    assert generate_arithmetic(20, seed=3) == problems[:20]
    assert generate_arithmetic(20, seed=4) != problems[:20]


def test_prompt_masked_char_tokenisation():
    data = load_cot_data(num_generated=12, eval_fraction=0.25, seed=1, max_length=256)
    assert data.source.startswith("generated:")
    assert len(data.train) == 9 and len(data.eval) == 3
    tok = data.tokenizer
    assert isinstance(tok, LocalTokenizer) and tok.level == "char"
    ids, mask, labels = data.train.input_ids, data.train.attention_mask, data.train.labels
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 256
    for row, ex in enumerate(data.train_examples):
        prompt, completion = format_example(ex)
        n = int(mask[row].sum())
        assert n == 1 + len(prompt) + len(completion) + 1  # <s> chars </s>
        assert ids[row, 0] == tok.bos_token_id and ids[row, n - 1] == tok.eos_token_id
        assert tok.decode(ids[row, :n].tolist()) == prompt + completion
        masked = 1 + len(prompt)
        assert bool((labels[row, :masked] == -100).all())  # <s> and the question: no loss
        assert torch.equal(labels[row, masked:n], ids[row, masked:n])
        assert bool((labels[row, n:] == -100).all()) and bool((ids[row, n:] == 0).all())
    assert prompt.startswith("Q: ") and prompt.endswith("\nA:")
    assert completion.endswith(f" The answer is {ex.answer}.")
    # the split is a seeded shuffle: disjoint, complete, repeatable
    again = load_cot_data(num_generated=12, eval_fraction=0.25, seed=1)
    assert again.eval_examples == data.eval_examples
    every = generate_arithmetic(12, seed=1)
    assert sorted(map(every.index, data.train_examples + data.eval_examples)) == list(range(12))


def test_train_on_prompt_and_word_level(tmp_path):
    path = write_jsonl(tmp_path / "cot.jsonl", [
        {"question": "What is 2 + 3?", "rationale": "2 + 3 = 5.", "answer": 5},
        {"question": "What is 4 * 2?", "rationale": "4 * 2 = 8.", "answer": "8"},
        "",
        {"question": "What is 9 - 1?", "rationale": "9 - 1 = 8.", "answer": 8.0}])
    data = load_cot_data(path, tokenizer_level="word", eval_fraction=0.0, train_on_prompt=True)
    assert data.source == str(path) and data.eval is None
    assert [e.answer for e in data.train_examples] == ["5", "8", "8.0"]
    assert data.tokenizer.level == "word"
    ids, labels, mask = data.train.input_ids, data.train.labels, data.train.attention_mask
    assert torch.equal(labels[mask == 1], ids[mask == 1])  # every real token is learned
    assert data.tokenizer.decode(ids[0].tolist()) == \
        "q : what is 2 + 3 ? a : 2 + 3 = 5 . the answer is 5 ."
    with pytest.raises(ValueError, match="example 0 has .* more than max_length 10"):
        load_cot_data(path, max_length=10, eval_fraction=0.0)


@pytest.mark.parametrize("records,message", [
    (['{"question": "q", "rationale": "r", "answer": 1}', "{oops"], "cot.jsonl:2: not JSON"),
    ([{"question": "q", "answer": 1}], "cot.jsonl:1: 'rationale' must be"),
    ([{"question": "q", "rationale": "r", "answer": True}], "'answer' must be"),
    ([{"question": " ", "rationale": "r", "answer": 1}], "'question' must be"),
    ([[1, 2]], "expected an object"),
    ([""], "holds no examples"),
])
def test_bad_jsonl(tmp_path, records, message):
    path = write_jsonl(tmp_path / "cot.jsonl", records)
    with pytest.raises(ValueError, match=message):
        read_cot_jsonl(path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no file"):
        load_cot_data(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="tokenizer_level"):
        load_cot_data(num_generated=4, tokenizer_level="bpe")
    with pytest.raises(ValueError, match="eval_file goes with a data_file"):
        load_cot_data(eval_file=tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="leaves no training example"):
        load_cot_data(num_generated=1, eval_fraction=0.9)
    with pytest.raises(ValueError, match="does not exist"):
        load_cot_data(num_generated=4, tokenizer_dir="gpt2")  # never a hub name


def test_tiny_gpt2_learns_only_the_completion(tmp_path):
    from transformers.utils import logging as hf_logging

    from flatfused.sharpness.hf import causal_lm_loss

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    data = load_cot_data(num_generated=8, eval_fraction=0.0, seed=2)
    model = load_model(data, n_embd=8, n_head=2)
    assert model.config.vocab_size == len(data.tokenizer)
    assert model.config.n_positions == data.max_length
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=4)))
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(data.tokenizer))
    # transformers' loss is flatfused sharpness's causal_lm: float32 on both sides, the same
    # sums in the same order up to the reduction: rel 1e-6 (a few eps32 on a loss ~ log 50)
    assert float(out.loss) == pytest.approx(float(causal_lm_loss(out.logits, batch["labels"])),
                                            rel=1e-6)
    # a pretrained directory: the model and its tokenizer saved together, read back
    model.save_pretrained(tmp_path / "m")
    data.tokenizer.save_pretrained(tmp_path / "m")
    reread = load_cot_data(num_generated=8, eval_fraction=0.0, seed=2, tokenizer_dir=tmp_path / "m")
    assert torch.equal(reread.train.input_ids, data.train.input_ids)
    loaded = load_model(reread, model_dir=tmp_path / "m")
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_a_gpt2_style_tokenizer_without_padding(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "Q", ":", "A", "What", "is", "2", "+", "3", "?", "=", "5", ".",
             "The", "answer", "[UNK]"]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(tmp_path)
    ex = [CoTExample("What is 2 + 3?", "2 + 3 = 5.", "5")]
    write_jsonl(tmp_path / "d.jsonl", [vars(e) for e in ex])
    data = load_cot_data(tmp_path / "d.jsonl", tokenizer_dir=tmp_path, eval_fraction=0.0)
    tok = data.tokenizer
    assert tok.pad_token_id == tok.eos_token_id == 0  # GPT-2's rule: pad with end-of-text
    ids = data.train.input_ids[0].tolist()
    # bos == eos: no beginning token, the sequence starts with the prompt and ends with eos
    assert ids[0] == words.index("Q") and ids[-1] == 0
    ids_again, labels = tokenize_examples(ex, tok, 64)
    assert ids_again[0] == ids and labels[0][:ids.index(words.index("A")) + 2] == [-100] * (
        ids.index(words.index("A")) + 2)
