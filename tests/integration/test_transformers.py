"""FlatTrainer and FlatTrainingArguments (flatfused.integrations.transformers) in the real
Hugging Face Trainer on CPU: each optimizer in fp32 and bf16 with gradient accumulation,
clipping and an LR scheduler; radius 0 against the plain Trainer's AdamW run; fp16 under a
GradScaler; bit-identical resume from a checkpoint; two CPU ranks under torchrun (gloo) with
one gradient all-reduce per NSO step; the refused configurations.

Model and data: tests/transformers_runner.py (a 2-layer RoBERTa built from a config, random
token ids and labels; nothing is downloaded).
"""
import json
import math
import os
import re
import sys

import pytest
import torch

from cases import assert_same_adamw_training
from launch import torchrun_path

pytest.importorskip("transformers")

import transformers_runner as runner  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402

import flatfused  # noqa: E402
from flatfused.integrations._options import FlatOptionError  # noqa: E402
from flatfused.integrations.transformers import FlatTrainer, FlatTrainingArguments  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
STEPS, ACCUM, LR, CLIP = 4, 2, 1e-2, 0.05
SAMPLES = STEPS * ACCUM * runner.BATCH
KINDS = {"nso": {"nso_sigma": 0.01}, "sam": {"sam_rho": 0.05},
         "wsam": {"sam_rho": 0.05, "wsam_gamma": 0.8}}
AT_ZERO = {"nso": {"nso_sigma": 0.0}, "sam": {"sam_rho": 0.0}, "wsam": {"sam_rho": 0.0}}
OPTIMIZERS = {"nso": flatfused.NSO, "sam": flatfused.SAM, "wsam": flatfused.WeightedSAM}


@pytest.fixture(autouse=True)
def quiet_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner.quiet()
    yield
    torch.set_num_threads(threads)


def arguments(out, precision="fp32", flat=None, plain=False, **extra):
    """The runs compared: 4 optimizer steps of 2 micro-batches of 4, AdamW (lr 1e-2, weight
    decay 0.1 off the biases and LayerNorms, eps 1: see assert_same_training), linear decay,
    gradients clipped at 0.05 (below their norm, so clipping acts at every step)."""
    settings = dict(output_dir=str(out), per_device_train_batch_size=runner.BATCH,
                    gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=LR,
                    weight_decay=0.1, adam_epsilon=1.0, lr_scheduler_type="linear",
                    max_grad_norm=CLIP, logging_steps=1, save_strategy="no", report_to=[],
                    disable_tqdm=True, use_cpu=True, seed=0, bf16=precision == "bf16",
                    fp16=precision == "fp16")
    settings.update(extra)
    if plain:
        return TrainingArguments(**settings)
    return FlatTrainingArguments(flat_optimizer=flat, **settings)


def train(args, trainer_class=FlatTrainer, dropout=False, samples=SAMPLES, resume=None,
          scaler=None, **kw):
    model = runner.tiny_model(dropout=dropout)
    trainer = trainer_class(model=model, args=args, train_dataset=runner.TinyData(samples), **kw)
    trainer.remove_callback(PrinterCallback)  # (disable_tqdm's stand-in prints every log)
    if scaler is not None:
        # A GPU run's GradScaler and fp16 autocast, on the CPU (where accelerate makes none)
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = scaler
    trainer.train(resume_from_checkpoint=resume)
    return trainer


_PLAIN = {}


def plain_run(tmp_path_factory, precision):
    """The plain Trainer's run, once per precision."""
    if precision not in _PLAIN:
        out = tmp_path_factory.mktemp(f"plain-{precision}")
        _PLAIN[precision] = train(arguments(out, precision, plain=True), Trainer)
    return _PLAIN[precision]


