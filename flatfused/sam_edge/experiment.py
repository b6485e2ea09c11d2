"""The original's training loop (its ``sam_edge.train``): gradient descent or SAM, with a check of
the Hessian and the edges every so often, one row of raw data per check, and the figures.

A step trains on the next batch: with ``rho == 0`` plain gradient descent ``w -= η ∇L(w)``;
with ``rho > 0`` SAM as the original runs it, ``w -= η ∇L(w + ρ g/‖g‖)``, ``g = ∇L(w)`` on the
same batch (:class:`flatfused.SAM` over SGD without momentum). Before the step, when a check is
due, :class:`flatfused.sharpness.SAMEdgeTracker` measures on that batch at the current weights,
as the original: the top eigenvalue(s) of the Hessian by power (or orthogonal) iteration on
finite-difference Hessian-vector products (step 1e-3, relative tolerance 1e-3, at most 100
iterations: the original's constants), the gradient norm, the SAM edge, the loss and the alignments
of the gradient and of the SAM gradient with the top eigenvector.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

import flatfused
from flatfused.sharpness import SAMEdgeTracker

from . import plots

# The original's measurement constants (hessian_norm.py): finite-difference step, relative
# tolerance and iteration cap of the power iteration.
FD_EPS = 1e-3
TOLERANCE = 1e-3
MAX_ITERATIONS = 100

# The raw data's first eight columns are the original's, in its order (so a script written for its
# raw.txt reads these files); the rest are added here.
SEED_COLUMNS = ("training_time", "hessian_norm", "two_over_eta", "sam_edge", "grad_norm", "loss",
                "grad_alignment", "sam_grad_alignment")


def columns(k: int) -> Tuple[str, ...]:
    return SEED_COLUMNS + ("step",) + tuple(f"eigenvalue_{i}" for i in range(1, k + 1)) + (
        "hvps", "check_seconds")


@dataclass
class Task:
    """What a command trains: the model, its loss, an endless stream of (inputs, targets)
    batches on the model's device, and the test measurement run at the end."""
    name: str
    model: torch.nn.Module
    loss_fn: Callable
    batches: Iterator
    evaluate: Callable[[], Tuple[str, float]]  # -> (name, value), e.g. ("test_error", 0.04)
    data: str  # what the data are, for the output
    batch_size: int


@dataclass
class Schedule:
    step_size: float
    rho: float
    time_limit_s: float
    check_gap_s: Optional[float]  # a check when this much time passed since the last one...
    check_every: Optional[int]  # ...or every this many steps (exactly one of the two is set)
    num_steps: Optional[int]  # stop after this many steps (None: only the time limit)
    num_principal_components: int
    seed: int


@dataclass
class Result:
    rows: List[Dict[str, float]] = field(default_factory=list)
    steps: int = 0
    stopped: str = ""
    wall_seconds: float = 0.0
    test: Tuple[str, float] = ("", math.nan)
    figures: List[str] = field(default_factory=list)
    optimizer: str = ""
    measurement: dict = field(default_factory=dict)


