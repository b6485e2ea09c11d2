"""Peak memory of the Hessian tools, beyond the model's own forward and backward pass.

    python -m flatfused.sharpness.memory            # the table in docs/sharpness.md

How memory is counted (the same quantity on both devices: bytes of tensor storage the
allocator hands out, not what the process or the caching allocator holds):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
  allocated at the start.
* CPU: PyTorch's CPU allocator reports every allocation and free (size, pointer) to the
  profiler when ``torch.profiler.profile(profile_memory=True)`` is on. The peak is the maximum
  of the running sum of those events over the call, counting the free of a block only when
  its allocation happened inside the call (blocks allocated before it, such as the weights,
  are not part of the measured growth). ``tracemalloc`` cannot be used (it sees Python objects,
  not tensor storage), and RSS deltas are blurred by the C allocator keeping freed pages.

The peak of a call is its maximum growth over the memory live when it starts; "extra" is that
peak minus the peak of one plain ``loss_fn(model(x), y).backward()`` (activations and ``.grad``,
which the training step needs anyway), and the ratio is extra / P with P the parameter bytes.
"""
from __future__ import annotations

import argparse
import gc
import sys
from typing import Callable, Dict, List, Tuple

import torch

from .hessian import hessian_trace, top_eigenvalues

__all__ = ["peak_bytes", "hessian_memory", "CASES"]


def peak_bytes(fn: Callable[[], object], device="cpu") -> Tuple[object, int]:
    """``(fn(), peak)``: the largest growth, in bytes, of live tensor storage on ``device``
    during ``fn()`` relative to its start."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"peak_bytes measures cpu or cuda memory, not {device.type}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = []
    stack = _event_tree(prof)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.id, fields.ptr, fields.alloc_size))
    if not events and _allocates_nothing_check():
        raise RuntimeError("the profiler reported no CPU allocations; cannot measure memory here")
    live: Dict[int, int] = {}
    current = peak = 0
    for _, _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = live.get(ptr, 0) + size
            current += size
        elif ptr in live:  # a free of a block allocated before the call is not growth
            current -= live.pop(ptr)
        peak = max(peak, current)
    return out, peak


def _event_tree(prof) -> list:
    # The allocation events (with pointers) are only exposed through this experimental API;
    # if a torch version drops it, say so instead of returning a wrong number.
    try:
        return list(prof.profiler.kineto_results.experimental_event_tree())
    except AttributeError as exc:
        raise RuntimeError(f"torch {torch.__version__}'s profiler does not expose allocation "
                           "events: CPU peak memory cannot be measured (CUDA can)") from exc


def _allocates_nothing_check() -> bool:
    """True when the profiler also misses a known allocation (then it is broken, not ``fn``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.empty(1 << 16)
    stack = _event_tree(prof)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            return False
    return True


# name -> (call of the tool on (model, loss_fn, batch)), the settings shown in the table
CASES: Dict[str, Callable] = {
    "trace, Hutchinson": lambda m, f, b: hessian_trace(m, f, b, num_probes=4),
    "trace, Hutchinson, finite differences":
        lambda m, f, b: hessian_trace(m, f, b, num_probes=4, hvp_method="finite_difference"),
    "trace, Hutchinson, per layer":
        lambda m, f, b: hessian_trace(m, f, b, num_probes=4, per_layer=True),
    "trace, Hutch++ 12 products":
        lambda m, f, b: hessian_trace(m, f, b, num_probes=12, method="hutch++"),
    "trace, Hutch++ 30 products":
        lambda m, f, b: hessian_trace(m, f, b, num_probes=30, method="hutch++"),
    "top-1 eigenvalue, power":
        lambda m, f, b: top_eigenvalues(m, f, b, k=1, iters=8, tol=0.0),
    "top-3 eigenvalues, power":
        lambda m, f, b: top_eigenvalues(m, f, b, k=3, iters=8, tol=0.0),
    "top-1 eigenvalue, Lanczos 10 steps":
        lambda m, f, b: top_eigenvalues(m, f, b, k=1, method="lanczos", iters=10),
    "top-1 eigenvalue, Lanczos 20 steps":
        lambda m, f, b: top_eigenvalues(m, f, b, k=1, method="lanczos", iters=20),
}


def models(device="cpu") -> Dict[str, Tuple[torch.nn.Module, Tuple[torch.Tensor, torch.Tensor]]]:
    """The measured models: an MLP whose parameters dominate its activations, and a small CNN
    whose activations dominate (batch 32 of 3x32x32 images)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Tanh(),
                              torch.nn.Linear(1024, 512), torch.nn.Tanh(), torch.nn.Linear(512, 10))
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, stride=2), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    out = {
        "MLP 512-1024-512-10, batch 32": (mlp, (torch.randn(32, 512, generator=g),
                                                torch.randint(0, 10, (32,), generator=g))),
        "CNN 3 conv + BN, batch 32 x 3x32x32": (cnn, (torch.randn(32, 3, 32, 32, generator=g),
                                                      torch.randint(0, 10, (32,), generator=g))),
    }
    return {k: (m.to(device), tuple(t.to(device) for t in b)) for k, (m, b) in out.items()}


def hessian_memory(model, loss_fn, batch, cases=None, device=None) -> List[dict]:
    """One row per case: ``peak`` bytes of the call, ``extra`` beyond the peak of one
    forward+backward (``baseline``), ``ratio`` = extra / P (parameter bytes). The model is
    measured in eval mode, as the tools run it."""
    device = device or next(model.parameters()).device
    cases = CASES if cases is None else cases
    params = [p for p in model.parameters() if p.requires_grad]
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for p in model.parameters():
            p.grad = None

        def forward_backward():
            loss_fn(model(batch[0]), batch[1]).backward()

        forward_backward()  # warm up: lazy initialisation is not the model's memory
        for p in model.parameters():
            p.grad = None
        _, baseline = peak_bytes(forward_backward, device)
        for p in model.parameters():
            p.grad = None
        rows = []
        for name, case in cases.items():
            case(model, loss_fn, batch)  # warm up (first-call allocations of the ops)
            _, peak = peak_bytes(lambda: case(model, loss_fn, batch), device)
            rows.append({"case": name, "param_bytes": p_bytes, "baseline": baseline, "peak": peak,
                         "extra": peak - baseline, "ratio": (peak - baseline) / p_bytes})
        return rows
    finally:
        for m, training in modes:
            m.training = training


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flatfused.sharpness.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loss_fn = torch.nn.functional.cross_entropy
    print(f"torch {torch.__version__}, device {args.device}; MB = 1e6 bytes")
    print("| model | P (MB) | fwd+bwd peak (MB) | measurement | peak (MB) | extra (MB) | extra / P "
          "| extra / fwd+bwd |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for label, (model, batch) in models(args.device).items():
        for row in hessian_memory(model, loss_fn, batch, device=torch.device(args.device)):
            print(f"| {label} | {row['param_bytes'] / 1e6:.2f} | {row['baseline'] / 1e6:.2f} | "
                  f"{row['case']} | {row['peak'] / 1e6:.2f} | {row['extra'] / 1e6:.2f} | "
                  f"{row['ratio']:.2f} | {row['extra'] / row['baseline']:.2f} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
