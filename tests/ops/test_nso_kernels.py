"""The NSO kernels (perturb_, accumulate_, restore_) on every backend against the torch spec."""
import pytest
import torch

from flatfused import ops
from kernel_cases import DTYPES, assert_close, pairs_param, sizes_for

DISTS = ["normal", "laplace", "uniform", "binomial", "cauchy"]


def _inputs(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    w = torch.randn(n, generator=g).to(dtype)
    grad = torch.randn(n, generator=g).to(dtype)
    acc = torch.randn(n, generator=g)
    return w.to(device), grad.to(device), acc.to(device)


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("zero_grad", [False, True])
def test_perturb(backend, device, dtype, save, zero_grad):
    for n in sizes_for(backend):
        for base, sigma in [(0, 0.05), (3, -0.5), (2**33 + 5, 1.0)]:
            w, grad, _ = _inputs(n, dtype, device)
            w0 = (w * 0.5).to(dtype)
            rng = ops.rng_state(2**40 + 7, 123, device)
            w_ref, w0_ref = w.cpu().clone(), w0.cpu().clone()
            grad_ref = grad.cpu().clone() if zero_grad else None
            ops.perturb_(w_ref, w0_ref, rng.cpu(), base, sigma, save=save, grad=grad_ref,
                         backend="torch")
            ops.perturb_(w, w0, rng, base, sigma, save=save, grad=grad if zero_grad else None,
                         backend=backend)
            assert_close(w, w_ref, dtype)
            assert torch.equal(w0.cpu(), w0_ref)
            if zero_grad:
                assert torch.equal(grad.cpu(), grad_ref) and not grad.any()


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero(backend, device, dtype):
    for n in sizes_for(backend):
        _, grad, _ = _inputs(n, dtype, device)
        ops.zero_(grad, backend=backend)
        assert grad.dtype == dtype and not grad.any()
    # a non-contiguous view is zeroed where it lies, nothing else
    full = torch.ones(6, 5, dtype=dtype, device=device)
    ops.zero_(full[:, 1:3].t(), backend=backend)
    expected = torch.ones(6, 5, dtype=dtype)
    expected[:, 1:3] = 0
    assert torch.equal(full.cpu(), expected)


@pairs_param()
@pytest.mark.parametrize("dist", DISTS)
def test_perturb_distributions(backend, device, dist):
    n = 4097
    w, _, _ = _inputs(n, torch.float32, device)
    w0 = torch.empty_like(w)
    rng = ops.rng_state(5, 9, device)
    w_ref, w0_ref = w.cpu().clone(), w0.cpu().clone()
    ops.perturb_(w_ref, w0_ref, rng.cpu(), 1, 0.1, dist, save=True, backend="torch")
    ops.perturb_(w, w0, rng, 1, 0.1, dist, save=True, backend=backend)
    tol = dict(rtol=1e-5, atol=1e-5) if dist == "cauchy" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.cpu(), w_ref, **tol)


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init,zero_grad", [(True, True), (False, False), (False, True)])
def test_accumulate(backend, device, dtype, init, zero_grad):
    for n in sizes_for(backend):
        _, grad, acc = _inputs(n, dtype, device)
        grad_ref, acc_ref = grad.cpu().clone(), acc.cpu().clone()
        ops.accumulate_(acc_ref, grad_ref, 0.375, init, zero_grad, backend="torch")
        ops.accumulate_(acc, grad, 0.375, init, zero_grad, backend=backend)
        assert_close(acc, acc_ref, torch.float32)
        assert torch.equal(grad.cpu(), grad_ref)


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_grad,with_src", [(False, False), (True, False), (True, True)])
def test_restore(backend, device, dtype, with_grad, with_src):
    for n in sizes_for(backend):
        w, grad, acc = _inputs(n, dtype, device)
        w0 = (w * 3).to(dtype)
        g = grad if with_grad else None
        src = acc if with_src else None
        w_ref = w.cpu().clone()
        g_ref = g.cpu().clone() if g is not None else None
        ops.restore_(w_ref, w0.cpu(), g_ref, None if src is None else src.cpu(), 0.25,
                     backend="torch")
        ops.restore_(w, w0, g, src, 0.25, backend=backend)
        assert torch.equal(w.cpu(), w_ref)
        if g is not None:
            assert_close(g, g_ref, dtype)


@pairs_param()
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(64, 33, device=device)
    w = base.t()  # non-contiguous view, written back after the kernel
    w0 = torch.empty(33, 64, device=device).t()
    w_ref, w0_ref = w.cpu().clone(), w0.cpu().clone()
    rng = ops.rng_state(1, 2, device)
    ops.perturb_(w_ref, w0_ref, rng.cpu(), 0, 0.1, save=True, backend="torch")
    ops.perturb_(w, w0, rng, 0, 0.1, save=True, backend=backend)
    assert not w.is_contiguous()
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(w0.cpu(), w0_ref)
    # the kernel saw the row-major order of the view
    expected = w0_ref.reshape(-1) + 0.1 * ops.noise(w.numel(), 1, 2)
    torch.testing.assert_close(w_ref.reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_op_argument_errors():
    w = torch.zeros(8)
    rng = ops.rng_state(0, 0)
    with pytest.raises(ValueError, match="same number of elements"):
        ops.perturb_(w, torch.zeros(7), rng)
    with pytest.raises(TypeError, match="dtype"):
        ops.perturb_(w, torch.zeros(8, dtype=torch.float16), rng)
    with pytest.raises(TypeError, match="dtype"):
        ops.perturb_(torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64), rng)
    with pytest.raises(ValueError, match="rng"):
        ops.perturb_(w, torch.zeros(8), torch.zeros(2))
    with pytest.raises(ValueError, match="sigma"):
        ops.perturb_(w, torch.zeros(8), rng, sigma=float("nan"))
    with pytest.raises(ValueError):
        ops.perturb_(w, torch.zeros(8), rng, grad=torch.zeros(7))
    with pytest.raises(TypeError):
        ops.perturb_(w, torch.zeros(8), rng, grad=torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        ops.zero_(torch.zeros(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="acc"):
        ops.accumulate_(torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one device"):
        ops.restore_(w, torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        ops.restore_(w, torch.zeros(8), backend="fastest")


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save,init,zero_grad", [(True, True, True), (False, False, True),
                                                 (False, False, False)])
def test_accumulate_perturb(backend, device, dtype, save, init, zero_grad):
    for n in sizes_for(backend):
        for base, sigma in [(0, 0.05), (3, -0.5), (2**33 + 5, 1.0)]:
            w, grad, acc = _inputs(n, dtype, device)
            w0 = (w * 0.5).to(dtype)
            rng = ops.rng_state(2**40 + 7, 123, device)
            ref = [t.cpu().clone() for t in (w, w0, acc, grad)]
            ops.accumulate_perturb_(*ref, rng.cpu(), base, sigma, save=save, weight=0.25,
                                    init=init, zero_grad=zero_grad, backend="torch")
            ops.accumulate_perturb_(w, w0, acc, grad, rng, base, sigma, save=save, weight=0.25,
                                    init=init, zero_grad=zero_grad, backend=backend)
            assert_close(w, ref[0], dtype)
            assert torch.equal(w0.cpu(), ref[1])
            assert_close(acc, ref[2], torch.float32)
            assert torch.equal(grad.cpu(), ref[3])
