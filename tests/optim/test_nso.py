"""flatfused.NSO against the faithful reference (same noise), its own two APIs, and bad input."""
import copy
import io
import math
import warnings

import pytest
import torch

import flatfused
from flatfused import reference
from cases import CPU_BACKENDS as BACKENDS
from cases import NSO_BASES as BASES
from cases import Net, batch, loss_fn, make_model


def groups_of(model, sigma2=0.02):
    return [
        {"params": [model.fc1.weight, model.empty, model.fc1.bias, model.frozen]},
        {"params": [model.fc2.weight, model.fc2.bias, model.proj], "lr": 0.03, "sigma": sigma2},
    ]


def pair(base="sgd", sigma=0.05, distribution=None, seed=11, backend="torch", **schedule):
    """A reference NSM and a flatfused NSO on identical models, fed identical noise."""
    cls, kwargs = BASES[base]
    ref_model, model = make_model(), make_model()
    ref_groups = groups_of(ref_model)
    source = reference.flatfused_noise_source(ref_groups, seed, distribution=distribution)
    ref = reference.NSM(ref_groups, cls, sigma=sigma, distribution=distribution,
                        noise_source=source, **kwargs)
    ours = flatfused.NSO(groups_of(model), cls, sigma=sigma, distribution=distribution,
                         seed=seed, backend=backend, **schedule, **kwargs)
    return ref_model, ref, model, ours


