"""Track the top Hessian eigenvalue against gradient descent's and SAM's edges of stability.

Long & Bartlett ("Sharpness-aware minimization and the edge of stability", 2023) show that the
top eigenvalue of the training-loss Hessian under SAM settles at the *SAM edge*
``(‖g‖ / (2ρ)) · (sqrt(1 + 8ρ / (η‖g‖)) − 1)`` (below gradient descent's ``2/η``) and that
the gradient aligns with the top eigenvector. :class:`SAMEdgeTracker` logs those quantities along a
training run at little cost: the power iteration starts from the previous eigenvector, so it
usually converges in a few Hessian-vector products.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from . import _plot
from .algorithms import _power_iteration
from .batches import _batch_size
from .hvp_operator import _HVP, _operator
from .vectors import _dot, _gaussian, _normalize, _orthogonalize
from .sam_edge import sam_edge

__all__ = ["SAMEdgeTracker"]

COLUMNS = ("step", "lr", "rho", "loss", "grad_norm", "top_eigenvalue", "two_over_lr", "sam_edge",
           "grad_alignment", "sam_grad_alignment", "hvps", "seconds")


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _group_value(optimizer, key, group):
    """``key`` of the param group(s): one group's, or the value all groups share."""
    groups = optimizer.param_groups
    if group is not None:
        return groups[group].get(key)
    values = [g.get(key) for g in groups]
    floats = [None if v is None else float(v) for v in values]
    if any(f != floats[0] for f in floats):
        raise ValueError(f"the optimizer's param groups have different {key!r} values {floats}; "
                         "pass group=<index> to say which one the edges use")
    return values[0]


def _orthonormal(vectors, params, gen):
    """Gram-Schmidt in the given order; a vector that the earlier ones span (or a zero one) is
    replaced by a random direction, so the basis keeps its size."""
    basis = []
    for v in vectors:
        for _ in range(3):
            w = _orthogonalize(v, basis)
            norm = math.sqrt(max(_dot(w, w), 0.0))
            if norm > 1e-8 * math.sqrt(max(_dot(v, v), 0.0)) and math.isfinite(norm):
                basis.append(_normalize(w))
                break
            v = _gaussian(params, gen)
        else:
            raise RuntimeError("could not complete an orthonormal basis")
    return basis


def _combine(vectors, coefficients):
    """sum_j coefficients[j] * vectors[j] (vectors are lists of tensors)."""
    out = [torch.zeros_like(t) for t in vectors[0]]
    for c, v in zip(coefficients, vectors):
        for o, t in zip(out, v):
            o.add_(t, alpha=float(c))
    return out


def _orthogonal_iteration(op: _HVP, k: int, max_iter: int, tol: float, gen, init=None):
    """The ``k`` eigenvalues of largest magnitude and their eigenvectors by orthogonal (subspace)
    iteration with a Rayleigh-Ritz step: ``k`` products per iteration on the current basis,
    the small matrix ``Q^T H Q`` diagonalised, the next basis the orthonormalised ``H Q``.
    Unlike power iteration with deflation, the ``k`` directions converge together, and a
    previous basis (``init``, a warm start during training) is reused whole. Stops when every
    Ritz value changes by less than ``tol`` (relative); returns (values, vectors, products),
    values in decreasing magnitude."""
    start = [list(v) for v in (init or [])][:k]
    start += [_gaussian(op.params, gen) for _ in range(k - len(start))]
    q = _orthonormal(start, op.params, gen)
    values, vectors, products = None, None, 0
    for _ in range(max_iter):
        hq = op(q)
        products += k
        t = torch.tensor([[_dot(qi, hj) for hj in hq] for qi in q], dtype=torch.float64)
        if not bool(torch.isfinite(t).all()):  # a diverged model: NaN values, as power iteration
            return [math.nan] * k, q, products
        # Finite-difference products are not exactly symmetric (rounding, and the activation
        # kinks a difference step crosses): take the symmetric part.
        evals, evecs = torch.linalg.eigh((t + t.T) / 2)
        order = sorted(range(k), key=lambda i: -abs(float(evals[i])))
        new = [float(evals[i]) for i in order]
        vectors = [_combine(q, evecs[:, i].tolist()) for i in order]
        converged = values is not None and all(
            abs(a - b) / (abs(b) + 1e-6) < tol for a, b in zip(new, values))
        values = new
        if converged:
            break
        q = _orthonormal([_combine(hq, evecs[:, i].tolist()) for i in order], op.params, gen)
    return values, [_normalize(v) for v in vectors], products


