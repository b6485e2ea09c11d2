"""The fused restore + base update kernels (sgd_step_, adam_step_) against the torch spec and torch.optim."""
import pytest
import torch

from flatfused import backends, ops
from kernel_cases import DTYPES, assert_close, pairs_param, sizes_for

SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
]


def _state(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(n, generator=g).to(dtype).to(device)  # noqa: E731
    return make(), make(), make(), torch.randn(n, generator=g).to(device), make()


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=["plain", "nesterov-wd", "damp-max"])
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("with_w0,with_src,write_grad", [(True, True, True), (True, False, True),
                                                         (False, False, False)])
def test_sgd_step(backend, device, dtype, config, first_step, with_w0, with_src, write_grad):
    for n in sizes_for(backend):
        w, w0, grad, acc, buf = _state(n, dtype, device, n)
        args = lambda t: t  # noqa: E731
        ref = [t.cpu().clone() for t in (w, w0, grad, acc, buf)]
        momentum_buffer = buf if config["momentum"] else None
        for tensors, be in ((ref, "torch"), ((w, w0, grad, acc, buf), backend)):
            tw, tw0, tg, tacc, tbuf = map(args, tensors)
            ops.sgd_step_(tw, tw0 if with_w0 else None, tg, tacc if with_src else None,
                          tbuf if momentum_buffer is not None else None, scale=0.5, lr=0.1,
                          first_step=first_step, write_grad=write_grad, backend=be, **config)
        assert_close(w, ref[0], dtype)
        assert_close(grad, ref[2], dtype)
        assert_close(buf, ref[4], dtype)


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled,weight_decay,maximize", [(True, 0.1, False), (False, 0.01, True),
                                                             (True, 0.0, False)])