def assert_same_weights(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, msg=name, **(tol or dict(rtol=2e-5, atol=2e-6)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw", "adam", "rmsprop"])
@pytest.mark.parametrize("K,lam,use_neg", [(1, 0.0, True), (2, 0.5, False), (2, 0.3, True)])
def test_three_call_api_matches_reference(backend, base, K, lam, use_neg, three_call_mode):
    ref_model, ref, model, ours = pair(base, backend=backend)
    for step in range(4):
        data = batch(step)
        reference.train_step(ref_model, ref, loss_fn, data, K, lam, use_neg)
        reference.train_step(model, ours, loss_fn, data, K, lam, use_neg)
        assert_same_weights(ref_model, model)
    assert model.frozen.equal(ref_model.frozen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("K,lam,use_neg", [(1, 0.0, True), (2, 0.5, False), (3, 0.25, True),
                                           (1, 1.0, True)])
def test_step_closure_matches_reference(backend, base, K, lam, use_neg):
    ref_model, ref, model, ours = pair(base, backend=backend, num_perturbs=K, lam=lam,
                                       use_neg=use_neg)
    for step in range(4):
        data = batch(step)
        reference.train_step(ref_model, ref, loss_fn, data, K, lam, use_neg)

        def closure():
            ours.zero_grad()
            loss = loss_fn(model, data)
            loss.backward()
            return loss

        ours.step(closure)
        assert_same_weights(ref_model, model)
    assert ours.state_dict()["flatfused"]["next_offset"] == ours._next_offset


@pytest.mark.parametrize("distribution", ["laplace", "uniform", "binomial", "cauchy"])
def test_distributions_match_reference(distribution):
    ref_model, ref, model, ours = pair("sgd", sigma=0.01, distribution=distribution,
                                       backend=BACKENDS[-1])
    for step in range(2):
        reference.train_step(ref_model, ref, loss_fn, batch(step), 1, 0.0, True)
        reference.train_step(model, ours, loss_fn, batch(step), 1, 0.0, True)
    assert_same_weights(ref_model, model, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("sigma", [0.0, 0.01, 1.0, 10.0])
def test_two_point_estimate_is_exact_on_a_quadratic(backend, K, sigma):
    """With use_neg, 1/2 [g(w+u) + g(w-u)] = g(w) for a quadratic: NSO is gradient descent."""
    torch.manual_seed(0)
    n = 37
    a = torch.randn(n, n)
    hess = a @ a.t() / n + torch.eye(n)
    b = torch.randn(n)
    w = torch.nn.Parameter(torch.randn(n))
    w_gd = w.detach().clone()
    opt = flatfused.NSO([w], torch.optim.SGD, sigma=sigma, lr=0.05, num_perturbs=K, lam=0.0,
                        use_neg=True, backend=backend)

    def closure():
        loss = 0.5 * w @ hess @ w + b @ w
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
        w_gd -= 0.05 * (hess @ w_gd + b)
    torch.testing.assert_close(w.detach(), w_gd, rtol=1e-4, atol=1e-4 * max(1.0, sigma))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_step_closure_equals_three_call_api(backend, lam, three_call_mode):
    _, _, model_a, opt_a = pair("sgd", backend=backend, num_perturbs=2, lam=lam, use_neg=True)
    _, _, model_b, opt_b = pair("sgd", backend=backend, num_perturbs=2, lam=lam, use_neg=True)
    for step in range(3):
        data = batch(step)
        reference.train_step(model_a, opt_a, loss_fn, data, 2, lam, True)
        opt_b.step(lambda: loss_fn(model_b, data).backward())
        assert_same_weights(model_a, model_b, rtol=1e-6, atol=1e-7)
    assert opt_a.state_dict()["flatfused"] == opt_b.state_dict()["flatfused"]


@pytest.mark.parametrize("lam,expected", [(0.0, 2), (0.5, 3), (1.0, 1)])
def test_closure_pass_count(lam, expected):
    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, lam=lam, use_neg=True)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, batch(0))
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == expected
    assert torch.is_tensor(loss) and loss.ndim == 0


def train_and_resume(build, train, saved_at, steps):
    """``build() -> (model, opt)``; ``train(model, opt, step_range)``. Trains ``steps`` steps
    uninterrupted, and again from a checkpoint (through ``torch.save``) taken after
    ``saved_at``: returns (model, opt, resumed model, resumed opt)."""
    model, opt = build()
    train(model, opt, range(saved_at))
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    train(model, opt, range(saved_at, steps))

    blob.seek(0)
    ckpt = torch.load(blob, map_location="cpu")
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    train(resumed_model, resumed_opt, range(saved_at, steps))
    return model, opt, resumed_model, resumed_opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("api", ["closure", "three-call"])
def test_checkpoint_resume_is_bit_identical(backend, base, api, three_call_mode):
    cls, kwargs = BASES[base]

    def build():
        model = make_model()
        opt = flatfused.NSO(groups_of(model), cls, sigma=0.05, seed=5, backend=backend,
                            num_perturbs=2, lam=0.0, use_neg=True, **kwargs)
        return model, opt

    def train(model, opt, steps):
        for step in steps:
            data = batch(step)
            if api == "closure":
                opt.step(lambda: loss_fn(model, data).backward())
            else:
                reference.train_step(model, opt, loss_fn, data, 2, 0.0, True)

    model, opt, resumed_model, resumed_opt = train_and_resume(build, train, 3, 6)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    sd_a, sd_b = opt.state_dict(), resumed_opt.state_dict()
    assert sd_a["flatfused"] == sd_b["flatfused"]
    for k in sd_a["state"]:
        for name, t in sd_a["state"][k].items():
            assert torch.equal(t, sd_b["state"][k][name]), name


def test_state_memory_is_one_copy_of_the_parameters():
    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, lam=0.0,
                        use_neg=True)
    opt.step(lambda: loss_fn(model, batch(0)).backward())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    own = sum(t.numel() * t.element_size() for b in opt.flat_buffers for name, t in b.state.items()
              if name not in ("momentum_buffer", "exp_avg", "exp_avg_sq"))
    assert own == param_bytes
    # the base optimizer's state is flat too: momentum buffers are views of one tensor
    bufs = [opt.base_optimizer.state[p]["momentum_buffer"] for p in opt.flat_buffers[0].params]
    assert len({b.untyped_storage().data_ptr() for b in bufs}) == 1


def test_parameters_are_views_of_one_flat_buffer():
    model = make_model()
    opt = flatfused.NSO(groups_of(model), torch.optim.SGD, lr=0.1)
    assert len(opt.flat_buffers) == 2
    # No gradient before the first backward, as in torch; that backward accumulates straight
    # into the flat gradient buffers (no gather, so no warning).
    assert all(p.grad is None for buf in opt.flat_buffers for p in buf.params if p.numel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(model, batch(0)).backward()
    for buf in opt.flat_buffers:
        ptrs = {p.untyped_storage().data_ptr() for p in buf.params}
        assert ptrs == {buf.data.untyped_storage().data_ptr()}
        assert {p.grad.untyped_storage().data_ptr() for p in buf.params} == {
            buf.grad.untyped_storage().data_ptr()}
        assert buf.grad.abs().sum() > 0
    assert model.proj.stride() == (1, 4)  # memory order kept
    # requires_grad=False is skipped
    assert all(p is not model.frozen for b in opt.flat_buffers for p in b.params)


def test_frozen_parameters_are_skipped():
    model = make_model()
    frozen = model.frozen.detach().clone()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True)
    opt.step(lambda: loss_fn(model, batch(0)).backward())
    assert torch.equal(model.frozen, frozen) and model.frozen.grad is None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert opt._next_offset == math.ceil(trainable / 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_track_fp32(dtype):
    def run(d):
        model = make_model(dtype=d)
        opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, seed=2,
                            sigma=0.01, lam=0.0, use_neg=True, backend=BACKENDS[-1])
        for step in range(3):
            opt.step(lambda: loss_fn(model, batch(step, d)).backward())
        return model

    low, full = run(dtype), run(torch.float32)
    for p, q in zip(low.parameters(), full.parameters()):
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), q, rtol=0.05, atol=0.02)


