"""flatfused.SAM (and ASAM) against the faithful reference, step for step."""
import copy
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

import flatfused
from flatfused import reference
from flatfused.bn import enable_running_stats
from cases import CPU_BACKENDS as BACKENDS
from cases import SAM_BASES as BASES
from cases import Net, batch, loss_fn
from cases import make_case as make


def groups(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params[:2]}, {"params": params[2:], "rho": 0.2, "lr": 0.03}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_reference(backend, base, adaptive, kind):
    cls, kwargs = BASES[base]
    ref_model, data_of, loss = make(kind)
    model, _, _ = make(kind)
    ref = reference.SAM(groups(ref_model), cls, rho=0.05, adaptive=adaptive, **kwargs)
    ours = flatfused.SAM(groups(model), cls, rho=0.05, adaptive=adaptive, backend=backend,
                         **kwargs)
    for step in range(4):
        reference.sam_train_step(ref_model, ref, loss, data_of(step))
        reference.sam_train_step(model, ours, loss, data_of(step))
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=2e-5, atol=2e-6, msg=name)
    enable_running_stats(ref_model)
    enable_running_stats(model)
    for a, b in zip(ref_model.buffers(), model.buffers()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_step_closure_is_the_reference_step(adaptive):
    ref_model, _, _ = make("mlp")
    model, _, _ = make("mlp")
    ref = reference.SAM(ref_model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1)
    ours = flatfused.SAM(model, torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1)
    for step in range(3):
        for m, opt in ((ref_model, ref), (model, ours)):
            loss_fn(m, batch(step)).backward()

            def closure(m=m, opt=opt):
                opt.zero_grad()
                loss = loss_fn(m, batch(step))
                loss.backward()
                return loss

            opt.step(closure)
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=2e-5, atol=2e-6)


def test_restore_is_exact_and_state_is_one_copy():
    model, _, _ = make("mlp")
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=5.0, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        loss_fn(model, batch(step)).backward()
        opt.first_step(zero_grad=True)
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        loss_fn(model, batch(step)).backward()
        opt.second_step(zero_grad=True)
        for p, q in zip(model.parameters(), before):
            assert torch.equal(p, q)  # lr 0: exactly the saved weights, no drift
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() * t.element_size() for b in opt.flat_buffers
               for n, t in b.state.items() if n == "w0") == param_bytes


def test_scheduler_on_base_optimizer_and_checkpoint():
    model, _, _ = make("mlp")
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    for step in range(2):
        reference.sam_train_step(model, opt, loss_fn, batch(step))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    sd = opt.state_dict()
    other = flatfused.SAM(make("mlp")[0].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    other.load_state_dict(sd)
    assert other.param_groups is other.base_optimizer.param_groups
    assert other.param_groups[0]["rho"] == 0.05 and other.param_groups[0]["lr"] == 0.025


def _sam_steps(pairs, steps):
    for step in steps:
        for model, opt in pairs:
            reference.sam_train_step(model, opt, loss_fn, batch(step))


def _trained(model):
    return [p for p in model.parameters() if p.requires_grad and p.numel()]


def _assert_same_params(ref_model, model):
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-5, atol=2e-6)


def test_adam_step_counts_are_views_of_one_tensor_and_round_trip():
    model, _, _ = make("mlp")
    opt = flatfused.SAM(model, torch.optim.AdamW, lr=1e-2)
    _sam_steps([(model, opt)], range(3))
    steps = [opt.base_optimizer.state[p]["step"] for p in _trained(model)]
    assert all(s.dim() == 0 and float(s) == 3.0 for s in steps)
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1
    # A plain AdamW resumes from the checkpoint and takes the steps flatfused takes.
    plain_model, _, _ = make("mlp")
    plain_model.load_state_dict(model.state_dict())
    plain = reference.SAM(plain_model.parameters(), torch.optim.AdamW, lr=1e-2)
    checkpoint = copy.deepcopy(opt.state_dict())  # as torch.save / torch.load would
    del checkpoint["flatfused"]
    plain.base_optimizer.load_state_dict(checkpoint)
    _sam_steps([(plain_model, plain), (model, opt)], range(3, 5))
    _assert_same_params(plain_model, model)
    assert float(opt.base_optimizer.state[_trained(model)[0]]["step"]) == 5.0


