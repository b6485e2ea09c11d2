"""The published NSO optimizer (class ``NSM``), restated in plain PyTorch as an oracle and baseline.

This module reproduces the *behaviour and the cost* of the reference implementation of Noise
Stability Optimization (docs/usage.md, "What you get, in detail"), so that flatfused's fused
optimizer can be validated against it and benchmarked against it:

- one Python loop over the parameters per operation, one small op (or several) per tensor;
- three full per-parameter copies in ``self.state[p]``: ``"w0"`` (saved weights), ``"acc"``
  (gradient accumulator) and ``"noise"`` (the stored perturbation ``sigma * u``); the reference
  names them ``old_p``, ``old_gradients`` and ``perturb``;
- the weights are restored by re-binding ``p.data`` to a fresh clone of ``w0`` (one allocation
  per parameter per ``first_step``), and ``second_step`` re-binds ``p.data`` to ``w0`` and the
  gradient's data to the accumulator, as the reference does;
- the noise is drawn with ``torch.distributions`` on the CPU, with the parameter's shape, in
  fp32, then copied to the parameter's device and multiplied by ``sigma``.

Reference defects kept on purpose: the clean pass of
:func:`train_step` always runs, even for ``lam == 0``; ``"binomial"`` is Binomial(4, 0.5), whose
mean is 2, not 0; ``"cauchy"`` has no variance; the base optimizer's state is not part of
``state_dict()``; ``step(closure)`` does not work (here it raises ``NotImplementedError``).

Changes from the published code, none of which alters the update:

- ``noise_source``: an injectable replacement for the ``torch.distributions`` draw, so that a
  test can feed the oracle exactly the noise flatfused's optimizer draws (see
  :class:`FlatfusedNoiseSource`);
- a negative ``sigma`` or an unknown ``distribution`` raises ``ValueError`` (the reference uses
  ``assert`` for the first and silently falls back to the normal for the second);
- a ``base_optimizer`` that is not a class raises a ``TypeError`` saying so;
- parameters whose ``.grad`` is ``None`` at the clean pass are skipped (the reference crashes):
  they get no ``w0``/``acc``/``noise`` and are neither perturbed nor updated during that step.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributions as tdist

from flatfused import rng

from .bn import (
    disable_running_stats,
    enable_running_stats,
    reference_disable_running_stats,
    reference_enable_running_stats,
)

__all__ = [
    "NSM",
    "NSO",
    "FlatfusedNoiseSource",
    "flatfused_noise_source",
    "make_distribution",
    "train_step",
]

NoiseSource = Callable[[torch.Tensor, int, int], torch.Tensor]


def make_distribution(distribution: str | None) -> tdist.Distribution:
    """The ``torch.distributions`` object the reference samples from for ``distribution``.

    ``None``/"normal" -> N(0, 1); "laplace" -> Laplace(0, 1/sqrt 2); "uniform" -> U(-sqrt 3, sqrt 3);
    "binomial" -> Binomial(4, 0.5) (mean 2: a reference defect, kept); "cauchy" -> Cauchy(0, 1)
    (no mean or variance: kept). Names are case-insensitive; anything else raises ``ValueError``.
    """
    code = rng.distribution_code(distribution)  # validates, raises ValueError
    if code == rng.DISTRIBUTIONS["laplace"]:
        return tdist.Laplace(0.0, 1.0 / math.sqrt(2.0))
    if code == rng.DISTRIBUTIONS["uniform"]:
        return tdist.Uniform(-math.sqrt(3.0), math.sqrt(3.0))
    if code == rng.DISTRIBUTIONS["binomial"]:
        return tdist.Binomial(4, 0.5)
    if code == rng.DISTRIBUTIONS["cauchy"]:
        return tdist.Cauchy(0.0, 1.0)
    return tdist.Normal(0.0, 1.0)


def _check_sigma(sigma) -> None:
    if not sigma >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid sigma, should be non-negative: {sigma}")


class NSM(torch.optim.Optimizer):
    """The reference NSO optimizer (published as ``NSM``; ``NSO`` is the same class).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer: the base optimizer *class* (e.g. ``torch.optim.SGD``), built as
            ``base_optimizer(self.param_groups, **kwargs)``; both optimizers share ``param_groups``.
        sigma: noise scale (>= 0); stored in every group (``group["sigma"]``).
        distribution: ``None``/"normal", "laplace", "uniform", "binomial" or "cauchy"
            (see :func:`make_distribution`).
        noise_source: optional ``noise_source(p, group_index, param_index) -> Tensor`` returning the
            *unscaled* sample for parameter ``p`` (p's shape); the optimizer moves it to p's device
            and multiplies it by the group's ``sigma``. ``param_index`` is p's index in
            ``param_groups[group_index]["params"]``. If the source has a ``new_draw()`` method, it is
            called at the start of every ``first_step(store_perturb=True)``, before any parameter's
            sample is requested. When given, it replaces the ``torch.distributions`` draw (which
            then consumes no CPU random numbers) and ``distribution`` is only validated: build the
            source with the same distribution (e.g. :func:`flatfused_noise_source`).
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, ...).

    The reference's training loop is :func:`train_step`.
    """

    def __init__(
        self,
        params,
        base_optimizer,
        sigma: float = 0.05,
        distribution: str | None = None,
        noise_source: NoiseSource | None = None,
        **kwargs,
    ):
        _check_sigma(sigma)
        if not isinstance(base_optimizer, type):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD (the reference "
                f"builds it as base_optimizer(param_groups, **kwargs)); got {type(base_optimizer).__name__}"
            )
        self.distribution_name = distribution
        self.distribution = make_distribution(distribution)
        self.noise_source = noise_source

        defaults = dict(sigma=sigma, **kwargs)
        super().__init__(params, defaults)

        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    # ------------------------------------------------------------------ helpers

    def set_sigma(self, sigma: float) -> None:
        """Set ``sigma`` on every parameter group (the reference's sigma schedules call this)."""
        _check_sigma(sigma)
        for group in self.param_groups:
            group["sigma"] = sigma

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients; by default in place (the reference always keeps the tensors)."""
        super().zero_grad(set_to_none=set_to_none)

    def _sample(self, p: torch.Tensor, group_index: int, param_index: int) -> torch.Tensor:
        """The unscaled noise for ``p`` on p's device (the reference samples on the CPU)."""
        if self.noise_source is not None:
            sample = self.noise_source(p, group_index, param_index)
            if tuple(sample.shape) != tuple(p.shape):
                raise ValueError(
                    f"noise_source returned shape {tuple(sample.shape)} for a parameter of shape "
                    f"{tuple(p.shape)}"
                )
        else:
            sample = self.distribution.sample(p.data.shape)
        return sample.to(p.device)

    # ------------------------------------------------------------------ the reference API

    @torch.no_grad()
    def store_gradients(self, zero_grad: bool = False, store_weights: bool = False,
                        update_weight: float = 0.5) -> None:
        """Accumulate ``update_weight * grad``.

        With ``store_weights=True`` the current weights are saved as ``w0`` (a clone) and the
        accumulator is *set* to ``update_weight * grad``; otherwise ``update_weight * grad`` is
        added to it. ``zero_grad=True`` then zeroes the gradients in place.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                state = self.state[p]
                if store_weights:
                    state["w0"] = p.data.clone()
                    state["acc"] = p.grad.data.clone() * update_weight
                else:
                    if "acc" not in state:
                        raise RuntimeError(
                            "store_gradients(store_weights=False) before any "
                            "store_gradients(store_weights=True): no accumulator to add to"
                        )
                    state["acc"] += p.grad.data.clone() * update_weight
        if zero_grad:
            self.zero_grad(set_to_none=False)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, store_perturb: bool = True) -> None:
        """Restore ``w0``; then move to ``w0 + u`` with fresh noise u (``store_perturb=True``,
        u is stored) or to ``w0 - u`` with the stored u (``store_perturb=False``)."""
        if store_perturb and self.noise_source is not None:
            new_draw = getattr(self.noise_source, "new_draw", None)
            if callable(new_draw):
                new_draw()
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                state = self.state[p]
                if "w0" not in state:  # no gradient at the clean pass: skipped (see module doc)
                    continue
                p.data = state["w0"].clone()  # restore the saved weights
                if store_perturb:
                    e_w = self._sample(p, gi, pi) * group["sigma"]
                    state["noise"] = e_w
                    p.add_(e_w)
                else:
                    if "noise" not in state:
                        raise RuntimeError(
                            "first_step(store_perturb=False) before any first_step(store_perturb=True): "
                            "no stored noise to subtract"
                        )
                    p.sub_(state["noise"])
        if zero_grad:
            self.zero_grad(set_to_none=False)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w0``, put the accumulated gradient in ``.grad`` and run the base step."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                state = self.state[p]
                if "w0" not in state:
                    continue
                p.data = state["w0"]  # the reference aliases the parameter with the saved weights
                if p.grad is None:
                    p.grad = state["acc"]
                else:
                    p.grad.data = state["acc"]  # ... and the gradient with the accumulator
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=False)

    def step(self, closure=None):
        raise NotImplementedError(
            "the reference NSO has no working step(closure) (its published step is broken); drive it "
            "with flatfused.reference.train_step, or use flatfused.NSO.step(closure), the efficient "
            "implementation"
        )

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups  # re-link the shared groups


NSO = NSM


# ---------------------------------------------------------------------- flatfused's noise, per tensor


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements occupy exactly ``numel`` consecutive storage slots (any dim order)."""
    if t.numel() <= 1:
        return True
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


class FlatfusedNoiseSource:
    """A ``noise_source`` for :class:`NSM` that draws exactly what flatfused's optimizer draws.

    flatfused's RNG spec (docs/rng.md): element ``i`` of the parameter space, the
    parameters with ``requires_grad=True`` concatenated in ``param_groups`` order without padding,
    of the draw at ``(seed, offset)`` is ``flatfused.rng.noise`` element ``i``; each draw advances
    the offset by ``ceil(N / 4)``, N the total number of elements.

    Here parameter ``p`` with logical start ``base_p`` (the summed numel of the preceding
    parameters) gets ``rng.noise(p.numel(), seed, offset_k, base=base_p, dist=code)`` on the CPU,
    where ``offset_k = offset + k * ceil(N / 4)`` for the k-th draw (k = 0, 1, ...). A draw
    starts with :meth:`new_draw`, which :class:`NSM` calls at the start of every
    ``first_step(store_perturb=True)``.

    Element order within a parameter (``order``):

    - ``"memory"`` (default): the ``p.numel()`` values are laid out in p's *storage* order; for a
      contiguous p that is the row-major order, for a dense but permuted p (e.g. a transposed or
      channels-last parameter) value j goes to the element at storage slot j. This is what a
      kernel running over a buffer that holds the parameter as it is laid out in memory draws.
      A parameter that is not dense (gaps or overlaps in its storage) falls back to row-major.
    - ``"logical"``: row-major order always, i.e. what is drawn when the parameter is copied
      into a flat buffer with ``.reshape(-1)``.

    The returned sample has p's strides in "memory" order (``torch.empty_strided``), fp32, on the
    CPU; :class:`NSM` copies it to the device and multiplies it by ``sigma``.
    """

    def __init__(self, optimizer_params, seed: int, offset: int = 0,
                 distribution: str | None = None, order: str = "memory"):
        if order not in ("memory", "logical"):
            raise ValueError(f"order must be 'memory' or 'logical', got {order!r}")
        self.seed = int(seed)
        self.offset = int(offset)  # the offset of the next draw
        self.draw_offset: int | None = None  # the offset of the draw in progress
        self.draws = 0
        self.dist = rng.distribution_code(distribution)
        self.order = order
        self._params: list[torch.Tensor] = []  # keeps the ids below valid
        self.bases: dict[int, int] = {}
        total = 0
        for p in _flatten_params(optimizer_params):
            if not p.requires_grad or id(p) in self.bases:
                continue
            self._params.append(p)
            self.bases[id(p)] = total
            total += p.numel()
        self.total_numel = total

    @property
    def counters_per_draw(self) -> int:
        return rng.counters_per_draw(self.total_numel)

    def new_draw(self) -> int:
        """Start the next draw; returns its offset."""
        self.draw_offset = self.offset
        self.offset += self.counters_per_draw
        self.draws += 1
        return self.draw_offset

    def base_of(self, p: torch.Tensor) -> int:
        try:
            return self.bases[id(p)]
        except KeyError:
            raise KeyError(
                "parameter not known to this noise source (not among optimizer_params, or "
                "requires_grad=False when the source was built)"
            ) from None

    def __call__(self, p: torch.Tensor, group_index: int = 0, param_index: int = 0) -> torch.Tensor:
        if self.draw_offset is None:
            raise RuntimeError("call new_draw() before requesting samples")
        values = rng.noise(p.numel(), self.seed, self.draw_offset, base=self.base_of(p),
                           dist=self.dist, device="cpu")
        if self.order == "memory" and not p.is_contiguous() and _is_dense(p):
            out = torch.empty_strided(tuple(p.shape), p.stride(), dtype=values.dtype)
            out.as_strided((p.numel(),), (1,), 0).copy_(values)
            return out
        return values.view(p.shape)


def _flatten_params(optimizer_params) -> list[torch.Tensor]:
    """Parameters, in order, of an optimizer, a list of param groups, or an iterable of tensors."""
    if isinstance(optimizer_params, torch.optim.Optimizer):
        optimizer_params = optimizer_params.param_groups
    if isinstance(optimizer_params, torch.Tensor):
        return [optimizer_params]
    out: list[torch.Tensor] = []
    for item in optimizer_params:
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append(item[1])  # named parameters
        else:
            out.append(item)
    return out


def flatfused_noise_source(optimizer_params, seed: int, offset: int = 0,
                           distribution: str | None = None, order: str = "memory"
                           ) -> FlatfusedNoiseSource:
    """Build a :class:`FlatfusedNoiseSource` over ``optimizer_params`` (an optimizer, its
    ``param_groups``, or the iterable of parameters or groups given to the optimizer)."""
    return FlatfusedNoiseSource(optimizer_params, seed, offset, distribution, order)


# ---------------------------------------------------------------------- the reference training loop


def train_step(model: torch.nn.Module, optimizer: NSM, loss_fn, batch, num_perturbs: int = 1,
               lam: float = 0.5, use_neg: bool = False, reference_bn: bool = False) -> float:
    """One step of the reference NSO trainer; returns the clean loss.

    ``loss_fn(model, batch)`` returns the loss tensor. The update direction is
    ``lam * g(w) + uw * sum_k [g(w + u_k) + g(w - u_k)]`` (the minus terms only with ``use_neg``),
    ``uw = (1 - lam) / (2K)`` with ``use_neg`` else ``(1 - lam) / K``. As in the reference, the clean
    pass always runs (also for ``lam == 0``) and the gradients are not zeroed before it (the
    previous ``second_step(zero_grad=True)`` did that).

    BatchNorm: running statistics on for the clean pass, off (momentum 0) for the perturbed ones,
    back on at the end. ``reference_bn=True`` uses the published helpers, which only cover
    ``BatchNorm2d``; the default covers every ``_BatchNorm``.
    """
    enable = reference_enable_running_stats if reference_bn else enable_running_stats
    disable = reference_disable_running_stats if reference_bn else disable_running_stats

    enable(model)
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.store_gradients(zero_grad=True, store_weights=True, update_weight=lam)

    disable(model)
    if num_perturbs != 0:
        uw = (1 - lam) / (2 * num_perturbs) if use_neg else (1 - lam) / num_perturbs
        for _ in range(num_perturbs):
            optimizer.first_step(zero_grad=True, store_perturb=True)
            loss_fn(model, batch).backward()
            optimizer.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
            if use_neg:
                optimizer.first_step(zero_grad=True, store_perturb=False)
                loss_fn(model, batch).backward()
                optimizer.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
    optimizer.second_step(zero_grad=True)
    enable(model)
    return float(loss.detach())