def test_backends_agree():
    results = []
    for backend in BACKENDS:
        model = make_model()
        opt = flatfused.NSO(groups_of(model), torch.optim.AdamW, lr=1e-2, seed=4, lam=0.0,
                            use_neg=True, backend=backend)
        for step in range(3):
            opt.step(lambda: loss_fn(model, batch(step)).backward())
        results.append(model)
    for other in results[1:]:
        assert_same_weights(results[0], other)


def test_base_optimizer_instance_and_scheduler():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = flatfused.NSO(None, base, sigma=0.01, lam=0.0, use_neg=True)
    assert opt.param_groups is base.param_groups and opt.param_groups[0]["sigma"] == 0.01
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before the optimizer" warning
        for step in range(3):
            opt.step(lambda: loss_fn(model, batch(step)).backward())
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_set_sigma_and_sigma_zero_is_the_base_optimizer():
    model, plain = make_model(), make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, sigma=0.3, lr=0.1, lam=0.0,
                        use_neg=True)
    opt.set_sigma(0.0)
    assert all(g["sigma"] == 0.0 for g in opt.param_groups)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1)
    for step in range(3):
        opt.step(lambda: loss_fn(model, batch(step)).backward())
        sgd.zero_grad()
        loss_fn(plain, batch(step)).backward()
        sgd.step()
    assert_same_weights(plain, model, rtol=1e-6, atol=1e-7)


def test_replaced_gradients_and_storage_are_gathered():
    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True)
    ref_model = copy.deepcopy(model)
    ref = flatfused.NSO(ref_model.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True,
                        seed=opt.seed)
    with pytest.warns(RuntimeWarning, match="gather|replaced"):
        model.fc1.weight.data = model.fc1.weight.data.clone()  # storage replaced

        def closure():
            model.zero_grad(set_to_none=True)  # inside the closure: grads replaced every pass
            loss = loss_fn(model, batch(0))
            loss.backward()
            return loss

        opt.step(closure)
    ref.step(lambda: loss_fn(ref_model, batch(0)).backward())
    assert_same_weights(ref_model, model)


def test_replacements_after_steps_are_still_gathered():
    """The checks remember the pointers they last found attached: a replacement made after
    steps that found everything in place is still seen (both APIs)."""
    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True)
    ref_model = copy.deepcopy(model)
    ref = flatfused.NSO(ref_model.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True,
                        seed=opt.seed)
    for step in range(2):
        opt.step(lambda: loss_fn(model, batch(step)).backward())
        ref.step(lambda: loss_fn(ref_model, batch(step)).backward())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gather warnings are once per process
        model.fc1.weight.data = model.fc1.weight.data.clone()
        model.zero_grad(set_to_none=True)
        opt.step(lambda: loss_fn(model, batch(2)).backward())
        ref.step(lambda: loss_fn(ref_model, batch(2)).backward())
        assert_same_weights(ref_model, model)
        for o, m in ((opt, model), (ref, ref_model)):  # three-call, gradients set to None between
            loss_fn(m, batch(3)).backward()
            o.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
            for store_perturb in (True, False):
                o.first_step(zero_grad=True, store_perturb=store_perturb)
                if o is opt:
                    m.zero_grad(set_to_none=True)
                loss_fn(m, batch(3)).backward()
                o.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
            o.second_step(zero_grad=True)
    assert_same_weights(ref_model, model)
    flat = opt.flat_buffers[0]
    for p, o in zip(flat.params, flat.offsets):  # views of the flat buffers again
        if p.numel():
            assert p.data_ptr() == flat.data.data_ptr() + o * flat.data.element_size()
            assert p.grad.data_ptr() == flat.grad.data_ptr() + o * flat.grad.element_size()


def test_moved_model_is_an_error():
    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1)
    model.double()
    with pytest.raises(RuntimeError, match="moved"):
        opt.step(lambda: loss_fn(model, batch(0)).backward())


