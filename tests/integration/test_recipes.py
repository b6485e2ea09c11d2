"""The training recipes end to end on CPU with tiny settings: examples/glue_label_noise/train.py
(the Hugging Face Trainer, FlatTrainer) and examples/cot_finetune/train.py (Lightning,
FlatOptimizerCallback), each writing its metrics, model, checkpoint and ``flatfused sharpness``
outputs where docs/recipes.md says; local model directories and data files; the refusals.
Nothing is downloaded: the models are built from configs, the data generated or written here.
"""
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: examples/

from examples.cot_finetune import train as cot  # noqa: E402
from examples.glue_label_noise import train as glue  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*GPU available but not used")]

# Tiny measurement settings: a few probes of one small batch (the numbers are checked for
# consistency, not accuracy).
SHARPNESS = ["--hessian-batches", "1", "--hessian-batch-size", "8", "--hessian-probes", "3",
             "--hessian-eig-iters", "3"]
GLUE_SMALL = ["--batch-size", "16", "--quiet"]
GLUE_DATA = ["--num-generated", "96"]
COT_SMALL = ["--batch-size", "8", "--max-new-tokens", "12", "--quiet"]
COT_DATA = ["--num-generated", "40", "--tiny-size", "32,1,2"]
PASSES = {"adamw": 1, "nso": 2, "sam": 2, "asam": 2, "wsam": 2}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sharpness_outputs(run: Path, metrics: dict, layers: int):
    """sharpness/: the JSON, the per-layer CSV (one row per Linear/Conv1D weight, then the
    total) and the plot; the metrics' copy of the numbers is the JSON's."""
    sharp = run / "sharpness"
    res = json.loads((sharp / "sharpness.json").read_text())
    assert (sharp / "sharpness.png").stat().st_size > 1000
    assert res["layers"]["preset"] == "linear" and res["layers"]["count"] == layers
    with open(sharp / "layer_traces.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows[:-1]] == list(res["trace"]["per_layer"])
    assert rows[-1]["layer"] == "total" and rows[-1]["index"] == ""
    per_layer = [float(r["trace"]) for r in rows[:-1]]
    assert all(map(finite, per_layer)) and len(per_layer) == layers
    # the total is the sum of the blocks, each the same probes' estimate (float64 sums)
    assert float(rows[-1]["trace"]) == pytest.approx(sum(per_layer), rel=1e-9, abs=1e-12)
    got = metrics["sharpness"]
    assert got["hessian_trace"] == res["trace"]["value"]
    assert got["top_eigenvalue"] == res["top_eigenvalues"]["values"][0]
    assert got["per_layer_trace"] == res["trace"]["per_layer"]
    assert finite(got["hessian_trace"]) and finite(got["top_eigenvalue"])
    return res


def model_loss(model, data_file, causal: bool) -> float:
    """The model's mean loss on a --text-data file, computed here with the model's own loss
    (per-sequence cross entropy for a classifier; per labelled token for a causal LM)."""
    data = torch.load(data_file)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                    labels=data["labels"])
    return float(out.loss)


# ---------------------------------------------------------------------------- the GLUE recipe

