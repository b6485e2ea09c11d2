"""Per-layer Hessian traces of fine-tuned transformers: the layer selection, Hugging Face model
directories, Lightning checkpoints, tokenised/generated text, and ``flatfused sharpness``'s
outputs, against exact Hessians of the models' own (transformers-computed) losses."""
import csv
import json
import logging
import shlex
import warnings
from pathlib import Path

import pytest
import torch

from flatfused import cli
from flatfused.sharpness import LayerSelector, hessian_trace, top_eigenvalues
from flatfused.sharpness.hf import causal_lm_loss, hf_logits

pytest.importorskip("transformers")
from sharpness_text_models import PAD, VOCAB, gpt2, roberta  # noqa: E402

HELPERS = str(Path(__file__).parents[1].joinpath("sharpness_text_models.py"))
F = torch.nn.functional

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # transformers' own, on import of its attention code
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]

# Both sides run in float64 (the models are saved in float64 and from_pretrained keeps the
# saved dtype). Each diagonal Hessian entry is a sum of at most a few thousand products of O(1)
# factors (weights ~0.02, activations ~1, loss derivatives <= 1) at these sizes, so the two AD
# orders (reverse-over-reverse here, forward-over-reverse in torch.func.hessian) differ by about
# 1e3 * eps64 ~ 1e-13 per entry; a block has at most 64 entries: abs 1e-10 bounds a block's
# trace with room, rel 1e-9 the larger ones.
EXACT = dict(rel=1e-9, abs=1e-10)


def seed_roberta_layers(model):
    """The NSO text scripts' layer rule, written out: nn.Linear modules (exact type) whose name
    has none of LayerNorm, embeddings, pooler."""
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear
            and not any(s in n for s in ("LayerNorm", "embeddings", "pooler"))]


def seed_gpt2_layers(model):
    """The chain-of-thought scripts' rule: transformers' Conv1D modules (exact type)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if type(m) is Conv1D]


def own_loss(model, out, labels):
    """The model's training loss from its output: transformers' own for a classifier; for a
    causal LM its rule written out in float64 (transformers computes it in float32: the
    logits at t predict the label at t + 1, -100 skipped, mean over the tokens counted)."""
    if labels.dim() == 1:
        return out.loss
    return F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.size(-1)),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def exact_layer_traces(model, batches, layers):
    """tr of each layer weight's diagonal Hessian block of the model's own loss, batch-size
    weighted over ``batches``, by torch.func.hessian on that weight alone."""
    params = dict(model.named_parameters())
    total_n = sum(len(labels) for _, labels in batches)
    out = {}
    for layer in layers:
        name = layer + ".weight"
        w0 = params[name].detach()

        def loss(w, name=name):
            total = 0
            for inputs, labels in batches:
                res = torch.func.functional_call(model, {name: w}, (), {**inputs, "labels": labels})
                total = total + own_loss(model, res, labels) * len(labels)
            return total / total_n

        h = torch.func.hessian(loss)(w0).reshape(w0.numel(), w0.numel())
        out[layer] = float(h.diagonal().sum().detach())
    return out


def model_loss(model, batches):
    total_n = sum(len(labels) for _, labels in batches)
    with torch.no_grad():
        return sum(float(own_loss(model, model(**inputs, labels=labels), labels)) * len(labels)
                   for inputs, labels in batches) / total_n


def run(argv, capsys):
    rc = cli.main(["sharpness", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------------- data on disk


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def classification_rows(n=6, seed=5):
    """Tokenised records of unequal lengths (the file is padded to its longest)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + i % 3
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "label": int(torch.randint(0, 3, (), generator=g))})
    return rows


def padded(rows):
    """The documented padding: right, to the file's longest sequence, pad id / mask 0."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [PAD] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                         for r in rows])
    return ids, mask


def lm_tensors(n=4, length=7, seed=6):
    """Causal-LM tensors with a 2-token prompt skipped (-100) and right padding on two rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 6:] = 0
    ids[mask == 0] = PAD
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny float64 RoBERTa / GPT-2 / BERT directories, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, model in (("roberta", roberta()), ("gpt2", gpt2()),
                        ("regression", roberta(num_labels=1))):
        model.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


# ------------------------------------------------------------------ exact per-layer traces


