"""param_filter: perturb only some parameters (SAM-ON's normalisation layers, or any subset),
against the plain-PyTorch statements of flatfused.reference.schedules; a filter that keeps every
parameter is the plain optimizer bit for bit; the others get buffers of their own that the
perturbation passes skip."""
import copy

import pytest
import torch
import torch.nn.functional as F

import flatfused
from flatfused import reference
from flatfused.reference.schedules import nso_filtered_step, sam_filtered_step
from cases import CPU_BACKENDS

BACKENDS = CPU_BACKENDS
TOL = dict(rtol=2e-5, atol=2e-6)  # fused fp32 updates against per-parameter ones (test_sam.py)
SEED = 5


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 12)
        self.norm = torch.nn.LayerNorm(12)
        self.fc2 = torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def make_model():
    torch.manual_seed(0)
    return Net()


def batch(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)


def loss_fn(model, data):
    x, y = data
    return F.mse_loss(model(x), y)


def closure_for(model, data):
    def closure():
        value = loss_fn(model, data)
        value.backward()
        return value
    return closure


BASE = (torch.optim.SGD, dict(lr=0.1, momentum=0.9))
FILTERS = {
    "norm": lambda m: flatfused.norm_parameters(m),
    "fc2": lambda m: [m.fc2.weight, m.fc2.bias],
    "callable": lambda m: (lambda p: p.dim() == 1),  # the biases and the LayerNorm's
}


def selected(model, name):
    chosen = FILTERS[name](model)
    if callable(chosen):
        return [p for p in model.parameters() if chosen(p)]
    return chosen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", sorted(FILTERS))
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_the_statement(which, adaptive, backend):
    ref_model, model = make_model(), make_model()
    cls, kw = BASE
    ref_base = cls(ref_model.parameters(), **kw)
    opt = flatfused.SAM(model, cls, rho=0.2, adaptive=adaptive, backend=backend,
                        param_filter=FILTERS[which](model), **kw)
    assert sorted(b.perturbed for b in opt.flat_buffers) == [False, True]
    for step in range(4):
        sam_filtered_step(ref_model, ref_base, selected(ref_model, which), loss_fn, batch(step),
                          rho=0.2, adaptive=adaptive)
        opt.zero_grad()
        opt.step(closure_for(model, batch(step)))
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, **TOL, msg=f"{name}, step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", sorted(FILTERS))
def test_nso_matches_the_statement(which, backend):
    ref_model, model = make_model(), make_model()
    cls, kw = BASE
    ref_base = cls(ref_model.parameters(), **kw)
    source = reference.flatfused_noise_source(list(ref_model.parameters()), SEED)
    opt = flatfused.NSO(model, cls, sigma=0.1, seed=SEED, backend=backend,
                        param_filter=FILTERS[which](model), **kw)
    for step in range(4):
        nso_filtered_step(ref_model, ref_base, selected(ref_model, which), loss_fn, batch(step),
                          sigma=0.1, noise_source=source)
        opt.step(closure_for(model, batch(step)))
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, **TOL, msg=f"{name}, step {step}")


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_a_filter_keeping_every_parameter_is_the_plain_optimizer_bit_for_bit(kind):
    def make(model, **kw):
        cls, base_kw = BASE
        if kind == "nso":
            return flatfused.NSO(model, cls, sigma=0.1, seed=SEED, **kw, **base_kw)
        if kind == "sam":
            return flatfused.SAM(model, cls, rho=0.2, **kw, **base_kw)
        return flatfused.WeightedSAM(model, cls(model.parameters(), **base_kw), rho=0.2, **kw)

    plain_model, model = make_model(), make_model()
    plain, opt = make(plain_model), make(model, param_filter=lambda p: True)
    for step in range(4):
        for m, o in ((plain_model, plain), (model, opt)):
            o.zero_grad()
            o.step(closure_for(m, batch(step)))
    for p, q in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_unperturbed_parameters_never_move_between_the_passes():
    model = make_model()
    frozen_in_passes = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]
    opt = flatfused.SAM(model, torch.optim.SGD, rho=0.5, lr=0.0,
                        param_filter=flatfused.norm_parameters(model))
    before = [p.detach().clone() for p in frozen_in_passes]
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in frozen_in_passes])
        return closure_for(model, batch(0))()

    opt.step(closure)
    assert len(seen) == 2
    for pass_values in seen:
        for a, b in zip(pass_values, before):
            assert torch.equal(a, b)


def test_the_filter_survives_copies_and_resumes_bit_identically():
    model = make_model()
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.1, seed=SEED, lr=0.1,
                        param_filter=flatfused.norm_parameters(model))
    opt.step(closure_for(model, batch(0)))
    twin_model, twin = copy.deepcopy((model, opt))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for m, o in ((model, opt), (twin_model, twin)):
        for step in (1, 2):
            o.step(closure_for(m, batch(step)))
    resumed_model = make_model()
    resumed = flatfused.NSO(resumed_model, torch.optim.SGD, sigma=0.1, seed=SEED, lr=0.1,
                            param_filter=flatfused.norm_parameters(resumed_model))
    resumed_model.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    for step in (1, 2):
        resumed.step(closure_for(resumed_model, batch(step)))
    for p, q, r in zip(model.parameters(), twin_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


@pytest.mark.parametrize("bad", [torch.ones(3), 3, ["not a tensor"]])
def test_bad_filters_are_refused(bad):
    with pytest.raises(TypeError, match="param_filter"):
        flatfused.SAM(make_model(), torch.optim.SGD, lr=0.1, param_filter=bad)
