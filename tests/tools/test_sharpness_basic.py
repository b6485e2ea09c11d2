"""Keskar sharpness, noise stability and the SAM edge on problems with closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from flatfused.sharpness import (ComputeKeskarSharpness, keskar_sharpness, mean_loss,
                                 noise_stability, sam_edge)


# ----------------------------------------------------------------------------------- Keskar


def quadratic_problem(eps, delta=1e-3, seed=0):
    """A bias-free linear model whose mean training loss is L(w) = ½ Σ h_i (w_i − m_i)².

    The minimum m sits at distance delta from w0 with signs s, so the ascent from w0 moves every
    coordinate away from m and ends in the box corner w0 + s·eps·(|w0| + 1):
    L_final = ½ Σ h_i (delta + eps·(|w0_i| + 1))², L_0 = ½ Σ h_i delta².
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    d = h.numel()
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    s = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    m = w0 - s * delta
    X = torch.diag(torch.sqrt(d * h))
    y = X @ m
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0)
    loader = [(X[:3], y[:3]), (X[3:], y[3:])]  # uneven batches: the mean weights them by size

    def criterion(out, target):
        return 0.5 * F.mse_loss(out.squeeze(-1), target)

    L0 = 0.5 * (h * delta**2).sum().item()
    Lf = 0.5 * (h * (delta + eps * (w0.abs() + 1)) ** 2).sum().item()
    return model, criterion, loader, L0, Lf


@pytest.mark.parametrize("kind", ["sgd-class", "adam-class", "sgd-instance"])
def test_keskar_quadratic_reaches_box_corner(kind):
    eps = 1e-2
    model, criterion, loader, L0, Lf = quadratic_problem(eps)
    assert mean_loss(model, criterion, loader) == pytest.approx(L0, rel=1e-12)
    w_before = model.weight.detach().clone()
    if kind == "sgd-class":
        opt, lr = torch.optim.SGD, 0.5
    elif kind == "adam-class":
        opt, lr = torch.optim.Adam, 1e-2
    else:  # a training optimizer with state: its lr and momentum must come back untouched
        opt, lr = torch.optim.SGD(model.parameters(), lr=0.123, momentum=0.9), 0.5
        model.weight.grad = torch.ones_like(model.weight)
        opt.step()
        with torch.no_grad():
            model.weight.copy_(w_before)
        model.weight.grad = None
        momentum_before = opt.state[model.weight]["momentum_buffer"].clone()
    cks = ComputeKeskarSharpness(model, opt, criterion, loader, epsilon=eps, lr=lr, max_steps=60)
    sharp = cks.compute_sharpness()
    assert cks.init_loss == pytest.approx(L0, rel=1e-12)
    assert cks.final_loss == pytest.approx(Lf, rel=1e-9)
    assert sharp == pytest.approx(100 * (Lf - L0) / (1 + L0), rel=1e-9)
    assert torch.equal(model.weight.detach(), w_before)
    assert model.weight.grad is None
    if kind == "sgd-instance":
        assert opt.param_groups[0]["lr"] == 0.123
        assert torch.equal(opt.state[model.weight]["momentum_buffer"], momentum_before)


@pytest.mark.parametrize("optimizer", ["sam", "nso", "wsam"])
@pytest.mark.parametrize("pass_base", [False, True])
def test_keskar_leaves_a_flatfused_optimizer_untouched(optimizer, pass_base):
    """A flatfused wrapper (or its base) as Keskar's optimizer: the ascent uses the base
    optimizer, and afterwards the wrapper still shares the base's groups and state, the flat
    gradient views are still the model's .grad, and training continues bit-identically."""
    import flatfused

    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        kw = dict(lr=0.05, backend="cpu")
        if optimizer == "sam":
            opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, momentum=0.9, **kw)
        elif optimizer == "nso":
            opt = flatfused.NSO(model.parameters(), torch.optim.AdamW, sigma=0.01, seed=1, **kw)
        else:
            opt = flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.05,
                                                                momentum=0.9), backend="cpu")
        return model, opt

    def train(model, opt, steps):
        def closure():
            F.cross_entropy(model(x), y).backward()

        for _ in range(steps):
            opt.zero_grad()
            if optimizer == "sam":
                closure()  # SAM's step(closure) starts from the first pass's gradients
            opt.step(closure)

    model, opt = build()
    twin, twin_opt = build()
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    grads = [p.grad for p in model.parameters()]
    state = {id(p): dict(opt.state[p]) for p in model.parameters()}
    sharp = ComputeKeskarSharpness(model, opt.base_optimizer if pass_base else opt,
                                   F.cross_entropy, loader, epsilon=1e-2, lr=0.1,
                                   max_steps=3).compute_sharpness()
    assert math.isfinite(sharp) and sharp > 0
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["lr"] == 0.05
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    for p in model.parameters():
        assert opt.state[p].keys() == state[id(p)].keys()
        assert all(opt.state[p][k] is v for k, v in state[id(p)].items())
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_keskar_functional_and_zero_steps():
    eps = 1e-2
    model, criterion, loader, L0, Lf = quadratic_problem(eps, seed=1)
    value = keskar_sharpness(model, criterion, loader, epsilon=eps, steps=60, lr=0.5)
    assert value == pytest.approx(100 * (Lf - L0) / (1 + L0), rel=1e-9)
    assert keskar_sharpness(model, criterion, loader, epsilon=eps, steps=0) == 0.0
    # a one-shot iterator is read once: L_0, the ascent and L_final all see every batch
    assert keskar_sharpness(model, criterion, iter(loader), epsilon=eps, steps=60,
                            lr=0.5) == pytest.approx(value, rel=1e-12)


