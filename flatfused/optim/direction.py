"""The update direction's scale and size, over the flat buffers: AMP unscaling, the squared
norm (plain or ASAM's ``|w| * g``, summed over shards) and ``clip_grad_norm_``'s clipping."""
from __future__ import annotations

import torch

from .. import distributed as _dist
from .. import ops
from . import amp as _amp


class Direction:
    """Mixin of :class:`~flatfused.optim.flat_optimizer.FlatOptimizer` (``_buffers``,
    ``_backends``, ``param_groups``)."""

    def _amp_begin(self, uses_grads: bool) -> _amp.AmpStep | None:
        """The step's AMP scaling; ``uses_grads``: the step uses the gradients from before it."""
        if not self._buffers:
            return None
        amp = _amp.begin(self, self._buffers[0].device, uses_grads)
        if amp is not None:
            # A shard's overflow must skip the step on every rank (FSDP2 reduce-scatters: only
            # the rank holding a non-finite element sees it), as torch's GradScaler does for
            # DTensor gradients.
            groups = {}
            for buf in self._buffers:
                groups.update(dict.fromkeys(buf.shard_groups))
            amp.shard_groups = tuple(groups)
        return amp

    def _amp_unscale(self, amp: _amp.AmpStep | None,
                     vectors: list[torch.Tensor] | None = None) -> None:
        """Unscale the gradient buffers, or the flat tensors ``vectors`` (one per buffer) that
        hold the update direction instead (as :meth:`_clip_grads`)."""
        if amp is None:
            return
        _amp.unscale_(amp, vectors if vectors is not None else [buf.grad for buf in self._buffers])
        if vectors is None:
            for buf in self._buffers:
                buf.mark_grad_written()

    def _grad_norm_sq(self, adaptive: bool = False,
                      vectors: list[torch.Tensor] | None = None,
                      perturbed_only: bool = False) -> torch.Tensor:
        """``||v||_2**2`` over all buffers as an fp32 [1] tensor on the first buffer's device (no
        host sync), with ``v = |w| * g`` in groups whose ``"adaptive"`` is set when ``adaptive``
        (ASAM's norm), else ``v = g``; sharded parameters' partial sums are summed over their
        shards (``FlatBuffer.shard_groups``). ``g`` is each buffer's gradient, or the matching
        flat tensor of ``vectors``. ``perturbed_only``: over the buffers a step perturbs (the
        ascent's norm under a param_filter)."""
        device = self._buffers[0].device
        # Partial sums by the process groups they still need summing over (() for local ones).
        totals = {(): torch.zeros(1, dtype=torch.float32, device=device)}
        grads = vectors if vectors is not None else [buf.grad for buf in self._buffers]
        for buf, backend, grad in zip(self._buffers, self._backends, grads):
            if perturbed_only and not buf.perturbed:
                continue
            weighted = adaptive and self.param_groups[buf.group_index].get("adaptive", False)
            total = totals.setdefault(buf.shard_groups, torch.zeros_like(totals[()]))
            out = total if buf.device == device else torch.zeros_like(total, device=buf.device)
            ops.kernel("grad_norm_sq_", backend)(out=out, grad=grad,
                                                  w=buf.data if weighted else None)
            if out is not total:
                total += out.to(device)
        for groups, partial in totals.items():
            if groups:  # every rank holds the same buffers: the same all-reduces in one order
                totals[()] += _dist.reduce_over_shards_(partial, groups)
        return totals[()]

    def _clip_grads(self, max_norm: float | None, scale: float = 1.0,
                    vectors: list[torch.Tensor] | None = None) -> None:
        """Clip the update direction ``scale * grad`` to ``max_norm``, as ``clip_grad_norm_``
        does (coefficient ``max_norm / (norm + 1e-6)``, at most 1; no host sync). ``vectors``:
        flat tensors, one per buffer, that hold the direction instead of the gradients."""
        if max_norm is None or scale == 0.0 or not self._buffers:
            return
        total = self._grad_norm_sq(vectors=vectors).sqrt() * abs(scale)
        # What clip_grad_norm_ returns, for loggers (a device tensor: no host sync here).
        self.last_grad_norm = total.reshape(())
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for i, buf in enumerate(self._buffers):
            v = buf.grad if vectors is None else vectors[i]
            v.mul_(coef.to(v.device, v.dtype))
            if vectors is None:
                buf.mark_grad_written()
