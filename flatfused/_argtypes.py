"""argparse ``type=`` converters and argument checks shared by the ``flatfused`` commands."""
from __future__ import annotations

import argparse
import math

import torch


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive(kind=float):
    """A converter to ``kind`` (int or float) that refuses values <= 0 (and non-finite floats)."""
    def parse(text):
        value = _number(kind, text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def nonnegative(kind=float):
    """A converter to ``kind`` (int or float) that refuses values < 0 (and non-finite floats)."""
    def parse(text):
        value = _number(kind, text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def runnable_device(text: str) -> torch.device:
    """``--device``: cpu, or a CUDA device that is there (SystemExit naming the flag otherwise)."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise SystemExit(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: no CUDA device is available here "
                         "(torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {text}: the benchmark runs on cpu or cuda")
    return device


def comma_list(text: str | None, allowed=None, flag: str | None = None) -> list[str] | None:
    """Comma-separated items (None for None). With ``flag``, the option's name: no item at all,
    an item given twice, or one not in ``allowed`` (when given) is an error (SystemExit naming
    ``flag``), so a slip cannot silently measure nothing or the same thing twice."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if flag is None:
        return items
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SystemExit(f"{flag}: unknown {bad}; choose from {sorted(allowed)}")
    if not items:
        choices = f"one of {sorted(allowed)}" if allowed is not None else "one value"
        raise SystemExit(f"{flag}: give at least {choices}, got {text!r}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise SystemExit(f"{flag}: {repeated} given more than once in {text!r}")
    return items
