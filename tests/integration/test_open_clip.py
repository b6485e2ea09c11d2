"""The open_clip launcher (flatfused.integrations.open_clip) runs the real open_clip_train: each
optimizer in each precision, sigma=0 NSO against plain AdamW, exact checkpoint resume,
gradient accumulation, refused flag combinations, and 2 CPU ranks under torchrun (gloo).

Runs use open_clip's synthetic dataset with per-sample images and captions
(tests/open_clip_runner.py) and the tiny model config tests/open_clip_configs/flatfused-tiny.json.
"""
import json
import logging
import math
import os
import re

import pytest
import torch

from launch import run_torchrun, torchrun_path

pytest.importorskip("open_clip_train.main",
                    reason="open_clip's trainer is not installed (pip install "
                           "'open-clip-torch[training]'), a test dependency")

import open_clip_runner  # noqa: E402
from flatfused.integrations import open_clip as launcher  # noqa: E402

# open_clip's loaders ask for pinned memory, which a machine without an accelerator ignores.
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
BATCH = 4


def oc_args(logs, name, *extra, samples=8, epochs=1):
    return ["--model", "flatfused-tiny", "--dataset-type", "synthetic",
            "--train-num-samples", str(samples), "--batch-size", str(BATCH),
            "--epochs", str(epochs), "--device", "cpu", "--workers", "0", "--logs", str(logs),
            "--name", name, "--log-every-n-steps", "1", "--lr", "1e-3", "--wd", "0.1",
            "--warmup", "1", "--seed", "0", *extra]


@pytest.fixture(autouse=True)
def isolated():
    """open_clip adds logging handlers, sets every existing logger to INFO (torch's included,
    whose dynamo then floods the end of the run with its metrics) and seeds torch on every run:
    undo that after the test."""
    handlers, level = list(logging.root.handlers), logging.root.level
    levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)
            handler.close()
    logging.root.setLevel(level)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def run(mode, logs, name, *extra, **kw):
    return open_clip_runner.run(mode, oc_args(logs, name, *extra, **kw))


def logged_losses(logs, name):
    text = (logs / name / "out.log").read_text()
    return [float(v) for v in re.findall(r"Train Epoch: .* Loss: (\S+) \(", text)]


def checkpoint(logs, name, epoch=1):
    return torch.load(logs / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu",
                      weights_only=False)


FLAGS = {"nso": ["--flat-optimizer", "nso", "--nso-sigma", "0.008"],
         "sam": ["--flat-optimizer", "sam", "--sam-rho", "0.05"],
         "wsam": ["--flat-optimizer", "wsam", "--sam-rho", "0.05", "--wsam-gamma", "0.8"]}
OPTIMIZERS = {"nso": "NSO", "sam": "SAM", "wsam": "WeightedSAM"}


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16", "amp"])
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_each_optimizer_trains_in_each_precision(tmp_path, kind, precision):
    # amp (fp16) starts at a loss scale of 2**16, at which the first steps overflow and are
    # skipped: 4 steps instead of 2.
    samples = 16 if precision == "amp" else 8
    launched = run("flat", tmp_path, "run", *FLAGS[kind], "--precision", precision,
                   "--grad-clip-norm", "1.0", samples=samples)
    assert type(launched.optimizer).__name__ == OPTIMIZERS[kind]
    assert launched.optimizer.max_grad_norm if kind != "wsam" else launched.optimizer.max_norm
    losses = logged_losses(tmp_path, "run")
    assert len(losses) == samples // BATCH and all(math.isfinite(v) for v in losses), losses
    ckpt = checkpoint(tmp_path, "run")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert "flatfused" in ckpt["optimizer"]
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    if precision == "amp":  # a step the scaler skips (overflow) leaves AdamW's count behind
        assert ckpt["scaler"]["scale"] < 2.0**16 and len(steps) == 1 and 1 <= min(steps) < 4
    else:
        assert steps == {2}
    if kind == "nso":
        assert ckpt["optimizer"]["flatfused"]["next_offset"] > 0


@pytest.mark.parametrize("precision", ["pure_bf16", "fp16"])
def test_nso_trains_low_precision_weights(tmp_path, precision):
    """open_clip's pure bf16/fp16 modes: the weights themselves are 16-bit (no scaler)."""
    launched = run("flat", tmp_path, "run", *FLAGS["nso"], "--precision", precision)
    # (fp16 keeps some parameters in fp32, as open_clip converts only its matrices)
    assert (torch.bfloat16 if precision == "pure_bf16" else torch.float16) in {
        b.dtype for b in launched.optimizer.flat_buffers}
    losses = logged_losses(tmp_path, "run")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    ckpt = checkpoint(tmp_path, "run")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2}


