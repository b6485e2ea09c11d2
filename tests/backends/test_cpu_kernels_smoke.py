"""The C++ CPU kernels (csrc/cpu/) on every instruction-set path this machine has.

The cross-backend tests (test_*_kernels.py) run the CPU kernels with the best instruction set
the CPU has; these run the same checks on each lower path too (AVX-512, AVX2+FMA, generic),
plus what only the C++ kernels have: thread splitting at odd bases, path agreement, schemas
and argument errors.
"""
import pathlib
import re

import pytest
import torch

from flatfused import _extension, _torch_ops
from flatfused import rng as frng

pytestmark = pytest.mark.skipif(not _extension.has_cpu_kernels(),
                                reason="flatfused._C (CPU kernels) not built")

ISAS = ["avx512", "avx2", "generic"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BASES = [0, 1, 2, 3, 2**33 + 5]
SEEDS = [(0, 0), (2**32 + 17, 2**31 + 3), (-5, 2**40)]  # int64 storage of [seed, offset]


def ops():
    return torch.ops.flatfused


@pytest.fixture(params=ISAS)
def isa(request):
    from flatfused import _C

    got = _C.set_cpu_isa(request.param)
    try:
        if got != request.param:
            pytest.skip(f"this CPU has no {request.param} (best: {got})")
        yield got
    finally:
        _C.set_cpu_isa("auto")


def tol(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps)


def documented_schemas() -> dict[str, str]:
    """The op table of docs/kernels.md: ``| `name` | `schema` | semantics |`` rows."""
    docs = pathlib.Path(__file__).resolve().parents[2] / "docs" / "kernels.md"
    rows = re.findall(r"^\| `(\w+)` \| `(\(.*?\) -> \(\))` \|", docs.read_text(), re.M)
    return dict(rows)


def test_schemas_match_docs():
    """Every registered op has the schema docs/kernels.md gives it, and every documented op is
    registered with a CPU kernel: the docs are the reference, not a copy kept here."""
    documented = documented_schemas()
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("flatfused::")}
    assert len(documented) >= 11 and set(documented) == registered
    for name, schema in documented.items():
        assert str(getattr(ops(), name).default._schema) == f"flatfused::{name}{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flatfused::{name}", "CPU")


@pytest.mark.parametrize("n", [1, 3, 4097, 100003])
@pytest.mark.parametrize("base", BASES)
def test_rng_ops(isa, n, base):
    for seed, offset in SEEDS:
        rng = torch.tensor([seed, offset], dtype=torch.int64)
        bits, ref = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
        ops().philox_bits_(bits, rng, base)
        _torch_ops.philox_bits_(ref, rng, base)
        assert torch.equal(bits, ref)
        for dtype in DTYPES:
            for dist in ([0, 1, 2, 3, 4] if n < 5000 else [0]):
                out, ref = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
                ops().noise_(out, rng, base, dist)
                _torch_ops.noise_(ref, rng, base, dist)
                t = tol(dtype)
                if dist == 4:  # cauchy: tan near its poles amplifies the libm ulps
                    t = dict(rtol=4 * t["rtol"], atol=t["atol"])
                torch.testing.assert_close(out.float(), ref.float(), **t)


def test_normal_accuracy(isa):
    """Our logf/sincosf approximations: within 1e-6 * max(1, |x|) of libm over 2M samples."""
    n = 1 << 21
    out = torch.empty(n)
    ops().noise_(out, torch.tensor([2**40 + 3, 99]), 1, 0)
    ref = frng.noise(n, 2**40 + 3, 99, base=1)
    err = ((out.double() - ref.double()).abs() / ref.double().abs().clamp_min(1.0)).max().item()
    assert err < 1e-6