def test_closure_error_restores_weights():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True,
                        sigma=1.0)

    def closure():
        raise KeyError("data loader died")

    with pytest.raises(KeyError):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    # the step never happened, its noise included: the next one draws what it would have
    twin = make_model()
    twin_opt = flatfused.NSO(twin.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True,
                             sigma=1.0)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.step(lambda m=m: loss_fn(m, batch(0)).backward())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_bad_input():
    model = make_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="sigma"):
        flatfused.NSO(params, torch.optim.SGD, sigma=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        flatfused.NSO(params, torch.optim.SGD, sigma=float("nan"), lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        flatfused.NSO([{"params": params, "sigma": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="distribution"):
        flatfused.NSO(params, torch.optim.SGD, distribution="gumbel", lr=0.1)
    with pytest.raises(ValueError, match="backend"):
        flatfused.NSO(params, torch.optim.SGD, backend="fastest", lr=0.1)
    with pytest.raises(RuntimeError, match="unavailable"):
        flatfused.NSO(params, torch.optim.SGD, backend="cuda", lr=0.1)
    with pytest.raises(ValueError, match="num_perturbs"):
        flatfused.NSO(params, torch.optim.SGD, num_perturbs=0, lr=0.1)
    with pytest.raises(ValueError, match="lam"):
        flatfused.NSO(params, torch.optim.SGD, lam=1.5, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        flatfused.NSO(params, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="instance"):
        flatfused.NSO(None, torch.optim.SGD(params, lr=0.1), lr=0.2)
    with pytest.raises(ValueError, match="mixes devices"):
        flatfused.NSO([torch.nn.Parameter(torch.zeros(2)),
                       torch.nn.Parameter(torch.zeros(2, device="meta"))], torch.optim.SGD, lr=0.1)
    opt = flatfused.NSO(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="sigma"):
        opt.set_sigma(-1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="store_gradients"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="store_gradients"):
        opt.store_gradients(store_weights=False)


@pytest.mark.parametrize("make_opt", [
    lambda params: flatfused.NSO(params, torch.optim.SGD, lr=0.1),
    lambda params: flatfused.SAM(params, torch.optim.AdamW, lr=0.1),
], ids=["nso", "sam"])
def test_parameters_that_flattening_would_untie_are_refused(make_opt):
    """Each parameter gets its own slot of a flat buffer: parameters that share memory would
    stop sharing it, and one listed twice would be updated twice."""
    base = torch.randn(4, 8)
    tied = [torch.nn.Parameter(base), torch.nn.Parameter(base[1:3])]
    with pytest.raises(ValueError, match=r"shapes \(4, 8\) and \(2, 8\) share memory"):
        make_opt(tied)
    column = [torch.nn.Parameter(base[:, 0]), torch.nn.Parameter(base.t()[0])]  # same elements
    with pytest.raises(ValueError, match="share memory"):
        make_opt(column)
    frozen = torch.nn.Parameter(base, requires_grad=False)
    with pytest.raises(ValueError, match="share memory"):
        make_opt([frozen, torch.nn.Parameter(base[0])])
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than once"), pytest.warns(UserWarning):
        make_opt([p, p])
    # Interleaved and adjacent views of one tensor share no element: they are flattened.
    other = torch.randn(16)
    interleaved = [torch.nn.Parameter(base[:, 0]), torch.nn.Parameter(base[:, 1]),
                   torch.nn.Parameter(other[:8]), torch.nn.Parameter(other[8:])]
    opt = make_opt(interleaved)
    assert [q.data_ptr() for q in interleaved] == [
        opt.flat_buffers[0].data.data_ptr() + 4 * o for o in (0, 4, 8, 16)]
    two_frozen = [torch.nn.Parameter(base, requires_grad=False),
                  torch.nn.Parameter(base[0], requires_grad=False), torch.nn.Parameter(torch.ones(2))]
    make_opt(two_frozen)  # frozen parameters are not moved: they may share memory
    with pytest.raises(ValueError, match="meta device"):  # no memory to train at all
        make_opt(list(torch.nn.Linear(4, 4, device="meta").parameters()))


@pytest.mark.parametrize("make_opt", [
    lambda model, **kw: flatfused.NSO(model, torch.optim.SGD, lam=1.0, lr=0.1, momentum=0.9, **kw),
    lambda model, **kw: flatfused.SAM(model, torch.optim.AdamW, rho=0.0, lr=0.01, **kw),
    lambda model, **kw: flatfused.WeightedSAM(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.0, **kw),
], ids=["nso", "sam", "wsam"])
def test_a_param_group_added_later_gets_the_base_optimizers_defaults(make_opt):
    """add_param_group goes through the base optimizer's: the new group has its defaults
    (momentum, betas, ...) and the wrapper's (sigma, rho, ...), and trains as the base optimizer
    would (lam = 1 / rho = 0: the update is the plain base step)."""
    torch.manual_seed(0)
    model, extra = torch.nn.Linear(4, 2), torch.nn.Parameter(torch.randn(3))
    twin, twin_extra = copy.deepcopy(model), torch.nn.Parameter(extra.detach().clone())
    opt = make_opt(model)
    plain = copy.deepcopy(opt.base_optimizer)  # not yet stepped: no state
    plain.param_groups[0]["params"] = list(twin.parameters())
    x = torch.randn(5, 4)

    def closure(m, e):
        def run():
            loss = m(x).square().sum() + (e * e).sum()
            loss.backward()
            return loss
        return run

    for step in range(4):
        if step == 1:
            opt.add_param_group({"params": [extra], "lr": 0.05})
            plain.add_param_group({"params": [twin_extra], "lr": 0.05})
            assert set(plain.param_groups[1]) - {"params"} <= set(opt.param_groups[1])
        opt.zero_grad()
        if isinstance(opt, flatfused.SAM):  # step(closure) runs the pass at the ascent point
            closure(model, extra)()
        opt.step(closure(model, extra))
        plain.zero_grad()
        closure(twin, twin_extra)()
        plain.step()
        for p, q in zip(list(model.parameters()) + [extra], list(twin.parameters()) + [twin_extra]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "sigma": -1.0,
                             "rho": -1.0})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_optimizer.param_groups


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["nso", "sam"])
def test_freezing_and_unfreezing_between_steps_trains_as_the_base_optimizer(kind, base):
    """A parameter unfrozen after construction is flattened and trained from then on; one frozen
    is left where it is, with no gradient (as zero_grad(set_to_none=True) leaves torch's). With
    lam = 1 / rho = 0 the step is the plain base step, so torch's optimizer is the reference."""
    # Plain momentum SGD: with nesterov and weight decay the fused kernel and torch's differ in
    # the last bit (the other tests compare those against the reference with a tolerance).
    cls, kwargs = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                   "adamw": (torch.optim.AdamW, dict(lr=0.01))}[base]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                          torch.nn.Linear(5, 2)))
    model, twin = models
    for m in models:
        m[0].weight.requires_grad_(False)  # a frozen backbone at first
    opt = (flatfused.NSO(model, cls, lam=1.0, **kwargs) if kind == "nso"
           else flatfused.SAM(model.parameters(), cls, rho=0.0, **kwargs))
    plain = cls(twin.parameters(), **kwargs)
    x = torch.randn(6, 4)

    def closure(m):
        def run():
            loss = m(x).square().sum()
            loss.backward()
            return loss
        return run

    for step in range(6):
        if step == 2:  # unfreeze the backbone
            for m in models:
                m[0].weight.requires_grad_(True)
        if step == 4:  # freeze the head's weight
            for m in models:
                m[2].weight.requires_grad_(False)
        opt.zero_grad()
        if kind == "sam":
            closure(model)()
        opt.step(closure(model))
        plain.zero_grad(set_to_none=True)
        closure(twin)()
        plain.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert model[2].weight.grad is None


