"""Views of a flat tensor shaped like a parameter, and the runs of noise indices in a buffer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a block of exactly ``numel`` memory slots (any permutation)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def view_like(flat: torch.Tensor, p: torch.Tensor, offset: int) -> torch.Tensor:
    """A view of ``flat[offset : offset + p.numel()]`` with ``p``'s shape and (dense) strides."""
    if p.is_contiguous():
        return flat.narrow(0, offset, p.numel()).view(p.shape)
    return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset)


@dataclass
class Segment:
    """A run of buffer elements whose noise indices are consecutive."""

    start: int  # first element in the buffer
    length: int
    base: int  # logical (noise) index of the first element
