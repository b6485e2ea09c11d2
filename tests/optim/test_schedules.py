"""Cheap schedules (every=k, a window, LookSAM-style reuse) against their plain-PyTorch statement
(flatfused.reference.schedules) step for step; the plain schedule bit for bit; checkpoints that
resume mid-window; AMP; refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F

import flatfused
from flatfused import reference
from flatfused.optim.schedules import Schedule, radius_for_every
from flatfused.reference.schedules import ScheduledTrainer
from cases import CPU_BACKENDS

BACKENDS = CPU_BACKENDS
# Fused fp32 updates against the references' per-parameter ones, a few ulps per step (as
# test_sam.py and test_nso.py): the reuse's dot products add fp32 sums in another order.
TOL = dict(rtol=2e-5, atol=2e-6)
SEED = 11


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 9)
        self.fc2 = torch.nn.Linear(9, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model():
    torch.manual_seed(0)
    return Net()


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)


def loss_fn(model, data):
    x, y = data
    return F.mse_loss(model(x), y)


BASE = (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3))


def ours(kind, model, backend="torch", **sched):
    cls, kw = BASE
    if kind == "nso":
        return flatfused.NSO(model, cls, sigma=0.05, seed=SEED, backend=backend, **sched, **kw)
    if kind == "sam":
        return flatfused.SAM(model, cls, rho=0.1, backend=backend, **sched, **kw)
    return flatfused.WeightedSAM(model, cls(model.parameters(), **kw), rho=0.1, gamma=0.8,
                                 backend=backend, **sched)


def reference_trainer(kind, model, schedule, **extra):
    cls, kw = BASE
    if kind == "nso":
        source = reference.flatfused_noise_source(list(model.parameters()), SEED)
        opt = reference.NSM(model.parameters(), cls, sigma=0.05, noise_source=source, **kw)
    elif kind == "sam":
        opt = reference.SAM(model.parameters(), cls, rho=0.1, **kw)
    else:
        opt = reference.WeightedSAM(model, cls(model.parameters(), **kw), rho=0.1, gamma=0.8,
                                    restore="copy")
    return ScheduledTrainer(kind, model, opt, loss_fn, schedule, **extra)


def closure_for(model, data):
    def closure():
        value = loss_fn(model, data)
        value.backward()
        return value
    return closure


def run_ours(opt, model, steps, first=0):
    losses = []
    for step in range(first, first + steps):
        opt.zero_grad()
        losses.append(opt.step(closure_for(model, batch(step))))
    return losses


SCHEDULES = [dict(every=3), dict(every=2, window=(1, 6)), dict(every=3, reuse=0.7),
             dict(every=2, window=(2, None), reuse=0.5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sched", SCHEDULES, ids=str)
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_matches_the_plain_pytorch_statement(kind, sched, backend):
    if kind == "wsam" and "reuse" in sched:
        pytest.skip("reuse is SAM's and NSO's")
    ref_model, model = make_model(), make_model()
    trainer = reference_trainer(kind, ref_model, Schedule.build(**sched))
    opt = ours(kind, model, backend, **sched)
    for step in range(8):
        trainer.step(batch(step))
        opt.zero_grad()
        opt.step(closure_for(model, batch(step)))
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, **TOL, msg=f"{name}, step {step}")
    assert opt.steps_taken == 8


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
@pytest.mark.parametrize("sched", [dict(every=1), dict(window=(0, None)),
                                   dict(every=1, window=(0, 100))], ids=str)
def test_a_full_step_every_step_is_the_plain_optimizer_bit_for_bit(kind, sched):
    plain_model, model = make_model(), make_model()
    run_ours(ours(kind, plain_model), plain_model, 5)
    run_ours(ours(kind, model, **sched), model, 5)
    for p, q in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["nso", "sam"])
def test_reuse_with_every_step_full_changes_no_update(kind):
    """With k = 1 there is no cheap step: recording the reused direction leaves every update
    bit for bit (an MLP: NSO's extra clean pass only touches BatchNorm statistics)."""
    plain_model, model = make_model(), make_model()
    run_ours(ours(kind, plain_model), plain_model, 4)
    run_ours(ours(kind, model, reuse=0.7), model, 4)
    for p, q in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind,sched", [("nso", dict(every=3, reuse=0.7)),
                                        ("sam", dict(every=3, reuse=0.7)),
                                        ("wsam", dict(every=2, window=(1, 7)))], ids=str)
