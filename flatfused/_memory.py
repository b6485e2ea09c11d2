"""Which tensors share memory: byte spans, and element-exact checks for strided views.

Used by :mod:`flatfused.ops` (operands that a kernel writes must not share memory with
another) and :mod:`flatfused.flat` (parameters that alias each other cannot be flattened).
Strides are non-negative, as torch makes them.
"""
from __future__ import annotations

import torch


def span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` from ``t``'s first to its last element."""
    start = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def element_starts(t: torch.Tensor, first: int = 0, count: int | None = None) -> torch.Tensor:
    """The addresses of elements ``first .. first + count - 1`` of ``t`` in row-major order
    (int64, on the CPU; all of them by default)."""
    count = t.numel() - first if count is None else count
    index = torch.arange(first, first + count, dtype=torch.int64)
    offsets = torch.zeros(count, dtype=torch.int64)
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        offsets += (index % size) * stride
        index = index // size
    return offsets * t.element_size() + t.data_ptr()


_CHUNK = 1 << 20  # elements of the larger tensor compared at a time


def share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some byte belongs to an element of both ``a`` and ``b``, given that their spans
    meet: always when both are dense, else element by element (interleaved views do not). The
    smaller one's addresses are sorted (8 bytes per element), the larger's come in chunks."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    if a.numel() > b.numel():
        a, b = b, a
    starts_a = torch.sort(element_starts(a)).values
    for first in range(0, b.numel(), _CHUNK):
        starts_b = element_starts(b, first, min(_CHUNK, b.numel() - first))
        # For each element of b, the last element of a starting at or before b's last byte:
        # they share a byte when that element ends past b's start.
        i = torch.searchsorted(starts_a, starts_b + (b.element_size() - 1), right=True) - 1
        if bool(((i >= 0) & (starts_a[i.clamp(min=0)] + a.element_size() > starts_b)).any()):
            return True
    return False


def overlapping_pairs(tensors: list[torch.Tensor]):
    """Yields the index pairs ``(i, j)`` of tensors of ``tensors`` (one device) that share
    memory. Sorted by span, so only tensors whose spans meet are compared element by element."""
    order = sorted((span(t), i) for i, t in enumerate(tensors) if t.numel())
    for k, ((_, end), i) in enumerate(order):
        for (other_start, _), j in order[k + 1:]:
            if other_start >= end:
                break
            if share_elements(tensors[i], tensors[j]):
                yield (i, j)
