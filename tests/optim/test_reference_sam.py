"""Tests of flatfused.reference: the faithful SAM / ASAM and Weighted SAM (WSAM) oracles."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from flatfused.reference import SAM, WeightedSAM, enable_running_stats, sam_train_step

DTYPE = torch.float64


def _params(dtype=DTYPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 2, 3), (5,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


# ---------------------------------------------------------------------------------- SAM / ASAM


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_matches_formula_two_groups(adaptive):
    a, b, c, d = _params()
    frozen_grad = d  # no gradient: skipped
    groups = [{"params": [a, b]}, {"params": [c, d], "rho": 0.7}]
    opt = SAM(groups, torch.optim.SGD, rho=0.2, adaptive=adaptive, lr=0.1)
    g = torch.Generator().manual_seed(1)
    for p in (a, b, c):
        p.grad = torch.randn(p.shape, generator=g, dtype=DTYPE)
    w = {p: p.detach().clone() for p in (a, b, c, d)}

    opt.first_step()

    # independently: e = rho_group * (w^2 | 1) g / (|| (|w| | 1) g || + 1e-12), one norm over both groups
    scaled = [((w[p].abs() if adaptive else 1.0) * p.grad).reshape(-1) for p in (a, b, c)]
    norm = torch.cat(scaled).norm()
    for p, rho in ((a, 0.2), (b, 0.2), (c, 0.7)):
        e = rho * (w[p] ** 2 if adaptive else 1.0) * p.grad / (norm + 1e-12)
        torch.testing.assert_close(p.detach(), w[p] + e, rtol=1e-13, atol=1e-13)
        old = opt.state[p]["old_p"]
        assert torch.equal(old, w[p]) and old.data_ptr() != p.data_ptr()
    assert torch.equal(frozen_grad.detach(), w[d]) and frozen_grad not in opt.state
    # perturbation radius: ||e|| for one rho (non-adaptive) is rho
    if not adaptive:
        e_all = torch.cat([(p.detach() - w[p]).reshape(-1) for p in (a, b)])
        g_ab = torch.cat([p.grad.reshape(-1) for p in (a, b)])
        assert e_all.norm().item() == pytest.approx(0.2 * g_ab.norm().item() / norm.item(), rel=1e-12)


def test_sam_on_a_quadratic_moves_as_hand_computed():
    # L(w) = 1/2 ||w||^2, w = (3, 4): g = (3, 4), ||g|| = 5; rho = 0.5 -> e = (0.3, 0.4);
    # g~ = w + e = (3.3, 4.4); SGD lr 0.1 -> w' = (2.67, 3.56)
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=DTYPE))
    opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)

    def closure():
        loss = 0.5 * (w**2).sum()
        loss.backward()
        return loss

    closure()
    assert opt.step(closure) is None  # the reference returns nothing
    torch.testing.assert_close(w.detach(), torch.tensor([2.67, 3.56], dtype=DTYPE), rtol=0, atol=1e-12)
    assert w.grad is not None  # step() leaves the perturbed gradient (no zero_grad at the end)
    torch.testing.assert_close(w.grad, torch.tensor([3.3, 4.4], dtype=DTYPE), rtol=0, atol=1e-12)

    # ASAM, same point: |w| g = (9, 16), norm sqrt(337); e = rho w^2 g / norm = 0.5 (27, 64) / sqrt(337)
    w2 = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=DTYPE))
    opt2 = SAM([w2], torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    (0.5 * (w2**2).sum()).backward()
    opt2.first_step(zero_grad=True)
    assert w2.grad is None  # torch's default zero_grad (set_to_none), as the reference
    e = [0.5 * 27 / math.sqrt(337), 0.5 * 64 / math.sqrt(337)]
    torch.testing.assert_close(w2.detach(), torch.tensor([3 + e[0], 4 + e[1]], dtype=DTYPE),
                               rtol=0, atol=1e-12)
    (0.5 * (w2**2).sum()).backward()
    opt2.second_step()
    expected = [3 - 0.1 * (3 + e[0]), 4 - 0.1 * (4 + e[1])]
    torch.testing.assert_close(w2.detach(), torch.tensor(expected, dtype=DTYPE), rtol=0, atol=1e-12)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the parameter values it sees when its step() runs."""

    def step(self, closure=None):
        self.seen = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _perturbed_setup(dtype=torch.float32, seed=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 4)).to(dtype)
    x, y = torch.randn(64, 16, dtype=dtype), torch.randn(64, 4, dtype=dtype)
    return model, (lambda m: ((m(x) - y) ** 2).mean())


