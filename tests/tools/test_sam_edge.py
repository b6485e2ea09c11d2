"""``flatfused sam-edge``: each command runs briefly and writes the documented outputs; the
training is the original's (checked against a plain PyTorch loop); the raw data agree with the edge
formula; several eigenvalues by orthogonal iteration; the data readers; bad input refused."""
import gzip
import json
import math
import pickle

import numpy as np
import pytest
import torch

from flatfused import cli
from flatfused.sam_edge import data, experiment, models, tasks
from flatfused.sharpness import SAMEdgeTracker

pytestmark = pytest.mark.usefixtures("one_thread")

COLUMNS = ["training_time", "hessian_norm", "two_over_eta", "sam_edge", "grad_norm", "loss",
           "grad_alignment", "sam_grad_alignment", "step"]
FIGURES = ["eigs.pdf", "eigs_se_only.pdf", "a.pdf", "ell.pdf"]

# A run of a few steps on 64 generated digits with a 784-16-16-10 MLP.
TINY = ["--batch_size", "64", "--mini_training_set_num_batches", "1",
        "--mini_test_set_num_batches", "1", "--mlp_depth", "3", "--mlp_width", "16",
        "--step_size", "0.5", "--hessian_check_steps", "2", "--num_steps", "6"]


def run(argv, tmp_path, capsys=None):
    out = tmp_path / "out"
    code = cli.main(["sam-edge"] + argv + ["--output_dir", str(out)])
    assert code == 0
    header, *lines = (out / "raw.txt").read_text().splitlines()
    names = header[2:].split()
    rows = [dict(zip(names, map(float, line.split()))) for line in lines]
    return out, names, rows, json.loads((out / "sam_edge_run.json").read_text())


def seed_sam_edge(g, rho, eta):
    """The seed's expression (sam_edge.py), not flatfused's cancellation-free form."""
    return 2 / eta if rho == 0 else (g / (2 * rho)) * (math.sqrt(1 + 8 * rho / (eta * g)) - 1)


def check_files(out, rows, names, k=1, png=False):
    assert names == COLUMNS + [f"eigenvalue_{i}" for i in range(1, k + 1)] + ["hvps",
                                                                            "check_seconds"]
    assert rows and all(math.isfinite(v) for r in rows for v in r.values())
    for name in FIGURES:
        if png:
            assert (out / name.replace(".pdf", ".png")).read_bytes()[:4] == b"\x89PNG", name
        else:
            assert (out / name).read_bytes()[:5] == b"%PDF-", name
    # numpy reads the file as written (the header is a comment)
    assert np.loadtxt(out / "raw.txt", ndmin=2).shape == (len(rows), len(names))


# ------------------------------------------------------------------- the image command

def digits_batch(n=64):
    """The command's data, preprocessed as documented: the first n generated digits, pixels
    / 256, centred by the mean image of the (only) training batch."""
    x, y = data.synthetic_digits(n, "train")
    x = x.float() / 256
    return x - x.mean(0, keepdim=True), y


def plain_losses(rho, eta, steps, check_every):
    """The seed's update in plain PyTorch: w -= eta * grad L(w + rho g/|g|), g = grad L(w);
    returns the loss at each checked step."""
    x, y = digits_batch()
    model = models.MLP(784, 3, 16, 10, tasks._generator(0, 0))
    params = list(model.parameters())
    losses = []
    for step in range(steps):
        loss = models.squared_loss(model(x), y)
        if step % check_every == 0:
            losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params)
        if rho > 0:
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            with torch.no_grad():
                saved = [p.clone() for p in params]
                for p, g in zip(params, grads):
                    p.add_(g, alpha=float(rho / norm))
            grads = torch.autograd.grad(models.squared_loss(model(x), y), params)
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=eta)
    return losses


