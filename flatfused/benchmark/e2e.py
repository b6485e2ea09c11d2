"""Whole training steps (forward and backward included) of a ResNet-18-sized CNN and a small ViT,
where NSO's skipped clean pass shows."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

import flatfused
from flatfused import baselines, reference

from .floor import sync_for
from .measure import minor_faults
from .peers import PEERS, build_peer, unavailable_reason
from .progress import Progress
from .spec import BASES, HYPER, has_wsam


class SmallViT(torch.nn.Module):
    """A small vision transformer: ViT-Tiny's width (192, 3 heads, 6 blocks; 2.7M parameters)
    on 32x32 images cut into 8x8 patches (16 tokens and a class token)."""

    def __init__(self, image=32, patch=8, dim=192, depth=6, heads=3, classes=10):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = torch.nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                                 activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class _BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.short = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                             torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


class _ResNet18(torch.nn.Module):
    """ResNet-18's layout (11M parameters) for when torchvision is missing."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                                        torch.nn.BatchNorm2d(64), torch.nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = torch.nn.Sequential(*blocks)
        self.head = torch.nn.Linear(512, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _resnet18() -> torch.nn.Module:
    try:
        import torchvision
    except ImportError:
        return _ResNet18()
    return torchvision.models.resnet18(num_classes=10)


# End-to-end models: name -> factory of a module taking (batch, 3, 32, 32) images, 10 classes.
MODELS: dict[str, Callable[[], torch.nn.Module]] = {"resnet18": _resnet18, "vit": SmallViT}


def make_model(name: str) -> torch.nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]()


E2E_CONTENDERS = ["adamw", "adamw foreach", "nso reference", "nso baseline", "nso flatfused",
                  "sam reference", "sam baseline", "sam flatfused", "sam pytorch_optimizer.SAM",
                  "sam pytorch_optimizer.GSAM", "sam pytorch_optimizer.LookSAM",
                  "wsam reference", "wsam baseline", "wsam flatfused",
                  "wsam pytorch_optimizer.WSAM"]
# The cheap schedules (flatfused.optim.schedules) of NSO and SAM: "<name> flatfused <variant>".
CHEAP_E2E = {"every5": dict(every=5), "every5+reuse": dict(every=5, reuse=0.7)}
CHEAP_E2E_CONTENDERS = [f"{name} flatfused {variant}" for name in ("nso", "sam")
                        for variant in CHEAP_E2E]
E2E_CONTENDERS += CHEAP_E2E_CONTENDERS
# The default run's: flatfused's three against AdamW (fused and foreach), with the peers that
# compute the same update (the others, and the references, are in the full suite's).
HEADLINE_E2E_CONTENDERS = ["adamw", "adamw foreach", "nso flatfused", "sam flatfused",
                           "sam pytorch_optimizer.SAM", "wsam flatfused",
                           "wsam pytorch_optimizer.WSAM"]


def _peer_of(contender: str) -> tuple[str, str] | None:
    """(peer, optimizer configuration) of an end-to-end contender run by a peer, else None."""
    name, _, impl = contender.partition(" ")
    if name == "adamw" and impl == "foreach":
        return "torch.foreach", "base"
    return (impl, name) if impl in PEERS else None


def e2e_unavailable_reason(contender: str, device) -> str | None:
    peer = _peer_of(contender)
    if peer is not None:
        return unavailable_reason(peer[0], peer[1], torch.device(device))
    if contender == "wsam flatfused" and not has_wsam():
        return "flatfused has no WeightedSAM here"
    return None


def passes_e2e(contender: str) -> float:
    """Forward-backward passes of an end-to-end step (AdamW 1; NSO's reference trainer 3; a
    cheap schedule's average over its cycle: every 5 steps one full step, 2 passes, 3 for NSO
    with reuse, and four 1-pass steps)."""
    name, _, impl = contender.partition(" ")
    if name == "adamw":
        return 1
    impl, _, variant = impl.partition(" ")
    if variant:
        every = CHEAP_E2E[variant]["every"]
        full = 3 if name == "nso" and "reuse" in CHEAP_E2E[variant] else 2
        return (full + every - 1) / every
    return 3 if (name, impl) == ("nso", "reference") else 2


