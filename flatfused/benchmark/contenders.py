"""The contenders of one configuration and a step function for each: the reference, the
pure-PyTorch baseline, flatfused on each backend and the peers (peers.py), driven by a
simulated backward pass that times itself."""
from __future__ import annotations

import time

import torch

import flatfused
from flatfused import baselines, reference

from .peers import PEERS, build_peer
from .spec import BASES, HYPER, OPTIMIZERS, TORCH_BACKEND_MAX_NUMEL, has_wsam


# ---------------------------------------------------------------------------- simulated backward


class SimulatedBackward:
    """Adds fixed gradients into ``.grad`` (a fresh copy where ``.grad`` is None), counting what
    it did and the time it took (``seconds``, between synchronisations on a GPU), so that a
    step's own work is its time less the time spent in here; optionally runs a probe after each
    pass (untimed).

    The gradients go in through autograd (``torch.autograd.backward`` on the parameters
    themselves), as a real backward's do: each parameter's AccumulateGrad adds in place and its
    hooks run (WeightedSAM tells autograd's accumulation from a closure's own writes by them;
    a missing ``.grad`` gets its flat slot attached)."""

    def __init__(self, params, grads):
        self.params, self.grads = params, grads
        self.adds = self.copies = 0
        self.seconds = 0.0
        self.probe = None
        cuda = any(g.is_cuda for g in grads)
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)

    def __call__(self):
        # The optimizer's kernels queued before the pass finish outside the timed region, and
        # the pass's own inside it.
        self._sync()
        t0 = time.perf_counter()
        for p in self.params:
            if p.grad is None:
                self.copies += 1
            else:
                self.adds += 1
        # Where .grad is None autograd clones the gradient in (a copy), except where a
        # flatfused hook first attaches the parameter's zeroed slot of the flat buffer, as in
        # a real backward (a plain `p.grad = g.clone()` would be gathered back each step).
        add_through_autograd(self.params, self.grads)
        self._sync()
        self.seconds += time.perf_counter() - t0
        if self.probe is not None:
            self.probe()

    def reset_counts(self) -> None:
        self.adds = self.copies = 0
        self.seconds = 0.0


def add_through_autograd(leaves, grads) -> None:
    """``leaf.grad += grad`` for each pair, by autograd's AccumulateGrad (which clones ``grad``
    in where ``.grad`` is None: it never takes the caller's tensor, which it does not own)."""
    with torch.enable_grad():
        torch.autograd.backward(leaves, grads)


class _Holder(torch.nn.Module):
    """A module owning bare parameters (WSAM takes a model)."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


# ---------------------------------------------------------------------------- contenders


def contenders_for(optimizer: str, backends: list[str], numel: int, explicit_backends: bool,
                   headline: bool = False) -> list[str]:
    """Every contender of a configuration, peers included (whether or not they can run here:
    :func:`peers.unavailable_reason` says). ``headline`` leaves out flatfused's three-call API."""
    spec = OPTIMIZERS[optimizer]
    kind = spec["kind"]
    names = [] if kind == "base" else ["reference", "baseline"]
    for b in backends if kind != "base" else ():
        if b == "torch" and not explicit_backends and (kind == "nso"
                                                       or numel > TORCH_BACKEND_MAX_NUMEL):
            continue
        if kind == "wsam" and not has_wsam():
            continue
        names.append(f"flatfused[{b}]")
        if kind == "nso" and not headline:
            names.append(f"flatfused[{b}] 3-call")
    return names + list(spec.get("peers", ()))


def option_refusal(contender: str, optimizer: str) -> str | None:
    """Why ``contender`` cannot run ``optimizer``'s schedule options (None: it can). Only
    flatfused's optimizers take them; the byte model (spec.budget_accesses) must know them."""
    options = OPTIMIZERS[optimizer].get("options")
    if options and not contender.startswith("flatfused["):
        return f"{contender} has no {sorted(options)}"
    return None


def build(contender: str, optimizer: str, base: str, params: list[torch.nn.Parameter],
          backward: SimulatedBackward):
    """The optimizer of ``contender`` and a function running one step of it."""
    spec = OPTIMIZERS[optimizer]
    kind = spec["kind"]
    base_cls, base_kw = BASES[base]
    model = _Holder(params)
    if contender in PEERS:
        return build_peer(contender, optimizer, base, params, model, backward)
    options = spec.get("options", {})
    backend = contender[len("flatfused["):contender.index("]")] if contender.startswith("flatfused") else None
    if backend is not None:
        # As for a model that already has gradients: the flat gradient buffer is attached from
        # the start (otherwise flatfused's hook attaches it at the first pass). Steady-state
        # steps are the same either way.
        for p in params:
            p.grad = torch.zeros_like(p)

    if kind == "nso":
        K, lam, use_neg = spec["K"], spec["lam"], spec["use_neg"]
        uw = (1 - lam) / (2 * K if use_neg else K)
        if contender == "reference":
            opt = reference.NSM(params, base_cls, sigma=HYPER["sigma"], **base_kw)
        elif contender == "baseline":
            opt = baselines.NSO(params, base_cls, sigma=HYPER["sigma"], num_perturbs=K, lam=lam,
                                use_neg=use_neg, **base_kw)
        else:
            opt = flatfused.NSO(params, base_cls, sigma=HYPER["sigma"], num_perturbs=K, lam=lam,
                                use_neg=use_neg, backend=backend, seed=0, **options, **base_kw)
        if contender == "reference" or contender.endswith("3-call"):
            def step():
                backward()
                opt.store_gradients(zero_grad=True, store_weights=True, update_weight=lam)
                for _ in range(K):
                    opt.first_step(zero_grad=True, store_perturb=True)
                    backward()
                    opt.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
                    if use_neg:
                        opt.first_step(zero_grad=True, store_perturb=False)
                        backward()
                        opt.store_gradients(zero_grad=True, store_weights=False, update_weight=uw)
                opt.second_step(zero_grad=True)
        else:
            def step():
                opt.step(backward)
        return opt, step

    if kind == "sam":
        adaptive = spec["adaptive"]
        if contender == "reference":
            opt = reference.SAM(params, base_cls, rho=HYPER["rho"], adaptive=adaptive, **base_kw)
        elif contender == "baseline":
            opt = baselines.SAM(params, base_cls, rho=HYPER["rho"], adaptive=adaptive, **base_kw)
        else:
            opt = flatfused.SAM(params, base_cls, rho=HYPER["rho"], adaptive=adaptive,
                                backend=backend, **options, **base_kw)

        def step():  # the clean pass, then step(closure) runs the pass at the ascent point
            opt.zero_grad()
            backward()
            opt.step(backward)
        return opt, step

    if kind != "wsam":
        raise ValueError(f"no contender {contender!r} for {optimizer}")
    adaptive = spec["adaptive"]
    wsam_kw = dict(rho=HYPER["rho"], gamma=HYPER["gamma"], adaptive=adaptive)
    if contender == "reference":
        opt = reference.WeightedSAM(model, base_cls(params, **base_kw), **wsam_kw)
    elif contender == "baseline":
        opt = baselines.WeightedSAM(params, base_cls, **wsam_kw, **base_kw)
    else:
        opt = flatfused.WeightedSAM(model, base_cls(params, **base_kw), backend=backend, **wsam_kw,
                                    **options)

    def step():  # WSAM's step runs both passes
        opt.zero_grad()
        opt.step(backward)
    return opt, step
