"""flatfused.baselines (the best pure-PyTorch NSO/SAM/WSAM) against the reference and flatfused."""
import pytest
import torch
import torch.nn.functional as F

import flatfused
from flatfused import baselines, reference
from flatfused import rng as frng

SEED = 1234
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5)),  # no fused path: foreach
    "sgd-foreach": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=True)),
}


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 4)).to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randn(32, 4, generator=g).to(dtype)


def loss_fn(model, data):
    x, y = data
    return F.mse_loss(model(x).float(), y.float())


def closure_for(model, data):
    def closure():
        loss = loss_fn(model, data)
        loss.backward()
        return loss
    return closure


def philox_noise(numel):
    """flatfused's draws, for the baseline's ``noise_fn``: draw d sits at offset d * ceil(N/4)."""
    def fill(out, draw):
        offset = draw * frng.counters_per_draw(numel)
        out.copy_(frng.noise(numel, SEED, offset))
    return fill


def assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.detach().float(), pb.detach().float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("K,lam,use_neg", [(1, 0.0, True), (2, 0.0, True), (1, 0.5, False),
                                           (2, 0.3, True), (1, 1.0, True)])
def test_nso_matches_flatfused_and_reference(base, K, lam, use_neg):
    cls, kw = BASES[base]
    m_base, m_ff, m_ref = make_model(), make_model(), make_model()
    numel = sum(p.numel() for p in m_base.parameters())
    opt_base = baselines.NSO(m_base.parameters(), cls, sigma=0.05, num_perturbs=K, lam=lam,
                             use_neg=use_neg, noise_fn=philox_noise(numel), **kw)
    opt_ff = flatfused.NSO(m_ff.parameters(), cls, sigma=0.05, num_perturbs=K, lam=lam,
                           use_neg=use_neg, backend="torch", seed=SEED, **kw)
    source = reference.flatfused_noise_source(list(m_ref.parameters()), SEED)
    opt_ref = reference.NSM(m_ref.parameters(), cls, sigma=0.05, noise_source=source, **kw)
    for step in range(3):
        data = batch(step)
        opt_base.step(closure_for(m_base, data))
        opt_ff.zero_grad()
        opt_ff.step(closure_for(m_ff, data))
        reference.train_step(m_ref, opt_ref, loss_fn, data, num_perturbs=K, lam=lam,
                             use_neg=use_neg)
    assert_models_close(m_base, m_ff)
    assert_models_close(m_base, m_ref)


def test_nso_bf16_rounds_once_like_flatfused():
    m_base, m_ff = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
    numel = sum(p.numel() for p in m_base.parameters())
    opt_base = baselines.NSO(m_base.parameters(), torch.optim.SGD, sigma=0.05, lam=0.0,
                             use_neg=True, noise_fn=philox_noise(numel), lr=0.1, momentum=0.9)
    opt_ff = flatfused.NSO(m_ff.parameters(), torch.optim.SGD, sigma=0.05, lam=0.0, use_neg=True,
                           backend="torch", seed=SEED, lr=0.1, momentum=0.9)
    data = batch(0, torch.bfloat16)
    opt_base.step(closure_for(m_base, data))
    opt_ff.step(closure_for(m_ff, data))
    assert_models_close(m_base, m_ff, rtol=1e-2, atol=1e-2)


def sam_run(make_opt, steps=3):
    model = make_model()
    opt = make_opt(model)
    for step in range(steps):
        data = batch(step)
        opt.zero_grad()
        loss_fn(model, data).backward()
        opt.step(closure_for(model, data))
    return model


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_reference(base, adaptive):
    cls, kw = BASES[base]
    m_base = sam_run(lambda m: baselines.SAM(m.parameters(), cls, rho=0.1, adaptive=adaptive, **kw))
    m_ref = make_model()
    opt_ref = reference.SAM(m_ref.parameters(), cls, rho=0.1, adaptive=adaptive, **kw)
    for step in range(3):
        reference.sam_train_step(m_ref, opt_ref, loss_fn, batch(step))
    assert_models_close(m_base, m_ref)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_flatfused(adaptive):
    cls, kw = BASES["sgd"]
    m_base = sam_run(lambda m: baselines.SAM(m.parameters(), cls, rho=0.1, adaptive=adaptive, **kw))
    m_ff = sam_run(lambda m: flatfused.SAM(m.parameters(), cls, rho=0.1, adaptive=adaptive, **kw))
    assert_models_close(m_base, m_ff)


