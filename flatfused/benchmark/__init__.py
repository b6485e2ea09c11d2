"""``flatfused bench``: the optimizers against the reference and the best pure-PyTorch version.

One run on one machine measures, for every optimizer (NSO K=1 two-point lam=0, NSO K=2, SAM,
ASAM, WSAM) x base optimizer (SGD momentum, AdamW) x dtype x parameter count:

- the contenders: ``reference`` (flatfused.reference, the published code's behaviour and cost),
  ``baseline`` (flatfused.baselines, flat buffers and stock PyTorch ops), and flatfused on every
  available backend (``step(closure)``; for NSO also the reference's three-call API);
- optimizer work only: each backward pass is *simulated* by adding a fixed gradient into
  ``.grad`` (what autograd's accumulation does; a fresh copy when ``.grad`` is None, as after
  ``zero_grad(set_to_none=True)``), identical for every contender; its cost, measured in the same
  run, is subtracted per pass. The median of ``repeats`` steps after a warm-up step, taken
  round-robin across the contenders of a configuration (a shared machine's load changes);
- in the same run, at every size: the bandwidth of a plain copy (the physical floor of these
  memory-bound loops) and the time ``torch.Tensor.normal_`` and flatfused's ``noise_`` take to
  generate the normals (on a CPU generating them can cost more than moving the bytes);
- achieved GB/s: the *byte budget* of the optimizer (below; the bytes an exact single-pass-per-
  operation schedule must move) divided by the optimizer time, and its ratio to the copy
  bandwidth; the same budget for every contender, so GB/s compares like with like;
- optimizer state per parameter: the distinct storages the optimizer holds (its own tensors
  plus the base optimizer's), largest over the points of one step (probed inside the passes),
  and the part beyond the base optimizer's state;
- peak memory per parameter during one step, counting the parameters, gradients, state and
  temporaries the contender allocates (CPU: live malloc bytes sampled by a thread; CUDA:
  ``torch.cuda.max_memory_allocated``).

With ``--e2e`` (part of the default run) whole training steps of a ResNet-18-sized CNN and a
small ViT are timed (forward and backward included), where NSO's skipped clean pass shows.

The byte model is written down in :func:`spec.budget_accesses` and docs/benchmarks.md.

Modules, one job each: :mod:`.spec` (what is measured, the byte model), :mod:`.contenders` (the
contenders and the simulated backward pass), :mod:`.measure` (calibration, the timed rounds,
memory and state probes), :mod:`.suite` (the optimizer suite), :mod:`.e2e` (whole training
steps), :mod:`.targets` (the issue's targets), :mod:`.report` (tables, plot, machine facts),
:mod:`.progress` and :mod:`.cli` (``flatfused bench``).
"""
from __future__ import annotations

from .cli import main
from .contenders import SimulatedBackward, build, contenders_for
from .e2e import E2E_CONTENDERS, MODELS, SmallViT, e2e_ratios, e2e_step, make_model, run_e2e
from .measure import PeakMemory, StateProbe, calibrate, floor_ms, make_params, measure_group
from .progress import Progress
from .report import (calibration_table, default_output, e2e_table, machine_info, plot,
                     summary_table, table, targets_table)
from .spec import (BASES, DEFAULT_SIZES, DTYPES, HYPER, OPTIMIZERS, SCHEMA_VERSION,
                   TORCH_BACKEND_MAX_NUMEL, budget_accesses, budget_bytes, format_count, has_wsam,
                   noise_draws, parse_count, passes)
from .suite import default_backends, default_repeats, fits, run_suite
from .targets import GPU_TARGET_COPY_FRACTION, GPU_TARGET_MIN_NUMEL, check_targets

__all__ = [
    "main", "SimulatedBackward", "build", "contenders_for", "E2E_CONTENDERS", "MODELS", "SmallViT",
    "e2e_ratios", "e2e_step", "make_model", "run_e2e", "PeakMemory", "StateProbe", "calibrate",
    "floor_ms", "make_params", "measure_group", "Progress", "calibration_table", "default_output",
    "e2e_table", "machine_info", "plot", "summary_table", "table", "targets_table", "BASES",
    "DEFAULT_SIZES", "DTYPES", "HYPER", "OPTIMIZERS", "SCHEMA_VERSION", "TORCH_BACKEND_MAX_NUMEL",
    "budget_accesses", "budget_bytes", "format_count", "has_wsam", "noise_draws", "parse_count",
    "passes", "default_backends", "default_repeats", "fits", "run_suite",
    "GPU_TARGET_COPY_FRACTION", "GPU_TARGET_MIN_NUMEL", "check_targets",
]
