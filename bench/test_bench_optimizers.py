"""pytest-benchmark: one optimizer step per contender (``pytest bench/``, run by hand, not CI).

Every backward pass adds a fixed gradient into ``.grad``, as ``flatfused bench`` simulates it
(flatfused/benchmark/), but pytest-benchmark reports whole steps, backward passes included
(``flatfused bench`` times the optimizer's own work apart); ``extra_info`` carries the pass
count and the byte budget.
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
         for contender in fb.contenders_for(opt, BACKENDS, NUMEL, explicit_backends=False)
         if contender not in fb.PEERS
         or fb.peers.unavailable_reason(contender, opt, DEVICE) is None]


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


@pytest.mark.parametrize("what", [f"stream-{k}" for k in fb.STREAM_COUNTS] + ["torch-normal"]
                         + [f"noise-{b}" for b in BACKENDS if b != "torch" or NUMEL <= 1 << 20])
def test_floor(benchmark, what):
    """The yardsticks: the floor's STREAM kernels over NUMEL elements of DTYPE (bytes as STREAM
    counts them in extra_info; flatfused/benchmark/floor.py) and generating NUMEL normals."""
    if what.startswith("stream-"):
        floor = fb.StreamFloor(NUMEL, DEVICE, DTYPE)
        kernel = what[len("stream-"):]
        if kernel not in floor.kernels:
            pytest.skip(f"no {kernel} kernel on {DEVICE}")
        fn = floor.kernels[kernel]
        benchmark.extra_info["bytes"] = fb.STREAM_COUNTS[kernel] * NUMEL * DTYPE.itemsize
    else:
        out = torch.empty(NUMEL, device=DEVICE)
        rng = ops.rng_state(1, 0, DEVICE)
        fn = (lambda: out.normal_()) if what == "torch-normal" else (
            lambda: ops.noise_(out, rng, backend=what[len("noise-"):]))
    benchmark.group = f"floor {fb.format_count(NUMEL)}"
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
