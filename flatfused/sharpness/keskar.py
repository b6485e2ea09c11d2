"""Keskar et al.'s sharpness (minima width) by projected gradient ascent.

The first-order variant of the explore–exploit paper ("Wide-minima Density Hypothesis and the
Explore-Exploit Learning Rate Schedule"): instead of L-BFGS-B, gradient *ascent* on the training
loss inside the box ``w0 ± epsilon·(|w0| + 1)``; the sharpness is the relative loss increase
``100 · (L_final − L_0) / (1 + L_0)``.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterable

import torch

__all__ = ["ComputeKeskarSharpness", "keskar_sharpness", "mean_loss"]


def _batch_size(inputs, targets) -> int:
    for t in (targets, inputs):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1


def mean_loss(model: torch.nn.Module, criterion, loader: Iterable) -> float:
    """The mean of ``criterion(model(x), y)`` over the batches ``(x, y)`` of ``loader``, each
    batch weighted by its size (the exact mean over samples for a mean-reduced criterion).
    Runs under ``torch.no_grad()`` in the model's current mode."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in loader:
            n = _batch_size(inputs, targets)
            total += float(criterion(model(inputs), targets)) * n
            count += n
    if count == 0:
        raise ValueError("the loader yielded no batches")
    return total / count


@contextmanager
def _preserved(model: torch.nn.Module):
    """Restores the model's parameters, buffers, ``.grad``s and every module's train/eval flag."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    # The gradient tensors themselves come back, not copies: a flatfused optimizer's gradients
    # are views of its flat buffer.
    grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w, (grad, value) in zip(params, saved, grads):
                p.copy_(w)
                if grad is not None:
                    grad.copy_(value)
                p.grad = grad
            for b, v in buffers:
                b.copy_(v)
        for m, training in modes:
            m.training = training


class ComputeKeskarSharpness:
    """Keskar sharpness by projected gradient ascent, a drop-in for the reference class.

    ``ComputeKeskarSharpness(model, optimizer, criterion, trainloader, epsilon=1e-4, lr=0.001,
    max_steps=1000).compute_sharpness()`` runs ``max_steps`` minibatch steps of gradient *ascent*
    on ``criterion`` (cycling through ``trainloader`` as often as needed, as the reference does),
    each step followed by the projection of every parameter onto the box
    ``w0 ± epsilon·(|w0| + 1)`` around the starting weights ``w0``, and returns
    ``100 · (L_final − L_0) / (1 + L_0)`` with ``L`` the mean training loss over ``trainloader``
    (batches weighted by their size; ``criterion`` should be mean-reduced).

    ``optimizer`` (the ascent's optimizer, e.g. SGD or Adam) may be

    * an optimizer **class**: built as ``optimizer(trainable model parameters, lr=lr)``;
    * an optimizer **instance** over the model's parameters, as in the reference: its groups'
      ``lr`` is set to ``lr`` for the ascent, which starts from an empty optimizer state (the
      reference carried the training run's momentum buffers / Adam moments into the ascent, so
      the result depended on the training history). Unlike the reference, the instance's state
      and group settings are put back afterwards, in place (the same group dicts and state
      tensors), so a training optimizer can be passed without being disturbed. A wrapper with a
      ``base_optimizer`` (flatfused's NSO, SAM and WeightedSAM, the reference SAM) ascends with
      its base optimizer: the wrapper's own ``step`` needs a closure.

    The ascent negates the loss and calls ``optimizer.step()``; any weight decay configured in the
    optimizer therefore acts during the ascent too.

    Fixes of the published reference (documented departures):

    1. only **parameters** are projected (and ascended); the reference projected every
       ``state_dict`` entry, BatchNorm running statistics and ``num_batches_tracked`` included;
    2. the ascent runs in **eval mode**: the reference switched to train mode for the ascent, so
       BatchNorm used (and updated) batch statistics and dropout was active while ``L_0`` and
       ``L_final`` were measured in eval mode;
    3. the published file does not parse (a missing colon); this module does.

    In addition, the model's weights, buffers, gradients and train/eval flags are restored after
    ``compute_sharpness()`` (the reference left the model at the perturbed point), and nothing is
    printed.
    """

    def __init__(self, model: torch.nn.Module, optimizer, criterion, trainloader,
                 epsilon: float = 1e-4, lr: float = 0.001, max_steps: int = 1000):
        epsilon, lr = float(epsilon), float(lr)
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
        if not (isinstance(optimizer, torch.optim.Optimizer)
                or (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer))):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer class or instance, got {optimizer!r}")
        self.net = self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        if iter(trainloader) is trainloader:
            trainloader = list(trainloader)  # a one-shot iterator: L_0, the ascent and L_final
        self.trainloader = trainloader
        self.epsilon = epsilon
        self.lr = lr
        self.max_steps = max_steps
        self.init_loss: float | None = None
        self.final_loss: float | None = None

    def compute_loss(self) -> float:
        """Mean training loss over ``trainloader`` in eval mode (the model's modes are restored)."""
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            return mean_loss(self.model, self.criterion, self.trainloader)
        finally:
            for m, training in modes:
                m.training = training

    @contextmanager
    def _ascent_optimizer(self, params):
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            yield self.optimizer(params, lr=self.lr)
            return
        opt = self.optimizer
        base = getattr(opt, "base_optimizer", None)
        if isinstance(base, torch.optim.Optimizer):
            opt = base
        # Put back in place, not by load_state_dict: that replaces the group dicts and the state
        # tensors, which a wrapper sharing the base's param_groups, or flat-buffer state views,
        # would no longer see.
        settings = [{k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                     for k, v in group.items() if k != "params"} for group in opt.param_groups]
        state = dict(opt.state)  # the per-parameter dicts: the ascent fills fresh ones
        try:
            opt.state.clear()  # the ascent starts fresh: no training momentum / moments
            for group in opt.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(self.lr)
                else:
                    group["lr"] = self.lr
            yield opt
        finally:
            opt.state.clear()
            opt.state.update(state)
            for group, saved in zip(opt.param_groups, settings):
                for key, value in saved.items():
                    if isinstance(value, torch.Tensor) and isinstance(group.get(key), torch.Tensor):
                        group[key].copy_(value)
                    else:
                        group[key] = value

    def compute_sharpness(self) -> float:
        """``100 · (L_final − L_0) / (1 + L_0)`` after ``max_steps`` projected ascent steps."""
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        with _preserved(model):
            model.eval()
            self.init_loss = init_loss = mean_loss(model, self.criterion, self.trainloader)
            radius = [self.epsilon * (p.detach().abs() + 1.0) for p in params]
            lower = [p.detach() - r for p, r in zip(params, radius)]
            upper = [p.detach() + r for p, r in zip(params, radius)]
            del radius
            with self._ascent_optimizer(params) as opt:
                steps = 0
                while steps < self.max_steps:
                    batches = 0
                    for inputs, targets in self.trainloader:
                        batches += 1
                        opt.zero_grad()
                        loss = -self.criterion(model(inputs), targets)  # ascent
                        loss.backward()
                        opt.step()
                        with torch.no_grad():
                            for p, lo, hi in zip(params, lower, upper):
                                p.clamp_(min=lo, max=hi)
                        steps += 1
                        if steps == self.max_steps:
                            break
                    if batches == 0:
                        raise ValueError("the trainloader yielded no batches")
            self.final_loss = final_loss = mean_loss(model, self.criterion, self.trainloader)
        return 100.0 * (final_loss - init_loss) / (1.0 + init_loss)


def keskar_sharpness(model: torch.nn.Module, criterion, loader, epsilon: float = 1e-4,
                     steps: int = 1000, lr: float = 0.001,
                     optimizer=torch.optim.SGD) -> float:
    """Functional form of :class:`ComputeKeskarSharpness`: ``steps`` projected ascent steps with
    ``optimizer`` (a class, default SGD, or an instance) at ``lr``; returns
    ``100 · (L_final − L_0) / (1 + L_0)`` and leaves the model as it found it."""
    return ComputeKeskarSharpness(model, optimizer, criterion, loader, epsilon=epsilon, lr=lr,
                                  max_steps=steps).compute_sharpness()
