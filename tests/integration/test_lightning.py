"""flatfused.integrations.lightning: NSO, SAM and WSAM under a real lightning.Trainer (CPU).

Each optimizer in each precision mode (16-mixed through a CPU GradScaler) with gradient clipping,
accumulation and an LR scheduler; sigma=0 / rho=0 against the plain Lightning AdamW run;
checkpoint resume; manual optimization; two DDP ranks under torchrun; the refusals. The task
and its DDP runs: tests/lightning_runner.py.
"""
import json
import logging
import math
import os
import warnings

import pytest
import torch

from launch import run_torchrun, torchrun_path

L = pytest.importorskip("lightning")

import lightning_runner as runner  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision, Precision  # noqa: E402

from flatfused import StepPhase  # noqa: E402
from flatfused.integrations.lightning import (FlatLightningError,  # noqa: E402
                                              FlatOptimizerCallback, check_strategy)

# Lightning on this torch: a deprecation inside Lightning, and advice for real-sized runs.
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*GPU available but not used"),
              pytest.mark.filterwarnings("ignore:`training_step` returned `None`")]

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
CLIP = 0.1  # below every step's gradient norm in these runs (checked where it matters)
STEPS_PER_EPOCH = runner.SAMPLES // runner.BATCH // 2  # with accumulate_grad_batches=2


@pytest.fixture(autouse=True, scope="module")
def quiet_and_one_thread():
    """(Module scope: before the module's shared runs, which must run as the tests' do.)"""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric",
                                                    "lightning")]
    levels, threads = [logger.level for logger in loggers], torch.get_num_threads()
    runner.quiet()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def make_trainer(precision="32", clip=CLIP, accumulate=2, callback=True, scale=2.0**16,
                 callbacks=(), **kw):
    """A CPU trainer without logger, checkpoints, progress bar or summary. "16-mixed" is
    Lightning's MixedPrecision with a CPU GradScaler starting at ``scale`` (Lightning creates
    none on a CPU), what ``precision="16-mixed"`` gives on a GPU."""
    plugins = []
    if precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu",
                                  scaler=torch.amp.GradScaler("cpu", init_scale=scale))]
        precision = None
    return L.Trainer(accelerator="cpu", devices=1, precision=precision, plugins=plugins,
                     gradient_clip_val=clip, accumulate_grad_batches=accumulate, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False,
                     callbacks=([FlatOptimizerCallback()] if callback else []) + list(callbacks),
                     **kw)


def adam_steps(optimizer) -> set:
    return {int(s["step"]) for s in optimizer.state_dict()["state"].values()}


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------- precision modes

@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("kind", runner.KINDS)
def test_each_optimizer_trains_in_each_precision(kind, precision):
    """Clipping, accumulation over 2 micro-batches and a per-step LR schedule, in each mode.
    The fp16 scaler starts at 2**18, where the first steps overflow: they are skipped whole
    (AdamW not stepped) and the scale halves, as GradScaler does for plain optimizers."""
    steps, init_scale = 4, 2.0**18
    module = runner.build(kind)
    initial = weights(module)
    trainer = make_trainer(precision, max_steps=steps, scale=init_scale)
    clip_norm = "max_norm" if kind == "wsam" else "max_grad_norm"
    seen = []  # the optimizer's clipping norm as each step ends

    class SeeClipping(L.Callback):
        def on_fit_start(self, trainer, module):
            trainer.optimizers[0].register_step_post_hook(
                lambda opt, args, kwargs: seen.append(getattr(opt, clip_norm)))

    trainer.callbacks.append(SeeClipping())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    optimizer = trainer.optimizers[0]
    # Clipping is the optimizer's, after unscaling, in every step and only there; nothing
    # clipped .grad inside a pass (which NSO and WSAM would have detected and warned about).
    assert seen == [CLIP] * steps and getattr(optimizer, clip_norm) is None
    assert not [w for w in caught if "in place" in str(w.message)]
    # Every pass ran both micro-batches of its step; the schedule stepped once per step.
    assert trainer.global_step == steps
    assert module.calls == steps * runner.passes(kind) * 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(runner.LR * runner.GAMMA**steps)
    after = weights(module)
    assert all(torch.isfinite(v).all() for v in after.values())
    if precision == "16-mixed":
        scaler = trainer.precision_plugin.scaler
        skipped = round(math.log2(init_scale / scaler.get_scale()))
        assert 1 <= skipped < steps and adam_steps(optimizer) == {steps - skipped}
    else:
        assert adam_steps(optimizer) == {steps}
    assert not torch.equal(after["net.0.weight"], initial["net.0.weight"])