# Adam's epsilon for the runs compared with plain AdamW (see assert_same_training).
LINEAR_ADAM = ["--eps", "1"]


def test_sigma_zero_nso_reproduces_plain_adamw(tmp_path):
    """NSO with sigma 0 (lam 0, K 1, use_neg) averages two identical gradients: plain AdamW's
    step, up to rounding."""
    run("plain", tmp_path, "plain", "--precision", "fp32", *LINEAR_ADAM, samples=12)
    run("flat", tmp_path, "nso", "--precision", "fp32", *LINEAR_ADAM, "--flat-optimizer", "nso",
        "--nso-sigma", "0", "--nso-lam", "0", "--nso-num-perturbs", "1", "--nso-use-neg",
        samples=12)
    assert_same_training(checkpoint(tmp_path, "plain"), checkpoint(tmp_path, "nso"))


def test_accum_freq_sigma_zero_reproduces_plain_accumulation(tmp_path):
    """--accum-freq 2: each pass redoes open_clip's feature-cache accumulation."""
    run("plain", tmp_path, "plain", "--precision", "fp32", *LINEAR_ADAM, "--accum-freq", "2",
        samples=16)
    run("flat", tmp_path, "nso", "--precision", "fp32", *LINEAR_ADAM, "--accum-freq", "2",
        "--flat-optimizer", "nso", "--nso-sigma", "0", samples=16)
    assert len(logged_losses(tmp_path, "nso")) == 2
    assert_same_training(checkpoint(tmp_path, "plain"), checkpoint(tmp_path, "nso"))


def assert_same_training(plain, nso, lr=1e-3, steps=3):
    """The two runs take the same AdamW steps on the same data; the tolerance is the rounding.

    - Gradients: each is a sum of products whose order the kernels choose (oneDNN and MKL
      block their reductions by CPU, thread count and the tensors' alignment, which differs
      between a flat buffer's views and torch's own tensors). With reductions of up to 2**12
      terms in fp32, two orders differ by at most 2**12 * 2**-24 = 2**-12 of the largest
      gradient G (|m_hat| <= G bounds it from the saved moments).
    - Adam divides by sqrt(v_hat) + eps, which for an element whose gradient is at its rounding
      level turns rounding into steps of order lr (a normalised step of noise). With eps = 1,
      far above these gradients (LINEAR_ADAM), the step is linear in the gradient: a gradient
      difference d moves a weight by at most lr * d per step.
    - The update itself: the fused kernel and torch order its few operations differently, at
      most 2**-20 * lr * G per step, and each step rounds the weight once (2**-23 relative,
      either side).
    Over ``steps`` steps: |dw| <= steps * (2**-23 |w| + lr * (2**-12 + 2**-20) * G). The
    moments are linear in the gradients: |d m| <= 2**-12 G, |d v| <= 2 * 2**-12 G**2."""
    beta1 = plain["optimizer"]["param_groups"][0]["betas"][0]
    exp_avgs = [s["exp_avg"].abs().max() for s in plain["optimizer"]["state"].values()]
    G = float(max(exp_avgs)) / (1.0 - beta1 ** steps)
    atol = steps * lr * (2.0**-12 + 2.0**-20) * G
    for name, want in plain["state_dict"].items():
        torch.testing.assert_close(nso["state_dict"][name], want, rtol=steps * 2.0**-23,
                                   atol=atol, msg=name)
    for pid, state in plain["optimizer"]["state"].items():
        for key, bound in (("exp_avg", 2.0**-12 * G), ("exp_avg_sq", 2.0**-11 * G * G)):
            torch.testing.assert_close(nso["optimizer"]["state"][pid][key], state[key], rtol=0,
                                       atol=bound, msg=(pid, key))


