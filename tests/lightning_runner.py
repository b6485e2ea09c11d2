"""A tiny Lightning task for tests/integration/test_lightning.py, and its DDP runs under torchrun.

The task: 64 generated examples of 8 features and a regression target, batches of 8 in a fixed
order (no shuffling: an uninterrupted run and one resumed from a checkpoint see the same batches
per epoch), and an MLP with a BatchNorm layer (8-32-1, 385 parameters), whose running statistics
show whether the optimizer froze them in the extra passes.

As a script (under torchrun): ``lightning_runner.py OUT KIND:ACCUMULATE ...`` trains each run
with ``strategy="ddp"`` on the CPU ranks, counting DDP gradient synchronisations with a comm
hook (tests/open_clip_runner.py) and checking that the ranks' weights agree; writes
``OUT.<name>.<rank>`` (JSON).
"""
from __future__ import annotations

import json
import logging
import sys
import warnings

import torch
import torch.nn.functional as F

import flatfused

FEATURES, HIDDEN, SAMPLES, BATCH = 8, 32, 64, 8
LR, WEIGHT_DECAY = 0.05, 0.1
KINDS = ("nso", "sam", "wsam")


def quiet() -> None:
    """No progress bars (the trainers turn them off), no Lightning info lines, no warnings
    about this tiny setup (few loader workers, an idle GPU, torch deprecations in Lightning).
    After importing Lightning, which sets its loggers' levels on import."""
    import lightning  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*GPU available but not used.*",
                    ".*LeafSpec.*", ".*treespec.*", ".*`training_step` returned `None`.*"):
        warnings.filterwarnings("ignore", message)


def data(shift: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(7 + shift)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    w = torch.randn(FEATURES, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def make_optimizer(kind: str, module, radius: float = 0.05, eps: float = 1e-8, **kw):
    """``kind``: nso, sam, wsam (``radius``: sigma or rho) or adamw, all over AdamW. NSO and SAM
    get the parameters alone (the callback gives them the module); WSAM needs the module."""
    base = dict(lr=LR, weight_decay=WEIGHT_DECAY, eps=eps)
    if kind == "nso":
        return flatfused.NSO(module.parameters(), torch.optim.AdamW, sigma=radius, seed=3,
                             **base, **kw)
    if kind == "sam":
        return flatfused.SAM(module.parameters(), torch.optim.AdamW, rho=radius, **base, **kw)
    if kind == "wsam":
        return flatfused.WeightedSAM(module, torch.optim.AdamW, rho=radius, gamma=0.8, **base,
                                     **kw)
    if kind == "adamw":
        return torch.optim.AdamW(module.parameters(), **base, **kw)
    raise ValueError(kind)


def passes(kind: str) -> int:
    """Forward-backward passes per step (NSO's defaults: K=1, two-point, lam 0)."""
    return 1 if kind == "adamw" else 2


GAMMA = 0.7  # the StepLR's decay per optimizer step


def build(kind="nso", radius=0.05, eps=1e-8, scheduler=True, batchnorm=True, manual=None,
          manual_clip=None, **kw):
    """The LightningModule: ``make_optimizer(kind, ...)``, with a StepLR that multiplies the LR
    by ``GAMMA`` at every optimizer step (``scheduler``); counts ``training_step`` calls.
    ``manual``: manual optimization, each step as ``opt.step(closure)`` ("closure"), NSO's
    three-call API ("three_call") or SAM's two-call API ("two_call"), on ``self.optimizers()``,
    with ``self.clip_gradients(opt, manual_clip, "norm")`` before ``opt.step`` if given."""
    import lightning as L

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            norm = torch.nn.BatchNorm1d(HIDDEN) if batchnorm else torch.nn.Identity()
            self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), norm,
                                           torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
            self.calls = 0
            self.automatic_optimization = manual is None

        def loss(self, batch):
            self.calls += 1
            x, y = batch
            return F.mse_loss(self.net(x).float(), y)

        def training_step(self, batch, batch_idx):
            if manual is None:
                return self.loss(batch)
            opt = self.optimizers()
            if manual_clip is not None:  # the norm of the coming step's update direction
                self.clip_gradients(opt, gradient_clip_val=manual_clip,
                                    gradient_clip_algorithm="norm")
            if manual == "closure":
                def closure():
                    loss = self.loss(batch)
                    self.manual_backward(loss)
                    return loss
                return opt.step(closure)
            if manual == "three_call":  # the NSO reference's loop (K=1, two-point, lam 0)
                self.manual_backward(self.loss(batch))
                opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
                for store_perturb in (True, False):
                    opt.first_step(zero_grad=True, store_perturb=store_perturb)
                    self.manual_backward(self.loss(batch))
                    opt.store_gradients(zero_grad=True, update_weight=0.5)
            elif manual == "two_call":  # the SAM reference's loop
                opt.zero_grad()
                self.manual_backward(self.loss(batch))
                opt.first_step(zero_grad=True)
                self.manual_backward(self.loss(batch))
            else:
                raise ValueError(manual)
            opt.step()  # closes the step (under a GradScaler: unscales and checks it)

        def configure_optimizers(self):
            optimizer = make_optimizer(kind, self, radius, eps, **kw)
            if not scheduler:
                return optimizer
            decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": decay, "interval": "step"}}

        def train_dataloader(self):
            return data()

    return Regression()


# ---------------------------------------------------------------------------- DDP under torchrun

def ddp_run(out: str, spec: str) -> None:
    import lightning as L
    import torch.distributed as dist

    from flatfused.integrations.lightning import FlatOptimizerCallback
    from open_clip_runner import counting_syncs

    kind, accumulate = spec.split(":")
    counts = {"syncs": 0, "buckets": 0, "forwards": 0}
    module = build(kind, batchnorm=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
                        accumulate_grad_batches=int(accumulate), gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[FlatOptimizerCallback()])
    with counting_syncs(counts):
        trainer.fit(module)
    weights = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    optimizer = trainer.optimizers[0]
    counts.update(
        replicas_equal=all(torch.equal(gathered[0], w) for w in gathered),
        finite=bool(torch.isfinite(weights).all()), calls=module.calls,
        steps=sorted({int(s["step"]) for s in optimizer.state_dict()["state"].values()}),
        model_is_ddp=isinstance(optimizer.model, torch.nn.parallel.DistributedDataParallel))
    with open(f"{out}.{spec.replace(':', '_')}.{dist.get_rank()}", "w") as f:
        json.dump(counts, f)


if __name__ == "__main__":
    quiet()
    for spec in sys.argv[2:]:
        ddp_run(sys.argv[1], spec)
    from flatfused.distributed import exit_without_teardown

    exit_without_teardown()  # done (a failure raised above)