def test_glue_recipe_end_to_end(tmp_path, capsys):
    """AdamW and NSO on a generated 4-class task with 40% flipped labels: every documented
    output, the metrics recomputed from the saved model, NSO's two passes per step, and the
    sharpness measured on the saved model and the recipe's training rows."""
    out = tmp_path / "glue"
    assert glue.main(["--optimizer", "adamw,nso", "--epochs", "2", "--out", str(out)]
                     + GLUE_DATA + GLUE_SMALL + SHARPNESS) == 0
    printed = capsys.readouterr().out
    assert "| adamw |" in printed and "| nso | sigma 0.02 |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["optimizers"]) == ["adamw", "nso"]
    assert summary["runs"] == ["adamw-seed0", "nso-seed0"]
    assert (out / "summary.md").read_text().count("\n| ") == 4  # head, rule, adamw, nso
    with open(out / "layer_traces.csv", newline="") as f:  # the runs' traces side by side
        compared = list(csv.reader(f))
    assert compared[0] == ["layer", "adamw", "nso"] and compared[-1][0] == "total"
    assert (out / "layer_traces.png").stat().st_size > 1000

    from transformers import AutoModelForSequenceClassification

    from examples.glue_label_noise import load_task

    # the task the recipe trained on, rebuilt from its documented defaults and flags
    task = load_task(noise_rate=0.4, noise_mode="flip", seed=0, num_generated=96,
                     num_classes=4, eval_fraction=0.2)
    n = len(task.train)
    for kind in ("adamw", "nso"):
        run = out / f"{kind}-seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["optimizer"] == kind and metrics["seed"] == 0
        steps = 2 * math.ceil(n / 16)
        assert metrics["steps"] == steps
        assert metrics["forward_passes"] == steps * PASSES[kind]
        assert metrics["train_loss_kind"] == ("perturbed" if kind == "nso" else "clean")
        assert metrics["noisy_labels"] == round(0.4 * n)  # flip: every drawn label changes
        for key in ("train_loss", "train_loss_at_w", "test_loss", "train_seconds"):
            assert finite(metrics[key]), key
        assert [h["epoch"] for h in metrics["history"]] == [1.0, 2.0]
        summary_row = summary["optimizers"][kind]
        assert summary_row["test_accuracy"]["mean"] == metrics["test_accuracy"]

        model = AutoModelForSequenceClassification.from_pretrained(run / "model",
                                                                   local_files_only=True)
        assert (run / "model" / "local_tokenizer.json").exists()
        # the metrics are those of the saved model: recomputed here in the same batches
        test = glue._logits(model, task.eval, 16, "cpu").argmax(-1)
        train = glue._logits(model, task.train, 16, "cpu").argmax(-1)
        changed = task.train.labels != task.clean_labels
        assert metrics["test_accuracy"] == pytest.approx(
            float((test == task.eval.labels).float().mean()), abs=1e-7)
        assert metrics["noisy_memorised"] == pytest.approx(
            float((train[changed] == task.train.labels[changed]).float().mean()), abs=1e-7)
        res = check_sharpness_outputs(run, metrics, layers=14)  # 2 x 6 + the head's 2
        column = compared[0].index(kind)  # one seed: its traces are the mean
        assert {row[0]: float(row[column]) for row in compared[1:-1]} == \
            res["trace"]["per_layer"]
        assert res["hf_model"] == str(run / "model") and res["num_samples"] == 8
        # measured on the saved model and the first training rows, noisy labels as trained:
        # the same fp32 forward on the same 8 rows, one batch (rounding only)
        data = torch.load(run / "hessian_data.pt")
        assert torch.equal(data["labels"], task.train.labels[:8])
        assert res["loss"] == pytest.approx(model_loss(model, run / "hessian_data.pt", False),
                                            rel=1e-5)


