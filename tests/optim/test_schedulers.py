"""KneeLRScheduler and SigmaScheduler: reference values, torch scheduler API, NSO integration."""
import math
import warnings

import numpy as np
import pytest
import torch

import flatfused
from flatfused.schedulers import KneeLRScheduler, SigmaScheduler, knee_lr

KNEE_EXAMPLE = [0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.075, 0.05, 0.025, 0.0, 0.0, 0.0, 0.0]


def sgd(lr=1.0, groups=1):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=lr)


def run_knee(opt, sched, n):
    """LRs seen by the optimizer for t = 1..n (step() after optimizer.step(), as torch wants)."""
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(n - 1):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_knee_reference_example_exact():
    opt = sgd()
    sched = KneeLRScheduler(opt, 0.1, warmup_steps=2, explore_steps=4, total_steps=10)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert sched.get_last_lr() == [pytest.approx(0.05, abs=1e-12)]
    lrs = run_knee(opt, sched, len(KNEE_EXAMPLE))
    assert lrs == pytest.approx(KNEE_EXAMPLE, abs=1e-12)
    assert sched.get_last_lr() == [pytest.approx(0.0, abs=1e-12)]
    assert [knee_lr(t, 0.1, 2, 4, 10) for t in range(1, 14)] == pytest.approx(KNEE_EXAMPLE, abs=1e-12)


def test_knee_no_warmup_and_per_group_peaks():
    opt = sgd(groups=2)
    sched = KneeLRScheduler(opt, [0.2, 0.4], warmup_steps=0, explore_steps=2, total_steps=4)
    seen = [sched.get_last_lr()]
    for _ in range(4):
        opt.step()
        sched.step()
        seen.append(sched.get_last_lr())
    expected = [[0.2, 0.4], [0.2, 0.4], [0.1, 0.2], [0.0, 0.0], [0.0, 0.0]]
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want, abs=1e-12)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("W,E", [(2, 3), (3, 0), (0, 4)])  # W = E = 0: refused, see below
def test_knee_total_equals_warmup_plus_explore(W, E):
    opt = sgd()
    sched = KneeLRScheduler(opt, 0.1, warmup_steps=W, explore_steps=E, total_steps=W + E)
    lrs = run_knee(opt, sched, W + E + 4)
    expected = [0.1 * t / W for t in range(1, W + 1)] + [0.1] * E + [0.0] * 4
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_knee_validation():
    with pytest.raises(ValueError):
        KneeLRScheduler(sgd(), 0.1, warmup_steps=-1, explore_steps=0, total_steps=5)
    with pytest.raises(ValueError):
        KneeLRScheduler(sgd(), 0.1, warmup_steps=0, explore_steps=-2, total_steps=5)
    with pytest.raises(ValueError):
        KneeLRScheduler(sgd(), 0.1, warmup_steps=2, explore_steps=4, total_steps=5)
    with pytest.raises(ValueError):
        KneeLRScheduler(sgd(), -0.1, warmup_steps=0, explore_steps=0, total_steps=5)
    with pytest.raises(ValueError):
        KneeLRScheduler(sgd(groups=2), [0.1], total_steps=5)
    with pytest.raises(TypeError):
        KneeLRScheduler(sgd(), 0.1, warmup_steps=1.5, total_steps=5)


def test_knee_without_total_steps_keeps_the_peak():
    """No total_steps: warmup, then peak_lr to the end (the default used to give LR 0 from the
    first step)."""
    opt = sgd()
    sched = KneeLRScheduler(opt, peak_lr=0.1)
    # knee_lr returns peak_lr itself after the warmup, and peak * t / W with the same operands
    # as here during it, so the values are exact
    assert run_knee(opt, sched, 50) == [0.1] * 50
    assert sched.get_last_lr() == [0.1] and sched.total_steps is None
    for W, E in [(3, 0), (2, 4)]:
        opt = sgd()
        sched = KneeLRScheduler(opt, 0.1, warmup_steps=W, explore_steps=E)
        expected = [0.1 * t / W for t in range(1, W + 1)] + [0.1] * (30 - W)
        assert run_knee(opt, sched, 30) == expected
        assert [knee_lr(t, 0.1, W, E, None) for t in range(1, 31)] == expected


