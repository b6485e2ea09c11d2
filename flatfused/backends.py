"""Backend names, availability and the choice ``auto`` makes for a device."""
from __future__ import annotations

import functools
import os

import torch

from . import _extension

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def triton_error() -> str | None:
    """None when Triton imports and our Triton kernels load, else why not."""
    try:
        import triton  # noqa: F401

        from . import triton_kernels  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run kernels on ``device``, or None when it can."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, not on {device}"
        err = _extension.load_error()
        return None if err is None else f"the compiled extension did not load ({err})"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, not on {device}"
        if not _extension.has_cuda_kernels():
            err = _extension.load_error()
            return ("flatfused._C was built without CUDA kernels (reinstall with a CUDA build "
                    "of torch and nvcc, or FLATFUSED_BUILD_CUDA=1)" if err is None else
                    f"the compiled extension did not load ({err})")
        return None
    if backend == "triton":
        err = triton_error()
        if err is not None:
            return f"Triton is unavailable ({err})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (f"the 'triton' backend runs on CUDA tensors (or CPU tensors under "
                f"TRITON_INTERPRET=1), not on {device}")
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve(backend: str, device) -> str:
    """The concrete backend for ``device``: ``auto`` picks cuda > triton > torch on GPUs, cpu > torch on CPUs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"flatfused backend {backend!r} is unavailable: {reason}")
        return backend
    candidates = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
    for name in candidates:
        if unavailable_reason(name, device) is None:
            return name
    return "torch"


def available(device) -> list[str]:
    """Concrete backends that can run on ``device``."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]
