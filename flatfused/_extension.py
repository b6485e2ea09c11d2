"""Loads the compiled extension ``flatfused._C`` once; a missing or broken build never breaks import.

Importing ``flatfused._C`` registers the C++ ops (``torch.ops.flatfused.*``): the CPU kernels
always, the CUDA kernels when the package was built with them. On failure we warn once and the
``torch`` (and, on GPUs, ``triton``) backends stay available.
"""
from __future__ import annotations

import functools
import warnings

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when the extension loaded, else why it did not."""
    try:
        from . import _C  # noqa: F401
    except Exception as exc:  # an ImportError, or an OSError from a bad link
        message = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "flatfused: the compiled extension flatfused._C could not be loaded "
            f"({message}); the C++/CUDA backends are unavailable and 'auto' falls back to "
            "'triton' (CUDA) or 'torch'. Reinstall with `pip install --no-build-isolation .` "
            "to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return message
    return None


def has_cpu_kernels() -> bool:
    return load_error() is None and hasattr(torch.ops.flatfused, "perturb_")


@functools.lru_cache(maxsize=None)
def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels (they may still lack a GPU to run on)."""
    return load_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "flatfused::perturb_", "CUDA"
    )
