"""``flatfused bench``: the optimizers against the reference and the best pure-PyTorch version.

One run on one machine measures, for every optimizer (NSO K=1 two-point lam=0, NSO K=2, SAM,
ASAM, WSAM) x base optimizer (SGD momentum, AdamW) x dtype x parameter count:

- the contenders: ``reference`` (flatfused.reference, the published code's behaviour and cost),
  ``baseline`` (flatfused.baselines, flat buffers and stock PyTorch ops), and flatfused on every
  available backend (``step(closure)``; for NSO also the reference's three-call API);
- optimizer work only: each backward pass is *simulated* by adding a fixed gradient into
  ``.grad`` (what autograd's accumulation does; a fresh copy when ``.grad`` is None, as after
  ``zero_grad(set_to_none=True)``), identical for every contender; its cost, measured in the same
  run, is subtracted per pass. The median of ``repeats`` steps after a warm-up step, taken
  round-robin across the contenders of a configuration (a shared machine's load changes);
- in the same run, at every size: the bandwidth of a plain copy (the physical floor of these
  memory-bound loops) and the time ``torch.Tensor.normal_`` and flatfused's ``noise_`` take to
  generate the normals (on a CPU generating them can cost more than moving the bytes);
- achieved GB/s: the *byte budget* of the optimizer (below; the bytes an exact single-pass-per-
  operation schedule must move) divided by the optimizer time, and its ratio to the copy
  bandwidth; the same budget for every contender, so GB/s compares like with like;
- optimizer state per parameter: the distinct storages the optimizer holds (its own tensors
  plus the base optimizer's), largest over the points of one step (probed inside the passes),
  and the part beyond the base optimizer's state;
- peak memory per parameter during one step, counting the parameters, gradients, state and
  temporaries the contender allocates (CPU: live malloc bytes sampled by a thread; CUDA:
  ``torch.cuda.max_memory_allocated``).

With ``--e2e`` (part of the default run) whole training steps of a ResNet-18-sized CNN and a
small ViT are timed (forward and backward included), where NSO's skipped clean pass shows.

The byte model is written down in :func:`budget_accesses` and docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import flatfused
from flatfused import backends as _backends
from flatfused import baselines, reference
from flatfused._argtypes import positive
from flatfused.bench_ddp import e2e_ddp_table, run_e2e_ddp

SCHEMA_VERSION = 2

# ---------------------------------------------------------------------------- what is measured

OPTIMIZERS: dict[str, dict] = {
    "nso": dict(kind="nso", K=1, use_neg=True, lam=0.0),
    "nso-k2": dict(kind="nso", K=2, use_neg=True, lam=0.0),
    "sam": dict(kind="sam", adaptive=False),
    "asam": dict(kind="sam", adaptive=True),
    "wsam": dict(kind="wsam", adaptive=False),
}
BASES: dict[str, tuple[type, dict]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
HYPER = dict(sigma=0.01, rho=0.05, gamma=0.9)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SIZES = {"cpu": ["1M", "4M", "16M", "64M"], "cuda": ["1M", "4M", "16M", "64M", "256M", "1G"]}
# The torch backend is the RNG specification in int64 tensor ops, not a contender for speed
# (seconds per NSO step at 1M, minutes at 16M): by default NSO on it is not timed, and SAM/WSAM
# (no RNG) only up to this size. ``--backends ...,torch`` times it everywhere.
TORCH_BACKEND_MAX_NUMEL = 1 << 20


def has_wsam() -> bool:
    return hasattr(flatfused, "WeightedSAM")


# ---------------------------------------------------------------------------- the byte model


def budget_accesses(optimizer: str, base: str) -> int:
    """Element accesses (reads + writes) per parameter of one exact step with one pass per
    operation, forward/backward passes excluded. Bytes = accesses x element size; momentum and
    Adam moments have the parameter dtype (as torch.optim keeps them). The schedules:

    NSO (step(closure), lam = 0, K perturbations, two-point): zero .grad (W g: 1); the first
    perturbation saves w0 (R w, W w0, W w: 3); every further perturbation (R w0, W w: 2 each,
    2K - 1 of them); the fused restore + base update, which also leaves the update direction
    in .grad (R w0, R g, W w, W g + the base state). lam > 0 adds a rescale of g (R g, W g: 2).

    SAM/ASAM (clean gradient in .grad, step(closure)): zero .grad before the clean pass (1);
    the norm (R g, ASAM also R w: 1 or 2); the ascent saving w0 (R g, R w, W w0, W w: 4); zero
    .grad (1); the fused restore + base update (R w0, R g, W w + the base state).

    WSAM (decoupled, restore by copy; flatfused.baselines.WeightedSAM's schedule): zero .grad
    (1); the norm (1); the ascent saving w0 (4); the base update of w0 with g (R w0, R g, W w0 +
    the base state); g = -g (2); after the perturbed pass w = w0 - lr alpha g (R w0, R g, W w: 3).

    Base state per update: SGD momentum R/W m (2), AdamW R/W m and v (4).
    """
    spec = OPTIMIZERS[optimizer]
    state = {"sgd": 2, "adamw": 4}[base]
    if spec["kind"] == "nso":
        perturbs = spec["K"] * (2 if spec["use_neg"] else 1)
        rescale = 2 if spec["lam"] > 0 else 0
        return 1 + 3 + 2 * (perturbs - 1) + rescale + (4 + state)
    if spec["kind"] == "sam":
        return 1 + (2 if spec["adaptive"] else 1) + 4 + 1 + (3 + state)
    if spec["kind"] == "wsam":
        return 1 + (2 if spec["adaptive"] else 1) + 4 + (3 + state) + 2 + 3
    raise ValueError(optimizer)


def budget_bytes(optimizer: str, base: str, dtype: torch.dtype) -> int:
    return budget_accesses(optimizer, base) * torch.empty((), dtype=dtype).element_size()


def noise_draws(optimizer: str) -> int:
    """Normal draws per parameter and step that an exact schedule cannot avoid (the minus pass
    of the two-point estimate can reuse a stored draw)."""
    spec = OPTIMIZERS[optimizer]
    return spec["K"] if spec["kind"] == "nso" else 0


def passes(optimizer: str, contender: str) -> int:
    """Forward/backward passes per step for a contender (what is subtracted)."""
    spec = OPTIMIZERS[optimizer]
    if spec["kind"] == "nso":
        perturbed = spec["K"] * (2 if spec["use_neg"] else 1)
        three_call = contender == "reference" or contender.endswith("3-call")
        # The reference trainer (and its API) always runs the clean pass, also for lam == 0.
        return perturbed + (1 if three_call or spec["lam"] > 0 else 0)
    return 2


# ---------------------------------------------------------------------------- small helpers


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def format_count(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def make_params(numel: int, device, dtype, pieces: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """``numel`` values in ``pieces`` tensors of uneven sizes (like a real model's)."""
    weights = [1 + (i * 7919) % 13 for i in range(pieces)]
    sizes = [numel * w // sum(weights) for w in weights]
    sizes[-1] += numel - sum(sizes)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in sizes]


def _median_times(fn, repeats: int, sync, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------------------- memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _libc_live_bytes() -> Callable[[], int] | None:
    """Bytes currently allocated through malloc (glibc's mallinfo2), or None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def live() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return live


class PeakMemory:
    """Peak bytes allocated above a starting level while the ``with`` block runs.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch allocates CPU tensors with malloc, so
    glibc's count of allocated bytes is the live tensor memory (plus small Python objects); a
    thread samples it every 0.1 ms (a tensor that lives for less can be missed). ``start`` is
    set at construction, so everything allocated after it (parameters, state) counts.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.live = None if device.type == "cuda" else _libc_live_bytes()
        self.start = self._now()
        self.peak = None

    def _now(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self.live() if self.live else None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self.live is None:
            return self
        self._stop = threading.Event()
        self.peak = self.live()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.live())
                time.sleep(1e-4)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.live is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.live())

    @property
    def bytes(self) -> int | None:
        if self.peak is None or self.start is None:
            return None
        return max(self.peak - self.start, 0)


def _storages(tensors) -> dict[int, int]:
    """Distinct storages (data pointer -> bytes) of some tensors (views count once)."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _state_tensors(state: dict) -> list[torch.Tensor]:
    return [t for per_param in state.values() if isinstance(per_param, dict)
            for t in per_param.values() if isinstance(t, torch.Tensor)]


class StateProbe:
    """The optimizer's state bytes (own + base), largest over the points where it is probed."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params
        self.total = self.base = self.beyond = 0

    def _tensors(self) -> tuple[list, list]:
        opt = self.opt
        base_state = _state_tensors(opt.base_optimizer.state)
        if isinstance(opt, baselines.FlatBaseline):
            own = opt.state_tensors()
        elif isinstance(opt, flatfused.optim.flat_optimizer.FlatOptimizer):
            own = [t for buf in opt.flat_buffers for t in buf.state.values()]
        else:  # the reference: its own state dict
            own = _state_tensors(opt.state)
        return own + base_state, base_state

    def __call__(self) -> None:
        everything, base_state = self._tensors()
        # Parameters and gradients are not state, even where the reference aliases them with it
        # (after its second_step the parameters *are* the saved w0).
        live = _storages([p for p in self.params] + [p.grad for p in self.params])
        total = {k: v for k, v in _storages(everything).items() if k not in live}
        base = {k: v for k, v in _storages(base_state).items() if k not in live}
        self.total = max(self.total, sum(total.values()))
        self.base = max(self.base, sum(base.values()))
        self.beyond = max(self.beyond, sum(v for k, v in total.items() if k not in base))


# ---------------------------------------------------------------------------- simulated backward


class SimulatedBackward:
    """Adds fixed gradients into ``.grad`` (a fresh copy where ``.grad`` is None), counting what
    it did so the cost can be subtracted; optionally runs a probe after each pass."""

    def __init__(self, params, grads):
        self.params, self.grads = params, grads
        self.adds = self.copies = 0
        self.probe = None

    def __call__(self):
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                p.grad = g.clone()
                self.copies += 1
            else:
                p.grad.add_(g)
                self.adds += 1
        if self.probe is not None:
            self.probe()

    def reset_counts(self) -> None:
        self.adds = self.copies = 0


class _Holder(torch.nn.Module):
    """A module owning bare parameters (WSAM takes a model)."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


# ---------------------------------------------------------------------------- contenders


def contenders_for(optimizer: str, backends: list[str], numel: int, explicit_backends: bool
                   ) -> list[str]:
    kind = OPTIMIZERS[optimizer]["kind"]
    names = ["reference", "baseline"]
    for b in backends:
        if b == "torch" and not explicit_backends and (kind == "nso"
                                                       or numel > TORCH_BACKEND_MAX_NUMEL):
            continue
        if kind == "wsam" and not has_wsam():
            continue
        names.append(f"flatfused[{b}]")
        if kind == "nso":
            names.append(f"flatfused[{b}] 3-call")
    return names


def build(contender: str, optimizer: str, base: str, params: list[torch.nn.Parameter],
          backward: SimulatedBackward):
    """The optimizer of ``contender`` and a function running one step of it."""
    spec = OPTIMIZERS[optimizer]
    kind = spec["kind"]
    base_cls, base_kw = BASES[base]
    backend = contender[len("flatfused["):contender.index("]")] if contender.startswith("flatfused") else None
    model = _Holder(params)

    if kind == "nso":
        K, lam, use_neg = spec["K"], spec["lam"], spec["use_neg"]
        uw = (1 - lam) / (2 * K if use_neg else K)
        if contender == "reference":
            opt = reference.NSM(params, base_cls, sigma=HYPER["sigma"], **base_kw)
        elif contender == "baseline":
            opt = baselines.NSO(params, base_cls, sigma=HYPER["sigma"], num_perturbs=K, lam=lam,
                                use_neg=use_neg, **base_kw)
        else:
            opt = flatfused.NSO(params, base_cls, sigma=HYPER["sigma"], num_perturbs=K, lam=lam,
                                use_neg=use_neg, backend=backend, seed=0, **base_kw)
        if contender == "reference" or contender.endswith("3-call"):
            def step():
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
        else:
            def step():
                opt.step(backward)
        return opt, step

    if kind == "sam":
        adaptive = spec["adaptive"]
        if contender == "reference":
            opt = reference.SAM(params, base_cls, rho=HYPER["rho"], adaptive=adaptive, **base_kw)
        elif contender == "baseline":
            opt = baselines.SAM(params, base_cls, rho=HYPER["rho"], adaptive=adaptive, **base_kw)
        else:
            opt = flatfused.SAM(params, base_cls, rho=HYPER["rho"], adaptive=adaptive,
                                backend=backend, **base_kw)

        def step():  # the clean pass, then step(closure) runs the pass at the ascent point
            opt.zero_grad()
            backward()
            opt.step(backward)
        return opt, step

    adaptive = spec["adaptive"]
    wsam_kw = dict(rho=HYPER["rho"], gamma=HYPER["gamma"], adaptive=adaptive)
    if contender == "reference":
        opt = reference.WeightedSAM(model, base_cls(params, **base_kw), **wsam_kw)
    elif contender == "baseline":
        opt = baselines.WeightedSAM(params, base_cls, **wsam_kw, **base_kw)
    else:
        opt = flatfused.WeightedSAM(model, base_cls(params, **base_kw), backend=backend, **wsam_kw)

    def step():  # WSAM's step runs both passes
        opt.zero_grad()
        opt.step(backward)
    return opt, step


# ---------------------------------------------------------------------------- calibration


def calibrate(numel: int, device: torch.device, dtype: torch.dtype, backends: list[str],
              repeats: int) -> dict:
    """Copy bandwidth, normal generation and the simulated backward pass at this size.

    These are fixed costs, so the *fastest* of the repeats is the estimate least disturbed by
    other load: the copy bandwidth is then a true ceiling, and the subtracted backward cost
    is never inflated by a hiccup (which would make a contender look faster than it is).
    """
    sync = _sync_for(device)
    repeats = max(repeats, 5)
    out = torch.empty(numel, device=device)
    # A source of real data: never-touched pages read as the shared zero page, far too fast.
    src = torch.ones_like(out)
    copy_s = min(_median_times(lambda: out.copy_(src), repeats, sync))
    normal_s = min(_median_times(lambda: out.normal_(), repeats, sync))
    noise_ms = {}
    rng = flatfused.ops.rng_state(1, 0, device)
    for b in backends:
        if b == "torch" and numel > TORCH_BACKEND_MAX_NUMEL:
            continue
        noise_ms[b] = 1e3 * min(_median_times(
            lambda: flatfused.ops.noise_(out, rng, backend=b), repeats, sync))
    grads = make_params(numel, device, dtype, seed=1)
    params = [torch.zeros_like(g) for g in grads]
    holder = [None] * len(grads)

    def add():
        for p, g in zip(params, grads):
            p.add_(g)

    def copy():
        for i, g in enumerate(grads):
            holder[i] = g.clone()
    add_s = min(_median_times(add, repeats, sync))
    copy_pass_s = min(_median_times(copy, repeats, sync))
    return dict(numel=numel, dtype=str(dtype).replace("torch.", ""), copy_ms=1e3 * copy_s,
                copy_gb_per_s=8 * numel / copy_s / 1e9, torch_normal_ms=1e3 * normal_s,
                flatfused_noise_ms=noise_ms, backward_add_ms=1e3 * add_s,
                backward_copy_ms=1e3 * copy_pass_s)


# ---------------------------------------------------------------------------- one measurement


@dataclass
class _Built:
    """A contender ready to be timed."""

    name: str
    step: Callable[[], None]
    opt: object
    backward: SimulatedBackward
    probe: StateProbe
    memory: PeakMemory
    times: list


def measure_group(contenders: list[str], optimizer: str, base: str, numel: int,
                  device: torch.device, dtype: torch.dtype, master: list[torch.Tensor],
                  grads: list[torch.Tensor], calib: dict, repeats: int,
                  on_error: Callable[[str, BaseException], None] | None = None) -> list[dict]:
    """Rows for every contender of one configuration.

    Each contender is built and takes two steps alone (a warm-up, then a step that measures the
    peak memory and probes the state); then the timed steps go round-robin, one step of each
    contender per round, so that a change in the machine's load hits every contender alike
    instead of whichever happened to run during it.
    """
    sync = _sync_for(device)
    built: list[_Built] = []

    def fail(name, exc):
        if on_error is None:
            raise exc
        on_error(name, exc)

    for name in contenders:
        try:
            memory = PeakMemory(device)
            params = [torch.nn.Parameter(m.clone()) for m in master]
            backward = SimulatedBackward(params, grads)
            opt, step = build(name, optimizer, base, params, backward)
            step()  # warm-up; the base optimizer's state appears only at its first update
            probe = StateProbe(opt, params)
            backward.probe = probe
            with memory:  # a steady-state step: peak memory and the state probes
                step()
            probe()
            backward.probe = None
            backward.reset_counts()
            built.append(_Built(name, step, opt, backward, probe, memory, []))
        except Exception as exc:
            fail(name, exc)
    # The simulated backward pass is timed in the same rounds, so that what is subtracted was
    # measured under the same load as the steps it is subtracted from.
    scratch = {"sink": [torch.zeros_like(g) for g in grads], "copies": [None] * len(grads)}

    def add_pass():
        for t, g in zip(scratch["sink"], grads):
            t.add_(g)

    def copy_pass():
        for i, g in enumerate(grads):
            scratch["copies"][i] = g.clone()
    pass_times = {"add": [], "copy": []}
    add_pass()  # warm-up, as the contenders had theirs: a first call's one-off costs are not
    copy_pass()  # the pass's (with one repeat they would be all that is subtracted)
    for _ in range(repeats):
        for kind, fn in (("add", add_pass), ("copy", copy_pass)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            pass_times[kind].append(time.perf_counter() - t0)
        for b in list(built):
            try:
                sync()
                t0 = time.perf_counter()
                b.step()
                sync()
                b.times.append(time.perf_counter() - t0)
            except Exception as exc:
                built.remove(b)
                fail(b.name, exc)
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = budget_bytes(optimizer, base, dtype) * numel
    rows = []
    scratch.clear()
    add_s, copy_s = (statistics.median(pass_times[k]) for k in ("add", "copy"))
    add_min, copy_min = (min(pass_times[k]) for k in ("add", "copy"))
    for b in built:
        n = len(b.backward.params) * repeats
        add_passes, copy_passes = b.backward.adds / n, b.backward.copies / n
        t = statistics.median(b.times)
        pass_s = add_passes * add_s + copy_passes * copy_s
        net = max(t - pass_s, 1e-9)
        t_min, pass_min = min(b.times), add_passes * add_min + copy_passes * copy_min
        rows.append(dict(
            optimizer=optimizer, base=base, dtype=str(dtype).replace("torch.", ""), numel=numel,
            contender=b.name, ms_per_step=1e3 * t, optimizer_ms_per_step=1e3 * net,
            ms_min=1e3 * min(b.times), ms_max=1e3 * max(b.times),
            optimizer_ms_min=1e3 * max(t_min - pass_min, 1e-9),
            reliable_fastest=t_min - pass_min > 0.1 * t_min,
            passes=add_passes + copy_passes, params_per_s=numel / net,
            gb_per_s=nbytes / net / 1e9, copy_fraction=(nbytes / net / 1e9) / calib["copy_gb_per_s"],
            state_bytes_per_param=b.probe.total / numel,
            state_bytes_per_param_beyond_base=b.probe.beyond / numel,
            state_param_copies_beyond_base=b.probe.beyond / (numel * elem),
            peak_bytes_per_param=None if b.memory.bytes is None else b.memory.bytes / numel,
            floor_ms=floor_ms(optimizer, base, dtype, calib), repeats=repeats,
            backward_ms=1e3 * pass_s,
            # When the subtracted passes are most of the step, the optimizer time is noise.
            reliable=t - pass_s > 0.1 * t))
    del built
    if numel >= 1 << 20:  # a collection costs ~0.3 s: worth it only to free big tensors in cycles
        gc.collect()
    return rows


def floor_ms(optimizer: str, base: str, dtype: torch.dtype, calib: dict) -> float:
    """The larger of moving the byte budget at copy bandwidth and generating the unavoidable
    normals with the fastest generator measured in this run."""
    numel = calib["numel"]
    byte_ms = budget_bytes(optimizer, base, dtype) * numel / (calib["copy_gb_per_s"] * 1e9) * 1e3
    generators = [calib["torch_normal_ms"], *calib["flatfused_noise_ms"].values()]
    return max(byte_ms, noise_draws(optimizer) * min(generators))


# ---------------------------------------------------------------------------- progress


class Progress:
    """tqdm when installed, else one updating line on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label[:60])
            self.bar.update(n)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s, ~{eta:4.0f}s left  {label[:56]:<56}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------- the suite


def default_backends(device: torch.device) -> list[str]:
    found = _backends.available(device)
    if device.type == "cpu" and "triton" in found and _backends.triton_interpreted():
        found.remove("triton")  # the interpreter is a test vehicle, not a contender
    return found


def fits(numel: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the largest contender fits: the reference NSO keeps about 12 parameter-sized
    tensors alive with the fixed gradients and the master copy; fp32 noise on top."""
    need = numel * (12 * torch.empty((), dtype=dtype).element_size() + 8)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.9 * free
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return True
    return need < 0.8 * pages


def default_repeats(numel: int) -> int:
    """5 timed steps up to 16M parameters, 3 above (a reference step there takes seconds)."""
    return 5 if numel <= 16 << 20 else 3


def run_suite(sizes: list[int], dtypes: list[torch.dtype], optimizers: list[str],
              bases: list[str], backends: list[str] | None = None, device="cpu",
              repeats: int | None = None, progress: bool = True, log=print,
              out: dict | None = None, on_update: Callable[[dict], None] | None = None) -> dict:
    """Measure every (size, dtype, optimizer, base, contender); ``repeats=None`` is
    :func:`default_repeats`. Rows are appended to ``out`` as they come and ``on_update(out)`` is
    called after each, so an interrupted run keeps what it measured."""
    device = torch.device(device)
    explicit = backends is not None
    backends = backends if explicit else default_backends(device)
    out = {} if out is None else out
    out.update(calibration=[], results=[], errors=[], backends=backends, wall_s=[])
    plan = []
    # dtype-major, sizes ascending: an interrupted run has whole dtypes (fp32 first) at all sizes
    for dtype in dtypes:
        for numel in sizes:
            if not fits(numel, device, dtype):
                log(f"skipping {format_count(numel)} {dtype}: does not fit in memory")
                continue
            for opt in optimizers:
                for base in bases:
                    plan.append((numel, dtype, opt, base,
                                 contenders_for(opt, backends, numel, explicit)))
    bar = Progress(sum(len(p[-1]) for p in plan), progress)
    current = None
    try:
        for numel, dtype, opt, base, contenders in plan:
            n_rep = repeats or default_repeats(numel)
            name = str(dtype).replace("torch.", "")
            if current != (numel, dtype):
                current = (numel, dtype)
                master = grads = None
                gc.collect()
                calib = calibrate(numel, device, dtype, backends, n_rep)
                out["calibration"].append(calib)
                master = make_params(numel, device, dtype, seed=0)
                grads = make_params(numel, device, dtype, seed=1)

            def on_error(contender, exc):  # one broken contender must not cost the whole run
                out["errors"].append(dict(optimizer=opt, base=base, dtype=name, numel=numel,
                                          contender=contender,
                                          error=f"{type(exc).__name__}: {exc}"))
                log(f"\n{opt}/{base} {format_count(numel)} {name} {contender} failed: "
                    f"{type(exc).__name__}: {exc}", file=sys.stderr)
            t_run = time.perf_counter()
            out["results"] += measure_group(contenders, opt, base, numel, device, dtype, master,
                                            grads, calib, n_rep, on_error)
            _relative(out["results"])
            out["wall_s"].append(dict(seconds=round(time.perf_counter() - t_run, 2), optimizer=opt,
                                      base=base, numel=numel, dtype=name))
            bar.update(f"{opt} {base} {format_count(numel)} {name}", len(contenders))
            if on_update is not None:
                on_update(out)
    finally:
        bar.close()
    return out


def _relative(results: list[dict]) -> None:
    """Speedups against the reference and the baseline of the same configuration."""
    keyed = {}
    for r in results:
        keyed.setdefault((r["optimizer"], r["base"], r["dtype"], r["numel"]), {})[r["contender"]] = r
    for group in keyed.values():
        for r in group.values():
            for other in ("reference", "baseline"):
                o = group.get(other)
                ok = o is not None and r.get("reliable", True) and o.get("reliable", True)
                r[f"speedup_vs_{other}"] = r["params_per_s"] / o["params_per_s"] if ok else None
                # The same from each contender's fastest step: on a loaded machine the median
                # can catch a burst of other work, the fastest step rarely does.
                ok = o is not None and r.get("reliable_fastest", True) and \
                    o.get("reliable_fastest", True)
                r[f"speedup_vs_{other}_fastest"] = (
                    o["optimizer_ms_min"] / r["optimizer_ms_min"] if ok else None)


# ---------------------------------------------------------------------------- end to end


class SmallViT(torch.nn.Module):
    """A small vision transformer: ViT-Tiny's width (192, 3 heads, 6 blocks; 2.7M parameters)
    on 32x32 images cut into 8x8 patches (16 tokens and a class token)."""

    def __init__(self, image=32, patch=8, dim=192, depth=6, heads=3, classes=10):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = torch.nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                                 activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class _BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.short = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                             torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


class _ResNet18(torch.nn.Module):
    """ResNet-18's layout (11M parameters) for when torchvision is missing."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                                        torch.nn.BatchNorm2d(64), torch.nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = torch.nn.Sequential(*blocks)
        self.head = torch.nn.Linear(512, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _resnet18() -> torch.nn.Module:
    try:
        import torchvision
    except ImportError:
        return _ResNet18()
    return torchvision.models.resnet18(num_classes=10)


# End-to-end models: name -> factory of a module taking (batch, 3, 32, 32) images, 10 classes.
MODELS: dict[str, Callable[[], torch.nn.Module]] = {"resnet18": _resnet18, "vit": SmallViT}


def make_model(name: str) -> torch.nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]()


E2E_CONTENDERS = ["adamw", "nso reference", "nso baseline", "nso flatfused", "sam reference",
                  "sam baseline", "sam flatfused", "wsam reference", "wsam baseline",
                  "wsam flatfused"]


def e2e_step(contender: str, model: torch.nn.Module, batch, backend: str):
    """(optimizer, one training step) for an end-to-end contender, AdamW as the base."""
    x, y = batch
    kw = dict(lr=1e-3, weight_decay=1e-2)
    loss_fn = torch.nn.functional.cross_entropy

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    name, _, impl = contender.partition(" ")
    if name == "adamw":
        try:
            opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
        except RuntimeError:
            opt = torch.optim.AdamW(model.parameters(), foreach=True, **kw)

        def step():
            opt.zero_grad()
            closure()
            opt.step()
        return opt, step
    if name == "nso":
        nso = dict(num_perturbs=1, lam=0.0, use_neg=True)
        if impl == "reference":
            opt = reference.NSM(model.parameters(), torch.optim.AdamW, sigma=HYPER["sigma"], **kw)
            return opt, lambda: reference.train_step(model, opt, lambda m, b: loss_fn(m(b[0]), b[1]),
                                                     batch, **nso)
        if impl == "baseline":
            opt = baselines.NSO(model, torch.optim.AdamW, sigma=HYPER["sigma"], **nso, **kw)
        else:
            opt = flatfused.NSO(model, torch.optim.AdamW, sigma=HYPER["sigma"], backend=backend,
                                **nso, **kw)
        return opt, lambda: opt.step(closure)
    if name == "sam":
        if impl == "reference":
            opt = reference.SAM(model.parameters(), torch.optim.AdamW, rho=HYPER["rho"], **kw)
            return opt, lambda: reference.sam_train_step(
                model, opt, lambda m, b: loss_fn(m(b[0]), b[1]), batch)
        if impl == "baseline":
            opt = baselines.SAM(model, torch.optim.AdamW, rho=HYPER["rho"], **kw)
        else:
            opt = flatfused.SAM(model, torch.optim.AdamW, rho=HYPER["rho"], backend=backend, **kw)

        def step():
            opt.zero_grad()
            closure()
            opt.step(closure)
        return opt, step
    wkw = dict(rho=HYPER["rho"], gamma=HYPER["gamma"])
    if impl == "reference":
        opt = reference.WeightedSAM(model, torch.optim.AdamW(model.parameters(), **kw), **wkw)
    elif impl == "baseline":
        opt = baselines.WeightedSAM(model, torch.optim.AdamW, **wkw, **kw)
    else:
        opt = flatfused.WeightedSAM(model, torch.optim.AdamW(model.parameters(), **kw),
                                    backend=backend, **wkw)

    def step():
        opt.zero_grad()
        opt.step(closure)
    return opt, step


def run_e2e(models: list[str], device="cpu", batch_size: int = 128, repeats: int = 5,
            backend: str = "auto", progress: bool = True, contenders=None,
            rows: list | None = None, on_update: Callable[[], None] | None = None) -> list[dict]:
    """Whole training steps; rows are appended to ``rows`` as they come (see :func:`run_suite`)."""
    device = torch.device(device)
    sync = _sync_for(device)
    contenders = [c for c in (contenders or E2E_CONTENDERS)
                  if not (c == "wsam flatfused" and not has_wsam())]
    bar = Progress(len(models) * len(contenders), progress)
    rows = [] if rows is None else rows
    try:
        for name in models:
            torch.manual_seed(0)
            initial = make_model(name).to(device)
            state = {k: v.clone() for k, v in initial.state_dict().items()}
            g = torch.Generator().manual_seed(0)
            batch = (torch.randn(batch_size, 3, 32, 32, generator=g).to(device),
                     torch.randint(0, 10, (batch_size,), generator=g).to(device))
            numel = sum(p.numel() for p in initial.parameters())
            # Built and warmed up one by one, then timed round-robin (see measure_group).
            built = []
            for contender in contenders:
                model = make_model(name).to(device)
                model.load_state_dict(state)
                model.train()
                opt, step = e2e_step(contender, model, batch, backend)
                step()  # warm-up: lazy state
                built.append((contender, step, []))
            for _ in range(repeats):
                for contender, step, times in built:
                    sync()
                    t0 = time.perf_counter()
                    step()
                    sync()
                    times.append(time.perf_counter() - t0)
            for contender, step, times in built:
                rows.append(dict(model=name, params=numel, batch=batch_size, contender=contender,
                                 ms_per_step=1e3 * statistics.median(times),
                                 ms_min=1e3 * min(times), ms_max=1e3 * max(times),
                                 repeats=repeats))
            e2e_ratios(rows)
            del built, opt, step, model
            gc.collect()
            bar.update(name, len(contenders))
            if on_update is not None:
                on_update()
    finally:
        bar.close()
    return rows


def e2e_ratios(rows: list[dict]) -> None:
    """Ratios to the AdamW step of the same model: of the medians, and of the fastest steps
    (the estimate least disturbed by other load on a shared machine)."""
    base = {(r["model"], r.get("batch")): r for r in rows if r["contender"] == "adamw"}
    for r in rows:
        b = base.get((r["model"], r.get("batch")))
        r["ratio_vs_adamw"] = r["ms_per_step"] / b["ms_per_step"] if b else None
        r["ratio_vs_adamw_min"] = r["ms_min"] / b["ms_min"] if b else None


# ---------------------------------------------------------------------------- targets


def check_targets(report: dict) -> list[dict]:
    """The issue's targets, as far as this run measured them (benchmarks, not tests)."""
    out = []
    results = report.get("results", [])
    n16 = 16 << 20

    def find(opt, base, contender, numel=n16, dtype="float32"):
        for r in results:
            if (r["optimizer"], r["base"], r["contender"], r["numel"], r["dtype"]) == (
                    opt, base, contender, numel, dtype):
                return r
        return None

    ref = find("nso", "sgd", "reference")
    if ref:
        for contender, api, goal in (("flatfused[cpu]", "step(closure)", 6.0),
                                     ("flatfused[cpu] 3-call", "three-call API", 5.0)):
            r = find("nso", "sgd", contender)
            for suffix, what in (("", "medians"), ("_fastest", "fastest")):
                if r and r.get(f"speedup_vs_reference{suffix}") is not None:
                    v = r[f"speedup_vs_reference{suffix}"]
                    out.append(dict(target=f"CPU 16M fp32 NSO/SGD-momentum {api} vs reference "
                                           f"({what})", measured=v, goal=f">= {goal}x",
                                    met=v >= goal))
        r = find("nso", "sgd", "flatfused[cpu]")
        for suffix, what in (("", "medians"), ("_fastest", "fastest")):
            if r and r.get(f"speedup_vs_baseline{suffix}") is not None:
                v = r[f"speedup_vs_baseline{suffix}"]
                out.append(dict(target=f"CPU 16M fp32 NSO/SGD-momentum step(closure) vs baseline "
                                       f"({what})", measured=v, goal=">= 2.5x", met=v >= 2.5))
    for c in report.get("calibration", []):
        if c["numel"] == n16 and c["dtype"] == "float32" and "cpu" in c["flatfused_noise_ms"]:
            ratio = c["torch_normal_ms"] / c["flatfused_noise_ms"]["cpu"]
            out.append(dict(target="CPU 16M normals: flatfused noise_ vs torch normal_",
                            measured=ratio, goal=">= 4x", met=ratio >= 4))
    for r in results:
        if r["contender"].startswith("flatfused[") and not r["contender"].endswith("3-call") \
                and r["numel"] == n16 and r["dtype"] == "float32":
            copies = r["state_param_copies_beyond_base"]
            out.append(dict(target=f"state beyond base, {r['optimizer']}/{r['base']} "
                                   f"{r['contender']} (parameter copies)",
                            measured=copies, goal="<= 1", met=copies <= 1 + 1e-9))
    out += _gpu_bandwidth_targets(report)
    for r in report.get("e2e", []):
        if r["contender"] == "nso flatfused" and r["ratio_vs_adamw"] is not None:
            for key, what in (("ratio_vs_adamw", "medians"), ("ratio_vs_adamw_min", "fastest")):
                if r.get(key) is not None:
                    out.append(dict(target=f"end to end {r['model']} batch {r['batch']}: NSO "
                                           f"step / AdamW step ({what})",
                                    measured=r[key], goal="<= 2.1x", met=r[key] <= 2.1))
    return out


GPU_TARGET_MIN_NUMEL = 64 << 20
GPU_TARGET_COPY_FRACTION = 0.8


def _gpu_bandwidth_targets(report: dict) -> list[dict]:
    """GPU: every fused optimizer step at 64M+ parameters, fp32 and bf16, at >= 80% of the copy
    bandwidth measured in the same run. One line per backend and dtype, naming the slowest
    (optimizer, base, size) against the goal, so a miss cannot hide behind an average."""
    if not str(report.get("device", "cpu")).startswith("cuda"):
        return []
    gpu = (report.get("machine") or {}).get("gpu") or "GPU"
    worst: dict[tuple[str, str], dict] = {}
    for r in report.get("results", []):
        if not r["contender"].startswith("flatfused[") or r["contender"].endswith("3-call") \
                or r["numel"] < GPU_TARGET_MIN_NUMEL or r["dtype"] not in ("float32", "bfloat16"):
            continue
        key = (r["contender"], r["dtype"])
        if key not in worst or r["copy_fraction"] < worst[key]["copy_fraction"]:
            worst[key] = r
    return [dict(target=f"{gpu} {format_count(GPU_TARGET_MIN_NUMEL)}+ {dtype} {contender} steps: "
                        f"lowest share of copy bandwidth ({r['optimizer']}/{r['base']} at "
                        f"{format_count(r['numel'])})",
                 measured=r["copy_fraction"], goal=f">= {GPU_TARGET_COPY_FRACTION:.1f} of copy",
                 met=r["copy_fraction"] >= GPU_TARGET_COPY_FRACTION)
            for (contender, dtype), r in sorted(worst.items())]


# ---------------------------------------------------------------------------- output


def table(report: dict, numel: int | None = None, dtype: str | None = None,
          base: str | None = None) -> str:
    """The suite's rows as a Markdown table (optionally one size/dtype/base)."""
    lines = ["| optimizer | base | dtype | params | contender | optimizer ms/step | Mparams/s | "
             "vs reference | vs baseline | GB/s | of copy BW | state B/param (beyond base) | "
             "peak B/param |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    for r in report.get("results", []):
        if (numel and r["numel"] != numel) or (dtype and r["dtype"] != dtype) or \
                (base and r["base"] != base):
            continue
        if not r.get("reliable", True):
            r = dict(r, contender=r["contender"] + " (unreliable: backward passes >90% of step)")
        peak = "-" if r["peak_bytes_per_param"] is None else f"{r['peak_bytes_per_param']:.0f}"
        lines.append(
            f"| {r['optimizer']} | {r['base']} | {r['dtype']} | {format_count(r['numel'])} | "
            f"{r['contender']} | {r['optimizer_ms_per_step']:.1f} | {r['params_per_s'] / 1e6:.0f} | "
            f"{x(r['speedup_vs_reference'])} | {x(r['speedup_vs_baseline'])} | "
            f"{r['gb_per_s']:.1f} | {100 * r['copy_fraction']:.0f}% | "
            f"{r['state_bytes_per_param']:.0f} ({r['state_bytes_per_param_beyond_base']:.0f}) | "
            f"{peak} |")
    return "\n".join(lines)


def summary_table(report: dict, numel: int, dtype: str = "float32") -> str:
    """One row per optimizer and base at one size: optimizer ms per step of each contender, with
    flatfused's speedups, share of copy bandwidth and state beyond the base optimizer."""
    rows = [r for r in report.get("results", []) if r["numel"] == numel and r["dtype"] == dtype]
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    head = ["optimizer / base"] + [f"{c} ms" for c in contenders]
    lines = ["| " + " | ".join(head) + " | flatfused vs reference | vs baseline | of copy BW | "
             "state beyond base (B/param) |",
             "| --- |" + " ---: |" * (len(contenders) + 4)]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["optimizer"], r["base"]), {})[r["contender"]] = r
    best = [c for c in contenders if c.startswith("flatfused[") and not c.endswith("3-call")]
    for (opt, base), group in keyed.items():
        cells = [f"{opt} / {base}"]
        for c in contenders:
            r = group.get(c)
            cells.append("-" if r is None else f"{r['optimizer_ms_per_step']:.1f}")
        ff = next((group[c] for c in best if c in group), None)
        if ff is None:
            cells += ["-"] * 4
        else:
            def x(v):
                return "-" if v is None else f"{v:.2f}x"
            cells += [x(ff["speedup_vs_reference"]), x(ff["speedup_vs_baseline"]),
                      f"{100 * ff['copy_fraction']:.0f}%",
                      f"{ff['state_bytes_per_param_beyond_base']:.0f} "
                      f"(reference {group['reference']['state_bytes_per_param_beyond_base']:.0f})"
                      if "reference" in group else
                      f"{ff['state_bytes_per_param_beyond_base']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(report: dict) -> str:
    lines = ["| params | dtype | copy ms (GB/s) | torch normal_ ms | flatfused noise_ ms | "
             "simulated backward ms (add / copy) |", "| ---: | --- | ---: | ---: | --- | ---: |"]
    for c in report.get("calibration", []):
        noise = ", ".join(f"{b} {t:.1f}" for b, t in c["flatfused_noise_ms"].items()) or "-"
        lines.append(f"| {format_count(c['numel'])} | {c['dtype']} | {c['copy_ms']:.2f} "
                     f"({c['copy_gb_per_s']:.1f}) | {c['torch_normal_ms']:.1f} | {noise} | "
                     f"{c['backward_add_ms']:.1f} / {c['backward_copy_ms']:.1f} |")
    return "\n".join(lines)


def e2e_table(report: dict) -> str:
    lines = ["| model | params | batch | contender | ms/step (median) | vs AdamW step | "
             "fastest step ms | vs AdamW (fastest) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    for r in report.get("e2e", []):
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['contender']} "
                     f"| {r['ms_per_step']:.1f} | {x(r['ratio_vs_adamw'])} | {r['ms_min']:.1f} | "
                     f"{x(r.get('ratio_vs_adamw_min'))} |")
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    lines = ["| target | measured | goal | met |", "| --- | ---: | --- | --- |"]
    for t in report.get("targets", []):
        lines.append(f"| {t['target']} | {t['measured']:.2f} | {t['goal']} | "
                     f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    """Speedup vs the reference against size, one panel per optimizer and base, a line per
    contender and dtype. Needs matplotlib (imported only here)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    results = report.get("results", [])
    opts = list(dict.fromkeys(r["optimizer"] for r in results))
    bases = list(dict.fromkeys(r["base"] for r in results))
    if not opts:
        return None
    sizes = sorted({r["numel"] for r in results})
    fig, axes = plt.subplots(len(bases), len(opts), figsize=(3.6 * len(opts), 3.2 * len(bases)),
                             squeeze=False, sharex=True)
    for i, base in enumerate(bases):
        for j, opt in enumerate(opts):
            ax = axes[i][j]
            lines = {}
            for r in results:
                if r["optimizer"] != opt or r["base"] != base or r["contender"] == "reference":
                    continue
                lines.setdefault((r["contender"], r["dtype"]), []).append(
                    (r["numel"], r["speedup_vs_reference"]))
            for (contender, dtype), pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if dtype == "float32" else "--", label=f"{contender} {dtype}")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # speedups span 0.5x to 30x
            ax.set_xticks(sizes, [format_count(n) for n in sizes])
            ax.set_title(f"{opt} / {base}", fontsize=9)
            if j == 0:
                ax.set_ylabel("speedup vs reference")
            if i == len(bases) - 1:
                ax.set_xlabel("parameters")
            ax.legend(fontsize=6)
    machine = report.get("machine", {})
    fig.suptitle(f"flatfused bench on {machine.get('gpu') or machine.get('cpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_info(device: torch.device) -> dict:
    return dict(cpu=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, flatfused=flatfused.__version__,
                python=platform.python_version(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                cpu_isa=_cpu_isa())


def _cpu_isa() -> str | None:
    """The instruction set the CPU kernels picked at run time (None without the extension)."""
    try:
        from flatfused import _C
        return _C.cpu_isa()
    except Exception:
        return None


def default_output(device: torch.device, machine: dict, prefix="suite") -> Path:
    name = (machine["gpu"] or machine["cpu"]).replace(" ", "-").replace("/", "-")
    return Path("bench/results") / f"{prefix}_{device.type}_{name}.json"


# ---------------------------------------------------------------------------- command line


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _csv(text: str | None, allowed=None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SystemExit(f"unknown {bad}; choose from {sorted(allowed)}")
    return items


def _batch_sizes(text: str) -> list[int]:
    parse = positive(int)
    try:
        sizes = [parse(t) for t in _csv(text)]
    except argparse.ArgumentTypeError:
        sizes = []
    if not sizes:
        raise SystemExit(f"--batch takes comma-separated positive integers, got {text!r}")
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="flatfused bench",
        description="Time flatfused's optimizers against the reference and the best pure-PyTorch "
                    "version (optimizer work only), and whole training steps (--e2e). "
                    "See docs/benchmarks.md.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated parameter counts (default CPU: 1M,4M,16M,64M; "
                             "CUDA: up to 1G, as far as memory allows)")
    parser.add_argument("--numel", default=None, help="one parameter count (same as --sizes N)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated, from {list(OPTIMIZERS)} (default: all)")
    parser.add_argument("--bases", default="sgd,adamw")
    parser.add_argument("--backends", default=None,
                        help="comma-separated flatfused backends (default: every available one; "
                             "'torch' only up to 1M)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per measurement (default 5 up to 16M parameters, 3 above; "
                             "5 end to end)")
    parser.add_argument("--quick", action="store_true",
                        help="1M and 4M, float32, SGD, 3 repeats, small end-to-end batch")
    parser.add_argument("--e2e", action="store_true", help="only the end-to-end benchmark")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end benchmark")
    parser.add_argument("--models", default="resnet18,vit")
    parser.add_argument("--batch", default="32,128",
                        help="end-to-end batch sizes, comma-separated (default 32,128: the "
                             "optimizer's fixed cost weighs more at the smaller one)")
    parser.add_argument("--ddp-ranks", type=int, default=0,
                        help="also time end-to-end NSO steps under DDP on this many CPU ranks "
                             "(gloo, one thread each, the first --batch per rank; default 0: off)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/...)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-json", default=None,
                        help="print the summary (at --numel, default 16M), calibration, "
                             "end-to-end and target tables of a saved result instead of measuring")
    parser.add_argument("--full", action="store_true",
                        help="with --from-json: the full table (filters: --numel, --dtypes, --bases)")
    args = parser.parse_args(argv)

    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        dtypes = _csv(args.dtypes)
        if args.full:
            bases = _csv(args.bases)
            print(table(report, parse_count(args.numel) if args.numel else None,
                        dtypes[0] if len(dtypes) == 1 else None,
                        bases[0] if len(bases) == 1 else None))
        else:
            print(summary_table(report, parse_count(args.numel or "16M"), dtypes[0]))
        for part in (calibration_table, e2e_table, e2e_ddp_table, targets_table):
            print()
            print(part(report))
        return 0

    if args.ddp_ranks and args.ddp_ranks < 2:
        raise SystemExit(f"--ddp-ranks needs at least 2 ranks, got {args.ddp_ranks}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes, dtypes, bases, repeats = ["1M", "4M"], ["float32"], ["sgd"], args.repeats or 3
        batches = [min(b, 8) for b in _batch_sizes(args.batch)][:1]
    else:
        sizes = _csv(args.sizes) or DEFAULT_SIZES.get(device.type, DEFAULT_SIZES["cpu"])
        dtypes, bases, repeats = _csv(args.dtypes), _csv(args.bases), args.repeats
        batches = _batch_sizes(args.batch)
    if args.numel:
        sizes = [args.numel]
    dtypes = _csv(",".join(dtypes) if isinstance(dtypes, list) else dtypes, DTYPES)
    bases = _csv(",".join(bases), BASES)
    optimizers = _csv(args.optimizers, OPTIMIZERS) or list(OPTIMIZERS)
    backends = _csv(args.backends)
    machine = machine_info(device)
    load_before = _load()
    report = dict(
        benchmark="flatfused-suite", schema=SCHEMA_VERSION,
        command="flatfused bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=str(device),
        machine=machine,
        settings=dict(sizes=[parse_count(s) for s in sizes], dtypes=dtypes, bases=bases,
                      optimizers=optimizers, repeats=repeats, e2e_batches=batches,
                      hyperparameters=HYPER,
                      base_hyperparameters={k: v[1] for k, v in BASES.items()},
                      optimizer_specs=OPTIMIZERS, wsam_available=has_wsam(),
                      byte_budget_accesses={f"{o}/{b}": budget_accesses(o, b)
                                            for o in optimizers for b in bases}),
    )
    prefix = "e2e" if args.e2e else "suite"
    path = Path(args.output) if args.output else default_output(device, machine, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save(partial: bool) -> None:
        report["seconds"] = time.perf_counter() - t0
        report["partial"] = partial
        report["targets"] = check_targets(report)
        path.write_text(json.dumps(report, indent=2) + "\n")

    # SIGTERM (e.g. a time limit) ends the run like Ctrl-C: what was measured is kept.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    interrupted = False
    try:
        # End to end first: it is short, and the targets need it.
        if not args.no_e2e:
            report["e2e"] = []
            for batch in batches:
                run_e2e(_csv(args.models), device, batch, repeats or 5,
                        progress=not args.no_progress, rows=report["e2e"],
                        on_update=lambda: save(True))
        if args.ddp_ranks:
            report["e2e_ddp"] = run_e2e_ddp(_csv(args.models), args.ddp_ranks, batches[0],
                                            repeats or 5)
            save(True)
        if not args.e2e:
            run_suite([parse_count(s) for s in sizes], [DTYPES[d] for d in dtypes], optimizers,
                      bases, backends, device, repeats, not args.no_progress, out=report,
                      on_update=lambda _: save(True))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    load_after = _load()
    report["machine"]["load_average_before"] = load_before
    report["machine"]["load_average_after"] = load_after
    # The run itself adds about one unit of load per thread to the load after it.
    cores = os.cpu_count() or 1
    busy = (load_before is not None and load_before[0] > 0.75 * cores) or (
        load_after is not None and load_after[0] - torch.get_num_threads() > 0.75 * cores)
    report["machine"]["busy"] = busy
    save(interrupted)

    if report.get("results"):
        print(table(report))
        sizes_run = sorted({r["numel"] for r in report["results"]})
        shown = max([n for n in sizes_run if n <= 16 << 20] or sizes_run)
        print(f"\nsummary at {format_count(shown)} {dtypes[0]} (optimizer-only ms per step):")
        print(summary_table(report, shown, dtypes[0]))
        print()
        print(calibration_table(report))
    if report.get("e2e"):
        print()
        print(e2e_table(report))
    if report.get("e2e_ddp"):
        print()
        print(e2e_ddp_table(report))
    if report["targets"]:
        print()
        print(targets_table(report))
    if busy:
        print(f"\nnote: the machine was busy (load average {load_before} -> {load_after} on "
              f"{os.cpu_count()} cores): timings are noisy", file=sys.stderr)
    print(f"\nwrote {path} ({report['seconds']:.0f} s{', partial' if interrupted else ''})")
    if report.get("results") and not args.no_plot:
        png = plot(report, path.with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
