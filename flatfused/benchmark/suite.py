"""The optimizer suite: every optimizer x base x dtype x size that fits, as rows of a report."""
from __future__ import annotations

import gc
import os
import sys
import time
from typing import Callable

import torch

from flatfused import backends as _backends

from .contenders import contenders_for
from .measure import calibrate, make_params, measure_group
from .progress import Progress
from .spec import format_count


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
