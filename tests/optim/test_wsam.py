"""flatfused.WeightedSAM against the faithful reference (exact-restore mode), step for step."""
import io
import warnings

import pytest
import torch

import flatfused
from flatfused import reference
from flatfused.bn import enable_running_stats
from cases import CPU_BACKENDS as BACKENDS
from cases import SAM_BASES as BASES
from cases import batch, closure_for, loss_fn
from cases import make_case as make

TOL = dict(rtol=2e-5, atol=2e-6)


def build(kind, base, backend=None, **kw):
    cls, kwargs = BASES[base]
    model, data_of, loss = make(kind)
    base_opt = cls(model.parameters(), **kwargs)
    if backend is None:
        opt = reference.WeightedSAM(model, base_opt, restore="copy", **kw)
    else:
        opt = flatfused.WeightedSAM(model, base_opt, backend=backend, **kw)
    return model, opt, data_of, loss


def assert_same_model(ref_model, model):
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, msg=name, **TOL)
    enable_running_stats(ref_model)
    enable_running_stats(model)
    for a, b in zip(ref_model.buffers(), model.buffers()):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_reference(backend, base, adaptive, decouple, kind):
    kw = dict(rho=0.05, gamma=0.8, adaptive=adaptive, decouple=decouple)
    ref_model, ref, data_of, loss = build(kind, base, **kw)
    model, ours, _, _ = build(kind, base, backend, **kw)
    for step in range(3):
        ref_loss = ref.step(closure_for(ref_model, ref, loss, data_of(step)))
        our_loss = ours.step(closure_for(model, ours, loss, data_of(step)))
        torch.testing.assert_close(our_loss, ref_loss, **TOL)
        assert_same_model(ref_model, model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_decoupled_step_with_a_maximizing_base_matches_reference(backend, base):
    """The look-ahead base step writes -g into .grad in its own pass (negated scale and
    maximize flag, docs/design.md); a base optimizer that maximizes must still step as the
    reference's does."""
    kw = dict(rho=0.05, gamma=0.8, decouple=True)
    cls, kwargs = BASES[base]
    models, opts = [], []
    for b in (None, backend):
        model, data_of, loss = make("mlp")
        base_opt = cls(model.parameters(), maximize=True, nesterov=True, **kwargs) \
            if base == "sgd" else cls(model.parameters(), maximize=True, **kwargs)
        opts.append(reference.WeightedSAM(model, base_opt, restore="copy", **kw) if b is None
                    else flatfused.WeightedSAM(model, base_opt, backend=b, **kw))
        models.append(model)
    for step in range(3):
        for model, opt in zip(models, opts):
            opt.step(closure_for(model, opt, loss, data_of(step)))
        assert_same_model(*models)


@pytest.mark.parametrize("decouple", [False, True])
def test_two_call_api_and_clipping_match_reference(decouple):
    kw = dict(rho=0.1, gamma=0.9, decouple=decouple, max_norm=0.05)
    ref_model, ref, data_of, loss = build("mlp", "sgd", **kw)
    model, ours, _, _ = build("mlp", "sgd", "torch", **kw)
    for step in range(3):
        for m, opt in ((ref_model, ref), (model, ours)):
            loss(m, data_of(step)).backward()
            opt.first_step(zero_grad=True)
            loss(m, data_of(step)).backward()
            opt.second_step(zero_grad=True)
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, **TOL)


