"""What the benchmark measures: the optimizer configurations and their rivals, the headline run,
and the byte model (the bytes an exact single-pass-per-operation schedule must move;
docs/benchmarks.md)."""
from __future__ import annotations

import torch

import flatfused


SCHEMA_VERSION = 3

# One entry per optimizer configuration, each a row group of every table. ``kind`` picks how the
# contenders are built (contenders.py); ``options`` are further keyword arguments of flatfused's
# optimizer (a cheap schedule, say), which only contenders that take them run (the others are
# listed as unavailable); ``peers`` are the other libraries' versions timed beside it
# (peers.py); ``headline`` puts it in the default run. ``base`` is the base optimizer's plain
# step alone (one pass), the cost every flat-minima step builds on.
OPTIMIZERS: dict[str, dict] = {
    "nso": dict(kind="nso", K=1, use_neg=True, lam=0.0, headline=True),
    "nso-k2": dict(kind="nso", K=2, use_neg=True, lam=0.0),
    "sam": dict(kind="sam", adaptive=False, headline=True,
                peers=["pytorch_optimizer.SAM", "pytorch_optimizer.GSAM",
                       "pytorch_optimizer.LookSAM"]),
    "asam": dict(kind="sam", adaptive=True,
                 peers=["pytorch_optimizer.SAM", "pytorch_optimizer.GSAM"]),
    "wsam": dict(kind="wsam", adaptive=False, headline=True, peers=["pytorch_optimizer.WSAM"]),
    "base": dict(kind="base", headline=True, peers=["torch.fused", "torch.foreach"]),
}
BASES: dict[str, tuple[type, dict]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
HYPER = dict(sigma=0.01, rho=0.05, gamma=0.9)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SIZES = {"cpu": ["1M", "4M", "16M", "64M"], "cuda": ["1M", "4M", "16M", "64M", "256M", "1G"]}
# The torch backend is the RNG specification in int64 tensor ops, not a contender for speed
# (seconds per NSO step at 1M, minutes at 16M): by default NSO on it is not timed, and SAM/WSAM
# (no RNG) only up to this size. ``--backends ...,torch`` times it everywhere.
TORCH_BACKEND_MAX_NUMEL = 1 << 20

# ``flatfused bench`` without --full: each headline optimizer over SGD momentum at one size in
# fp32 (the size the speed targets are set at), then one end-to-end model step against AdamW;
# fewer timed steps than the full suite's, and no peak memory, to answer in minutes.
HEADLINE = dict(sizes={"cpu": ["16M"], "cuda": ["64M"]}, dtype="float32", base="sgd",
                optimizers=[name for name, spec in OPTIMIZERS.items() if spec.get("headline")],
                models=["resnet18"], batches=[32], repeats=3, e2e_repeats=5)


def has_wsam() -> bool:
    return hasattr(flatfused, "WeightedSAM")


# ---------------------------------------------------------------------------- the byte model


def budget_accesses(optimizer: str, base: str) -> int:
    """Element accesses (reads + writes) per parameter of one exact step with one pass per
    operation, forward/backward passes excluded. Bytes = accesses x element size; momentum and
    Adam moments have the parameter dtype (as torch.optim keeps them). The schedules:

    NSO (step(closure), lam = 0, K perturbations, two-point): zero .grad (W g: 1); the first
    perturbation saves w0 (R w, W w0, W w: 3); every further perturbation (R w0, W w: 2 each,
    2K - 1 of them); the fused restore + base update, which also leaves the update direction
    in .grad (R w0, R g, W w, W g + the base state). lam > 0 adds a rescale of g (R g, W g: 2).

    SAM/ASAM (clean gradient in .grad, step(closure)): zero .grad before the clean pass (1);
    the norm (R g, ASAM also R w: 1 or 2); the ascent saving w0 (R g, R w, W w0, W w: 4); zero
    .grad (1); the fused restore + base update (R w0, R g, W w + the base state).

    WSAM (decoupled, restore by copy, the base step after both passes so that a failing second
    pass changes nothing): zero .grad (1); the norm (1 or 2); the ascent saving w0 and the clean
    gradient and zeroing .grad (R g, R w, W w0, W g0, W w, W g: 6); after the perturbed pass the
    fused restore, base update with g0 and sharpness step (R w0, R g0, R g~, W w: 4 + the base
    state).

    The base step alone (the gradient handed over by the backward pass, as after
    ``zero_grad(set_to_none=True)``): R w, R g, W w + the base state.

    Base state per update: SGD momentum R/W m (2), AdamW R/W m and v (4).
    """
    spec = OPTIMIZERS[optimizer]
    if spec.get("options"):
        # A schedule option changes the traffic of some steps: its byte model belongs here.
        raise NotImplementedError(f"no byte model for {optimizer}'s options {spec['options']}")
    state = {"sgd": 2, "adamw": 4}[base]
    if spec["kind"] == "nso":
        perturbs = spec["K"] * (2 if spec["use_neg"] else 1)
        rescale = 2 if spec["lam"] > 0 else 0
        return 1 + 3 + 2 * (perturbs - 1) + rescale + (4 + state)
    if spec["kind"] == "sam":
        return 1 + (2 if spec["adaptive"] else 1) + 4 + 1 + (3 + state)
    if spec["kind"] == "wsam":
        return 1 + (2 if spec["adaptive"] else 1) + 6 + (4 + state)
    if spec["kind"] == "base":
        return 3 + state
    raise ValueError(optimizer)


def budget_bytes(optimizer: str, base: str, dtype: torch.dtype) -> int:
    return budget_accesses(optimizer, base) * torch.empty((), dtype=dtype).element_size()


def noise_draws(optimizer: str) -> int:
    """Normal draws per parameter and step that an exact schedule cannot avoid (the minus pass
    of the two-point estimate can reuse a stored draw)."""
    spec = OPTIMIZERS[optimizer]
    return spec["K"] if spec["kind"] == "nso" else 0


def passes(optimizer: str, contender: str) -> int:
    """Forward/backward passes per step for a contender."""
    spec = OPTIMIZERS[optimizer]
    if spec["kind"] == "base":
        return 1
    if spec["kind"] == "nso":
        perturbed = spec["K"] * (2 if spec["use_neg"] else 1)
        three_call = contender == "reference" or contender.endswith("3-call")
        # The reference trainer (and its API) always runs the clean pass, also for lam == 0.
        return perturbed + (1 if three_call or spec["lam"] > 0 else 0)
    # SAM, WSAM and every peer of theirs (pytorch_optimizer's LookSAM runs its closure on the
    # steps that reuse the sharpness direction too).
    return 2


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def format_count(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)