@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_image_command_outputs_and_training_match_the_seed(tmp_path, capsys, rho):
    out, names, rows, record = run(["image-classification", "--rho", str(rho)] + TINY, tmp_path)
    printed = capsys.readouterr().out
    check_files(out, rows, names)
    assert "data: synthetic digits (generated here, no download" in printed
    assert "step 4: loss" in printed and "vs SAM edge" in printed
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert r["two_over_eta"] == 2 / 0.5
        assert r["hessian_norm"] == abs(r["eigenvalue_1"])
        # the two algebraic forms of the edge differ by rounding only: 8 rho/(eta g) >= 0.4
        # here, so the original's sqrt(1 + x) - 1 loses at most a few ulps (relative 1e-15)
        assert r["sam_edge"] == pytest.approx(seed_sam_edge(r["grad_norm"], rho, 0.5), rel=1e-12)
        assert r["sam_edge"] <= r["two_over_eta"]
        assert 0 <= r["grad_alignment"] <= 1 and 0 <= r["sam_grad_alignment"] <= 1
        if rho == 0:  # the SAM gradient at rho = 0 is the gradient itself
            assert r["sam_grad_alignment"] == r["grad_alignment"]
    # The run is the original's update: the checked losses follow a plain PyTorch loop. Both run
    # in float32 and differ only in summation order (the fused SAM's norm is one reduction,
    # its ascent adds 1e-12 to the norm): a few ulps per step, relative 1e-6 after 4 steps of
    # a contraction at eta * |H| < 2; 1e-5 leaves room.
    assert [r["loss"] for r in rows] == pytest.approx(plain_losses(rho, 0.5, 5, 2), rel=1e-5)
    result = record["result"]
    assert result["steps"] == 6 and result["checks"] == 3
    assert result["stopped"] == "reached --num_steps 6" and 0 <= result["test_error"] <= 1
    assert record["arguments"]["rho"] == rho and record["batch_size"] == 64
    assert record["model"]["parameters"] == 784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert record["command"].startswith("flatfused sam-edge image-classification --rho")
    assert record["environment"]["torch"] == torch.__version__
    assert record["columns"] == names


def test_hyphens_and_underscores_are_the_same_flags(tmp_path):
    # eval-mode measurements and seeded generators: two runs are bit-identical
    _, _, rows, _ = run(["image_classification", "--rho", "0.05"] + TINY, tmp_path / "a")
    hyphenated = [t.replace("_", "-") if t.startswith("--") else t for t in TINY]
    _, _, again, _ = run(["image-classification", "--rho=0.05"] + hyphenated, tmp_path / "b")
    strip = ("training_time", "check_seconds")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == \
           [{k: v for k, v in r.items() if k not in strip} for r in again]


