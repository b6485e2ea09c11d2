"""The base optimizer's update after a flat-minima optimizer's passes.

For ``torch.optim.SGD``, ``Adam`` and ``AdamW`` the weight restore and the base update are one
fused kernel over each flat buffer (``sgd_step_`` / ``adam_step_``), with the base optimizer's
state (momentum buffer, moments, step) kept as views of flat tensors inside
``base_optimizer.state`` so that its ``state_dict`` and its own ``step()`` keep working. Any other
optimizer (or an option the kernels do not cover) runs through ``restore_`` and its own ``step()``.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .. import ops
from ..flat import FlatBuffer, view_like


def fused_kind(base: torch.optim.Optimizer) -> str | None:
    """'sgd', 'adam' or None (exact types only: a subclass may change the update)."""
    kind = type(base)
    groups = base.param_groups
    if kind is torch.optim.SGD:
        return None if any(g.get("differentiable") for g in groups) else "sgd"
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        unsupported = ("amsgrad", "differentiable", "capturable")
        if any(g.get(flag) for g in groups for flag in unsupported):
            return None
        return "adam"
    return None


def _adopt(buf: FlatBuffer, state: dict, name: str) -> tuple[torch.Tensor, str]:
    """Make ``state[p][name]`` views of one flat tensor; returns (flat, 'ready'|'fresh').

    Either every parameter of the buffer has the state or none has (:meth:`BaseStep.can_fuse`).
    """
    if all(state.get(p, {}).get(name) is None for p in buf.params):
        return buf.state_buffer(name), "fresh"
    flat = buf.state_buffer(name)
    for p, o in zip(buf.params, buf.offsets):
        t = state[p][name]
        if p.numel() and t.data_ptr() == flat.data_ptr() + o * flat.element_size():
            continue
        view = view_like(flat, p, o)
        view.copy_(t)
        state[p][name] = view
    return flat, "ready"


def _state_names(kind: str, group: dict) -> tuple[str, ...]:
    """The per-parameter state tensors the fused update of ``kind`` reads and writes."""
    if kind == "sgd":
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
    return ("exp_avg", "exp_avg_sq")


def _install(buf: FlatBuffer, state: dict, name: str, flat: torch.Tensor) -> None:
    for p, view in zip(buf.params, buf.views(flat)):
        state.setdefault(p, {})[name] = view


class BaseStep:
    """Applies ``w = w0 (if given)`` and the base update with gradient ``scale * src`` per buffer."""

    def __init__(self, base: torch.optim.Optimizer):
        self.base = base

    def __call__(self, buffers: list[FlatBuffer], backends: list[str], w0_name: str | None,
                 src_name: str | None, scale: float | list[float], write_grad: bool, *,
                 target: str | None = None, grad_weight: list[float] | None = None,
                 sharpness_weight: list[float] | None = None) -> bool:
        """Returns whether the fused kernels ran (else the base optimizer's own ``step()``).

        ``scale``: one factor, or one per buffer. ``target``: update the flat state tensor of
        that name instead of the parameters. ``grad_weight`` / ``sharpness_weight`` (per buffer,
        with ``src``): Weighted SAM's gradient mixture and decoupled sharpness step
        (docs/kernels.md). The last three need the fused kinds (see :meth:`can_fuse`).
        """
        if not isinstance(scale, list):
            scale = [scale] * len(buffers)
        kind = fused_kind(self.base)
        fusable = self.can_fuse(buffers)
        if (target is not None or grad_weight or sharpness_weight) and not fusable:
            raise RuntimeError("internal: target/grad_weight/sharpness_weight need a fused kind")
        weights = (grad_weight or [0.0] * len(buffers), sharpness_weight or [0.0] * len(buffers))
        if write_grad:
            for buf in buffers:
                buf.mark_grad_written()
        if fusable:
            self._fused(kind, buffers, backends, w0_name, src_name, scale, write_grad, target,
                        weights)
            # LR schedulers check that the optimizer stepped before them.
            self.base._opt_called = True
            return True
        for buf, backend, factor in zip(buffers, backends, scale):
            buf.mark_grad_written()
            src = buf.state[src_name] if src_name else None
            if w0_name is not None:
                ops.kernel("restore_", backend)(buf.data, buf.state[w0_name], buf.grad, src, factor)
            elif src is not None or factor != 1.0:
                buf.grad.copy_(factor * (src if src is not None else buf.grad).float())
        self.base.step()
        return False

    def can_fuse(self, buffers: list[FlatBuffer]) -> bool:
        """Whether the base update runs as flatfused kernels: SGD/Adam/AdamW, no sharded
        parameters (they keep the base optimizer's DTensor state as it is), and either all or
        none of each buffer's parameters have base-optimizer state."""
        kind = fused_kind(self.base)
        if kind is None or any(buf.sharded for buf in buffers):
            return False
        for buf in buffers:
            for name in _state_names(kind, self.base.param_groups[buf.group_index]):
                present = {self.base.state.get(p, {}).get(name) is not None for p in buf.params}
                if len(present) > 1:
                    return False  # some parameters never stepped: the base optimizer handles them
        return True

    def _fused(self, kind, buffers, backends, w0_name, src_name, scale, write_grad,
               target, weights) -> None:
        state = self.base.state
        plans = [[_adopt(buf, state, n)
                  for n in _state_names(kind, self.base.param_groups[buf.group_index])]
                 for buf in buffers]
        for buf, backend, adopted, factor, gw, sw in zip(buffers, backends, plans, scale,
                                                        *weights):
            group = self.base.param_groups[buf.group_index]
            w = buf.state[target] if target else buf.data
            w0 = buf.state[w0_name] if w0_name else None
            src = buf.state[src_name] if src_name else None
            mix = (float(gw), float(sw))
            if kind == "sgd":
                self._sgd(buf, backend, group, w, w0, src, factor, write_grad, adopted, mix)
            else:
                self._adam(buf, backend, group, w, w0, src, factor, write_grad, adopted, mix)

    def _sgd(self, buf, backend, group, w, w0, src, scale, write_grad, adopted, weights):
        momentum_buffer, fresh = (adopted[0][0], adopted[0][1] == "fresh") if adopted else (None, False)
        ops.kernel("sgd_step_", backend)(
            w, w0, buf.grad, src, momentum_buffer, float(scale), float(group["lr"]),
            float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group.get("maximize", False)), fresh, bool(write_grad),
            *weights)
        if fresh:
            _install(buf, self.base.state, "momentum_buffer", momentum_buffer)
        elif not adopted:
            for p in buf.params:
                self.base.state.setdefault(p, {})["momentum_buffer"] = None

    def _adam(self, buf, backend, group, w, w0, src, scale, write_grad, adopted, weights):
        (exp_avg, status), (exp_avg_sq, _) = adopted
        state = self.base.state
        if status == "fresh":
            exp_avg.zero_()
            exp_avg_sq.zero_()
            _install(buf, state, "exp_avg", exp_avg)
            _install(buf, state, "exp_avg_sq", exp_avg_sq)
            for p in buf.params:
                state[p]["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        steps = [state[p]["step"] for p in buf.params]
        torch._foreach_add_(steps, 1)
        step = float(steps[0])
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = float(group["lr"])
        decoupled = type(self.base) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay"))
        ops.kernel("adam_step_", backend)(
            w, w0, buf.grad, src, exp_avg, exp_avg_sq, float(scale), lr, beta1, beta2,
            float(group["eps"]), float(group["weight_decay"]), lr / (1.0 - beta1**step),
            (1.0 - beta2**step) ** 0.5, decoupled, bool(group.get("maximize", False)),
            bool(write_grad), *weights)
