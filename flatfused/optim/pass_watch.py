"""What one forward-backward pass of a step did to the gradients (:class:`_PassWatch`)."""
from __future__ import annotations


class _PassWatch:
    """What one pass did to the gradients: which parameters received one, and whether the
    closure wrote the flat gradient buffers in place beyond autograd's own accumulation
    (``edited``): ``clip_grad_norm_``, ``zero_grad(set_to_none=False)``, ``grad.mul_``
    (Lightning clips inside the closure). Every in-place write bumps the buffer's version
    counter (the ``.grad`` views share it); autograd's accumulation into an existing ``.grad``
    is one bump per parameter per backward, counted by the buffers' gradient hooks (no hooks of
    its own: registering one per parameter per pass cost about 0.4 ms per pass at 64
    parameters). A gradient the closure set to None and autograd then replaced is gathered
    afterwards and bumps nothing, so it is never mistaken for an edit. Not for sharded
    buffers, or passes a DDP/FSDP2 wrapper synchronises: their reducers write the gradients
    back themselves.

    Missing gradients (``.grad`` None: the first step, after ``zero_grad(set_to_none=True)``)
    get their zeroed slots attached for the pass, so that a ``zero_grad(set_to_none=False)``
    before the backward is seen too; the ones still without a gradient after it are missing
    again."""

    def __init__(self, buffers):
        self.buffers = [buf for buf in buffers if buf.grad is not None and not buf.sharded]
        self._begin()

    def restart(self) -> None:
        """Watch the rest of the pass as a new one: the optimizer itself just cleared the
        gradients (a ``zero_grad()`` it honours inside the pass), which is no edit."""
        for buf in self.buffers:
            buf.stop_counting()
        self._begin()

    def _begin(self) -> None:
        self.present = [{i for i in range(len(buf.params)) if i not in buf.missing}
                        for buf in self.buffers]
        self.attached = [buf.attach_missing_for_pass() for buf in self.buffers]
        self.versions = [buf.grad._version for buf in self.buffers]
        self.received: list[set[int]] = []
        self.edited = False
        self.closed = False
        for buf in self.buffers:
            buf.count_accumulations()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        accumulations = 0
        for buf in self.buffers:
            received, count = buf.stop_counting()
            self.received.append(received)
            accumulations += count
        bumps = sum(buf.grad._version - v for buf, v in zip(self.buffers, self.versions))
        self.edited = bumps > accumulations
        for buf, indices, received in zip(self.buffers, self.attached, self.received):
            buf.drop_gradients([i for i in indices
                                if i not in received and buf.params[i].grad is not None])

    def unreceived(self, buf) -> list[int]:
        """Indices of ``buf``'s parameters that had a gradient when the watch began but got
        none in the pass (a branch the pass did not take)."""
        for b, present, received in zip(self.buffers, self.present, self.received):
            if b is buf:
                return [i for i in sorted(present - received) if buf.params[i].numel()]
        return []
