"""Hessian tools against exact Hessians: linear regression (closed form) and a small MLP
(torch.autograd.functional.hessian on the flattened parameters), in float64 on the CPU."""
import math
import sys

import pytest
import torch
from torch.func import functional_call

from flatfused.sharpness.hessian import (density_on_grid, hessian, hessian_trace, hvp,
                                         matrix_weights, spectral_density, top_eigenvalues)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_hessian(model, criterion, inputs, targets, names=None):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if names is not None:
        named = [(n, p) for n, p in named if n in names]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(w):
        params, i = {}, 0
        for n, p in named:
            params[n] = w[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return criterion(functional_call(model, params, (inputs,)), targets)

    return torch.autograd.functional.hessian(loss, flat)


def flat(v):
    return torch.cat([t.reshape(-1) for t in v])


def unflat(x, model):
    out, i = [], 0
    for p in model.parameters():
        out.append(x[i:i + p.numel()].view(p.shape).clone())
        i += p.numel()
    return out


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture(scope="module")
def mlp():
    """A 212-parameter MLP trained a little (so the Hessian is mostly positive), its data and
    its exact Hessian."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP().to(DT)
    x = torch.randn(64, 8, dtype=DT, generator=g)
    y = torch.randn(64, 4, dtype=DT, generator=g)
    crit = torch.nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(300):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    h = exact_hessian(model, crit, x, y)
    torch.set_num_threads(n)
    return model, crit, x, y, h


def regression(s, n=200, seed=0):
    """Linear regression (no bias) whose Hessian 2 X^T X / n has eigenvalues 2 s^2 / n."""
    d = len(s)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, d, dtype=DT, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=g))
    x = u @ torch.diag(torch.as_tensor(s, dtype=DT)) @ v.T
    y = torch.randn(n, 1, dtype=DT, generator=g)
    model = torch.nn.Linear(d, 1, bias=False).to(DT)
    return model, torch.nn.MSELoss(), x, y


# ---------------------------------------------------------------------------------------------
# Hessian-vector products
# ---------------------------------------------------------------------------------------------

def test_linear_regression_hvp_matches_closed_form():
    model, crit, x, y = regression(torch.linspace(1, 5, 12))
    h = 2 * x.T @ x / x.shape[0]
    assert torch.allclose(exact_hessian(model, crit, x, y), h, atol=1e-12)
    v = torch.randn(12, dtype=DT)
    hv = hvp(model, crit, (x, y), [v.view(1, 12)])
    assert torch.allclose(flat(hv), h @ v, atol=1e-12)
    assert hessian_trace(model, crit, (x, y), num_probes=36, method="hutch++") == \
        pytest.approx(float(h.trace()), rel=1e-10)


def test_hvp_matches_exact_and_several_vectors(mlp):
    model, crit, x, y, h = mlp
    vs = [torch.randn(h.shape[0], dtype=DT) for _ in range(3)]
    out = hvp(model, crit, (x, y), [unflat(v, model) for v in vs])
    assert len(out) == 3
    for v, hv in zip(vs, out):
        assert [t.shape for t in hv] == [p.shape for p in model.parameters()]
        torch.testing.assert_close(flat(hv), h @ v, rtol=1e-10, atol=1e-12)


def test_finite_difference_hvp_agrees_and_restores(mlp):
    model, crit, x, y, h = mlp
    before = [p.detach().clone() for p in model.parameters()]
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s
    v = unflat(torch.randn(h.shape[0], dtype=DT), model)
    ad = hvp(model, crit, (x, y), v)
    fd = hvp(model, crit, (x, y), v, method="finite_difference", fd_eps=1e-4)
    torch.testing.assert_close(flat(fd), flat(ad), rtol=1e-3, atol=1e-6)
    for p, b, s in zip(model.parameters(), before, sentinel):
        assert torch.equal(p.detach(), b)  # weights restored bit for bit
        assert p.grad is s  # .grad restored
    for p in model.parameters():
        p.grad = None
    # and through a dataloader, and driving the trace
    loader = [(x[:40], y[:40]), (x[40:], y[40:])]
    fd2 = hvp(model, crit, loader, v, method="finite_difference", fd_eps=1e-4)
    torch.testing.assert_close(flat(fd2), flat(ad), rtol=1e-3, atol=1e-6)
    t_fd = hessian_trace(model, crit, (x, y), num_probes=5, hvp_method="finite_difference",
                         fd_eps=1e-5)
    t_ad = hessian_trace(model, crit, (x, y), num_probes=5)
    assert t_fd == pytest.approx(t_ad, rel=1e-4)


class _OnceTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (like some fused/sharded kernels)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _OnceMLP(MLP):
    def forward(self, x):
        return self.fc2(_OnceTanh.apply(self.fc1(x)))


def test_finite_difference_without_double_backward(mlp):
    model, crit, x, y, h = mlp
    once = _OnceMLP().to(DT)
    once.load_state_dict(model.state_dict())
    v = unflat(torch.randn(h.shape[0], dtype=DT), model)
    # (double backward through a once_differentiable backward is not supported: depending on
    # the torch version it raises or silently drops the second-order path)
    fd = hvp(once, crit, (x, y), v, method="finite_difference", fd_eps=1e-4)
    torch.testing.assert_close(flat(fd), h @ flat(v), rtol=1e-3, atol=1e-6)
    # a filtered parameter set: the other parameters' existing .grad is left untouched
    g = torch.ones_like(once.fc1.bias)
    once.fc1.bias.grad = g
    keep = lambda name, p: name.startswith("fc2")  # noqa: E731
    ones = [torch.ones_like(once.fc2.weight), torch.ones_like(once.fc2.bias)]
    sub = hvp(once, crit, (x, y), ones, method="finite_difference", fd_eps=1e-4,
              param_filter=keep)
    assert [t.shape for t in sub] == [once.fc2.weight.shape, once.fc2.bias.shape]
    assert once.fc1.bias.grad is g and torch.equal(g, torch.ones_like(g))
    assert once.fc2.weight.grad is None


def test_dataloader_matches_full_batch(mlp):
    model, crit, x, y, h = mlp
    v = unflat(torch.randn(h.shape[0], dtype=DT), model)
    full = hvp(model, crit, (x, y), v)
    loader = [(x[:30], y[:30]), (x[30:60], y[30:60]), (x[60:], y[60:])]  # uneven: 30, 30, 4
    torch.testing.assert_close(flat(hvp(model, crit, loader, v)), flat(full), rtol=1e-10,
                               atol=1e-12)
    ds = torch.utils.data.TensorDataset(x, y)
    dl = torch.utils.data.DataLoader(ds, batch_size=9)  # last batch of 1
    torch.testing.assert_close(flat(hvp(model, crit, dl, v)), flat(full), rtol=1e-10, atol=1e-12)
    a = hessian_trace(model, crit, dl, num_probes=4, seed=3)
    b = hessian_trace(model, crit, (x, y), num_probes=4, seed=3)
    assert a == pytest.approx(b, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------------

def test_hutchinson_trace_within_two_percent(mlp):
    model, crit, x, y, h = mlp
    est = hessian_trace(model, crit, (x, y), num_probes=1500, seed=0)
    assert est == pytest.approx(float(h.trace()), rel=0.02)


def test_per_layer_traces_sum_and_match_diagonal_blocks(mlp):
    model, crit, x, y, h = mlp
    d = h.shape[0]
    blocks, i = {}, 0
    for name, p in model.named_parameters():
        blocks[name] = float(h[i:i + p.numel(), i:i + p.numel()].trace())
        i += p.numel()
    for method, probes, rel in (("hutchinson", 300, 0.25), ("hutch++", 3 * d, 1e-8)):
        total, per = hessian_trace(model, crit, (x, y), num_probes=probes, method=method,
                                   per_layer=True, seed=1)
        assert list(per) == [n for n, _ in model.named_parameters()]
        assert sum(per.values()) == pytest.approx(total, rel=1e-12, abs=1e-12)
        for name in per:
            assert per[name] == pytest.approx(blocks[name], rel=rel, abs=rel * 0.1), (method, name)
    # Hutch++ with fewer probes than dimensions: still sums exactly
    total, per = hessian_trace(model, crit, (x, y), num_probes=31, method="hutch++",
                               per_layer=True, seed=2)
    assert sum(per.values()) == pytest.approx(total, rel=1e-12)


def test_param_filter_restricts_to_sub_block(mlp):
    model, crit, x, y, h = mlp
    names = [n for n, p in model.named_parameters() if matrix_weights(n, p)]
    assert names == ["fc1.weight", "fc2.weight"]
    sub = exact_hessian(model, crit, x, y, names=set(names))
    dsub = sub.shape[0]
    total, per = hessian_trace(model, crit, (x, y), num_probes=3 * dsub, method="hutch++",
                               param_filter=matrix_weights, per_layer=True)
    assert list(per) == names
    assert total == pytest.approx(float(sub.trace()), rel=1e-8)
    top = top_eigenvalues(model, crit, (x, y), k=1, method="lanczos", iters=dsub,
                          param_filter=matrix_weights)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(sub).abs().max()), rel=1e-6)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    s = 10.0 * 0.75 ** torch.arange(60, dtype=DT)
    model, crit, x, y = regression(s)
    exact = float((2 * s ** 2 / x.shape[0]).sum())
    err = {"hutchinson": 0.0, "hutch++": 0.0}
    for seed in range(8):
        for method in err:
            est = hessian_trace(model, crit, (x, y), num_probes=30, method=method, seed=seed)
            err[method] += abs(est - exact) / exact / 8
    assert err["hutch++"] < 0.2 * err["hutchinson"], err


def test_trace_is_deterministic_given_seed(mlp):
    model, crit, x, y, h = mlp
    a = hessian_trace(model, crit, (x, y), num_probes=7, seed=11)
    b = hessian_trace(model, crit, (x, y), num_probes=7, seed=11)
    c = hessian_trace(model, crit, (x, y), num_probes=7, seed=12)
    assert a == b and a != c


# ---------------------------------------------------------------------------------------------
# eigenvalues and density
# ---------------------------------------------------------------------------------------------

def _top3(h):
    ev = torch.linalg.eigvalsh(h)
    return ev[torch.argsort(ev.abs(), descending=True)[:3]].tolist()


def test_top_eigenvalues_power_and_lanczos(mlp):
    model, crit, x, y, h = mlp
    exact = _top3(h)
    power, pvecs = top_eigenvalues(model, crit, (x, y), k=3, method="power", iters=1500,
                                   tol=1e-10, return_eigenvectors=True)
    lanczos, lvecs = top_eigenvalues(model, crit, (x, y), k=3, method="lanczos", iters=80,
                                     return_eigenvectors=True)
    for got in (power, lanczos):
        for g, e in zip(got, exact):
            assert g == pytest.approx(e, rel=1e-3)
    for lam, vec in zip(lanczos, lvecs):
        v = flat(vec)
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-9)
        assert float((h @ v - lam * v).norm()) < 1e-4 * abs(lam)
    assert top_eigenvalues(model, crit, (x, y), k=2, method="lanczos", iters=40, seed=5) == \
        top_eigenvalues(model, crit, (x, y), k=2, method="lanczos", iters=40, seed=5)


def test_density_weights_and_mean(mlp):
    model, crit, x, y, h = mlp
    d = h.shape[0]
    n_v = 40
    nodes, weights = spectral_density(model, crit, (x, y), iters=30, n_v=n_v, seed=0)
    assert len(nodes) == len(weights) == n_v
    for n, w in zip(nodes, weights):
        assert len(n) == len(w) <= 30
        assert sum(w) == pytest.approx(1.0, abs=1e-10)
        assert min(w) >= 0
    mean = sum(sum(a * b for a, b in zip(n, w)) for n, w in zip(nodes, weights)) / n_v
    # each run's mean is z^T H z / d for a Rademacher z: a Hutchinson estimate of trace / d
    sd = math.sqrt(2 * float((h ** 2).sum() - (h.diag() ** 2).sum())) / d / math.sqrt(n_v)
    assert abs(mean - float(h.trace()) / d) < 4 * sd
    # the extreme Ritz values converge to the extreme eigenvalues
    ev = torch.linalg.eigvalsh(h)
    assert max(nodes[0]) == pytest.approx(float(ev[-1]), rel=1e-6)
    grid, dens = density_on_grid(nodes, weights, num_bins=4000, sigma=0.02)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-2)


# density_on_grid: PyHessian's density_generate (its density_plot.py), the kernel scaled to the
# spectrum. Its default kernel is sqrt(1e-5) of the grid's range R and the default margin pads
# the grid by 0.01 of the nodes' spread s (R = 1.02 s): z = 0.01 / (sqrt(1e-5) * 1.02) ~ 3.1
# standard deviations between the outermost nodes and the grid's ends.
DENSITY_EDGE_Z = 0.01 / (math.sqrt(1e-5) * 1.02)


def _slq_like(n_v, k, lo, hi, seed):
    """Random SLQ-shaped output: n_v runs of k nodes in [lo, hi], each run's weights summing
    to 1."""
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_v):
        nodes.append((lo + (hi - lo) * torch.rand(k, dtype=DT, generator=g)).tolist())
        w = torch.rand(k, dtype=DT, generator=g)
        weights.append((w / w.sum()).tolist())
    return nodes, weights


DENSITY_CASES = {
    "one run": _slq_like(1, 20, 0.0, 1.0, 0),
    "many runs": _slq_like(100, 30, -0.5, 40.0, 1),
    "spread 1e-3": _slq_like(3, 10, 5.0, 5.001, 2),
    "spread 1e4": _slq_like(3, 10, 0.0, 1e4, 3),
    "negative": _slq_like(2, 15, -7.0, -2.0, 4),
    "one node": ([[2.5]], [[1.0]]),
    "one node, zero": ([[0.0, 0.0]], [[0.3, 0.7]]),
    "coincident runs": ([[3.0], [3.0]], [[1.0], [1.0]]),
}


@pytest.mark.parametrize("case", list(DENSITY_CASES))
def test_density_on_grid_integrates_to_one_by_default(case):
    nodes, weights = DENSITY_CASES[case]
    grid, dens = density_on_grid(nodes, weights)
    assert grid.shape == dens.shape == (10000,)
    assert bool((grid[1:] > grid[:-1]).all())  # a grid, not a few float64 values repeated
    assert bool((dens >= 0).all())
    # The density is divided by this same trapezoid sum, so only rounding remains: sums of
    # 10^4 non-negative float64 terms, each within 10^4 * 2^-53 ~ 1e-12 relative.
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-10)
    flat_nodes = [x for n in nodes for x in n]
    assert min(flat_nodes) > float(grid[0]) and max(flat_nodes) < float(grid[-1])
    if len(set(flat_nodes)) == 1:  # one spike, centred on its node
        peak = float(grid[int(dens.argmax())])
        # within half a bin, plus the rounding of linspace's values: a few ulps of the node
        slack = 4 * math.ulp(max(abs(flat_nodes[0]), float(grid[-1] - grid[0])))
        assert abs(peak - flat_nodes[0]) <= float(grid[1] - grid[0]) / 2 + slack
    # no margin: half of each end spike lies past the grid, and the normalisation puts it back
    grid, dens = density_on_grid(nodes, weights, margin=0.0)
    assert bool((grid[1:] > grid[:-1]).all())
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (5.0, 5.001), (0.0, 1e4), (-7.0, -2.0),
                                   (-300.0, 40.0)])
def test_density_on_grid_puts_each_spike_s_weight_under_it(lo, hi):
    """Isolated eigenvalues show as spikes carrying their weight: none falls between grid points
    (missed) or is counted twice."""
    g = torch.Generator().manual_seed(7)
    slots = 25  # nodes on a lattice of 25 points: neighbours at least (hi - lo) / 24 apart
    positions = [lo + (hi - lo) * i / (slots - 1) for i in range(slots)]
    n_v = 3
    nodes, weights = [], []
    mass = [0.0] * slots
    for _ in range(n_v):
        picked = sorted(torch.randperm(slots, generator=g)[:8].tolist())
        picked = sorted(set(picked) | {0, slots - 1})  # the lattice's ends fix the grid
        w = torch.rand(len(picked), dtype=DT, generator=g)
        w = (w / w.sum()).tolist()
        nodes.append([positions[i] for i in picked])
        weights.append(w)
        for i, wi in zip(picked, w):
            mass[i] += wi / n_v
    grid, dens = density_on_grid(nodes, weights)
    cum = torch.cat([torch.zeros(1, dtype=DT), torch.cumulative_trapezoid(dens, grid)])
    # windows between neighbouring lattice points, cut at the grid point nearest each midpoint
    cuts = [0] + [int(torch.searchsorted(grid, (a + b) / 2)) for a, b in
                  zip(positions, positions[1:])] + [len(grid) - 1]
    got = [float(cum[b] - cum[a]) for a, b in zip(cuts, cuts[1:])]
    # A window's edge lies (hi - lo) / 48 ~ 6.4 standard deviations from its node: what leaks
    # across is below 1e-9. The tails of the two end nodes past the grid's ends, a fraction
    # 1 - Phi(DENSITY_EDGE_Z) of their weight, are lost and the normalisation scales every
    # window up by as much again: each window is within twice that fraction of its weight.
    tail = 0.5 * math.erfc(DENSITY_EDGE_Z / math.sqrt(2))
    for i in range(slots):
        assert got[i] == pytest.approx(mass[i], rel=2 * tail, abs=1e-9), i


def _pyhessian_density_generate(eigenvalues, weights, grids):
    """PyHessian's density_generate (density_plot.py) on the given grid, as written there:
    variance sigma_squared * max(1, lambda_max - lambda_min), a mean over the runs, then a
    division by the rectangle sum (returned alongside, to renormalise)."""
    import numpy as np
    eigenvalues, weights = np.array(eigenvalues), np.array(weights)
    lambda_max = np.mean(np.max(eigenvalues, axis=1), axis=0) + 0.01
    lambda_min = np.mean(np.min(eigenvalues, axis=1), axis=0) - 0.01
    sigma = 1e-5 * max(1, (lambda_max - lambda_min))
    out = np.zeros((eigenvalues.shape[0], len(grids)))
    for i in range(eigenvalues.shape[0]):
        for j, x in enumerate(grids):
            g = np.exp(-(x - eigenvalues[i, :]) ** 2 / (2.0 * sigma)) / np.sqrt(2 * np.pi * sigma)
            out[i, j] = np.sum(g * weights[i, :])
    density = np.mean(out, axis=0)
    return density / (np.sum(density) * (grids[1] - grids[0])), (lambda_min, lambda_max, sigma)


def test_density_on_grid_follows_pyhessian():
    """With its nodes spread over exactly 1, flatfused's grid is PyHessian's ([min - 0.01,
    max + 0.01]); given PyHessian's variance, flatfused's density is PyHessian's up to the
    normalisation (PyHessian: a rectangle sum, flatfused: the trapezoid rule). The default
    kernel is sqrt(1e-5) times the grid's range, at least 3 bins on a coarse grid."""
    import numpy as np
    nodes, weights = _slq_like(2, 12, 0.5, 1.5, 5)
    for n in nodes:  # both runs reach 0.5 and 1.5, so PyHessian's means of the ends are these
        n[0], n[1] = 0.5, 1.5
    grid, dens = density_on_grid(nodes, weights, sigma=math.sqrt(1e-5 * 1.02))
    ref, (lam_lo, lam_hi, variance) = _pyhessian_density_generate(nodes, weights, grid.numpy())
    assert variance == pytest.approx(1e-5 * 1.02, rel=1e-14)
    # the two linspaces round differently, by a few ulps of the grid's values (~1e-16)
    np.testing.assert_allclose(grid.numpy(), np.linspace(lam_lo, lam_hi, 10000), rtol=0,
                               atol=1e-15)
    ref = torch.from_numpy(ref)
    ref = ref / torch.trapezoid(ref, grid)
    # The same sums of Gaussians written differently: exponents up to ~745 (below that exp
    # underflows) carry a rounding of a few ulps, ~1e-13 relative in each term, and the sums
    # and the normalisations add 10^4 * 2^-53 ~ 1e-12; subnormal results only hold ~1e-308.
    torch.testing.assert_close(dens, ref, rtol=1e-10, atol=1e-300)

    for num_bins in (10000, 2000, 50):  # 50: three bins are wider than sqrt(1e-5) * range
        grid, dens = density_on_grid(nodes, weights, num_bins=num_bins)
        width = float(grid[-1] - grid[0])
        sigma = max(math.sqrt(1e-5) * width, 3 * width / (num_bins - 1))
        _, expected = density_on_grid(nodes, weights, num_bins=num_bins, sigma=sigma)
        torch.testing.assert_close(dens, expected, rtol=1e-12, atol=0)


def test_density_on_grid_refuses_a_kernel_narrower_than_the_grid():
    nodes, weights = [[0.0, 1.0]], [[0.5, 0.5]]
    spacing = 1.02 / 999  # 1000 bins over [-0.01, 1.01]
    with pytest.raises(ValueError, match=r"narrower than the grid spacing.*num_bins >= 10201"):
        density_on_grid(nodes, weights, num_bins=1000, sigma=1e-4)
    grid, dens = density_on_grid(nodes, weights, num_bins=10201, sigma=1e-4)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-10)
    # one spacing is still resolved (the sampled Gaussians sum to its integral within
    # 2 exp(-2 pi^2) ~ 5e-9, Poisson summation): both spikes keep their halves
    grid, dens = density_on_grid(nodes, weights, num_bins=1000, sigma=spacing * (1 + 1e-9))
    half = int(torch.searchsorted(grid, 0.5))
    assert float(torch.trapezoid(dens[:half], grid[:half])) == pytest.approx(0.5, abs=1e-6)
    for bad in (dict(sigma=0.0), dict(sigma=float("nan")), dict(num_bins=1),
                dict(num_bins=10.0), dict(margin=-0.1)):
        with pytest.raises(ValueError):
            density_on_grid(nodes, weights, **bad)
    for n, w in (([[0.0, 1.0]], [[0.5]]), ([[0.0], [1.0]], [[1.0]]), ([], []), ([[]], [[]]),
                 ([[float("nan")]], [[1.0]]), ([[0.0, 1.0]], [[-0.5, 1.5]]),
                 ([[0.0, 1.0]], [[0.0, 0.0]])):
        with pytest.raises(ValueError):
            density_on_grid(n, w)


