"""NSO's gradient accumulator: the perturbed passes' gradients summed in fp32 (the
three-call API's ``store_gradients``/``second_step`` and ``step(closure)`` with several
perturbations), and the hand-over that turns a gradient buffer into the accumulator instead of
copying it out."""
from __future__ import annotations

import torch

from .. import ops

# Handing a gradient buffer over as the accumulator (instead of copying it out) re-points every
# p.grad, a fixed cost per parameter; it pays when parameters average at least this many
# elements, where the copy it saves costs more (docs/design.md, "The two APIs", has the figures).
_HANDOVER_MIN_ELEMENTS_PER_PARAM = 16384
_HANDOVER_MIN_ELEMENTS_PER_PARAM_GPU = 1 << 20


def acc_dtype(buf) -> torch.dtype:
    """The accumulator's dtype: fp32 (float64 for float64 parameters)."""
    return torch.promote_types(buf.dtype, torch.float32)


class Accumulator:
    """Mixin of :class:`~flatfused.optim.nso.NSO`: one ``acc`` state buffer per flat buffer;
    the accumulated direction is ``_acc_scale * acc``."""

    def _reset_accumulator(self) -> None:
        self._acc_is_zero = False  # acc holds zeros without having been written (update_weight 0)
        self._acc_zeroed = False  # acc holds zeros written by a pass (see _hand_over_grads)
        self._acc_scale = 1.0  # the accumulated direction is _acc_scale * acc

    def _accumulators(self) -> list[torch.Tensor]:
        return [buf.state_buffer("acc", acc_dtype(buf)) for buf in self._buffers]

    def _can_hand_over(self) -> bool:
        """Whether the gradient buffers can become the accumulators (:meth:`_hand_over_grads`):
        fp32 (the accumulator's type), unsharded, and parameters large enough to pay for it."""
        def worth_it(buf) -> bool:
            per_param = (_HANDOVER_MIN_ELEMENTS_PER_PARAM if buf.device.type == "cpu"
                         else _HANDOVER_MIN_ELEMENTS_PER_PARAM_GPU)
            return buf.numel >= per_param * len(buf.params)

        return bool(self._buffers) and all(
            buf.dtype == acc_dtype(buf) and not buf.sharded and buf.perturbed and worth_it(buf)
            for buf in self._buffers)

    def _hand_over_grads(self, weight: float) -> None:
        """``acc = weight * grad; grad = 0`` without moving a byte: the gradient buffer becomes
        the accumulator (``weight`` kept in ``_acc_scale``) and the accumulator, zeroed by the
        last perturbation pass, the gradient buffer. Not when a ``.grad`` is held outside the
        optimizer: its holder would then see the accumulator, which a torch zero_grad does not
        do (the caller checks)."""
        for buf in self._buffers:
            buf.state["acc"] = buf.exchange_grad(buf.state["acc"])
            buf.mark_grad_zero()
        self._acc_scale = weight
        self._acc_zeroed = False

    def _accumulate_grads(self, factor: float, init: bool, zero_grad: bool) -> None:
        """``acc (=|+=) factor * grad`` (fp32 accumulator), zeroing ``grad`` if ``zero_grad``."""
        for buf, backend in zip(self._buffers, self._backends):
            acc = buf.state_buffer("acc", acc_dtype(buf))
            ops.kernel("accumulate_", backend)(acc=acc, grad=buf.grad, weight=float(factor),
                                               init=bool(init), zero_grad=bool(zero_grad))
            if zero_grad:
                buf.mark_grad_zero()
            else:
                buf.mark_grad_written()
        self._acc_zeroed = False
