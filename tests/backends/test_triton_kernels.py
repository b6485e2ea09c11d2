"""The Triton backend against the PyTorch specification (flatfused._torch_ops, flatfused.rng).

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set here when no CUDA
device is present); small odd sizes, odd and huge bases, seeds/offsets >= 2**32, and shrunken
block sizes so that ragged ends and many programs are exercised. Skips cleanly without triton.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

try:  # installed package
    from flatfused import triton_kernels as tk
    from flatfused.triton_kernels import _common as nz
except ImportError:  # source tree: triton_kernels/ at the repository root
    import triton_kernels as tk
    from triton_kernels import _common as nz

from flatfused import _torch_ops as ref
from flatfused import rng as spec

if nz.INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("no GPU and the kernels were not built for TRITON_INTERPRET=1",
                allow_module_level=True)

# The interpreter does numpy's separately rounded fp32 ops, like the torch specification on a CPU:
# ops without transcendental functions then match bit for bit. A GPU may contract into FMAs.
EXACT = DEVICE.type == "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 37, 1001]
BASES = [0, 1, 2, 3, 2**33 + 5]
SEED_OFFSETS = [(0, 0), (123, 7), (2**32 + 7, 2**32 + 3), (2**64 - 3, 2**40 + 1)]


@pytest.fixture(params=["default", "small"])
def blocks(request, monkeypatch):
    """Default block sizes (one edge program), or tiny ones: many programs, interior ones too."""
    if request.param == "small":
        monkeypatch.setattr(nz, "RNG_BLOCK", 16)
        monkeypatch.setattr(nz, "ELEM_BLOCK", 64)
    return request.param


def tol(dtype):
    """(rtol, atol) of one result: a few fp32 ulps, or one ulp of a 16-bit storage dtype."""
    return {torch.float32: (2e-6, 2e-6), torch.bfloat16: (2**-7, 1e-5),
            torch.float16: (2**-10, 1e-5)}[dtype]


def assert_close(actual, expected, dtype=None):
    assert actual.dtype == expected.dtype
    rtol, atol = tol(dtype or actual.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def rng_tensor(seed, offset):
    as_int64 = seed - 2**64 if seed >= 2**63 else seed
    return torch.tensor([as_int64, offset], dtype=torch.int64, device=DEVICE)


def clone_args(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def randn(n, dtype, scale=1.0):
    return (scale * torch.randn(n, device=DEVICE)).to(dtype)


def run_both(name, args):
    """Run op ``name`` on copies of ``args`` with both backends; return both argument lists."""
    mine, theirs = clone_args(args), clone_args(args)
    getattr(tk, name)(*mine)
    getattr(ref, name)(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in theirs])
    return mine, theirs


def compare_tensors(mine, theirs, dtype=None, exact=False):
    for a, b in zip(mine, theirs):
        if isinstance(a, torch.Tensor):
            if exact and EXACT:
                assert torch.equal(a.cpu(), b.cpu())
            else:
                assert_close(a.cpu(), b.cpu(), dtype if a.dtype != torch.float32 else None)


# ------------------------------------------------------------------------------------- RNG


@pytest.mark.parametrize("seed,offset", SEED_OFFSETS)
def test_philox_bits_bit_identical(seed, offset, blocks):
    for n, base in itertools.product(SIZES, BASES):
        out = torch.empty(n, dtype=torch.int32, device=DEVICE)
        rng = rng_tensor(seed, offset)
        tk.philox_bits_(out, rng, base)
        expected = spec.philox_bits(n, seed, offset, base)
        assert torch.equal(out.cpu(), expected), (n, base)
        assert torch.equal(rng, rng_tensor(seed, offset))  # read, never written


@pytest.mark.parametrize("dist", range(5))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_noise(dist, dtype, blocks):
    sizes, bases = ([3, 1001], BASES) if blocks == "default" else ([301], [0, 3, 2**33 + 5])
    for (seed, offset), n, base in itertools.product(SEED_OFFSETS[1:3], sizes, bases):
        out = torch.empty(n, dtype=dtype, device=DEVICE)
        tk.noise_(out, rng_tensor(seed, offset), base, dist)
        expected = spec.noise(n, seed, offset, base, dist).to(dtype)
        if dist in (2, 3):  # uniform, binomial: no transcendental function
            compare_tensors([out], [expected], exact=True)
        elif dist == 4:  # cauchy: tan is steep, compare relatively only
            rtol, _ = tol(torch.float32 if dtype == torch.float64 else dtype)
            torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=2 * rtol, atol=0)
        else:
            assert_close(out.cpu(), expected, torch.float32 if dtype == torch.float64 else dtype)


def test_noise_matches_tl_randn4x_layout():
    """Element j of a draw at base 0 is lane j % 4 of counter offset + j // 4 (spot check)."""
    seed, offset = 2**32 + 7, 5
    out = torch.empty(8, device=DEVICE)
    tk.noise_(out, rng_tensor(seed, offset), 0, 0)
    shifted = torch.empty(3, device=DEVICE)
    tk.noise_(shifted, rng_tensor(seed, offset), 5, 0)  # elements 5, 6, 7
    assert torch.equal(out[5:].cpu(), shifted.cpu())