@pytest.mark.parametrize("kind,precision", [("nso", "bf16-true"), ("sam", "16-true"),
                                            ("wsam", "64-true")])
def test_half_and_double_weights_train(kind, precision):
    """Lightning's true-precision modes: the weights themselves are 16- or 64-bit (flatfused
    keeps an fp32 accumulator for 16-bit ones; float64 runs on its torch backend)."""
    module = runner.build(kind)
    trainer = make_trainer(precision, max_steps=3)
    trainer.fit(module)
    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
    assert {p.dtype for p in module.parameters()} == {dtype[precision]}
    assert module.calls == 3 * runner.passes(kind) * 2
    assert adam_steps(trainer.optimizers[0]) == {3}
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ---------------------------------------------------------------------------- against plain AdamW

class GradNorms(L.Callback):
    """The norm of the gradients Lightning is about to clip (plain runs: one call per step)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


ZERO_RADIUS_STEPS = 6


def fit_linear_adam(kind, radius=0.0, accumulate=2, callback=True, callbacks=(), step=None):
    """``ZERO_RADIUS_STEPS`` steps with Adam's eps = 1 (see assert_same_training);
    ``step``: a training_step of another module class in place of the task's."""
    module = runner.build(kind, radius=radius, eps=1.0)
    if step is not None:
        module.__class__ = type("Changed", (type(module),), {"training_step": step})
    trainer = make_trainer(max_steps=ZERO_RADIUS_STEPS, accumulate=accumulate, callback=callback,
                           callbacks=callbacks)
    trainer.fit(module)
    return module, trainer.optimizers[0]


@pytest.fixture(scope="module")
def plain_adamw():
    """Plain Lightning with AdamW: accumulation over 2 micro-batches, clipping (active: every
    step's norm exceeds CLIP), the LR schedule."""
    norms = GradNorms()
    module, optimizer = fit_linear_adam("adamw", callback=False, callbacks=[norms])
    assert len(norms.norms) == ZERO_RADIUS_STEPS and min(norms.norms) > 2 * CLIP, norms.norms
    return module, optimizer


