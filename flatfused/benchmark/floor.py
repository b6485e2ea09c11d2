"""The floor a step is compared with: STREAM's kernels at the step's size, dtype and thread
count, and the normals an NSO step cannot avoid drawing (docs/benchmarks.md, "The floor").

STREAM (McCalpin) times copy ``c = a``, scale ``b = q c``, add ``c = a + b`` and triad
``a = b + q c`` over arrays much larger than the caches, keeps each kernel's best time of its
trials and counts only the bytes its source names (2, 2, 3 and 3 elements per index: no
write-allocate traffic). Here they run as torch ops at the step's size, dtype and thread count,
with two more kernels for what they leave out:

- their stores are ordinary ones: past the last-level cache each first reads its line (read for
  ownership), so a kernel that writes its write-only outputs with streaming stores, as
  flatfused's CPU kernels do, moves fewer bytes for the same count. ``copy-nt`` is STREAM's copy
  with streaming (non-temporal) stores (flatfused's own copy kernel, made to stream at every
  size);
- one core's bandwidth is bound by how many cache misses it keeps in flight, more with more
  arrays streaming at once, and an optimizer's kernels read three or four arrays. ``nstream``
  is BabelStream's kernel of that shape, ``d = d + q b c`` (three arrays read, the write to a
  line just read: 4 elements per index).

The byte model is compared with the fastest of them all, measured in the same rounds as the
steps (docs/benchmarks.md, "The floor").
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import flatfused

from .peers import PEERS
from .spec import budget_bytes, noise_draws

# Elements each kernel reads or writes per index, as STREAM counts them.
STREAM_COUNTS = {"copy": 2, "scale": 2, "add": 3, "triad": 3, "nstream": 4, "copy-nt": 2}

# A row above its floor by no more than this is within timing resolution at the least (the
# fastest trials are samples too); a larger measured resolution replaces it.
MIN_RESOLUTION = 0.02


def sync_for(device: torch.device):
    """What waits for the device's queued work before a clock is read (nothing on a CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _streaming_copy(a: torch.Tensor, b: torch.Tensor):
    """``a = b`` by flatfused's CPU copy kernel with streaming stores forced on (None where the
    CPU kernels are not built)."""
    from flatfused import _extension

    if not _extension.has_cpu_kernels():
        return None
    from flatfused import _C

    def copy():
        previous = _C.set_cpu_stream_bytes(0)
        try:
            flatfused.ops.restore_(a, b, backend="cpu")
        finally:
            _C.set_cpu_stream_bytes(previous)
    return copy


class StreamFloor:
    """STREAM's kernels over ``numel`` elements of ``dtype``, timed a round (:meth:`run_round`)
    or a kernel (:meth:`run_kernel`) at a time, so that they can be interleaved with the steps
    they are the floor of and see the same load. The best of all trials is the floor (STREAM's
    rule)."""

    def __init__(self, numel: int, device: torch.device, dtype: torch.dtype):
        self.numel, self.device, self.dtype = numel, torch.device(device), dtype
        # Real data: pages never written read as the shared zero page, far too fast. STREAM's
        # a, b, c, and nstream's own d (it would change STREAM's values).
        a, b, c, d = self.arrays = tuple(torch.full((numel,), v, device=device, dtype=dtype)
                                         for v in (1.0, 2.0, 0.0, 0.0))
        q = 3.0
        self.kernels = {
            "copy": lambda: c.copy_(a),
            "scale": lambda: torch.mul(c, q, out=b),
            "add": lambda: torch.add(a, b, out=c),
            "triad": lambda: torch.add(b, c, alpha=q, out=a),
            "nstream": lambda: d.addcmul_(b, c, value=q),
        }
        if self.device.type == "cpu":
            streamed = _streaming_copy(c, a)
            if streamed is not None:
                self.kernels["copy-nt"] = streamed
        self.seconds: dict[str, list[float]] = {k: [] for k in self.kernels}
        self._sync = sync_for(self.device)
        for fn in self.kernels.values():  # warm-up: first-touch and one-off costs
            fn()

    def run_round(self) -> None:
        for name in self.kernels:
            self.run_kernel(name)

    def run_kernel(self, name: str) -> None:
        self._sync()
        t0 = time.perf_counter()
        self.kernels[name]()
        self._sync()
        self.seconds[name].append(time.perf_counter() - t0)

    def leader(self) -> str:
        """The kernel with the best rate so far (the floor, unless another overtakes it)."""
        rates = self.gb_per_s()
        return max(rates, key=rates.get)

    def close(self) -> None:
        self.kernels, self.arrays = {}, ()

    def gb_per_s(self) -> dict[str, float]:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return {k: STREAM_COUNTS[k] * elem * self.numel / min(t) / 1e9
                for k, t in self.seconds.items() if t}

    def summary(self) -> dict:
        """The report's record: each kernel's best rate and time and its number of trials, the
        floor kernel and its resolution (how far apart its two fastest trials are)."""
        rates = self.gb_per_s()
        kernel = max(rates, key=rates.get)
        fastest = sorted(self.seconds[kernel])
        return dict(stream_gb_per_s=rates,
                    stream_ms={k: 1e3 * min(t) for k, t in self.seconds.items() if t},
                    stream_trials={k: len(t) for k, t in self.seconds.items()},
                    floor_kernel=kernel, floor_gb_per_s=rates[kernel],
                    floor_resolution=fastest_gap(fastest))


