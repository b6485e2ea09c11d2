"""The open step is explicit state: nothing a user trained is lost whatever happens inside it.

Every entry point consults it: calls that would rebuild the flat buffers during an open step
are refused (nothing changes, the step can still finish) or, where the change already happened
(freezing a parameter), the weights go back to ``w0`` and the step is abandoned with a clear
error. Any exception after the weights moved restores them exactly, and leaves the base
optimizer's state and NSO's RNG position as they were at the step's start."""
import copy

import pytest
import torch

import flatfused
from flatfused import StepPhase
from cases import CPU_BACKENDS

BACKENDS = CPU_BACKENDS


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    return model, (x, y)


def backward(model, data):
    x, y = data
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_weights(model, expected):
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def base_state(opt):
    return copy.deepcopy(opt.base_optimizer.state_dict())


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    assert a["param_groups"] == b["param_groups"]
    for i, s in a["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(b["state"][i][k], v, rtol=0, atol=0)


def nso(model, backend="torch", **kw):
    return flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, momentum=0.9, seed=5,
                         backend=backend, **kw)


def open_nso_step(model, data, opt, stop_after):
    """The reference three-call loop (lam=0, use_neg) up to ``stop_after``."""
    backward(model, data)
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    if stop_after == "store_weights":
        return
    opt.first_step(zero_grad=True, store_perturb=True)
    if stop_after == "plus":
        return
    backward(model, data)
    opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
    if stop_after == "accumulated":
        return
    opt.first_step(zero_grad=True, store_perturb=False)
    assert stop_after == "minus"


def finish_nso_step(model, data, opt, stop_after):
    if stop_after == "store_weights":
        opt.first_step(zero_grad=True, store_perturb=True)
        stop_after = "plus"
    if stop_after == "plus":
        backward(model, data)
        opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
        stop_after = "accumulated"
    if stop_after == "accumulated":
        opt.first_step(zero_grad=True, store_perturb=False)
    backward(model, data)
    opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
    opt.second_step(zero_grad=True)


def uninterrupted_nso(steps=2, backend="torch"):
    model, data = model_and_batch()
    opt = nso(model, backend)
    for _ in range(steps):
        open_nso_step(model, data, opt, "minus")
        finish_nso_step(model, data, opt, "minus")
    return weights(model)


# ----------------------------------------------------------------------- the phases


def test_nso_phases():
    model, data = model_and_batch()
    opt = nso(model)
    assert opt.step_phase is StepPhase.IDLE
    backward(model, data)
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    assert opt.step_phase is StepPhase.CLEAN_STORED
    opt.first_step(zero_grad=True)
    assert opt.step_phase is StepPhase.PERTURBED
    backward(model, data)
    opt.store_gradients(zero_grad=True, update_weight=0.5)
    assert opt.step_phase is StepPhase.ACCUMULATED
    opt.first_step(zero_grad=True, store_perturb=False)
    assert opt.step_phase is StepPhase.PERTURBED
    backward(model, data)
    opt.store_gradients(zero_grad=True, update_weight=0.5)
    opt.second_step(zero_grad=True)
    assert opt.step_phase is StepPhase.IDLE


@pytest.mark.parametrize("kind", ["sam", "wsam"])
def test_sam_phases(kind):
    model, data = model_and_batch()
    opt = (flatfused.SAM(model, torch.optim.SGD, lr=0.1) if kind == "sam"
           else flatfused.WeightedSAM(model, torch.optim.SGD, lr=0.1))
    assert opt.step_phase is StepPhase.IDLE
    backward(model, data)
    opt.first_step(zero_grad=True)
    assert opt.step_phase is StepPhase.ASCENDED
    backward(model, data)
    opt.second_step(zero_grad=True)
    assert opt.step_phase is StepPhase.IDLE


# ------------------------------------------- 3. rebuilding buffers during an open step


