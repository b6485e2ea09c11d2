"""The SAM / ASAM kernels (grad_norm_sq_, sam_ascent_) on every backend against the torch spec,
and the spec against the formulas written out here."""
import math

import pytest
import torch

from flatfused import _extension, backends, ops
from kernel_cases import DTYPES, assert_close, pairs_param, sizes_for


def _all_pairs():
    from conftest import backend_device_pairs

    return backend_device_pairs()


all_pairs_param = pytest.mark.parametrize("backend,device", _all_pairs(), ids=lambda v: str(v))


def _tensors(n, dtype, device, seed, count):
    g = torch.Generator().manual_seed(seed + n)
    return [torch.randn(n, generator=g).to(dtype).to(device) for _ in range(count)]


def _scalar(value, device):
    return torch.tensor([value], dtype=torch.float32, device=device)


# ----------------------------------------------------------------- the spec against the formulas


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_spec_grad_norm_sq_formula(dtype, adaptive):
    grad, w = _tensors(10007, dtype, "cpu", 0, 2)
    out = _scalar(0.25, "cpu")
    ops.grad_norm_sq_(out, grad, w if adaptive else None, backend="torch")
    v = grad.double() * (w.double().abs() if adaptive else 1.0)
    expected = 0.25 + (v * v).sum().item()
    assert math.isclose(out.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_spec_sam_ascent_formula(dtype, adaptive):
    w, grad = _tensors(10007, dtype, "cpu", 1, 2)
    w_ref, grad_ref = w.clone(), grad.clone()
    w0, g0 = torch.empty_like(w), torch.empty_like(grad)
    rho, eps, norm_sq = 0.05, 1e-12, 37.5
    ops.sam_ascent_(w, w0, grad, g0, _scalar(norm_sq, "cpu"), rho, eps, adaptive, zero_grad=True,
                    backend="torch")
    x = w_ref.double()
    expected = x + (x * x if adaptive else 1.0) * grad_ref.double() * rho / (math.sqrt(norm_sq) + eps)
    assert_close(w, expected.to(dtype), dtype)
    assert torch.equal(w0, w_ref) and torch.equal(g0, grad_ref)
    assert not grad.any()


# ------------------------------------------------------------------ every backend against the spec


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm_sq(backend, device, dtype, adaptive):
    for n in sizes_for(backend):
        grad, w = _tensors(n, dtype, device, 2, 2)
        out, ref = _scalar(1.5, device), _scalar(1.5, "cpu")
        ops.grad_norm_sq_(ref, grad.cpu(), w.cpu() if adaptive else None, backend="torch")
        ops.grad_norm_sq_(out, grad, w if adaptive else None, backend=backend)
        # the same terms summed in double in other orders: at most an ulp of the fp32 result
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-7, atol=0)
        assert torch.equal(grad.cpu(), _tensors(n, dtype, "cpu", 2, 1)[0])  # read only


@pairs_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive,with_g0,zero_grad", [(False, False, True), (True, True, False),
                                                        (True, False, True), (False, True, False)])
def test_sam_ascent(backend, device, dtype, adaptive, with_g0, zero_grad):
    for n in sizes_for(backend):
        w, grad, w0, g0 = _tensors(n, dtype, device, 3, 4)
        norm_sq = _scalar(2.0 + n, device)
        ref = [t.cpu().clone() for t in (w, w0, grad, g0)]
        ops.sam_ascent_(ref[0], ref[1], ref[2], ref[3] if with_g0 else None, norm_sq.cpu(), 0.05,
                        1e-12, adaptive, zero_grad, backend="torch")
        ops.sam_ascent_(w, w0, grad, g0 if with_g0 else None, norm_sq, 0.05, 1e-12, adaptive,
                        zero_grad, backend=backend)
        assert_close(w, ref[0], dtype)
        for got, expected in zip((w0, grad, g0), ref[1:]):  # bit copies, zeros, or untouched
            assert torch.equal(got.cpu(), expected)
        assert norm_sq.item() == 2.0 + n  # read only


# ------------------------------------------------------------ determinism, accumulation, inf/NaN


def _size(backend):
    return 20011 if backend == "triton" and backends.triton_interpreted() else 278011


