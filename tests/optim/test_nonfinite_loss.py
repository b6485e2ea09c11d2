"""Without a GradScaler a non-finite pass is not hidden: ``step(closure)`` returns a finite loss
only when every pass's loss was finite (the documented signal; with a GradScaler the step is
skipped instead, see test_amp.py)."""
import math

import pytest
import torch

import flatfused
from cases import CPU_BACKENDS

BACKENDS = CPU_BACKENDS


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    return model, (torch.randn(8, 4), torch.randn(8, 2))


def closure_blowing_up_in_pass(model, data, bad_pass, as_tensor=True):
    """A closure whose ``bad_pass``-th call (1-based) has an infinite loss and NaN gradients."""
    calls = []

    def closure():
        calls.append(1)
        x, y = data
        loss = torch.nn.functional.mse_loss(model(x), y)
        if len(calls) == bad_pass:
            loss = loss * float("inf")
        loss.backward()
        return loss if as_tensor else float(loss.detach())
    return closure


def is_finite(loss):
    return math.isfinite(float(loss))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_pass", [1, 2, 3])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_nso_with_a_clean_pass_signals_a_bad_perturbed_pass(backend, bad_pass, as_tensor):
    model, data = model_and_batch()
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, lam=0.5, use_neg=True,
                        backend=backend)
    loss = opt.step(closure_blowing_up_in_pass(model, data, bad_pass, as_tensor))
    weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not weights_finite  # without a scaler the step is taken, as torch.optim takes it
    assert not is_finite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_pass", [1, 2])
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_signals_a_bad_second_pass(backend, bad_pass, decouple):
    model, data = model_and_batch()
    opt = flatfused.WeightedSAM(model, torch.optim.SGD, lr=0.1, decouple=decouple,
                                backend=backend)
    opt.zero_grad()
    loss = opt.step(closure_blowing_up_in_pass(model, data, bad_pass))
    assert not is_finite(loss)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_a_finite_step_returns_the_loss_unchanged(lam):
    """The signal costs nothing when all is well: the clean loss (or the perturbed passes' mean
    with ``lam == 0``) comes back bit for bit."""
    model, data = model_and_batch()
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, lam=lam, use_neg=True)
    losses = []

    def closure():
        x, y = data
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.detach().clone())
        return loss

    got = opt.step(closure)
    expected = losses[0] if lam > 0 else sum(losses) / len(losses)
    assert torch.equal(got, expected)