# ---------------------------------------------------------------------------------------------
# the PyHessian-compatible class
# ---------------------------------------------------------------------------------------------

def test_pyhessian_class_api(mlp):
    model, crit, x, y, h = mlp
    model.train()
    hc = hessian(model, crit, data=(x, y), cuda=True)  # cuda=True on a CPU model: model's device
    assert not model.training
    assert hc.device == torch.device("cpu")
    vals, vecs = hc.eigenvalues(maxIter=200, tol=1e-6, top_n=2)
    assert isinstance(vals, list) and len(vals) == 2 and all(isinstance(v, float) for v in vals)
    assert len(vecs) == 2
    for vec in vecs:
        assert [t.shape for t in vec] == [p.shape for p in model.parameters()]
    assert vals[0] == pytest.approx(_top3(h)[0], rel=1e-3)
    tr = hc.trace(maxIter=50, tol=1e-3)
    assert isinstance(tr, list) and 1 <= len(tr) <= 50 and all(isinstance(t, float) for t in tr)
    nodes, weights = hc.density(iter=20, n_v=2)
    assert len(nodes) == len(weights) == 2
    assert all(len(n) == len(w) == 20 for n, w in zip(nodes, weights))
    per = hc.trace_per_layer(maxIter=10)
    assert list(per) == [n for n, _ in model.named_parameters()]
    ev, hv = hc.dataloader_hv_product(vecs[0])
    assert ev == pytest.approx(vals[0], rel=1e-3)


