"""CPU training: keep glibc's allocator from handing memory back to the system between passes.

With its default (dynamic) settings glibc's malloc shrinks the heap whenever enough memory at
its top is free, e.g. at the end of every backward pass, and the next forward pass then pays a
page fault (the kernel mapping and zeroing a page) for every 4 KiB it touches again. Which
training loops suffer depends on the order of allocations: on the 2-core VM of
docs/benchmarks.md a ResNet-18 step at batch 32, each optimizer alone in its process, took
0-4.6k page faults with AdamW and ``zero_grad(set_to_none=True)`` (51-58 ms), but 13.8k with
``set_to_none=False`` (72 ms), and 27k with a flatfused NSO step (146 ms; 111 ms tuned).
Gradients that stay allocated across steps, as a flat gradient buffer's do, are what the
faulting loops have in common. jemalloc and tcmalloc (``LD_PRELOAD``) do not trim this way;
:func:`tune_cpu_allocator` sets glibc up so that it does not either.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MAX_MMAP_THRESHOLD = 32 << 20
_INT_MAX = 2**31 - 1


def allocator_env() -> dict[str, str]:
    """The environment variables that can change how CPU memory is allocated: glibc's
    ``MALLOC_*`` and ``GLIBC_TUNABLES``, and ``LD_PRELOAD`` (a jemalloc or tcmalloc)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES")}


def allocator_configured() -> str | None:
    """What already configures the CPU allocator (a ``MALLOC_*`` / ``GLIBC_TUNABLES`` variable,
    or a preloaded jemalloc / tcmalloc), or None."""
    env = allocator_env()
    preload = env.pop("LD_PRELOAD", "")
    if env:
        name = min(env)
        return f"{name}={env[name]}"
    if "jemalloc" in preload or "tcmalloc" in preload:
        return f"LD_PRELOAD={preload}"
    return None


def tune_cpu_allocator(mmap_threshold: int = MAX_MMAP_THRESHOLD,
                       trim_threshold: int = _INT_MAX, *, force: bool = False) -> bool:
    """Make glibc keep freed memory for the next pass instead of giving it back (CPU training).

    Blocks below ``mmap_threshold`` bytes come from the heap, which is trimmed only when
    ``trim_threshold`` bytes at its top are free (the default: practically never), so a
    training loop in steady state reuses the same pages and takes no page faults. The cost is
    that the process keeps the memory of its largest step until it exits, as a caching
    allocator does. Process-wide and irreversible: call it once, at the start of a CPU training
    run, before the model is built. The same as starting the process with
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647``.

    Returns True if applied; False, changing nothing, where the C library is not glibc or the
    allocator is already configured (:func:`allocator_configured`; ``force=True`` applies it
    anyway). GPU memory is not affected (CUDA has its own caching allocator).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _INT_MAX:
            raise ValueError(f"{name} must be an int in [1, 2**31 - 1], got {value!r}")
    if mmap_threshold > MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be at most {MAX_MMAP_THRESHOLD} bytes (32 MiB, "
                         f"glibc's limit on 64-bit systems), got {mmap_threshold}")
    if not force and allocator_configured() is not None:
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)):
        if mallopt(param, value) != 1:
            raise RuntimeError(f"glibc's mallopt({param}, {value}) failed")
    return True
