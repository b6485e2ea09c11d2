"""The cheap steps of a :class:`~flatfused.optim.schedules.Schedule` and LookSAM-style reuse,
shared by NSO, SAM and Weighted SAM (mixed into :class:`FlatOptimizer`)."""
from __future__ import annotations

import torch

from .. import distributed as _dist
from . import amp as _amp
from .step_state import StepRefused


class CheapSteps:
    """Mixed into :class:`~flatfused.optim.flat_optimizer.FlatOptimizer` (its attributes)."""

    @property
    def steps_taken(self) -> int:
        """Completed steps, full or cheap (checkpointed): the schedule's clock."""
        return self._steps_taken

    def _full_step_due(self) -> bool:
        return self.schedule.full_step(self._steps_taken)

    def _reuse_due(self) -> bool:
        """Whether this full step keeps the reused component for the cheap steps after it."""
        return self.schedule.reuse is not None and self._full_step_due()

    def _refuse_under_schedule(self, call: str) -> None:
        """The reference APIs' explicit calls are the caller's own schedule."""
        if not self.schedule.plain:
            raise StepRefused(f"{call}: the optimizer has a cheap schedule ({self.schedule}), "
                              "which applies to step(closure); use step(closure), or no "
                              "schedule with the explicit calls")

    def _sum_over_buffers(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """Sum of per-buffer fp32 partials on the first buffer's device, sharded buffers' parts
        summed over their shards (as :meth:`_grad_norm_sq`)."""
        device = self._buffers[0].device
        totals: dict = {}
        for buf, part in zip(self._buffers, partials):
            part = part.to(device)
            totals[buf.shard_groups] = totals[buf.shard_groups] + part \
                if buf.shard_groups in totals else part
        total = torch.zeros((), dtype=torch.float32, device=device)
        for groups, part in totals.items():
            total += _dist.reduce_over_shards_(part, groups) if groups else part
        return total

    def _dot(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        return self._sum_over_buffers([torch.dot(x.float(), y.float()) for x, y in zip(a, b)])

    @torch.no_grad()
    def _record_reuse(self, directions: list[torch.Tensor], clean: list[torch.Tensor],
                      scale: float = 1.0) -> None:
        """Keep ``g_v = d - (<d, g> / |g|^2) g`` with ``d = scale * directions`` (the full step's
        flat-minima gradient) and ``g = clean``, for the cheap steps (LookSAM's reuse)."""
        dg = self._dot(directions, clean) * scale
        gg = self._dot(clean, clean)
        coef = torch.where(gg > 0, dg / gg, torch.zeros_like(gg))
        for buf, d, g in zip(self._buffers, directions, clean):
            gv = buf.state_buffer("gv", torch.float32)
            torch.mul(d, scale, out=gv)
            gv.addcmul_(g.float(), -coef.to(gv.device))
        self._reused_norm = None  # |g_v|, taken once by the first cheap step after this

    @torch.no_grad()
    def _add_reused(self, alpha: float) -> None:
        """``.grad += alpha * (|g| / |g_v|) * g_v`` with ``g`` the gradient in ``.grad``."""
        vectors = [buf.state["gv"] for buf in self._buffers]
        grads = [buf.grad for buf in self._buffers]
        gn = self._dot(grads, grads).sqrt()
        if getattr(self, "_reused_norm", None) is None:  # constant until the next full step
            self._reused_norm = self._dot(vectors, vectors).sqrt()
        vn = self._reused_norm
        factor = torch.where(vn > 0, alpha * gn / vn, torch.zeros_like(vn))
        for buf, gv in zip(self._buffers, vectors):
            buf.grad.addcmul_(gv.to(buf.grad.dtype), factor.to(buf.grad.device, buf.grad.dtype))
            buf.mark_grad_written()

    def _has_reused(self) -> bool:
        return bool(self._buffers) and all("gv" in buf.state for buf in self._buffers)

    @torch.no_grad()
    def _cheap_step(self, closure, *, zero_first: bool, run_pass: bool = True,
                    clip=None, after_pass=None):
        """One pass at the current weights and the base update with its gradient (plus the
        reused component inside the window): the schedule's cheap step. ``zero_first``: discard
        the gradients from before the step (NSO; else the pass adds to them, as WSAM's first
        pass); ``run_pass``: False when the gradient is already in ``.grad`` (SAM's reference
        form). ``clip``: the optimizer's clipping of ``.grad``;
        ``after_pass``: its gradient averaging where no DDP/FSDP2 wrapper averages. Nothing
        moves before the update, so a failure needs no restore; an AMP overflow skips the step."""
        loss = None
        amp = self._amp_begin(uses_grads=not zero_first)
        if run_pass:
            if zero_first:
                self._zero_flat_grads()
            loss = self._pass(closure, restart=True)
            if amp is not None:
                amp.grads_scaled = True
        if after_pass is not None:
            after_pass()
        self._prepare()
        if amp is not None:
            if amp.grads_scaled:
                self._amp_unscale(amp)
            if _amp.overflowed(amp):
                return loss
        if self.schedule.reuses(self._steps_taken) and self._has_reused():
            self._add_reused(self.schedule.reuse)
        if clip is not None:
            clip()
        self._base_step(self._buffers, self._backends, None, None, 1.0, False)
        self._steps_taken += 1
        return loss
