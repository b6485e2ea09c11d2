"""``flatfused sharpness``: the table, the JSON and the plot, against the API called directly."""
import json
from pathlib import Path

import pytest
import torch

from flatfused import cli
from flatfused.sharpness import (hessian_trace, keskar_sharpness, mean_loss, noise_stability,
                                 spectral_density, top_eigenvalues)

HELPERS = str(Path(__file__).parents[1].joinpath("sharpness_cli_models.py"))
F = torch.nn.functional


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(width=6):
    """A model whose weights differ from the factory's initialisation (so the checkpoint
    matters) and whose BatchNorm statistics are not the defaults."""
    from sharpness_cli_models import dataset, make_model

    torch.manual_seed(7)
    model = make_model(width)
    x, y = dataset().tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_measures_agree_with_the_api(tmp_path, capsys):
    model = trained()
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    out = tmp_path / "out"
    argv = ["sharpness", "--model", "sharpness_cli_models:make_model", "--model-kwargs",
            '{"width": 6}', "--checkpoint", str(ckpt), "--data", "sharpness_cli_models:dataset",
            "--batch-size", "16", "--batches", "2", "--measure", "all", "--sigma", "0.05",
            "--probes", "9", "--top-k", "2", "--eig-iters", "40", "--density-iters", "12",
            "--keskar-steps", "3", "--noise-samples", "4", "--seed", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    res = json.loads((out / "sharpness.json").read_text())
    assert (out / "sharpness.png").read_bytes()[:4] == b"\x89PNG"
    assert "hessian trace" in captured.err  # the progress fallback (or tqdm) on stderr

    x, y = [t[:32] for t in __import__("sharpness_cli_models").dataset().tensors]
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    model.eval()
    assert res["num_samples"] == 32 and res["num_batches"] == 2
    assert res["num_params"] == sum(p.numel() for p in model.parameters())
    assert res["loss"] == pytest.approx(mean_loss(model, F.cross_entropy, data), rel=1e-12)
    total, layers = hessian_trace(model, F.cross_entropy, data, num_probes=9, per_layer=True, seed=3)
    assert res["trace"]["value"] == pytest.approx(total, rel=1e-12)
    assert res["trace"]["per_layer"] == pytest.approx(layers, rel=1e-12)
    assert sum(res["trace"]["per_layer"].values()) == pytest.approx(total, rel=1e-12)
    top = top_eigenvalues(model, F.cross_entropy, data, k=2, iters=40, seed=3)
    assert res["top_eigenvalues"]["values"] == pytest.approx(top, rel=1e-12)
    nodes, weights = spectral_density(model, F.cross_entropy, data, iters=12, seed=3)
    assert res["density"]["nodes"][0] == pytest.approx(nodes[0], rel=1e-10, abs=1e-12)
    assert res["density"]["weights"][0] == pytest.approx(weights[0], rel=1e-10, abs=1e-12)
    assert res["keskar"]["value"] == pytest.approx(
        keskar_sharpness(model, F.cross_entropy, data, steps=3), rel=1e-9)
    ns = noise_stability(model, F.cross_entropy, data, sigma=0.05, num_samples=4, seed=3)
    assert res["noise_stability"]["mean"] == pytest.approx(ns.mean, rel=1e-9)
    assert res["noise_stability"]["quadratic_prediction"] == pytest.approx(0.05 ** 2 / 2 * total)
    # the table shows the same numbers
    table = captured.out
    for text in ("Hessian trace (hutchinson, 9 probes)", "0.weight", "eigenvalue 2 (power)",
                 "Keskar sharpness", "noise stability (sigma 0.05, 4 draws)",
                 f"{total:.6g}", f"{top[1]:.6g}"):
        assert text in table, text


def test_whole_module_file_path_list_data_and_pdf(tmp_path, capsys):
    model = trained(4)
    ckpt = tmp_path / "whole.pt"
    torch.save({"model": model}, ckpt)
    base = ["sharpness", "--checkpoint", str(ckpt), "--data", f"{HELPERS}:batches",
            "--batches", "0", "--loss", "torch.nn:CrossEntropyLoss", "--measure", "trace",
            "--probes", "3", "--trace-method", "hutch++", "--no-progress"]
    assert cli.main(base) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    out = tmp_path / "o"
    assert cli.main(base + ["--allow-pickle", "--out", str(out), "--plot-format", "pdf"]) == 0
    res = json.loads((out / "sharpness.json").read_text())
    assert res["num_samples"] == 48 and res["num_batches"] == 3
    assert (out / "sharpness.pdf").read_bytes()[:5] == b"%PDF-"
    from sharpness_cli_models import batches

    model.eval()
    assert res["trace"]["value"] == pytest.approx(
        hessian_trace(model, F.cross_entropy, batches(), num_probes=3, method="hutch++"), rel=1e-12)
    # a DistributedDataParallel-style state_dict ("module." keys) loads into the plain model
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    assert cli.main(["sharpness", "--model", f"{HELPERS}:make_model", "--model-kwargs",
                     '{"width": 4}', "--checkpoint", str(tmp_path / "ddp.pt"), "--data",
                     f"{HELPERS}:batches", "--measure", "trace", "--probes", "3",
                     "--trace-method", "hutch++", "--no-progress"]) == 0
    assert f"{res['trace']['value']:.6g}" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--model", "nomodule", "--data", "x:y"], "module:attribute"),
    (["--model", "no_such_module_xyz:f", "--data", "x:y"], "cannot import"),
    (["--model", "sharpness_cli_models:missing", "--data", "sharpness_cli_models:dataset"],
     "no attribute"),
    (["--model", "sharpness_cli_models:NOT_A_MODEL", "--data", "sharpness_cli_models:dataset"],
     "name a factory"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:dataset",
      "--measure", "noise"], "needs --sigma"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:dataset",
      "--measure", "trace,hessian"], "unknown"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:batches",
      "--batch-size", "8"], "--batch-size applies to a Dataset"),
    (["--model", "sharpness_cli_models:MODEL", "--model-kwargs", "{}", "--data",
      "sharpness_cli_models:batches"], "not a factory"),
    (["--model", "sharpness_cli_models:make_model", "--model-kwargs", "[1]", "--data",
      "sharpness_cli_models:batches"], "JSON object"),
    (["--data", "sharpness_cli_models:batches"], "pass --model"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:batches",
      "--checkpoint", "/no/such/file.pt"], "no file"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:batches",
      "--loss", "hinge"], "--loss must be one of"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:batches",
      "--device", "foo"], "--device foo"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:batches",
      "--measure", "eigs", "--top-k", "100000"], "exceeds the number of parameters"),
    (["--model", "sharpness_cli_models:make_model", "--data", "sharpness_cli_models:batches",
      "--measure", "trace", "--trace-method", "hutch++", "--probes", "2"], "hutch++"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    assert cli.main(["sharpness", *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_mismatch_and_argparse_errors(tmp_path, capsys):
    from sharpness_cli_models import make_model

    torch.save(make_model(5).state_dict(), tmp_path / "w5.pt")
    assert cli.main(["sharpness", "--model", "sharpness_cli_models:make_model", "--checkpoint",
                     str(tmp_path / "w5.pt"), "--data", "sharpness_cli_models:batches"]) == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert cli.main(["sharpness", "--data", "x:y", "--probes", "0"]) == 2
    assert cli.main(["sharpness", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_finite_difference_hvps(tmp_path, capsys):
    from sharpness_cli_models import batches, make_model

    torch.manual_seed(0)  # the command seeds the factory's initialisation with --seed 0
    model = make_model()
    assert cli.main(["sharpness", "--model", f"{HELPERS}:make_model", "--data",
                     f"{HELPERS}:batches", "--measure", "trace", "--probes", "3", "--hvp",
                     "finite_difference", "--fd-eps", "1e-2", "--no-progress", "--no-plot",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sharpness.json").read_text())
    assert res["hvp"] == "finite_difference" and res["fd_eps"] == 1e-2
    assert not (tmp_path / "sharpness.png").exists()
    model.eval()
    assert res["trace"]["value"] == pytest.approx(hessian_trace(
        model, F.cross_entropy, batches(), num_probes=3, hvp_method="finite_difference",
        fd_eps=1e-2), rel=1e-12)
