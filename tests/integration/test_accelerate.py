"""flatfused.integrations.accelerate: a plain Accelerate loop (accelerator.prepare, backward,
accumulate, an LR scheduler, clipping) with NSO, SAM and WSAM on a real Accelerator on CPU:
radius 0 against plain AdamW (fp32, bf16, and fp16 under a GradScaler with skipped steps),
exact resume through accelerator.save_state/load_state, 2 CPU ranks under torchrun (one
gradient all-reduce per NSO step), and the refusals.

Model and data: tests/transformers_runner.py (a 2-layer RoBERTa built from a config, random
token ids). accelerate 1.16 makes no GradScaler on a CPU (fp16 there silently runs in fp32), so
the fp16 test installs the one a GPU run gets, ``torch.amp.GradScaler`` on the CPU with fp16
autocast, before ``prepare``.
"""
import json
import math
import types

import pytest
import torch

from cases import assert_same_adamw_training
from launch import torchrun_path

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

import transformers_runner as runner  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, DistributedType  # noqa: E402

import flatfused  # noqa: E402
from flatfused.integrations import accelerate as flat_accelerate  # noqa: E402

STEPS, ACCUM, LR, CLIP = 4, 2, 1e-2, 0.05
RADIUS = {"nso": "sigma", "sam": "rho", "wsam": "rho"}


