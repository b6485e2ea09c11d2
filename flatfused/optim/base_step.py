"""The base optimizer's update after a flat-minima optimizer's passes.

For ``torch.optim.SGD``, ``Adam`` and ``AdamW`` the weight restore and the base update are one
fused kernel over each flat buffer (``sgd_step_`` / ``adam_step_``), with the base optimizer's
state (momentum buffer, moments, step) kept as views of flat tensors inside
``base_optimizer.state`` so that its ``state_dict`` and its own ``step()`` keep working. Any other
optimizer (or an option the kernels do not cover) runs through ``restore_`` and its own ``step()``.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import _get_scalar_dtype

from .. import ops
from ..flat import FlatBuffer


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


def _param_states(state: dict, buf: FlatBuffer) -> list[dict | None]:
    """The base optimizer's state dict of each parameter of ``buf`` (None where it has none)."""
    return [state.get(p) for p in buf.params]


def _current(states: list[dict | None], name: str) -> list[torch.Tensor | None]:
    return [None if s is None else s.get(name) for s in states]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its own ``data_ptr()`` is 0), else the tensor itself."""
    return getattr(t, "_local_tensor", t)


def _is_installed(buf: FlatBuffer, name: str, current: list[torch.Tensor | None]) -> bool:
    installed = buf.state_views.get(name)
    return installed is not None and all(map(operator.is_, current, installed))


def _adopt(buf: FlatBuffer, states: list[dict | None], name: str,
           current: list[torch.Tensor | None], flat: torch.Tensor,
           views: Callable[[torch.Tensor], list[torch.Tensor]]) -> str:
    """Make each parameter's state ``name`` a view of ``flat`` ('ready'), or report that none has
    it yet ('fresh'). The caller checked that either all or none of them have it, and that they
    are not the views installed last time (:func:`_is_installed`, one pass of ``is`` tests):
    what is there (a loaded state dict, a tensor put in by hand) is copied into ``flat`` and
    replaced by the view.
    """
    if all(t is None for t in current):
        return "fresh"
    installed = views(flat)
    for s, t, view in zip(states, current, installed):
        if t is not view:
            if _local(t).data_ptr() != _local(view).data_ptr() or t.shape != view.shape:
                view.copy_(t)
            s[name] = view
    buf.state_views[name] = installed
    return "ready"


def _install(buf: FlatBuffer, state: dict, name: str, installed: list[torch.Tensor]) -> None:
    for p, view in zip(buf.params, installed):
        state.setdefault(p, {})[name] = view
    buf.state_views[name] = installed


def _install_zeros(buf: FlatBuffer, state: dict, names: tuple[str, ...]) -> None:
    """Zero the flat state tensors ``names`` of ``buf`` and make their views each parameter's
    state: the values a base optimizer's first step starts from."""
    for name in names:
        if name == "step":
            _install(buf, state, name, _step_views(_step_counts(buf).zero_()))
        else:
            _install(buf, state, name, buf.views(buf.state_buffer(name).zero_()))


def _state_names(kind: str, group: dict) -> tuple[str, ...]:
    """The per-parameter state tensors the fused update of ``kind`` reads and writes."""
    if kind == "sgd":
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
    return ("exp_avg", "exp_avg_sq", "step")


def _step_counts(buf: FlatBuffer) -> torch.Tensor:
    """Adam's per-parameter ``step`` scalars as one CPU tensor (as torch keeps them: CPU,
    ``_get_scalar_dtype()``): a step counts all of them with one ``add_``."""
    if buf.step_counts is None:
        buf.step_counts = torch.zeros(len(buf.params), dtype=_get_scalar_dtype())
    return buf.step_counts


def _step_views(flat: torch.Tensor) -> list[torch.Tensor]:
    return list(flat.unbind())


