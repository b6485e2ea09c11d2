"""The optimizer suite: every optimizer x base x dtype x size that fits, as rows of a report."""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from flatfused import backends as _backends

from .contenders import contenders_for, option_refusal
from .floor import StreamFloor, last_level_cache_bytes
from .measure import apply_floor, calibrate, make_params, measure_group
from .peers import PEERS, unavailable_reason
from .progress import Progress
from .spec import OPTIMIZERS, format_count


def default_backends(device: torch.device) -> list[str]:
    found = _backends.available(device)
    if device.type == "cpu" and "triton" in found and _backends.triton_interpreted():
        found.remove("triton")  # the interpreter is a test vehicle, not a contender
    return found


def fits(numel: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the largest contender fits: the reference NSO keeps about 12 parameter-sized
    tensors alive with the fixed gradients and the master copy, the floor's STREAM kernels 3
    arrays; fp32 noise on top."""
    need = numel * (15 * torch.empty((), dtype=dtype).element_size() + 8)
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


@dataclass
class Work:
    """One configuration to measure, with the contenders that run and those that cannot."""

    numel: int
    dtype: torch.dtype
    optimizer: str
    base: str
    contenders: list[str]
    unavailable: dict[str, str]  # contender -> why it cannot run here
    repeats: int

    @property
    def label(self) -> str:
        return (f"{self.optimizer}/{self.base} {format_count(self.numel)} "
                f"{str(self.dtype).replace('torch.', '')}")


# Nanoseconds per parameter of one step, by contender, from a quiet 2-core CPU: the progress
# line's estimate of time left only needs their proportions (it rescales them by the time the
# finished work took), not their values.
_NS_PER_PARAM = {"reference": 8.0, "baseline": 5.0, "flatfused": 1.5, "3-call": 2.0,
                 "pytorch_optimizer.GSAM": 8.0, "pytorch_optimizer": 4.0, "torch": 0.5}


def estimate_seconds(work: Work, memory: bool = True) -> float:
    """A rough cost of measuring ``work``: its steps (warm-up, the probed one and the timed ones;
    the peak-memory sampling slows a step) plus building the contenders and one round of the
    floor per step round."""
    per_step = 0.0
    for c in work.contenders:
        key = next((k for k in _NS_PER_PARAM if c.startswith(k) or c.endswith(k)), "baseline")
        per_step += _NS_PER_PARAM[key] * (2 if OPTIMIZERS[work.optimizer].get("K") == 2 else 1)
    build = 1.0 * len(work.contenders)
    return work.numel * 1e-9 * ((work.repeats + 2) * per_step * (1.2 if memory else 1.0)
                                + build + 3.0 * work.repeats)


def calibration_seconds(numel: int, repeats: int) -> float:
    """A rough cost of one size's calibration (the floor's kernels, normals, the parameters)."""
    return numel * 1e-9 * (max(repeats, 5) * 12.0 + 40.0)


def plan_suite(sizes: list[int], dtypes: list[torch.dtype], optimizers: list[str],
               bases: list[str], backends: list[str] | None, device, repeats: int | None,
               headline: bool = False, log=print) -> list[Work]:
    """The configurations to measure, dtype-major and sizes ascending (an interrupted run has
    whole dtypes, fp32 first, at all sizes)."""
    device = torch.device(device)
    explicit = backends is not None
    backends = backends if explicit else default_backends(device)
    plan = []
    for dtype in dtypes:
        for numel in sizes:
            if not fits(numel, device, dtype):
                log(f"skipping {format_count(numel)} {dtype}: does not fit in memory")
                continue
            for opt in optimizers:
                for base in bases:
                    names = contenders_for(opt, backends, numel, explicit, headline)
                    refused = {}
                    for name in names:
                        reason = option_refusal(name, opt) or (
                            unavailable_reason(name, opt, device) if name in PEERS else None)
                        if reason is not None:
                            refused[name] = reason
                    plan.append(Work(numel, dtype, opt, base,
                                     [n for n in names if n not in refused], refused,
                                     repeats or default_repeats(numel)))
    return plan


def suite_estimates(plan: list[Work], memory: bool = True) -> list[tuple[str, float, str]]:
    """The progress line's items for a plan (kind ``suite``, see Progress): each size's
    calibration and each configuration."""
    items, current = [], None
    for work in plan:
        if current != (work.numel, work.dtype):
            current = (work.numel, work.dtype)
            items.append((f"floor {format_count(work.numel)}",
                          calibration_seconds(work.numel, work.repeats), "suite"))
        items.append((work.label, estimate_seconds(work, memory), "suite"))
    return items


def run_suite(sizes: list[int], dtypes: list[torch.dtype], optimizers: list[str],
              bases: list[str], backends: list[str] | None = None, device="cpu",
              repeats: int | None = None, progress: bool = True, log=print,
              out: dict | None = None, on_update: Callable[[dict], None] | None = None,
              headline: bool = False, bar: Progress | None = None) -> dict:
    """Measure every (size, dtype, optimizer, base, contender); ``repeats=None`` is
    :func:`default_repeats`. Rows are appended to ``out`` as they come and ``on_update(out)`` is
    called after each, so an interrupted run keeps what it measured. ``bar``: a progress line
    shared with the rest of a run (planned with :func:`suite_estimates`); else one of its own."""
    device = torch.device(device)
    explicit = backends is not None
    backends = backends if explicit else default_backends(device)
    plan = plan_suite(sizes, dtypes, optimizers, bases, backends if explicit else None, device,
                      repeats, headline, log)
    out = {} if out is None else out
    out.update(calibration=[], results=[], errors=[], unavailable=[], backends=backends,
               wall_s=[])
    llc = last_level_cache_bytes(device)
    own_bar = bar is None
    bar = Progress(suite_estimates(plan, not headline), progress) if own_bar else bar
    current = floor = calib = None
    try:
        for work in plan:
            name = str(work.dtype).replace("torch.", "")
            if current != (work.numel, work.dtype):
                current = (work.numel, work.dtype)
                if floor is not None:
                    floor.close()
                master = grads = floor = None
                gc.collect()
                bar.begin(f"floor {format_count(work.numel)}")
                floor = StreamFloor(work.numel, device, work.dtype)
                calib = calibrate(work.numel, device, work.dtype, backends, work.repeats, floor)
                out["calibration"].append(calib)
                master = make_params(work.numel, device, work.dtype, seed=0)
                grads = make_params(work.numel, device, work.dtype, seed=1)
                bar.end()
            for contender, reason in work.unavailable.items():
                out["unavailable"].append(dict(optimizer=work.optimizer, base=work.base,
                                               dtype=name, numel=work.numel,
                                               contender=contender, reason=reason))

            def on_error(contender, exc, work=work):  # one broken contender must not cost the run
                out["errors"].append(dict(optimizer=work.optimizer, base=work.base, dtype=name,
                                          numel=work.numel, contender=contender,
                                          error=f"{type(exc).__name__}: {exc}"))
                log(f"\n{work.label} {contender} failed: {type(exc).__name__}: {exc}",
                    file=sys.stderr)
            bar.begin(work.label)
            t_run = time.perf_counter()
            out["results"] += measure_group(work.contenders, work.optimizer, work.base,
                                            work.numel, device, work.dtype, master, grads, calib,
                                            work.repeats, on_error, floor, memory=not headline)
            apply_floor(out["results"], calib, llc)
            _relative(out["results"])
            out["wall_s"].append(dict(seconds=round(time.perf_counter() - t_run, 2),
                                      optimizer=work.optimizer, base=work.base,
                                      numel=work.numel, dtype=name))
            bar.end()
            if on_update is not None:
                on_update(out)
    finally:
        if floor is not None:
            floor.close()
        if own_bar:
            bar.close()
    return out


def _relative(results: list[dict]) -> None:
    """Speedups against the reference, the baseline and flatfused (its first backend's
    ``step(closure)``) of the same configuration, from the medians and from the fastest steps
    (on a loaded machine the median can catch a burst of other work, the fastest step rarely
    does)."""
    keyed = {}
    for r in results:
        keyed.setdefault((r["optimizer"], r["base"], r["dtype"], r["numel"]), {})[r["contender"]] = r
    for group in keyed.values():
        ours = next((c for c in group if c.startswith("flatfused[") and not c.endswith("3-call")),
                    None)
        for r in group.values():
            for key, other in (("reference", "reference"), ("baseline", "baseline"),
                               ("flatfused", ours)):
                o = group.get(other)
                r[f"speedup_vs_{key}"] = r["params_per_s"] / o["params_per_s"] if o else None
                r[f"speedup_vs_{key}_fastest"] = (o["optimizer_ms_min"] / r["optimizer_ms_min"]
                                                  if o else None)