@all_pairs_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_norm_sq_is_deterministic_and_accumulates(backend, device, dtype):
    n = _size(backend)
    grad, w = _tensors(n, dtype, device, 4, 2)
    grad = grad * 1e3  # a wide range of magnitudes: summation order would show
    firsts = []
    for _ in range(3):
        out = _scalar(0.0, device)
        ops.grad_norm_sq_(out, grad, w, backend=backend)
        firsts.append(out.cpu())
    assert all(torch.equal(f, firsts[0]) for f in firsts)
    # out[0] += the sum, rounded once: several buffers accumulate into one scalar
    out = _scalar(3.25, device)
    ops.grad_norm_sq_(out, grad, w, backend=backend)
    ops.grad_norm_sq_(out, grad[: n // 3], None, backend=backend)
    part = _scalar(0.0, device)
    ops.grad_norm_sq_(part, grad[: n // 3], None, backend=backend)
    assert torch.equal(out.cpu(), (_scalar(3.25, "cpu") + firsts[0]) + part.cpu())


@pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="flatfused._C (CPU kernels) not built")
def test_cpu_grad_norm_sq_independent_of_threads_and_isa():
    from flatfused import _C

    n = 300007
    grad, w = _tensors(n, torch.float32, "cpu", 5, 2)
    grad = grad * torch.logspace(-3, 3, n)
    threads, results = torch.get_num_threads(), []
    try:
        for isa in ("avx512", "avx2", "generic"):
            if _C.set_cpu_isa(isa) != isa:
                continue
            for t in (1, 2, 3, 7):
                torch.set_num_threads(t)
                out = _scalar(0.0, "cpu")
                torch.ops.flatfused.grad_norm_sq_(out, grad, w)
                results.append(out)
    finally:
        torch.set_num_threads(threads)
        _C.set_cpu_isa("auto")
    assert all(torch.equal(r, results[0]) for r in results)


@all_pairs_param
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
def test_grad_norm_sq_propagates_non_finite(backend, device, dtype):
    n = 4097
    for value, check in ((float("inf"), math.isinf), (float("nan"), math.isnan)):
        for j in (0, n // 2, n - 1):  # first, interior and ragged last block
            grad, w = _tensors(n, dtype, device, 6, 2)
            grad[j] = value
            for ww in (None, w):
                out = _scalar(0.0, device)
                ops.grad_norm_sq_(out, grad, ww, backend=backend)
                assert check(out.item()), (value, j)
    if dtype != torch.float16:  # finite gradients whose fp32 squares overflow (fp16's cannot)
        big = torch.full((n,), 3e19, device=device).to(dtype)
        out = _scalar(0.0, device)
        ops.grad_norm_sq_(out, big, None, backend=backend)
        assert math.isinf(out.item())


# ------------------------------------------------------------------- ops.py: layouts and errors


@all_pairs_param
def test_non_contiguous_inputs(backend, device):
    g = torch.Generator().manual_seed(7)
    make = lambda: torch.randn(33, 64, generator=g).to(device).t()  # noqa: E731
    w, grad, w0, g0 = make(), make(), make(), make()
    assert not w.is_contiguous()
    ref = [t.cpu().contiguous() for t in (w, grad, w0, g0)]
    out, out_ref = _scalar(0.0, device), _scalar(0.0, "cpu")
    ops.grad_norm_sq_(out, grad, w, backend=backend)
    ops.grad_norm_sq_(out_ref, ref[1], ref[0], backend="torch")
    torch.testing.assert_close(out.cpu(), out_ref, rtol=2e-7, atol=0)
    norm_sq = _scalar(4.0, device)
    ops.sam_ascent_(w, w0, grad, g0, norm_sq, 0.1, 1e-12, True, True, backend=backend)
    ops.sam_ascent_(ref[0], ref[2], ref[1], ref[3], norm_sq.cpu(), 0.1, 1e-12, True, True,
                    backend="torch")
    torch.testing.assert_close(w.cpu(), ref[0], rtol=1e-6, atol=1e-7)
    for got, expected in zip((w0, grad, g0), (ref[2], ref[1], ref[3])):  # written back
        assert torch.equal(got.cpu(), expected)


def test_op_argument_errors():
    g, w = torch.zeros(8), torch.zeros(8)
    out = _scalar(0.0, "cpu")
    with pytest.raises(TypeError, match="out must be a float32 tensor of shape"):
        ops.grad_norm_sq_(torch.zeros(1, dtype=torch.float64), g)
    with pytest.raises(ValueError, match=r"out must be a float32 tensor of shape \[1\], got shape \(\)"):
        ops.grad_norm_sq_(torch.zeros(()), g)
    with pytest.raises(ValueError, match="shape"):
        ops.grad_norm_sq_(torch.zeros(2), g)
    with pytest.raises(ValueError, match="out must be on the kernels' device"):
        ops.grad_norm_sq_(torch.zeros(1, device="meta"), g)
    with pytest.raises(TypeError, match="w must have grad's dtype"):
        ops.grad_norm_sq_(out, g, w.half())
    with pytest.raises(ValueError, match="same number of elements"):
        ops.grad_norm_sq_(out, g, torch.zeros(9))
    with pytest.raises(TypeError, match="grad must have dtype"):
        ops.grad_norm_sq_(out, g.double())
    with pytest.raises(TypeError, match="norm_sq must be a float32"):
        ops.sam_ascent_(w, torch.zeros(8), g, None, torch.zeros(1, dtype=torch.float16), 0.05)
    with pytest.raises(ValueError, match="norm_sq must be a float32 tensor of shape"):
        ops.sam_ascent_(w, torch.zeros(8), g, None, torch.zeros(1, 1), 0.05)
    with pytest.raises(TypeError, match="g0 must have the parameter's dtype"):
        ops.sam_ascent_(w, torch.zeros(8), g, torch.zeros(8, dtype=torch.bfloat16), out, 0.05)
    with pytest.raises(ValueError, match="rho must be finite"):
        ops.sam_ascent_(w, torch.zeros(8), g, None, out, float("nan"))
    with pytest.raises(ValueError, match="eps must be finite"):
        ops.sam_ascent_(w, torch.zeros(8), g, None, out, 0.05, float("inf"))
    assert out.item() == 0 and not w.any()  # nothing ran


@pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="flatfused._C (CPU kernels) not built")
def test_cpu_kernel_argument_errors():
    f = torch.ops.flatfused
    g, w, out = torch.zeros(8), torch.zeros(8), _scalar(0.0, "cpu")
    with pytest.raises(RuntimeError, match="out must be float32"):
        f.grad_norm_sq_(torch.zeros(1, dtype=torch.float64), g, None)
    with pytest.raises(RuntimeError, match=r"out must have shape \[1\]"):
        f.grad_norm_sq_(torch.zeros(2), g, None)
    with pytest.raises(RuntimeError, match="w .* must have the dtype of grad"):
        f.grad_norm_sq_(out, g, w.half())
    with pytest.raises(RuntimeError, match="out and grad must not share memory"):
        buf = torch.zeros(8)
        f.grad_norm_sq_(buf[:1], buf, None)
    with pytest.raises(RuntimeError, match=r"norm_sq must have shape \[1\]"):
        f.sam_ascent_(w, torch.zeros(8), g, None, torch.zeros(()), 0.05, 1e-12, False, False)
    with pytest.raises(RuntimeError, match="w and w0 must not share memory"):
        f.sam_ascent_(w, w, g, None, out, 0.05, 1e-12, False, False)
    with pytest.raises(RuntimeError, match="g0 and grad must not share memory"):
        f.sam_ascent_(w, torch.zeros(8), g, g, out, 0.05, 1e-12, False, False)


def test_triton_argument_errors():
    if "triton" not in backends.available(torch.device("cpu")):
        pytest.skip("triton cannot run on CPU tensors here")
    from flatfused import triton_kernels as tk

    g, w, out = torch.zeros(8), torch.zeros(8), _scalar(0.0, "cpu")
    with pytest.raises(ValueError, match="out must be a float32 tensor of shape"):
        tk.grad_norm_sq_(torch.zeros(2), g, None)
    with pytest.raises(ValueError, match="w has dtype"):
        tk.grad_norm_sq_(out, g, w.half())
    with pytest.raises(ValueError, match="norm_sq must be a float32"):
        tk.sam_ascent_(w, torch.zeros(8), g, None, torch.zeros(1).double(), 0.05, 1e-12, False,
                       False)
    with pytest.raises(ValueError, match="g0 has 7 elements"):
        tk.sam_ascent_(w, torch.zeros(8), g, torch.zeros(7), out, 0.05, 1e-12, False, False)


@all_pairs_param
def test_empty_is_a_no_op(backend, device):
    empty = torch.empty(0, device=device)
    out = _scalar(-0.0, device)
    ops.grad_norm_sq_(out, empty, empty.clone(), backend=backend)
    assert out.item() == 0 and torch.signbit(out).all()  # untouched (not even -0 + 0)
    ops.sam_ascent_(empty, empty.clone(), empty.clone(), None, out, 0.05, backend=backend)