def e2e_step(contender: str, model: torch.nn.Module, batch, backend: str):
    """(optimizer, one training step) for an end-to-end contender, AdamW as the base. A cheap
    schedule's "step" is its whole cycle (one full step and the cheap ones), with ``.steps``
    the number of optimizer steps in it."""
    x, y = batch
    kw = dict(BASES["adamw"][1])
    loss_fn = torch.nn.functional.cross_entropy

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    name, _, impl = contender.partition(" ")
    impl, _, variant = impl.partition(" ")
    schedule = CHEAP_E2E[variant] if variant else {}
    peer = _peer_of(contender)
    if peer is not None:
        return build_peer(peer[0], peer[1], "adamw", list(model.parameters()), model, closure)
    if name == "adamw":
        try:
            opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
        except RuntimeError:
            opt = torch.optim.AdamW(model.parameters(), foreach=True, **kw)

        def step():
            opt.zero_grad()
            closure()
            opt.step()
        return opt, step
    if name == "nso":
        nso = dict(num_perturbs=1, lam=0.0, use_neg=True)
        if impl == "reference":
            opt = reference.NSM(model.parameters(), torch.optim.AdamW, sigma=HYPER["sigma"], **kw)
            return opt, lambda: reference.train_step(model, opt, lambda m, b: loss_fn(m(b[0]), b[1]),
                                                     batch, **nso)
        if impl == "baseline":
            opt = baselines.NSO(model, torch.optim.AdamW, sigma=HYPER["sigma"], **nso, **kw)
        else:
            opt = flatfused.NSO(model, torch.optim.AdamW, sigma=HYPER["sigma"], backend=backend,
                                **nso, **schedule, **kw)
        return opt, _cycle(lambda: opt.step(closure), schedule)
    if name == "sam":
        if impl == "reference":
            opt = reference.SAM(model.parameters(), torch.optim.AdamW, rho=HYPER["rho"], **kw)
            return opt, lambda: reference.sam_train_step(
                model, opt, lambda m, b: loss_fn(m(b[0]), b[1]), batch)
        if impl == "baseline":
            opt = baselines.SAM(model, torch.optim.AdamW, rho=HYPER["rho"], **kw)
        else:
            opt = flatfused.SAM(model, torch.optim.AdamW, rho=HYPER["rho"], backend=backend,
                                **schedule, **kw)

        def step():
            opt.zero_grad()
            closure()
            opt.step(closure)
        return opt, _cycle(step, schedule)
    if name != "wsam":
        raise ValueError(f"unknown end-to-end contender {contender!r}; choose from "
                         f"{E2E_CONTENDERS}")
    wkw = dict(rho=HYPER["rho"], gamma=HYPER["gamma"])
    if impl == "reference":
        opt = reference.WeightedSAM(model, torch.optim.AdamW(model.parameters(), **kw), **wkw)
    elif impl == "baseline":
        opt = baselines.WeightedSAM(model, torch.optim.AdamW, **wkw, **kw)
    else:
        opt = flatfused.WeightedSAM(model, torch.optim.AdamW(model.parameters(), **kw),
                                    backend=backend, **wkw)

    def step():
        opt.zero_grad()
        opt.step(closure)
    return opt, step


def _cycle(step, schedule: dict):
    """``step``, or for a cheap schedule its whole cycle of ``every`` steps (``.steps``)."""
    every = schedule.get("every", 1)
    if every == 1:
        return step

    def cycle():
        for _ in range(every):
            step()
    cycle.steps = every
    return cycle


# Rounds of end-to-end steps: enough for a median of per-round ratios (see e2e_ratios) on a
# shared machine.
E2E_REPEATS = 10

# Milliseconds per sample of one forward-backward pass on a quiet 2-core CPU, and of building a
# model: only their proportions matter to the progress line (see Progress).
_PASS_MS_PER_SAMPLE = {"resnet18": 1.3, "vit": 1.0}
_BUILD_S = 0.3


def e2e_estimates(models: list[str], batch_size: int, repeats: int, contenders: list[str]
                  ) -> list[tuple[str, float, str]]:
    """The progress line's items for :func:`run_e2e` (kind ``e2e``, see Progress): per model a
    warm-up, then each round."""
    items = []
    for name in models:
        ms = _PASS_MS_PER_SAMPLE.get(name, 1.0) * batch_size
        round_s = sum(passes_e2e(c) for c in contenders) * ms / 1e3
        items.append((f"{name} batch {batch_size} warm-up",
                      round_s + _BUILD_S * len(contenders), "e2e"))
        items += [(f"{name} batch {batch_size} round {i + 1}/{repeats}", round_s, "e2e")
                  for i in range(repeats)]
    return items