def assert_same_training(plain, flat, gradient_rounding):
    """The two Trainers take the same AdamW steps on the same micro-batches, to the rounding
    (tests/cases.py's assert_same_adamw_training)."""
    assert_same_adamw_training((plain.model, plain.optimizer), (flat.model, flat.optimizer),
                               runner.tiny_model(), STEPS, LR, gradient_rounding)


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# fp32: the clipping coefficient's 2**-9 dominates the reductions' 2**-12. bf16 autocast rounds
# products and activations to bf16 (2**-8 relative): a reduction summed in another order can
# flip such a rounding, and the difference passes through the two layers' backward: 2**-6.
ROUNDING = {"fp32": 2.0**-9, "bf16": 2.0**-6}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_radius_zero_reproduces_the_plain_trainer(tmp_path, tmp_path_factory, kind, precision):
    """NSO with sigma 0 (two passes at w), SAM and WSAM with rho 0 step along the accumulated,
    clipped gradient: the plain Trainer's AdamW steps, scheduler and logged losses; with the
    radius the same run trains elsewhere."""
    plain = plain_run(tmp_path_factory, precision)
    # clipping acts at every step of the compared run (the plain Trainer logs the norm)
    assert all(h["grad_norm"] > 2 * CLIP for h in train_logs(plain)), train_logs(plain)
    flat = train(arguments(tmp_path / "zero", precision, kind, **AT_ZERO[kind]))
    optimizer = flat.optimizer.optimizer
    assert type(optimizer) is OPTIMIZERS[kind]
    assert (optimizer.max_norm if kind == "wsam" else optimizer.max_grad_norm) == CLIP
    assert_same_training(plain, flat, ROUNDING[precision])
    name = "loss_perturbed" if kind == "nso" else "loss_clean"
    got, want = train_logs(flat), train_logs(plain)
    assert len(got) == STEPS
    for g, w in zip(got, want):
        assert g["learning_rate"] == w["learning_rate"] and g[name] == g["loss"]
        assert math.isclose(g["loss"], w["loss"], rel_tol=ROUNDING[precision])
        # the norm the step clipped: at radius 0 the plain Trainer's clipped norm
        assert math.isclose(g["grad_norm"], w["grad_norm"], rel_tol=ROUNDING[precision])

    moved = train(arguments(tmp_path / "radius", precision, kind, **KINDS[kind]))
    diff = max(float((a - b).detach().abs().max()) for a, b in
               zip(moved.model.parameters(), flat.model.parameters()))
    assert diff > 1e-5 and all(torch.isfinite(p).all() for p in moved.model.parameters())
    assert {int(s["step"]) for s in moved.optimizer.state_dict()["state"].values()} == {STEPS}


def test_fp16_grad_scaler_skips_overflowing_steps_as_the_plain_trainer(tmp_path):
    """fp16 with a GradScaler (installed as a GPU run gets it: on a CPU accelerate 1.16 makes
    none, and fp16=True there trains in fp32, in the plain Trainer as in FlatTrainer): a step
    that overflows is skipped whole, the scheduler does not advance, the scale drops, as in the
    plain Trainer."""
    def scaler():  # the first step overflows (2**24 * gradients > 65504), then 2**12
        return torch.amp.GradScaler("cpu", init_scale=2.0**24, backoff_factor=2.0**-12)

    on_cpu = FlatTrainer(model=runner.tiny_model(),
                         args=arguments(tmp_path / "cpu", "fp16", "nso", **AT_ZERO["nso"]))
    assert on_cpu.accelerator.scaler is None and not on_cpu.accelerator.native_amp
    # optim adamw_torch: torch's fused AdamW (the default) handles scaling itself, and
    # accelerate 1.16 then reports no skipped step, so the plain Trainer's scheduler advances
    # past a skipped step; FlatTrainer reports it (see flatfused.integrations.accelerate).
    plain = train(arguments(tmp_path / "plain", "fp16", plain=True, optim="adamw_torch"),
                  Trainer, scaler=scaler())
    flat = train(arguments(tmp_path / "flat", "fp16", "nso", optim="adamw_torch",
                           **AT_ZERO["nso"]), scaler=scaler())
    assert flat.accelerator.scaler.get_scale() == plain.accelerator.scaler.get_scale() == 2.0**12
    assert flat.lr_scheduler.get_last_lr() == plain.lr_scheduler.get_last_lr() != [0.0]
    assert [h["learning_rate"] for h in train_logs(flat)] == \
        [h["learning_rate"] for h in train_logs(plain)]
    for trainer in (plain, flat):  # the skipped step left AdamW's count behind
        counts = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
        assert counts == {STEPS - 1}
    # fp16 autocast rounds to 2**-11 relative: a flipped rounding, through two layers, 2**-8.
    assert_same_training(plain, flat, 2.0**-8)