class BaseStep:
    """Applies ``w = w0 (if given)`` and the base update with gradient ``scale * src`` per buffer."""

    def __init__(self, base: torch.optim.Optimizer, owner: torch.optim.Optimizer | None = None):
        self.base = base
        self.owner = owner  # the wrapper: LR schedulers attached to it check it stepped too

    def _hooks(self, kind: str):
        """The base optimizer's step hooks of ``kind`` ("pre"/"post"), global ones included, in
        the order ``torch.optim.Optimizer.step`` runs them: the fused kernels stand for that
        step, so hooks registered on the base (EMA, logging) run around them as well."""
        own = getattr(self.base, f"_optimizer_step_{kind}_hooks", {})
        glob = getattr(_torch_optimizer, f"_global_optimizer_{kind}_hooks", {})
        return [*glob.values(), *own.values()] if kind == "pre" else [*own.values(), *glob.values()]

    def _stepped(self) -> None:
        # LR schedulers check that the optimizer stepped before them.
        self.base._opt_called = True
        if self.owner is not None:
            self.owner._opt_called = True

    def __call__(self, buffers: list[FlatBuffer], backends: list[str], w0_name: str | None,
                 src_name: str | None, scale: float | list[float], write_grad: bool, *,
                 grad_weight: list[float] | None = None,
                 sharpness_weight: list[float] | None = None) -> bool:
        """Returns whether the fused kernels ran (else the base optimizer's own ``step()``).

        ``w0_name``: the flat state to restore the weights from, in the buffers the optimizer
        perturbs (the others, left out by a param_filter, never moved: updated in place).
        ``scale``: one factor, or one per buffer. ``grad_weight`` / ``sharpness_weight`` (per
        buffer, with ``src``): Weighted SAM's gradient mixture and decoupled sharpness step
        (docs/kernels.md); they need the fused kinds (see :meth:`can_fuse`).
        """
        if not isinstance(scale, list):
            scale = [scale] * len(buffers)
        plans = self._plan(buffers)
        if (grad_weight or sharpness_weight) and plans is None:
            raise RuntimeError("internal: grad_weight/sharpness_weight need a fused kind")
        weights = (grad_weight or [0.0] * len(buffers), sharpness_weight or [0.0] * len(buffers))
        if write_grad:
            for buf in buffers:
                buf.mark_grad_written()
        if plans is not None:
            kind = fused_kind(self.base)
            for hook in self._hooks("pre"):
                hook(self.base, (), {})
            for buf, backend, plan, factor, gw, sw in zip(buffers, backends, plans, scale,
                                                          *weights):
                group = self.base.param_groups[buf.group_index]
                w0 = buf.state[w0_name] if w0_name and buf.perturbed else None
                src = buf.state[src_name] if src_name else None
                update = self._sgd if kind == "sgd" else self._adam
                update(buf, backend, group, buf.data, w0, src, factor,
                       bool(group.get("maximize", False)), write_grad, plan, (float(gw), float(sw)))
            for hook in self._hooks("post"):
                hook(self.base, (), {})
            self._stepped()
            return True
        for buf, backend, factor in zip(buffers, backends, scale):
            buf.mark_grad_written()
            src = buf.state[src_name] if src_name else None
            if w0_name is not None and buf.perturbed:
                ops.kernel("restore_", backend)(w=buf.data, w0=buf.state[w0_name], grad=buf.grad,
                                                src=src, scale=factor)
            elif src is not None or factor != 1.0:
                buf.grad.copy_(factor * (src if src is not None else buf.grad).float())
        self.base.step()
        self._stepped()
        return False

    def init_state(self, buffers: list[FlatBuffer]) -> None:
        """Create the base optimizer's per-parameter state now, with the values its first step
        starts from, for the buffers none of whose parameters has any yet.

        ``torch.distributed.checkpoint`` loads only the entries its target already has, and the
        target comes from a new optimizer: torch's own optimizers get their state there from a
        zero-gradient step, which a flat-minima optimizer cannot take (its step needs a closure),
        so without this a resumed run would start from empty
        state. Starting from these values steps exactly as starting without state: Adam's
        moments and step count start at zero anyway, and SGD's first momentum buffer,
        ``clone(d)``, equals ``momentum * 0 + d`` (with non-zero dampening it does not, and
        stays with the first step). Every parameter gets views of flat state, as the fused
        update keeps it (a sharded parameter's are DTensors sharded like it)."""
        kind = fused_kind(self.base)
        if kind is None:
            return
        state = self.base.state
        for buf in buffers:
            group = self.base.param_groups[buf.group_index]
            names = _state_names(kind, group)
            if not names or (kind == "sgd" and group["dampening"] != 0):
                continue
            if any(_param_states(state, buf)):
                continue  # what is there is adopted by the next step (see _plan)
            _install_zeros(buf, state, names)

    def can_fuse(self, buffers: list[FlatBuffer]) -> bool:
        """Whether the base update runs as flatfused kernels (see :meth:`_plan`)."""
        return self._plan(buffers) is not None

    def _plan(self, buffers: list[FlatBuffer]) -> list[dict[str, tuple[torch.Tensor, str]]] | None:
        """Per buffer, each state tensor of the fused update as (flat tensor, 'fresh'|'ready'),
        with the base optimizer's per-parameter state made views of it; or None when the base
        optimizer must step itself: not SGD/Adam/AdamW, some but not all of a buffer's
        parameters with state (the others never stepped), or state still to be created in a
        buffer with parameters that have no gradient (the kernel would create it for those it
        skips). Parameters without a gradient, and Adam step counts that differ within a
        buffer, split its update into runs (:func:`_runs`). A sharded parameter's state is a
        DTensor view of its buffer's local flat state; what a checkpoint loads there is copied
        in, as for any parameter."""
        kind = fused_kind(self.base)
        if kind is None:
            return None
        state = self.base.state
        found = []
        for buf in buffers:
            states = _param_states(state, buf)
            names = _state_names(kind, self.base.param_groups[buf.group_index])
            current = {}  # name -> (tensors, whether they are the views installed last time)
            for name in names:
                tensors = _current(states, name)
                installed = _is_installed(buf, name, tensors)
                if not installed and len({t is None for t in tensors}) > 1:
                    return None  # some parameters never stepped: the base optimizer handles them
                current[name] = (tensors, installed)
            found.append((buf, states, current))
        plans = []
        for buf, states, current in found:
            plan = {}
            for name, (tensors, installed) in current.items():
                step_counts = name == "step"
                flat = _step_counts(buf) if step_counts else buf.state_buffer(name)
                status = "ready" if installed else _adopt(
                    buf, states, name, tensors, flat, _step_views if step_counts else buf.views)
                if status == "fresh" and buf.missing:
                    return None
                plan[name] = (flat, status)
            plans.append(plan)
        return plans

    def _sgd(self, buf, backend, group, w, w0, src, scale, maximize, write_grad, plan, weights):
        # Without momentum there is no state (as torch.optim.SGD keeps none).
        momentum_buffer, status = plan.get("momentum_buffer", (None, None))
        fresh = status == "fresh"
        kernel = ops.kernel("sgd_step_", backend)
        hyper = dict(scale=float(scale), lr=float(group["lr"]), momentum=float(group["momentum"]),
                     dampening=float(group["dampening"]),
                     weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                     maximize=maximize, first_step=fresh, write_grad=bool(write_grad),
                     grad_weight=weights[0], sharpness_weight=weights[1])
        if not buf.missing:
            kernel(w=w, w0=w0, grad=buf.grad, src=src, momentum_buffer=momentum_buffer, **hyper)
        else:
            for _, _, cut, _, elements in _updated_runs(buf, None, w, w0):
                if elements:
                    kernel(w=cut(w), w0=cut(w0), grad=cut(buf.grad), src=cut(src),
                           momentum_buffer=cut(momentum_buffer), **hyper)
        if fresh:
            _install(buf, self.base.state, "momentum_buffer", buf.views(momentum_buffer))

    def _adam(self, buf, backend, group, w, w0, src, scale, maximize, write_grad, plan, weights):
        (exp_avg, status), (exp_avg_sq, _), (steps, _) = (
            plan["exp_avg"], plan["exp_avg_sq"], plan["step"])
        if status == "fresh":  # the plan's flat tensors are buf's: zeroed and installed here
            _install_zeros(buf, self.base.state, ("exp_avg", "exp_avg_sq", "step"))
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = float(group["lr"])
        decoupled = type(self.base) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay"))
        kernel = ops.kernel("adam_step_", backend)

        def launch(cut, step):
            step_size, bias_correction2_sqrt = ops.adam_coefficients(lr, beta1, beta2, step)
            kernel(w=cut(w), w0=cut(w0), grad=cut(buf.grad), src=cut(src), exp_avg=cut(exp_avg),
                   exp_avg_sq=cut(exp_avg_sq), scale=float(scale), lr=lr, beta1=beta1,
                   beta2=beta2, eps=float(group["eps"]),
                   weight_decay=float(group["weight_decay"]), step_size=step_size,
                   bias_correction2_sqrt=bias_correction2_sqrt, decoupled=decoupled,
                   maximize=maximize, write_grad=bool(write_grad), grad_weight=weights[0],
                   sharpness_weight=weights[1])

        # Checked every step: the base optimizer's own step() counts only the parameters that
        # have a gradient. (One count, e.g. a sharded parameter's, always agrees with itself.)
        if not buf.missing and (len(steps) == 1 or bool((steps == steps[0]).all())):
            steps.add_(1)
            launch(_whole, float(steps[0]))
            return
        for first, end, cut, count, elements in _updated_runs(buf, steps.tolist(), w, w0):
            steps.narrow(0, first, end - first).add_(1)
            if elements:
                launch(cut, count + 1)


