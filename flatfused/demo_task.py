"""The task, the training loop and the measurements of ``flatfused demo``: a noisy-label
classification problem generated in code, one run of one optimizer on it, and what the table
reports about the trained model."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .demo_variants import VARIANTS, build, plan
from .sharpness import hessian_trace, keskar_sharpness, noise_stability, top_eigenvalues


def make_task(n_train: int, n_test: int, dim: int, classes: int, seed: int):
    """Inputs and clean labels of the train and test splits, the same for every run seed.

    Each class has ``MODES`` prototypes in an 8-dimensional latent space; a point is a prototype
    plus Gaussian jitter, mapped into ``R^dim`` by a fixed random one-hidden-layer tanh network
    (so the classes lie on a curved manifold, not in linearly separable blobs), plus a little
    isotropic noise. Inputs are standardised with the training split's statistics.
    """
    latent, modes, hidden = 8, 4, 128
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, modes, latent, generator=g) * 1.5
    w1 = torch.randn(latent, hidden, generator=g) / math.sqrt(latent)
    w2 = torch.randn(hidden, dim, generator=g) / math.sqrt(hidden)

    def sample(n):
        y = torch.randint(classes, (n,), generator=g)
        mode = torch.randint(modes, (n,), generator=g)
        z = prototypes[y, mode] + 0.6 * torch.randn(n, latent, generator=g)
        x = torch.tanh(z @ w1) @ w2 + 0.3 * torch.randn(n, dim, generator=g)
        return x, y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def corrupt_labels(y: torch.Tensor, rate: float, classes: int, seed: int):
    """Replace a ``rate`` fraction of labels (exactly ``round(rate * n)``) by a uniformly drawn
    *other* class; returns the noisy labels and the mask of corrupted positions."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n = y.numel()
    flip = torch.zeros(n, dtype=torch.bool)
    flip[torch.randperm(n, generator=g)[:round(rate * n)]] = True
    shift = torch.randint(1, classes, (n,), generator=g)
    return torch.where(flip, (y + shift) % classes, y), flip


def make_model(dim: int, width: int, classes: int, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, classes))


# ---------------------------------------------------------------------------------- training

class Counter:
    """Forward-backward passes and per-example gradients, the unit of matched compute."""

    def __init__(self):
        self.passes = 0
        self.examples = 0

    def loss_backward(self, model, x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        self.passes += 1
        self.examples += y.numel()
        return loss


def batch_order(n: int, batch: int, steps: int, seed: int):
    """Index batches for ``steps`` steps: epochs of a seeded permutation, the last partial batch
    of an epoch dropped only if it would be empty. Shared by every optimizer of a seed, so they
    see the same examples in the same order (those with more steps go on further)."""
    g = torch.Generator().manual_seed(20_000 + seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i:i + batch] for i in range(0, n, batch))
    return out[:steps]


def train(cfg, name: str, seed: int, data, device, progress) -> tuple[torch.nn.Module, Counter]:
    x, y_noisy = data
    variant = VARIANTS[name]
    model = make_model(cfg.dim, cfg.width, cfg.classes, seed).to(device)
    steps, batch = plan(variant, cfg)
    opt = build(variant, cfg, model, steps, seed)
    count = Counter()
    model.train()
    for t, idx in enumerate(batch_order(x.shape[0], batch, steps, seed)):
        # One schedule family for all: cosine from lr to 0 over the optimizer's own steps, so
        # an optimizer that takes more (cheaper) steps anneals over all of them.
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        xb, yb = x[idx], y_noisy[idx]

        def closure():
            opt.zero_grad()
            return count.loss_backward(model, xb, yb)

        if variant.family == "sgd":
            opt.zero_grad()
            count.loss_backward(model, xb, yb)
            opt.step()
        elif variant.family == "sam":
            # The reference form: SAM's step needs the first pass's gradient in .grad (on a
            # cheap step that pass is all, and the closure is not called).
            opt.zero_grad()
            count.loss_backward(model, xb, yb)
            opt.step(closure)
        else:
            opt.step(closure)
        progress.update(1)
    return model, count


# ---------------------------------------------------------------------------------- measuring

def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def measure(cfg, model, seed, train_data, test_data, flipped) -> dict:
    """Everything the table reports, for one trained model (left as it was found)."""
    model.eval()
    x_train, y_noisy = train_data
    x_test, y_test = test_data
    # The flatness measures use one fixed batch: the first measure_size training examples,
    # with their (noisy) training labels -- the loss the optimizers minimised.
    mx, my = x_train[:cfg.measure_size], y_noisy[:cfg.measure_size]
    crit = F.cross_entropy
    with torch.no_grad():
        logits = model(x_train)
        train_loss = float(crit(logits, y_noisy))
        fit = logits.argmax(1) == y_noisy
    out = dict(
        test_acc=accuracy(model, x_test, y_test),
        memorised=100.0 * float(fit[flipped].float().mean()) if bool(flipped.any()) else 0.0,
        train_loss=train_loss,
        hessian_trace=hessian_trace(model, crit, (mx, my), num_probes=cfg.trace_probes,
                                    method="hutch++", seed=seed),
        top_eigenvalue=top_eigenvalues(model, crit, (mx, my), k=1, method="power",
                                       iters=cfg.eig_iters, seed=seed)[0],
        keskar=keskar_sharpness(model, crit, [(mx, my)], epsilon=cfg.keskar_eps,
                                steps=cfg.keskar_steps, lr=cfg.keskar_lr),
        noise_stability=noise_stability(model, crit, (mx, my), sigma=cfg.ns_sigma,
                                        num_samples=cfg.ns_samples, seed=seed).mean,
    )
    return out