@pytest.mark.parametrize("kind,precision", [("nso", "fp32"), ("nso", "amp"), ("wsam", "amp_bf16")])
def test_resume_continues_exactly(tmp_path, kind, precision):
    """Two epochs straight, against epoch 1's checkpoint resumed for the second: the same
    weights, AdamW state and NSO RNG position, bit for bit."""
    flags = FLAGS[kind] + ["--precision", precision]
    samples = 16 if precision == "amp" else 8
    run("flat", tmp_path, "straight", *flags, epochs=2, samples=samples)
    first = tmp_path / "straight" / "checkpoints" / "epoch_1.pt"
    run("flat", tmp_path, "resumed", *flags, "--resume", str(first), epochs=2, samples=samples)
    want, got = checkpoint(tmp_path, "straight", 2), checkpoint(tmp_path, "resumed", 2)
    assert not all(torch.equal(a, b) for a, b in
                   zip(checkpoint(tmp_path, "straight", 1)["state_dict"].values(),
                       want["state_dict"].values()))
    for name, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], value), name
    for pid, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got["optimizer"]["state"][pid][key]),
                               torch.as_tensor(value)), (pid, key)
    assert got["optimizer"]["flatfused"] == want["optimizer"]["flatfused"]
    if precision == "amp":
        assert got["scaler"] == want["scaler"]