@pytest.mark.parametrize("stop_after", ["store_weights", "plus", "accumulated", "minus"])
def test_nso_add_param_group_is_refused_during_an_open_step(stop_after):
    model, data = model_and_batch()
    extra = torch.nn.Parameter(torch.randn(3))
    opt = nso(model)
    before = weights(model)
    open_nso_step(model, data, opt, stop_after)
    with pytest.raises(RuntimeError, match="step is open"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1
    finish_nso_step(model, data, opt, stop_after)  # the step can still finish
    # ... exactly as an uninterrupted one.
    expected_model, _ = model_and_batch()
    expected = nso(expected_model)
    assert_weights(expected_model, before)
    open_nso_step(expected_model, data, expected, "minus")
    finish_nso_step(expected_model, data, expected, "minus")
    assert_weights(model, weights(expected_model))
    opt.add_param_group({"params": [extra]})  # between steps it is fine
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("stop_after", ["store_weights", "plus", "accumulated", "minus"])
def test_nso_load_state_dict_is_refused_during_an_open_step(stop_after):
    model, data = model_and_batch()
    opt = nso(model)
    open_nso_step(model, data, opt, stop_after)
    if stop_after == "store_weights":  # still at w0
        state = opt.state_dict()
    else:
        with pytest.warns(RuntimeWarning, match="holds the moved weights"):
            state = opt.state_dict()
    with pytest.raises(RuntimeError, match="step is open"):
        opt.load_state_dict(state)
    finish_nso_step(model, data, opt, stop_after)
    assert_weights(model, uninterrupted_nso(steps=1))


@pytest.mark.parametrize("stop_after", ["plus", "accumulated", "minus"])
def test_nso_freezing_during_an_open_step_restores_w0(stop_after):
    model, data = model_and_batch()
    opt = nso(model)
    w0 = weights(model)
    open_nso_step(model, data, opt, stop_after)
    model[2].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="abandoned"):
        opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
    assert_weights(model, w0)
    assert opt.step_phase is StepPhase.IDLE
    # The next step runs over the new layout and draws the abandoned step's noise.
    model[2].bias.requires_grad_(True)
    open_nso_step(model, data, opt, "minus")
    finish_nso_step(model, data, opt, "minus")
    assert_weights(model, uninterrupted_nso(steps=1))


