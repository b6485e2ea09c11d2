"""``load_state_dict`` validates everything, then applies: a foreign or corrupted checkpoint is
refused with a message that names the field and what was expected, and a refused load changes
nothing (the same state dict comes out, and training continues as if it had not been tried)."""
import copy

import pytest
import torch

import flatfused


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    return model, (torch.randn(8, 5), torch.randn(8, 3))


def closure_for(model, data):
    def closure():
        x, y = data
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


def make(kind, model, base="sgd"):
    cls, kw = ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)) if base == "sgd"
               else (torch.optim.AdamW, dict(lr=1e-2)))
    if kind == "nso":
        return flatfused.NSO(model, cls, sigma=0.05, seed=3, **kw)
    if kind == "sam":
        return flatfused.SAM(model, cls, rho=0.05, **kw)
    return flatfused.WeightedSAM(model, cls, rho=0.05, **kw)


def trained(kind, base="sgd"):
    model, data = model_and_batch()
    opt = make(kind, model, base)
    closure = closure_for(model, data)
    for _ in range(2):
        opt.zero_grad()
        if kind == "sam":
            closure()
        opt.step(closure)
    return model, data, opt


def same(a, b):
    """Two state dicts hold the same values (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def refuse(opt, state, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(state)
    assert same(opt.state_dict(), before), "a refused load changed the optimizer"


def corrupt(sd, path, value):
    sd = copy.deepcopy(sd)
    target = sd
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return sd


DELETE = object()


@pytest.mark.parametrize("source,target", [("sam", "nso"), ("wsam", "nso"), ("nso", "sam"),
                                           ("nso", "wsam"), ("sam", "wsam"), ("wsam", "sam")])
def test_a_foreign_checkpoint_is_refused_before_anything_changes(source, target):
    _, _, src = trained(source)
    model, data, opt = trained(target)
    refuse(opt, src.state_dict(), "checkpoint")


@pytest.mark.parametrize("path,value,match", [
    (("flatfused", "draw_offset"), "x", "draw_offset"),
    (("flatfused", "draw_offset"), -1, "draw_offset"),
    (("flatfused", "next_offset"), -5, "next_offset"),
    (("flatfused", "next_offset"), 2 ** 64, "next_offset"),
    (("flatfused", "next_offset"), 1.5, "next_offset"),
    (("flatfused", "seed"), -1, "seed"),
    (("flatfused", "seed"), "7", "seed"),
    (("flatfused", "seed"), DELETE, "seed"),
    (("flatfused", "version"), 99, "version"),
    (("flatfused", "version"), "1", "version"),
    (("param_groups", 0, "sigma"), -0.1, "sigma"),
    (("param_groups", 0, "sigma"), "0.1", "sigma"),
    (("param_groups", 0, "lr"), float("nan"), "lr"),
    (("state", 0, "momentum_buffer"), torch.zeros(3), "momentum_buffer"),
    (("state", 0, "momentum_buffer"), "zeros", "momentum_buffer"),
    (("param_groups", 0, "params"), [0, 1, 2], "parameter"),
    (("state",), [], "state"),
])
def test_a_corrupted_nso_checkpoint_is_refused(path, value, match):
    model, data, opt = trained("nso")
    refuse(opt, corrupt(opt.state_dict(), path, value), match)
    # ... and the optimizer trains on exactly as an untouched one.
    expected_model, _, expected = trained("nso")
    for m, o in ((model, opt), (expected_model, expected)):
        o.step(closure_for(m, data))
    for p, q in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("path,value,match", [
    (("state", 0, "step"), torch.tensor(-3.0), "step"),
    (("state", 0, "step"), torch.tensor(float("nan")), "step"),
    (("state", 0, "step"), torch.tensor(2.5), "step"),
    (("state", 1, "exp_avg"), torch.zeros(2, 2), "exp_avg"),
    (("state", 1, "exp_avg_sq"), DELETE, "exp_avg_sq"),
    (("param_groups", 0, "betas"), (0.9, 1.5), "betas"),
    (("param_groups", 0, "rho"), float("inf"), "rho"),
    (("param_groups", 0, "adaptive"), "yes", "adaptive"),
])
@pytest.mark.parametrize("kind", ["sam", "wsam"])
def test_a_corrupted_adam_checkpoint_is_refused(kind, path, value, match):
    model, data, opt = trained(kind, base="adamw")
    refuse(opt, corrupt(opt.state_dict(), path, value), match)


def test_a_good_checkpoint_still_loads_and_resumes_bit_identically():
    model, data, opt = trained("nso", base="adamw")
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(closure_for(model, data))
    expected = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    opt.step(closure_for(model, data))
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_a_plain_torch_checkpoint_loads_as_the_base_optimizers_state():
    """A checkpoint of the bare base optimizer (no flatfused section) is the documented way to
    move a run from torch.optim to a flatfused wrapper: its state loads, the RNG keeps its own."""
    model, data = model_and_batch()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    closure_for(model, data)()
    sgd.step()
    opt = make("nso", model)
    opt.load_state_dict(sgd.state_dict())
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"],
                       sgd.state[model[0].weight]["momentum_buffer"])
