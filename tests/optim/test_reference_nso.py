"""Tests of flatfused.reference: the faithful NSO oracle, its noise sources and the BN helpers."""
from __future__ import annotations

import math

import pytest
import torch

from flatfused import rng
from flatfused.reference import (
    NSM,
    NSO,
    disable_running_stats,
    enable_running_stats,
    flatfused_noise_source,
    reference_disable_running_stats,
    reference_enable_running_stats,
    train_step,
)

DTYPE = torch.float64


class ListNoise:
    """A deterministic noise source: draw k returns samples[k][(group_index, param_index)]."""

    def __init__(self, samples):
        self.samples = samples
        self.k = -1
        self.calls = []

    def new_draw(self):
        self.k += 1

    def __call__(self, p, gi, pi):
        self.calls.append((self.k, gi, pi))
        return self.samples[self.k][(gi, pi)].clone()


def _linear_loss(params, x, y):
    w, b = params
    return ((x @ w.t() + b - y) ** 2).mean()


def _grad(params, x, y):
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    return torch.autograd.grad(_linear_loss(ps, x, y), ps)


@pytest.mark.parametrize("use_neg", [False, True])
@pytest.mark.parametrize("num_perturbs", [1, 2])
def test_update_direction_matches_autograd(use_neg, num_perturbs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(DTYPE)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    lam, sigma, lr = 0.3, 0.2, 0.1
    samples = [{(0, 0): torch.randn(2, 3, dtype=DTYPE), (0, 1): torch.randn(2, dtype=DTYPE)}
               for _ in range(num_perturbs)]
    source = ListNoise(samples)
    opt = NSM(model.parameters(), torch.optim.SGD, sigma=sigma, noise_source=source, lr=lr)

    w = [model.weight.detach().clone(), model.bias.detach().clone()]
    loss = train_step(model, opt, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (x, y),
                      num_perturbs=num_perturbs, lam=lam, use_neg=use_neg)

    # independently: lam*g(w) + uw * sum_k [g(w+u_k) + g(w-u_k)]
    uw = (1 - lam) / (2 * num_perturbs) if use_neg else (1 - lam) / num_perturbs
    direction = [lam * g for g in _grad(w, x, y)]
    for k in range(num_perturbs):
        u = [sigma * samples[k][(0, 0)], sigma * samples[k][(0, 1)]]
        signs = (1, -1) if use_neg else (1,)
        for s in signs:
            g = _grad([wi + s * ui for wi, ui in zip(w, u)], x, y)
            direction = [d + uw * gi for d, gi in zip(direction, g)]
    expected = [wi - lr * d for wi, d in zip(w, direction)]

    torch.testing.assert_close(model.weight.detach(), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), expected[1], rtol=1e-12, atol=1e-12)
    assert loss == pytest.approx(float(_linear_loss(w, x, y)))
    assert source.k == num_perturbs - 1  # one new_draw per first_step(store_perturb=True)
    assert [c[0] for c in source.calls] == sorted(c[0] for c in source.calls)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


class Quadratic(torch.nn.Module):
    """L(z) = 1/2 z^T A z + b^T z over two parameters, z = (w, vec v); A SPD, ||A|| ~ 1."""

    def __init__(self, dtype=DTYPE):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(4, generator=g, dtype=dtype))
        self.v = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=dtype))
        n = 10
        m = torch.randn(n, n, generator=g, dtype=dtype) / n
        self.register_buffer("A", m @ m.t() + 0.5 * torch.eye(n, dtype=dtype))
        self.register_buffer("b", torch.randn(n, generator=g, dtype=dtype))

    def forward(self):
        z = torch.cat([self.w, self.v.reshape(-1)])
        return 0.5 * z @ self.A @ z + self.b @ z