def test_gamma_half_without_decoupling_is_sam():
    torch.manual_seed(0)
    model_a, _, _ = make("mlp")
    model_b, _, _ = make("mlp")
    wsam = flatfused.WeightedSAM(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1,
                                 momentum=0.9), rho=0.05, gamma=0.5, decouple=False)
    sam = flatfused.SAM(model_b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for step in range(3):
        wsam.step(closure_for(model_a, wsam, loss_fn, batch(step)))
        sam.zero_grad()
        loss_fn(model_b, batch(step)).backward()
        sam.step(closure_for(model_b, sam, loss_fn, batch(step)))
        for p, q in zip(model_b.parameters(), model_a.parameters()):
            torch.testing.assert_close(q, p, **TOL)


def test_base_optimizer_class_and_checkpoint_round_trip():
    model, _, _ = make("mlp")
    opt = flatfused.WeightedSAM(model, torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["alpha"] == pytest.approx(9.0)
    for step in range(2):
        opt.step(closure_for(model, opt, loss_fn, batch(step)))
    stream = io.BytesIO()
    torch.save(opt.state_dict(), stream)
    stream.seek(0)
    sd = torch.load(stream)
    twin, _, _ = make("mlp")
    twin.load_state_dict(model.state_dict())
    other = flatfused.WeightedSAM(twin, torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1)
    other.load_state_dict(sd)
    for m, o in ((model, opt), (twin, other)):
        o.step(closure_for(m, o, loss_fn, batch(5)))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_bad_input():
    model, _, _ = make("mlp")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="gamma"):
        flatfused.WeightedSAM(model, sgd, gamma=1.0)
    for bad in (None, "0.5", True):
        with pytest.raises(TypeError, match="gamma must be a real number"):
            flatfused.WeightedSAM(model, sgd, gamma=bad)
    with pytest.raises(TypeError, match="rho must be a real number"):
        flatfused.WeightedSAM(model, sgd, rho="0.05")
    with pytest.raises(ValueError, match="rho"):
        flatfused.WeightedSAM(model, sgd, rho=-0.1)
    with pytest.raises(ValueError, match="sam_eps"):
        flatfused.WeightedSAM(model, sgd, sam_eps=float("nan"))
    with pytest.raises(TypeError, match="model"):
        flatfused.WeightedSAM(list(model.parameters()), sgd)
    opt = flatfused.WeightedSAM(model, sgd)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


@pytest.mark.parametrize("decouple,max_norm", [(False, None), (True, None), (True, 1e6)])
def test_closure_error_in_second_pass(decouple, max_norm):
    """Every form takes its base step after both passes: a second pass that raises leaves
    exactly the weights before the step (and the base optimizer's state, test_step_state.py)."""
    model, _, _ = make("mlp")
    opt = flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=1.0,
                                gamma=0.9, decouple=decouple, max_norm=max_norm)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, batch(0)).backward()
    opt.zero_grad()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("data loader died")
        value = loss_fn(model, batch(0))
        value.backward()
        return value

    with pytest.raises(KeyError):
        opt.step(closure)
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("decouple", [False, True])
def test_state_beyond_the_base_optimizers(base, decouple):
    """step(closure) keeps the saved weights, and with decouple=True the saved clean gradient
    (the base step needs g itself, after the second pass)."""
    cls, kwargs = BASES[base]
    model, _, _ = make("mlp")
    opt = flatfused.WeightedSAM(model, cls, rho=0.05, decouple=decouple, **kwargs)
    for step in range(2):
        opt.step(closure_for(model, opt, loss_fn, batch(step)))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state_bytes = sum(t.numel() * t.element_size() for b in opt.flat_buffers
                      for t in b.state.values())
    base_bytes = sum(t.numel() * t.element_size() for s in opt.base_optimizer.state.values()
                     for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert state_bytes - base_bytes == (2 if decouple else 1) * param_bytes


@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("two_call", [False, True])
def test_other_base_optimizers_run_through_their_own_step(decouple, two_call):
    kw = dict(rho=0.05, gamma=0.8, decouple=decouple)
    models = [make("mlp")[0] for _ in range(2)]
    ref = reference.WeightedSAM(models[0], torch.optim.Adagrad(models[0].parameters(), lr=1e-2),
                                restore="copy", **kw)
    ours = flatfused.WeightedSAM(models[1], torch.optim.Adagrad(models[1].parameters(), lr=1e-2),
                                 **kw)
    for step in range(3):
        for m, opt in zip(models, (ref, ours)):
            if two_call:
                opt.zero_grad()
                loss_fn(m, batch(step)).backward()
                opt.first_step(zero_grad=True)
                loss_fn(m, batch(step)).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step(closure_for(m, opt, loss_fn, batch(step)))
        for p, q in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(q, p, **TOL)


def test_hyperparameters_do_not_collide_with_the_base_optimizers():
    """RMSprop's alpha and Adadelta's rho keep their values (the references overwrite them)."""
    model, _, _ = make("mlp")
    opt = flatfused.WeightedSAM(model, torch.optim.RMSprop(model.parameters(), lr=1e-2),
                                gamma=0.9, rho=0.05)
    group = opt.param_groups[0]
    assert (opt.alpha_key, group["wsam_alpha"], group["alpha"]) == ("wsam_alpha", pytest.approx(9.0), 0.99)
    opt.step(closure_for(model, opt, loss_fn, batch(0)))
    opt = flatfused.SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    group = opt.param_groups[0]
    assert (opt.rho_key, group["sam_rho"], group["rho"]) == ("sam_rho", 0.05, 0.9)
    assert flatfused.SAM(model.parameters(), torch.optim.SGD, lr=0.1).rho_key == "rho"


GRAD_EDITS = {
    "clip_grad_norm_": lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05),
    "mul_": lambda model: [p.grad.mul_(0.5) for p in model.parameters() if p.grad is not None],
    "zero_in_place": None,  # only model.zero_grad(set_to_none=False) before the backward
}