def test_adam_state_from_a_checkpoint_with_uneven_step_counts():
    """A parameter without a gradient in some step of a plain AdamW run counts fewer steps: its
    bias correction differs, so the fused update runs once per run of parameters with equal
    counts (one kernel has one bias correction)."""
    plain_model, _, _ = make("mlp")
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    for step in range(3):
        plain.zero_grad(set_to_none=True)
        loss_fn(plain_model, batch(step)).backward()
        if step == 2:
            _trained(plain_model)[0].grad = None  # AdamW skips it
        plain.step()
    assert {float(s["step"]) for s in plain.state.values()} == {2.0, 3.0}
    ref_model, _, _ = make("mlp")
    model, _, _ = make("mlp")
    ref = reference.SAM(ref_model.parameters(), torch.optim.AdamW, lr=1e-2)
    ours = flatfused.SAM(model, torch.optim.AdamW, lr=1e-2)
    for m, opt in ((ref_model, ref.base_optimizer), (model, ours)):
        m.load_state_dict(plain_model.state_dict())
        opt.load_state_dict(copy.deepcopy(plain.state_dict()))
    ours.base_optimizer.step = None  # the fused update only
    _sam_steps([(ref_model, ref), (model, ours)], range(3, 5))
    _assert_same_params(ref_model, model)
    assert [float(ours.base_optimizer.state[p]["step"]) for p in _trained(model)] == \
        [float(ref.base_optimizer.state[p]["step"]) for p in _trained(ref_model)]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_base_state_replaced_by_hand_is_used(base):
    cls, kwargs = BASES[base]
    ref_model, _, _ = make("mlp")
    model, _, _ = make("mlp")
    ref = reference.SAM(ref_model.parameters(), cls, **kwargs)
    ours = flatfused.SAM(model, cls, **kwargs)
    _sam_steps([(ref_model, ref), (model, ours)], range(2))
    name = "momentum_buffer" if base == "sgd" else "exp_avg"
    for opt, m in ((ref, ref_model), (ours, model)):
        p = _trained(m)[1]
        opt.base_optimizer.state[p][name] = torch.full_like(p, 0.5)
    _sam_steps([(ref_model, ref), (model, ours)], range(2, 4))
    _assert_same_params(ref_model, model)
    p = _trained(model)[1]
    flat = ours.flat_buffers[0].state[name]
    assert ours.base_optimizer.state[p][name].untyped_storage().data_ptr() == \
        flat.untyped_storage().data_ptr()


def test_sgd_without_momentum_keeps_no_base_state():
    model, _, _ = make("mlp")
    opt = flatfused.SAM(model, torch.optim.SGD, lr=0.1)
    _sam_steps([(model, opt)], range(2))
    plain = torch.optim.SGD(make("mlp")[0].parameters(), lr=0.1)
    assert opt.base_optimizer.state_dict()["state"] == {}
    assert plain.state_dict()["state"] == {}


def test_bad_input():
    params = list(make("mlp")[0].parameters())
    with pytest.raises(ValueError, match="rho"):
        flatfused.SAM(params, torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        flatfused.SAM(params, torch.optim.SGD, rho=float("nan"), lr=0.1)
    opt = flatfused.SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


def test_closure_error_restores_weights():
    model, _, _ = make("mlp")
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=1.0, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, batch(0)).backward()

    def closure():
        raise KeyError("data loader died")

    with pytest.raises(KeyError):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


def test_model_is_a_settable_attribute():
    model, _, _ = make("cnn")
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.model is None
    opt.model = model  # e.g. the DDP-wrapped module, once wrapped
    assert opt.model is model
    with pytest.raises(TypeError, match="nn.Module"):
        opt.model = "not a module"


