"""Parameters without a gradient (``.grad is None``) are skipped by the base update, as
torch.optim skips them (and the reference SAM / WSAM loops do): no weight decay, no momentum,
no Adam moments or step count. The fused update runs around them (one launch per run of
parameters alike), and gradients reach the flat buffer in place all the same."""
import warnings

import pytest
import torch

import flatfused
from flatfused import reference
from cases import CPU_BACKENDS

BACKENDS = CPU_BACKENDS

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}
# Which heads each step's passes use: "b" joins at step 1, "a" sits out step 1, "never" never
# takes part.
HEADS = [("a",), ("b",), ("a",), ("a", "b")]


class Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(5, 6)
        self.a = torch.nn.Linear(6, 3)
        self.b = torch.nn.Linear(6, 3)
        self.never = torch.nn.Linear(6, 3)

    def forward(self, x, heads):
        h = torch.tanh(self.body(x))
        return sum(getattr(self, name)(h) for name in heads)


def fused_only(*args, **kwargs):
    raise AssertionError("the base optimizer's own step() ran instead of the fused update")


def pair():
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Heads())
    return models


def data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 5, generator=g)


def flat_optimizer(kind, model, base, backend):
    """The wrapper with its extra passes switched off, so that its update is the base step."""
    cls, kw = BASES[base]
    if kind == "nso":
        return flatfused.NSO(model, cls, lam=1.0, backend=backend, **kw)
    if kind == "sam":
        return flatfused.SAM(model.parameters(), cls, rho=0.0, backend=backend, **kw)
    return flatfused.WeightedSAM(model, cls(model.parameters(), **kw), rho=0.0, gamma=0.9,
                                 backend=backend)


@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("kind,backend", [("nso", "auto"), ("wsam", "auto")]
                         + [("sam", b) for b in BACKENDS])
def test_steps_as_torch_skipping_parameters_without_gradient(kind, backend, base, set_to_none):
    """With ``zero_grad(set_to_none=False)`` a head that sat out a step after having had a
    gradient has a zero one (torch decays it too); with ``set_to_none=True`` it is skipped.
    The head that joins late has fewer Adam steps: a launch of its own. (SAM's step treats a
    head its second pass does not reach as the reference's ``first_step(zero_grad=True)``,
    which sets the gradients to None between the passes, would: skipped either way.)"""
    model, twin = pair()
    never = [p.detach().clone() for p in model.never.parameters()]
    opt = flat_optimizer(kind, model, base, backend)
    opt.base_optimizer.step = fused_only
    cls, kw = BASES[base]
    plain = cls(twin.parameters(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's and the gathering's, once each
        for step, heads in enumerate(HEADS):
            x = data(step)

            def closure():
                loss = model(x, heads).square().mean()
                loss.backward()
                return loss

            if set_to_none:
                model.zero_grad(set_to_none=True)
            else:
                opt.zero_grad(set_to_none=False)
            if kind == "sam":
                closure()
            opt.step(closure)
            plain.zero_grad(set_to_none=set_to_none or kind == "sam")
            twin(x, heads).square().mean().backward()
            plain.step()
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"{name}, step {step}")
                assert (p.grad is None) == (q.grad is None), name
    for p, before in zip(model.never.parameters(), never):
        assert p.grad is None and torch.equal(p, before)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_the_reference_with_an_unused_head(adaptive):
    """The reference SAM skips parameters without a gradient in both steps and in its base
    step; weight decay shows whether the unused head moved."""
    models = pair()
    cls, kw = BASES["sgd"]
    ref = reference.SAM(models[0].parameters(), cls, rho=0.05, adaptive=adaptive, **kw)
    ours = flatfused.SAM(models[1].parameters(), cls, rho=0.05, adaptive=adaptive, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            for model, opt in zip(models, (ref, ours)):
                reference.sam_train_step(model, opt, lambda m, x: m(x, ("a",)).square().mean(),
                                         data(step))
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert models[1].never.weight.grad is None


class SAMThroughFirstStep(flatfused.SAM):
    """Overrides first_step, so that step(closure) calls it (as the reference's step does) and
    releases the gradients between the passes instead of watching the second one."""

    def first_step(self, zero_grad=False):
        super().first_step(zero_grad)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_step_skips_what_its_second_pass_does_not_reach(base):
    """SAM.step(closure) keeps the zeroed gradients attached for the second pass and watches
    which parameters it reaches: a head the first pass reached and the second did not ends as
    with the reference's zero_grad() between them (``.grad`` None, restored, not stepped), and
    the other gradients stay views of the flat buffer."""
    cls, kw = BASES[base]
    models = pair()
    opts = [flatfused.SAM(models[0].parameters(), cls, rho=0.05, **kw),
            SAMThroughFirstStep(models[1].parameters(), cls, rho=0.05, **kw)]
    for step in range(3):
        x = data(step)
        second = ("a",) if step != 1 else ("a", "b")
        before = [m.b.weight.detach().clone() for m in models]
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x, ("a", "b")).square().mean().backward()
            opt.step(lambda: model(x, second).square().mean().backward())
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name}, step {step}")
            assert (p.grad is None) == (q.grad is None), f"{name}, step {step}"
        if "b" not in second:
            for model, b in zip(models, before):
                assert model.b.weight.grad is None and torch.equal(model.b.weight, b)
    flat = opts[0].flat_buffers[0].grad
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(start <= p.grad.data_ptr() < end
               for p in models[0].parameters() if p.grad is not None)


