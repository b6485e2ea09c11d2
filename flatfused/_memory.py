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


def element_starts(t: torch.Tensor) -> torch.Tensor:
    """The address of every element of ``t`` (int64, on the CPU)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return offsets.reshape(-1) * t.element_size() + t.data_ptr()


def share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some byte belongs to an element of both ``a`` and ``b``, given that their spans
    meet: always when both are dense, else element by element (interleaved views do not)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    starts_a = element_starts(a)
    starts_b = torch.sort(element_starts(b)).values
    # For each element of a, the last element of b starting at or before a's last byte: they
    # share a byte when that element ends past a's start.
    i = torch.searchsorted(starts_b, starts_a + (a.element_size() - 1), right=True) - 1
    hit = (i >= 0) & (starts_b[i.clamp(min=0)] + b.element_size() > starts_a)
    return bool(hit.any())


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