def assert_same_training(plain, flat, kind):
    """The two runs take the same AdamW steps on the same micro-batches; the tolerance is the
    rounding (G: the largest clipped gradient element, at most CLIP; T steps; lr at most LR).

    - Gradients: the same forward-backward at the same weights, but summed in orders the
      kernels choose by the tensors' alignment (a flat buffer's views against torch's own
      tensors), and clipped with norms summed in other orders: over 385 parameters, at most
      385 * 2**-24 < 2**-15 of G from the norm, 2**-18 from the short (<= 64 term) reductions
      of this model; bounded by d = 2**-14 G.
    - Adam's eps = 1, far above sqrt(v_hat) <= G, makes the step lr m_hat / (sqrt(v_hat) + 1)
      nearly linear in the gradient: a difference d moves it by at most lr (1 + G) d (where
      eps = 1e-8 would turn rounding noise of near-zero gradients into steps of order lr).
      WSAM's decoupled term lr alpha (g~ - g) is 0 at rho = 0, up to 2 lr alpha d.
    - The fused update and torch's order their few operations differently: at most
      2**-22 lr G per step, and each step rounds the weights once (2**-23 relative, each way).
    Over T steps: |dw| <= T (2**-23 |w| + lr ((1 + G + 2 alpha) 2**-14 + 2**-22) G). Adam's
    moments are averages of the gradients: |d m| <= d, |d v| <= 2 G d. BatchNorm's running
    statistics average the first layer's outputs (8-term dot products of inputs |x| <= X, plus
    the bias): |d out| <= (8 X + 1) |dw|, so |d mean| <= (8 X + 1) |dw| and, the unbiased batch
    variance being 8/7 of a mean of squares of (out - mean), |out - mean| <= 2 O (O the largest
    |output|), |d var| <= 8/7 * 2 * 2 O * 2 |d out| < 10 O |d out|; plus their own rounding,
    2**-20 relative over 12 updates. They match only if the callback gave NSO and SAM, built
    from the parameters, the module whose BatchNorm the second pass freezes."""
    (plain_module, plain_opt), (flat_module, flat_opt) = plain, flat
    T, lr, G = ZERO_RADIUS_STEPS, runner.LR, CLIP
    alpha = 0.8 / (1 - 0.8) if kind == "wsam" else 0.0
    d = 2.0**-14 * G
    atol = T * lr * ((1 + G + 2 * alpha) * d + 2.0**-22 * G)
    want, got = plain_module.state_dict(), flat_module.state_dict()
    x = runner.data().dataset.tensors[0]
    X = float(x.abs().max())
    with torch.no_grad():
        O = float(plain_module.net[0](x).abs().max())
    d_out = (8 * X + 1) * atol
    bounds = {"running_mean": d_out, "running_var": 10 * O * d_out}
    for name, value in want.items():
        if name.endswith("num_batches_tracked"):
            # The BatchNorm bypass (momentum 0) still counts the frozen passes (flatfused.bn)
            assert int(got[name]) == int(value) * runner.passes(kind), name
            continue
        tol = bounds.get(name.rsplit(".", 1)[1])
        torch.testing.assert_close(got[name], value, rtol=T * 2.0**-23 if tol is None else 2**-20,
                                   atol=atol if tol is None else tol, msg=name)
    plain_state, flat_state = plain_opt.state_dict()["state"], flat_opt.state_dict()["state"]
    for pid, state in plain_state.items():
        for key, bound in (("exp_avg", d), ("exp_avg_sq", 2 * G * d)):
            torch.testing.assert_close(flat_state[pid][key], state[key], rtol=0, atol=bound,
                                       msg=(pid, key))
    return atol


@pytest.mark.parametrize("kind", runner.KINDS)
def test_zero_radius_reproduces_plain_adamw(plain_adamw, kind):
    """NSO with sigma 0 averages two passes at the same weights, SAM and WSAM with rho 0 ascend
    nowhere: each is plain AdamW with the same accumulation, clipping (after the passes, by
    norm) and LR schedule, up to rounding."""
    flat = fit_linear_adam(kind)
    atol = assert_same_training(plain_adamw, flat, kind)
    # The comparison is sharp: training moved the weights far beyond the tolerance.
    moved = (plain_adamw[0].net[0].weight - runner.build("adamw").net[0].weight).abs().max()
    assert moved > 100 * atol


def test_the_comparison_tells_a_step_that_missed_a_micro_batch(plain_adamw):
    """Training on the last micro-batch of each step alone (what NSO's perturbed passes saw
    before this integration) fails the same comparison."""
    def last_micro_batch_only(module, batch, batch_idx):
        return module.loss(batch) * (batch_idx % 2)

    missed = fit_linear_adam("adamw", callback=False, step=last_micro_batch_only)
    with pytest.raises(AssertionError):
        assert_same_training(plain_adamw, missed, "adamw")