def test_sam_second_step_restores_exactly_before_base_step():
    model, loss_fn = _perturbed_setup()
    opt = SAM(model.parameters(), RecordingSGD, rho=5.0, lr=0.1)  # large rho: w + e - e != w
    w = [p.detach().clone() for p in model.parameters()]
    loss_fn(model).backward()
    opt.first_step(zero_grad=True)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    loss_fn(model).backward()
    opt.second_step(zero_grad=True)
    for seen, q in zip(opt.base_optimizer.seen, w):
        assert torch.equal(seen, q)  # bit-exact restore (the reference re-binds p.data to old_p)


def test_sam_step_closure_equals_two_steps_and_needs_a_closure():
    m1, loss_fn = _perturbed_setup()
    m2 = copy.deepcopy(m1)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(3):
        o1.zero_grad()
        loss_fn(m1).backward()
        with torch.no_grad():  # step() turns gradients on for the closure itself
            o1.step(lambda: loss_fn(m1).backward())
        loss_fn(m2).backward()
        o2.first_step(zero_grad=True)
        loss_fn(m2).backward()
        o2.second_step(zero_grad=True)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="closure"):
        o1.step()


def test_sam_groups_defaults_and_state_dict():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = SAM([{"params": [a]}, {"params": [b], "lr": 0.5, "rho": 0.3}], torch.optim.SGD,
              rho=0.05, adaptive=True, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.3]
    assert [g["adaptive"] for g in opt.param_groups] == [True, True]
    assert opt.defaults["momentum"] == 0.9 and "nesterov" in opt.defaults  # base defaults merged
    sd = opt.state_dict()
    opt2 = SAM([{"params": [a]}, {"params": [b]}], torch.optim.SGD, rho=1.0, lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    assert [g["lr"] for g in opt2.base_optimizer.param_groups] == [0.1, 0.5]
    assert [g["rho"] for g in opt2.param_groups] == [0.05, 0.3]


# ---------------------------------------------------------------------------------- WSAM


def _sam_run(model, loss_fn, base, steps, rho, **kw):
    opt = SAM(model.parameters(), base, rho=rho, **kw)
    for _ in range(steps):
        loss_fn(model).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model).backward()
        opt.second_step(zero_grad=True)


def _wsam_run(model, loss_fn, base, steps, rho, restore, **kw):
    opt = WeightedSAM(model, base(model.parameters(), **kw), rho=rho, gamma=0.5, decouple=False,
                      restore=restore)
    assert opt.param_groups[0]["alpha"] == 1.0
    for _ in range(steps):
        loss_fn(model).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model).backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("base,kw", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
])
def test_wsam_gamma_half_not_decoupled_is_sam(base, kw):
    steps, rho = 6, 0.1
    ref, loss_fn = _perturbed_setup()
    _sam_run(ref, loss_fn, base, steps, rho, **kw)
    for restore in ("subtract", "copy"):
        model, _ = _perturbed_setup()
        _wsam_run(model, loss_fn, base, steps, rho, restore, **kw)
        for p, q in zip(model.parameters(), ref.parameters()):
            if restore == "copy":  # exact restore: bit-identical trajectories
                assert torch.equal(p, q)
            else:  # reference restore: the subtraction's rounding only
                torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def _grads(model, loss_fn, params):
    return torch.autograd.grad(loss_fn(model), params)