def fake_mnist(root, n_train=20, n_test=8, gz=True):
    """A torchvision-layout MNIST (root/MNIST/raw) of random bytes."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        for kind, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            blob = header + array.numpy().tobytes()
            name = raw / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(str(name) + ".gz", "wb") as f:
                    f.write(blob)
            else:
                name.write_bytes(blob)
        arrays[prefix] = (images, labels)
    return arrays


def test_mnist_and_cifar10_are_read_from_torchvision_layouts(tmp_path):
    arrays = fake_mnist(tmp_path / "m")
    images = data.load_images("mnist", str(tmp_path / "m"), None, 4)
    assert torch.equal(images.train_x[:, 0], arrays["train"][0])
    assert torch.equal(images.train_y, arrays["train"][1].long())
    assert torch.equal(images.test_x[:, 0], arrays["t10k"][0][:4])
    assert images.name == "MNIST" and "MNIST/raw" in images.source
    fake_mnist(tmp_path / "plain", gz=False)  # uncompressed files, the folder itself
    assert len(data.load_images("mnist", str(tmp_path / "plain" / "MNIST" / "raw"), 5, None)
               .train_y) == 5

    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 3))}
        written.append(batch)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    images = data.load_images("cifar10", str(tmp_path / "c"), None, None)
    assert images.train_x.shape == (15, 3, 32, 32) and images.test_x.shape == (3, 3, 32, 32)
    assert torch.equal(images.train_x[3].flatten(), torch.as_tensor(written[1][b"data"][0]))
    assert images.test_y.tolist() == [int(v) for v in written[5][b"labels"]]

    # a truncated file is named, not read as garbage
    path = tmp_path / "m" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path, "rb") as f:
        blob = f.read()
    with gzip.open(path, "wb") as f:
        f.write(blob[:-3])
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.load_images("mnist", str(tmp_path / "m"), None, None)


def test_cnn_on_local_mnist(tmp_path, capsys):
    fake_mnist(tmp_path / "m")
    out, names, rows, record = run(
        ["image-classification", "--nn_architecture", "cnn", "--dataset", "mnist", "--data_dir",
         str(tmp_path / "m"), "--cnn_feature_multiplier", "2", "--batch_size", "10",
         "--mini_training_set_num_batches", "2", "--step_size", "0.1", "--rho", "0.1",
         "--hessian_check_steps", "2", "--num_steps", "4"], tmp_path)
    check_files(out, rows, names)
    assert "data: MNIST (read from" in capsys.readouterr().out
    assert record["model"]["architecture"].startswith("CNN 2 blocks")
    # two batches of 10 in a fixed order: steps 0 and 2 train on the first batch
    assert record["result"]["test_error"] in [i / 8 for i in range(9)]


def test_synthetic_digits_are_fixed_balanced_and_prefix_stable():
    x, y = data.synthetic_digits(1200, "train")
    assert x.dtype == torch.uint8 and x.shape == (1200, 1, 28, 28)
    assert torch.bincount(y[:1000]).tolist() == [100] * 10  # balanced chunks of 1000
    frame = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)
    # whole digits inside the image: at most a faint anti-aliased pixel on its border
    assert int(x.amax()) == 255 and int(frame.amax()) < 128
    x2, y2 = data.synthetic_digits(100, "train")
    assert torch.equal(x2, x[:100]) and torch.equal(y2, y[:100])
    xt, _ = data.synthetic_digits(100, "test")
    assert not torch.equal(xt, x[:100])


# ------------------------------------------------------------------- the transformer

def test_transformer_command_with_several_eigenvalues(tmp_path, capsys):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "test.txt").write_text(text[:300])
    out, names, rows, record = run(
        ["transformer", "--training_data", str(tmp_path / "train.txt"), "--test_data",
         str(tmp_path / "test.txt"), "--num_layers", "1", "--num_heads", "2", "--key_size", "4",
         "--model_size", "8", "--sequence_length", "12", "--batch_size", "8", "--rho", "0.05",
         "--hessian_check_steps", "2", "--num_steps", "4", "--num_principal_components", "3",
         "--figure_format", "png"], tmp_path)
    check_files(out, rows, names, k=3, png=True)
    for r in rows:
        magnitudes = [abs(r[f"eigenvalue_{i}"]) for i in (1, 2, 3)]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert r["hessian_norm"] == magnitudes[0]
        assert r["sam_edge"] == pytest.approx(seed_sam_edge(r["grad_norm"], 0.05, 0.1), rel=1e-12)
    assert math.isfinite(record["result"]["test_loss"]) and record["result"]["checks"] == 2
    assert "training text" in capsys.readouterr().out


def test_default_text_ships_with_python():
    train, test, described = data.default_text()
    assert train.isascii() and test.isascii() and "\0" not in train + test
    assert len(train) > 9 * len(test) / 1.2 and len(test) > 10000 and train.endswith("\n")
    assert "pydoc_data" in described
    pieces = data.chunks(test, 64)
    assert pieces.shape[1] == 65 and int(pieces.max()) < data.VOCAB_SIZE


def test_next_token_loss_is_the_mean_negative_log_likelihood():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 128, generator=g, dtype=torch.float64)
    targets = torch.randint(1, 128, (2, 5), generator=g)
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    assert float(models.next_token_loss(logits, targets)) == pytest.approx(float(nll), rel=1e-12)
    out = torch.randn(4, 10, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 3])
    onehot = torch.zeros(4, 10, dtype=torch.float64)
    onehot[torch.arange(4), y] = 1
    assert float(models.squared_loss(out, y)) == pytest.approx(
        float(((out - onehot) ** 2).sum() / 40), rel=1e-12)


# ---------------------------------------------------------- several eigenvalues (tracker)

def test_orthogonal_iteration_finds_the_top_eigenvalues():
    """SAMEdgeTracker(top_n=k): the k eigenvalues of largest magnitude of the exact Hessian of
    a float64 MLP, by autograd and by finite differences; a warm start reuses the basis."""
    from cases import exact, mlp_and_batch

    model, x, y = mlp_and_batch()
    loss_fn = torch.nn.functional.cross_entropy
    _, g, h, _, _ = exact(model, loss_fn, x, y)
    evals, evecs = torch.linalg.eigh(h)
    order = torch.argsort(evals.abs(), descending=True)[:3]
    v1 = evecs[:, order[0]]
    for method, rel in (("autograd", 1e-8), ("finite_difference", 1e-6)):
        # float64 central differences at 1e-4: truncation ~ eps^2 * (third derivative) ~ 1e-8
        tracker = SAMEdgeTracker(model, loss_fn, lr=0.1, every=1, iters=2000, tol=1e-13,
                                 top_n=3, hvp_method=method, fd_eps=1e-4)
        row = tracker.step((x, y))
        found = [row["top_eigenvalue"], row["eigenvalue_2"], row["eigenvalue_3"]]
        assert found == pytest.approx([float(evals[i]) for i in order], rel=rel), method
        assert row["grad_alignment"] == pytest.approx(float(abs(g @ v1) / g.norm()), rel=1e-4)
        cold = row["hvps"]
        again = tracker.step((x, y))
        # the same weights: the warm basis has converged (up to its slowest direction, whose
        # ratio |lambda_4 / lambda_3| is 0.9 here)
        assert again["hvps"] < cold / 10
    assert tracker.columns[-2:] == ("eigenvalue_2", "eigenvalue_3")
    other = SAMEdgeTracker(model, loss_fn, lr=0.1, every=1, top_n=3, iters=2000, tol=1e-13)
    other.load_state_dict(tracker.state_dict())
    assert other.step((x, y))["hvps"] < cold / 10
    with pytest.raises(ValueError, match="top_n"):
        SAMEdgeTracker(model, loss_fn, lr=0.1, top_n=0)


# ---------------------------------------------------------------- stops and refusals

def test_time_limit_interrupt_and_divergence_keep_the_outputs(tmp_path, monkeypatch, capsys):
    args = ["image-classification"] + TINY[:-4]
    # a time-based cadence shorter than a step checks at every step until the time limit
    out, names, rows, record = run(args + ["--hessian_check_gap", "1e-9",
                                           "--time_limit_in_hours", "1e-4"], tmp_path / "t")
    assert record["result"]["stopped"] == "reached the time limit"
    assert [r["step"] for r in rows] == list(range(len(rows))) and rows
    assert record["arguments"]["hessian_check_gap"] == 1e-9

    # a step size far past 2/|H| diverges: the run stops and still writes what it measured
    out, names, rows, record = run(args + ["--step_size", "1e8", "--hessian_check_steps", "1",
                                           "--num_steps", "50"], tmp_path / "d")
    assert "diverged" in record["result"]["stopped"] and record["result"]["steps"] < 50
    assert (out / "eigs.pdf").exists()

    calls = []
    real = experiment._check

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(experiment, "_check", interrupted)
    out = tmp_path / "i"
    assert cli.main(["sam-edge"] + args + ["--hessian_check_steps", "1", "--num_steps", "9",
                                           "--output_dir", str(out)]) == 130
    assert record_of(out)["result"]["stopped"] == "interrupted"
    assert len((out / "raw.txt").read_text().splitlines()) == 2  # header and one row
    assert (out / "ell.pdf").exists()


def record_of(out):
    return json.loads((out / "sam_edge_run.json").read_text())


@pytest.fixture
def no_training(monkeypatch):
    """Every step past the checks fails the test: a refusal must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("training began before the input was refused")
    monkeypatch.setattr(experiment, "run", fail)