def test_keskar_batchnorm_eval_ascent_restores_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    model.train()
    model(x)  # non-trivial running statistics
    model[3].eval()  # a mixed-mode model: its flags must come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    seen_training = []
    hook = model.register_forward_hook(lambda mod, inp, out: seen_training.append(mod.training))
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    cks = ComputeKeskarSharpness(model, torch.optim.SGD, torch.nn.CrossEntropyLoss(), loader,
                                 epsilon=1e-2, lr=0.1, max_steps=5)  # cycles the 2 batches
    sharp = cks.compute_sharpness()
    hook.remove()
    assert math.isfinite(sharp) and sharp > 0
    assert seen_training and not any(seen_training)  # every forward, ascent included, in eval
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_keskar_validation():
    model, criterion, loader, _, _ = quadratic_problem(1e-2)
    with pytest.raises(TypeError):
        ComputeKeskarSharpness(model, "sgd", criterion, loader)
    with pytest.raises(ValueError):
        ComputeKeskarSharpness(model, torch.optim.SGD, criterion, loader, epsilon=-1.0)
    with pytest.raises(ValueError):
        ComputeKeskarSharpness(model, torch.optim.SGD, criterion, [], max_steps=3).compute_sharpness()


# ------------------------------------------------------------------------ noise stability


def linear_regression(seed=0, n=40, d=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d).double()
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1).double()

    def criterion(out, target):  # L = ½ mean (x·w + b − y)²: Hessian [X 1]ᵀ[X 1] / n
        return 0.5 * F.mse_loss(out.squeeze(-1), target)

    Xa = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    trace_h = (Xa * Xa).sum().item() / n
    return model, criterion, X, y, trace_h


def test_noise_stability_quadratic_matches_trace():
    model, criterion, X, y, trace_h = linear_regression()
    sigma = 0.05
    w = [p.detach().clone() for p in model.parameters()]
    est = noise_stability(model, criterion, (X, y), sigma, num_samples=2000, seed=7)
    expected = sigma**2 / 2 * trace_h
    assert est.stderr > 0
    assert abs(est.mean - expected) <= 4 * est.stderr, (est, expected)
    assert est.stderr < 0.2 * expected
    assert all(torch.equal(a, p.detach()) for a, p in zip(w, model.parameters()))  # bit-exact


def test_noise_stability_reproducible_and_loader_equivalent():
    model, criterion, X, y, _ = linear_regression(seed=1)
    a = noise_stability(model, criterion, (X, y), 0.1, num_samples=20, seed=3)
    b = noise_stability(model, criterion, (X, y), 0.1, num_samples=20, seed=3)
    c = noise_stability(model, criterion, (X, y), 0.1, num_samples=20, seed=4)
    assert a == b and a != c
    batches = [(X[:25], y[:25]), (X[25:], y[25:])]
    d = noise_stability(model, criterion, batches, 0.1, num_samples=20, seed=3)
    e = noise_stability(model, criterion, iter(batches), 0.1, num_samples=20, seed=3)
    assert d.mean == pytest.approx(a.mean, rel=1e-9) and d == e
    mean, stderr = noise_stability(model, criterion, (X, y), 0.0, num_samples=3)
    assert mean == 0.0 and stderr == 0.0
    with pytest.raises(ValueError):
        noise_stability(model, criterion, (X, y), -1.0)
    with pytest.raises(ValueError):
        noise_stability(model, criterion, (X, y), 0.1, num_samples=0)


# ------------------------------------------------------------------------------- SAM edge


def test_sam_edge_formula_and_limits():
    g, rho, lr = 2.0, 0.05, 0.1
    direct = (g / (2 * rho)) * (math.sqrt(1 + 8 * rho / (lr * g)) - 1)
    assert sam_edge(g, rho, lr) == pytest.approx(direct, rel=1e-12)
    assert sam_edge(g, 0.0, lr) == 2 / lr  # rho -> 0: gradient descent's edge, exactly
    assert sam_edge(0.0, 0.0, lr) == 2 / lr
    assert sam_edge(0.0, rho, lr) == 0.0  # ‖g‖ -> 0
    assert sam_edge(g, 1e-12, lr) == pytest.approx(2 / lr, rel=1e-10)  # no cancellation
    assert sam_edge(1e-30, rho, lr) == pytest.approx(0.0, abs=1e-12)
    assert sam_edge(g, rho, lr) < 2 / lr
    t = sam_edge(torch.tensor([0.0, g, g]), torch.tensor([rho, rho, 0.0]), lr)
    assert t.tolist() == pytest.approx([0.0, direct, 2 / lr], rel=1e-6)
    with pytest.raises(ValueError):
        sam_edge(g, -0.1, lr)
    with pytest.raises(ValueError):
        sam_edge(g, rho, 0.0)
    with pytest.raises(ValueError):
        sam_edge(-1.0, rho, lr)
    assert math.isnan(sam_edge(math.nan, rho, lr))  # a diverged step: logged, not raised
    with pytest.raises(ValueError):
        sam_edge(math.nan, -0.1, lr)