class _Undisturbed:
    """Training must not notice a measurement: every module's train/eval flag, every buffer
    (BatchNorm running statistics in train mode), and the global CPU and CUDA RNG states (dropout
    in train mode draws from them) are put back; parameters and ``.grad`` are never written."""

    def __init__(self, model, mode):
        self.model, self.mode = model, mode

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.model.train(self.mode == "train")
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for m, training in self.modes:
            m.training = training
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        return False


class _WeightedMean:
    """Loss and gradient averaged over batches weighted by their size (the mean over samples
    of a mean-reduced loss); a parameter the loss does not reach has a zero gradient."""

    def __init__(self):
        self.loss, self.count, self.grad = 0.0, 0, None

    def add(self, n, grads, params, loss):
        grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
        self.loss += loss * n
        self.count += n
        if self.grad is None:
            self.grad = [g * n for g in grads]
        else:
            for a, g in zip(self.grad, grads):
                a.add_(g, alpha=n)

    def result(self):
        if self.grad is None:
            raise ValueError("the data yielded no batches")
        return self.loss / self.count, [a / self.count for a in self.grad]


class SAMEdgeTracker:
    """Log, every ``every`` training steps, the top Hessian eigenvalue, ``2/lr``, the SAM edge,
    the gradient norm, the loss and the gradient's alignment with the top eigenvector.

    Usage (call ``step`` once per training step, before the optimizer's update, with the batch
    the step trains on)::

        tracker = SAMEdgeTracker(model, loss_fn, optimizer, every=50)
        for x, y in loader:
            tracker.step((x, y))          # measures every 50th call, else returns None
            ... the training step ...
        tracker.to_csv("edge.csv"); tracker.to_json("edge.json"); tracker.plot("edge.pdf")

    Args:
        model: the network; the Hessian is over its parameters with ``requires_grad``.
        loss_fn: mean-reduced ``loss_fn(model(inputs), targets)``.
        optimizer: any ``torch.optim.Optimizer`` (flatfused.SAM/NSO included; they share their
            base optimizer's ``param_groups``). ``lr`` is read from its param groups at every
            measurement, so LR schedulers are followed; ``rho`` too, when the groups have one
            (SAM), else the SAM edge is gradient descent's ``2/lr`` (rho = 0). ``None``: pass
            ``lr`` (and ``rho``) explicitly.
        every: measure on calls 0, every, 2·every, ... of :meth:`step`.
        rho, lr: fixed values overriding the optimizer's.
        group: the param group whose ``lr``/``rho`` are used when groups differ.
        data: a fixed ``(inputs, targets)`` batch or a list of batches to measure on instead of
            the batch passed to :meth:`step` (a list is averaged weighting batches by size).
        iters, tol: power iteration's cap on Hessian-vector products and its relative
            tolerance (the reference uses 100 and 1e-3).
        mode: ``"eval"`` (default; BatchNorm running statistics, no dropout, as the Hessian
            tools) or ``"train"`` (batch statistics; the running statistics and the RNG are
            restored afterwards).
        hvp_method, fd_eps: ``"autograd"`` (double backward) or ``"finite_difference"``
            (central differences of gradients with step ``fd_eps`` along the unit vector, as
            the reference does with 1e-3; weights are put back by copy, bit for bit).
        sam_gradient: also log ``sam_grad_alignment``, the alignment of SAM's gradient
            ``∇L(w + ρ g/‖g‖)`` (ASAM's perturbation when the group has ``adaptive=True``) with
            the top eigenvector; costs one more forward/backward. NaN when rho == 0.
        warm_start: start each power iteration from the previous eigenvector.
        seed: seed of the first (random) start vector.
        top_n: how many eigenvalues of largest magnitude to log. 1 (default): power iteration.
            More: orthogonal iteration with a Rayleigh-Ritz step (``top_n`` products per
            iteration; warm-started from the previous basis); the row gains the columns
            ``eigenvalue_2`` ... ``eigenvalue_<top_n>`` (``tracker.columns``), and the alignments
            are with the top eigenvector.

    Conventions: ``top_eigenvalue`` is the eigenvalue of largest magnitude (power iteration),
    of the Hessian of the measured loss at the weights before the update; alignments are
    ``|cos|`` (an eigenvector's sign is arbitrary); ``grad_norm`` is ``‖∇L(w)‖`` of the same
    loss, over all trainable parameters. Nothing the training run sees changes: weights,
    ``.grad`` and optimizer state are not written, modes, buffers and the RNG are restored, so
    a run with the tracker is bit-identical to one without.
    """

    columns = COLUMNS

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, optimizer=None, *,
                 every: int = 10, rho: Optional[float] = None, lr: Optional[float] = None,
                 group: Optional[int] = None, data=None, iters: int = 20, tol: float = 1e-3,
                 mode: str = "eval", hvp_method: str = "autograd", fd_eps: float = 1e-3,
                 sam_gradient: bool = True, warm_start: bool = True, seed: int = 0,
                 top_n: int = 1):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, "
                            f"got {type(optimizer).__name__}")
        if optimizer is None and lr is None:
            raise ValueError("without an optimizer, pass lr (and rho for the SAM edge)")
        if group is not None and (optimizer is None
                                  or not 0 <= group < len(optimizer.param_groups)):
            raise ValueError(f"group={group!r} is not a param group index of the optimizer")
        for name, value, low in (("lr", lr, 0.0), ("rho", rho, 0.0)):
            if value is not None and not (math.isfinite(float(value)) and float(value) >= low
                                          and (name != "lr" or float(value) > 0)):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                                 f"got {value!r}")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', not {mode!r}")
        if hvp_method not in ("autograd", "finite_difference"):
            raise ValueError(f"hvp_method must be 'autograd' or 'finite_difference', "
                             f"not {hvp_method!r}")
        if not (math.isfinite(float(tol)) and float(tol) >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        if not float(fd_eps) > 0:
            raise ValueError(f"fd_eps must be > 0, got {fd_eps!r}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no parameters with requires_grad")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.every = _positive_int("every", every)
        self.iters = _positive_int("iters", iters)
        self.top_n = _positive_int("top_n", top_n)
        if self.top_n > 1:  # an instance attribute: the class's stays the one-eigenvalue row
            self.columns = COLUMNS + tuple(f"eigenvalue_{i}" for i in range(2, self.top_n + 1))
        self.tol, self.fd_eps = float(tol), float(fd_eps)
        self.rho = None if rho is None else float(rho)
        self.lr = None if lr is None else float(lr)
        self.group, self.data, self.mode = group, data, mode
        self.hvp_method = hvp_method
        self.sam_gradient, self.warm_start = bool(sam_gradient), bool(warm_start)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.rows: List[Dict[str, float]] = []
        self.calls = 0
        self._v = None  # the last top eigenvector (the warm start)
        self._basis = None  # the last top_n eigenvectors (the warm start when top_n > 1)

    # -- hyperparameters -------------------------------------------------------------------
    def current_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        lr = _group_value(self.optimizer, "lr", self.group)
        if lr is None:
            raise ValueError("the optimizer's param groups have no 'lr'")
        lr = float(lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"the edges need a learning rate > 0, the optimizer has lr={lr}")
        return lr

    def current_rho(self) -> float:
        if self.rho is not None:
            return self.rho
        if self.optimizer is None:
            return 0.0
        # flatfused's SAM/WSAM keep rho as "sam_rho" next to a base optimizer with its own rho.
        rho = _group_value(self.optimizer, getattr(self.optimizer, "rho_key", "rho"), self.group)
        return 0.0 if rho is None else float(rho)

    def _adaptive(self) -> bool:
        if self.optimizer is None:
            return False
        groups = self.optimizer.param_groups
        group = groups[self.group] if self.group is not None else groups[0]
        return bool(group.get("adaptive", False))

    # -- the training-loop hook ----------------------------------------------------------------
    def step(self, batch=None, step: Optional[int] = None) -> Optional[Dict[str, float]]:
        """Count a training step; on every ``every``-th call (the first included) measure at the
        current weights on ``batch`` (or the tracker's fixed ``data``) and return the row."""
        index = self.calls if step is None else int(step)
        due = self.calls % self.every == 0
        self.calls += 1
        return self.measure(batch, step=index) if due else None

    def measure(self, batch=None, step: Optional[int] = None) -> Dict[str, float]:
        """Measure now (whatever the step count) and append the row; ``step`` defaults to the
        number of :meth:`step` calls so far."""
        data = self.data if self.data is not None else batch
        if data is None:
            raise ValueError("no data: pass the training batch to step()/measure() or data= to "
                             "the tracker")
        lr, rho = self.current_lr(), self.current_rho()  # before any work: a bad lr fails fast
        start = time.perf_counter()
        with _Undisturbed(self.model, self.mode):
            op = _operator(self.model, self.loss_fn, data, None, self.hvp_method, self.fd_eps)
            loss, grad = self._loss_and_gradient(op)
            if self.top_n == 1:
                stats = {}
                init = self._v if self.warm_start else None
                values, vectors = _power_iteration(op, 1, self.iters, self.tol, self._gen,
                                                   init=init, stats=stats)
                hvps = stats["products"]
            else:
                init = self._basis if self.warm_start else None
                values, vectors, hvps = _orthogonal_iteration(op, self.top_n, self.iters,
                                                              self.tol, self._gen, init=init)
            op.release()
            top, v = values[0], vectors[0]
            grad_norm = math.sqrt(_dot(grad, grad))
            align = abs(_dot(grad, v)) / grad_norm if grad_norm > 0 else math.nan
            sam_align = math.nan
            if self.sam_gradient and rho > 0 and grad_norm > 0:
                g_sam = self._sam_gradient(op, grad, grad_norm, rho)
                n = math.sqrt(_dot(g_sam, g_sam))
                sam_align = abs(_dot(g_sam, v)) / n if n > 0 else math.nan
        # Warm-start the next power iteration only from a finite vector: after a diverged step
        # (NaN loss or gradient) the next measurement starts afresh.
        finite = all(bool(torch.isfinite(t).all()) for u in vectors for t in u)
        self._v = [t.detach() for t in v] if finite else None
        self._basis = [[t.detach() for t in u] for u in vectors] if finite and self.top_n > 1 \
            else None
        row = {
            "step": self.calls if step is None else int(step),
            "lr": lr,
            "rho": rho,
            "loss": loss,
            "grad_norm": grad_norm,
            "top_eigenvalue": float(top),
            "two_over_lr": 2.0 / lr,
            "sam_edge": sam_edge(grad_norm, rho, lr),
            "grad_alignment": align,
            "sam_grad_alignment": sam_align,
            "hvps": hvps,
            "seconds": time.perf_counter() - start,
        }
        row.update({f"eigenvalue_{i + 1}": float(values[i]) for i in range(1, self.top_n)})
        self.rows.append(row)
        return row

    # -- measurements ------------------------------------------------------------------------
    def _loss_and_gradient(self, op: _HVP):
        """Mean loss and gradient over the measured data, batches weighted by size. With one
        batch and autograd HVPs the gradient's graph is handed to the operator, so the power
        iteration reuses it instead of running the forward pass again."""
        keep_graph = not op.full_dataset and op.method == "autograd"
        mean = _WeightedMean()
        for inputs, targets in op.batches():
            with torch.enable_grad():
                loss = op._loss(inputs, targets)
                grads = torch.autograd.grad(loss, op.params, create_graph=keep_graph,
                                            allow_unused=True)
            if keep_graph:
                op._grads = grads
            mean.add(_batch_size(inputs), grads, op.params, float(loss.detach()))
        return mean.result()

    def _sam_gradient(self, op: _HVP, grad, grad_norm, rho):
        """∇L at SAM's ascent point, through ``functional_call`` so the weights are not written."""
        from torch.func import functional_call

        with torch.no_grad():
            if self._adaptive():
                scaled = [p.detach().abs() * g for p, g in zip(op.params, grad)]
                norm = math.sqrt(_dot(scaled, scaled))
                shifted = [p.detach() + rho * p.detach().square() * g / (norm + 1e-12)
                           for p, g in zip(op.params, grad)]
            else:
                shifted = [p.detach() + rho * g / (grad_norm + 1e-12) for p, g in zip(op.params, grad)]
        point = {name: w.requires_grad_() for name, w in zip(op.names, shifted)}
        mean = _WeightedMean()
        for inputs, targets in op.batches():
            with torch.enable_grad():
                loss = self.loss_fn(functional_call(self.model, point, (inputs,)), targets)
                grads = torch.autograd.grad(loss, list(point.values()), allow_unused=True)
            mean.add(_batch_size(inputs), grads, shifted, 0.0)
        return mean.result()[1]

    # -- results -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> List[float]:
        if name not in self.columns:
            raise KeyError(f"unknown column {name!r}; columns are {self.columns}")
        return [row[name] for row in self.rows]

    def config(self) -> dict:
        return {"every": self.every, "iters": self.iters, "tol": self.tol, "mode": self.mode,
                "hvp_method": self.hvp_method, "fd_eps": self.fd_eps,
                "warm_start": self.warm_start, "seed": self.seed, "top_n": self.top_n,
                "rho": self.rho, "lr": self.lr, "group": self.group,
                "optimizer": None if self.optimizer is None else type(self.optimizer).__name__}

    def to_csv(self, path) -> str:
        """One row per measurement, the columns of ``tracker.columns``; NaN is empty."""
        path = os.fspath(path)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else repr(v)
                                 if isinstance(v, float) else v for k, v in row.items()})
        return path

    def to_json(self, path) -> str:
        """``{"config": ..., "columns": [...], "rows": [{...}, ...]}``; NaN and infinities are
        written as null (strict JSON has neither)."""
        path = os.fspath(path)
        rows = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in row.items()} for row in self.rows]
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"config": self.config(), "columns": list(self.columns), "rows": rows}, f,
                      indent=1, allow_nan=False)
        return path

    def plot(self, path) -> str:
        """Three panels against the step: the top eigenvalue with ``2/lr`` and the SAM edge; the
        alignments; the loss and the gradient norm. The format follows the suffix (.png/.pdf)."""
        path = _plot.check_path(path)
        if not self.rows:
            raise ValueError("nothing to plot: no measurement yet")
        fig, axes = _plot.figure(3)
        steps = self.column("step")
        ax = axes[0][0]
        ax.plot(steps, self.column("top_eigenvalue"), "o-", ms=3, label="top eigenvalue")
        others = [f"eigenvalue_{i}" for i in range(2, self.top_n + 1)]
        for name in others:
            ax.plot(steps, self.column(name), ".-", ms=2, lw=0.8, alpha=0.7,
                    label=name.replace("_", " "))
        ax.plot(steps, self.column("two_over_lr"), "--", label="2 / lr")
        ax.plot(steps, self.column("sam_edge"), "-", label="SAM edge")
        if all(v > 0 for k in ["top_eigenvalue", "two_over_lr", "sam_edge"] + others
               for v in self.column(k)):
            ax.set_yscale("log")
        ax.set_ylabel("sharpness")
        ax.legend(loc="best", fontsize=8)
        ax = axes[1][0]
        ax.plot(steps, self.column("grad_alignment"), "o-", ms=3, label="|cos(g, v1)|")
        if any(not math.isnan(v) for v in self.column("sam_grad_alignment")):
            ax.plot(steps, self.column("sam_grad_alignment"), "s-", ms=3, label="|cos(g_SAM, v1)|")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("alignment")
        ax.legend(loc="best", fontsize=8)
        ax = axes[2][0]
        ax.plot(steps, self.column("loss"), "o-", ms=3, color="C3", label="loss")
        ax.set_ylabel("loss")
        twin = ax.twinx()
        twin.plot(steps, self.column("grad_norm"), "-", color="C4", label="‖g‖")
        twin.set_ylabel("gradient norm")
        ax.legend(handles=ax.get_lines() + twin.get_lines(), loc="best", fontsize=8)
        ax.set_xlabel("step")
        return _plot.save(fig, path)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Rows, step count, warm-start vector and start-vector RNG: a resumed run continues
        the log (and its measurements) as if it had not stopped."""
        return {"rows": [dict(r) for r in self.rows], "calls": self.calls,
                "v": None if self._v is None else [t.clone() for t in self._v],
                "basis": None if self._basis is None else [[t.clone() for t in u]
                                                           for u in self._basis],
                "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"rows", "calls", "v", "generator"} - set(state)
        if missing:
            raise KeyError(f"tracker state lacks {sorted(missing)}")
        self.rows = [dict(r) for r in state["rows"]]
        self.calls = int(state["calls"])
        self._v = None if state["v"] is None else [t.clone() for t in state["v"]]
        basis = state.get("basis")  # absent from the states of trackers before top_n
        self._basis = None if basis is None or self.top_n == 1 else [[t.clone() for t in u]
                                                                     for u in basis]
        self._gen.set_state(state["generator"])