@pytest.mark.parametrize("kind", ["sam", "wsam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_load_state_dict_between_the_steps_is_refused(kind, backend):
    model, data = model_and_batch()
    opt = (flatfused.SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
           if kind == "sam" else
           flatfused.WeightedSAM(model, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend))
    w = weights(model)
    backward(model, data)
    opt.first_step(zero_grad=True)
    with pytest.warns(RuntimeWarning, match="holds the moved weights"):
        state = opt.state_dict()
    with pytest.raises(RuntimeError, match="step is open"):
        opt.load_state_dict(state)
    with pytest.raises(RuntimeError, match="step is open"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    opt.abandon_step()  # the way out the error names
    assert_weights(model, w)
    assert opt.step_phase is StepPhase.IDLE
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kind", ["sam", "wsam"])
def test_sam_freezing_between_the_steps_restores_w(kind):
    model, data = model_and_batch()
    opt = (flatfused.SAM(model, torch.optim.SGD, lr=0.1) if kind == "sam"
           else flatfused.WeightedSAM(model, torch.optim.SGD, lr=0.1))
    w = weights(model)
    backward(model, data)
    opt.first_step(zero_grad=True)
    backward(model, data)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="abandoned"):
        opt.second_step()
    assert_weights(model, w)


def test_nso_new_step_while_one_is_open_is_refused():
    """Starting a step over perturbed weights would save them as ``w0`` and lose the real ones
    (a loop that ``continue``s after a bad loss mid-step)."""
    model, data = model_and_batch()
    opt = nso(model)
    w0 = weights(model)
    open_nso_step(model, data, opt, "plus")
    backward(model, data)
    with pytest.raises(RuntimeError, match="step is open"):
        opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    with pytest.raises(RuntimeError, match="step is open"):
        opt.step(lambda: backward(model, data))
    opt.abandon_step()
    assert_weights(model, w0)
    # The abandoned step's noise is drawn again by the next one.
    open_nso_step(model, data, opt, "minus")
    finish_nso_step(model, data, opt, "minus")
    assert_weights(model, uninterrupted_nso(steps=1))


def test_sam_first_step_twice_is_refused():
    model, data = model_and_batch()
    opt = flatfused.SAM(model, torch.optim.SGD, lr=0.1)
    w = weights(model)
    backward(model, data)
    opt.first_step()
    with pytest.raises(RuntimeError, match="step is open"):
        opt.first_step()
    opt.abandon_step()
    assert_weights(model, w)
    opt.abandon_step()  # idle: nothing to do


# ------------------------------------------------ 4. a failing second_step restores


class FailingSGD(torch.optim.SGD):
    """An SGD whose step raises (a base optimizer the fused kernels do not cover)."""

    fail = True

    def step(self, closure=None):
        if FailingSGD.fail:
            raise RuntimeError("base step failed")
        return super().step(closure)


@pytest.fixture
def failing_fused_step(monkeypatch):
    """Make the fused base update raise inside its launch, as a kernel refusing its state would."""
    from flatfused.optim import base_step

    def boom(*args, **kwargs):
        raise RuntimeError("base step failed")

    monkeypatch.setattr(base_step.BaseStep, "_sgd", boom)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [True, False])
def test_nso_second_step_failure_restores_w0(backend, fused, request):
    if fused:
        request.getfixturevalue("failing_fused_step")
    model, data = model_and_batch()
    opt = flatfused.NSO(model, torch.optim.SGD if fused else FailingSGD, sigma=0.05, lr=0.1,
                        momentum=0.9, seed=5, backend=backend)
    w0 = weights(model)
    state = base_state(opt)
    open_nso_step(model, data, opt, "minus")
    backward(model, data)
    opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
    with pytest.raises(RuntimeError, match="base step failed"):
        opt.second_step(zero_grad=True)
    assert_weights(model, w0)
    assert_same_state(state, base_state(opt))
    assert opt.step_phase is StepPhase.IDLE
    offsets = opt.state_dict()["flatfused"]
    assert offsets["next_offset"] == 0 and offsets["draw_offset"] is None  # RNG rewound


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_step_closure_failure_in_base_step_restores(kind, failing_fused_step):
    model, data = model_and_batch()
    if kind == "nso":
        opt = nso(model)
    elif kind == "sam":
        opt = flatfused.SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9)
        backward(model, data)
    else:
        opt = flatfused.WeightedSAM(model, torch.optim.SGD, lr=0.1, momentum=0.9)
    w = weights(model)
    state = base_state(opt)
    with pytest.raises(RuntimeError, match="base step failed"):
        opt.step(lambda: backward(model, data))
    assert_weights(model, w)
    assert_same_state(state, base_state(opt))
    assert opt.step_phase is StepPhase.IDLE


# ------------------------------- 5. Weighted SAM: a failing second pass changes nothing


class Boom(Exception):
    pass


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("max_norm", [None, 1.0])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_wsam_second_pass_failure_restores_weights_and_state(backend, decouple, max_norm, base):
    model, data = model_and_batch()
    cls, kw = ((torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)) if base == "sgd"
               else (torch.optim.AdamW, dict(lr=1e-2)))
    opt = flatfused.WeightedSAM(model, cls(model.parameters(), **kw), decouple=decouple,
                                max_norm=max_norm, backend=backend)
    opt.zero_grad()
    opt.step(lambda: backward(model, data))  # one good step: momentum exists
    w = weights(model)
    state = base_state(opt)
    calls = []

    def closure():
        calls.append(1)
        loss = backward(model, data)
        if len(calls) == 2:
            raise Boom
        return loss

    opt.zero_grad()
    with pytest.raises(Boom):
        opt.step(closure)
    assert_weights(model, w)
    assert_same_state(state, base_state(opt))
    assert opt.step_phase is StepPhase.IDLE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("failing_pass", [1, 2])
def test_nso_closure_failure_restores_weights_state_and_rng(backend, lam, failing_pass):
    model, data = model_and_batch()
    opt = nso(model, backend, lam=lam, use_neg=True)
    opt.step(lambda: backward(model, data))
    w = weights(model)
    state = base_state(opt)
    rng = {k: v for k, v in opt.state_dict()["flatfused"].items()}
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == failing_pass:
            raise Boom
        return backward(model, data)

    with pytest.raises(Boom):
        opt.step(closure)
    assert_weights(model, w)
    assert_same_state(state, base_state(opt))
    assert opt.state_dict()["flatfused"] == rng