def test_pyhessian_class_dataloader_and_seed(mlp):
    model, crit, x, y, h = mlp
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    a = hessian(model, crit, dataloader=dl, seed=4)
    b = hessian(model, crit, data=(x, y), seed=4)
    assert a.full_dataset and not b.full_dataset
    ta, tb = a.trace(maxIter=5, tol=0.0), b.trace(maxIter=5, tol=0.0)
    assert len(ta) == 5
    assert ta == pytest.approx(tb, rel=1e-10)
    with pytest.raises(ValueError):
        hessian(model, crit, data=(x, y), dataloader=dl)
    with pytest.raises(ValueError):
        hessian(model, crit)


def test_functions_restore_train_mode_and_progress_fallback(mlp, capsys, monkeypatch):
    model, crit, x, y, h = mlp
    model.train()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # force the stderr fallback
    hessian_trace(model, crit, (x, y), num_probes=3, progress=True)
    assert model.training
    assert "hessian trace: 3/3" in capsys.readouterr().err
    model.eval()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_any_device_same_probes(mlp, device):
    """Data on the CPU go to the model's device (cuda=True included); a seed draws the same
    probes on every device, so results agree across devices."""
    model, crit, x, y, h = mlp
    m = MLP().to(DT)
    m.load_state_dict(model.state_dict())
    m.to(device)
    hc = hessian(m, crit, data=(x, y), cuda=True, seed=0)
    assert hc.device.type == device
    ref = hessian(model, crit, data=(x, y), seed=0)
    assert hc.trace(maxIter=4, tol=0.0) == pytest.approx(ref.trace(maxIter=4, tol=0.0), rel=1e-9)
    a = hessian_trace(m, crit, (x, y), num_probes=6, method="hutch++", seed=1)
    b = hessian_trace(model, crit, (x, y), num_probes=6, method="hutch++", seed=1)
    assert a == pytest.approx(b, rel=1e-9)
    vals = top_eigenvalues(m, crit, (x, y), k=2, method="lanczos", iters=60)
    assert vals == pytest.approx(_top3(h)[:2], rel=1e-6)