@pytest.fixture(autouse=True)
def fresh_state():
    """Accelerate keeps its state (mixed precision, accumulation) in process-wide singletons
    that refuse a second configuration: every test starts and ends without one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner.quiet()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def accelerator(precision: str = "no", scaler: bool = False) -> Accelerator:
    acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=ACCUM, cpu=True)
    if scaler:
        assert acc.scaler is None  # accelerate on a CPU: no scaler, no fp16 autocast
        # A GPU run's GradScaler, on the CPU; the first step overflows (fp16 holds 65504; the
        # gradients at scale 2**24 do not fit) and the next runs at 2**24 * 2**-12.
        acc.native_amp = True
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, backoff_factor=2.0**-12)
    return acc


def flat_optimizer(kind: str, base, model, radius: float, **kw):
    if kind == "nso":
        return flatfused.NSO(None, base, sigma=radius, max_grad_norm=CLIP, seed=0, **kw)
    if kind == "sam":
        return flatfused.SAM(None, base, rho=radius, max_grad_norm=CLIP, **kw)
    return flatfused.WeightedSAM(model, base, rho=radius, gamma=0.8, max_norm=CLIP, **kw)


def train(kind, precision="no", scaler=False, radius=0.0, samples=STEPS * ACCUM * runner.BATCH):
    """``kind`` None: the plain loop (backward, clip_grad_norm_ at the boundary, step); else
    the flatfused loop (backward in the closure, clipping by the optimizer)."""
    from transformers import get_linear_schedule_with_warmup

    acc = accelerator(precision, scaler)
    model = runner.tiny_model()
    loader = torch.utils.data.DataLoader(runner.TinyData(samples), batch_size=runner.BATCH)
    # eps = 1: Adam's step is nearly linear in the gradient (see assert_same_training)
    base = torch.optim.AdamW(model.parameters(), lr=LR, eps=1.0, weight_decay=0.1)
    opt = base if kind is None else flat_optimizer(kind, base, model, radius)
    scheduler = get_linear_schedule_with_warmup(opt, 0, STEPS)
    if kind is None:
        model, opt, loader, scheduler = acc.prepare(model, opt, loader, scheduler)
    else:
        model, opt, loader, scheduler = flat_accelerate.prepare(acc, model, opt, loader,
                                                                scheduler)
    out = {"losses": [], "returned": [], "skipped": [], "lrs": []}
    for batch in loader:
        with acc.accumulate(model):
            if kind is None:
                loss = model(**batch).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                out["losses"].append(loss.detach())
            else:
                def closure(batch=batch):
                    loss = model(**batch).loss
                    acc.backward(loss)
                    return loss
                out["returned"].append(opt.step(closure))
            if acc.sync_gradients:
                out["skipped"].append(acc.optimizer_step_was_skipped)
            scheduler.step()
            if acc.sync_gradients:
                out["lrs"].append(scheduler.get_last_lr()[0])
            opt.zero_grad()
    out.update(model=acc.unwrap_model(model), optimizer=opt, scaler=acc.scaler)
    return out


def assert_same_training(plain, flat, gradient_rounding):
    """The two loops take the same AdamW steps on the same micro-batches, to the rounding
    (tests/cases.py's assert_same_adamw_training)."""
    assert_same_adamw_training((plain["model"], plain["optimizer"]),
                               (flat["model"], flat["optimizer"]), runner.tiny_model(), STEPS,
                               LR, gradient_rounding)


# fp32: the clipping coefficient's 2**-9 dominates the reductions' 2**-12. bf16 autocast rounds
# products and activations to bf16 (2**-8 relative): a reduction summed in another order can
# flip such a rounding, and the difference passes through the two layers' backward: 2**-6.
ROUNDING = {"no": 2.0**-9, "bf16": 2.0**-6}


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_radius_zero_reproduces_the_plain_loop(kind, precision):
    """NSO with sigma 0 (two passes at w), SAM and WSAM with rho 0 step along the accumulated,
    clipped gradient: plain AdamW's steps, with accumulate(), the scheduler and clipping."""
    plain = train(None, precision)
    flat = train(kind, precision)
    assert_same_training(plain, flat, ROUNDING[precision])
    # step() returns None while accumulating, then the step's loss: the micro-batches' mean
    returned = flat["returned"]
    assert returned[0::2] == [None] * STEPS
    want = torch.stack(plain["losses"]).reshape(STEPS, ACCUM).mean(1)
    torch.testing.assert_close(torch.stack(returned[1::2]).float(), want, rtol=ROUNDING[precision],
                               atol=0)
    assert flat["lrs"] == plain["lrs"] and flat["skipped"] == [False] * STEPS
    assert flat["optimizer"].last_loss is returned[-1]


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_radius_changes_the_training(kind):
    """The same loop with the optimizers' radius moves elsewhere than radius 0 (by far more
    than the rounding the comparison above allows)."""
    at_zero, flat = train(kind), train(kind, radius=0.05)
    diff = max(float((a - b).detach().abs().max()) for a, b in
               zip(at_zero["model"].parameters(), flat["model"].parameters()))
    assert diff > 1e-5 and all(torch.isfinite(p).all() for p in flat["model"].parameters())


def test_fp16_grad_scaler_skips_overflowing_steps_as_the_plain_loop():
    """Under fp16 with a GradScaler, a step that overflows is skipped whole, reported by
    optimizer_step_was_skipped (so the prepared scheduler does not advance) and the scale
    lowered, exactly as in the plain loop. Unprepared, accelerate 1.16's AcceleratedOptimizer
    failed the first step (the scale did not exist yet) and reported no skip."""
    plain = train(None, "fp16", scaler=True)
    flat = train("nso", "fp16", scaler=True)
    assert plain["skipped"] == flat["skipped"] == [True] + [False] * (STEPS - 1)
    assert flat["lrs"] == plain["lrs"] and flat["scaler"].get_scale() == 2.0**12
    # fp16 autocast rounds to 2**-11 relative: a flipped rounding, through two layers, 2**-8.
    assert_same_training(plain, flat, 2.0**-8)


def test_save_state_and_load_state_resume_exactly(tmp_path):
    """accelerator.save_state mid-run and load_state in a new run: the same weights, AdamW state
    and NSO RNG position as the uninterrupted run, bit for bit (the optimizer's state_dict,
    which accelerate checkpoints, holds NSO's seed and offset)."""
    def run(steps_first=None, resume=None):
        from transformers import get_linear_schedule_with_warmup

        acc = accelerator()
        # No dropout: a new DataLoader iterator (skip_first_batches's, after load_state) draws
        # its base seed from torch's global RNG, which would shift dropout's masks; the Trainer
        # restores the RNG after skipping (tests/integration/test_transformers.py resumes with dropout).
        model = runner.tiny_model()
        loader = torch.utils.data.DataLoader(runner.TinyData(STEPS * ACCUM * runner.BATCH),
                                             batch_size=runner.BATCH)
        opt = flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, lr=LR, max_grad_norm=1.0,
                            seed=3 if resume else 0)  # the resumed run takes the saved seed
        scheduler = get_linear_schedule_with_warmup(opt, 1, STEPS)
        model, opt, loader, scheduler = flat_accelerate.prepare(acc, model, opt, loader,
                                                                scheduler)
        if resume:
            acc.load_state(resume)
            loader = acc.skip_first_batches(loader, 2 * ACCUM)
        for i, batch in enumerate(loader):
            with acc.accumulate(model):
                def closure(batch=batch):
                    loss = model(**batch).loss
                    acc.backward(loss)
                    return loss
                opt.step(closure)
                scheduler.step()
                opt.zero_grad()
            if steps_first is not None and i + 1 == steps_first * ACCUM:
                # safetensors refuses tensors that cover part of a storage, as parameters in
                # flatfused's flat buffers do: the pickle format (docs/transformers.md)
                acc.save_state(str(tmp_path / "ckpt"), safe_serialization=False)
        return model, opt

    straight, opt_straight = run(steps_first=2)
    resumed, opt_resumed = run(resume=str(tmp_path / "ckpt"))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    want, got = opt_straight.state_dict(), opt_resumed.state_dict()
    assert got["flatfused"] == want["flatfused"] and want["flatfused"]["next_offset"] > 0
    for pid, state in want["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got["state"][pid][key]), torch.as_tensor(value))


def _loop_source(bind: bool) -> str:
    # The loop as a script writes it at module level (its variables are globals) ...
    return f"""
for batch in loader:
    with acc.accumulate(model):
        def closure({'batch=batch' if bind else ''}):
            loss = model(**batch).loss
            acc.backward(loss)
            return loss
        opt.step(closure)
        opt.zero_grad()
"""


@pytest.mark.parametrize("scope", ["function", "module"])
def test_a_closure_reading_a_rebound_loop_variable_is_refused(scope):
    """Under accumulate() the kept closures run at the last micro-batch; one that reads the
    loop's ``batch`` (not bound as a default argument) would read the last micro-batch's:
    refused before anything runs, weights unchanged."""
    acc = accelerator()
    model = runner.tiny_model()
    loader = torch.utils.data.DataLoader(runner.TinyData(2 * runner.BATCH),
                                         batch_size=runner.BATCH)
    opt = flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, lr=LR, seed=0)
    model, opt, loader = flat_accelerate.prepare(acc, model, opt, loader)
    before = [p.detach().clone() for p in model.parameters()]
    if scope == "module":
        namespace = {"acc": acc, "model": model, "loader": loader, "opt": opt}
        run = lambda bind: exec(_loop_source(bind), namespace)  # noqa: E731
    else:
        def run(bind):
            for batch in loader:
                with acc.accumulate(model):
                    if bind:
                        def closure(batch=batch):
                            loss = model(**batch).loss
                            acc.backward(loss)
                            return loss
                    else:
                        def closure():
                            loss = model(**batch).loss
                            acc.backward(loss)
                            return loss
                    opt.step(closure)
                    opt.zero_grad()
    with pytest.raises(flat_accelerate.FlatStepError, match="reads 'batch'.*closure\\(batch=batch"):
        run(bind=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    run(bind=True)  # the same loop with the batch bound trains
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_", "unscale_gradients"])
def test_clipping_inside_the_step_is_refused_and_the_step_undone(call):
    acc = accelerator()
    model = runner.tiny_model()
    opt = flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, lr=LR, seed=0)
    model, opt = flat_accelerate.prepare(acc, model, opt)
    batch = runner.TinyData(runner.BATCH)[0]
    batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    before = [p.detach().clone() for p in model.parameters()]
    args = {"clip_grad_norm_": (model.parameters(), 1.0), "clip_grad_value_":
            (model.parameters(), 1.0), "unscale_gradients": ()}[call]

    def closure():
        loss = model(**batch).loss
        acc.backward(loss)
        getattr(acc, call)(*args)
        return loss

    with pytest.raises(flat_accelerate.FlatStepError, match="max_grad_norm="):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # w0, exactly
    assert opt.optimizer.step_phase == flatfused.StepPhase.IDLE
    assert call not in vars(acc)  # the accelerator's own method again
    assert float(acc.clip_grad_norm_(model.parameters(), 1.0)) >= 0