def test_other_optimizers_train_as_without_the_callback(plain_adamw):
    """The callback leaves a plain optimizer's training alone, bit for bit."""
    module, optimizer = fit_linear_adam("adamw", callback=True)
    for name, value in plain_adamw[0].state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
    want = plain_adamw[1].state_dict()["state"]
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, want[pid][key]), (pid, key)


# ---------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind,precision", [("nso", "16-mixed"), ("sam", "32"),
                                            ("wsam", "bf16-mixed")])
def test_resume_continues_exactly(tmp_path, kind, precision):
    """Two epochs straight, against the first epoch's checkpoint resumed for the second: the
    same weights, BatchNorm statistics, AdamW state, NSO RNG position, LR and loss scale, bit
    for bit (with skipped fp16 steps on both sides)."""
    def fit(epochs, ckpt=None):
        module = runner.build(kind)
        trainer = make_trainer(precision, max_epochs=epochs, scale=2.0**18)
        trainer.fit(module, ckpt_path=ckpt)
        return module, trainer

    straight, straight_trainer = fit(2)
    first, first_trainer = fit(1)
    path = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert "flatfused" in ckpt["optimizer_states"][0]
    if precision == "16-mixed":  # the scaler's state, under Lightning's own key
        assert ckpt["MixedPrecision"]["scale"] == first_trainer.precision_plugin.scaler.get_scale()
    resumed, resumed_trainer = fit(2, ckpt=path)

    assert resumed_trainer.global_step == straight_trainer.global_step == 2 * STEPS_PER_EPOCH
    assert not torch.equal(first.net[0].weight, straight.net[0].weight)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    want = straight_trainer.optimizers[0].state_dict()
    got = resumed_trainer.optimizers[0].state_dict()
    for pid, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got["state"][pid][key]), torch.as_tensor(value))
    assert got["flatfused"] == want["flatfused"]
    assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    if precision == "16-mixed":
        assert (resumed_trainer.precision_plugin.scaler.state_dict()
                == straight_trainer.precision_plugin.scaler.state_dict())


def test_plain_adamw_checkpoint_resumes_into_nso(tmp_path):
    """A run can switch to NSO at a checkpoint: the plain AdamW run's optimizer state loads as
    NSO's base state, and the loss scale carries over (the plugin keeps Lightning's key)."""
    plain = runner.build("adamw")
    trainer = make_trainer("16-mixed", max_epochs=1)
    trainer.fit(plain)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    scale = trainer.precision_plugin.scaler.get_scale()

    module = runner.build("nso")

    class Switched(type(module)):
        def on_train_start(self):  # after the checkpoint's state was loaded
            self.loaded = (self.trainer.precision_plugin.scaler.get_scale(),
                           adam_steps(self.trainer.optimizers[0]))
    module.__class__ = Switched
    resumed = make_trainer("16-mixed", max_epochs=2)
    resumed.fit(module, ckpt_path=path)
    assert module.loaded == (scale, adam_steps(trainer.optimizers[0]))
    assert adam_steps(resumed.optimizers[0]) == {2 * STEPS_PER_EPOCH}
    assert "flatfused" in resumed.optimizers[0].state_dict()


# ---------------------------------------------------------------------------- manual optimization

@pytest.fixture(scope="module")
def automatic_fp16():
    """Automatic optimization under the fp16 scaler (starting at 2**18: some steps skipped),
    for the manual forms to match; per optimizer kind."""
    runs = {}

    def run(kind):
        if kind not in runs:
            module = runner.build(kind, scheduler=False, batchnorm=False)
            trainer = make_trainer("16-mixed", clip=CLIP, accumulate=1, max_steps=4,
                                   scale=2.0**18)
            trainer.fit(module)
            runs[kind] = (module, trainer)
        return runs[kind]
    return run


@pytest.mark.parametrize("kind,manual", [("nso", "closure"), ("nso", "three_call"),
                                         ("sam", "two_call")])