# ------------------------------------------------------------------------------------- NSO


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save", [True, False])
def test_perturb(dtype, save, blocks):
    for n, base, dist, sigma in [(37, 3, 0, -0.01), (1001, 2**33 + 5, 0, 0.05),
                                 (1001, 1, 1, 0.02), (37, 2, 2, -0.3), (3, 0, 3, 0.1),
                                 (1001, 6, 4, 1e-3)]:
        args = [randn(n, dtype), randn(n, dtype), rng_tensor(2**32 + 7, 2**32 + 3), base, dist,
                sigma, save]
        mine, theirs = run_both("perturb_", args)
        assert torch.equal(mine[1].cpu(), theirs[1])  # w0: saved bit for bit, or untouched
        rtol, atol = tol(dtype)
        # w = w0 + sigma * eps: noise ulps scaled by sigma, then one rounding to the dtype
        torch.testing.assert_close(mine[0].cpu().float(), theirs[0].float(), rtol=rtol,
                                   atol=atol + abs(sigma) * (1e-3 if dist == 4 else 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate(dtype, blocks):
    for n, init, zero_grad in itertools.product([1, 37, 1001], [True, False], [True, False]):
        args = [randn(n, torch.float32), randn(n, dtype), -0.37, init, zero_grad]
        mine, theirs = run_both("accumulate_", args)
        compare_tensors(mine[:2], theirs[:2], dtype, exact=True)


# n, base, dist, sigma; with small blocks (64 elements a program) 301 elements make interior
# programs, every base % 4 and a base past 2**32 counters shift the slots, n 0 launches nothing.
ACCUMULATE_PERTURB_SIZES = [(301, 0, 0, 0.05), (37, 1, 1, -0.02), (301, 2, 2, 0.3),
                            (3, 3, 3, -0.1), (301, 2**33 + 5, 0, -1e-3), (0, 2**33 + 5, 4, 0.1),
                            (1, 3, 0, 0.01), (129, 1, 4, 1e-3)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_perturb(dtype, blocks):
    """Against the spec (accumulate_ then perturb_), and bit for bit against the two Triton ops."""
    combos = list(itertools.product([True, False], [True, False], [True, False]))
    for (n, base, dist, sigma), (init, zero_grad, save) in zip(ACCUMULATE_PERTURB_SIZES, combos):
        rng = rng_tensor(2**32 + 7, 2**32 + 3)
        args = [randn(n, dtype), randn(n, dtype), randn(n, torch.float32), randn(n, dtype), rng,
                base, dist, sigma, save, -0.37, init, zero_grad]
        case = (n, base, dist, init, zero_grad, save)
        mine, theirs = run_both("accumulate_perturb_", args)
        assert torch.equal(mine[1].cpu(), theirs[1]), case  # w0: saved bit for bit, or untouched
        compare_tensors(mine[2:4], theirs[2:4], dtype, exact=True)  # acc, grad
        rtol, atol = tol(dtype)
        torch.testing.assert_close(mine[0].cpu().float(), theirs[0].float(), rtol=rtol,
                                   atol=atol + abs(sigma) * (1e-3 if dist == 4 else 1e-5),
                                   msg=lambda m: f"{case}: {m}")
        assert torch.equal(mine[4], rng)  # read, never written
        # The fused pass is the two ops' per-element bodies: same bits as the two launches.
        w, w0, acc, grad = clone_args(args[:4])
        tk.accumulate_(acc, grad, -0.37, init, zero_grad)
        tk.perturb_(w, w0, rng, base, dist, sigma, save)
        for a, b in zip(mine[:4], [w, w0, acc, grad]):
            assert torch.equal(a, b), case


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore(dtype, blocks):
    for n, has_grad, src_dtype in itertools.product([1, 37, 1001], [True, False],
                                                   [None, torch.float32, dtype]):
        grad = randn(n, dtype) if has_grad else None
        src = randn(n, src_dtype) if src_dtype is not None else None
        args = [randn(n, dtype), randn(n, dtype), grad, src, 0.25]
        mine, theirs = run_both("restore_", args)
        assert torch.equal(mine[0].cpu(), theirs[0])
        if has_grad:
            compare_tensors(mine[2:3], theirs[2:3], exact=True)


# ------------------------------------------------------------------------------- base steps


SGD_CASES = [  # has_w0, has_src, has_buf, first_step, nesterov, maximize, weight_decay, write_grad
    c for c in itertools.product([True, False], [True, False], [True, False], [True, False],
                                 [True, False], [True, False], [0.0, 0.01], [True, False])
    if c[2] or not (c[3] or c[4])  # first_step / nesterov only matter with a momentum buffer
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_step(dtype, blocks):
    n = 1001 if blocks == "default" else 201  # small blocks: interior and edge programs
    cases = SGD_CASES if blocks == "default" else SGD_CASES[::7]
    for has_w0, has_src, has_buf, first, nesterov, maximize, wd, write_grad in cases:
        args = [randn(n, dtype), randn(n, dtype) if has_w0 else None, randn(n, dtype),
                randn(n, torch.float32) if has_src else None, randn(n, dtype) if has_buf else None,
                0.5, 0.1, 0.9, 0.1, wd, nesterov, maximize, first, write_grad]
        mine, theirs = run_both("sgd_step_", args)
        compare_tensors(mine[:5], theirs[:5], dtype, exact=True)


ADAM_CASES = list(itertools.product([True, False], [True, False], [True, False], [True, False],
                                    [0.0, 0.01], [True, False]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_step(dtype, blocks):
    n = 1001 if blocks == "default" else 201
    cases = ADAM_CASES if blocks == "default" else ADAM_CASES[::5]
    t, lr, beta1, beta2 = 3, 1e-3, 0.9, 0.999
    for has_w0, has_src, decoupled, maximize, wd, write_grad in cases:
        args = [randn(n, dtype), randn(n, dtype) if has_w0 else None, randn(n, dtype),
                randn(n, torch.float32) if has_src else None, randn(n, dtype, 0.1),
                (randn(n, torch.float32, 0.01) ** 2).to(dtype),
                0.5, lr, beta1, beta2, 1e-8, wd, lr / (1 - beta1**t), (1 - beta2**t) ** 0.5,
                decoupled, maximize, write_grad]
        mine, theirs = run_both("adam_step_", args)
        compare_tensors(mine[:6], theirs[:6], dtype)


# ------------------------------------------------------------------------------- validation


def test_empty_is_a_no_op():
    """Every kernel accepts empty tensors and writes nothing: the empty operands are views into
    the middle of sentinel-filled buffers, which must come back unchanged (an empty launch
    that still ran one program would write around its start)."""
    rng = rng_tensor(1, 2)
    buffers = []

    def empty(dtype=torch.float32):
        backing = torch.full((64,), 7.0, device=DEVICE).to(dtype)
        buffers.append((backing, backing.clone()))
        return backing.narrow(0, 32, 0)

    tk.philox_bits_(torch.full((64,), 7, dtype=torch.int32, device=DEVICE).narrow(0, 32, 0),
                    rng, 0)
    tk.noise_(empty(), rng, 0, 0)
    tk.perturb_(empty(), empty(), rng, 0, 0, 0.1, True)
    tk.accumulate_(empty(), empty(), 1.0, True, True)
    tk.accumulate_perturb_(empty(torch.half), empty(torch.half), empty(), empty(torch.half), rng,
                           2**33 + 5, 4, 0.1, True, 1.0, True, True)
    tk.restore_(empty(), empty(), None, None, 1.0)
    tk.sgd_step_(empty(), None, empty(), None, None, 1.0, 0.1, 0.0, 0.0, 0.0, False, False,
                 False, False)
    tk.adam_step_(empty(), None, empty(), None, empty(), empty(), 1.0, 0.1, 0.9,
                  0.999, 1e-8, 0.0, 0.1, 0.1, False, False, False)
    out = torch.zeros(1, device=DEVICE)
    tk.grad_norm_sq_(out, empty(), None)
    assert out.item() == 0.0
    for backing, before in buffers:
        assert torch.equal(backing, before)


def test_validation_errors():
    n = 8
    w, w0, rng = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE), rng_tensor(1, 2)
    with pytest.raises(ValueError, match="elements"):
        tk.perturb_(w, torch.zeros(n + 1, device=DEVICE), rng, 0, 0, 0.1, True)
    with pytest.raises(ValueError, match="dtype"):
        tk.perturb_(w, w0.half(), rng, 0, 0, 0.1, True)
    with pytest.raises(ValueError, match="contiguous"):
        tk.perturb_(torch.zeros(2 * n, device=DEVICE)[::2], w0, rng, 0, 0, 0.1, True)
    with pytest.raises(ValueError, match="1-D"):
        tk.restore_(w.view(2, 4), w0.view(2, 4), None, None, 1.0)
    with pytest.raises(ValueError, match="expected"):
        tk.accumulate_(w, torch.zeros(n, device="meta"), 1.0, True, False)
    with pytest.raises(ValueError, match="rng"):
        tk.noise_(w, rng.int(), 0, 0)
    with pytest.raises(ValueError, match="rng"):
        tk.noise_(w, rng.to("meta"), 0, 0)
    with pytest.raises(ValueError, match="dist"):
        tk.noise_(w, rng, 0, 5)
    with pytest.raises(ValueError, match="base"):
        tk.noise_(w, rng, -1, 0)
    with pytest.raises(ValueError, match="dtype"):
        tk.philox_bits_(w, rng, 0)
    with pytest.raises(ValueError, match="dtype"):
        tk.accumulate_(w.half(), w, 1.0, True, False)  # acc must be fp32
    with pytest.raises(ValueError, match="dtype"):
        tk.sgd_step_(w, None, w.double(), None, None, 1.0, 0.1, 0.0, 0.0, 0.0, False, False,
                     False, False)
    with pytest.raises(ValueError, match="exp_avg"):
        tk.adam_step_(w, None, w, None, None, w, 1.0, 0.1, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.1,
                      False, False, False)


def test_accumulate_perturb_validation_errors():
    n = 8
    f32 = dict(device=DEVICE)
    w, w0, acc, grad, rng = (torch.zeros(n, **f32), torch.zeros(n, **f32), torch.zeros(n, **f32),
                             torch.zeros(n, **f32), rng_tensor(1, 2))

    def call(**kw):
        args = dict(w=w, w0=w0, acc=acc, grad=grad, rng=rng, base=0, dist=0, sigma=0.1,
                    save=True, weight=1.0, init=False, zero_grad=True)
        args.update(kw)
        tk.accumulate_perturb_(*args.values())

    with pytest.raises(ValueError, match="accumulate_perturb_: w must be 1-D"):
        call(w=w.view(2, 4))
    with pytest.raises(ValueError, match="accumulate_perturb_: w has dtype"):
        call(w=w.double(), w0=w0.double(), grad=grad.double())
    with pytest.raises(ValueError, match="w0 must be contiguous"):
        call(w0=torch.zeros(2 * n, **f32)[::2])
    with pytest.raises(ValueError, match="w0 has 9 elements, expected 8"):
        call(w0=torch.zeros(n + 1, **f32))
    with pytest.raises(ValueError, match="w0 has dtype torch.float16"):
        call(w0=w0.half())
    with pytest.raises(ValueError, match="acc has dtype torch.bfloat16"):  # acc is always fp32
        call(w=w.bfloat16(), w0=w0.bfloat16(), acc=acc.bfloat16(), grad=grad.bfloat16())
    with pytest.raises(ValueError, match="acc has 7 elements"):
        call(acc=acc[:7])
    with pytest.raises(ValueError, match="grad has dtype torch.bfloat16, expected torch.float32"):
        call(grad=grad.bfloat16())  # shares the parameters' dtype (unlike accumulate_'s)
    with pytest.raises(ValueError, match="grad is on meta"):
        call(grad=torch.zeros(n, device="meta"))
    with pytest.raises(ValueError, match="rng"):
        call(rng=rng.int())
    with pytest.raises(ValueError, match="dist"):
        call(dist=5)
    with pytest.raises(ValueError, match="base"):
        call(base=-1)
    with pytest.raises(ValueError, match="base"):
        call(base=1.5)
    with pytest.raises(ValueError, match="acc has 1 elements"):  # checked before n == 0 returns
        call(w=w[:0], w0=w0[:0], acc=acc[:1], grad=grad[:0])
    for t in (w, w0, acc, grad):  # nothing was written by the failed calls
        assert not t.any()
