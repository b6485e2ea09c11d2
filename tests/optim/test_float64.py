"""float64 parameters: outside the compiled kernels' dtypes, they run on the torch backend in
float64 arithmetic (``backend="auto"`` picks it), matching the references to float64 rounding."""
import pytest
import torch
import torch.nn.functional as F

import flatfused
from flatfused import reference
from cases import closure_for

BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))}


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return model, (x, y)


def mse(model, data):
    return F.mse_loss(model(data[0]), data[1])


def assert_same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert p.dtype == q.dtype == torch.float64
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("lam,use_neg", [(0.0, True), (0.5, False)])
def test_nso_matches_reference(base, lam, use_neg):
    cls, kw = BASES[base]
    ref_model, data = model_and_data()
    model, _ = model_and_data()
    noise = reference.flatfused_noise_source(list(ref_model.parameters()), 3)
    ref = reference.NSM(ref_model.parameters(), cls, sigma=0.05, noise_source=noise, **kw)
    ours = flatfused.NSO(model.parameters(), cls, sigma=0.05, seed=3, **kw)
    assert ours.backends == ["torch"]
    for _ in range(3):
        reference.train_step(ref_model, ref, mse, data, 1, lam, use_neg)
        reference.train_step(model, ours, mse, data, 1, lam, use_neg)
        assert_same(ref_model, model)
    acc = ours.flat_buffers[0].state["acc"]
    assert acc.dtype == torch.float64


@pytest.mark.parametrize("base", sorted(BASES))
def test_sam_and_wsam_match_reference(base):
    cls, kw = BASES[base]
    ref_model, data = model_and_data()
    model, _ = model_and_data()
    ref = reference.SAM(ref_model.parameters(), cls, rho=0.05, **kw)
    ours = flatfused.SAM(model.parameters(), cls, rho=0.05, **kw)
    for _ in range(3):
        reference.sam_train_step(ref_model, ref, mse, data)
        reference.sam_train_step(model, ours, mse, data)
    # the ascent's gradient norm is an fp32 device scalar on every backend: 1e-7 relative in e
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-9)
    ref_model, _ = model_and_data()
    model, _ = model_and_data()
    ref = reference.WeightedSAM(ref_model, cls(ref_model.parameters(), **kw), restore="copy")
    ours = flatfused.WeightedSAM(model, cls(model.parameters(), **kw))
    for _ in range(3):
        for m, opt in ((ref_model, ref), (model, ours)):
            opt.step(closure_for(m, opt, mse, data))
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-9)


def test_unsupported_dtypes_and_backends_fail_early():
    model, data = model_and_data()
    for backend in ("cpu", "triton"):
        with pytest.raises(TypeError, match="float64 ones run on backend='torch'"):
            flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    complex_param = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="floating-point parameters"):
        flatfused.SAM([complex_param], torch.optim.SGD, lr=0.1)