def _whole(t: torch.Tensor | None) -> torch.Tensor | None:
    return t


def _cutter(start: int, stop: int):
    """Elements ``start:stop`` of a flat tensor laid out like the buffer (None stays None)."""
    return lambda t: None if t is None else t.narrow(0, start, stop - start)


def _runs(buf: FlatBuffer, counts: list[float] | None) -> list[tuple[int, int, int, int, float | None]]:
    """The buffer as runs of consecutive parameters the update treats alike: (first parameter,
    end parameter, first element, end element, key), the key None for parameters without a
    gradient (skipped, as torch's step skips them), else their Adam step count (one bias
    correction per launch; 0 for SGD)."""
    runs: list[list] = []
    # Each parameter's elements end where the next one's start (a shard's are local: fewer).
    ends = [*buf.offsets[1:], buf.numel]
    for i, (start, stop) in enumerate(zip(buf.offsets, ends)):
        key = None if i in buf.missing else (counts[i] if counts is not None else 0.0)
        if runs and runs[-1][4] == key:
            runs[-1][1], runs[-1][3] = i + 1, stop
        else:
            runs.append([i, i + 1, start, stop, key])
    return [tuple(r) for r in runs]


def _updated_runs(buf: FlatBuffer, counts: list[float] | None, w: torch.Tensor,
                  w0: torch.Tensor | None):
    """The runs of :func:`_runs` the update covers, as (first parameter, end parameter, cutter
    of their elements, step count, whether they have elements). The skipped runs keep their
    weights: the saved ones, put back here, where the step restores."""
    for first, end, start, stop, key in _runs(buf, counts):
        cut = _cutter(start, stop)
        if key is not None:
            yield first, end, cut, key, stop > start
        elif w0 is not None:
            cut(w).copy_(cut(w0))
