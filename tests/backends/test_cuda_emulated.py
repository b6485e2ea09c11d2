"""The CUDA kernels without a GPU: csrc/cuda/*.cu, unchanged, compiled for the host and run in a
CUDA emulation (tests/emulated_cuda.py, tests/cuda_emulation/), through the same cross-backend
tests as the other backends, against the torch specification, and whole optimizer steps against
the references.

This runs the kernels' own code (the quad layout, the RNG counters and lanes, the masked ragged
quads and the vector path, the grid-stride loops, the two-pass block reduction of grad_norm_sq_
with its shuffles and barriers) on CPU tensors. It does not run nvcc's machine code or the GPU's
math library: on a GPU, tests/backends/test_gpu.py and the same cross-backend tests (backend ``cuda``) do.
"""
import inspect
import sys
from pathlib import Path

import pytest
import torch

# The kernel (ops/) and optimizer (optim/) test modules run again here, imported by the names
# pytest gives them, from their layers' folders.
for _layer in ("ops", "optim"):
    _folder = str(Path(__file__).resolve().parents[1] / _layer)
    if _folder not in sys.path:
        sys.path.append(_folder)

import emulated_cuda  # noqa: E402
import test_aliasing as aliasing_cases  # noqa: E402
import test_base_step_kernels as base_cases  # noqa: E402
import test_nso as nso_opt_cases  # noqa: E402
import test_nso_kernels as nso_cases  # noqa: E402
import test_rng as rng_cases  # noqa: E402
import test_sam as sam_opt_cases  # noqa: E402
import test_sam_kernels as sam_cases  # noqa: E402
import test_wsam as wsam_opt_cases  # noqa: E402
from flatfused import backends, ops  # noqa: E402
from kernel_cases import DTYPES  # noqa: E402

EMULATED = "cuda-emulated"

pytestmark = pytest.mark.skipif(emulated_cuda.unavailable_reason() is not None,
                                reason=f"emulated CUDA: {emulated_cuda.unavailable_reason()}")


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    return emulated_cuda.build(tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture
def backend(emulation):
    """Backend ``cuda-emulated``, registered like any backend (ops and optimizers dispatch to
    it), on an emulated device of one SM: launches over more than 32 * 256 quads run the
    grid-stride loops."""
    backends.register_backend(
        EMULATED, emulation,
        lambda device: None if device.type == "cpu" else "the emulation runs on CPU tensors")
    emulation.set_device(0, 1)
    yield EMULATED
    backends.unregister_backend(EMULATED)


DEVICE = "cpu"


def on_emulated_cuda(test):
    """The cross-backend test ``test`` run on the emulated CUDA kernels, over its own parameters
    (so a case added there runs here too): the ``backend, device`` pairs or the
    ``backend_device`` fixture it takes become (cuda-emulated, cpu), a ``backend`` alone (the
    optimizer tests, on the CPU) becomes cuda-emulated."""
    names = list(inspect.signature(test).parameters)
    if names[0] == "backend_device":
        def lead(b):
            return ((b, DEVICE),)
        rest = names[1:]
    elif names[:2] == ["backend", "device"]:
        def lead(b):
            return (b, DEVICE)
        rest = names[2:]
    else:
        def lead(b):
            return (b,)
        rest = names[1:]

    def run(backend, **kwargs):
        test(*lead(backend), **kwargs)

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["backend", *rest]])
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] in ("backend,device", "backend"):
            continue
        run = getattr(pytest.mark, mark.name)(*mark.args, **mark.kwargs)(run)
    return run


# ------------------------------------------------------------------ the cross-backend tests

test_integer_streams_bit_identical = on_emulated_cuda(rng_cases.test_integer_streams_bit_identical)
test_floats_agree_across_backends = on_emulated_cuda(rng_cases.test_floats_agree_across_backends)
test_low_precision_noise_is_rounded_fp32 = on_emulated_cuda(
    rng_cases.test_low_precision_noise_is_rounded_fp32)

test_perturb = on_emulated_cuda(nso_cases.test_perturb)
test_perturb_distributions = on_emulated_cuda(nso_cases.test_perturb_distributions)
test_accumulate = on_emulated_cuda(nso_cases.test_accumulate)
test_restore = on_emulated_cuda(nso_cases.test_restore)
test_accumulate_perturb = on_emulated_cuda(nso_cases.test_accumulate_perturb)
test_nso_kernels_non_contiguous_inputs = on_emulated_cuda(nso_cases.test_non_contiguous_inputs)