@pytest.mark.parametrize("max_norm", [None, 0.05])
@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_wsam_update_equals_formula(base, decouple, max_norm):
    model, loss_fn = _perturbed_setup(dtype=DTYPE)
    params = list(model.parameters())
    rho, gamma, lr = 0.2, 0.9, 0.05
    alpha = gamma / (1 - gamma)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=lr),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1)}[base]

    # independently
    w = [p.detach().clone() for p in params]
    g_raw = _grads(model, loss_fn, params)
    norm = torch.cat([g.reshape(-1) for g in g_raw]).norm()
    e = [rho * g / (norm + 1e-12) for g in g_raw]  # from the unclipped local gradient

    def clip(gs):
        if max_norm is None:
            return list(gs)
        total = torch.cat([g.reshape(-1) for g in gs]).norm()
        return [g * min(1.0, max_norm / (total.item() + 1e-6)) for g in gs]

    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    g_pert = _grads(model, loss_fn, params)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    g, gt = clip(g_raw), clip(g_pert)
    if max_norm is not None:
        assert torch.cat([x.reshape(-1) for x in g_raw]).norm() > max_norm  # clipping is active
    shadow = [torch.nn.Parameter(wi.clone()) for wi in w]
    for s, gi, gti in zip(shadow, g, gt):
        s.grad = gi.clone() if decouple else alpha * gti + (1 - alpha) * gi
    make(shadow).step()
    expected = [s.detach() - (lr * alpha * (gti - gi) if decouple else 0.0)
                for s, gi, gti in zip(shadow, g, gt)]

    opt = WeightedSAM(model, make(params), rho=rho, gamma=gamma, decouple=decouple, max_norm=max_norm,
                      restore="copy")
    loss_fn(model).backward()
    opt.first_step(zero_grad=True)
    for p, wi, ei in zip(params, w, e):
        torch.testing.assert_close(p.detach(), wi + ei, rtol=1e-12, atol=1e-12)
    for p, gi in zip(params, g):
        torch.testing.assert_close(opt.state[p]["grad"], gi, rtol=1e-10, atol=1e-12)
    loss_fn(model).backward()
    opt.second_step()
    for p, ex in zip(params, expected):
        torch.testing.assert_close(p.detach(), ex, rtol=1e-10, atol=1e-12)
    if decouple:
        for p, gi, gti in zip(params, g, gt):
            torch.testing.assert_close(opt.state[p]["sharpness"], gti - gi, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(p.grad, gi, rtol=1e-10, atol=1e-12)  # .grad = g for the base step


def test_wsam_subtract_restore_drifts_copy_does_not():
    """The documented reference defect: restoring w by (w + e) - e is not exact.

    With a large rho (|e| ~ |w|) in fp32, the subtraction leaves rounding errors of up to half an
    ulp of |w + e| per element per step. With lr = 0 the weights must not move at all: they do not
    with restore="copy", and drift with the reference's restore="subtract".
    """
    steps = 20
    drift = {}
    for restore in ("subtract", "copy"):
        model, loss_fn = _perturbed_setup()
        w = [p.detach().clone() for p in model.parameters()]
        opt = WeightedSAM(model, RecordingSGD(model.parameters(), lr=0.0), rho=5.0, restore=restore)
        for k in range(steps):
            loss_fn(model).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model).backward()
            opt.second_step(zero_grad=True)
            if k == 0:  # what the base optimizer sees after the first restore
                seen_exact = all(torch.equal(s, q) for s, q in zip(opt.base_optimizer.seen, w))
                assert seen_exact is (restore == "copy")
        drift[restore] = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), w))
    assert drift["copy"] == 0.0
    assert drift["subtract"] > 1e-7, drift  # measurable ...
    assert drift["subtract"] < steps * 5.0 * 2**-23 * 4, drift  # ... and only rounding-sized


def test_wsam_step_closure_returns_loss_equals_two_steps_and_needs_a_closure():
    m1, loss_fn = _perturbed_setup()
    m2 = copy.deepcopy(m1)
    o1 = WeightedSAM(m1, torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    o2 = WeightedSAM(m2, torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.1)

    def closure():
        loss = loss_fn(m1)
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():
            loss = o1.step(closure)
        expected_loss = loss_fn(m2)
        expected_loss.backward()
        o2.first_step(zero_grad=True)
        loss_fn(m2).backward()
        o2.second_step(zero_grad=True)
        o1.zero_grad()
        assert loss.item() == expected_loss.item()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="closure"):
        o1.step()
    with pytest.raises(RuntimeError, match="closure"):
        o1.step(None)