def test_isas_agree():
    """AVX-512 and AVX2 run the same FMA arithmetic: bit-identical; generic within ulps."""
    from flatfused import _C

    n, rng, outs = 1 << 16, torch.tensor([7, 2**33]), {}
    try:
        for name in ISAS:
            if _C.set_cpu_isa(name) == name:
                outs[name] = torch.empty(n)
                ops().noise_(outs[name], rng, 3, 0)
    finally:
        _C.set_cpu_isa("auto")
    if "avx512" in outs and "avx2" in outs:
        assert torch.equal(outs["avx512"], outs["avx2"])
    for out in outs.values():
        torch.testing.assert_close(out, outs["generic"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", [0, 3, 2**33 + 1])
def test_thread_split_is_invisible(isa, base):
    """Chunks split at logical multiples of 4: results do not depend on the thread count."""
    n, rng = 300001, torch.tensor([123, 456])
    threads = torch.get_num_threads()
    results = []
    try:
        for t in sorted({1, max(2, threads)}):
            torch.set_num_threads(t)
            w, w0 = torch.arange(n, dtype=torch.float32), torch.empty(n)
            ops().perturb_(w, w0, rng, base, 0, 0.5, True)
            results.append(w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[-1])
    ref = torch.arange(n, dtype=torch.float32) + 0.5 * frng.noise(n, 123, 456, base=base)
    torch.testing.assert_close(results[0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", [0, 3, 2**33 + 1])
def test_accumulate_perturb_thread_split_is_invisible(isa, base):
    n, rng = 300001, torch.tensor([123, 456])
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in sorted({1, max(2, threads)}):
            torch.set_num_threads(t)
            w, w0, acc, g = torch.arange(n, dtype=torch.float32), torch.empty(n), torch.ones(n), grad.clone()
            ops().accumulate_perturb_(w, w0, acc, g, rng, base, 0, 0.5, True, 0.25, False, True)
            results.append((w, w0, acc, g))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], results[-1]):
        assert torch.equal(a, b)
    w, w0, acc, g = results[0]
    ref = torch.arange(n, dtype=torch.float32) + 0.5 * frng.noise(n, 123, 456, base=base)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(w0, torch.arange(n, dtype=torch.float32))
    torch.testing.assert_close(acc, 1 + 0.25 * grad, rtol=1e-6, atol=1e-7)
    assert not g.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 3, 4095, 4097, 278011])
def test_nso_and_step_ops(isa, dtype, n):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=g).to(dtype)
    rng, base = torch.tensor([2**33 + 9, 5]), 3

    a, a0, b, b0 = w.clone(), torch.empty_like(w), w.clone(), torch.empty_like(w)
    ops().perturb_(a, a0, rng, base, 0, -0.01, True)
    _torch_ops.perturb_(b, b0, rng, base, 0, -0.01, True)
    assert torch.equal(a0, w)
    torch.testing.assert_close(a.float(), b.float(), **tol(dtype))
    ops().restore_(a, a0, None, None, 1.0)  # exact restore from the saved copy
    assert torch.equal(a, w)

    grad = torch.randn(n, generator=g).to(dtype)
    acc = torch.randn(n, generator=g)
    x, y = acc.clone(), acc.clone()
    gx, gy = grad.clone(), grad.clone()
    ops().accumulate_(x, gx, 0.3, False, True)
    _torch_ops.accumulate_(y, gy, 0.3, False, True)
    torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert not gx.any()

    for src in (None, acc, acc.to(dtype)):
        mom = torch.randn(n, generator=g).to(dtype)
        A = [w.clone(), torch.randn(n, generator=g).to(dtype), grad.clone(), src, mom.clone()]
        B = [A[0].clone(), A[1], A[2].clone(), src, mom.clone()]
        args = (2.0, 0.1, 0.9, 0.1, 0.01, True, True, False, True)
        ops().sgd_step_(*A, *args)
        _torch_ops.sgd_step_(*B, *args)
        for u, v in zip(A, B):
            if u is not None:
                torch.testing.assert_close(u.float(), v.float(), **tol(dtype))
        m, v2 = torch.randn(n, generator=g).to(dtype), torch.rand(n, generator=g).to(dtype)
        A = [w.clone(), None, grad.clone(), src, m.clone(), v2.clone()]
        B = [w.clone(), None, grad.clone(), src, m.clone(), v2.clone()]
        args = (0.5, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1e-3 / (1 - 0.9**2), (1 - 0.999**2) ** 0.5, False, True, True)
        ops().adam_step_(*A, *args)
        _torch_ops.adam_step_(*B, *args)
        for u, v in zip(A, B):
            if u is not None:
                torch.testing.assert_close(u.float(), v.float(), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4097, 100003])