@pytest.mark.parametrize("kind,precision", [("nso", "fp32"), ("sam", "bf16"), ("wsam", "fp32")])
def test_resume_from_a_checkpoint_continues_bit_identically(tmp_path, kind, precision):
    """save_steps=2 and resume_from_checkpoint in a new Trainer: the same weights, AdamW state
    and NSO RNG position as the uninterrupted run, bit for bit (with dropout: the Trainer
    restores torch's RNG)."""
    def args(out):
        return arguments(out, precision, kind, save_strategy="steps", save_steps=2,
                         learning_rate=1e-3, adam_epsilon=1e-8, max_grad_norm=1.0,
                         warmup_steps=1, **KINDS[kind])

    straight = train(args(tmp_path / "straight"), dropout=True)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert "flatfused" in saved
    resumed = train(args(tmp_path / "resumed"), dropout=True, resume=str(checkpoint))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    want, got = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert got["flatfused"] == want["flatfused"]
    if kind == "nso":
        assert want["flatfused"]["next_offset"] > saved["flatfused"]["next_offset"] > 0
    for pid, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got["state"][pid][key]), torch.as_tensor(value))
    assert [h["loss"] for h in train_logs(resumed)] == [h["loss"] for h in train_logs(straight)]


def test_a_flatfused_optimizer_passed_in_trains_with_the_trainers_clipping(tmp_path):
    """FlatTrainer(optimizers=(flatfused.SAM(...), scheduler)): the plain Trainer fails at the
    first step (SAM.step needs a closure); FlatTrainer runs it, and max_grad_norm becomes the
    optimizer's clipping."""
    def sam(model):
        return flatfused.SAM(model, torch.optim.AdamW, rho=0.05, lr=LR, weight_decay=0.1)

    model = runner.tiny_model()
    plain = Trainer(model=model, args=arguments(tmp_path / "plain", plain=True, max_steps=1),
                    train_dataset=runner.TinyData(SAMPLES), optimizers=(sam(model), None))
    with pytest.raises(RuntimeError, match="SAM.step needs a closure"):
        plain.train()
    model = runner.tiny_model()
    optimizer = sam(model)
    trainer = FlatTrainer(model=model, args=arguments(tmp_path / "flat", plain=True),
                          train_dataset=runner.TinyData(SAMPLES), optimizers=(optimizer, None))
    assert optimizer.max_grad_norm == CLIP
    trainer.train()
    assert [h["loss_clean"] for h in train_logs(trainer)] == [h["loss"] for h in
                                                              train_logs(trainer)]
    assert {int(s["step"]) for s in optimizer.state_dict()["state"].values()} == {STEPS}


@pytest.mark.skipif(torchrun_path() is None, reason="torchrun not found")
def test_torchrun_two_cpu_ranks_one_gradient_all_reduce_per_nso_step(tmp_path):
    """Under torchrun (2 CPU ranks, gloo, gradient_accumulation_steps=2): an NSO step runs 2
    passes x 2 micro-batches and all-reduces gradients once; SAM and WSAM twice (each pass);
    the ranks' weights stay identical. One torchrun runs the three one after the other."""
    steps, micro_batches, passes = 2, ACCUM, 2
    code, out, err = runner.launch(tmp_path, ["nso", "sam", "wsam"])
    assert code == 0, out[-4000:] + err[-4000:]
    for kind, syncs in (("nso", 1), ("sam", 2), ("wsam", 2)):
        for rank in range(2):
            counts = json.loads((tmp_path / f"{kind}.{rank}").read_text())
            assert counts["world_size"] == 2 and counts["sync_model"] == "DistributedDataParallel"
            assert counts["replicas_equal"] and counts["finite"], (kind, counts)
            assert counts["forwards"] == steps * passes * micro_batches, (kind, counts)
            assert counts["syncs"] == steps * syncs, (kind, counts)
            assert len(counts["losses"]) == steps and all(map(math.isfinite, counts["losses"]))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_is_refused_before_anything_is_built(tmp_path, stage):
    """deepspeed is not installed: the refusal comes from the configuration alone (a dict or a
    JSON file), before the Trainer would import deepspeed."""
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}
    why = {0: "owns the backward", 1: "partitions the optimizer state",
           2: "partitions the gradients", 3: "partitions the parameters"}[stage]
    message = f"flat_optimizer='nso' does not run under DeepSpeed \\(ZeRO stage {stage}\\).*{why}"
    with pytest.raises(FlatOptionError, match=message + ".*DDP.*FSDP2"):
        arguments(tmp_path, flat="nso", deepspeed=config)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(FlatOptionError, match=message):
        arguments(tmp_path, flat="nso", deepspeed=str(path))


