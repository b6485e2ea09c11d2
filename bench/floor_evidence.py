"""Where shares of the floor above 100% came from: the old harness's subtraction, or its floor.

Before schema 3, ``flatfused bench`` took a step's own time as its median time less its passes
each timed apart (a simulated pass on tensors of their own, without the optimizer's hooks) and
compared the byte budget over that time with a plain copy's bandwidth (``of copy BW``). This
script measures, in the same rounds and on the same steps (flatfused's NSO and SAM over SGD
momentum, 16M fp32 parameters by default):

- the subtraction: the passes timed apart against the same passes timed inside the step (what
  ``flatfused bench`` now subtracts, step by step), paired by round;
- the floor: the plain copy (ordinary stores, which read each line before writing it past the
  last-level cache) against the copy with streaming stores and the other kernels of the floor
  (flatfused/benchmark/floor.py), best of the rounds and paired by round;
- each step's share of the plain copy and of the new floor, paired by round.

    python bench/floor_evidence.py --threads 1,2 --output bench/results/floor_evidence_cpu.json

docs/benchmarks.md ("Why rows showed more than 100%") quotes a run of it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from flatfused.benchmark import floor as fb_floor
from flatfused.benchmark.contenders import SimulatedBackward, add_through_autograd, build
from flatfused.benchmark.measure import make_params
from flatfused.benchmark.report import machine_info
from flatfused.benchmark.spec import budget_bytes, parse_count

OPTIMIZERS = ("nso", "sam")


def measure(numel: int, rounds: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    f32 = torch.float32
    floor = fb_floor.StreamFloor(numel, torch.device("cpu"), f32)
    master, grads = make_params(numel, "cpu", f32, seed=0), make_params(numel, "cpu", f32, seed=1)
    steps = {}
    for opt in OPTIMIZERS:
        params = [torch.nn.Parameter(m.clone()) for m in master]
        backward = SimulatedBackward(params, grads)
        _, step = build("flatfused[cpu]", opt, "sgd", params, backward)
        step()
        step()
        steps[opt] = (step, backward)
    # The old harness's separately timed pass: the same fixed gradients added through autograd
    # into tensors of its own, which carry no optimizer hooks.
    sink = [torch.zeros_like(g).requires_grad_() for g in grads]
    for t in sink:
        t.grad = torch.zeros_like(t)
    add_through_autograd(sink, grads)
    apart, total, inside = [], {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(rounds):
        floor.run_round()
        t0 = time.perf_counter()
        add_through_autograd(sink, grads)
        apart.append(time.perf_counter() - t0)
        for k, (step, backward) in steps.items():
            before = backward.seconds
            t0 = time.perf_counter()
            step()
            total[k].append(time.perf_counter() - t0)
            inside[k].append(backward.seconds - before)
    med = statistics.median
    kernels = floor.seconds
    rates = floor.gb_per_s()
    best = max(rates, key=rates.get)
    out = dict(numel=numel, rounds=rounds, threads=threads, load_average=list(os.getloadavg()),
               floor_gb_per_s=rates, floor_kernel=best,
               copy_nt_over_copy_best=rates["copy-nt"] / rates["copy"],
               copy_over_copy_nt_paired=med(a / b for a, b in zip(kernels["copy"],
                                                                  kernels["copy-nt"])),
               pass_apart_ms=1e3 * med(apart))
    for k in steps:
        own = [t - i for t, i in zip(total[k], inside[k])]
        old = med(total[k]) - 2 * med(apart)  # both steps run two passes
        budget = budget_bytes(k, "sgd", f32) * numel

        def share(kernel):  # the budget at the kernel's rate of the round, over the step's own
            scale = budget / (fb_floor.STREAM_COUNTS[kernel] * 4 * numel)
            return med(t * scale / o for t, o in zip(kernels[kernel], own))
        out[k] = dict(
            step_ms=1e3 * med(total[k]), passes_inside_ms=1e3 * med(inside[k]),
            passes_apart_ms=2e3 * med(apart),
            passes_apart_over_inside_paired=med(2 * a / i for a, i in zip(apart, inside[k])),
            own_ms_direct=1e3 * med(own), own_ms_old_subtraction=1e3 * old,
            old_share_of_plain_copy=budget / old / (rates["copy"] * 1e9),
            share_of_plain_copy_paired=share("copy"), share_of_copy_nt_paired=share("copy-nt"),
            share_of_floor_paired=share(best))
    floor.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", default="16M")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    runs = [measure(parse_count(args.numel), args.rounds, int(t))
            for t in args.threads.split(",")]
    report = dict(benchmark="flatfused-floor-evidence", machine=machine_info(torch.device("cpu")),
                  runs=runs)
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