def test_prepare_refuses_what_it_cannot_step():
    acc = accelerator()
    model = runner.tiny_model()
    with pytest.raises(TypeError, match="wraps a flatfused optimizer.*got AdamW"):
        flat_accelerate.prepare_optimizer(acc, torch.optim.AdamW(model.parameters()))
    nso = flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, lr=LR)
    prepared = acc.prepare(nso)  # accelerate's own wrapper: too late to add ours
    with pytest.raises(flat_accelerate.FlatStepError, match="already prepared"):
        flat_accelerate.prepare_optimizer(acc, prepared)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_is_refused_at_every_zero_stage(stage):
    """From accelerate's own DeepSpeedPlugin (deepspeed itself is not installed): the message
    names the stage, says why, and points to DDP and FSDP2."""
    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": stage},
                                           "train_micro_batch_size_per_gpu": 1})
    acc = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                state=types.SimpleNamespace(deepspeed_plugin=plugin))
    why = {0: "owns the backward", 1: "partitions the optimizer state",
           2: "partitions the gradients", 3: "partitions the parameters"}[stage]
    with pytest.raises(flat_accelerate.FlatStepError,
                       match=f"NSO does not run under DeepSpeed \\(ZeRO stage {stage}\\).*{why}"
                             ".*DDP.*FSDP2"):
        flat_accelerate.check_accelerator(acc, "NSO")