def test_glue_adamw_is_the_plain_trainer(tmp_path):
    """The recipe's adamw run is the plain transformers.Trainer with the documented settings
    (AdamW, its no-decay groups, linear warmup and decay, clipping, the seed): bit-identical
    weights."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from examples.glue_label_noise import load_model, load_task

    out = tmp_path / "recipe"
    assert glue.main(["--optimizer", "adamw", "--epochs", "1", "--lr", "5e-3", "--seeds", "3",
                      "--grad-accum", "2", "--max-grad-norm", "0.5", "--hessian-batches", "0",
                      "--out", str(out)] + GLUE_DATA + GLUE_SMALL) == 0
    task = load_task(noise_rate=0.4, seed=0, num_generated=96, num_classes=4)
    model = load_model(task, seed=3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"), seed=3, data_seed=3, per_device_train_batch_size=16,
        per_device_eval_batch_size=16, gradient_accumulation_steps=2, num_train_epochs=1,
        learning_rate=5e-3, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=0.06,
        max_grad_norm=0.5, use_cpu=True, eval_strategy="epoch", logging_strategy="epoch",
        save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=task.train, eval_dataset=task.eval)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(out / "adamw-seed3" / "model",
                                                               local_files_only=True)
    start = load_model(task, seed=3)
    for (name, want), got, first in zip(model.named_parameters(), saved.parameters(),
                                        start.parameters()):
        assert torch.equal(got, want), name
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))


def write_rte(path, rows):
    lines = ["index\tsentence1\tsentence2\tlabel"]
    lines += [f"{i}\t{a}\t{b}\t{lab}" for i, (a, b, lab) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_glue_recipe_with_a_local_model_directory_and_glue_files(tmp_path):
    """A GLUE RTE train.tsv/dev.tsv and a model directory saved with save_pretrained (its own
    tokenizer inside, as a pretrained model's is): the recipe loads both, and trains and
    measures the directory's model (its sizes, not the tiny default's)."""
    from examples.glue_label_noise import tiny_roberta
    from examples.tokenization import LocalTokenizer

    words = ["the", "cat", "sat", "a", "dog", "ran", "it", "is", "not", "here", "there"]
    g = torch.Generator().manual_seed(0)

    def sentence():
        return " ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g))

    classes = ("entailment", "not_entailment")
    train = write_rte(tmp_path / "train.tsv", [(sentence(), sentence(), classes[i % 2])
                                               for i in range(40)])
    dev = write_rte(tmp_path / "dev.tsv", [(sentence(), sentence(), classes[i % 2])
                                           for i in range(12)])
    tok = LocalTokenizer.build(words + ["."])
    model_dir = tmp_path / "my-roberta"
    tiny_roberta(len(tok), 2, 64, hidden_size=16, intermediate_size=24).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert glue.main(["--model-dir", str(model_dir), "--train-file", str(train),
                      "--eval-file", str(dev), "--task", "rte", "--max-length", "64",
                      "--optimizer", "sam", "--max-steps", "2", "--noise-rate", "0.25",
                      "--noise-mode", "random", "--out", str(out)] + GLUE_SMALL + SHARPNESS) == 0
    metrics = json.loads((out / "sam-seed0" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["forward_passes"] == 2 * 2
    config = json.loads((out / "sam-seed0" / "model" / "config.json").read_text())
    assert config["hidden_size"] == 16
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    summary = json.loads((out / "summary.json").read_text())
    assert str(train) in summary["title"] and "noise 0.25 (random)" in summary["title"]
    check_sharpness_outputs(out / "sam-seed0", metrics, layers=14)


# ---------------------------------------------------------------------------- the CoT recipe

def test_cot_recipe_end_to_end(tmp_path, capsys):
    """SAM through Lightning in bf16-mixed with accumulation: metrics, a Lightning checkpoint
    that flatfused sharpness loads over the base model's directory (its loss is the fine-tuned
    model's, not the base's), the saved model, the decoded held-out problems."""
    out = tmp_path / "cot"
    assert cot.main(["--optimizer", "sam", "--max-steps", "3", "--grad-accum", "2",
                     "--precision", "bf16-mixed", "--out", str(out)]
                    + COT_DATA + COT_SMALL + SHARPNESS) == 0
    assert "| sam | rho 0.05 |" in capsys.readouterr().out
    run = out / "sam-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"] == "bf16-mixed" and metrics["steps"] == 3
    assert metrics["forward_passes"] == 3 * 2 * 2  # steps x passes x micro-batches
    for key in ("eval_loss", "train_loss_at_w", "token_accuracy", "answer_accuracy",
                "answer_format", "train_seconds"):
        assert finite(metrics[key]), key
    assert 0 <= metrics["answer_accuracy"] <= metrics["answer_format"] <= 1
    assert metrics["eval_problems"] == 8 and len(metrics["samples"]) == 5
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and "flatfused" in ckpt["optimizer_states"][0]
    assert all(k.startswith("model.") for k in ckpt["state_dict"])

    from transformers import AutoModelForCausalLM

    res = check_sharpness_outputs(run, metrics, layers=4)  # 1 block: c_attn, c_proj, c_fc, c_proj
    assert res["checkpoint"] == str(run / "last.ckpt")
    assert res["hf_model"] == str(run / "base_model")
    tuned = AutoModelForCausalLM.from_pretrained(run / "model", local_files_only=True,
                                                 attn_implementation="eager")
    base = AutoModelForCausalLM.from_pretrained(run / "base_model", local_files_only=True,
                                                attn_implementation="eager")
    data = run / "hessian_data.pt"
    # the same fp32 forward of the same rows (rounding only); the base model's loss differs
    # by far more: the checkpoint, not the directory's weights, was measured
    assert res["loss"] == pytest.approx(model_loss(tuned, data, True), rel=1e-5)
    assert abs(res["loss"] - model_loss(base, data, True)) > 1e-3


def test_cot_recipe_fp16_scaler_and_local_files(tmp_path):
    """A question/rationale/answer JSONL and a model directory with its own tokenizer (the
    model's vocabulary), NSO under 16-mixed with a CPU GradScaler: the checkpoint carries
    the scaler's state, and flatfused sharpness measures it over the user's directory."""
    from examples.cot_finetune import generate_arithmetic, tiny_gpt2
    from examples.tokenization import LocalTokenizer

    problems = generate_arithmetic(30, seed=5)
    lines = [json.dumps({"question": p.question, "rationale": p.rationale,
                         "answer": int(p.answer)}) for p in problems]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (tmp_path / "dev.jsonl").write_text("\n".join(lines[24:]) + "\n")
    tok = LocalTokenizer.build([p.question + p.rationale + "Q:\nA: The answer is ."
                                for p in problems], level="char")
    model_dir = tmp_path / "my-gpt2"
    tiny_gpt2(len(tok), 256, n_embd=16, n_layer=1, n_head=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert cot.main(["--model-dir", str(model_dir), "--tokenizer-dir", str(model_dir),
                     "--data-file", str(tmp_path / "train.jsonl"),
                     "--eval-file", str(tmp_path / "dev.jsonl"), "--max-length", "256",
                     "--optimizer", "nso", "--max-steps", "2", "--precision", "16-mixed",
                     "--out", str(out)] + COT_SMALL + SHARPNESS) == 0
    run = out / "nso-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"] == "16-mixed" and metrics["eval_problems"] == 6
    assert metrics["base_model_dir"] == str(model_dir) and not (run / "base_model").exists()
    # trained in training mode (from_pretrained gives eval mode): NSO's 2 passes per step
    assert metrics["steps"] == 2 and metrics["forward_passes"] == 2 * 2
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert "scale" in ckpt["MixedPrecision"]  # Lightning's key for the GradScaler's state
    assert ckpt["state_dict"]["model.transformer.wte.weight"].shape[1] == 16
    res = check_sharpness_outputs(run, metrics, layers=4)
    assert res["hf_model"] == str(model_dir)


def test_answers_are_parsed_and_greedy_decoding_is_argmax():
    assert cot.parse_answer(" 2 + 3 = 5. The answer is 5.") == cot._normal("5")
    assert cot.parse_answer("the answer is 5 .") == cot._normal("5.0")  # a word tokenizer's
    assert cot.parse_answer("The answer is 1,200.") == cot._normal("1200")
    assert cot.parse_answer("The answer is yes.") == "yes"
    assert cot.parse_answer("2 + 3 = 5.") is None
    assert cot.parse_answer("The answer is 4. The answer is 6.") == cot._normal("6")

    from examples.cot_finetune import tiny_gpt2

    model = tiny_gpt2(30, 40, seed=1).eval()
    prompts = [[2, 5, 6], [2, 7, 8], [2, 9, 10, 11]]
    got = cot.greedy_decode(model, prompts, 8, eos=3, pad=0, device="cpu", batch_size=2)
    for prompt, tokens in zip(prompts, got):  # one token at a time, no cache, no batching
        ids, want = list(prompt), []
        for _ in range(8):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == 3:
                break
            want.append(token)
            ids.append(token)
        assert tokens == want


# ---------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("recipe,argv,message", [
    ("glue", ["--optimizer", "adamw,lion"], "--optimizer: unknown ['lion']"),
    ("glue", ["--optimizer", "sam", "--nso-sigma", "0.1"], "--nso-sigma applies to nso"),
    ("glue", ["--optimizer", "nso", "--compare"], "not both"),
    ("glue", ["--wsam-gamma", "1", "--optimizer", "wsam"], "--wsam-gamma must be in [0, 1)"),
    ("glue", ["--seeds", "1,1"], "given more than once"),
    ("glue", ["--train-file", "x.tsv"], "--train-file needs --eval-file"),
    ("glue", ["--train-file", "no.tsv", "--eval-file", "no.tsv", "--task", "rte"],
     "no file 'no.tsv'"),
    ("glue", ["--noise-rate", "1.5"], "--noise-rate must be in [0, 1]"),
    ("glue", ["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA GPU"),
    ("glue", ["--model-dir", "roberta-base"], "does not exist"),
    ("glue", ["--lr", "-1"], "--lr: must be > 0"),
    ("cot", ["--tiny-size", "30,2,4"], "--tiny-size"),
    ("cot", ["--model-dir", "gpt2", "--tokenizer-dir", "gpt2", "--tiny-size", "8,1,1"],
     "--tiny-size sizes the tiny model"),
    ("cot", ["--model-dir", "gpt2"], "--model-dir needs --tokenizer-dir"),
    ("cot", ["--eval-fraction", "0"], "--eval-fraction must be > 0"),
    ("cot", ["--data-file", "no.jsonl"], "no file 'no.jsonl'"),
    ("cot", ["--precision", "16-true"], "--precision: invalid choice"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, recipe, argv, message):
    """Refused before anything is trained or written."""
    main = glue.main if recipe == "glue" else cot.main
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "error:" in err, err
    assert not out.exists()