@pytest.mark.parametrize("kind", ["nso", "sam", "asam", "wsam"])
def test_a_model_with_nothing_to_train_steps_as_a_no_op(kind):
    """Every parameter frozen: the step runs its passes and returns the loss, changing nothing
    (the reference's loops find nothing to do)."""
    model = torch.nn.Linear(4, 2).requires_grad_(False)
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(3, 4)
    if kind == "nso":
        opt = flatfused.NSO(model, torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True)
    elif kind == "wsam":
        opt = flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1))
    else:
        opt = flatfused.SAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive=kind == "asam")
    loss = opt.step(lambda: model(x).sum())
    assert loss is not None
    if kind in ("sam", "asam"):  # and the two-call API
        opt.first_step(zero_grad=True)
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_ascent_without_any_gradient_is_a_clear_error():
    """No backward before first_step (or a SAM.step(closure) whose closure gives no gradient
    either): the references fail too; a silent plain base step would hide the mistake."""
    for wsam in (False, True):
        model, _, _ = make("mlp")
        opt = (flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1)) if wsam
               else flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1))
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="no parameter has a gradient"):
            opt.first_step()
        if isinstance(opt, flatfused.SAM):
            with pytest.raises(RuntimeError, match="no parameter has a gradient"):
                opt.step(lambda: loss_fn(model, batch(0)).detach())
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class _Cond(torch.nn.Module):
    """Head ``b`` is used on even steps only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(6, 4)

    def forward(self, x, use_b):
        return self.a(x) + (self.b(x) if use_b else 0)


@pytest.mark.parametrize("kind", ["sam", "wsam-coupled", "wsam-decoupled"])
@pytest.mark.parametrize("loop", ["two-call", "zero_grad-then-step"])
def test_zero_grad_sets_to_none_as_the_references(kind, loop):
    """SAM and WSAM's zero_grad() default to set_to_none=True and their zero_grad=True steps set
    the gradients to None, as torch's and the references' do: a head the next pass does not
    reach is skipped (no momentum, no weight decay), matching the references; the flat buffer
    keeps serving the next backward (no replaced tensors to gather)."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    models, opts = [], []
    for impl in (reference, flatfused):
        model = _Cond()
        if kind == "sam":
            opt = impl.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
        else:
            extra = {"restore": "copy"} if impl is reference else {}
            opt = impl.WeightedSAM(model, torch.optim.SGD(model.parameters(), **kw), rho=0.05,
                                   gamma=0.8, decouple=kind.endswith("-decoupled"), **extra)
        models.append(model)
        opts.append(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "gradient was replaced" gathering
        for i in range(4):
            x, y = cnn_free_batch(i)
            for model, opt in zip(models, opts):
                loss = lambda: F.cross_entropy(model(x, i % 2 == 0), y)  # noqa: E731
                if loop == "two-call":
                    loss().backward()
                    opt.first_step(zero_grad=True)
                    loss().backward()
                    opt.second_step(zero_grad=True)
                elif kind == "sam":
                    opt.zero_grad()
                    loss().backward()
                    opt.step(lambda: loss().backward())
                else:
                    opt.zero_grad()
                    opt.step(lambda: loss().backward() or 0.0)
    ours = opts[1]
    assert all(p.grad is None for p in models[1].parameters()) or loop != "two-call"
    ours.zero_grad()
    assert all(p.grad is None for p in models[1].parameters())
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def cnn_free_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_gradients_set_to_none_come_back_as_the_same_views_of_the_flat_buffer():
    """zero_grad() sets SAM's gradients to None each step; the next backward re-attaches each
    parameter's slot of the flat gradient buffer (cached views, not new ones), and a copy of
    the optimizer attaches its own buffer's, never the original's."""
    torch.manual_seed(0)
    model = Net()
    opt = flatfused.SAM(model, torch.optim.SGD, rho=0.05, lr=0.1)
    seen = []
    for step in range(3):
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        loss_fn(model, batch(step)).backward()
        opt.step(lambda: loss_fn(model, batch(step)).backward())
        (buf,) = opt.flat_buffers  # the frozen parameter is not in it
        # (a generator: a loop's name would keep the last view alive, a held .grad)
        assert all(p.grad.data_ptr() == view.data_ptr() and p.grad.shape == view.shape
                   for p, view in zip(buf.params, buf.views(buf.grad)))
        # Weakly held: a .grad kept by the caller is left to them at the next zero_grad. (A
        # zero-size parameter has no slot to attach: its .grad is whatever autograd made.)
        seen.append([weakref.ref(p.grad) for p in buf.params if p.numel()])
    assert all(a() is b() is c() is not None for a, b, c in zip(*seen))
    twin_model, twin = copy.deepcopy((model, opt))
    twin.zero_grad()
    loss_fn(twin_model, batch(5)).backward()
    (tbuf,) = twin.flat_buffers
    assert tbuf.grad.untyped_storage().data_ptr() != buf.grad.untyped_storage().data_ptr()
    assert {p.grad.untyped_storage().data_ptr() for p in tbuf.params if p.numel()} == {
        tbuf.grad.untyped_storage().data_ptr()}
    assert all(p.grad is not None for p in buf.params)  # the original's untouched


def test_view_cache_keeps_only_tensors_the_buffer_holds():
    from cases import make_model
    model = make_model()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_fn(model, batch(0)).backward()
    buf = opt.flat_buffers[0]
    stray = torch.zeros_like(buf.grad)
    views = buf.attached_views(stray)
    assert buf.attached_views(stray) is views  # cached while held...
    buf.state["stray"] = stray
    buf.exchange_grad(torch.zeros_like(buf.grad))  # a miss: entries for tensors not held go
    del buf.state["stray"]
    buf.attached_views(torch.zeros_like(buf.grad))
    assert all(entry[0] is not stray for entry in buf._view_cache.values())


def test_a_gradient_view_re_pointed_by_the_user_is_made_again():
    """``p.grad.data = ...`` re-points the view object flatfused handed out as ``.grad``; when
    the gradients come back after zero_grad(), that parameter gets a fresh view of its slot."""
    torch.manual_seed(0)
    model = Net()
    opt = flatfused.SAM(model, torch.optim.SGD, rho=0.05, lr=0.1)
    loss_fn(model, batch(0)).backward()
    opt.step(lambda: loss_fn(model, batch(0)).backward())
    (buf,) = opt.flat_buffers
    stray = buf.params[2].grad
    stray.data = torch.full_like(stray, 7.0)  # no longer a view of the flat buffer
    with warnings.catch_warnings():  # a replaced gradient: gathered (with a one-time warning)
        warnings.simplefilter("ignore")
        opt.zero_grad()
    twin = copy.deepcopy(model)
    loss_fn(model, batch(1)).backward()
    loss_fn(twin, batch(1)).backward()
    flat = buf.grad.untyped_storage().data_ptr()
    for p, q in zip(buf.params, [q for q in twin.parameters() if q.requires_grad]):
        if p.numel():
            assert p.grad.untyped_storage().data_ptr() == flat
            torch.testing.assert_close(p.grad, q.grad)
    assert torch.equal(stray, torch.full_like(stray, 7.0))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_closure_alone_runs_both_passes(adaptive, backend):
    """The frameworks' form (Lightning, Accelerate, the HF Trainer): the closure is the only
    forward-backward the optimizer gets, and no .grad exists at the call. The step runs the
    first pass through the closure, with BatchNorm statistics updated (frozen in the second),
    and equals the reference's form; it returns the first pass's loss."""
    ref_model, data_of, loss = make("cnn")
    model, _, _ = make("cnn")
    ref = reference.SAM(ref_model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive,
                        lr=0.1, momentum=0.9)
    ours = flatfused.SAM(model, torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1,
                         momentum=0.9, backend=backend)
    for step in range(3):
        reference.sam_train_step(ref_model, ref, loss, data_of(step))
        passes = []

        def closure():
            passes.append(1)
            value = loss(model, data_of(step))
            value.backward()
            return value

        ours.zero_grad()
        ours.step(closure)
        assert len(passes) == 2
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=2e-5, atol=2e-6, msg=name)
        for a, b in zip(ref_model.buffers(), model.buffers()):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_step_closure_alone_returns_the_first_pass_loss():
    model, data_of, loss = make("mlp")
    opt = flatfused.SAM(model, torch.optim.SGD, rho=0.1, lr=0.1)
    losses = []

    def closure():
        value = loss(model, data_of(0))
        value.backward()
        losses.append(value.detach().clone())
        return value

    got = opt.step(closure)
    assert len(losses) == 2 and torch.equal(got, losses[0])
