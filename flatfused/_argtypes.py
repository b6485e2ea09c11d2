"""argparse ``type=`` converters and argument checks shared by the ``flatfused`` commands."""
from __future__ import annotations

import argparse
import math
import os

import torch


class Parser(argparse.ArgumentParser):
    """The commands' parser: an error is one line on stderr and exit status 2. argparse's own
    prints the whole usage block first, which buries the one line that says what is wrong."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


# The largest seed plus one: torch's generators take 64-bit seeds, and the demo offsets its own.
SEED_LIMIT = 2 ** 63


def seed(text: str) -> int:
    """``--seed``-like options: an integer in [0, 2**63), which every generator seeded from it
    takes (a larger one failed inside the first ``manual_seed``, after the setup)."""
    value = _number(int, text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def output_problem(path, directory: bool = False, files=()) -> str | None:
    """Why ``path`` cannot be written, or None when it can: a file (or, with ``directory``, a
    directory and the ``files`` named inside it) that exists and is writable, or whose nearest
    existing ancestor is a writable directory that it can be created in. Nothing is created, so
    a command can check its outputs before it measures anything and create them afterwards."""
    path = os.fspath(path)
    if not directory and path.endswith(os.sep):  # pathlib would drop the slash, open() fails
        return "a trailing / names a directory"
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if not directory:
            return "it is a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return "it is not writable"
        for name in files:
            problem = output_problem(os.path.join(path, name))
            if problem:
                return f"{name} in it: {problem}"
        return None
    if os.path.lexists(path):
        if directory:
            return "it exists and is not a directory"
        return None if os.access(path, os.W_OK) else "it is not writable"
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor):  # lexists: a dangling link is not a way through
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def output_path(directory: bool = False, files=()):
    """A converter for an output option (a file, or with ``directory`` a directory holding
    ``files``): refused at parsing time when :func:`output_problem` finds it unwritable."""
    def parse(text):
        problem = output_problem(text, directory, files)
        if problem:
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {problem}")
        return text
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


def _items_problem(items: list[str], text: str, allowed) -> str | None:
    """What is wrong with a list option's ``items``: none at all, one not in ``allowed`` (when
    given), or one given twice (a slip that would measure nothing, or the same thing twice)."""
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            return f"unknown {bad}; choose from {sorted(allowed)}"
    if not items:
        choices = f"one of {sorted(allowed)}" if allowed is not None else "one value"
        return f"give at least {choices}, got {text!r}"
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        return f"{repeated} given more than once in {text!r}"
    return None


def comma_list(text: str | None, allowed=None, flag: str | None = None) -> list[str] | None:
    """Comma-separated items (None for None). With ``flag``, the option's name: the checks of
    :func:`_items_problem`, an error being a SystemExit naming ``flag``."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if flag is None:
        return items
    problem = _items_problem(items, text, allowed)
    if problem:
        raise SystemExit(f"{flag}: {problem}")
    return items


def choices_list(allowed):
    """An argparse ``type=`` for a comma-separated subset of ``allowed`` (case-insensitive),
    with :func:`_items_problem`'s checks."""
    def parse(text):
        items = [t.strip().lower() for t in text.split(",") if t.strip()]
        problem = _items_problem(items, text, allowed)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return items
    return parse