@pytest.mark.parametrize("sigma", [0.0, 0.01, 1.0, 10.0])
@pytest.mark.parametrize("lam,num_perturbs", [(0.0, 1), (0.5, 3)])
def test_two_point_is_exact_on_quadratics(sigma, lam, num_perturbs):
    torch.manual_seed(2)
    model = Quadratic()
    ref = Quadratic()  # same init (seeded generator)
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=sigma, lr=0.05)
    gd = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        train_step(model, opt, lambda m, b: m(), None, num_perturbs=num_perturbs, lam=lam,
                   use_neg=True)
        gd.zero_grad()
        ref().backward()
        gd.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-9 * (1 + sigma**2))


def test_quadratic_one_point_is_not_gradient_descent():
    """Teeth for the test above: without the minus pass the update is not plain GD."""
    torch.manual_seed(2)
    model, ref = Quadratic(), Quadratic()
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=1.0, lr=0.05)
    train_step(model, opt, lambda m, b: m(), None, num_perturbs=1, lam=0.0, use_neg=False)
    ref().backward()
    torch.optim.SGD(ref.parameters(), lr=0.05).step()
    assert not torch.allclose(model.w.detach(), ref.w.detach(), rtol=1e-6, atol=1e-6)


def test_state_holds_three_clones_per_parameter():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    model[1].bias.requires_grad_(False)
    opt = NSM(model.parameters(), torch.optim.SGD, sigma=0.1, lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.5)
    opt.first_step(zero_grad=True, store_perturb=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(opt.state) == len(trainable) == 3
    assert model[1].bias not in opt.state
    for p in trainable:
        st = opt.state[p]
        assert set(st) == {"w0", "acc", "noise"}
        ptrs = {p.data_ptr()} | {st[k].data_ptr() for k in st}
        assert len(ptrs) == 4  # three full copies besides the parameter itself
        for k in st:
            assert st[k].shape == p.shape and st[k].device == p.device
        torch.testing.assert_close(p.detach(), st["w0"] + st["noise"])
    opt.first_step(store_perturb=False)
    for p in trainable:
        torch.testing.assert_close(p.detach(), opt.state[p]["w0"] - opt.state[p]["noise"])


def test_flatfused_noise_source_offsets_and_bases():
    torch.manual_seed(4)
    a = torch.nn.Parameter(torch.randn(3, 5))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    b = torch.nn.Parameter(torch.randn(7))
    c = torch.nn.Parameter(torch.randn(2, 2))
    groups = [{"params": [a, frozen]}, {"params": [b, c], "sigma": 1.0}]
    n = 15 + 7 + 4  # frozen excluded
    seed, sigma = 1234, 0.5
    src = flatfused_noise_source(groups, seed=seed)
    assert src.bases == {id(a): 0, id(b): 15, id(c): 22}
    assert src.total_numel == n

    opt = NSM(groups, torch.optim.SGD, sigma=sigma, noise_source=src, lr=0.1)
    trainable = [a, b, c]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.store_gradients(store_weights=True)
    w0 = torch.cat([p.detach().reshape(-1) for p in trainable])

    for k, offset in enumerate([0, math.ceil(n / 4), 2 * math.ceil(n / 4)]):
        opt.first_step(store_perturb=True)
        assert src.draw_offset == offset and src.offset == offset + math.ceil(n / 4)
        whole = rng.noise(n, seed, offset)  # the whole parameter space at once
        scale = torch.cat([torch.full((15,), sigma), torch.full((11,), 1.0)])  # group 2: sigma 1
        got = torch.cat([opt.state[p]["noise"].reshape(-1) for p in trainable])
        torch.testing.assert_close(got, scale * whole, rtol=0, atol=0)
        moved = torch.cat([p.detach().reshape(-1) for p in trainable])
        torch.testing.assert_close(moved, w0 + scale * whole)
        opt.first_step(store_perturb=False)  # the minus pass draws nothing
        assert src.offset == offset + math.ceil(n / 4)
    assert frozen not in opt.state

    # starting offset, and an unknown parameter
    src2 = flatfused_noise_source([a, b], seed=seed, offset=10)
    assert src2.new_draw() == 10 and src2.new_draw() == 10 + math.ceil(22 / 4)
    with pytest.raises(KeyError):
        src2(c)


def test_flatfused_noise_source_memory_order():
    base = torch.randn(4, 3)
    pt = torch.nn.Parameter(base.t())  # shape (3, 4), strides (1, 3): permuted but dense
    assert not pt.is_contiguous()
    mem = flatfused_noise_source([pt], seed=7)
    log = flatfused_noise_source([pt], seed=7, order="logical")
    mem.new_draw()
    log.new_draw()
    values = rng.noise(12, 7, 0)
    s_mem, s_log = mem(pt), log(pt)
    assert s_mem.stride() == pt.stride()
    # storage slot j holds value j
    torch.testing.assert_close(s_mem.as_strided((12,), (1,)), values, rtol=0, atol=0)
    torch.testing.assert_close(s_mem, values.view(4, 3).t(), rtol=0, atol=0)
    torch.testing.assert_close(s_log, values.view(3, 4), rtol=0, atol=0)


SPEC = {  # distribution: (mean, variance)
    None: (0.0, 1.0),
    "laplace": (0.0, 1.0),
    "uniform": (0.0, 1.0),
    "binomial": (2.0, 1.0),  # reference defect: Binomial(4, 0.5) is not centred
}


@pytest.mark.parametrize("flatfused_rng", [False, True])
@pytest.mark.parametrize("distribution", [None, "normal", "laplace", "uniform", "binomial", "cauchy"])
def test_distributions(distribution, flatfused_rng):
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.zeros(400, 500))
    src = flatfused_noise_source([p], seed=11, distribution=distribution) if flatfused_rng else None
    opt = NSM([p], torch.optim.SGD, sigma=1.0, distribution=distribution, noise_source=src, lr=0.1)
    p.grad = torch.zeros_like(p)
    opt.store_gradients(store_weights=True)
    opt.first_step()
    x = opt.state[p]["noise"].reshape(-1).double()
    if not flatfused_rng:
        assert opt.state[p]["noise"].dtype == torch.float32  # sampled by torch.distributions
        # ... from the global CPU generator, with the parameter's shape
        torch.manual_seed(5)
        expected = opt.distribution.sample(p.shape)
        torch.testing.assert_close(opt.state[p]["noise"], expected, rtol=0, atol=0)
    if distribution == "cauchy":  # no mean or variance: median 0, quartiles -1 and +1
        q = torch.quantile(x[:100_000], torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype))
        torch.testing.assert_close(q, torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype), atol=0.03, rtol=0)
        return
    mean, var = SPEC[None if distribution == "normal" else distribution]
    assert x.mean().item() == pytest.approx(mean, abs=0.01)
    assert x.var().item() == pytest.approx(var, abs=0.02)
    if distribution == "binomial":
        assert set(torch.unique(x).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_invalid_arguments():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError):
        NSM([p], torch.optim.SGD, distribution="gumbel", lr=0.1)
    with pytest.raises(ValueError):
        NSM([p], torch.optim.SGD, sigma=-0.1, lr=0.1)
    with pytest.raises(ValueError):
        flatfused_noise_source([p], seed=0, distribution="gumbel")
    with pytest.raises(TypeError):
        NSM([p], torch.optim.SGD([p], lr=0.1), lr=0.1)
    opt = NSM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError):
        opt.set_sigma(-1.0)
    with pytest.raises(NotImplementedError, match="flatfused.NSO.step"):
        opt.step(lambda: None)