def test_roberta_linear_layers_match_the_exact_hessian(saved, tmp_path, capsys):
    rows = classification_rows()
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    rc, stdout, err = run(["--hf-model", saved["roberta"], "--text-data", data, "--batch-size",
                           "3", "--batches", "0", "--layers", "linear", "--measure", "trace",
                           "--trace-method", "exact", "--out", str(out)], capsys)
    assert rc == 0, err
    res = json.loads((out / "sharpness.json").read_text())

    model = roberta()  # the saved model (same seed), float64
    layers = seed_roberta_layers(model)
    assert list(res["trace"]["per_layer"]) == layers  # the seed's selection, in model order
    assert "classifier.out_proj" in layers and not any("embeddings" in n for n in layers)
    ids, mask = padded(rows)
    labels = torch.tensor([r["label"] for r in rows])
    batches = [({"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3]}, labels[i:i + 3])
               for i in (0, 3)]
    exact = exact_layer_traces(model, batches, layers)
    assert res["trace"]["per_layer"] == pytest.approx(exact, **EXACT)
    assert res["trace"]["value"] == pytest.approx(sum(exact.values()), **EXACT)
    assert res["loss"] == pytest.approx(model_loss(model, batches), rel=1e-12)
    assert res["layers"]["numel"] == res["trace"]["products"] == 284
    assert res["num_samples"] == 6 and res["num_batches"] == 2

    # the CSV (where docs/sharpness.md says): one row per layer in order, then the sum
    with open(out / "layer_traces.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["layer"] for r in table] == layers + ["total"]
    assert [int(r["index"]) for r in table[:-1]] == list(range(len(layers)))
    assert [float(r["trace"]) for r in table[:-1]] == list(res["trace"]["per_layer"].values())
    assert float(table[-1]["trace"]) == res["trace"]["value"]
    assert int(table[-1]["numel"]) == 284
    assert table[0]["parameters"] == layers[0] + ".weight"
    assert (out / "sharpness.png").read_bytes()[:4] == b"\x89PNG"
    assert "over 14 layers (Linear/Conv1D weights), 284 parameters" in stdout


def test_gpt2_conv1d_layers_match_the_exact_hessian(saved, tmp_path, capsys):
    tensors = lm_tensors()
    torch.save(tensors, tmp_path / "tokens.pt")
    rc, _, err = run(["--hf-model", saved["gpt2"], "--text-data", str(tmp_path / "tokens.pt"),
                      "--batch-size", "4", "--layers", "linear", "--measure", "trace",
                      "--trace-method", "exact", "--out", str(tmp_path), "--no-plot"], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "sharpness.json").read_text())
    model = gpt2()
    layers = seed_gpt2_layers(model)
    # lm_head (a Linear) shares the token embedding's matrix: it is the embedding, not a layer
    assert list(res["trace"]["per_layer"]) == layers and "lm_head" not in res["trace"]["per_layer"]
    assert res["loss_fn"] == "causal_lm"
    batch = [({"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"]},
              tensors["labels"])]
    exact = exact_layer_traces(model, batch, layers)
    assert res["trace"]["per_layer"] == pytest.approx(exact, **EXACT)
    assert res["loss"] == pytest.approx(model_loss(model, batch), rel=1e-12)


# ------------------------------------------------------------- the Hutchinson path, the API


def test_cli_hutchinson_layers_equal_the_api(saved, tmp_path, capsys):
    tensors = lm_tensors(seed=8)
    torch.save(tensors, tmp_path / "tokens.pt")
    out = tmp_path / "o"
    rc, _, err = run(["--hf-model", saved["gpt2"], "--text-data", str(tmp_path / "tokens.pt"),
                      "--batch-size", "2", "--layer-types", "Conv1D", "--layer-params", "all",
                      "--include", r"\.h\.1\.", "--measure", "trace,eigs", "--probes", "4",
                      "--top-k", "1", "--eig-iters", "5", "--seed", "2", "--out", str(out),
                      "--no-plot"], capsys)
    assert rc == 0, err
    res = json.loads((out / "sharpness.json").read_text())
    model = gpt2()
    batches = [({"input_ids": tensors["input_ids"][i:i + 2],
                 "attention_mask": tensors["attention_mask"][i:i + 2]}, tensors["labels"][i:i + 2])
               for i in (0, 2)]
    sel = LayerSelector(types="Conv1D", include=r"\.h\.1\.", params="all")
    with hf_logits(model):
        total, per_layer = hessian_trace(model, causal_lm_loss, batches, num_probes=4,
                                         per_layer=True, seed=2, layers=sel)
        top = top_eigenvalues(model, causal_lm_loss, batches, k=1, iters=5, seed=2, layers=sel)
    assert list(per_layer) == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                               "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert res["trace"]["per_layer"] == pytest.approx(per_layer, rel=1e-12)
    assert res["trace"]["value"] == pytest.approx(total, rel=1e-12)
    assert res["top_eigenvalues"]["values"] == pytest.approx(top, rel=1e-12)
    assert res["layers"]["parameters"]["transformer.h.1.attn.c_attn"] == [
        "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"]
    assert res["layers"]["numel"] == 4 * 3 * 4 + 12 + 16 + 4 + 64 + 16 + 64 + 4


def test_a_layer_is_the_sum_of_its_parameter_blocks():
    """Grouped traces are the per-parameter blocks (same probes) summed per module; the
    selector's param_filter and ``layers=`` select the same Hessian."""
    from sharpness_cli_models import batches, make_model

    torch.manual_seed(0)
    model = make_model(6)
    data = batches()
    sel = LayerSelector(types=("Linear",), params="all")
    total, grouped = hessian_trace(model, F.cross_entropy, data, num_probes=5, per_layer=True,
                                   seed=4, layers=sel)
    total_p, by_param = hessian_trace(model, F.cross_entropy, data, num_probes=5,
                                      per_layer=True, seed=4, param_filter=sel.param_filter(model))
    assert list(grouped) == ["0", "3"]
    assert grouped["0"] == pytest.approx(by_param["0.weight"] + by_param["0.bias"], rel=1e-12)
    assert grouped["3"] == pytest.approx(by_param["3.weight"] + by_param["3.bias"], rel=1e-12)
    assert total == pytest.approx(total_p, rel=1e-12)
    assert "1.weight" not in by_param  # the BatchNorm's parameters are not a Linear's
    # the default preset is the per-parameter output the functions always gave
    assert hessian_trace(model, F.cross_entropy, data, num_probes=3, per_layer=True,
                         layers="parameters") == hessian_trace(model, F.cross_entropy, data,
                                                               num_probes=3, per_layer=True)
    with pytest.raises(ValueError, match="param_filter or layers"):
        hessian_trace(model, F.cross_entropy, data, layers=sel, param_filter=lambda n, p: True)


# --------------------------------------------------------------------------- selection


def test_selection_rules():
    bert = roberta(pooler=True)
    linear = LayerSelector.preset("linear").blocks(bert)
    assert list(linear) == seed_roberta_layers(bert)
    assert "bert.pooler.dense" not in linear and "classifier" in linear
    assert all(v == (k + ".weight",) for k, v in linear.items())
    kept = LayerSelector.preset("linear", exclude="").blocks(bert)  # '' clears the exclusion
    assert list(kept) == [n for n, m in bert.named_modules() if type(m) is torch.nn.Linear]
    enc = LayerSelector.preset("linear", include=r"^bert\.encoder\.layer\.1\.").blocks(bert)
    assert len(enc) == 6 and all(k.startswith("bert.encoder.layer.1.") for k in enc)

    # parameters preset: names are parameters; frozen ones are not selected
    bert.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    params = LayerSelector(exclude="LayerNorm").blocks(bert)
    assert "bert.embeddings.word_embeddings.weight" not in params
    assert "bert.embeddings.position_embeddings.weight" in params
    assert not any("LayerNorm" in k for k in params)

    # subclasses count: MultiheadAttention's out_proj is a Linear subclass
    mha = torch.nn.TransformerEncoderLayer(8, 2, 16)
    assert "self_attn.out_proj" in LayerSelector(types="Linear").blocks(mha)


@pytest.mark.parametrize("kwargs,message", [
    (dict(types="Conv2d"), "no module of type Conv2d"),
    (dict(types="Linear", include="nothing_matches"), "include 'nothing_matches'"),
    (dict(include="("), "not a regular expression"),
    (dict(types="Linear,Linear"), "more than once"),
    (dict(types="Linear", params="bias"), "params must be one of"),
])
def test_selection_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSelector(**kwargs).blocks(gpt2())


# ------------------------------------------------------------------ losses and the adapter


def test_losses_are_the_models_own(saved, tmp_path, capsys):
    """With no --loss the command uses each model's training loss: the mean loss it reports
    is transformers' own, for a classifier, a regression head and a causal LM."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (4, 5), generator=g)
    for name, labels, expected in (
            ("roberta", torch.tensor([0, 2, 1, 2]), "cross_entropy"),
            ("regression", torch.randn(4, generator=g, dtype=torch.float64), "mse"),
            ("gpt2", ids.clone(), "causal_lm")):
        torch.save({"input_ids": ids, "labels": labels}, tmp_path / "d.pt")
        rc, _, err = run(["--hf-model", saved[name], "--text-data", str(tmp_path / "d.pt"),
                          "--measure", "eigs", "--top-k", "1", "--eig-iters", "1", "--out",
                          str(tmp_path / name), "--no-plot"], capsys)
        assert rc == 0, err
        res = json.loads((tmp_path / name / "sharpness.json").read_text())
        model = {"roberta": roberta, "regression": lambda: roberta(num_labels=1),
                 "gpt2": gpt2}[name]()
        assert res["loss_fn"] == expected
        batch = [({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)]
        assert res["loss"] == pytest.approx(model_loss(model, batch), rel=1e-12), name


def test_hf_logits_hooks_are_removed():
    model = gpt2()
    model.set_attn_implementation("sdpa")  # transformers' default: no double backward
    ids = torch.randint(2, VOCAB, (2, 5))
    with hf_logits(model):
        assert model.config._attn_implementation == "eager"
        logits = model({"input_ids": ids})
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5, VOCAB)
        top_eigenvalues(model, causal_lm_loss, ({"input_ids": ids}, ids), iters=2)
    logits = logits.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=ids).loss  # a ModelOutput again: hooks are gone
    # transformers computes this loss from float32 logits: a log-softmax over 24 classes and a
    # mean over 8 tokens, each with a relative rounding error of a few eps32 (1.2e-7) on a
    # loss of about log(24) = 3.2: rel 1e-6
    assert float(causal_lm_loss(logits, ids)) == pytest.approx(float(hf_loss), rel=1e-6)
    with pytest.raises(ValueError, match="no token to predict"):
        causal_lm_loss(logits, torch.full_like(ids, -100))


# ------------------------------------------------------------------ Lightning checkpoints


def test_lightning_checkpoint_with_a_factory_or_a_model_directory(saved, tmp_path, capsys):
    pl = pytest.importorskip("lightning.pytorch")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    class FineTune(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = gpt2(dtype=torch.float32)

        def training_step(self, batch, _):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    tensors = lm_tensors(seed=9)
    lm = FineTune()
    loader = torch.utils.data.DataLoader([{k: v for k, v in tensors.items()}], batch_size=None)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lm, train_dataloaders=loader)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.save(tensors, tmp_path / "tokens.pt")

    model = lm.model.eval()
    batch = ({"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"]},
             tensors["labels"])
    with hf_logits(model):
        _, expected = hessian_trace(model, causal_lm_loss, batch, num_probes=3, per_layer=True,
                                    layers="linear")
    common = ["--checkpoint", str(ckpt), "--text-data", str(tmp_path / "tokens.pt"),
              "--layers", "linear", "--measure", "trace", "--probes", "3", "--no-plot"]
    # a float32 model directory of the same architecture, the weights from the checkpoint
    gpt2(dtype=torch.float32, seed=1).save_pretrained(tmp_path / "base")
    for source in (["--model", f"{HELPERS}:gpt2_factory"], ["--hf-model", str(tmp_path / "base")]):
        out = tmp_path / source[0].strip("-")
        rc, _, err = run(source + common + ["--out", str(out)], capsys)
        assert rc == 0, err
        res = json.loads((out / "sharpness.json").read_text())
        assert res["trace"]["per_layer"] == pytest.approx(expected, rel=1e-12), source
    # the model before fine-tuning measures differently, so the checkpoint's weights were used
    rc, _, err = run(["--hf-model", str(tmp_path / "base"), *common[2:], "--out",
                      str(tmp_path / "plain")], capsys)
    plain = json.loads((tmp_path / "plain" / "sharpness.json").read_text())
    assert rc == 0 and plain["trace"]["value"] != pytest.approx(sum(expected.values()), rel=1e-3)
    # an explicit prefix that matches nothing is refused
    rc, _, err = run(["--model", f"{HELPERS}:gpt2_factory", "--checkpoint-prefix", "net.",
                      *common], capsys)
    assert rc == 2 and "--checkpoint-prefix 'net.'" in err


# --------------------------------------------------------------------- generated text


def test_generated_text(saved, tmp_path, capsys):
    from flatfused.sharpness import hf, text_data

    model = hf.load_local(saved["roberta"])
    data = text_data.generate(model.config, "sequence-classification", 10, 6, seed=4)
    assert data["input_ids"].shape == (10, 6) and data["labels"].shape == (10,)
    assert not bool(torch.isin(data["input_ids"], torch.tensor([PAD, 0, 2])).any())
    assert bool((data["labels"] >= 0).all() and (data["labels"] < 3).all())
    again = text_data.generate(model.config, "sequence-classification", 10, 6, seed=4)
    assert all(torch.equal(data[k], again[k]) for k in data)
    other = text_data.generate(model.config, "sequence-classification", 10, 6, seed=5)
    assert not torch.equal(data["input_ids"], other["input_ids"])
    rc, stdout, err = run(["--hf-model", saved["roberta"], "--text-data", "random", "--seq-len",
                           "6", "--batch-size", "5", "--batches", "2", "--measure", "trace",
                           "--probes", "2", "--layers", "linear", "--out", str(tmp_path),
                           "--no-plot"], capsys)
    assert rc == 0, err
    assert "(generated tokens)" in stdout
    res = json.loads((tmp_path / "sharpness.json").read_text())
    assert res["num_samples"] == 10 and res["text_data"].startswith("random (generated")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_jsonl(root / "big_id.jsonl", [{"input_ids": [3, VOCAB + 5], "label": 0}])
    write_jsonl(root / "no_label.jsonl", [{"input_ids": [3, 4]}])
    write_jsonl(root / "label9.jsonl", [{"input_ids": [3, 4], "label": 9}])
    (root / "broken.jsonl").write_text('{"input_ids": [3, 4], "label": 0}\nnot json\n')
    (root / "tokens.txt").write_text("3 4 5\n")
    torch.save({"input_ids": torch.randint(2, VOCAB, (2, 40))}, root / "long.pt")
    (root / "empty_dir").mkdir()
    (root / "config_only").mkdir()
    roberta().config.save_pretrained(root / "config_only")
    return root


RANDOM = "--hf-model {roberta} --text-data random"


@pytest.mark.parametrize("args,message", [
    ("--hf-model {root}/no_such_dir --text-data random", "is not a directory"),
    ("--hf-model roberta-base --text-data random", "hub names are not loaded"),
    ("--hf-model {root}/empty_dir --text-data random", "has no config.json"),
    ("--hf-model {root}/config_only --text-data random", "pass the task"),
    ("--hf-model {root}/config_only --hf-task sequence-classification --text-data random",
     "cannot load it: OSError"),
    (RANDOM + " --hf-task causal-lm", "initialise at random"),
    (RANDOM + " --model x:y", "not both"),
    ("--hf-model {roberta} --text-data {root}/big_id.jsonl", "outside the model's vocabulary"),
    ("--hf-model {roberta} --text-data {root}/no_label.jsonl", "needs a numeric 'labels'"),
    ("--hf-model {roberta} --text-data {root}/label9.jsonl", "outside the model's 3 classes"),
    ("--hf-model {roberta} --text-data {root}/broken.jsonl", "broken.jsonl:2: not JSON"),
    ("--hf-model {roberta} --text-data {root}/tokens.txt", "is .pt (torch.save"),
    ("--hf-model {gpt2} --text-data {root}/long.pt", "exceed the model's 16 positions"),
    (RANDOM + " --seq-len 15", "exceeds the model's 14 positions"),  # RoBERTa: 16 - (pad + 1)
    (RANDOM + " --batches 0", "needs a number of --batches"),
    ("--hf-model {roberta} --text-data {root}/label9.jsonl --seq-len 4", "--seq-len applies"),
    (RANDOM + " --data x:y", "not both"),
    ("--model sharpness_cli_models:make_model --text-data random", "needs a Hugging Face model"),
    (RANDOM + " --layer-types Conv2d", "no module of type Conv2d"),
    (RANDOM + " --include (x", "not a regular expression"),
    (RANDOM + " --layers parameters --layer-types Linear", "pass one of them"),
    (RANDOM + " --layer-params all", "--layer-params applies"),
    (RANDOM + " --layers linear --include pooler", "matches include 'pooler'"),
    (RANDOM + " --checkpoint-prefix model.", "--checkpoint-prefix applies"),
    ("--model sharpness_cli_models:make_model --data sharpness_cli_models:batches "
     "--hf-task causal-lm", "--hf-task applies to --hf-model"),
])
def test_bad_input_is_one_line_and_status_2(args, message, saved, bad_files, capsys):
    args = shlex.split(args.format(root=bad_files, **saved))
    rc, _, err = run(args + ["--measure", "trace", "--probes", "1"], capsys)
    assert rc == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
