"""Timing one configuration: parameters, the copy/normals calibration, the round-robin timed steps
with the simulated backward passes subtracted, peak memory and the optimizer-state probe."""
from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

import flatfused
from flatfused import baselines

from .contenders import SimulatedBackward, add_through_autograd, build
from .spec import TORCH_BACKEND_MAX_NUMEL, budget_bytes, noise_draws


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


def minor_faults() -> int | None:
    """The process's minor page faults so far (None where ``resource`` is missing). A CPU step
    that faults pays the kernel to map and zero memory its allocator gave back to the system
    since the last step: docs/benchmarks.md, "The allocator"."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
    sink = [torch.zeros_like(g).requires_grad_() for g in grads]
    for t in sink:
        t.grad = torch.zeros_like(t)
    scratch = {"sink": sink, "copies": [None] * len(grads)}

    def add_pass():  # as the simulated backward adds: through autograd
        add_through_autograd(scratch["sink"], grads)

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