def test_sam_ops(isa, dtype, n):
    """grad_norm_sq_, sam_ascent_ and the Weighted SAM terms of the steps on each ISA path."""
    g = torch.Generator().manual_seed(n)
    w, grad, g0 = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    for ww in (None, w):
        a, b = torch.tensor([0.5]), torch.tensor([0.5])
        ops().grad_norm_sq_(a, grad, ww)
        _torch_ops.grad_norm_sq_(b, grad, ww)
        torch.testing.assert_close(a, b, rtol=2e-7, atol=0)
    norm_sq = torch.tensor([float(n)])
    for adaptive, zero_grad in ((False, True), (True, False)):
        A = [w.clone(), torch.empty_like(w), grad.clone(), torch.empty_like(w)]
        B = [w.clone(), torch.empty_like(w), grad.clone(), torch.empty_like(w)]
        ops().sam_ascent_(*A, norm_sq, 0.05, 1e-12, adaptive, zero_grad)
        _torch_ops.sam_ascent_(*B, norm_sq, 0.05, 1e-12, adaptive, zero_grad)
        torch.testing.assert_close(A[0].float(), B[0].float(), **tol(dtype))
        for u, v in zip(A[1:], B[1:]):
            assert torch.equal(u, v)
    for src in (g0, g0.float()):
        A = [w.clone(), w.clone(), grad.clone(), src, torch.randn(n, generator=g).to(dtype)]
        B = [A[0].clone(), A[1], A[2].clone(), src, A[4].clone()]
        args = (0.5, 0.1, 0.9, 0.0, 0.01, False, False, False, True, 0.3, 0.02)
        ops().sgd_step_(*A, *args)
        _torch_ops.sgd_step_(*B, *args)
        for u, v in zip(A, B):
            torch.testing.assert_close(u.float(), v.float(), **tol(dtype))


AP_FLAGS = [(init, zero_grad, save) for init in (False, True) for zero_grad in (False, True)
            for save in (False, True)]


def _ap_inputs(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g).to(dtype)
    w0 = (torch.randn(n, generator=g) * 0.5).to(dtype)
    acc = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g).to(dtype)
    return w, w0, acc, grad


def _check_accumulate_perturb(n, dtype, base, flags, rng, sigma, weight, dist=0, seed=0, w0_is_w=False):
    init, zero_grad, save = flags
    w, w0, acc, grad = _ap_inputs(n, dtype, seed)
    if init:
        acc.fill_(float("nan"))  # never read
    A = [t.clone() for t in (w, w0, acc, grad)]
    B = [t.clone() for t in (w, w0, acc, grad)]
    if w0_is_w:
        A[1], B[1] = A[0], B[0]
    args = (rng, base, dist, sigma, save, weight, init, zero_grad)
    ops().accumulate_perturb_(*A, *args)
    _torch_ops.accumulate_perturb_(*B, *args)
    t = tol(dtype)
    if dist == 4:  # cauchy: tan near its poles amplifies the libm ulps
        t = dict(rtol=4 * t["rtol"], atol=4 * t["atol"])
    torch.testing.assert_close(A[0].float(), B[0].float(), **t)
    if not w0_is_w:
        assert torch.equal(A[1], w if save else w0)  # saved bit-exactly, or untouched
    torch.testing.assert_close(A[2], B[2], rtol=1e-6, atol=1e-7)
    assert torch.equal(A[3], torch.zeros_like(grad) if zero_grad else grad)
    # one pass of the two C++ ops' per-element code: the same bits as accumulate_ then perturb_
    C = [t.clone() for t in (w, w0, acc, grad)]
    if w0_is_w:
        C[1] = C[0]
    ops().accumulate_(C[2], C[3], weight, init, zero_grad)
    ops().perturb_(C[0], C[1], rng, base, dist, sigma, save)
    for a, c in zip(A, C):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 3, 4095, 4097, 278011])
