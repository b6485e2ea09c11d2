"""Bad input gets the library's own clear, early error: at construction, or at the first moment
it can be seen, never deep inside a kernel or after the update was applied."""
import math

import pytest
import torch

import flatfused


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    return model, (torch.randn(8, 4), torch.randn(8, 2))


def backward(model, data):
    x, y = data
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def make(kind, model, **kw):
    if kind == "nso":
        return flatfused.NSO(model, torch.optim.SGD, lr=0.1, **kw)
    if kind == "sam":
        return flatfused.SAM(model, torch.optim.SGD, lr=0.1, **kw)
    return flatfused.WeightedSAM(model, torch.optim.SGD, lr=0.1, **kw)


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_meta_parameters_are_refused_at_construction(kind):
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta"):
        make(kind, model)


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
@pytest.mark.parametrize("cast", ["double", "half"])
def test_a_model_cast_after_the_optimizer_gets_a_clear_error_at_backward(kind, cast):
    model, (x, y) = model_and_batch()
    opt = make(kind, model)
    getattr(model, cast)()
    dtype = next(model.parameters()).dtype
    with pytest.raises(RuntimeError, match="create the optimizer after"):
        torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
    with pytest.raises(RuntimeError, match="create the optimizer after"):
        opt.zero_grad()


@pytest.mark.parametrize("name,value", [
    ("sigma", 1e300), ("sigma", 3.5e38), ("sigma", "0.1"), ("sigma", True),
    ("lam", "0.5"), ("lam", True), ("lam", float("nan")), ("lam", 1.5),
    ("max_grad_norm", 1e300), ("max_grad_norm", "1"),
    ("use_neg", "no"), ("use_neg", 2), ("shared_noise", "yes"),
    ("num_perturbs", 1.0), ("num_perturbs", 0),
])
def test_nso_hyperparameters(name, value):
    model, _ = model_and_batch()
    with pytest.raises((TypeError, ValueError), match=name):
        flatfused.NSO(model, torch.optim.SGD, lr=0.1, **{name: value})


@pytest.mark.parametrize("name,value", [
    ("rho", 1e300), ("rho", "0.05"), ("adaptive", "yes"), ("max_grad_norm", float("inf")),
])
def test_sam_hyperparameters(name, value):
    model, _ = model_and_batch()
    with pytest.raises((TypeError, ValueError), match=name):
        flatfused.SAM(model, torch.optim.SGD, lr=0.1, **{name: value})


@pytest.mark.parametrize("name,value", [
    ("rho", 1e300), ("gamma", "0.9"), ("sam_eps", 1e300), ("decouple", "no"),
    ("max_norm", -1.0), ("m_sharpness", "no"), ("adaptive", 3),
])
def test_wsam_hyperparameters(name, value):
    model, _ = model_and_batch()
    with pytest.raises((TypeError, ValueError), match=name):
        flatfused.WeightedSAM(model, torch.optim.SGD, lr=0.1, **{name: value})


def test_set_sigma_and_a_schedulers_sigma_are_checked_alike():
    model, data = model_and_batch()
    opt = flatfused.NSO(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        opt.set_sigma(1e300)
    opt.param_groups[0]["sigma"] = 1e39  # a scheduler writing the group directly
    with pytest.raises(ValueError, match="sigma"):
        opt.step(lambda: backward(model, data))
    for p in model.parameters():
        assert bool(torch.isfinite(p).all())


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 2 ** 70, 1.0, "3"])
def test_seeds_outside_the_philox_range_are_refused(seed):
    model, _ = model_and_batch()
    with pytest.raises((TypeError, ValueError), match="seed"):
        flatfused.NSO(model, torch.optim.SGD, lr=0.1, seed=seed)


def test_the_largest_seed_is_accepted():
    model, _ = model_and_batch()
    assert flatfused.NSO(model, torch.optim.SGD, lr=0.1, seed=2 ** 64 - 1).seed == 2 ** 64 - 1


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
@pytest.mark.parametrize("returned", ["a string", [1.0], {"loss": 1.0}])
def test_a_closure_returning_no_loss_is_refused_before_the_update(kind, returned):
    model, data = model_and_batch()
    opt = make(kind, model)
    weights = [p.detach().clone() for p in model.parameters()]

    def closure():
        backward(model, data)
        return returned

    opt.zero_grad()
    if kind == "sam":
        backward(model, data)
    with pytest.raises(TypeError, match="closure"):
        opt.step(closure)
    for p, w in zip(model.parameters(), weights):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
@pytest.mark.parametrize("returned", [None, 1.5, 2, "tensor"])
def test_a_closure_may_return_a_number_a_tensor_or_none(kind, returned):
    model, data = model_and_batch()
    opt = make(kind, model)

    def closure():
        loss = backward(model, data)
        return loss if returned == "tensor" else returned

    opt.zero_grad()
    if kind == "sam":
        backward(model, data)
    loss = opt.step(closure)
    if returned is None:
        assert loss is None
    else:
        assert math.isfinite(float(loss))
