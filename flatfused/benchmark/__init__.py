"""``flatfused bench``: the optimizers against the reference, the best pure-PyTorch version and
other libraries' versions, on the floor the hardware sets.

By default (the headline, a few minutes on a 2-core CPU): NSO (K=1, two-point, lam=0), SAM and
WSAM over SGD momentum at one size in fp32, each against its contenders, and the base step alone
(torch's fused and foreach SGD); then one end-to-end model step (ResNet-18, batch 32) against
AdamW's. ``--full`` runs the whole suite: every optimizer of :data:`spec.OPTIMIZERS` over SGD
and AdamW, fp32 and bf16, 1M to 64M parameters (1G on a GPU), two models at two batch sizes.

- the contenders: ``reference`` (flatfused.reference, the published code's behaviour and cost),
  ``baseline`` (flatfused.baselines, flat buffers and stock PyTorch ops), flatfused on every
  available backend (``step(closure)``; for NSO in the full suite also the reference's
  three-call API) and the peers (:mod:`.peers`: pytorch_optimizer's SAM, GSAM, LookSAM, WSAM;
  torch's fused and foreach base steps), each driven as its documentation shows; a contender
  that cannot run is listed with the reason;
- optimizer work only, measured directly: each backward pass is *simulated* by adding a fixed
  gradient into ``.grad`` through autograd, and times itself; a step's own time is its time
  less the time spent in its passes. Medians (and the fastest) of ``repeats`` steps after a
  warm-up step, taken round-robin across the contenders (a shared machine's load changes);
- the floor (:mod:`.floor`), measured at the same size, dtype and thread count, in the same
  rounds: STREAM's copy, scale, add and triad, and on a CPU a copy with streaming stores; the
  fastest of them is the bandwidth the byte model (:func:`spec.budget_accesses`) is compared
  with. For NSO the normals it must draw can set the floor instead. ``of floor`` is the floor
  over the fastest step; a row above 100% carries its explanation (or is flagged unexplained);
- optimizer state and peak memory per parameter, as before.

Modules, one job each: :mod:`.spec` (what is measured, the byte model), :mod:`.peers` (other
libraries' versions), :mod:`.contenders` (building the contenders, the simulated backward
pass), :mod:`.floor` (STREAM's kernels, the floor), :mod:`.measure` (calibration, the timed
rounds, memory and state probes), :mod:`.suite` (the optimizer suite and its plan), :mod:`.e2e`
(whole training steps), :mod:`.ddp` (the same under DDP), :mod:`.targets` (the speed goals),
:mod:`.report` (tables, plot, machine facts, where results go), :mod:`.progress` (the progress
line and its time left) and :mod:`.cli` (``flatfused bench``).
"""
from __future__ import annotations

from .cli import main
from .contenders import SimulatedBackward, build, contenders_for
from .ddp import DDP_CONTENDERS, e2e_ddp_table, run_e2e_ddp
from .e2e import (E2E_CONTENDERS, HEADLINE_E2E_CONTENDERS, MODELS, SmallViT, e2e_ratios, e2e_step,
                  make_model, run_e2e)
from .floor import (FLOOR_NOTES, STREAM_COUNTS, StreamFloor, floor_ms, floor_note,
                    last_level_cache_bytes)
from .measure import PeakMemory, StateProbe, apply_floor, calibrate, make_params, measure_group
from .peers import PEERS
from .progress import Progress
from .report import (calibration_table, default_output, e2e_table, headline_table, machine_info,
                     plot, results_dir, slug, summary_table, table, targets_table)
from .spec import (BASES, DEFAULT_SIZES, DTYPES, HEADLINE, HYPER, OPTIMIZERS, SCHEMA_VERSION,
                   TORCH_BACKEND_MAX_NUMEL, budget_accesses, budget_bytes, format_count, has_wsam,
                   noise_draws, parse_count, passes)
from .suite import default_backends, default_repeats, fits, plan_suite, run_suite
from .targets import GPU_TARGET_FLOOR_FRACTION, GPU_TARGET_MIN_NUMEL, check_targets

__all__ = [
    "main", "SimulatedBackward", "build", "contenders_for", "DDP_CONTENDERS", "e2e_ddp_table",
    "run_e2e_ddp", "E2E_CONTENDERS", "HEADLINE_E2E_CONTENDERS", "MODELS", "SmallViT",
    "e2e_ratios", "e2e_step", "make_model", "run_e2e", "FLOOR_NOTES", "STREAM_COUNTS",
    "StreamFloor", "floor_ms", "floor_note", "last_level_cache_bytes", "PeakMemory",
    "StateProbe", "apply_floor", "calibrate", "make_params", "measure_group", "PEERS",
    "Progress", "calibration_table", "default_output", "e2e_table", "headline_table",
    "machine_info", "plot", "results_dir", "slug", "summary_table", "table", "targets_table",
    "BASES", "DEFAULT_SIZES", "DTYPES", "HEADLINE", "HYPER", "OPTIMIZERS", "SCHEMA_VERSION",
    "TORCH_BACKEND_MAX_NUMEL", "budget_accesses", "budget_bytes", "format_count", "has_wsam",
    "noise_draws", "parse_count", "passes", "default_backends", "default_repeats", "fits",
    "plan_suite", "run_suite", "GPU_TARGET_FLOOR_FRACTION", "GPU_TARGET_MIN_NUMEL",
    "check_targets",
]