def test_sigma_set_directly_in_a_group_is_validated():
    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["sigma"] = float("nan")
    with pytest.raises(ValueError, match="sigma"):
        opt.step(lambda: loss_fn(model, batch(0)).backward())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = flatfused.NSO(emb.parameters(), torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum().backward())


def test_batchnorm_running_stats_frozen_in_perturbed_passes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 1))
    opt = flatfused.NSO(model, torch.optim.SGD, lr=0.1, lam=0.5, num_perturbs=2, use_neg=True)
    x = torch.randn(16, 4)
    bn = model[1]
    expected = copy.deepcopy(bn)
    expected(model[0](x))  # the one update the clean pass makes
    opt.step(lambda: model(x).sum().backward())
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    assert bn.momentum == 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "rmsprop"])
@pytest.mark.parametrize("lam", [0.5, 0.0])
def test_three_call_gradient_contract(backend, base, lam, three_call_mode):
    """What .grad holds between the reference calls: zero after zero_grad, the direction after second_step."""
    cls, kwargs = BASES[base]
    model = make_model()
    opt = flatfused.NSO(model.parameters(), cls, sigma=0.05, backend=backend, **kwargs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(3):
        data = batch(step)
        loss_fn(model, data).backward()
        clean = [p.grad.clone() for p in trainable]
        opt.store_gradients(zero_grad=True, store_weights=True, update_weight=lam)
        assert all(torch.count_nonzero(p.grad) == 0 for p in trainable)
        opt.first_step(zero_grad=False, store_perturb=True)
        assert all(torch.count_nonzero(p.grad) == 0 for p in trainable)
        loss_fn(model, data).backward()
        perturbed = [p.grad.clone() for p in trainable]
        # (addresses: a .grad kept here would stop the handover, which its holder would see)
        grads_before = [p.grad.untyped_storage().data_ptr() for p in trainable]
        opt.store_gradients(zero_grad=True, update_weight=1.0 - lam)
        assert all(torch.count_nonzero(p.grad) == 0 for p in trainable)
        # With lam == 0 the accumulator starts from zero, and a handover gives .grad new
        # (zeroed) memory instead of zeroing the old one in place.
        handed_over = three_call_mode == "handover" and lam == 0
        assert all((p.grad.untyped_storage().data_ptr() != g) == handed_over
                   for p, g in zip(trainable, grads_before))
        opt.second_step(zero_grad=step == 2)
        for p, c, g in zip(trainable, clean, perturbed):
            expected = torch.zeros_like(c) if step == 2 else lam * c + (1.0 - lam) * g
            torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)
        opt.zero_grad()
        assert all(torch.count_nonzero(p.grad) == 0 for p in trainable)