def test_groups_sigma_state_dict_and_base_optimizer():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = NSM([{"params": [a]}, {"params": [b], "lr": 0.5}], torch.optim.SGD, sigma=0.2,
              lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["sigma"] for g in opt.param_groups] == [0.2, 0.2]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    opt.set_sigma(0.03)
    assert [g["sigma"] for g in opt.base_optimizer.param_groups] == [0.03, 0.03]

    sd = opt.state_dict()
    opt2 = NSM([{"params": [a]}, {"params": [b]}], torch.optim.SGD, sigma=1.0, lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert [g["lr"] for g in opt2.base_optimizer.param_groups] == [0.1, 0.5]
    assert [g["sigma"] for g in opt2.param_groups] == [0.03, 0.03]


def test_lam_zero_still_runs_clean_pass():
    """Reference defect kept: with lam == 0 the clean pass still runs (1 + 2K passes)."""
    calls = []
    model = torch.nn.Linear(2, 1)
    opt = NSM(model.parameters(), torch.optim.SGD, sigma=0.01, lr=0.1)

    def loss_fn(m, batch):
        calls.append(1)
        return m(batch).sum()

    train_step(model, opt, loss_fn, torch.randn(3, 2), num_perturbs=1, lam=0.0, use_neg=True)
    assert len(calls) == 3
    calls.clear()
    train_step(model, opt, loss_fn, torch.randn(3, 2), num_perturbs=2, lam=0.5, use_neg=False)
    assert len(calls) == 3


def _bn_modules():
    mods = [torch.nn.BatchNorm1d(3), torch.nn.BatchNorm2d(3, momentum=0.3),
            torch.nn.BatchNorm3d(3, momentum=None)]
    try:
        mods.append(torch.nn.SyncBatchNorm(3, momentum=0.2))
    except Exception:  # pragma: no cover - not constructible in this build
        pass
    return mods


def test_bn_helpers_cover_every_batchnorm():
    mods = _bn_modules()
    model = torch.nn.Sequential(*mods)
    before = [m.momentum for m in mods]
    disable_running_stats(model)
    assert all(m.momentum == 0 for m in mods)
    disable_running_stats(model)  # twice: the backup survives
    enable_running_stats(model)
    assert [m.momentum for m in mods] == before
    enable_running_stats(model)  # idempotent
    assert [m.momentum for m in mods] == before

    reference_disable_running_stats(model)  # the published helper: BatchNorm2d only
    assert [m.momentum == 0 for m in mods] == [isinstance(m, torch.nn.BatchNorm2d) for m in mods]
    reference_enable_running_stats(model)
    assert [m.momentum for m in mods] == before


@pytest.mark.parametrize("reference_bn", [False, True])
def test_train_step_freezes_bn_stats_in_perturbed_passes(reference_bn):
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = NSM(model.parameters(), torch.optim.SGD, sigma=0.5, lr=0.0)
    x = torch.randn(16, 4)
    # what one clean pass alone does to the running stats
    probe = torch.nn.BatchNorm1d(4)
    probe(model[0](x).detach())
    train_step(model, opt, lambda m, b: m(b).pow(2).mean(), x, num_perturbs=2, use_neg=True,
               reference_bn=reference_bn)
    same = torch.allclose(model[1].running_mean, probe.running_mean)
    # flatfused's helpers freeze BatchNorm1d; the published ones (BatchNorm2d only) do not
    assert same is (not reference_bn)
    assert model[1].momentum == 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parameters_get_cpu_sampled_noise_on_device():
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 2)).cuda()
    x = torch.randn(16, 8, device="cuda")
    for src in (None, flatfused_noise_source(model.parameters(), seed=3)):
        opt = NSM(model.parameters(), torch.optim.SGD, sigma=0.1, noise_source=src, lr=0.1)
        train_step(model, opt, lambda m, b: m(b).pow(2).mean(), x, num_perturbs=2, use_neg=True)
        for p in model.parameters():
            assert all(t.device == p.device for t in opt.state[p].values())
        if src is not None:
            got = torch.cat([opt.state[p]["noise"].reshape(-1) for p in model.parameters()])
            n = src.total_numel
            torch.testing.assert_close(got.cpu(), 0.1 * rng.noise(n, 3, rng.counters_per_draw(n)),
                                       rtol=0, atol=0)