def test_manual_optimization_under_fp16_matches_automatic(automatic_fp16, kind, manual):
    """``self.optimizers()`` in manual optimization: ``opt.step(closure)`` with
    ``self.manual_backward``, NSO's three-call API and SAM's two-call API, each step closed by
    ``opt.step()`` and clipped by ``self.clip_gradients(opt, CLIP, "norm")`` before it, under
    the fp16 scaler: the automatic run's training (with ``gradient_clip_val=CLIP``), bit for
    bit (NSO's passes add up exactly the same; SAM's ascent from the scaled gradient moves by
    the same e, the scale being a power of 2), with the state (NSO's RNG position) in the
    optimizer that Lightning checkpoints, not in the wrapper ``self.optimizers()`` returns."""
    want_module, want_trainer = automatic_fp16(kind)
    module = runner.build(kind, scheduler=False, batchnorm=False, manual=manual, manual_clip=CLIP)
    trainer = make_trainer("16-mixed", clip=None, accumulate=1, max_steps=4, scale=2.0**18)
    trainer.fit(module)
    assert trainer.global_step == want_trainer.global_step == 4
    for name, value in want_module.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
    want, got = want_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()
    assert got["flatfused"] == want["flatfused"]
    assert {k: v["step"] for k, v in got["state"].items()} == \
        {k: v["step"] for k, v in want["state"].items()}
    assert trainer.precision_plugin.scaler.get_scale() == \
        want_trainer.precision_plugin.scaler.get_scale() < 2.0**18
    wrapper = trainer.strategy._lightning_optimizers[0]
    assert not set(vars(wrapper)) - {"_optimizer", "_strategy", "_on_before_step",
                                     "_on_after_step"}
    assert trainer.optimizers[0].step_phase is StepPhase.IDLE
    assert trainer.optimizers[0].max_grad_norm is None  # clip_gradients set it for a step


# ---------------------------------------------------------------------------- DDP

@pytest.mark.skipif(torchrun_path() is None, reason="torchrun not found")
def test_ddp_two_cpu_ranks_one_all_reduce_per_nso_step(tmp_path):
    """strategy="ddp" on 2 CPU ranks (gloo), 2 steps each run, clipping on: NSO synchronises
    gradients once per step, with accumulate_grad_batches=2 too (the earlier micro-batches of
    each pass run without synchronisation); SAM and WSAM once per pass. The ranks' weights
    stay identical."""
    runs = {"nso:1": 1, "nso:2": 1, "sam:1": 2, "wsam:1": 2}  # syncs per step
    out = tmp_path / "counts"
    # --standalone: a free port of its own (other test runs may share the machine)
    cmd = ["--standalone", "--nproc_per_node", "2",
           os.path.join(TESTS, "lightning_runner.py"), str(out), *runs]
    code, stdout, stderr = run_torchrun(cmd, tmp_path)
    assert code == 0, stdout[-4000:] + stderr[-4000:]
    steps = 2
    for spec, syncs in runs.items():
        kind, accumulate = spec.split(":")
        for rank in range(2):
            counts = json.loads((tmp_path / f"counts.{kind}_{accumulate}.{rank}").read_text())
            assert counts["replicas_equal"] and counts["finite"], (spec, counts)
            assert counts["model_is_ddp"] and counts["steps"] == [steps], (spec, counts)
            assert counts["calls"] == counts["forwards"] == \
                steps * runner.passes(kind) * int(accumulate), (spec, counts)
            assert counts["syncs"] == syncs * steps, (spec, counts)


# ---------------------------------------------------------------------------- refusals

