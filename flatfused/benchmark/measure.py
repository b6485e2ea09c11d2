"""Timing one configuration: parameters, the floor and normals calibration, the round-robin timed
steps (the optimizer's own time measured directly), peak memory and the optimizer-state probe."""
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

from .contenders import SimulatedBackward, build
from .floor import StreamFloor, fastest_gap, floor_bound, floor_ms, floor_note, sync_for
from .spec import DTYPES, TORCH_BACKEND_MAX_NUMEL, budget_bytes


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


def _state_tensors(state: dict, keys=None) -> list[torch.Tensor]:
    return [t for per_param in state.values() if isinstance(per_param, dict)
            for k, t in per_param.items()
            if isinstance(t, torch.Tensor) and (keys is None or k in keys)]


# What torch's SGD and AdamW keep per parameter. Some wrappers (pytorch_optimizer's SAM) share
# their base optimizer's state dict and keep their own entries in it, so the base optimizer's
# part is told by these keys rather than by the dict.
BASE_STATE_KEYS = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                             "step"})


class StateProbe:
    """The optimizer's state bytes (own + base), largest over the points where it is probed."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, params
        self.total = self.base = self.beyond = 0

    def _tensors(self) -> tuple[list, list]:
        opt = self.opt
        base = getattr(opt, "base_optimizer", opt)  # a plain torch optimizer is its own base
        base_state = _state_tensors(base.state, BASE_STATE_KEYS)
        if isinstance(opt, baselines.FlatBaseline):
            own = opt.state_tensors()
        elif isinstance(opt, flatfused.optim.flat_optimizer.FlatOptimizer):
            own = [t for buf in opt.flat_buffers for t in buf.state.values()]
        else:  # the reference or a peer: its own entries (perhaps in the base's dict)
            own = _state_tensors(opt.state) + _state_tensors(base.state)
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
              repeats: int, floor: StreamFloor | None = None) -> dict:
    """The floor at this size (STREAM's kernels, :mod:`.floor`) and the normal generators.

    Fixed costs: the *fastest* of the repeats is the estimate least disturbed by other load,
    and the floor is then a true ceiling. ``floor`` (kept by the caller) goes on collecting
    rounds while the steps are timed; its record is refreshed by :func:`refresh_floor`.
    """
    sync = sync_for(device)
    repeats = max(repeats, 5)
    floor = floor or StreamFloor(numel, device, dtype)
    for _ in range(repeats):
        floor.run_round()
    out = torch.empty(numel, device=device)
    normal_s = min(_median_times(lambda: out.normal_(), repeats, sync))
    noise_ms = {}
    rng = flatfused.ops.rng_state(1, 0, device)
    for b in backends:
        if b == "torch" and numel > TORCH_BACKEND_MAX_NUMEL:
            continue
        noise_ms[b] = 1e3 * min(_median_times(
            lambda: flatfused.ops.noise_(out, rng, backend=b), repeats, sync))
    calib = dict(numel=numel, dtype=str(dtype).replace("torch.", ""),
                 threads=torch.get_num_threads(), torch_normal_ms=1e3 * normal_s,
                 flatfused_noise_ms=noise_ms)
    return refresh_floor(calib, floor)


def refresh_floor(calib: dict, floor: StreamFloor) -> dict:
    """``calib`` with the floor's record over all its rounds so far (and, for the tables and
    older readers, the plain copy's time and bandwidth)."""
    calib.update(floor.summary())
    calib["copy_ms"] = calib["stream_ms"]["copy"]
    calib["copy_gb_per_s"] = calib["stream_gb_per_s"]["copy"]
    return calib


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
    own: list  # the step's time less the time spent in the simulated passes, per step
    inside: list  # the time spent in the simulated passes, per step


def measure_group(contenders: list[str], optimizer: str, base: str, numel: int,
                  device: torch.device, dtype: torch.dtype, master: list[torch.Tensor],
                  grads: list[torch.Tensor], calib: dict, repeats: int,
                  on_error: Callable[[str, BaseException], None] | None = None,
                  floor: StreamFloor | None = None, memory: bool = True) -> list[dict]:
    """Rows for every contender of one configuration.

    Each contender is built and takes two steps alone (a warm-up, then a step that probes the
    state and, with ``memory``, measures the peak memory); then the timed steps go round-robin,
    one step of each contender per round (and one round of the floor's STREAM kernels), so
    that a change in the machine's load hits every contender alike instead of whichever
    happened to run during it.

    The optimizer's own time is measured directly: the simulated backward pass times itself
    inside the step, and a step's own time is its time less that (nothing is estimated).
    """
    sync = sync_for(device)
    built: list[_Built] = []

    def fail(name, exc):
        if on_error is None:
            raise exc
        on_error(name, exc)

    for name in contenders:
        try:
            peak = PeakMemory(device)
            params = [torch.nn.Parameter(m.clone()) for m in master]
            backward = SimulatedBackward(params, grads)
            opt, step = build(name, optimizer, base, params, backward)
            step()  # warm-up; the base optimizer's state appears only at its first update
            probe = StateProbe(opt, params)
            backward.probe = probe
            # A steady-state step (state kept from the step before included) probed after each
            # pass, and with ``memory`` its peak memory measured.
            if memory:
                with peak:
                    step()
            else:
                step()
            probe()
            backward.probe = None
            backward.reset_counts()
            built.append(_Built(name, step, opt, backward, probe, peak, [], [], []))
        except Exception as exc:
            fail(name, exc)
    for _ in range(repeats):
        if floor is not None:
            floor.run_round()
        for b in list(built):
            if floor is not None:  # a trial of the floor beside every step
                floor.run_kernel(floor.leader())
            try:
                before = b.backward.seconds
                sync()
                t0 = time.perf_counter()
                b.step()
                sync()
                t = time.perf_counter() - t0
                inside = b.backward.seconds - before
                b.times.append(t)
                b.inside.append(inside)
                b.own.append(max(t - inside, 1e-9))
            except Exception as exc:
                built.remove(b)
                fail(b.name, exc)
    if floor is not None:
        refresh_floor(calib, floor)
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = budget_bytes(optimizer, base, dtype) * numel
    rows = []
    for b in built:
        n = len(b.backward.params) * repeats
        add_passes, copy_passes = b.backward.adds / n, b.backward.copies / n
        net, fastest = statistics.median(b.own), min(b.own)
        rows.append(dict(
            optimizer=optimizer, base=base, dtype=str(dtype).replace("torch.", ""), numel=numel,
            contender=b.name, ms_per_step=1e3 * statistics.median(b.times),
            optimizer_ms_per_step=1e3 * net, optimizer_ms_min=1e3 * fastest,
            optimizer_ms_max=1e3 * max(b.own), ms_min=1e3 * min(b.times),
            ms_max=1e3 * max(b.times), backward_ms=1e3 * statistics.median(b.inside),
            optimizer_resolution=fastest_gap(b.own),
            passes=add_passes + copy_passes, params_per_s=numel / net,
            gb_per_s=nbytes / net / 1e9,
            state_bytes_per_param=b.probe.total / numel,
            state_bytes_per_param_beyond_base=b.probe.beyond / numel,
            state_param_copies_beyond_base=b.probe.beyond / (numel * elem),
            peak_bytes_per_param=(b.memory.bytes / numel if memory and b.memory.bytes is not None
                                  else None),
            repeats=repeats))
    del built
    if numel >= 1 << 20:  # a collection costs ~0.3 s: worth it only to free big tensors in cycles
        gc.collect()
    return rows


def apply_floor(rows: list[dict], calib: dict, llc_bytes: int | None) -> None:
    """Each row's floor from the calibration of its size (which improves as the floor's trials
    go on): ``floor_ms`` (the byte budget at the floor kernel's best rate, or the normals),
    what sets it (``floor_bound``), and ``floor_fraction``, the floor over the row's fastest
    step: STREAM's rule, the best of the trials, on both sides. A note explains a share above 1
    (:func:`floor.floor_note`)."""
    for r in rows:
        if (r["numel"], r["dtype"]) != (calib["numel"], calib["dtype"]):
            continue
        dtype = DTYPES[r["dtype"]]
        r["floor_ms"] = floor_ms(r["optimizer"], r["base"], dtype, calib)
        r["floor_bound"] = floor_bound(r["optimizer"], r["base"], dtype, calib)
        r["floor_fraction"] = r["floor_ms"] / r["optimizer_ms_min"]
        r["floor_note"] = floor_note(r, calib, llc_bytes)