@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("edit", sorted(GRAD_EDITS))
def test_closure_that_writes_grads_in_place_matches_reference(decouple, edit):
    """Lightning clips inside the closure; others zero .grad in place. The clean gradient
    must then not wait in .grad for the second pass: the step detects the writes and keeps it
    apart (with a warning), and matches the reference, whose passes each see only their own."""
    post = GRAD_EDITS[edit]

    def closure_of(model, opt, data):
        def closure():
            model.zero_grad(set_to_none=post is not None)
            value = loss_fn(model, data)
            value.backward()
            if post is not None:
                post(model)
            return value
        return closure

    kw = dict(rho=0.05, gamma=0.8, decouple=decouple)
    ref_model, ref, _, _ = build("mlp", "sgd", **kw)
    model, ours, _, _ = build("mlp", "sgd", "cpu", **kw)
    with pytest.warns(UserWarning, match="writes .grad in place"):
        for step in range(3):
            ref.step(closure_of(ref_model, ref, batch(step)))
            ours.step(closure_of(model, ours, batch(step)))
            assert_same_model(ref_model, model)


def test_plain_closure_keeps_the_clean_gradient_in_grad(monkeypatch):
    """Without in-place writes every coupled step takes the one-copy path: no saved-gradient
    buffer."""
    fast = []
    original = flatfused.WeightedSAM._step_accumulating
    monkeypatch.setattr(flatfused.WeightedSAM, "_step_accumulating",
                        lambda self, *a, **k: fast.append(1) or original(self, *a, **k))
    model, opt, _, _ = build("mlp", "sgd", "cpu", rho=0.05, gamma=0.8, decouple=False)
    for step in range(3):
        opt.step(closure_for(model, opt, loss_fn, batch(step)))
    assert len(fast) == 3
    assert all("g0" not in buf.state for buf in opt.flat_buffers)


def plain_closure(model, loss, data):
    def closure():
        value = loss(model, data)
        value.backward()
        return value
    return closure


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_first_pass_adds_to_the_gradients_from_before_the_step(backend, decouple, max_norm):
    """The published usage: a backward, step(closure) (whose first pass adds to it, doubling
    the clean gradient in the reference), then zero_grad()."""
    kw = dict(rho=0.05, gamma=0.8, decouple=decouple, max_norm=max_norm)
    ref_model, ref, data_of, loss = build("cnn", "sgd", **kw)
    model, ours, _, _ = build("cnn", "sgd", backend, **kw)
    for step in range(3):
        for m, opt in ((ref_model, ref), (model, ours)):
            loss(m, data_of(step)).backward()
            opt.step(plain_closure(m, loss, data_of(step)))
            opt.zero_grad()
        assert_same_model(ref_model, model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_loop_without_zero_grad_matches_reference(backend, max_norm):
    """No zero_grad anywhere: each step's first pass adds to what the last step left in .grad
    (the coupled form leaves the reference's update direction there)."""
    kw = dict(rho=0.05, gamma=0.8, decouple=False, max_norm=max_norm)
    ref_model, ref, data_of, loss = build("mlp", "adamw", **kw)
    model, ours, _, _ = build("mlp", "adamw", backend, **kw)
    for step in range(3):
        ref.step(plain_closure(ref_model, loss, data_of(step)))
        ours.step(plain_closure(model, loss, data_of(step)))
        assert_same_model(ref_model, model)
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL)