def test_resume_mid_window_is_bit_identical(kind, sched):
    straight_model = make_model()
    straight = ours(kind, straight_model, **sched)
    run_ours(straight, straight_model, 8)
    model = make_model()
    opt = ours(kind, model, **sched)
    run_ours(opt, model, 4)  # stops between full steps, with a reused direction kept
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed_model = make_model()
    resumed = ours(kind, resumed_model, **sched)
    resumed_model.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    assert resumed.steps_taken == 4
    run_ours(resumed, resumed_model, 4, first=4)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_cheap_steps_run_one_pass(kind):
    model = make_model()
    opt = ours(kind, model, every=4)
    counts = []
    for step in range(8):
        passes = []

        def closure():
            passes.append(1)
            return closure_for(model, batch(step))()

        opt.zero_grad()
        opt.step(closure)
        counts.append(len(passes))
    assert counts == [2, 1, 1, 1, 2, 1, 1, 1]


def test_sam_reference_form_cheap_step_uses_the_gradient_it_is_given():
    """In the reference's form the first pass already ran: a cheap step calls no closure."""
    model = make_model()
    opt = ours("sam", model, every=2)
    calls = []
    for step in range(4):
        opt.zero_grad()
        loss_fn(model, batch(step)).backward()
        opt.step(lambda: calls.append(1) or closure_for(model, batch(step))())
    assert len(calls) == 2  # the full steps' second passes


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_scaled_cheap_steps_equal_unscaled_and_an_overflow_skips_one(kind):
    """Under a GradScaler (power-of-two scale, exact) the schedule runs as without; an
    overflow in a cheap step skips it (not counted) and lowers the scale."""
    def run(scaler, poison=None):
        model = make_model()
        opt = ours(kind, model, every=3, **({"reuse": 0.5} if kind != "wsam" else {}))
        for step in range(6):
            data = batch(step)

            def closure():
                value = loss_fn(model, data)
                if step == poison:
                    value = value * float("inf")
                (scaler.scale(value) if scaler else value).backward()
                return value

            opt.zero_grad()
            if scaler is None:
                opt.step(closure)
            else:
                scaler.step(opt, closure)
                scaler.update()
        return model, opt

    def new_scaler():
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(torch.zeros(()))  # GradScaler creates its scale tensor lazily
        return scaler

    plain, _ = run(None)
    scaler = new_scaler()
    scaled, _ = run(scaler)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    scaler = new_scaler()
    _, opt = run(scaler, poison=4)  # a cheap step
    assert opt.steps_taken == 5 and scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_explicit_calls_refuse_a_schedule(kind):
    model = make_model()
    opt = ours(kind, model, every=2)
    loss_fn(model, batch(0)).backward()
    call = opt.store_gradients if kind == "nso" else opt.first_step
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        call()


@pytest.mark.parametrize("kw,match", [
    (dict(every=0), "every"), (dict(every=1.5), "every"), (dict(every=True), "every"),
    (dict(window=(5,)), "window"), (dict(window=(-1, 3)), "start"), (dict(window=(3, 3)), "stop"),
    (dict(reuse=-1.0), "reuse"), (dict(reuse="0.5"), "reuse"), (dict(reuse=float("nan")), "reuse"),
])
def test_bad_schedules_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        ours("sam", make_model(), **kw)


def test_wsam_has_no_reuse():
    with pytest.raises(TypeError, match="reuse"):
        ours("wsam", make_model(), reuse=0.5)


def test_radius_rule():
    assert radius_for_every(0.05, 4, "sam") == pytest.approx(0.2)
    assert radius_for_every(0.01, 4, "nso") == pytest.approx(0.02)
    with pytest.raises(ValueError):
        radius_for_every(0.01, 4, "adam")


def test_a_corrupted_reused_direction_is_refused():
    model = make_model()
    opt = ours("sam", model, every=3, reuse=0.5)
    run_ours(opt, model, 2)
    sd = opt.state_dict()
    sd["flatfused"]["reuse_direction"] = [torch.zeros(3)]
    with pytest.raises(ValueError, match="reuse_direction"):
        opt.load_state_dict(sd)
    sd["flatfused"].pop("reuse_direction")
    sd["flatfused"]["steps"] = -1
    with pytest.raises(ValueError, match="steps"):
        opt.load_state_dict(sd)
