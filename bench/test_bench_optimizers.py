"""pytest-benchmark: one optimizer step per contender (``pytest bench/``, run by hand, not CI).

Optimizer work only, as ``flatfused bench`` measures it (flatfused/benchmark/): every backward
pass adds a fixed gradient into ``.grad``. pytest-benchmark reports whole steps, backward passes
included; ``extra_info`` carries the pass count and the byte budget to subtract and divide by.
Sizes are small by default; set FLATFUSED_BENCH_NUMEL (e.g. 16M), FLATFUSED_BENCH_DTYPE,
FLATFUSED_BENCH_BASE (sgd/adamw) and FLATFUSED_BENCH_ROUNDS for more.
"""
import os

import pytest
import torch

from flatfused import benchmark as fb
from flatfused import ops

NUMEL = fb.parse_count(os.environ.get("FLATFUSED_BENCH_NUMEL", "1M"))
DTYPE = fb.DTYPES[os.environ.get("FLATFUSED_BENCH_DTYPE", "float32")]
BASE = os.environ.get("FLATFUSED_BENCH_BASE", "sgd")
ROUNDS = int(os.environ.get("FLATFUSED_BENCH_ROUNDS", "5"))
DEVICE = torch.device(os.environ.get("FLATFUSED_BENCH_DEVICE", "cpu"))
BACKENDS = fb.default_backends(DEVICE)

CASES = [(opt, contender) for opt in fb.OPTIMIZERS
         for contender in fb.contenders_for(opt, BACKENDS, NUMEL, explicit_backends=False)]


@pytest.fixture(scope="module")
def tensors():
    return (fb.make_params(NUMEL, DEVICE, DTYPE, seed=0), fb.make_params(NUMEL, DEVICE, DTYPE, seed=1))


@pytest.mark.parametrize("optimizer,contender", CASES, ids=[f"{o}-{c}" for o, c in CASES])
def test_optimizer_step(benchmark, tensors, optimizer, contender):
    master, grads = tensors
    params = [torch.nn.Parameter(m.clone()) for m in master]
    backward = fb.SimulatedBackward(params, grads)
    opt, step = fb.build(contender, optimizer, BASE, params, backward)
    step()  # warm-up: lazy state
    benchmark.group = f"{optimizer}/{BASE} {fb.format_count(NUMEL)} {str(DTYPE)[6:]}"
    benchmark.extra_info.update(
        numel=NUMEL, passes=fb.passes(optimizer, contender),
        byte_budget=fb.budget_bytes(optimizer, BASE, DTYPE) * NUMEL)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def timed():
        step()
        sync()
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("what", ["copy", "torch-normal"] + [f"noise-{b}" for b in BACKENDS
                                                            if b != "torch" or NUMEL <= 1 << 20])
def test_floor(benchmark, what):
    """The yardsticks: a copy of NUMEL floats (8 bytes each) and generating NUMEL normals."""
    out = torch.empty(NUMEL, device=DEVICE)
    src = torch.ones_like(out)
    rng = ops.rng_state(1, 0, DEVICE)
    fn = {"copy": lambda: out.copy_(src), "torch-normal": lambda: out.normal_()}.get(what) or (
        lambda: ops.noise_(out, rng, backend=what[len("noise-"):]))
    benchmark.group = f"floor {fb.format_count(NUMEL)}"
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