@pytest.mark.parametrize("argv,message", [
    (["--nso-sigma", "0.01"], "--nso-sigma needs --flat-optimizer"),
    (["--flat-optimizer", "sam", "--nso-sigma", "0.01"], "applies to --flat-optimizer nso"),
    (["--flat-optimizer", "nso", "--wsam-gamma", "0.5"], "applies to --flat-optimizer wsam"),
    (["--flat-optimizer", "wsam", "--flat-seed", "1"], "--flat-seed applies"),
    (["--flat-optimizer", "nso", "--nso-sigma", "-1"], "--nso-sigma must be"),
    (["--flat-optimizer", "nso", "--nso-sigma", "nan"], "--nso-sigma must be"),
    (["--flat-optimizer", "nso", "--nso-lam", "1.5"], "--nso-lam must be"),
    (["--flat-optimizer", "nso", "--nso-num-perturbs", "0"], "--nso-num-perturbs must be"),
    (["--flat-optimizer", "wsam", "--wsam-gamma", "1"], "--wsam-gamma must be"),
    (["--flat-optimizer", "adam"], "invalid flatfused flag"),
    (["--flat-optimizer"], "--flat-optimizer needs a value"),
    (["--flat-optimizer", "nso", "--opt", "timm/sgd"], "--opt timm/sgd is not supported"),
    (["--flat-optimizer", "sam", "--horovod"], "does not support --horovod"),
    (["--flat-optimizer", "nso", "--distill-model", "ViT-B-32", "--distill-pretrained", "x"],
     "does not support distillation"),
    (["--flat-optimizer", "nso", "--grad-clip-norm", "-1"], "--grad-clip-norm must be"),
    (["--flat-optimizer", "wsam", "--flat-reuse", "0.5"], "--flat-reuse applies"),
    (["--flat-optimizer", "nso", "--flat-every", "0"], "every must be"),
    (["--flat-optimizer", "sam", "--flat-window", "x,3"], "flat_window takes"),
    (["--flat-optimizer", "sam", "--flat-window", "5,5"], "stop must be"),
    (["--flat-every", "2"], "--flat-every needs --flat-optimizer"),
])
def test_bad_flag_combinations_are_refused(tmp_path, capsys, argv, message):
    code = launcher.main(oc_args(tmp_path, "bad") + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_flags_are_taken_out_in_place():
    config, rest = launcher.split_args(
        ["--model", "m", "--flat-optimizer=nso", "--lr", "1e-3", "--nso-sigma", "0.02",
         "--no-nso-use-neg", "--flat-logs", "out", "--seed", "3"])
    assert rest == ["--model", "m", "--lr", "1e-3", "--seed", "3"]
    assert (config.optimizer, config.nso_sigma, config.nso_use_neg, config.logs) == \
        ("nso", 0.02, False, "out")
    assert (config.nso_lam, config.nso_num_perturbs) == (0.0, 1)  # the NSO CLIP defaults


def test_checkpoint_of_plain_open_clip_loads_into_nso_and_back(tmp_path):
    run("plain", tmp_path, "plain", "--precision", "fp32")
    plain = tmp_path / "plain" / "checkpoints" / "epoch_1.pt"
    run("flat", tmp_path, "nso", "--precision", "fp32", *FLAGS["nso"], "--resume", str(plain),
        epochs=2)
    nso = tmp_path / "nso" / "checkpoints" / "epoch_2.pt"
    run("plain", tmp_path, "back", "--precision", "fp32", "--resume", str(nso), epochs=3)
    assert all(torch.isfinite(v).all() for v in checkpoint(tmp_path, "back", 3)["state_dict"].values())


@pytest.mark.skipif(torchrun_path() is None, reason="torchrun not found")
def test_torchrun_two_cpu_ranks_gradient_syncs_per_step(tmp_path):
    """NSO synchronises gradients once per step (two passes), also with --accum-freq 2; SAM and
    WSAM twice; the ranks' weights stay identical. One torchrun runs them one after the other."""
    steps = 2
    # name, flags, micro-batches per step, forward calls per step, synchronisations per step
    runs = [("nso", ["--precision", "fp32", *FLAGS["nso"]], 1, 2, 1),
            # per pass: 2 forwards without gradients (the feature cache), 2 with
            ("nso_accum", ["--precision", "fp32", "--accum-freq", "2", *FLAGS["nso"]], 2, 8, 1),
            ("sam", ["--precision", "amp_bf16", *FLAGS["sam"]], 1, 2, 2),
            ("wsam", ["--precision", "fp32", *FLAGS["wsam"]], 1, 2, 2)]
    cmd = ["--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           os.path.join(TESTS, "open_clip_runner.py")]
    for i, (name, flags, accum, _, _) in enumerate(runs):
        samples = steps * accum * 2 * BATCH  # 2 ranks
        cmd += (["--then"] if i else []) + [
            "--sync-log", str(tmp_path / name), "flat", "--model", "flatfused-tiny",
            "--dataset-type", "synthetic", "--train-num-samples", str(samples),
            "--batch-size", str(BATCH), "--epochs", "1", "--device", "cpu", "--workers", "0",
            "--log-every-n-steps", "1", "--lr", "1e-3", "--wd", "0.1", "--warmup", "1",
            "--dist-backend", "gloo", "--grad-clip-norm", "1.0", "--name", name,
            # torchrun's parser would take --logs for its --logs-specs
            "--flat-logs", str(tmp_path), *flags]
    code, out, err = run_torchrun(cmd, tmp_path)
    assert code == 0, out[-4000:] + err[-4000:]
    for name, _, _, forwards, syncs in runs:
        for rank in range(2):
            counts = json.loads((tmp_path / f"{name}.{rank}").read_text())
            assert counts["replicas_equal"] and counts["finite"], (name, counts)
            assert counts["forwards"] == forwards * steps, (name, counts)
            assert counts["syncs"] == syncs * steps, (name, counts)
        losses = logged_losses(tmp_path, name)
        assert len(losses) == steps and all(math.isfinite(v) for v in losses), (name, losses)
        assert "flatfused" in checkpoint(tmp_path, name)["optimizer"]


def test_clip_step_benchmark_runs_on_the_tiny_config():
    from flatfused.integrations import open_clip_bench

    rows = open_clip_bench.measure("tiny", batch_size=2, repeats=1)
    assert [r["contender"] for r in rows] == open_clip_bench.CONTENDERS
    assert all(r["ms_per_step"] > 0 for r in rows)
    state = {r["contender"]: r["state_mb"] for r in rows}
    if None not in state.values():  # glibc's allocation count is available
        # NSO keeps one copy of the weights beyond AdamW's state and gradients
        assert state["nso flatfused"] > state["adamw"]
    assert "| tiny |" in open_clip_bench.table(rows)


@pytest.mark.parametrize("argv, message", [
    (["--device", "meta"], "--device meta: the benchmark runs on cpu or cuda"),
    (["--backend", "bogus"], "--backend bogus: unknown backend 'bogus'"),
    (["--backend", "cuda"], "--backend cuda: flatfused backend 'cuda' is unavailable: the 'cuda' "
                            "backend runs on CUDA tensors"),
    (["--contenders", "adamw,sgd"], "--contenders: unknown \\['sgd'\\]"),
    (["--contenders", ","], "--contenders: give at least one of"),
    (["--contenders", "adamw,adamw"], "--contenders: \\['adamw'\\] given more than once"),
    (["--models", "tiny,NoSuchCLIP"], "--models: unknown open_clip model 'NoSuchCLIP'"),
    (["--models", ","], "--models: give at least one value"),
    (["--models", "tiny,tiny"], "--models: \\['tiny'\\] given more than once"),
])
def test_clip_step_benchmark_refuses_bad_arguments_before_building(argv, message):
    from flatfused.integrations import open_clip_bench

    with pytest.raises(SystemExit, match=message):
        open_clip_bench.main(argv)


@pytest.mark.parametrize("flag", ["--batch", "--repeats", "--threads"])
def test_clip_step_benchmark_refuses_counts_below_one(capsys, flag):
    from flatfused.integrations import open_clip_bench

    with pytest.raises(SystemExit):
        open_clip_bench.main([flag, "0"])
    assert f"{flag}: must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        open_clip_bench.measure("tiny", repeats=0)