def test_check_strategy_refuses_sharding_strategies():
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    check_strategy(SingleDeviceStrategy(torch.device("cpu"), accelerator=CPUAccelerator()))
    fsdp = FSDPStrategy(accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")])
    with pytest.raises(FlatLightningError, match="FSDPStrategy on cpu is not supported"):
        check_strategy(fsdp)


def _refused(module, trainer, message, steps_taken=0):
    initial = weights(module)
    with pytest.raises(FlatLightningError, match=message):
        trainer.fit(module)
    optimizer = trainer.optimizers[0]
    assert optimizer.step_phase is StepPhase.IDLE
    assert adam_steps(optimizer) <= {steps_taken}
    if steps_taken == 0:  # refused before or inside the first step: the weights are w
        for name, value in module.named_parameters():
            assert torch.equal(value, initial[name]), name


@pytest.mark.parametrize("kind", ["nso", "wsam"])
def test_value_clipping_is_refused(kind):
    trainer = make_trainer(max_steps=2, gradient_clip_algorithm="value")
    _refused(runner.build(kind), trainer, "gradient_clip_algorithm='value'")


def test_value_clipping_from_configure_gradient_clipping_is_refused_inside_the_step():
    module = runner.build("sam")
    module.configure_gradient_clipping = lambda optimizer, gradient_clip_val=None, \
        gradient_clip_algorithm=None: module.clip_gradients(optimizer, 0.5, "value")
    _refused(module, make_trainer(clip=None, max_steps=2), "gradient_clip_algorithm='value'")


def test_clip_norm_set_twice_is_refused():
    module = runner.build("nso", max_grad_norm=1.0)
    _refused(module, make_trainer(clip=0.5, max_steps=2), "set only one of them")


def test_non_finite_clip_norm_is_refused():
    _refused(runner.build("nso"), make_trainer(clip=float("inf"), max_steps=2),
             "gradient_clip_val must be a finite number")


def test_unsupported_precision_plugin_is_refused():
    class OwnPrecision(Precision):
        pass

    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[OwnPrecision()], max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[FlatOptimizerCallback()])
    _refused(runner.build("nso"), trainer, "precision plugin OwnPrecision is not supported")


def test_training_step_returning_none_is_refused_and_the_step_undone():
    module = runner.build("nso")
    loss = module.loss
    module.loss = lambda batch: None if module.calls >= 1 else loss(batch)
    _refused(module, make_trainer(max_steps=2), "training_step returned None")


@pytest.mark.filterwarnings("ignore:You are using the `dataloader_iter` step flavor")
def test_dataloader_iter_training_step_is_refused():
    module = runner.build("nso")

    class IterStep(type(module)):
        def training_step(self, dataloader_iter):
            return self.loss(next(dataloader_iter)[0])
    module.__class__ = IterStep
    _refused(module, make_trainer(clip=None, accumulate=1, max_steps=2),
             r"training_step\(dataloader_iter\)")


def test_manual_step_without_closure_is_refused():
    module = runner.build("nso", scheduler=False, manual="closure")

    class StepWithoutClosure(type(module)):
        def training_step(self, batch, batch_idx):
            self.manual_backward(self.loss(batch))
            self.optimizers().step()
    module.__class__ = StepWithoutClosure
    _refused(module, make_trainer(clip=None, accumulate=1, max_steps=2),
             r"NSO.step\(\) without a closure")


@pytest.mark.parametrize("kind,schedule", [("nso", dict(every=2, reuse=0.5)),
                                           ("sam", dict(every=3, window=(1, None))),
                                           ("wsam", dict(every=2))])
def test_cheap_schedules_through_the_callback(kind, schedule):
    """The cheap schedules under Lightning: a cheap step runs the step's micro-batches once
    (accumulation replayed, clipping and the scheduler as for a full step)."""
    steps = 5
    module = runner.build(kind, **schedule)
    trainer = make_trainer("32", max_steps=steps)
    trainer.fit(module)
    optimizer = trainer.optimizers[0]
    full = sum(optimizer.schedule.full_step(t) for t in range(steps))
    passes = (2 + (kind == "nso" and "reuse" in schedule)) * full + (steps - full)
    assert optimizer.steps_taken == steps and module.calls == passes * 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(runner.LR * runner.GAMMA**steps)
