"""The one RNG spec (docs/rng.md) on every backend: bit-identical integers, normals within ulps."""
import math

import pytest
import torch

import flatfused
from flatfused import rng as spec

SEEDS_OFFSETS = [(0, 0), (1234, 5), (2**40 + 12345, 2**33 + 7), (2**64 - 1, 2**32 - 3)]
SIZES = [0, 1, 3, 4, 5, 4095, 4097]
BASES = [0, 1, 2, 3, 2**33 + 5]

# Known-answer values: Triton 3.8's tl.randint4x(seed, c), checked once under its interpreter.
KNOWN_BITS_SEED0_OFFSET0 = [1713891541, -513161843, -1135104948, -1694442536, -119223132,
                            1555169499, -1314556693, 159317863]


def test_known_answer():
    assert spec.philox_bits(8, 0, 0).tolist() == KNOWN_BITS_SEED0_OFFSET0


def test_matches_triton_randint4x_directly():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if not torch.cuda.is_available() and not flatfused.backends.triton_interpreted():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    @triton.jit
    def draw(out_ptr, seed, offset, BLOCK: tl.constexpr):
        c = tl.arange(0, BLOCK).to(tl.int64) + offset
        a, b, cc, d = tl.randint4x(seed, c)
        idx = tl.arange(0, BLOCK) * 4
        tl.store(out_ptr + idx, a.to(tl.int32, bitcast=True))
        tl.store(out_ptr + idx + 1, b.to(tl.int32, bitcast=True))
        tl.store(out_ptr + idx + 2, cc.to(tl.int32, bitcast=True))
        tl.store(out_ptr + idx + 3, d.to(tl.int32, bitcast=True))

    for seed, offset in SEEDS_OFFSETS[:3]:
        out = torch.empty(64, dtype=torch.int32, device=device)
        draw[(1,)](out, seed, offset, BLOCK=16)
        assert torch.equal(out.cpu(), spec.philox_bits(64, seed, offset))


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("base", BASES)
def test_integer_streams_bit_identical(backend_device, seed, offset, n, base):
    backend, device = backend_device
    got = flatfused.philox_bits(n, seed, offset, base=base, device=device, backend=backend)
    expected = spec.philox_bits(n, seed, offset, base)
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu(), expected)


def test_base_is_a_window_of_the_stream():
    whole = spec.philox_bits(64, 9, 3)
    for base in range(8):
        assert torch.equal(spec.philox_bits(20, 9, 3, base), whole[base:base + 20])
    # one draw at offset o continues the draw at offset 0 after 4*o elements
    assert torch.equal(spec.philox_bits(16, 9, 3 + 2), whole[8:24])


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "binomial", "cauchy"])
@pytest.mark.parametrize("n,base", [(4097, 0), (1001, 3)])
def test_floats_agree_across_backends(backend_device, dist, n, base):
    backend, device = backend_device
    got = flatfused.noise(n, 77, 11, device=device, backend=backend, distribution=dist,
                          base=base).cpu()
    expected = spec.noise(n, 77, 11, base, spec.distribution_code(dist))
    scale = expected.abs().clamp_min(1.0)
    # a few ulps of log/cos/sin; cauchy's tan near its poles is steeper
    tol = 2e-5 if dist == "cauchy" else 2e-6
    assert ((got - expected).abs() / scale).max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_noise_is_rounded_fp32(backend_device, dtype):
    backend, device = backend_device
    got = flatfused.noise(4097, 5, 0, dtype=dtype, device=device, backend=backend).cpu()
    expected = spec.noise(4097, 5, 0).to(dtype)
    assert got.dtype == dtype
    assert (got.float() - expected.float()).abs().max().item() <= 2 * torch.finfo(dtype).eps * 4


def test_normal_moments_and_tails():
    x = flatfused.noise(1 << 21, 2024, 0).double()
    n = x.numel()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.std().item() - 1) < 5 * math.sqrt(2 / n)
    for k, p in [(1, 0.3173105), (2, 0.0455003), (3, 0.0026998), (4, 6.334e-05)]:
        frac = (x.abs() > k).double().mean().item()
        assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / n) + 1e-6, (k, frac, p)
    assert x.abs().max().item() < 6.0  # Box-Muller with u1 >= 1e-7 caps |x| at ~5.68


@pytest.mark.parametrize("dist,mean,var", [("laplace", 0.0, 1.0), ("uniform", 0.0, 1.0),
                                           ("binomial", 2.0, 1.0)])
def test_other_distributions_moments(dist, mean, var):
    x = flatfused.noise(1 << 20, 7, 0, distribution=dist).double()
    n = x.numel()
    assert abs(x.mean().item() - mean) < 6 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 0.01


def test_cauchy_median_and_quartiles():
    x = flatfused.noise(1 << 20, 7, 0, distribution="cauchy")
    q = torch.quantile(x[:100000], torch.tensor([0.25, 0.5, 0.75])).tolist()
    assert q == pytest.approx([-1.0, 0.0, 1.0], abs=0.03)


def test_draws_are_independent_across_offsets_and_seeds():
    a = flatfused.noise(10000, 1, 0)
    b = flatfused.noise(10000, 1, 2500)
    c = flatfused.noise(10000, 2, 0)
    for u, v in [(a, b), (a, c)]:
        assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.05


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        flatfused.noise(4, 0, backend="mps-fast")
    with pytest.raises(ValueError, match="distribution"):
        flatfused.noise(4, 0, distribution="gumbel")
    with pytest.raises(ValueError, match="seed"):
        flatfused.noise(4, -1)
    with pytest.raises(TypeError, match="offset"):
        flatfused.noise(4, 0, 1.5)
    with pytest.raises(ValueError, match="numel"):
        flatfused.noise(-1, 0)
    with pytest.raises(ValueError, match="numel"):
        flatfused.philox_bits(-1, 0)
    with pytest.raises(TypeError, match="numel"):
        flatfused.noise(2.5, 0)
    # base: the same checks on every backend (the cpu kernel refused what torch's accepted)
    for backend in ("torch", "cpu"):
        with pytest.raises(ValueError, match="base"):
            flatfused.noise(4, 0, base=-1, backend=backend)
        with pytest.raises(TypeError, match="base"):
            flatfused.noise(4, 0, base=1.5, backend=backend)
        with pytest.raises(ValueError, match="fit in int64"):
            flatfused.noise(8, 0, base=2**63 - 2, backend=backend)
    edge = [flatfused.noise(4, 7, base=2**63 - 5, backend=b) for b in ("torch", "cpu")]
    assert torch.equal(*edge)
    with pytest.raises(RuntimeError, match="unavailable"):
        flatfused.noise(4, 0, device="cpu", backend="cuda")