def refused(capsys, argv) -> str:
    try:
        code = cli.main(["sam-edge"] + argv)
    except SystemExit as exc:  # argparse's own refusal, already reported
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,message", [
    (["image"], "unknown experiment 'image'"),
    (["transformer", "--rho", "-1"], "must be >= 0"),
    (["image-classification", "--step_size", "0"], "must be > 0"),
    (["image-classification", "--time_limit_in_hours", "nan"], "finite"),
    (["image-classification", "--batch_size", "2.5"], "must be an integer"),
    (["image-classification", "--nn_architecture", "rnn"], "invalid choice"),
    (["image-classification", "--dataset", "imagenet"], "invalid choice"),
    (["image-classification", "--dataset", "mnist"], "pass --data_dir"),
    (["image-classification", "--data_dir", "/tmp"], "--data_dir is read for --dataset mnist"),
    (["image-classification", "--mlp_depth", "1"], "at least 2"),
    (["image-classification", "--hessian_check_gap", "0.1", "--hessian_check_steps", "5"],
     "not both"),
    (["image-classification", "--mini_training_set_num_batches", "2"], "give --batch_size"),
    (["image-classification", "--eigs_curve_output", "eigs.svg"], ".pdf or .png"),
    (["image-classification", "--num_principal_components", "0"], "must be > 0"),
    (["image-classification", "--seed", "-1"], "must be in [0, 2**63)"),
    (["image-classification", "--rh", "0.1"], "unrecognized arguments: --rh"),
    (["image-classification", "--device", "tpu"], "--device 'tpu': give cpu, cuda, cuda:N"),
    (["image-classification", "--device", "meta"], "--device 'meta': give cpu, cuda, cuda:N"),
    (["transformer", "--training_data", "a.txt"], "together"),
    (["transformer", "--nn_architecture", "MLP"], "unrecognized arguments"),
])
def test_bad_flags_are_refused_in_one_line(capsys, no_training, tmp_path, monkeypatch, argv,
                                           message):
    monkeypatch.chdir(tmp_path)
    assert message in refused(capsys, argv + ["--output_dir", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys, no_training, tmp_path):
    err = refused(capsys, ["transformer", "--device", "cuda", "--output_dir", str(tmp_path)])
    assert "no CUDA device is available here" in err


def test_unwritable_outputs_are_refused_before_anything(capsys, no_training, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["image-classification", "--output_dir", str(tmp_path / "out")]
    assert "cannot write" in refused(capsys, base + ["--raw_data_output", str(tmp_path)])
    assert "cannot write" in refused(capsys, base + ["--eigs_curve_output",
                                                     str(a_file / "eigs.pdf")])
    assert "--output_dir" in refused(capsys, ["transformer", "--output_dir", str(a_file)])
    same = str(tmp_path / "same.pdf")
    assert "same file" in refused(capsys, base + ["--eigs_curve_output", same,
                                                  "--loss_curve_output", same])
    # '' writes no such output and is no clash
    assert "same file" not in refused(capsys, base + ["--eigs_curve_output", "",
                                                      "--loss_curve_output", "", "--rho", "-2"])


def test_data_problems_are_refused_before_training(capsys, no_training, tmp_path):
    fake_mnist(tmp_path / "m")
    base = ["--output_dir", str(tmp_path / "out")]
    err = refused(capsys, ["image-classification", "--dataset", "mnist", "--data_dir",
                           str(tmp_path), "--batch_size", "5"] + base)
    assert "no MNIST files under --data_dir" in err and "nothing is downloaded" in err
    err = refused(capsys, ["image-classification", "--dataset", "mnist", "--data_dir",
                           str(tmp_path / "m"), "--batch_size", "50"] + base)
    assert "--batch_size 50 exceeds the 20 training examples of MNIST" in err
    err = refused(capsys, ["image-classification", "--dataset", "cifar10", "--data_dir",
                           str(tmp_path / "m")] + base)
    assert "no CIFAR-10 python batches" in err
    err = refused(capsys, ["image-classification", "--nn_architecture", "CNN",
                           "--cnn_num_blocks", "5", "--batch_size", "10",
                           "--mini_training_set_num_batches", "1",
                           "--mini_test_set_num_batches", "1"] + base)
    assert "pools the 28x28 images" in err
    (tmp_path / "utf8.txt").write_text("caf\u00e9 " * 500, encoding="utf-8")
    (tmp_path / "nul.txt").write_text("a\0b" * 500)
    (tmp_path / "short.txt").write_text("abc " * 10)
    for name, message in (("utf8.txt", "not ASCII"), ("nul.txt", "NUL"),
                          ("short.txt", "fewer than --batch_size"),
                          ("missing.txt", "No such file")):
        err = refused(capsys, ["transformer", "--training_data", str(tmp_path / name),
                               "--test_data", str(tmp_path / "short.txt")] + base)
        assert message in err, (name, err)