def test_rng_offset_advances_on_the_device_and_checkpoints_follow_it():
    """Draws advance the device offset by an add (what a CUDA graph replays); a checkpoint reads
    the device position, so draws the host did not see (graph replays) are not lost."""
    from flatfused.rng import counters_per_draw

    model = Net()
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.1, lr=0.1, lam=0.0, use_neg=True, seed=4)
    step = counters_per_draw(sum(p.numel() for p in model.parameters() if p.requires_grad))
    rng = opt._rng[torch.device("cpu")]
    for i in range(3):
        opt.step(lambda: loss_fn(model, batch(i)).backward())
        assert int(rng[1]) == i * step
    assert opt.state_dict()["flatfused"]["next_offset"] == 3 * step
    rng[1:].add_(step)  # as a replayed graph would
    extra = opt.state_dict()["flatfused"]
    assert (extra["draw_offset"], extra["next_offset"]) == (3 * step, 4 * step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_pass_is_w0_minus_the_same_noise(backend, dtype):
    """The two-point minus pass sits at w0 - u for the plus pass's u (on the CPU it mirrors
    w0 + u; a repeated first_step(store_perturb=False) draws u again): within a rounding."""
    model = make_model(dtype=dtype)
    w0 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, backend=backend,
                        lam=0.0, use_neg=True, seed=3)
    seen = []

    def closure():
        seen.append([p.detach().float().clone() for p in model.parameters() if p.requires_grad])
        loss = loss_fn(model, batch(0, dtype))
        loss.backward()
        return loss

    opt.step(closure)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    plus, minus = seen
    for p0, wp, wm in zip(w0, plus, minus):
        torch.testing.assert_close(wp + wm, 2 * p0.float(), **tol)
        assert p0.numel() == 0 or not torch.equal(wp, p0.float())

    # Three-call: mirrored (right after the plus pass) and redrawn (a second minus call) agree.
    model = make_model(dtype=dtype)
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, backend=backend, seed=3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_fn(model, batch(0, dtype)).backward()
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    opt.first_step(zero_grad=True, store_perturb=True)
    torch.testing.assert_close([p.detach().float() for p in trainable], plus, rtol=0, atol=0)
    opt.first_step(zero_grad=True, store_perturb=False)
    mirrored = [p.detach().float().clone() for p in trainable]
    opt.first_step(zero_grad=True, store_perturb=False)
    redrawn = [p.detach().float() for p in trainable]
    torch.testing.assert_close(mirrored, minus, rtol=0, atol=0)
    torch.testing.assert_close(redrawn, mirrored, **tol)