# Not RMSprop: its "alpha" collides with WSAM's group["alpha"] in the reference, which then uses
# RMSprop's 0.99 as the sharpness weight.
@pytest.mark.parametrize("base", ["sgd", "adamw", "sgd-foreach"])
@pytest.mark.parametrize("decouple,adaptive,gamma", [(True, False, 0.9), (False, False, 0.9),
                                                     (True, True, 0.8), (False, True, 0.0)])
def test_wsam_matches_reference_restore_copy(base, decouple, adaptive, gamma):
    cls, kw = BASES[base]
    m_base, m_ref = make_model(), make_model()
    opt_base = baselines.WeightedSAM(m_base.parameters(), cls, rho=0.1, gamma=gamma,
                                     adaptive=adaptive, decouple=decouple, **kw)
    opt_ref = reference.WeightedSAM(m_ref, cls(m_ref.parameters(), **kw), rho=0.1, gamma=gamma,
                                    adaptive=adaptive, decouple=decouple, restore="copy")
    for step in range(3):
        data = batch(step)
        for model, opt in ((m_base, opt_base), (m_ref, opt_ref)):
            opt.zero_grad()
            loss = opt.step(closure_for(model, data))
            assert torch.isfinite(loss)
    assert_models_close(m_base, m_ref)


def test_state_is_one_anchor_copy_plus_noise():
    model = make_model()
    numel = sum(p.numel() for p in model.parameters())
    for opt, extra in ((baselines.SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9), 0),
                       (baselines.NSO(make_model(), torch.optim.SGD, lr=0.1, momentum=0.9), 1)):
        opt.zero_grad()
        loss_fn(opt.model, batch(0)).backward()
        opt.step(closure_for(opt.model, batch(0)))
        beyond_base = sum(t.numel() for t in opt.state_tensors()) - sum(
            t.numel() for t in opt.base_state_tensors())
        assert beyond_base == numel * (1 + extra)  # A (and NSO's fp32 noise buffer)


def test_closure_error_restores_weights():
    model = make_model()
    opt = baselines.NSO(model, torch.optim.SGD, lr=0.1, lam=0.0)
    before = [p.detach().clone() for p in model.parameters()]

    def bad():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(bad)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_bad_input():
    with pytest.raises(ValueError):
        baselines.NSO(make_model(), torch.optim.SGD, sigma=-1.0, lr=0.1)
    with pytest.raises(ValueError):
        baselines.WeightedSAM(make_model(), torch.optim.SGD, gamma=1.0, lr=0.1)
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(ValueError):
        baselines.SAM(mixed, torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("decouple,adaptive", [(True, False), (False, True)])
def test_wsam_matches_flatfused(decouple, adaptive):
    cls, kw = BASES["adamw"]
    models = []
    for make in (lambda m: baselines.WeightedSAM(m.parameters(), cls, rho=0.1, gamma=0.8,
                                                 adaptive=adaptive, decouple=decouple, **kw),
                 lambda m: flatfused.WeightedSAM(m, cls(m.parameters(), **kw), rho=0.1, gamma=0.8,
                                                 adaptive=adaptive, decouple=decouple)):
        model = make_model()
        opt = make(model)
        for step in range(3):
            opt.zero_grad()
            opt.step(closure_for(model, batch(step)))
        models.append(model)
    assert_models_close(*models)