def fastest_gap(times: list[float]) -> float | None:
    """How far apart the two fastest of some times are, relative (None with fewer than two)."""
    fastest = sorted(times)[:2]
    return fastest[1] / fastest[0] - 1 if len(fastest) == 2 and fastest[0] > 0 else None


def floor_ms(optimizer: str, base: str, dtype: torch.dtype, calib: dict) -> float:
    """The larger of moving the byte budget at the floor bandwidth and generating the
    unavoidable normals with the fastest generator measured in this run."""
    numel = calib["numel"]
    byte_ms = budget_bytes(optimizer, base, dtype) * numel / (calib["floor_gb_per_s"] * 1e9) * 1e3
    draws = noise_draws(optimizer)
    if not draws:
        return byte_ms
    generators = [calib["torch_normal_ms"], *calib["flatfused_noise_ms"].values()]
    return max(byte_ms, draws * min(generators))


def floor_bound(optimizer: str, base: str, dtype: torch.dtype, calib: dict) -> str:
    """What sets the floor: the STREAM kernel's bandwidth or the normals."""
    numel = calib["numel"]
    byte_ms = budget_bytes(optimizer, base, dtype) * numel / (calib["floor_gb_per_s"] * 1e9) * 1e3
    return "normals" if floor_ms(optimizer, base, dtype, calib) > byte_ms else calib["floor_kernel"]


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The last-level cache of the device (CPU: the highest level sysfs lists for cpu0)."""
    device = torch.device(device)
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    best = None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * scale
        if best is None or level >= best[0]:
            best = (level, value)
    return best[1] if best else None


def floor_note(row: dict, calib: dict, llc_bytes: int | None) -> str | None:
    """Why a row is above its floor (None when it is not): ``other update`` for a peer that
    computes another update than the configuration's byte model counts (LookSAM's reuse steps
    skip the ascent); ``cache`` when every array of the step fits in the last-level cache (the
    floor's three arrays and the step's several are then not served alike); ``resolution``
    when it is within timing resolution; else ``unexplained`` (the byte model or the floor is
    wrong for it: a bug to report). The resolution is the gap between the two fastest trials
    of the floor kernel plus that between the row's two fastest steps, at least
    :data:`MIN_RESOLUTION`."""
    fraction = row.get("floor_fraction")
    if fraction is None or fraction <= 1.0:
        return None
    peer = PEERS.get(row["contender"])
    if peer is not None and not peer.same_update:
        return "other update"
    elem = torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()
    state_arrays = {"sgd": 1, "adamw": 2}.get(row["base"], 2)
    arrays = 3 + state_arrays  # w, w0, g and the base state
    if llc_bytes and row["numel"] * elem * arrays <= llc_bytes:
        return "cache"
    resolution = max((calib.get("floor_resolution") or 0.0)
                     + (row.get("optimizer_resolution") or 0.0), MIN_RESOLUTION)
    if fraction <= 1.0 + resolution:
        return "resolution"
    return "unexplained"


FLOOR_NOTES = {
    "other update": "another algorithm than the configuration's, whose byte model does not "
                    "count its work (LookSAM's steps between its full ones skip the ascent)",
    "cache": "every array of the step fits in the last-level cache, where the floor's "
             "arrays are not served alike",
    "resolution": "timing noise: above by no more than the gap between the floor's two "
                  "fastest trials plus that between the row's two fastest steps",
    "unexplained": "above the floor with no explanation: the byte model or the floor is wrong "
                   "for this row; please report it",
}