def test_zero_update_weight_drops_the_gradient():
    """update_weight=0 (the trainer's clean pass with lam == 0) leaves acc at zero without
    reading the gradient: a non-finite clean gradient does not poison the step (the reference's
    0 * grad would), and a second_step right after it steps with a zero direction."""
    ref_model, ref, model, ours = pair("sgd", lam=0.0, use_neg=True)
    for step in range(2):
        data = batch(step)
        for m, opt, poison in ((ref_model, ref, False), (model, ours, True)):
            loss_fn(m, data).backward()
            if poison:
                model.fc1.weight.grad[0, 0] = float("nan")
            opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
            for sign in (True, False):
                opt.first_step(zero_grad=True, store_perturb=sign)
                loss_fn(m, data).backward()
                opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
            opt.second_step(zero_grad=True)
        assert_same_weights(ref_model, model)

    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, weight_decay=0.5)
    loss_fn(model, batch(0)).backward()
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    opt.second_step(zero_grad=True)
    for p, b in zip(model.parameters(), before):
        expected = b * (1 - 0.1 * 0.5) if p.requires_grad else b
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_step_closure_discards_gradients_from_before_the_step(backend, lam):
    """Stale .grad values (left by the previous step or the user) do not enter the step: zeroed
    before the clean pass, or by the first perturbation's pass when lam == 0."""
    results = []
    for stale in (False, True):
        model = make_model()
        opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, momentum=0.9,
                            backend=backend, lam=lam, use_neg=True, seed=5)
        for step in range(3):
            if stale:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(1e3)
            opt.step(lambda: loss_fn(model, batch(step)).backward())
        results.append([p.detach().clone() for p in model.parameters()])
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_gradient_handover_with_unequal_weights_matches_the_copy(monkeypatch):
    """The handed-over accumulator keeps its first weight as a factor; later weights are divided
    by it. Weights whose ratio is inexact agree with the copying path to rounding."""
    import flatfused.optim.nso_accumulator as nso

    results = []
    for threshold in (1 << 60, 0):
        monkeypatch.setattr(nso, "_HANDOVER_MIN_ELEMENTS_PER_PARAM", threshold)
        model = make_model()
        opt = flatfused.NSO(model.parameters(), torch.optim.SGD, sigma=0.05, seed=2, lr=0.1,
                            momentum=0.9)
        for step in range(2):
            data = batch(step)
            loss_fn(model, data).backward()
            opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
            for store_perturb, weight in ((True, 0.3), (False, 0.7), (True, 0.1)):
                opt.first_step(zero_grad=True, store_perturb=store_perturb)
                loss_fn(model, data).backward()
                opt.store_gradients(zero_grad=True, update_weight=weight)
            opt.second_step()
        results.append([p.detach().clone() for p in model.parameters()]
                       + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_gradient_handover_engages_for_large_parameters():
    # Parameters of 16384 elements on average: store_gradients hands the gradient buffer over.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(128, 128, bias=False))
    opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.01, seed=0, lr=0.1)
    x = torch.randn(8, 128)
    model(x).square().mean().backward()
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    opt.first_step(zero_grad=True)
    model(x).square().mean().backward()
    grad_buffers = [buf.grad for buf in opt.flat_buffers]
    direction = [p.grad.clone() for p in model.parameters()]
    opt.store_gradients(zero_grad=True, update_weight=1.0)
    assert all(buf.state["acc"] is g for buf, g in zip(opt.flat_buffers, grad_buffers))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.step()  # = second_step(): .grad then holds the direction
    for p, d in zip(model.parameters(), direction):
        torch.testing.assert_close(p.grad, d)


def test_base_optimizer_step_hooks_run_around_the_fused_step():
    """Hooks registered on the base optimizer (EMA, logging) run around the fused kernels that
    stand for its step(), pre before post, global ones too, as the reference's base.step()."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, sigma=0.01, lr=0.1, momentum=0.9)
    seen = []
    handles = [opt.base_optimizer.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o))),
               opt.base_optimizer.register_step_post_hook(lambda o, a, k: seen.append(("post", o))),
               register_optimizer_step_post_hook(
                   lambda o, a, k: seen.append(("global", o)))]
    try:
        opt.step(lambda: loss_fn(model, batch(0)).backward())
    finally:
        for h in handles:
            h.remove()
    # (the wrapper's own step() runs the global hook too, after the base's)
    assert seen == [("pre", opt.base_optimizer), ("post", opt.base_optimizer),
                    ("global", opt.base_optimizer), ("global", opt)]


EDITS = {
    # what a closure may do to .grad in place around its backward
    "zero_grad_in_place": (lambda model: model.zero_grad(set_to_none=False), None),
    "clip": (None, lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)),
    "scale": (None, lambda model: [p.grad.mul_(0.5) for p in model.parameters()
                                   if p.grad is not None]),
}


def _three_call_step_with(edit, model, opt, data, K, lam):
    """The reference trainer's step (two-point) with ``edit`` around each backward: each
    pass's gradient alone in .grad, as in the reference."""
    before, after = EDITS[edit]

    def backward():
        if before:
            before(model)
        loss_fn(model, data).backward()
        if after:
            after(model)

    backward()
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=lam)
    uw = (1 - lam) / (2 * K)
    for _ in range(K):
        for plus in (True, False):
            opt.first_step(zero_grad=True, store_perturb=plus)
            backward()
            opt.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("K,lam", [(1, 0.0), (2, 0.4)])
