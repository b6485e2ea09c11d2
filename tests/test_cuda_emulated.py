"""The CUDA kernels without a GPU: csrc/cuda/*.cu, unchanged, compiled for the host and run in a
CUDA emulation (tests/emulated_cuda.py, tests/cuda_emulation/), through the same cross-backend
tests as the other backends, against the torch specification.

This runs the kernels' own code (the quad layout, the RNG counters and lanes, the masked ragged
quads and the vector path, the grid-stride loops, the two-pass block reduction of grad_norm_sq_
with its shuffles and barriers) on CPU tensors. It does not run nvcc's machine code or the GPU's
math library: on a GPU, tests/test_gpu.py and the same cross-backend tests (backend ``cuda``) do.
"""
import pytest
import torch

import emulated_cuda
import test_base_step_kernels as base_cases
import test_nso_kernels as nso_cases
import test_rng as rng_cases
import test_sam_kernels as sam_cases
from flatfused import backends, ops
from kernel_cases import DTYPES

EMULATED = "cuda-emulated"

pytestmark = pytest.mark.skipif(emulated_cuda.unavailable_reason() is not None,
                                reason=f"emulated CUDA: {emulated_cuda.unavailable_reason()}")


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    return emulated_cuda.build(tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture
def backend(emulation, monkeypatch):
    """``flatfused.ops`` dispatching backend ``cuda-emulated`` to the emulated CUDA kernels, on
    an emulated device of one SM: launches over more than 32 * 256 quads run the grid-stride
    loops."""
    kernel, resolve = ops.kernel, backends.resolve
    monkeypatch.setattr(ops, "kernel", lambda name, b: (getattr(emulation, name) if b == EMULATED
                                                        else kernel(name, b)))
    monkeypatch.setattr(backends, "resolve", lambda b, d: b if b == EMULATED else resolve(b, d))
    emulation.set_device(0, 1)
    return EMULATED


DEVICE = "cpu"


# ------------------------------------------------------------------ the cross-backend tests

@pytest.mark.parametrize("seed,offset", rng_cases.SEEDS_OFFSETS)
@pytest.mark.parametrize("n", rng_cases.SIZES)
@pytest.mark.parametrize("base", rng_cases.BASES)
def test_integer_streams_bit_identical(backend, seed, offset, n, base):
    rng_cases.test_integer_streams_bit_identical((backend, DEVICE), seed, offset, n, base)


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "binomial", "cauchy"])
@pytest.mark.parametrize("n,base", [(4097, 0), (1001, 3)])
def test_floats_agree_across_backends(backend, dist, n, base):
    rng_cases.test_floats_agree_across_backends((backend, DEVICE), dist, n, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_noise_is_rounded_fp32(backend, dtype):
    rng_cases.test_low_precision_noise_is_rounded_fp32((backend, DEVICE), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("zero_grad", [False, True])
def test_perturb(backend, dtype, save, zero_grad):
    nso_cases.test_perturb(backend, DEVICE, dtype, save, zero_grad)


@pytest.mark.parametrize("dist", nso_cases.DISTS)
def test_perturb_distributions(backend, dist):
    nso_cases.test_perturb_distributions(backend, DEVICE, dist)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init,zero_grad", [(True, True), (False, False), (False, True)])
def test_accumulate(backend, dtype, init, zero_grad):
    nso_cases.test_accumulate(backend, DEVICE, dtype, init, zero_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_grad,with_src", [(False, False), (True, False), (True, True)])
def test_restore(backend, dtype, with_grad, with_src):
    nso_cases.test_restore(backend, DEVICE, dtype, with_grad, with_src)


def test_non_contiguous_inputs(backend):
    nso_cases.test_non_contiguous_inputs(backend, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save,init,zero_grad", [(True, True, True), (False, False, True),
                                                 (True, False, False)])
def test_accumulate_perturb(backend, dtype, save, init, zero_grad):
    nso_cases.test_accumulate_perturb(backend, DEVICE, dtype, save, init, zero_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", base_cases.SGD_CONFIGS, ids=["plain", "nesterov-wd", "damp-max"])
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("with_w0,with_src,write_grad", [(True, True, True), (True, False, True),
                                                         (False, False, False)])
def test_sgd_step(backend, dtype, config, first_step, with_w0, with_src, write_grad):
    base_cases.test_sgd_step(backend, DEVICE, dtype, config, first_step, with_w0, with_src,
                             write_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled,weight_decay,maximize", [(True, 0.1, False), (False, 0.01, True),
                                                             (True, 0.0, False)])
@pytest.mark.parametrize("step", [1, 7])
def test_adam_step(backend, dtype, decoupled, weight_decay, maximize, step):
    base_cases.test_adam_step(backend, DEVICE, dtype, decoupled, weight_decay, maximize, step)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_weight,sharpness_weight", base_cases.WSAM_WEIGHTS)
@pytest.mark.parametrize("src_fp32,momentum", [(False, 0.9), (True, 0.0)])
def test_sgd_step_wsam(backend, dtype, grad_weight, sharpness_weight, src_fp32, momentum):
    base_cases.test_sgd_step_wsam(backend, DEVICE, dtype, grad_weight, sharpness_weight, src_fp32,
                                  momentum)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_weight,sharpness_weight", base_cases.WSAM_WEIGHTS)
def test_adam_step_wsam(backend, dtype, grad_weight, sharpness_weight):
    base_cases.test_adam_step_wsam(backend, DEVICE, dtype, grad_weight, sharpness_weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_norm_sq(backend, dtype, adaptive):
    sam_cases.test_grad_norm_sq(backend, DEVICE, dtype, adaptive)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive,with_g0,zero_grad", [(False, False, True), (True, True, False),
                                                        (True, False, True), (False, True, False)])
def test_sam_ascent(backend, dtype, adaptive, with_g0, zero_grad):
    sam_cases.test_sam_ascent(backend, DEVICE, dtype, adaptive, with_g0, zero_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_norm_sq_is_deterministic_and_accumulates(backend, dtype):
    sam_cases.test_grad_norm_sq_is_deterministic_and_accumulates(backend, DEVICE, dtype)


# ------------------------------------------------------------------ what the tests above miss

def _misaligned(n, dtype, offset, seed):
    """n random elements starting ``offset`` elements into their allocation."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n + offset, generator=g).to(dtype)[offset:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offsets", [(1, 1, 1, 1), (0, 1, 2, 3), (3, 0, 0, 0)],
                         ids=["same-phase", "all-different", "one-off"])
def test_misaligned_operands(backend, dtype, offsets):
    """Operands at different offsets from a quad boundary: no phase aligns them all, and every
    access of the launch is a masked scalar one; operands at one offset take the vector path
    at the aligning phase (the tests above use fresh, aligned tensors)."""
    n = 4 * 256 * 3 + 7
    ow, ow0, og, om = offsets
    rng = ops.rng_state(11, 3)

    def operands(seed):
        return (_misaligned(n, dtype, ow, seed), _misaligned(n, dtype, ow0, seed + 1),
                _misaligned(n, dtype, og, seed + 2), _misaligned(n, dtype, om, seed + 3),
                _misaligned(n, torch.float32, om, seed + 4))

    def run(be):
        w, w0, g, m, acc = operands(0)
        v = m.float().square().to(dtype)
        out = torch.zeros(1)
        ops.perturb_(w, w0, rng, 2, 0.1, save=True, grad=g, backend=be)
        ops.accumulate_(acc, w0, 0.5, init=False, backend=be)
        ops.restore_(w0, w, g, acc, 0.25, backend=be)
        ops.adam_step_(w, w0, g, acc, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.1, step=2, write_grad=True, backend=be)
        ops.grad_norm_sq_(out, g, w, backend=be)
        ops.sam_ascent_(w, w0, g, m, out, 0.05, adaptive=True, zero_grad=True, backend=be)
        return w, w0, g, m, v, acc, out

    for got, expected in zip(run(backend), run("torch")):
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-5)


def test_uncapped_grid(backend, emulation):
    """A device with many SMs: the grid covers every quad in one pass, no grid-stride loop."""
    emulation.set_device(1, 132)
    nso_cases.test_perturb(backend, DEVICE, torch.float32, True, True)
    sam_cases.test_grad_norm_sq(backend, DEVICE, torch.float32, True)


def test_grad_norm_sq_beyond_the_partials_cap(backend):
    """More than 1024 blocks of quads: the first pass's grid is capped at one block per partial
    and loops over the rest."""
    n = 1024 * 256 * 4 + 4097
    grad, w = (_misaligned(n, torch.float32, 0, s) for s in (5, 6))
    out, ref = torch.zeros(1), torch.zeros(1)
    ops.grad_norm_sq_(out, grad, w, backend=backend)
    ops.grad_norm_sq_(ref, grad, w, backend="torch")
    torch.testing.assert_close(out, ref, rtol=2e-7, atol=0)