def test_accumulate_perturb(isa, dtype, n):
    """accumulate_perturb_ = accumulate_ then perturb_ (the torch spec) for every flag combination."""
    for k, base in enumerate([0, 1, 3, 2**33 + 5]):
        seed, offset = SEEDS[k % len(SEEDS)]
        rng = torch.tensor([seed, offset], dtype=torch.int64)
        for flags in AP_FLAGS if n < 100000 or base in (3, 2**33 + 5) else AP_FLAGS[::3]:
            _check_accumulate_perturb(n, dtype, base, flags, rng, sigma=-0.01 if flags[2] else 0.5,
                                      weight=0.375 if flags[0] else -1.5, seed=n + k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_perturb_w0_is_w_and_distributions(isa, dtype):
    rng = torch.tensor([2**33 + 9, 5])
    for save in (False, True):  # w0 may be w itself: w += sigma * eps
        _check_accumulate_perturb(4097, dtype, 3, (False, True, save), rng, 0.1, 0.5, w0_is_w=True)
    for dist in [1, 2, 3, 4]:
        _check_accumulate_perturb(4097, dtype, 1, (False, False, True), rng, 0.1, 2.0, dist=dist)


def test_accumulate_perturb_argument_errors():
    rng = torch.tensor([1, 2])
    f = ops().accumulate_perturb_

    def z(n=8, dtype=torch.float32):
        return torch.zeros(n, dtype=dtype)

    def call(w, w0, acc, grad, r=rng, base=0, dist=0):
        f(w, w0, acc, grad, r, base, dist, 0.1, True, 1.0, False, True)

    with pytest.raises(RuntimeError, match="acc has 9 elements but w has 8"):
        call(z(), z(), z(9), z())
    with pytest.raises(RuntimeError, match="grad has 7 elements but w has 8"):
        call(z(), z(), z(), z(7))
    with pytest.raises(RuntimeError, match="w0 has 9 elements"):
        call(z(), z(9), z(), z())
    with pytest.raises(RuntimeError, match="acc must be float32"):
        call(z(dtype=torch.bfloat16), z(dtype=torch.bfloat16), z(dtype=torch.bfloat16), z(dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"grad \(Half\) must have the dtype of w \(BFloat16\)"):
        call(z(dtype=torch.bfloat16), z(dtype=torch.bfloat16), z(), z(dtype=torch.half))
    with pytest.raises(RuntimeError, match="w0 .* must have the dtype of w"):
        call(z(), z(dtype=torch.half), z(), z())
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        call(z(dtype=torch.float64), z(dtype=torch.float64), z(), z(dtype=torch.float64))
    with pytest.raises(RuntimeError, match="acc must be contiguous"):
        call(z(), z(), z(16)[::2], z())
    with pytest.raises(RuntimeError, match="grad must be 1-D"):
        call(z(), z(), z(), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="rng must be int64"):
        call(z(), z(), z(), z(), r=rng.int())
    with pytest.raises(RuntimeError, match="2 elements"):
        call(z(), z(), z(), z(), r=torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="dist must be"):
        call(z(), z(), z(), z(), dist=5)
    with pytest.raises(RuntimeError, match="base"):
        call(z(), z(), z(), z(), base=-1)
    buf = z(32)
    for args, names in [((buf[:8], buf[4:12], z(), z()), "w and w0"),
                        ((z(), z(), buf[:8], buf[4:12]), "acc and grad"),
                        ((buf[:8], z(), buf[8:16], z()), None),  # adjacent: fine
                        ((buf[:8], z(), buf[:8], z()), "acc and w"),
                        ((z(), buf[:8], buf[7:15], z()), "acc and w0"),
                        ((buf[:8], z(), z(), buf[:8]), "grad and w"),
                        ((z(), buf[:8], z(), buf[:8]), "grad and w0"),
                        ((buf[:8], buf[:8], buf[8:16], buf[8:16]), "acc and grad")]:
        if names is None:
            call(*args)
        else:
            with pytest.raises(RuntimeError, match=f"accumulate_perturb_: {names} must not share memory"):
                call(*args)
    w = z()
    call(w, w, z(), z())  # w0 may be w itself
    for i, name in enumerate(["w", "w0", "acc", "grad"]):
        r = torch.tensor([1, 2])
        args = [z(4) for _ in range(4)]
        args[i] = r.view(torch.float32)  # the 16 bytes of rng as 4 floats
        with pytest.raises(RuntimeError, match=f"{name} and rng must not share memory"):
            call(*args, r=r)
        assert r.tolist() == [1, 2]


def test_argument_errors():
    rng = torch.tensor([1, 2])
    w = torch.zeros(8)
    with pytest.raises(RuntimeError, match="rng must be int64"):
        ops().noise_(w, rng.int(), 0, 0)
    with pytest.raises(RuntimeError, match="2 elements"):
        ops().noise_(w, torch.tensor([1, 2, 3]), 0, 0)
    with pytest.raises(RuntimeError, match="rng must be contiguous"):  # as the CUDA ops require
        ops().noise_(w, torch.tensor([1, 0, 2, 0])[::2], 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops().noise_(torch.zeros(16)[::2], rng, 0, 0)
    with pytest.raises(RuntimeError, match="1-D"):
        ops().noise_(torch.zeros(2, 4), rng, 0, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops().noise_(torch.zeros(8, dtype=torch.float64), rng, 0, 0)
    with pytest.raises(RuntimeError, match="dist must be"):
        ops().noise_(w, rng, 0, 7)
    with pytest.raises(RuntimeError, match="base"):
        ops().noise_(w, rng, -1, 0)
    with pytest.raises(RuntimeError, match="elements"):
        ops().perturb_(w, torch.zeros(9), rng, 0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops().perturb_(w, torch.zeros(8, dtype=torch.float16), rng, 0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match="share memory"):
        buf = torch.zeros(16)
        ops().accumulate_(buf[:8], buf[4:12].view(-1), 1.0, False, False)
    with pytest.raises(RuntimeError, match="src must be float32"):
        ops().restore_(w.half(), w.half(), w.half(), w.bfloat16(), 1.0)


def test_opcheck():
    """Schemas declare every mutation; fake-tensor, autograd-registration and AOT checks pass."""
    n, rng = 37, torch.tensor([5, 6])

    def r():
        return torch.randn(n)

    cases = {
        "philox_bits_": (torch.empty(n, dtype=torch.int32), rng, 3),
        "noise_": (torch.empty(n), rng, 3, 0),
        "perturb_": (r(), r(), rng, 3, 0, 0.1, True),
        "zero_": (r(),),
        "accumulate_": (r(), r(), 0.5, False, True),
        "accumulate_perturb_": (r(), r(), r(), r(), rng, 3, 0, 0.1, True, 0.5, False, True),
        "restore_": (r(), r(), r(), r(), 0.5),
        "sgd_step_": (r(), r(), r(), r(), r(), 1.0, 0.1, 0.9, 0.0, 0.01, True, False, False, True),
        "adam_step_": (r(), r(), r(), r(), r(), r().abs(), 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1e-2, 0.1,
                       True, False, True),
        "grad_norm_sq_": (torch.zeros(1), r(), r()),
        "sam_ascent_": (r(), r(), r(), r(), torch.tensor([2.0]), 0.05, 1e-12, True, True),
    }
    cases_wsam = {  # optional arguments given (schema defaults overridden)
        "perturb_": cases["perturb_"] + (r(),),
        "sgd_step_": cases["sgd_step_"] + (0.3, 0.01),
        "adam_step_": cases["adam_step_"] + (0.3, 0.01),
    }
    for name, args in cases_wsam.items():
        torch.library.opcheck(getattr(ops(), name).default, args)
    for name, args in cases.items():
        torch.library.opcheck(getattr(ops(), name).default, args)


def _run_write_only_ops(dtype, n, start):
    """Every op with a write-only output, on views starting `start` elements into their storage
    (so streamed lines are misaligned); returns all outputs."""
    g = torch.Generator().manual_seed(n + start)

    def make(dt=dtype, fill="randn"):
        full = getattr(torch, fill)(n + start, generator=g).to(dt) if fill != "empty" else \
            torch.full((n + start,), float("nan")).to(dt)
        return full[start:]

    rng, base = torch.tensor([2**33 + 9, 5]), 3
    outs = []
    noise = make(fill="empty")
    ops().noise_(noise, rng, base, 0)
    w, w0, grad = make(), make(fill="empty"), make()
    ops().perturb_(w, w0, rng, base, 0, 0.25, True, grad)
    outs += [noise, w, w0, grad]
    acc, grad = make(torch.float32, "empty"), make()
    ops().accumulate_(acc, grad, 0.3, True, True)
    outs += [acc, grad]
    w, w0, grad = make(fill="empty"), make(), make()
    ops().restore_(w, w0, grad, None, 0.5)
    outs += [w, grad]
    w, w0, grad, mom = make(fill="empty"), make(), make(), make()
    ops().sgd_step_(w, w0, grad, None, mom, 2.0, 0.1, 0.9, 0.1, 0.01, True, False, False, True)
    outs += [w, grad, mom]
    w, w0, grad, m, v = make(fill="empty"), make(), make(), make(), make().abs()
    ops().adam_step_(w, w0, grad, None, m, v, 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.1, 1e-3, 0.5, True, False,
                     False)
    outs += [w, m, v]
    w, w0, grad, g0 = make(), make(fill="empty"), make(), make(fill="empty")
    ops().sam_ascent_(w, w0, grad, g0, torch.tensor([4.0]), 0.05, 1e-12, False, True)
    outs += [w, w0, grad, g0]
    return outs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,start", [(1, 0), (17, 1), (4097, 3), (70001, 0), (70001, 5)])
def test_streaming_stores_change_no_result(isa, dtype, n, start):
    """Write-only outputs of large arrays go out with streaming stores (csrc/cpu/stream_store.h):
    forced on at every size, every output is bit-identical to the ordinary stores' (misaligned
    starts, partial lines, both threads' chunk edges)."""
    from flatfused import _C

    previous = _C.set_cpu_stream_bytes(1 << 62)
    try:
        plain = _run_write_only_ops(dtype, n, start)
        _C.set_cpu_stream_bytes(0)
        streamed = _run_write_only_ops(dtype, n, start)
    finally:
        _C.set_cpu_stream_bytes(previous)
    for i, (a, b) in enumerate(zip(plain, streamed)):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a.view(torch.int32),
                           b.view(torch.uint8) if b.dtype != torch.float32 else b.view(torch.int32)), i


def test_stream_threshold_setting():
    from flatfused import _C

    previous = _C.set_cpu_stream_bytes(123)
    try:
        assert previous == 64 << 20  # the default: twice a 32 MiB last-level cache
        assert _C.set_cpu_stream_bytes(456) == 123
    finally:
        _C.set_cpu_stream_bytes(previous)
