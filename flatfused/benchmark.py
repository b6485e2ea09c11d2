"""Benchmark of the NSO optimizer step against the faithful reference, in one run on one machine.

Optimizer work only: each "backward pass" is simulated by adding a fixed gradient into ``.grad``
(what autograd's accumulation does), identical for every contender, and its measured cost is
subtracted to give the optimizer-only time. The schedule is the NSO paper's: K perturbations,
the two-point estimate (``use_neg``), ``lam`` the weight of the clean gradient.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import flatfused
from flatfused import backends as _backends
from flatfused import reference


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def make_params(numel: int, device, dtype, pieces: int = 64) -> list[torch.nn.Parameter]:
    """``numel`` elements split into ``pieces`` tensors of uneven sizes (like a real model)."""
    weights = [1 + (i * 7919) % 13 for i in range(pieces)]
    sizes = [numel * w // sum(weights) for w in weights]
    sizes[-1] += numel - sum(sizes)
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype))
            for s in sizes]


def _timed(fn, repeats: int, sync) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run(numel: int, device="cpu", dtype=torch.float32, K=1, lam=0.0, use_neg=True,
        repeats=5, backends=None, sigma=0.01, lr=0.1, momentum=0.9, progress=print) -> dict:
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if not backends:
        # The torch backend is the specification (Philox in int64 tensor ops): minutes at 16M.
        backends = [b for b in _backends.available(device) if b != "torch" or numel <= (1 << 22)]
    uw = (1 - lam) / (2 * K if use_neg else K)
    results = {}

    params = make_params(numel, device, dtype)
    grads = [torch.randn_like(p) for p in params]

    def backward():
        for p, g in zip(params, grads):
            p.grad.add_(g)

    for p in params:
        p.grad = torch.zeros_like(p)
    pass_times = _timed(backward, repeats, sync)
    t_pass = statistics.median(pass_times)

    def three_call_step(opt):
        backward()
        opt.store_gradients(zero_grad=True, store_weights=True, update_weight=lam)
        for _ in range(K):
            opt.first_step(zero_grad=True, store_perturb=True)
            backward()
            opt.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
            if use_neg:
                opt.first_step(zero_grad=True, store_perturb=False)
                backward()
                opt.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
        opt.second_step(zero_grad=True)

    def record(name, times, passes, state_bytes):
        t = statistics.median(times)
        net = max(t - passes * t_pass, 1e-9)
        results[name] = dict(ms_per_step=1e3 * t, optimizer_ms_per_step=1e3 * net,
                             passes=passes, params_per_s=numel / net,
                             state_bytes_per_param=state_bytes / numel)
        progress(f"  {name:28s} {1e3 * t:9.2f} ms/step  optimizer-only {1e3 * net:9.2f} ms")

    elem = torch.empty((), dtype=dtype).element_size()
    progress(f"NSO step, {numel / 1e6:.1f}M {str(dtype).replace('torch.', '')} parameters on "
             f"{device}, K={K}, lam={lam}, use_neg={use_neg}, SGD momentum {momentum}")
    progress(f"  simulated backward pass      {1e3 * t_pass:9.2f} ms (subtracted)")

    ref = reference.NSM(params, torch.optim.SGD, sigma=sigma, lr=lr, momentum=momentum)
    record("reference", _timed(lambda: three_call_step(ref), repeats, sync), 1 + K * (1 + use_neg),
           3 * numel * elem)
    ref.state.clear()  # free the reference's three copies before timing the next contender

    for backend in backends:
        opt = flatfused.NSO(params, torch.optim.SGD, sigma=sigma, lr=lr, momentum=momentum,
                            num_perturbs=K, lam=lam, use_neg=use_neg, backend=backend, seed=0)
        record(f"flatfused[{backend}] 3-call", _timed(lambda: three_call_step(opt), repeats, sync),
               1 + K * (1 + use_neg), _own_state_bytes(opt))
        for buf in opt.flat_buffers:
            buf.state.pop("acc", None)
            buf.state.pop("w0", None)
        passes = (lam > 0) + K * (1 + use_neg) if lam < 1 else 1
        record(f"flatfused[{backend}] closure", _timed(lambda: opt.step(backward), repeats, sync),
               passes, _own_state_bytes(opt))

    out = torch.empty(numel, device=device)
    normal_ms = 1e3 * statistics.median(_timed(lambda: out.normal_(), repeats, sync))
    # A source of real data: never-touched pages read as the shared zero page, far too fast.
    copy_src = torch.ones_like(out)
    copy_ms = 1e3 * statistics.median(_timed(lambda: out.copy_(copy_src), repeats, sync))
    noise_ms = {}
    rng = flatfused.ops.rng_state(1, 0, device)
    for backend in backends:
        if backend == "torch" and numel > (1 << 22):
            continue
        noise_ms[backend] = 1e3 * statistics.median(_timed(
            lambda: flatfused.ops.noise_(out, rng, backend=backend), repeats, sync))
    progress(f"  torch normal_ {normal_ms:.2f} ms, copy {copy_ms:.2f} ms "
             f"({2 * numel * 4 / copy_ms / 1e6:.1f} GB/s), flatfused noise_ "
             + ", ".join(f"{b} {t:.2f} ms" for b, t in noise_ms.items()))
    base = results["reference"]["params_per_s"]
    for row in results.values():
        row["speedup_vs_reference"] = row["params_per_s"] / base
    return dict(
        benchmark="nso_step", numel=numel, dtype=str(dtype), device=str(device), K=K, lam=lam,
        use_neg=use_neg, momentum=momentum, repeats=repeats, simulated_backward_ms=1e3 * t_pass,
        torch_normal_ms=normal_ms, copy_ms=copy_ms,
        copy_gb_per_s=2 * numel * 4 / copy_ms / 1e6, flatfused_noise_ms=noise_ms,
        results=results, machine=dict(cpu=_cpu_name(), threads=torch.get_num_threads(),
                                      torch=torch.__version__, flatfused=flatfused.__version__,
                                      gpu=torch.cuda.get_device_name() if device.type == "cuda"
                                      else None),
    )


def _own_state_bytes(opt) -> int:
    """Bytes of the optimizer's own flat state (w0, accumulator), beyond the base optimizer's."""
    return sum(t.numel() * t.element_size() for b in opt.flat_buffers
               for name, t in b.state.items() if name in ("w0", "acc"))


def table(report: dict) -> str:
    lines = ["| contender | ms/step | optimizer ms/step | Mparams/s | speedup vs reference | "
             "state B/param beyond base |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['optimizer_ms_per_step']:.1f} | "
                     f"{r['params_per_s'] / 1e6:.0f} | {r['speedup_vs_reference']:.2f}x | "
                     f"{r['state_bytes_per_param']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flatfused bench",
                                     description="NSO optimizer step vs the reference")
    parser.add_argument("--numel", default="16M", help="parameter count, e.g. 16M (default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-perturbs", type=int, default=1)
    parser.add_argument("--lam", type=float, default=0.0)
    parser.add_argument("--no-neg", action="store_true", help="one-point estimate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=None, help="comma-separated (default: all available)")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/...)")
    args = parser.parse_args(argv)
    report = run(parse_count(args.numel), args.device, getattr(torch, args.dtype),
                 args.num_perturbs, args.lam, not args.no_neg, args.repeats,
                 args.backends.split(",") if args.backends else None)
    print()
    print(table(report))
    machine = (report["machine"]["gpu"] or report["machine"]["cpu"]).replace(" ", "-")
    path = Path(args.output or Path("bench/results") /
                f"nso_step_{report['device'].split(':')[0]}_{machine}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