@pytest.mark.parametrize("step", [1, 7])
def test_adam_step(backend, device, dtype, decoupled, weight_decay, maximize, step):
    for n in sizes_for(backend):
        w, w0, grad, acc, m = _state(n, dtype, device, n + 1)
        v = (m.float() ** 2).to(dtype)
        ref = [t.cpu().clone() for t in (w, w0, grad, acc, m, v)]
        hp = dict(scale=2.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=weight_decay, step=step, decoupled=decoupled, maximize=maximize,
                  write_grad=True)
        ops.adam_step_(ref[0], ref[1], ref[2], ref[3], ref[4], ref[5], backend="torch", **hp)
        ops.adam_step_(w, w0, grad, acc, m, v, backend=backend, **hp)
        for got, expected in zip((w, grad, m, v), (ref[0], ref[2], ref[4], ref[5])):
            assert_close(got, expected, dtype)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_torch_spec_matches_torch_optim(kind):
    """The specification itself against torch.optim's single-tensor loop, several steps."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    q = p.detach().clone()
    if kind == "sgd":
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                              foreach=False)
        buf = torch.empty_like(q)
    else:
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        opt = cls([p], lr=1e-2, weight_decay=0.1, foreach=False)
        m, v = torch.zeros_like(q), torch.zeros_like(q)
    for step in range(1, 5):
        g = torch.randn(1000)
        p.grad = g.clone()
        opt.step()
        if kind == "sgd":
            ops.sgd_step_(q, None, g.clone(), None, buf, lr=0.1, momentum=0.9,
                          weight_decay=1e-3, nesterov=True, first_step=step == 1, backend="torch")
        else:
            ops.adam_step_(q, None, g.clone(), None, m, v, lr=1e-2, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.1, step=step, decoupled=kind == "adamw",
                           backend="torch")
        torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)


def test_step_argument_errors():
    w = torch.zeros(4)
    with pytest.raises(ValueError, match="momentum_buffer"):
        ops.sgd_step_(w, None, torch.zeros(4), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="step"):
        ops.adam_step_(w, None, torch.zeros(4), None, torch.zeros(4), torch.zeros(4), lr=0.1,
                       beta1=0.9, beta2=0.99, eps=1e-8, step=0)
    with pytest.raises(TypeError, match="dtype"):
        ops.sgd_step_(w, None, torch.zeros(4, dtype=torch.float16), lr=0.1)


# ---------------------------------------------------------------- Weighted SAM's fused terms

WSAM_WEIGHTS = [(0.3, 0.0), (0.0, 0.02), (0.3, 0.02)]


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_weight,sharpness_weight", WSAM_WEIGHTS)
@pytest.mark.parametrize("src_fp32,momentum", [(False, 0.9), (True, 0.0)])
def test_sgd_step_wsam(backend, device, dtype, grad_weight, sharpness_weight, src_fp32, momentum):
    for n in sizes_for(backend):
        w, w0, grad, acc, buf = _state(n, dtype, device, n + 2)
        src = acc if src_fp32 else acc.to(dtype)
        ref = [t.cpu().clone() for t in (w, w0, grad, src, buf)]
        hp = dict(scale=0.7, lr=0.1, momentum=momentum, weight_decay=1e-3, nesterov=momentum > 0,
                  write_grad=True, grad_weight=grad_weight, sharpness_weight=sharpness_weight)
        mom = lambda b: b if momentum else None  # noqa: E731
        ops.sgd_step_(ref[0], ref[1], ref[2], ref[3], mom(ref[4]), backend="torch", **hp)
        ops.sgd_step_(w, w0, grad, src, mom(buf), backend=backend, **hp)
        for got, expected in zip((w, grad, buf), (ref[0], ref[2], ref[4])):
            assert_close(got, expected, dtype)


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_weight,sharpness_weight", WSAM_WEIGHTS)
def test_adam_step_wsam(backend, device, dtype, grad_weight, sharpness_weight):
    for n in sizes_for(backend):
        w, w0, grad, g0, m = _state(n, dtype, device, n + 3)
        g0, v = g0.to(dtype), (m.float() ** 2).to(dtype)
        ref = [t.cpu().clone() for t in (w, w0, grad, g0, m, v)]
        hp = dict(scale=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3,
                  decoupled=True, write_grad=False, grad_weight=grad_weight,
                  sharpness_weight=sharpness_weight)
        ops.adam_step_(*ref, backend="torch", **hp)
        ops.adam_step_(w, w0, grad, g0, m, v, backend=backend, **hp)
        for got, expected in zip((w, grad, m, v), (ref[0], ref[2], ref[4], ref[5])):
            assert_close(got, expected, dtype)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("decouple", [False, True])
def test_torch_spec_matches_weighted_sam(kind, decouple):
    """The fused second step of Weighted SAM against the reference's: .grad mixed, the base
    step, then (decouple) p.add_(g - g0, alpha=-lr * alpha); weights restored from w0 first."""
    torch.manual_seed(1)
    n, lr, alpha = 1000, 0.1 if kind == "sgd" else 1e-2, 0.5
    w0, g0, g = torch.randn(n), torch.randn(n), torch.randn(n)
    p = torch.nn.Parameter(w0.clone())
    if kind == "sgd":
        opt = torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=1e-3, foreach=False)
    else:
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.1, foreach=False)
    p.grad = g0.clone() if decouple else (1 - alpha) * g0 + alpha * g
    opt.step()
    if decouple:
        with torch.no_grad():
            p.add_(g - g0, alpha=-lr * alpha)
    weights = (dict(scale=1.0, grad_weight=0.0, sharpness_weight=lr * alpha) if decouple
               else dict(scale=1 - alpha, grad_weight=alpha, sharpness_weight=0.0))
    q, grad = torch.randn(n), g.clone()  # q: the perturbed weights, restored from w0
    if kind == "sgd":
        ops.sgd_step_(q, w0, grad, g0, torch.empty(n), lr=lr, momentum=0.9, weight_decay=1e-3,
                      first_step=True, write_grad=True, backend="torch", **weights)
    else:
        ops.adam_step_(q, w0, grad, g0, torch.zeros(n), torch.zeros(n), lr=lr, beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=0.1, step=1, write_grad=True,
                       backend="torch", **weights)
    torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, p.grad, rtol=1e-6, atol=1e-7)  # .grad as the reference leaves it


def test_wsam_weights_need_src():
    w = torch.zeros(4)
    with pytest.raises(ValueError, match="grad_weight and sharpness_weight need src"):
        ops.sgd_step_(w, None, torch.zeros(4), lr=0.1, grad_weight=0.5)
    with pytest.raises(ValueError, match="need src"):
        ops.adam_step_(w, None, torch.zeros(4), None, torch.zeros(4), torch.zeros(4), lr=0.1,
                       beta1=0.9, beta2=0.99, eps=1e-8, step=1, sharpness_weight=0.1)
    for name in ("cpu", "triton"):
        if name not in backends.available(torch.device("cpu")):
            continue
        kernel = ops.kernel("sgd_step_", name)
        with pytest.raises((RuntimeError, ValueError), match="need src"):
            kernel(w, None, torch.zeros(4), None, None, 1.0, 0.1, 0.0, 0.0, 0.0, False, False,
                   False, False, 0.0, 0.5)
        kernel = ops.kernel("adam_step_", name)
        with pytest.raises((RuntimeError, ValueError), match="need src"):
            kernel(w, None, torch.zeros(4), None, torch.zeros(4), torch.zeros(4), 1.0, 0.1, 0.9,
                   0.99, 1e-8, 0.0, 0.1, 0.1, True, False, False, 0.5)
    assert not w.any()