def test_sam_step_whose_closure_raises_leaves_gradients_none_and_weights_restored():
    model = pair()[0]
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x = data(0)
    model(x, ("a",)).square().mean().backward()
    weights = [p.detach().clone() for p in model.parameters()]

    def closure():
        model(x, ("a",)).square().mean().backward()
        raise KeyError("in the closure")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_nso_perturbs_and_restores_a_parameter_without_gradient():
    """NSO's noise covers every trained parameter (indexed as always); one without a gradient
    is back at its weights after the step and not updated."""
    torch.manual_seed(0)
    model = Heads()
    never = [p.detach().clone() for p in model.never.parameters()]
    opt = flatfused.NSO(model, torch.optim.AdamW, lam=0.0, use_neg=True, sigma=0.1, lr=0.1,
                        weight_decay=0.5)
    seen = []

    def closure():
        seen.append(model.never.weight.detach().clone())
        loss = model(data(0), ("a",)).square().mean()
        loss.backward()
        return loss

    opt.base_optimizer.step = fused_only
    opt.step(closure)
    assert not torch.equal(seen[0], never[0])  # perturbed in the passes
    for p, before in zip(model.never.parameters(), never):
        assert p.grad is None and torch.equal(p, before)


def test_a_gradient_dropped_by_its_holder_stays_the_holders():
    """``g = p.grad; p.grad = None; backward()``: the next gradient is a new tensor, as in
    torch; ``g`` (a view of the flat buffer) keeps its values until the optimizer next reads
    the gradients, which gathers the new one into the buffer."""
    torch.manual_seed(0)
    model = Heads()
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model(data(0), ("a",)).square().mean().backward()
    held = model.a.weight.grad
    kept = held.clone()
    model.a.weight.grad = None
    model(data(1), ("a",)).square().mean().backward()
    assert model.a.weight.grad is not held
    assert torch.equal(held, kept)
    fresh = model.a.weight.grad.clone()
    with pytest.warns(RuntimeWarning, match="replaced"):
        opt.first_step()
    buf = opt.flat_buffers[0]
    assert model.a.weight.grad.data_ptr() >= buf.grad.data_ptr()
    assert torch.equal(model.a.weight.grad, fresh)


def test_closure_setting_gradients_to_none_accumulates_in_place():
    """A closure calling ``model.zero_grad()`` (set_to_none) in a multi-pass step: each pass's
    gradient is attached to the flat buffer before autograd accumulates, no copy or warning,
    and the step equals the one with gradients kept."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Heads())
    opts = [flatfused.NSO(m, torch.optim.SGD, lam=0.0, use_neg=True, seed=3, lr=0.1)
            for m in models]
    for i, (model, opt) in enumerate(zip(models, opts)):
        def closure():
            if i:
                model.zero_grad(set_to_none=True)
            loss = model(data(0), ("a", "b", "never")).square().mean()
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(closure)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


class Branch(torch.nn.Module):
    """A head taken only in the clean pass (odd calls): no gradient in the perturbed pass."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 1)
        self.head = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.body(x).square().mean()
        return out + self.head.square().sum() if self.calls % 2 == 1 else out