def run_e2e(models: list[str], device="cpu", batch_size: int = 128, repeats: int = E2E_REPEATS,
            backend: str = "auto", progress: bool = True, contenders=None,
            rows: list | None = None, on_update: Callable[[], None] | None = None,
            bar: Progress | None = None, unavailable: list | None = None) -> list[dict]:
    """Whole training steps; rows are appended to ``rows`` as they come (see :func:`run_suite`).
    A contender that cannot run here goes to ``unavailable`` (model, batch, contender, reason)
    instead. ``bar``: a progress line planned with :func:`e2e_estimates`, else one of its own."""
    device = torch.device(device)
    sync = sync_for(device)
    wanted = list(contenders or E2E_CONTENDERS)
    skipped = {c: e2e_unavailable_reason(c, device) for c in wanted}
    contenders = [c for c in wanted if skipped[c] is None]
    own_bar = bar is None
    bar = Progress(e2e_estimates(models, batch_size, repeats, contenders), progress) \
        if own_bar else bar
    rows = [] if rows is None else rows
    try:
        for name in models:
            if unavailable is not None:
                unavailable += [dict(model=name, batch=batch_size, contender=c, reason=r)
                                for c, r in skipped.items() if r is not None]
            bar.begin()
            torch.manual_seed(0)
            initial = make_model(name).to(device)
            state = {k: v.clone() for k, v in initial.state_dict().items()}
            g = torch.Generator().manual_seed(0)
            batch = (torch.randn(batch_size, 3, 32, 32, generator=g).to(device),
                     torch.randint(0, 10, (batch_size,), generator=g).to(device))
            numel = sum(p.numel() for p in initial.parameters())
            # Built and warmed up one by one, then timed round-robin (see measure_group).
            built = []
            for contender in contenders:
                model = make_model(name).to(device)
                model.load_state_dict(state)
                model.train()
                opt, step = e2e_step(contender, model, batch, backend)
                step()  # warm-up: lazy state
                built.append((contender, step, [], []))
            for _ in range(repeats):
                bar.begin()
                for contender, step, times, faults in built:
                    sync()
                    f0, t0 = minor_faults(), time.perf_counter()
                    step()
                    sync()
                    # per optimizer step (a cheap schedule's cycle holds several)
                    times.append((time.perf_counter() - t0) / getattr(step, "steps", 1))
                    if f0 is not None:
                        faults.append(minor_faults() - f0)
            bar.end()
            for contender, step, times, faults in built:
                rows.append(dict(model=name, params=numel, batch=batch_size, contender=contender,
                                 passes=passes_e2e(contender),
                                 ms_per_step=1e3 * statistics.median(times),
                                 ms_min=1e3 * min(times), ms_max=1e3 * max(times),
                                 repeats=repeats, ms_per_round=[1e3 * t for t in times],
                                 page_faults_per_step=(statistics.median(faults) if faults
                                                       else None)))
            e2e_ratios(rows)
            built = opt = step = model = None  # the models and optimizers go before the next
            gc.collect()
            if on_update is not None:
                on_update()
    finally:
        if own_bar:
            bar.close()
    return rows


def e2e_ratios(rows: list[dict]) -> None:
    """Ratios to the AdamW step of the same model: of the medians; of the fastest steps; and
    paired, the median over rounds of the ratio of the two steps timed in the same round.

    The contenders are timed round-robin, so a change in the host's load between rounds (the
    usual disturbance on a shared machine) slows both steps of a round: the paired ratio
    cancels it, where a ratio of medians can pair one contender's quiet steps with the other's
    busy ones."""
    base = {(r["model"], r.get("batch")): r for r in rows if r["contender"] == "adamw"}
    for r in rows:
        b = base.get((r["model"], r.get("batch")))
        r["ratio_vs_adamw"] = r["ms_per_step"] / b["ms_per_step"] if b else None
        r["ratio_vs_adamw_min"] = r["ms_min"] / b["ms_min"] if b else None
        rounds = list(zip(r.get("ms_per_round") or (), (b or {}).get("ms_per_round") or ()))
        r["ratio_vs_adamw_paired"] = (statistics.median(t / t_base for t, t_base in rounds)
                                      if rounds else None)