def test_eval_mode_makes_dropout_and_batchnorm_deterministic():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.BatchNorm1d(10), torch.nn.Tanh(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(10, 3)).to(DT)
    x, y = torch.randn(32, 6, dtype=DT), torch.randint(0, 3, (32,))
    crit = torch.nn.CrossEntropyLoss()
    running = model[1].running_mean.clone()
    v = [torch.randn_like(p) for p in model.parameters()]
    a, b = hvp(model, crit, (x, y), v), hvp(model, crit, (x, y), v)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert model.training and torch.equal(model[1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())


def test_pyhessian_class_shapes_at_the_edges():
    """PyHessian-shaped results where Lanczos stops early (iter above the parameter count): the
    density lists stay rectangular, padded with zero-weight nodes; too many eigenvalues, a
    one-shot iterator and a malformed batch get clear answers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    crit = torch.nn.functional.cross_entropy
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    dim = sum(p.numel() for p in model.parameters())  # 26
    hc = hessian(model, crit, data=(x, y), seed=0)
    nodes, weights = hc.density(iter=dim + 10, n_v=3)
    assert [len(n) for n in nodes] == [len(w) for w in weights] == [dim + 10] * 3
    for n, w in zip(nodes, weights):
        assert sum(w) == pytest.approx(1.0, abs=1e-9)
        assert min(n) >= -1e6 and max(n) <= 1e6  # padding repeats real nodes
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        hc.eigenvalues(top_n=dim + 1)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    from_list = hessian(model, crit, dataloader=batches, seed=1).trace(maxIter=3, tol=0.0)
    from_iter = hessian(model, crit, dataloader=iter(batches), seed=1).trace(maxIter=3, tol=0.0)
    assert from_iter == pytest.approx(from_list, rel=1e-12)
    for bad in (x, (x,)):
        with pytest.raises(ValueError, match=r"an \(inputs, targets\) pair"):
            hessian_trace(model, crit, bad, num_probes=2)