@pytest.mark.parametrize("config", [{"zero_optimization": {"stage": "auto"}}, "missing.json"])
def test_deepspeed_with_a_stage_it_cannot_read_is_refused(tmp_path, config):
    with pytest.raises(FlatOptionError, match="DeepSpeed \\(ZeRO stage unknown\\).*FSDP2"):
        arguments(tmp_path, flat="wsam", deepspeed=config)


def test_deepspeed_from_the_accelerate_launcher_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(FlatOptionError, match="ACCELERATE_USE_DEEPSPEED is set.*DeepSpeed"):
        arguments(tmp_path, flat="sam")


@pytest.mark.parametrize("extra,message", [
    ({"flat_optimizer": "adam"}, "flat_optimizer must be one of nso, sam, asam, wsam"),
    ({"nso_sigma": 0.01}, "nso_sigma needs flat_optimizer \\(nso\\)"),
    ({"flat_optimizer": "sam", "nso_sigma": 0.01},
     "nso_sigma applies to flat_optimizer nso, not sam"),
    ({"flat_optimizer": "nso", "wsam_gamma": 0.5}, "wsam_gamma applies to flat_optimizer wsam"),
    ({"flat_optimizer": "wsam", "flat_seed": 1}, "flat_seed applies to flat_optimizer nso"),
    ({"flat_optimizer": "asam", "sam_adaptive": False}, "asam is sam with sam_adaptive"),
    ({"flat_optimizer": "nso", "nso_sigma": -1.0}, "nso_sigma must be a finite number >= 0"),
    ({"flat_optimizer": "nso", "nso_sigma": float("nan")}, "nso_sigma must be a finite number"),
    ({"flat_optimizer": "sam", "sam_rho": float("inf")}, "sam_rho must be a finite number"),
    ({"flat_optimizer": "nso", "nso_lam": 1.5}, "nso_lam must be in \\[0, 1\\]"),
    ({"flat_optimizer": "nso", "nso_num_perturbs": 0}, "nso_num_perturbs must be >= 1"),
    ({"flat_optimizer": "nso", "nso_num_perturbs": 1.5}, "nso_num_perturbs must be an integer"),
    ({"flat_optimizer": "wsam", "wsam_gamma": 1.0}, "wsam_gamma must be in \\[0, 1\\)"),
    ({"flat_optimizer": "nso", "flat_seed": -1}, "flat_seed must be in \\[0, 2\\*\\*64\\)"),
    ({"flat_optimizer": "nso", "nso_distribution": "gauss"}, "nso_distribution must be one of"),
    ({"flat_optimizer": "sam", "flat_backend": "bogus"}, "flat_backend must be one of"),
    ({"flat_optimizer": "nso", "nso_use_neg": "yes"}, "nso_use_neg must be True or False"),
    ({"flat_optimizer": "nso", "optim": "lomo"}, "cannot wrap optim='lomo'.*outside"),
    ({"flat_optimizer": "sam", "optim": "galore_adamw_layerwise"}, "cannot wrap optim="),
    ({"flat_optimizer": "nso", "fsdp": "full_shard"}, "does not run under the Trainer's FSDP"),
])
def test_bad_flag_combinations_are_refused(tmp_path, extra, message):
    extra = dict(extra)
    flat = extra.pop("flat_optimizer", None)
    with pytest.raises(FlatOptionError, match=message):
        arguments(tmp_path, flat=flat, **extra)


def test_a_base_optimizer_passed_in_is_wrapped(tmp_path):
    """optimizers=(AdamW, scheduler) with flat_optimizer: that AdamW becomes the base, and the
    scheduler built on it schedules the flatfused step (they share the param groups)."""
    model = runner.tiny_model()
    base = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda step: 0.5 ** step)
    trainer = FlatTrainer(model=model, args=arguments(tmp_path, flat="wsam", **KINDS["wsam"]),
                          train_dataset=runner.TinyData(SAMPLES), optimizers=(base, scheduler))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    assert trainer.optimizer.optimizer.base_optimizer is base
    assert [h["learning_rate"] for h in train_logs(trainer)] == [LR * 0.5**k for k in range(STEPS)]
    assert {int(s["step"]) for s in base.state_dict()["state"].values()} == {STEPS}


