"""torch.optim's gradient semantics, whatever wrote the gradient: ``zero_grad`` zeroes (or drops)
every gradient, ``.data`` writes included, and a ``.grad`` tensor the user kept is no longer
wired to the optimizer's flat gradient buffer once ``zero_grad(set_to_none=True)`` dropped it."""
import pytest
import torch

import flatfused
from cases import CPU_BACKENDS

BACKENDS = CPU_BACKENDS


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    return model, (x, y)


def backward(model, data):
    x, y = data
    torch.nn.functional.mse_loss(model(x), y).backward()


def make(kind, model, backend):
    if kind == "nso":
        return flatfused.NSO(model, torch.optim.SGD, sigma=0.01, lr=0.1, backend=backend)
    if kind == "sam":
        return flatfused.SAM(model, torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    return flatfused.WeightedSAM(model, torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)


# ----------------------------------------------------------------------- 1. .data writes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_grad_zeroes_what_a_data_write_put_there(kind, backend, set_to_none):
    model, data = model_and_batch()
    opt = make(kind, model, backend)
    backward(model, data)
    opt.zero_grad(set_to_none=False)
    model[0].weight.grad.data.fill_(5.0)  # .data writes bump no version counter
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else bool((p.grad == 0).all())
    backward(model, data)
    expected, _ = model_and_batch()
    backward(expected, data)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_zero_grad_zeroes_what_a_data_write_put_there(backend, three_call_mode):
    model, data = model_and_batch()
    opt = make("nso", model, backend)
    backward(model, data)
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    model[0].weight.grad.data.fill_(5.0)
    opt.first_step(zero_grad=True)
    assert all(bool((p.grad == 0).all()) for p in model.parameters())
    opt.store_gradients(zero_grad=True, update_weight=1.0)
    model[2].bias.grad.data.fill_(5.0)
    opt.first_step(zero_grad=True, store_perturb=False)
    assert all(bool((p.grad == 0).all()) for p in model.parameters())
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_nso_step_discards_gradients_written_through_data(backend, lam):
    """``step(closure)`` discards the gradients present before it, however they were written."""
    results = []
    for poison in (False, True):
        model, data = model_and_batch()
        opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.01, lr=0.1, lam=lam, seed=3,
                            backend=backend)
        backward(model, data)
        opt.zero_grad()
        if poison:
            for p in model.parameters():
                p.grad.data.fill_(5.0)

        def closure():
            x, y = data
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# --------------------------------------------------------- 2. a kept .grad is not wired


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
@pytest.mark.parametrize("derived", [False, True])
def test_a_kept_grad_is_detached_by_set_to_none(kind, backend, derived):
    model, data = model_and_batch()
    opt = make(kind, model, backend)
    backward(model, data)
    kept = model[0].weight.grad
    if derived:  # a view of it (a logger keeping grad.view(-1), grad[0], ...)
        kept = kept.view(-1)
    values = kept.clone()
    opt.zero_grad(set_to_none=True)
    # As in torch: the dropped tensor keeps its values and belongs to whoever holds it.
    torch.testing.assert_close(kept, values, rtol=0, atol=0)
    kept.fill_(5.0)
    backward(model, data)
    expected, _ = model_and_batch()
    backward(expected, data)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert bool((kept == 5.0).all())  # the next backward did not write into it either


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_first_step_zero_grad_detaches_a_kept_grad(backend):
    """The reference's ``first_step(zero_grad=True)`` sets every ``.grad`` to None."""
    model, data = model_and_batch()
    opt = make("sam", model, backend)
    backward(model, data)
    kept = model[2].weight.grad
    values = kept.clone()
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(kept, values, rtol=0, atol=0)
    kept.fill_(5.0)
    backward(model, data)  # at the ascent point
    assert bool((kept == 5.0).all())
    assert not bool((model[2].weight.grad == 5.0).any())
    opt.second_step(zero_grad=True)


def test_unshared_gradients_stay_in_place():
    """Without a kept reference, set_to_none reuses the flat buffer (no allocation per step)."""
    model, data = model_and_batch()
    opt = make("sam", model, "torch")
    backward(model, data)
    flat = opt.flat_buffers[0].grad
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        backward(model, data)
    assert opt.flat_buffers[0].grad is flat
    assert model[0].weight.grad.data_ptr() == flat.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kept_grad_never_becomes_the_accumulator(backend, three_call_mode):
    """NSO's three-call API may hand the gradient buffer over as its accumulator instead of
    zeroing it; a ``.grad`` the caller kept must still read zero afterwards (torch's in-place
    zero_grad) and never alias the accumulator: the handover is skipped then. (update_weight
    0.5, a power of two, rounds alike either way.)"""
    results = []
    for keep in (False, True):
        model, data = model_and_batch()
        opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.01, lr=0.1, seed=1, backend=backend)
        backward(model, data)
        opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
        opt.first_step(zero_grad=True)
        backward(model, data)
        kept = [p.grad for p in model.parameters()] if keep else []
        opt.store_gradients(zero_grad=True, update_weight=0.5)
        assert all(bool((k == 0).all()) for k in kept)
        opt.first_step(zero_grad=True, store_perturb=False)
        backward(model, data)
        opt.store_gradients(zero_grad=True, update_weight=0.5)
        assert all(bool((k == 0).all()) for k in kept)
        opt.second_step(zero_grad=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_a_newer_optimizer_over_the_same_parameters_takes_them_over(kind):
    """A parameter belongs to one flat optimizer at a time: the earlier one's gradient hooks
    stand down (no slot of its buffer attached as .grad, nothing gathered, no warning) and it
    refuses to step parameters it no longer holds."""
    import warnings

    model, data = model_and_batch()
    old = make(kind, model, "torch")
    new = make(kind, model, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new.zero_grad()
        backward(model, data)
        (buf,) = new.flat_buffers
        assert all(p.grad.data_ptr() == buf.grad.data_ptr() + 4 * o
                   for p, o in zip(buf.params, buf.offsets))
        new.step(lambda: backward(model, data))
    with pytest.raises(RuntimeError, match="created after this one"):
        old.zero_grad()