def test_closure_writing_grad_in_place_acts_on_each_pass_alone(edit, base, K, lam):
    """Clipping inside the closure (Lightning's), ``zero_grad(set_to_none=False)``,
    ``grad.mul_``: the passes add up in .grad, so such writes would reach the earlier passes'
    sum. The first pass tells; from its end on the step keeps each pass's gradient apart, as
    the three-call API does (the trajectories agree), and warns once."""
    _, _, model_a, opt_a = pair(base, num_perturbs=K, lam=lam, use_neg=True)
    _, _, model_b, opt_b = pair(base, num_perturbs=K, lam=lam, use_neg=True)
    before, after = EDITS[edit]
    for step in range(3):
        data = batch(step)
        _three_call_step_with(edit, model_a, opt_a, data, K, lam)

        def closure():
            if before:
                before(model_b)
            loss = loss_fn(model_b, data)
            loss.backward()
            if after:
                after(model_b)
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt_b.step(closure)
        assert len([w for w in caught if "in place" in str(w.message)]) == (step == 0)
        assert_same_weights(model_a, model_b, rtol=1e-6, atol=1e-7)
    assert opt_a.state_dict()["flatfused"] == opt_b.state_dict()["flatfused"]


def test_closure_without_in_place_writes_keeps_one_copy():
    """``optimizer.zero_grad()`` (ignored inside the step) and ``model.zero_grad()`` (set to
    None) write nothing in place: no warning, no accumulator."""
    model = make_model()
    opt = flatfused.NSO(model, torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True, seed=1)

    def closure():
        opt.zero_grad()
        model.zero_grad()
        loss = loss_fn(model, batch(0))
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(closure)
    assert not opt._closure_edits
    assert all("acc" not in buf.state for buf in opt.flat_buffers)


def test_closure_writing_grad_in_place_under_amp_skips_an_overflowing_step():
    """Passes kept apart under a GradScaler: the accumulated direction is unscaled and checked;
    an overflow in the last pass leaves weights, base state and RNG position as they were."""
    model = make_model()
    opt = flatfused.NSO(model, torch.optim.SGD, lr=0.1, momentum=0.9, lam=0.0, use_neg=True,
                        seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.zeros(()))  # the scale exists before step (docs/training.md, AMP)
    calls = [0]
    overflow_at = [None]

    def closure():
        calls[0] += 1
        loss = loss_fn(model, batch(0))
        scaler.scale(loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # in place: apart from now on
        if calls[0] == overflow_at[0]:
            model.fc1.weight.grad[0, 0] = float("inf")
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler.step(opt, closure)
        scaler.update()
        weights = [p.detach().clone() for p in model.parameters()]
        momentum = [s["momentum_buffer"].clone() for s in opt.base_optimizer.state.values()]
        rng = opt.state_dict()["flatfused"]
        overflow_at[0] = calls[0] + 2
        scaler.step(opt, closure)
        scaler.update()
    assert opt._closure_edits
    assert scaler.get_scale() == 512.0
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    assert len(momentum) == len(opt.base_optimizer.state) > 0
    for s, m in zip(opt.base_optimizer.state.values(), momentum):
        assert torch.equal(s["momentum_buffer"], m)
    assert opt.state_dict()["flatfused"] == rng


def test_closure_writing_grad_in_place_resumes_bit_identically():
    """The accumulator mode is not saved: a resumed optimizer's first pass tells again, and the
    step it then takes is the one the uninterrupted run takes."""
    def build():
        model = make_model()
        return model, flatfused.NSO(model, torch.optim.AdamW, sigma=0.05, seed=5, lr=1e-2,
                                    num_perturbs=1, lam=0.0, use_neg=True)

    def train(model, opt, steps):
        for step in steps:
            data = batch(step)

            def closure():
                loss = loss_fn(model, data)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                return loss

            opt.step(closure)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, resumed_model, resumed_opt = train_and_resume(build, train, 2, 4)
    assert opt._closure_edits and resumed_opt._closure_edits
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert opt.state_dict()["flatfused"] == resumed_opt.state_dict()["flatfused"]


def test_defaults_are_the_published_readmes():
    """The NSO README documents num_perturbs = 1, use_neg = True (the two-point estimate) and
    lam = 0: ``NSO(...).step(closure)`` runs exactly that (two passes, no clean pass), and the
    trainer file's own keyword values (lam=0.5, use_neg=False) stay one argument away."""
    opt = flatfused.NSO(make_model().parameters(), torch.optim.SGD, lr=0.1)
    assert (opt.num_perturbs, opt.lam, opt.use_neg) == (1, 0.0, True)
    ref_model, ref, model, ours = pair()  # the library's defaults
    for step in range(3):
        reference.train_step(ref_model, ref, loss_fn, batch(step), num_perturbs=1, lam=0.0,
                             use_neg=True)
        passes = []

        def closure():
            passes.append(1)
            loss = loss_fn(model, batch(step))
            loss.backward()
            return loss

        ours.step(closure)
        assert len(passes) == 2
        assert_same_weights(ref_model, model)