def test_conflicting_optimizer_settings_are_refused(tmp_path):
    model = runner.tiny_model()
    nso = flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, lr=LR, max_grad_norm=0.5)
    with pytest.raises(FlatOptionError,
                       match="flat_optimizer='sam' builds the optimizer.*keep one"):
        FlatTrainer(model=model, args=arguments(tmp_path, flat="sam"), optimizers=(nso, None))
    with pytest.raises(FlatOptionError, match="max_grad_norm=0.05 and the optimizer's "
                                              "max_grad_norm=0.5 disagree"):
        FlatTrainer(model=model, args=arguments(tmp_path, plain=True), optimizers=(nso, None))
    # max_grad_norm=0 leaves the optimizer's own clipping
    FlatTrainer(model=model, args=arguments(tmp_path, plain=True, max_grad_norm=0.0),
                optimizers=(nso, None))
    assert nso.max_grad_norm == 0.5


def test_hf_argument_parser_takes_the_open_clip_launchers_flag_names(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(FlatTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--flat-optimizer", "nso", "--nso-sigma", "0.02",
         "--nso_use_neg", "false", "--use_cpu"])
    options = args.flat_options()
    assert (args.flat_optimizer, options["nso_sigma"], options["nso_use_neg"]) == ("nso", 0.02,
                                                                                   False)
    assert (options["nso_lam"], options["flat_seed"]) == (0.0, args.seed)  # the defaults


def _bench():
    sys.path.insert(0, os.path.join(os.path.dirname(TESTS), "bench"))
    try:
        import bench_trainer
    finally:
        sys.path.pop(0)
    return bench_trainer


def test_trainer_step_benchmark_records_paired_rounds(tmp_path):
    out = tmp_path / "t.json"
    assert _bench().main(["--rounds", "2", "--steps", "3", "--warmup", "1", "--hidden", "32",
                          "--seq", "16", "--batch", "2", "--threads", "1",
                          "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["order"] for r in record["rounds"]] == [["adamw", "nso"], ["nso", "adamw"]]
    assert all(len(r["times_ms"][c]) == 2 for r in record["rounds"] for c in ("adamw", "nso"))
    assert all(len(r["paired_ratios"]["nso"]) == 2 for r in record["rounds"])
    nso = record["summary"]["nso"]
    assert nso["paired_median_ratio"] > 0 and len(nso["round_paired_medians"]) == 2


@pytest.mark.parametrize("argv,message", [
    (["--contenders", "adamw,foo"], "--contenders: unknown \\['foo'\\]"),
    (["--steps", "3", "--warmup", "3"], "--warmup must be in \\[0, --steps\\)"),
    (["--hidden", "30", "--heads", "4"], "--hidden 30 must be a multiple of --heads 4"),
    (["--rounds", "0"], "--rounds: must be > 0"),
])
def test_trainer_step_benchmark_refuses_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        _bench().main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("kind,extra", [
    ("nso", dict(flat_every=2, flat_reuse=0.5)),
    ("sam", dict(flat_every=2, flat_window="1,", flat_perturb="norm")),
    ("wsam", dict(flat_every=3)),
])
def test_cheap_schedules_through_the_trainer(tmp_path, kind, extra):
    """The cheap schedules' fields reach the optimizer, and its cheap steps run the step's
    micro-batches once (full steps twice: two passes)."""
    args = arguments(tmp_path, flat=kind, **KINDS[kind], **extra)
    calls = []

    class Counting(FlatTrainer):
        def compute_loss(self, *a, **kw):
            calls.append(1)
            return super().compute_loss(*a, **kw)

    trainer = train(args, Counting)
    optimizer = trainer.optimizer.optimizer
    schedule = optimizer.schedule
    assert schedule.every == extra["flat_every"] and optimizer.steps_taken == STEPS
    full = sum(schedule.full_step(t) for t in range(STEPS))
    passes = (2 + (kind == "nso" and "flat_reuse" in extra)) * full + (STEPS - full)
    assert len(calls) == passes * ACCUM
    if extra.get("flat_perturb") == "norm":
        assert {b.perturbed for b in optimizer.flat_buffers} == {False, True}  # (two groups)
