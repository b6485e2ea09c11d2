"""The registry of kernel backends: their ops, their availability per device, and the choice
``auto`` makes for a device.

A backend is a name, the object whose attributes are its ops (``perturb_``, ``sgd_step_``, ...,
with the signatures of docs/kernels.md), and a function telling why it cannot run on a device
(None when it can). The four built in (``cuda``, ``triton``, ``cpu``, ``torch``) are registered
below; another one, such as the tests' CUDA emulation, is added with :func:`register_backend`
and is then a backend like any other: ``backend=`` of the optimizers, ``flatfused.ops``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _extension, schemas
from .flat import warn_once


@dataclass(frozen=True)
class Backend:
    name: str
    module: Callable[[], Any]  # returns the object holding the ops (loaded on first use)
    unavailable: Callable[[torch.device], "str | None"]


_registry: dict[str, Backend] = {}
BACKENDS: tuple[str, ...] = ("auto",)  # "auto", then the registered names in order


def register_backend(name: str, module, available: Callable[[torch.device], "str | None"]) -> None:
    """Register backend ``name``: ``module`` is the object whose attributes are its ops, or a
    function returning it (called when an op is first looked up); ``available(device)`` returns
    None when the backend runs on ``device``, else the reason it does not."""
    global BACKENDS
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend needs a name other than 'auto', got {name!r}")
    if name in _registry:
        raise ValueError(f"backend {name!r} is registered already")
    load = module if callable(module) and not hasattr(module, "perturb_") else (lambda: module)
    _registry[name] = Backend(name, load, available)
    BACKENDS = ("auto", *_registry)


def unregister_backend(name: str) -> None:
    global BACKENDS
    if name not in _registry or name in _BUILT_IN:
        raise ValueError(f"{name!r} is not a registered (non-built-in) backend")
    del _registry[name]
    for key in [k for k in _keyword_calls if k[0] == name]:
        del _keyword_calls[key]
    BACKENDS = ("auto", *_registry)


def kernel(op: str, backend: str):
    """The implementation of op ``op`` in the concrete backend ``backend``, callable with the
    schema's argument names as keywords (:mod:`flatfused.schemas`)."""
    entry = _registry.get(backend)
    if entry is None:
        raise ValueError(f"no kernels for backend {backend!r}; registered: {list(_registry)}")
    fn = getattr(entry.module(), op)
    cached = _keyword_calls.get((backend, op))
    if cached is None or cached[0] != fn:  # != : a bound method is made anew at each lookup
        cached = _keyword_calls[(backend, op)] = (fn, schemas.with_keywords(op, fn))
    return cached[1]


# (backend, op) -> (its kernel, the kernel's keyword form): built once per kernel.
_keyword_calls: dict[tuple[str, str], tuple[Callable, Callable]] = {}


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
    entry = _registry.get(backend)
    if entry is None:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return entry.unavailable(torch.device(device))


def _built_in_unavailable(backend: str, device: torch.device) -> str | None:
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
        if torch.cuda.is_current_stream_capturing():
            return None  # no probe inside a graph capture (it synchronises); the next call runs it
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_launch_error(index)
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
    raise ValueError(f"unknown backend {backend!r}")


def _launch_one_kernel(device: torch.device) -> None:
    out = torch.empty(4, dtype=torch.int32, device=device)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    torch.ops.flatfused.philox_bits_(out, rng, 0)
    torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def _cuda_launch_error(index: int) -> str | None:
    """None when flatfused's CUDA kernels launch on GPU ``index``, else why not.

    A build compiled for other architectures (``TORCH_CUDA_ARCH_LIST``, or the default of a
    build on a machine without a GPU) registers kernels that fail at launch with "no kernel
    image is available for execution on the device". One 4-element kernel, synchronised, tells:
    once per GPU and process, so that ``auto`` takes Triton instead and ``backend="cuda"``
    says what to rebuild, rather than every step failing inside a kernel launch."""
    device = torch.device("cuda", index)
    try:
        _launch_one_kernel(device)
    except RuntimeError as exc:
        major, minor = torch.cuda.get_device_capability(device)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"its kernels do not run on this GPU, compute capability {major}.{minor} "
                f"({first_line}); reinstall with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (or on a "
                "machine with this GPU visible)")
    return None


_MEASURE_NUMEL = 1 << 23


@functools.lru_cache(maxsize=None)
def _fastest_gpu_backend(device: torch.device, candidates: tuple[str, ...]) -> str:
    """Of ``candidates`` (all available on ``device``), the one whose fused kernels run fastest
    here: a perturbation pass and an SGD-momentum step over 8M fp32 elements, timed with CUDA
    events after a warm-up (about a second, once per device and process)."""
    n = _MEASURE_NUMEL
    w, w0, g, m = (torch.randn(n, device=device) for _ in range(4))
    rng = torch.zeros(2, dtype=torch.int64, device=device)  # [seed, offset]
    times = {}
    for name in candidates:
        perturb, sgd = kernel("perturb_", name), kernel("sgd_step_", name)

        def step():
            perturb(w=w, w0=w0, rng=rng, base=0, dist=0, sigma=0.01, save=True)
            sgd(w=w, w0=w0, grad=g, src=None, momentum_buffer=m, scale=1.0, lr=0.1, momentum=0.9,
                dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                first_step=False, write_grad=False)

        step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            step()
        end.record()
        end.synchronize()
        times[name] = start.elapsed_time(end)
    return min(candidates, key=lambda name: (times[name], candidates.index(name)))


def resolve(backend: str, device) -> str:
    """The concrete backend for ``device``.

    ``auto``: on GPUs the faster of cuda and triton, measured once per device (set
    ``FLATFUSED_AUTO_BACKEND=cuda|triton|torch`` to skip the measurement), else whichever is
    available, else torch; on CPUs the compiled cpu kernels, else torch (the pure-PyTorch
    specification, whose Philox is about a hundred times slower: not worth measuring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"flatfused backend {backend!r} is unavailable: {reason}")
        return backend
    forced = os.environ.get("FLATFUSED_AUTO_BACKEND", "")
    if forced:
        if forced not in BACKENDS[1:]:
            raise ValueError(f"FLATFUSED_AUTO_BACKEND={forced!r}; expected one of {BACKENDS[1:]}")
        return resolve(forced, device)
    candidates = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
    reasons = {name: unavailable_reason(name, device) for name in candidates}
    usable = tuple(name for name in candidates if reasons[name] is None)
    if device.type == "cuda" and reasons["cuda"] is not None and _extension.has_cuda_kernels():
        warn_once(f"cuda-launch-{device}", f"flatfused: the 'cuda' backend is unavailable on "
                  f"{device}: {reasons['cuda']}; using {usable[0] if usable else 'torch'}")
    if not usable:
        return "torch"
    if device.type == "cuda" and len(usable) > 1:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _fastest_gpu_backend(torch.device("cuda", index), usable)
    return usable[0]


def available(device) -> list[str]:
    """Concrete backends that can run on ``device``."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]


def _compiled_ops():
    _extension.load_error()  # importing flatfused._C registers torch.ops.flatfused
    return torch.ops.flatfused


def _triton_ops():
    from . import triton_kernels

    return triton_kernels


def _torch_ops():
    from . import _torch_ops

    return _torch_ops


_BUILT_IN = ("cuda", "triton", "cpu", "torch")
for _name, _module in zip(_BUILT_IN, (_compiled_ops, _triton_ops, _compiled_ops, _torch_ops)):
    register_backend(_name, _module, functools.partial(_built_in_unavailable, _name))