def test_fsdp_is_refused():
    acc = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True,
                                state=types.SimpleNamespace(deepspeed_plugin=None))
    with pytest.raises(flat_accelerate.FlatStepError, match="FSDP.*before sharding.*fully_shard"):
        flat_accelerate.check_accelerator(acc, "SAM")


@pytest.mark.skipif(torchrun_path() is None, reason="torchrun not found")
def test_torchrun_two_cpu_ranks_one_gradient_all_reduce_per_nso_step(tmp_path):
    """Under torchrun (2 CPU ranks, gloo), the loop above with NSO and accumulate() over 2
    micro-batches: one all-reduce per step (2 passes x 2 micro-batches), identical weights on
    both ranks. Prepared without flatfused's prepare() and without optimizer.model set, the
    first step refuses (it would synchronise every backward) before any forward."""
    code, out, err = runner.launch(tmp_path, ["accelerate", "accelerate_unlinked"])
    assert code == 0, out[-4000:] + err[-4000:]
    for rank in range(2):
        counts = json.loads((tmp_path / f"accelerate.{rank}").read_text())
        assert counts["world_size"] == 2 and counts["sync_model"] == "DistributedDataParallel"
        assert counts["replicas_equal"] and counts["finite"] and counts["error"] is None
        assert (counts["syncs"], counts["forwards"]) == (2, 2 * 2 * 2), counts
        assert len(counts["losses"]) == 2 and all(map(math.isfinite, counts["losses"]))
        unlinked = json.loads((tmp_path / f"accelerate_unlinked.{rank}").read_text())
        assert "needs the prepared (DDP) module" in unlinked["error"]
        assert (unlinked["syncs"], unlinked["forwards"]) == (0, 0), unlinked