test_sgd_step = on_emulated_cuda(base_cases.test_sgd_step)
test_adam_step = on_emulated_cuda(base_cases.test_adam_step)
test_sgd_step_wsam = on_emulated_cuda(base_cases.test_sgd_step_wsam)
test_adam_step_wsam = on_emulated_cuda(base_cases.test_adam_step_wsam)

test_grad_norm_sq = on_emulated_cuda(sam_cases.test_grad_norm_sq)
test_sam_ascent = on_emulated_cuda(sam_cases.test_sam_ascent)
test_grad_norm_sq_is_deterministic_and_accumulates = on_emulated_cuda(
    sam_cases.test_grad_norm_sq_is_deterministic_and_accumulates)
test_grad_norm_sq_propagates_non_finite = on_emulated_cuda(
    sam_cases.test_grad_norm_sq_propagates_non_finite)
test_sam_kernels_non_contiguous_inputs = on_emulated_cuda(sam_cases.test_non_contiguous_inputs)
test_empty_is_a_no_op = on_emulated_cuda(sam_cases.test_empty_is_a_no_op)

test_w0_may_be_w_itself = on_emulated_cuda(aliasing_cases.test_w0_may_be_w_itself)
test_written_operands_and_autograd = on_emulated_cuda(
    aliasing_cases.test_written_operands_and_autograd)

# whole optimizer steps through the CUDA kernels, against the references
test_nso_three_call_api_matches_reference = on_emulated_cuda(
    nso_opt_cases.test_three_call_api_matches_reference)
test_nso_step_closure_matches_reference = on_emulated_cuda(
    nso_opt_cases.test_step_closure_matches_reference)
test_nso_two_point_estimate_is_exact_on_a_quadratic = on_emulated_cuda(
    nso_opt_cases.test_two_point_estimate_is_exact_on_a_quadratic)
test_nso_step_closure_equals_three_call_api = on_emulated_cuda(
    nso_opt_cases.test_step_closure_equals_three_call_api)
test_nso_checkpoint_resume_is_bit_identical = on_emulated_cuda(
    nso_opt_cases.test_checkpoint_resume_is_bit_identical)
test_nso_three_call_gradient_contract = on_emulated_cuda(
    nso_opt_cases.test_three_call_gradient_contract)
test_nso_minus_pass_is_w0_minus_the_same_noise = on_emulated_cuda(
    nso_opt_cases.test_minus_pass_is_w0_minus_the_same_noise)
test_nso_step_closure_discards_gradients_from_before_the_step = on_emulated_cuda(
    nso_opt_cases.test_step_closure_discards_gradients_from_before_the_step)
test_sam_matches_reference = on_emulated_cuda(sam_opt_cases.test_matches_reference)
test_wsam_matches_reference = on_emulated_cuda(wsam_opt_cases.test_matches_reference)
test_wsam_decoupled_step_with_a_maximizing_base_matches_reference = on_emulated_cuda(
    wsam_opt_cases.test_decoupled_step_with_a_maximizing_base_matches_reference)


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


# ------------------------------------------------------------------ the emulation itself

@pytest.mark.parametrize("threads,blocks", [(256, 1), (64, 3)])
def test_emulated_block_reduction(emulation, threads, blocks):
    """Shuffles and __syncthreads as on a GPU: a two-level block sum comes out exact."""
    values = torch.arange(threads * blocks, dtype=torch.float64)
    out = torch.full((blocks,), float("nan"), dtype=torch.float64)
    emulation.selftest("block_sum", values, out, threads, blocks)
    assert out.tolist() == [values[b * threads:(b + 1) * threads].sum().item()
                            for b in range(blocks)]


@pytest.mark.parametrize("kernel,message", [
    ("exited_lane", "shuffle while lanes of the warp have exited"),
    ("divergent_barriers", "barriers that can never complete"),
    ("misaligned", r"misaligned access at .*selftest.cu:\d+: address \d+ is not a multiple of 16"),
])
def test_emulation_reports_kernel_errors(emulation, kernel, message):
    """What a GPU would hang or fault on stops the launch with the reason; the next launch runs."""
    buf = torch.zeros(64)
    with pytest.raises(RuntimeError, match=message):
        emulation.selftest(kernel, buf, buf.clone(), 32)
    out = torch.zeros(1, dtype=torch.float64)
    emulation.selftest("block_sum", torch.ones(32, dtype=torch.float64), out, 32)
    assert out.item() == 32