@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("clear", ["optimizer", "model"])
def test_zero_grad_in_the_first_pass_clears_the_earlier_gradients(decouple, clear, monkeypatch):
    """The closure's optimizer.zero_grad() (Lightning's) or model.zero_grad() clears what was
    in .grad before the step, as in the reference: no edit of the clean gradient (no warning,
    the coupled form's one-copy path), and the same weights."""
    fast = []
    original = flatfused.WeightedSAM._step_accumulating
    monkeypatch.setattr(flatfused.WeightedSAM, "_step_accumulating",
                        lambda self, *a, **k: fast.append(1) or original(self, *a, **k))

    def closure_of(model, opt, data):
        def closure():
            (opt if clear == "optimizer" else model).zero_grad()
            value = loss_fn(model, data)
            value.backward()
            return value
        return closure

    kw = dict(rho=0.05, gamma=0.8, decouple=decouple)
    ref_model, ref, _, _ = build("mlp", "sgd", **kw)
    model, ours, _, _ = build("mlp", "sgd", "cpu", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            for m, opt in ((ref_model, ref), (model, ours)):
                loss_fn(m, batch(step + 10)).backward()  # to be cleared
                opt.step(closure_of(m, opt, batch(step)))
            assert_same_model(ref_model, model)
    assert len(fast) == (0 if decouple else 3)
    assert all(("g0" in buf.state) == decouple for buf in ours.flat_buffers)


@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_scaled_gradients_from_before_the_step(decouple, unscale_first):
    """Under a GradScaler the earlier backward is scaled too (or unscaled by scaler.unscale_
    before the step): the step equals the unscaled one (power-of-two scale; the decoupled form
    takes its two-call path under AMP, which rounds differently)."""
    kw = dict(rho=0.05, gamma=0.8, decouple=decouple)
    plain_model, plain, data_of, loss = build("mlp", "sgd", "cpu", **kw)
    model, ours, _, _ = build("mlp", "sgd", "cpu", **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        loss(plain_model, data_of(step)).backward()
        plain.step(plain_closure(plain_model, loss, data_of(step)))
        plain.zero_grad()

        scaler.scale(loss(model, data_of(step))).backward()
        if unscale_first:
            scaler.unscale_(ours)

        def closure():
            value = loss(model, data_of(step))
            scaler.scale(value).backward()
            return value
        scaler.step(ours, closure)
        scaler.update()
        ours.zero_grad()
        assert scaler.get_scale() == 2.0**12
        for p, q in zip(plain_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, **TOL)


def test_step_turns_batchnorm_statistics_on_for_the_clean_pass():
    """The reference's step starts with enable_running_stats: a model left with BN statistics
    off still updates them in the clean pass."""
    from flatfused.bn import disable_running_stats

    model, opt, data_of, loss = build("cnn", "sgd", "cpu", rho=0.05)
    disable_running_stats(model)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    opt.step(closure_for(model, opt, loss, data_of(0)))
    assert not torch.equal(bn.running_mean, before)
    assert bn.momentum == 0.1


@pytest.mark.parametrize("kind", ["sam", "wsam-coupled", "wsam-decoupled"])
@pytest.mark.parametrize("two_call", [False, True])
def test_a_failing_base_step_leaves_the_saved_weights(kind, two_call):
    """A base step that raises (here: momentum state loaded for another width) must not leave
    the model at the ascent point w + e."""
    model, _, _ = make("mlp")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = (flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
           if kind == "sam" else
           flatfused.WeightedSAM(model, sgd, rho=0.05, gamma=0.8,
                                 decouple=kind == "wsam-decoupled"))
    closure = closure_for(model, opt, loss_fn, batch(0))
    if kind == "sam":
        closure()
    opt.step(closure)
    p = model.fc1.weight
    opt.state[p]["momentum_buffer"] = torch.zeros(p.shape[0] + 1, p.shape[1])  # corrupt
    before = [q.detach().clone() for q in model.parameters()]
    with pytest.raises(RuntimeError):
        if two_call:
            closure()
            opt.first_step(zero_grad=True)
            closure()
            opt.second_step()
        else:
            if kind == "sam":
                closure()
            opt.step(closure)
    for a, q in zip(before, model.parameters()):
        assert torch.equal(a, q)