@pytest.mark.parametrize("W,E,T", [(0, 0, 0), (0, 0, 1)])
def test_knee_refuses_a_total_that_starts_at_lr_zero(W, E, T):
    with pytest.raises(ValueError, match="LR 0 from the first step.*total_steps=None"):
        KneeLRScheduler(sgd(), 0.1, warmup_steps=W, explore_steps=E, total_steps=T)


def test_knee_no_configuration_trains_at_lr_zero_from_the_first_step():
    """Every accepted (W, E, T) gives step 1 a positive LR; T < W + E and T = 0 name None."""
    for W in range(4):
        for E in range(4):
            for T in [None] + list(range(10)):
                try:
                    opt = sgd()
                    KneeLRScheduler(opt, 0.1, warmup_steps=W, explore_steps=E, total_steps=T)
                except ValueError as e:
                    assert T is not None and (T < W + E or T <= 1), (W, E, T)
                    assert "None" in str(e)
                    continue
                assert opt.param_groups[0]["lr"] > 0, (W, E, T)


def test_knee_without_total_state_dict_and_closed_form():
    opt = sgd()
    sched = KneeLRScheduler(opt, 0.1, warmup_steps=4)
    run_knee(opt, sched, 3)  # now at t = 3
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    assert sched_state["total_steps"] is None
    rest = run_knee(opt, sched, 5)
    opt2 = sgd()
    sched2 = KneeLRScheduler(opt2, 0.1, warmup_steps=4)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert run_knee(opt2, sched2, 5) == rest == [0.1 * 3 / 4, 0.1, 0.1, 0.1, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched2.step(1)  # t = 2: back in the warmup
        assert opt2.param_groups[0]["lr"] == 0.1 * 2 / 4
        sched2.step(1000)
    assert opt2.param_groups[0]["lr"] == 0.1


def test_knee_state_dict_round_trip_mid_schedule():
    opt = sgd()
    sched = KneeLRScheduler(opt, 0.1, warmup_steps=2, explore_steps=4, total_steps=10)
    run_knee(opt, sched, 6)  # now at t = 6
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    assert "optimizer" not in sched_state
    rest = run_knee(opt, sched, 7)

    opt2 = sgd()
    sched2 = KneeLRScheduler(opt2, 0.1, warmup_steps=2, explore_steps=4, total_steps=10)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 5 and sched2.get_last_lr() == pytest.approx([0.1])
    rest2 = run_knee(opt2, sched2, 7)
    assert rest2 == rest
    assert rest == pytest.approx(KNEE_EXAMPLE[5:12], abs=1e-12)


def test_knee_closed_form_epoch_argument():
    opt = sgd()
    sched = KneeLRScheduler(opt, 0.1, warmup_steps=2, explore_steps=4, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.step(7)  # t = 8
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05, abs=1e-12)


def nso_setup(sigma=0.01, lr=1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    nso = flatfused.NSO(model.parameters(), torch.optim.SGD, sigma=sigma, lr=lr, backend="torch",
                        seed=1)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return model, nso, closure


@pytest.mark.parametrize("attach_to_base", [False, True])
def test_knee_with_nso_shared_param_groups(attach_to_base):
    model, nso, closure = nso_setup()
    target = nso.base_optimizer if attach_to_base else nso
    # t = 1: lr 0.1, t >= 2: lr 0 (T = W + E)
    sched = KneeLRScheduler(target, 0.1, warmup_steps=0, explore_steps=1, total_steps=1)
    assert nso.param_groups[0]["lr"] == nso.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    w0 = [p.detach().clone() for p in model.parameters()]
    nso.step(closure)
    w1 = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(w0, w1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # with attach_to_base the wrapper, not the base, stepped
        sched.step()
    assert nso.base_optimizer.param_groups[0]["lr"] == 0.0 and sched.get_last_lr() == [0.0]
    nso.step(closure)
    for a, b in zip(w1, model.parameters()):
        assert torch.equal(a, b.detach())  # lr 0: no move


# ------------------------------------------------------------------------------ sigma


@pytest.mark.parametrize("mode", ["linear", "exp"])
def test_sigma_schedule_values(mode):
    sigma, epochs = 0.01, 5
    if mode == "linear":
        ref = np.linspace(0, sigma, epochs)
    else:
        ref = np.exp(np.linspace(np.log(1e-5), np.log(sigma), epochs))
    nso = nso_setup()[1]
    sched = SigmaScheduler(nso, sigma, epochs, mode=mode)
    seen = [nso.param_groups[0]["sigma"]]
    for _ in range(epochs + 2):
        sched.step()
        seen.append(nso.param_groups[0]["sigma"])
    expected = list(ref) + [ref[-1]] * 3
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sched.get_last_sigma() == [seen[-1]]
    if mode == "linear":
        assert seen[0] == 0.0 and seen[-1] == sigma


def test_sigma_scheduler_with_nso_groups_and_noise():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    nso = flatfused.NSO([{"params": a.parameters()}, {"params": b.parameters(), "sigma": 0.3}],
                        torch.optim.SGD, sigma=0.05, lr=0.1, backend="torch", seed=3)
    sched = SigmaScheduler(nso, 0.02, 3, mode="linear")
    assert [g["sigma"] for g in nso.param_groups] == [0.0, 0.0]
    assert [g["sigma"] for g in nso.base_optimizer.param_groups] == [0.0, 0.0]
    params = list(a.parameters()) + list(b.parameters())
    b(torch.tanh(a(torch.randn(4, 3)))).sum().backward()
    w0 = [p.detach().clone() for p in params]
    nso.store_gradients(zero_grad=True, store_weights=True, update_weight=0.5)
    nso.first_step(zero_grad=True)  # sigma 0: no perturbation
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, w0))
    sched.step()
    sched.step()
    assert [g["sigma"] for g in nso.param_groups] == [0.02, 0.02]
    nso.first_step(zero_grad=True)
    delta = torch.cat([(p.detach() - w).flatten() for p, w in zip(params, w0)])
    assert 0.005 < delta.std().item() < 0.05


def test_sigma_scheduler_rejects_optimizer_without_sigma():
    with pytest.raises(ValueError, match="sigma"):
        SigmaScheduler(sgd(), 0.01, 5)
    nso = nso_setup()[1]
    with pytest.raises(ValueError):
        SigmaScheduler(nso, 0.01, 5, mode="cosine")
    with pytest.raises(ValueError):
        SigmaScheduler(nso, 0.0, 5, mode="exp")
    with pytest.raises(ValueError):
        SigmaScheduler(nso, 0.01, 0)


def test_sigma_scheduler_state_dict_round_trip():
    nso = nso_setup()[1]
    sched = SigmaScheduler(nso, 0.05, 10, mode="exp")
    for _ in range(4):
        sched.step()
    state = sched.state_dict()
    assert "optimizer" not in state
    rest = []
    for _ in range(8):
        sched.step()
        rest.append(nso.param_groups[0]["sigma"])

    nso2 = nso_setup()[1]
    sched2 = SigmaScheduler(nso2, 0.05, 10, mode="exp")
    sched2.load_state_dict(state)
    assert nso2.param_groups[0]["sigma"] == pytest.approx(
        math.exp(np.linspace(np.log(1e-5), np.log(0.05), 10)[4]), rel=1e-12)
    rest2 = []
    for _ in range(8):
        sched2.step()
        rest2.append(nso2.param_groups[0]["sigma"])
    assert rest2 == rest


def test_wrappers_over_an_instance_carry_its_defaults_for_schedulers():
    """OneCycleLR reads the optimizer's defaults ('momentum' or 'betas'): a wrapper built over a
    base optimizer instance has them, as one built from a class (and the references) do."""
    model = torch.nn.Linear(3, 2)
    wrappers = [flatfused.NSO(None, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)),
                flatfused.SAM(None, torch.optim.AdamW(model.parameters(), lr=0.1)),
                flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1,
                                                             momentum=0.9))]
    for opt in wrappers:
        assert opt.defaults["lr"] == 0.1
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)
        assert opt.param_groups is opt.base_optimizer.param_groups


def test_scheduler_on_the_wrapper_sees_the_two_call_step():
    """first_step/second_step never call the wrapper's step(): its fused base step still counts
    as a step for a scheduler attached to the wrapper (no 'lr_scheduler.step() before
    optimizer.step()' warning), as for one attached to the base."""
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for base in (torch.optim.SGD, torch.optim.Adagrad):  # fused, and the base's own step
        opt = flatfused.SAM(model.parameters(), base, rho=0.05, lr=1.0)
        scheduler = KneeLRScheduler(opt, 0.1, 2, 4, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.first_step(zero_grad=True)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.second_step(zero_grad=True)
                scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
