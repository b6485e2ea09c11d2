"""torch.compile: the registered ops compile into one graph (fullgraph) and compute what they do
eagerly, and the optimizers train a compiled model exactly as they train the eager one."""
import copy

import pytest
import torch

import flatfused
from flatfused import _extension

from conftest import DEVICES

pytestmark = pytest.mark.skipif(not _extension.has_cpu_kernels(),
                                reason="flatfused._C (registered ops) not built")


def _nso_schedule_in_ops(w, w0, grad, acc, momentum, rng):
    """One three-call NSO step written with the registered ops (two-point, SGD momentum)."""
    ops = torch.ops.flatfused
    ops.perturb_(w, w0, rng, 0, 0, 0.05, True, grad)  # save w0, move to w0 + u, zero grad
    grad.add_(torch.sin(w))  # a gradient that depends on where the weights are
    ops.accumulate_(acc, grad, 0.5, True, True)
    ops.perturb_(w, w0, rng, 0, 0, -0.05, False)
    grad.add_(torch.sin(w))
    ops.accumulate_(acc, grad, 0.5, False, True)
    ops.sgd_step_(w, w0, grad, acc, momentum, 1.0, 0.1, 0.9, 0.0, 1e-4, False, False, False, True)
    norm = torch.zeros(1, device=w.device)
    ops.grad_norm_sq_(norm, grad, None)
    return norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_registered_ops_compile_into_one_graph_and_match_eager(device, backend):
    n = 1000 + 7

    def inputs():
        g = torch.Generator().manual_seed(0)
        t = [torch.randn(n, generator=g) for _ in range(5)]
        return [x.to(device) for x in t] + [torch.tensor([7, 3], device=device)]
    eager, compiled = inputs(), inputs()
    torch._dynamo.reset()
    step = torch.compile(_nso_schedule_in_ops, fullgraph=True, backend=backend)
    norm_eager = _nso_schedule_in_ops(*eager)
    norm_compiled = step(*compiled)
    # The ops mutate their arguments in place: every buffer is as eager left it. (Inductor may
    # fuse the surrounding sin/add differently: within rounding.)
    tol = dict(rtol=1e-6, atol=1e-6) if backend == "inductor" else dict(rtol=0, atol=0)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, **tol)
    torch.testing.assert_close(norm_compiled, norm_eager, rtol=1e-5, atol=0)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _train(model, forward, make_optimizer, kind, steps=3):
    """Losses and final weights of a few steps; ``forward`` is the model or its compiled form
    (the optimizer always gets the original module, as with ``torch.compile``'s wrapper)."""
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(12, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen)

        def closure():
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            return loss
        if kind == "nso three-call":
            closure()
            opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
            for store_perturb in (True, False):
                opt.first_step(zero_grad=True, store_perturb=store_perturb)
                losses.append(closure().detach())
                opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
            opt.second_step(zero_grad=True)
        elif kind == "sam":
            opt.zero_grad()
            losses.append(closure().detach())
            opt.step(closure)
        else:
            losses.append(opt.step(closure).detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


OPTIMIZERS = {
    "nso": lambda m: flatfused.NSO(m, torch.optim.SGD, sigma=0.05, lr=0.1, momentum=0.9,
                                   lam=0.0, use_neg=True, seed=3),
    "nso three-call": lambda m: flatfused.NSO(m, torch.optim.AdamW, sigma=0.05, lr=1e-2,
                                              seed=3),
    "sam": lambda m: flatfused.SAM(m, torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optimizers_train_a_compiled_model_as_the_eager_one(kind):
    """Flattening re-points the compiled module's parameters at flat buffers after it first ran;
    step(closure)'s BatchNorm bypass changes a module attribute between passes. Neither may
    change what is computed."""
    eager_model = _model()
    compiled_model = copy.deepcopy(eager_model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    warm_up = torch.randn(4, 8)
    eager_model(warm_up)
    compiled(warm_up)  # compiled before the optimizer flattens the parameters
    eager_losses, eager_weights = _train(eager_model, eager_model, OPTIMIZERS[kind], kind)
    losses, weights = _train(compiled_model, compiled, OPTIMIZERS[kind], kind)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=1e-6)
    for a, b in zip(eager_weights, weights):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for a, b in zip(eager_model.buffers(), compiled_model.buffers()):  # BatchNorm statistics
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(eager_weights, _model().parameters()))