@pytest.mark.parametrize("decouple", [False, True])
@pytest.mark.parametrize("two_call", [False, True])
@pytest.mark.parametrize("closure_edits", [False, True])
def test_wsam_parameter_without_a_perturbed_gradient(decouple, two_call, closure_edits):
    """A parameter with a clean gradient g but none at the ascent point has no weighted
    gradient: the coupled form skips it (back at its weights: (1 - alpha) g alone would climb
    for gamma > 0.5), the decoupled form takes the base step with g and no sharpness term.
    Every path agrees: step(closure) accumulating or looking ahead, with a closure that edits
    .grad (the saved-gradient path), and the two-call API."""
    torch.manual_seed(0)
    model = Branch()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    opt = flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5,
                                gamma=0.8, decouple=decouple)

    def closure():
        model.zero_grad()
        loss = model(x)
        loss.backward()
        if closure_edits:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # in place, changes nothing
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            if two_call:
                closure()
                opt.first_step(zero_grad=True)
                closure()
                opt.second_step(zero_grad=True)
            else:
                opt.step(closure)
    # the head's clean gradient is 2 * head: SGD's step multiplies it by 1 - 2 lr = 0.8
    assert model.head.item() == pytest.approx(0.64 if decouple else 1.0, rel=1e-6)


def test_gradient_check_skips_the_walk_when_every_gradient_is_its_slot(monkeypatch):
    """After zero_grad(set_to_none=True), a backward that reaches every parameter attaches every
    slot: the check after it sees only slot addresses and walks no parameter; one that reaches
    some leaves the others missing (the walk)."""
    model = pair()[0]
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    (buf,) = opt.flat_buffers
    x = data(0)
    model(x, ("a", "b", "never")).square().mean().backward()
    opt.step(lambda: model(x, ("a", "b", "never")).square().mean().backward())
    walks = []
    attached = type(buf)._attached
    monkeypatch.setattr(type(buf), "_attached",
                        lambda self, flat: walks.append(flat is self.grad) or attached(self, flat))
    opt.zero_grad()
    assert len(buf.missing) == len(buf.params)
    model(x, ("a", "b", "never")).square().mean().backward()
    buf.check_grads()
    assert buf.missing == set() and not any(walks)
    opt.zero_grad()
    model(x, ("a",)).square().mean().backward()
    buf.check_grads()
    assert any(walks)
    names = [n for n, _ in model.named_parameters()]
    assert {names[i].split(".")[0] for i in buf.missing} == {"b", "never"}


def _gather_pair_step(kind, closure_of, steps=2):
    """Two copies of one model and optimizer; ``closure_of(model, variant)`` builds the
    closure of copy ``variant`` (0: a plain backward). Returns both copies' parameters after
    ``steps`` steps."""
    models = pair()
    results = []
    for variant, model in enumerate(models):
        sgd = dict(lr=0.1, momentum=0.9)
        if kind.startswith("nso"):
            opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, seed=3, use_neg=True,
                                lam=0.5 if kind == "nso_lam" else 0.0, **sgd)
        elif kind == "sam":
            opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd)
        else:
            opt = flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), **sgd),
                                        rho=0.05, gamma=0.8, decouple=kind == "wsam_decoupled")
        closure = closure_of(model, variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gather's warning, when there is one
            for _ in range(steps):
                opt.zero_grad()
                if kind == "sam":
                    closure()
                opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    return results


KINDS = ["nso", "nso_lam", "sam", "wsam", "wsam_decoupled"]


@pytest.mark.parametrize("kind", KINDS)
def test_create_graph_backward_steps_as_a_plain_one(kind):
    """``backward(create_graph=True)`` replaces ``.grad`` by the out-of-place sum of the slot
    and the pass's gradient: gathered back it is the whole sum (copied, not added again)."""
    def closure_of(model, variant):
        def closure():
            loss = model(data(0), ("a", "b")).square().mean()
            loss.backward(create_graph=bool(variant))
            return loss.detach()
        return closure

    plain, create_graph = _gather_pair_step(kind, closure_of)
    for p, q in zip(plain, create_graph):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_closure_assigning_its_gradients_steps_as_a_backward(kind):
    """A closure that assigns ``.grad`` itself (``torch.autograd.grad``) gives each pass's
    gradient alone: gathered, it is added to the earlier passes' sum in the flat buffer."""
    def closure_of(model, variant):
        def closure():
            loss = model(data(0), ("a", "b")).square().mean()
            if variant:
                params = [p for n, p in model.named_parameters() if not n.startswith("never")]
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g
            else:
                loss.backward()
            return loss.detach()
        return closure

    backward, assigned = _gather_pair_step(kind, closure_of)
    for p, q in zip(backward, assigned):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
