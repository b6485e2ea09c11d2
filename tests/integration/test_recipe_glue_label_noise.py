"""examples/glue_label_noise: GLUE-format files, the generated task, the label noise (exact
count, both modes, determinism), the tokenised datasets, the model, and its use by
``flatfused sharpness --data``."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: examples/

from examples.glue_label_noise import (GLUE_TASKS, add_label_noise, generate_task,  # noqa: E402
                                       load_model, load_task, read_labeled_file, tiny_roberta)
from examples.tokenization import LocalTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# ------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("n,rate", [(10, 0.3), (100, 0.29), (7, 0.5), (50, 1.0), (50, 0.0)])
def test_flip_noise_changes_exactly_the_fraction(n, rate):
    labels = torch.arange(n) % 3
    noisy, picked = add_label_noise(labels, rate, 3, "flip", seed=1)
    count = round(rate * n)  # 0.29 * 100 is 28.999...: rounded, not truncated
    assert picked.numel() == count and picked.unique().numel() == count
    changed = (noisy != labels).nonzero().flatten()
    assert torch.equal(changed, picked)  # every picked label changes, no other does
    assert bool(((noisy >= 0) & (noisy < 3)).all())


def test_random_noise_redraws_from_all_classes():
    n, classes = 3000, 3
    labels = torch.arange(n) % classes
    noisy, picked = add_label_noise(labels, 0.5, classes, "random", seed=2)
    assert picked.numel() == 1500
    changed = (noisy != labels).nonzero().flatten()
    assert bool(torch.isin(changed, picked).all())  # only picked labels may change
    # a picked label keeps its class with probability 1/3: binomial(1500, 1/3) has a standard
    # deviation of sqrt(1500 * 1/3 * 2/3) = 18.3 around 500; 5 of them bound it
    kept = picked.numel() - changed.numel()
    assert abs(kept - 500) < 5 * math.sqrt(1500 / 3 * 2 / 3)
    # the new classes are uniform: each gets 500 of the 1500 draws, same bound
    counts = torch.bincount(noisy[picked], minlength=classes)
    assert bool(((counts - 500).abs() < 5 * math.sqrt(1500 / 3 * 2 / 3)).all())


def test_noise_is_determined_by_the_seed():
    labels = torch.arange(40) % 2
    a = add_label_noise(labels, 0.25, 2, "flip", seed=5)
    b = add_label_noise(labels, 0.25, 2, "flip", seed=5)
    c = add_label_noise(labels, 0.25, 2, "flip", seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("args,message", [
    ((torch.tensor([0, 1]), 1.5, 2), "in \\[0, 1\\]"),
    ((torch.tensor([0, 1]), 0.5, 2, "swap"), "mode must be one of"),
    ((torch.tensor([0, 2]), 0.5, 2), "labels must be in"),
    ((torch.tensor([0, 0]), 0.5, 1), "at least 2 classes"),
])
def test_noise_errors(args, message):
    with pytest.raises(ValueError, match=message):
        add_label_noise(*args)


# ---------------------------------------------------------------------------- reading


def test_glue_formats(tmp_path):
    (tmp_path / "sst2.tsv").write_text('sentence\tlabel\nit is "great\t1\na dull film\t0\n')
    texts, labels = read_labeled_file(tmp_path / "sst2.tsv", ("sentence",), "label")
    assert texts == [('it is "great',), ("a dull film",)] and labels == ["1", "0"]  # no quoting
    (tmp_path / "cola.tsv").write_text("src\t1\t\tThe cat sat.\nsrc\t0\t*\tCat the sat.\n")
    task = load_task(train_file=tmp_path / "cola.tsv", task="cola")
    assert task.texts == [("The cat sat.",), ("Cat the sat.",)]
    assert task.clean_labels.tolist() == [1, 0] and task.label_names == ("0", "1")
    (tmp_path / "mnli.tsv").write_text("sentence1\tsentence2\tgold_label\n"
                                       "a b\tc d\tneutral\ne f\tg h\tcontradiction\n")
    task = load_task(train_file=tmp_path / "mnli.tsv", task="mnli")
    assert task.clean_labels.tolist() == [1, 2]  # the hub's order: entailment, neutral, contra.
    assert task.num_labels == 3 and task.source == str(tmp_path / "mnli.tsv")
    # a pair is one sequence: <s> a </s> b </s>
    tok = task.tokenizer
    assert task.train.input_ids[0, :7].tolist() == [2, tok.index["a"], tok.index["b"], 3,
                                                    tok.index["c"], tok.index["d"], 3]
    assert set(GLUE_TASKS) >= {"sst2", "mrpc", "qnli", "rte", "qqp", "cola", "mnli", "wnli"}


def test_a_labelled_csv_with_a_dev_file_and_noise(tmp_path):
    rows = [("good fun film", "pos"), ("dull and flat", "neg"), ("warm story", "pos"),
            ("awful plot", "neg"), ("superb cast", "pos"), ("boring", "neg"),
            ("lovely ending", "pos"), ("tedious scene", "neg")]
    (tmp_path / "train.csv").write_text("text,sentiment\n" + "".join(f"{t},{s}\n" for t, s in rows))
    (tmp_path / "dev.csv").write_text("text,sentiment\nbright film,pos\nweak film,neg\n")
    task = load_task(train_file=tmp_path / "train.csv", eval_file=tmp_path / "dev.csv",
                     text_columns="text", label_column="sentiment", noise_rate=0.25, seed=3,
                     max_length=4)
    assert task.label_names == ("neg", "pos")  # sorted, shared by the dev file
    clean = torch.tensor([1 if s == "pos" else 0 for _, s in rows])
    assert torch.equal(task.clean_labels, clean)
    assert (task.train.labels != clean).sum() == 2 == task.noisy_indices.numel()
    assert torch.equal(task.eval.labels, torch.tensor([1, 0]))  # evaluation labels stay clean
    ids, mask = task.train.input_ids, task.train.attention_mask
    assert ids.shape == (8, 4) and mask.shape == (8, 4)  # three words cut to max_length
    assert ids[0, [0, 3]].tolist() == [2, 3]  # <s> good fun </s>
    assert task.tokenizer.decode(ids[0].tolist()) == "good fun"
    assert torch.equal(mask[5], torch.tensor([1, 1, 1, 0]))  # <s> boring </s>, padded
    assert bool((ids[mask == 0] == task.tokenizer.pad_token_id).all())
    item = task.train[5]
    assert set(item) == {"input_ids", "attention_mask", "labels"} and item["labels"].dim() == 0


@pytest.mark.parametrize("content,kwargs,message", [
    ("sentence\tlabel\na\t1\n", dict(task="stsb"), "regression"),
    ("sentence\tlabel\na\t1\n", dict(task="sst5"), "task must be one of"),
    ("text\tlabel\na\t1\n", dict(task="sst2"), "no column \\['sentence'\\]"),
    ("sentence\tlabel\na\t1\nb\n", dict(task="sst2"), "x.tsv:3: 1 fields"),
    ("sentence\tlabel\na\t1\nb\t7\n", dict(task="sst2"), "labels \\['7'\\] are not among"),
    ("sentence\tlabel\na\t1\n", dict(), "needs its GLUE task"),
    ("sentence\tlabel\na\t1\nb\t1\n", dict(text_columns="sentence", label_column="label"),
     "needs two or more"),
    ("sentence\tlabel\n", dict(task="sst2"), "holds no rows"),
])
def test_bad_files(tmp_path, content, kwargs, message):
    (tmp_path / "x.tsv").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(train_file=tmp_path / "x.tsv", **kwargs)


def test_missing_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no file"):
        load_task(train_file=tmp_path / "none.tsv", task="sst2")
    with pytest.raises(ValueError, match="does not exist"):
        load_task(model_dir="roberta-base")  # never a hub name
    with pytest.raises(ValueError, match="describe a train_file"):
        load_task(task="sst2")


# -------------------------------------------------------------------------- generated


def test_generated_task_is_labelled_and_deterministic():
    task = load_task(num_generated=60, num_classes=3, noise_rate=0.2, noise_mode="random",
                     seed=4, max_length=24)
    assert task.source.startswith("generated:")
    assert len(task.train) == 48 and len(task.eval) == 12  # eval_fraction 0.2
    assert task.train.input_ids.shape[0] == 48 and task.train.input_ids.shape[1] <= 24
    assert task.noisy_indices.numel() == round(0.2 * 48) and task.noise_mode == "random"
    again = load_task(num_generated=60, num_classes=3, noise_rate=0.2, noise_mode="random",
                      seed=4, max_length=24)
    assert torch.equal(task.train.input_ids, again.train.input_ids)
    assert torch.equal(task.train.labels, again.train.labels)
    other = load_task(num_generated=60, num_classes=3, seed=5, max_length=24)
    assert not torch.equal(task.train.input_ids[:10], other.train.input_ids[:10])
    # the label is the class most of a sentence's keywords belong to
    texts, labels, names = generate_task(200, 2, seed=0)
    from examples.glue_label_noise.data import _KEYWORDS

    for (text,), label in zip(texts, labels):
        votes = [sum(w in _KEYWORDS[c] for w in text.split()) for c in range(2)]
        assert votes[label] > votes[1 - label]
    assert names == ("negative", "positive")
    with pytest.raises(ValueError, match="num_classes"):
        generate_task(10, 9)


# ------------------------------------------------------------------------------ model


def test_tiny_roberta_and_a_local_model_directory(tmp_path):
    quiet()
    task = load_task(num_generated=30, seed=0, max_length=20)
    model = load_model(task, hidden_size=8, intermediate_size=16)
    batch = next(iter(torch.utils.data.DataLoader(task.train, batch_size=4)))
    out = model(**batch)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)
    again = load_model(task, hidden_size=8, intermediate_size=16)  # seeded initialisation
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))

    # a "pretrained" directory with its own tokenizer: the task uses that vocabulary
    model.save_pretrained(tmp_path / "m")
    task.tokenizer.save_pretrained(tmp_path / "m")
    reread = load_task(num_generated=30, seed=0, max_length=20, model_dir=tmp_path / "m")
    assert isinstance(reread.tokenizer, LocalTokenizer)
    assert reread.tokenizer.tokens == task.tokenizer.tokens
    loaded = load_model(reread, model_dir=tmp_path / "m")
    assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(task, model_dir=tmp_path)
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_task(num_generated=30, model_dir=tmp_path)


def test_a_hugging_face_tokenizer_saved_locally(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "a", "dull", "film", "great", "fun"]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                            bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "tok")
    (tmp_path / "t.tsv").write_text("sentence\tlabel\na great film\t1\na dull thing\t0\n")
    task = load_task(train_file=tmp_path / "t.tsv", task="sst2", tokenizer_dir=tmp_path / "tok")
    assert task.train.input_ids.tolist() == [[4, 7, 6], [4, 5, 1]]  # no specials: its own rule


# ------------------------------------------------------------- flatfused sharpness --data


def test_sharpness_reads_the_recipe_dataset(tmp_path, capsys, monkeypatch):
    """The dataset's dict items reach the command as (inputs, labels) batches: the same
    numbers as the API on the DataLoader's batches."""
    from flatfused import cli
    from flatfused.sharpness import hessian_trace
    from flatfused.sharpness.hf import hf_logits

    quiet()
    kwargs = {"num_generated": 40, "noise_rate": 0.25, "seed": 2, "max_length": 16}
    task = load_task(**kwargs)
    model = tiny_roberta(len(task.tokenizer), 2, 16, hidden_size=8, intermediate_size=16)
    model.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # examples is importable from here
    assert cli.main(["sharpness", "--hf-model", str(tmp_path / "m"), "--data",
                     "examples.glue_label_noise:train_dataset", "--data-kwargs",
                     json.dumps(kwargs), "--batch-size", "16", "--layers", "linear", "--measure",
                     "trace", "--probes", "3", "--out", str(tmp_path / "o"), "--no-plot",
                     "--no-progress"]) == 0
    res = json.loads((tmp_path / "o" / "sharpness.json").read_text())
    batches = [({k: v for k, v in b.items() if k != "labels"}, b["labels"])
               for b in torch.utils.data.DataLoader(task.train, batch_size=16)]
    model.eval()
    with hf_logits(model):
        total = hessian_trace(model, torch.nn.functional.cross_entropy, batches, num_probes=3,
                              layers="linear")
    assert res["num_samples"] == 32 and res["trace"]["value"] == pytest.approx(total, rel=1e-12)
    capsys.readouterr()