class RawData:
    """The raw data file: a ``#`` header line with the column names, then one line per check,
    space-separated, written as each check ends (a stopped run keeps its rows). NaN is
    ``nan``; ``numpy.loadtxt`` reads the file as it is."""

    def __init__(self, path: Optional[str], names):
        self.names = names
        self.file = open(path, "w", encoding="utf-8") if path else None
        if self.file:
            self.file.write("# " + " ".join(names) + "\n")
            self.file.flush()

    def write(self, row):
        if self.file:
            self.file.write(" ".join(repr(row[n]) for n in self.names) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def _clock(device: torch.device) -> Callable[[], float]:
    """Seconds since now; on a GPU after the queued work has finished, so times are real."""
    start = time.perf_counter()

    def elapsed():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return elapsed


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


@contextlib.contextmanager
def _exact_float32(device: torch.device):
    """Finite-difference products divide gradient differences by 2e-3: TF32 convolutions
    (cuDNN's default) would put their rounding, amplified, into every eigenvalue."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run(task: Task, schedule: Schedule, device: torch.device, outputs: Dict[str, str],
        log: Callable[[str], None] = print) -> Result:
    """Trains ``task.model`` until the time limit, ``num_steps`` or a non-finite loss; writes
    the raw data as it goes and the figures at the end. ``outputs``: paths by key ("raw",
    "eigenvalues", "eigenvalues_se_only", "alignments", "loss"), empty or absent to skip."""
    model, loss_fn, k = task.model, task.loss_fn, schedule.num_principal_components
    eta, rho = schedule.step_size, schedule.rho
    if rho > 0:
        optimizer = flatfused.SAM(model, torch.optim.SGD, rho=rho, lr=eta)
        described = f"SAM (rho {rho}) with gradient-descent steps of size {eta}"
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=eta)
        described = f"gradient descent with step size {eta} (rho = 0)"
    tracker = SAMEdgeTracker(model, loss_fn, optimizer, every=1, iters=MAX_ITERATIONS,
                             tol=TOLERANCE, hvp_method="finite_difference", fd_eps=FD_EPS,
                             top_n=k, seed=schedule.seed)
    result = Result(optimizer=described, measurement={
        "eigenvalues": "power iteration" if k == 1 else
                       f"orthogonal iteration with a Rayleigh-Ritz step, top {k}",
        "hessian_vector_products": f"central finite differences of gradients, step {FD_EPS}",
        "relative_tolerance": TOLERANCE, "max_iterations": MAX_ITERATIONS,
        "warm_start": "from the previous check's eigenvector(s)", "seed": schedule.seed,
        "batch": "the batch the step trains on, at the weights before the step"})
    names = columns(k)
    raw = RawData(outputs.get("raw"), names)
    if schedule.check_every is not None:
        cadence = f"every {schedule.check_every} steps"
    else:
        cadence = f"every {schedule.check_gap_s / 3600:g} hours ({schedule.check_gap_s:g} s)"
    limits = f"time limit {_duration(schedule.time_limit_s)}" + (
        f", at most {schedule.num_steps} steps" if schedule.num_steps is not None else "")
    log(f"training: {described}; batch size {task.batch_size}; {limits}; Hessian checks {cadence}")

    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    elapsed = _clock(device)
    last_check = None
    with _exact_float32(device):
        try:
            while True:
                now = elapsed()
                if schedule.num_steps is not None and result.steps >= schedule.num_steps:
                    result.stopped = f"reached --num_steps {schedule.num_steps}"
                    break
                if now >= schedule.time_limit_s:
                    result.stopped = "reached the time limit"
                    break
                x, y = next(task.batches)
                if (schedule.check_every is not None and result.steps % schedule.check_every == 0
                        or schedule.check_every is None
                        and (last_check is None or now - last_check >= schedule.check_gap_s)):
                    row = _check(tracker, x, y, result.steps, now, rho, k)
                    result.rows.append(row)
                    raw.write(row)
                    log(_progress(row, now, schedule, result.steps))
                    last_check = elapsed()
                    if not math.isfinite(row["loss"]):
                        result.stopped = "the loss is not finite (diverged)"
                        break
                optimizer.zero_grad(set_to_none=True)
                if rho > 0:
                    loss = optimizer.step(closure)
                else:
                    loss = closure()
                    optimizer.step()
                result.steps += 1
                if not math.isfinite(float(loss.detach())):
                    result.stopped = "the loss is not finite (diverged)"
                    break
        except KeyboardInterrupt:
            result.stopped = "interrupted"
            log("interrupted: writing what was measured")
        finally:
            raw.close()
        result.wall_seconds = elapsed()
        model.eval()
        with torch.no_grad():
            result.test = task.evaluate()
    if result.rows:
        title = f"{task.name}, rho = {rho:g}, eta = {eta:g}"
        figures = {key: outputs.get(key) for key in
                   ("eigenvalues", "eigenvalues_se_only", "alignments", "loss")}
        result.figures = plots.write(result.rows, k, title, figures)
    return result


def _check(tracker: SAMEdgeTracker, x, y, step: int, now: float, rho: float, k: int) -> dict:
    r = tracker.measure((x, y), step=step)
    eigenvalues = [r["top_eigenvalue"]] + [r[f"eigenvalue_{i}"] for i in range(2, k + 1)]
    row = {
        "training_time": now,
        "hessian_norm": abs(r["top_eigenvalue"]),
        "two_over_eta": r["two_over_lr"],
        "sam_edge": r["sam_edge"],
        "grad_norm": r["grad_norm"],
        "loss": r["loss"],
        "grad_alignment": r["grad_alignment"],
        # At rho = 0 the SAM gradient is the gradient (the original logs the same value twice).
        "sam_grad_alignment": r["sam_grad_alignment"] if rho > 0 else r["grad_alignment"],
        "step": step,
    }
    row.update({f"eigenvalue_{i + 1}": float(v) for i, v in enumerate(eigenvalues)})
    row.update(hvps=r["hvps"], check_seconds=r["seconds"])
    return row


def _progress(row: dict, now: float, schedule: Schedule, step: int) -> str:
    left = f"{_duration(schedule.time_limit_s - now)} left"
    if schedule.num_steps is not None:
        left += f" or {schedule.num_steps - step} steps"
    return (f"step {step}: loss {row['loss']:.5g}, |H| {row['hessian_norm']:.4g} "
            f"vs SAM edge {row['sam_edge']:.4g} (2/eta {row['two_over_eta']:.4g}), "
            f"|g| {row['grad_norm']:.4g}, alignment g {row['grad_alignment']:.3f} "
            f"SAM g {row['sam_grad_alignment']:.3f} [{_duration(now)} elapsed, {left}]")
