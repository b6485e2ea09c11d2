"""Other libraries' versions of the optimizers, timed beside flatfused's in the same run.

Each peer is driven the way its own documentation shows, through one function ``pass_fn`` that
runs a forward-backward pass (accumulating into ``.grad``, as ``loss.backward()`` does) and
returns the loss: the simulated backward of the optimizer-only benchmark, or a real model's
closure end to end. ``spec.OPTIMIZERS`` says which peers each optimizer configuration is
compared with; a peer whose package is missing, or that cannot run a configuration, is listed
as unavailable with the reason instead of timed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .spec import BASES, HYPER, OPTIMIZERS


@dataclass(frozen=True)
class Peer:
    package: str | None  # the module it needs (None: torch itself)
    about: str  # what it is, one line for the tables' notes
    build: Callable  # (spec, base, params, model, pass_fn) -> (optimizer, step)
    # Whether it computes the update of the configuration it is timed under, so that the
    # configuration's byte model (the floor) applies to it.
    same_update: bool = True


def _loss(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.zeros(())


def _torch_base(flag: str):
    def build(spec, base, params, model, pass_fn):
        base_cls, base_kw = BASES[base]
        opt = base_cls(params, **{flag: True}, **base_kw)

        def step():
            opt.zero_grad()
            pass_fn()
            opt.step()
        return opt, step
    return build


def _po_sam(spec, base, params, model, pass_fn):
    """pytorch_optimizer's README: ``zero_grad(); closure(); step(closure)``, the closure
    zeroing the gradients before its backward pass."""
    import pytorch_optimizer

    base_cls, base_kw = BASES[base]
    opt = pytorch_optimizer.SAM(params, base_cls, rho=HYPER["rho"], adaptive=spec["adaptive"],
                                **base_kw)
    return opt, _closure_twice(opt, pass_fn)


def _po_looksam(spec, base, params, model, pass_fn):
    import pytorch_optimizer

    base_cls, base_kw = BASES[base]
    opt = pytorch_optimizer.LookSAM(params, base_cls, rho=HYPER["rho"],
                                    adaptive=spec["adaptive"], **base_kw)
    return opt, _closure_twice(opt, pass_fn)


def _closure_twice(opt, pass_fn):
    def closure():
        opt.zero_grad()
        return _loss(pass_fn())

    def step():
        opt.zero_grad()
        closure()
        opt.step(closure)
    return step


def _po_gsam(spec, base, params, model, pass_fn):
    """GSAM takes a base optimizer instance, the model and a rho scheduler; its ``step`` runs a
    closure returning (outputs, loss) twice, which is what its ``set_closure`` stores (zero the
    base optimizer's gradients, forward, backward); then the documented ``update_rho_t``."""
    import pytorch_optimizer
    from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler

    base_cls, base_kw = BASES[base]
    base_opt = base_cls(params, **base_kw)
    constant = torch.optim.lr_scheduler.LambdaLR(base_opt, lambda _: 1.0)
    rho = ProportionScheduler(constant, max_lr=base_kw["lr"], min_lr=base_kw["lr"],
                              max_value=HYPER["rho"], min_value=HYPER["rho"])
    opt = pytorch_optimizer.GSAM(params, base_opt, model, rho, adaptive=spec["adaptive"])

    def get_grad():  # GSAM's step runs under no_grad; set_closure's enables it for the pass
        base_opt.zero_grad()
        with torch.enable_grad():
            loss = pass_fn()
        return None, _loss(loss).detach()

    def step():
        opt.step(get_grad)
        constant.step()
        opt.update_rho_t()
    return opt, step


def _po_wsam(spec, base, params, model, pass_fn):
    """WSAM's ``step(closure)`` runs both passes; the closure only runs forward-backward."""
    import pytorch_optimizer

    base_cls, base_kw = BASES[base]
    opt = pytorch_optimizer.WSAM(model, params, base_cls, rho=HYPER["rho"], gamma=HYPER["gamma"],
                                 adaptive=spec["adaptive"], **base_kw)

    def step():
        opt.zero_grad()
        opt.step(lambda: _loss(pass_fn()))
    return opt, step


PEERS: dict[str, Peer] = {
    "torch.fused": Peer(None, "torch.optim's fused=True base step", _torch_base("fused")),
    "torch.foreach": Peer(None, "torch.optim's foreach=True base step", _torch_base("foreach")),
    "pytorch_optimizer.SAM": Peer("pytorch_optimizer", "pytorch_optimizer's SAM (ASAM with "
                                  "adaptive=True)", _po_sam),
    "pytorch_optimizer.GSAM": Peer("pytorch_optimizer", "pytorch_optimizer's GSAM: SAM plus a "
                                   "surrogate-gap gradient decomposition (another update)",
                                   _po_gsam, same_update=False),
    "pytorch_optimizer.LookSAM": Peer("pytorch_optimizer", "pytorch_optimizer's LookSAM, k=10: "
                                      "the sharpness direction recomputed every 10th step and "
                                      "reused between (another update; its closure runs on "
                                      "every step)", _po_looksam, same_update=False),
    "pytorch_optimizer.WSAM": Peer("pytorch_optimizer", "pytorch_optimizer's WSAM", _po_wsam),
}


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version(name)
    except (ImportError, PackageNotFoundError):
        return None


def unavailable_reason(peer: str, optimizer: str, device: torch.device) -> str | None:
    """Why ``peer`` cannot run ``optimizer`` here, or None when it can."""
    package = PEERS[peer].package
    if package is not None:
        try:
            importlib.import_module(package)
        except ImportError:
            return f"{package} is not installed (pip install {package})"
    if peer == "torch.fused" and not _fused_runs(device):
        return f"torch has no fused base step on {device.type}"
    if peer not in OPTIMIZERS[optimizer].get("peers", ()):
        return f"{peer} does not implement {optimizer}"
    return None


def _fused_runs(device: torch.device) -> bool:
    p = torch.nn.Parameter(torch.zeros(1, device=device))
    try:
        torch.optim.SGD([p], lr=0.1, fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_peer(peer: str, optimizer: str, base: str, params, model, pass_fn):
    """(optimizer, one step) of ``peer`` for an optimizer configuration."""
    return PEERS[peer].build(OPTIMIZERS[optimizer], base, params, model, pass_fn)