def test_wsam_shares_base_param_groups():
    model = torch.nn.Linear(3, 2)
    base = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1)
    opt = WeightedSAM(model, base, rho=0.3, gamma=0.8, adaptive=True)
    assert all(g is h for g, h in zip(opt.param_groups, base.param_groups))
    for g in base.param_groups:
        assert g["rho"] == 0.3 and g["alpha"] == pytest.approx(4.0) and g["adaptive"] is True
        assert g["sam_eps"] == 1e-12
    assert [g["lr"] for g in base.param_groups] == [0.1, 0.5]


# ---------------------------------------------------------------------------------- BatchNorm


class _MyBN(torch.nn.BatchNorm1d):
    """A user subclass: still a _BatchNorm."""


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)
        self.bn1 = torch.nn.BatchNorm1d(4)
        self.bn2 = torch.nn.BatchNorm2d(4, momentum=0.3)
        self.bn3 = torch.nn.BatchNorm3d(4, momentum=None)  # cumulative average
        self.bn4 = _MyBN(4, momentum=0.5)
        self.out = torch.nn.Linear(4, 1)

    def bns(self):
        return [self.bn1, self.bn2, self.bn3, self.bn4]

    def forward(self, x):
        h = self.bn1(self.fc(x))
        h = self.bn2(h[:, :, None, None]).flatten(1)
        h = self.bn3(h[:, :, None, None, None]).flatten(1)
        h = self.bn4(h)
        return self.out(torch.tanh(h))


def _running(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in model.bns()]


@pytest.mark.parametrize("which", ["sam", "wsam"])
def test_second_pass_does_not_update_bn_running_stats(which):
    torch.manual_seed(7)
    model = BNNet()
    x = torch.randn(32, 6)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    momenta = [m.momentum for m in model.bns()]

    probe = copy.deepcopy(model)
    probe(x)  # what one clean pass alone does to the running stats
    expected = _running(probe)
    probe(x)  # teeth: a second pass (even at the same weights) would move them again
    moved = _running(probe)
    for m, a, b in zip(model.bns(), expected, moved):
        if m.momentum is not None:  # (a cumulative average of the same batch twice does not move)
            assert not torch.allclose(torch.cat(a), torch.cat(b), rtol=0, atol=1e-5)

    # teeth: the same two passes without the bypass do move the stats
    unbypassed = copy.deepcopy(model)
    o = SAM(unbypassed.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    loss_fn(unbypassed, x).backward()
    o.first_step(zero_grad=True)
    loss_fn(unbypassed, x).backward()
    o.second_step(zero_grad=True)
    assert not torch.allclose(unbypassed.bn1.running_mean, expected[0][0], rtol=0, atol=1e-5)

    if which == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
        sam_train_step(model, opt, loss_fn, x)
    else:
        opt = WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
        with torch.no_grad():
            opt.step(lambda: (lambda loss: (loss.backward(), loss)[1])(loss_fn(model, x)))
    for (mean, var), (emean, evar) in zip(_running(model), expected):
        torch.testing.assert_close(mean, emean, rtol=0, atol=1e-7)
        torch.testing.assert_close(var, evar, rtol=0, atol=1e-7)
    # reference behaviour: the stats stay off after the step until switched on again
    assert all(m.momentum == 0 for m in model.bns())
    enable_running_stats(model)
    assert [m.momentum for m in model.bns()] == momenta


# ---------------------------------------------------------------------------------- arguments


def test_invalid_arguments():
    p = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Linear(2, 2)
    for rho in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            SAM([p], torch.optim.SGD, rho=rho, lr=0.1)
        with pytest.raises(ValueError, match="rho"):
            WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=rho)
    for gamma in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=gamma)
    with pytest.raises(ValueError, match="restore"):
        WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), restore="exact")
    with pytest.raises(TypeError, match="class"):
        SAM([p], torch.optim.SGD([p], lr=0.1), lr=0.1)
    with pytest.raises(TypeError, match="instance"):
        WeightedSAM(model, torch.optim.SGD, lr=0.1)
    # rho = 0 and gamma = 0 are valid: no perturbation / no sharpness term
    SAM([p], torch.optim.SGD, rho=0.0, lr=0.1)
    WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.0, gamma=0.0)
    # no gradient at all: a clear error instead of torch.stack's
    opt = SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
