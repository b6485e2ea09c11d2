"""Flat buffers: the parameters of one (param group, device, dtype) as views into one tensor.

One kernel launch then covers a whole buffer. Parameters keep their shapes and strides (a dense
non-contiguous parameter, e.g. channels_last, keeps its memory order inside the buffer);
gradients live as views of one flat gradient buffer; optimizer state is flat too.

Anything that breaks the views is detected by data pointer before each use: a gradient replaced
by another tensor (DDP's ``gradient_as_bucket_view``, ``create_graph``) is gathered back into the
flat buffer (with one warning); a parameter whose storage was replaced on the same device and
dtype is gathered too; a parameter moved to another device or dtype is an error.

A gradient that is ``None`` (never computed, or set to ``None``) stays ``None``, as in torch: its
slot of the flat gradient buffer is kept at zero and the parameter is *missing* (the base
update skips it, see optim/base_step.py). A hook on each parameter attaches a missing slot as
``.grad`` just before autograd first accumulates into it, so that gradients land in the flat
buffer in place (no copy, no second gradient-sized allocation at the first backward).
"""
from __future__ import annotations

from ._warn import _warned, warn_once  # noqa: F401 (tests reset _warned)
from .buffer import FlatBuffer
from .layout import build_flat_buffers
from .shards import ShardBuffer
from .views import Segment, view_like

__all__ = ["FlatBuffer", "ShardBuffer", "Segment", "build_flat_buffers", "view_like", "warn_once"]
