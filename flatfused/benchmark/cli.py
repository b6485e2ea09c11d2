"""``flatfused bench``: the command line (docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from flatfused import backends as _backends
from flatfused._argtypes import Parser, comma_list, output_problem, positive, runnable_device
from flatfused.allocator import tune_cpu_allocator
from flatfused.bench_ddp import e2e_ddp_table, run_e2e_ddp

from .e2e import E2E_REPEATS, MODELS, run_e2e
from .report import (_load, calibration_table, default_output, e2e_table, machine_info, plot,
                     summary_table, table, targets_table)
from .spec import (BASES, DEFAULT_SIZES, DTYPES, HYPER, OPTIMIZERS, SCHEMA_VERSION, budget_accesses,
                   format_count, has_wsam, parse_count)
from .suite import run_suite
from .targets import check_targets


# Minor page faults per end-to-end step above which a step pays noticeably for memory its
# allocator gave back (1000 faults: 4 MiB mapped and zeroed again, about 1 ms).
_FAULTS_WORTH_A_NOTE = 1000


def _page_fault_hint(report: dict) -> str | None:
    faulting = [r for r in report.get("e2e", []) if (r.get("page_faults_per_step") or 0)
                > _FAULTS_WORTH_A_NOTE and r["contender"].endswith("flatfused")]
    machine = report["machine"]
    if (not faulting or report["device"] != "cpu" or machine.get("allocator_env")
            or machine.get("allocator_tuned")):
        return None
    worst = max(faulting, key=lambda r: r["page_faults_per_step"])
    return (f"\nnote: {worst['contender']} on {worst['model']} at batch {worst['batch']} took "
            f"{worst['page_faults_per_step']:.0f} page faults per step: glibc gave memory back "
            "between passes. For CPU training call flatfused.tune_cpu_allocator() (or run with "
            "--tune-allocator); see flatfused/allocator.py")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _batch_sizes(text: str) -> list[int]:
    parse = positive(int)
    try:
        sizes = [parse(t) for t in comma_list(text)]
    except argparse.ArgumentTypeError:
        sizes = []
    if not sizes:
        raise SystemExit(f"--batch takes comma-separated positive integers, got {text!r}")
    _refuse_repeats("--batch", text, sizes)
    return sizes


def _refuse_unwritable(path) -> None:
    problem = output_problem(path)
    if problem:
        raise SystemExit(f"--output: cannot write {str(path)!r}: {problem}")


def _given(text: str | None, default: str) -> str:
    """An option's text, or ``default`` when it is not given; an empty one stays, for the
    option's own check to refuse (``or`` would run the default for ``--dtypes ""``)."""
    return default if text is None else text


def _refuse_repeats(flag: str, text: str, values: list) -> None:
    if len(set(values)) != len(values):
        raise SystemExit(f"{flag}: a value is given more than once in {text!r}")


def _counts(text: str, flag: str) -> list[str]:
    """``--sizes``/``--numel``: comma-separated parameter counts (1M, 4096, 2.5G), each >= 1."""
    items = comma_list(text)
    try:
        counts = [parse_count(t) for t in items]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"{flag} takes comma-separated parameter counts >= 1 such as "
                         f"1M,4M,16M, got {text!r}")
    _refuse_repeats(flag, text, counts)  # 1M and 1048576 are one size
    return items


def main(argv=None) -> int:
    parser = Parser(
        prog="flatfused bench",
        description="Time flatfused's optimizers against the reference and the best pure-PyTorch "
                    "version (optimizer work only), and whole training steps (--e2e). "
                    "See docs/benchmarks.md.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated parameter counts (default CPU: 1M,4M,16M,64M; "
                             "CUDA: up to 1G, as far as memory allows)")
    parser.add_argument("--numel", default=None, help="one parameter count (same as --sizes N)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default float32,bfloat16; --quick: float32)")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated, from {list(OPTIMIZERS)} (default: all)")
    parser.add_argument("--bases", default=None,
                        help="comma-separated (default sgd,adamw; --quick: sgd)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated flatfused backends (default: every available one; "
                             "'torch' only up to 1M)")
    parser.add_argument("--repeats", type=positive(int), default=None,
                        help=f"timed steps per measurement (default 5 up to 16M parameters, 3 above; "
                             f"{E2E_REPEATS} end to end)")
    parser.add_argument("--quick", action="store_true",
                        help="1M and 4M, float32, SGD, 3 repeats, small end-to-end batch "
                             "(what --sizes, --dtypes, --bases, --repeats give overrides it)")
    # Together they would measure nothing and write an empty report.
    only_or_none = parser.add_mutually_exclusive_group()
    only_or_none.add_argument("--e2e", action="store_true", help="only the end-to-end benchmark")
    only_or_none.add_argument("--no-e2e", action="store_true",
                              help="skip the end-to-end benchmark")
    parser.add_argument("--models", default="resnet18,vit",
                        help=f"end-to-end models, comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--batch", default="32,128",
                        help="end-to-end batch sizes, comma-separated (default 32,128: the "
                             "optimizer's fixed cost weighs more at the smaller one)")
    parser.add_argument("--ddp-ranks", type=int, default=None,
                        help="also time end-to-end NSO steps under DDP on this many CPU ranks, "
                             "at least 2 (gloo, one thread each, the first --batch per rank; "
                             "default: off)")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="call flatfused.tune_cpu_allocator() first (glibc keeps freed "
                             "memory: no page faults between CPU steps; flatfused/allocator.py)")
    parser.add_argument("--output", default=None,
                        help="JSON path, checked before measuring (default: bench/results/...)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-json", default=None,
                        help="print the summary (at --numel, default 16M), calibration, "
                             "end-to-end and target tables of a saved result instead of measuring")
    parser.add_argument("--full", action="store_true",
                        help="with --from-json: the full table (filters: --numel, --dtypes, --bases)")
    args = parser.parse_args(argv)

    if args.from_json:
        try:
            report = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--from-json {args.from_json}: {e}") from None
        # Only a bench report has the tables' keys (bench/summarize_runs.py writes other JSON).
        if not isinstance(report, dict) or report.get("benchmark") != "flatfused-suite":
            raise SystemExit(f"--from-json {args.from_json}: not a flatfused bench result "
                             "(no \"benchmark\": \"flatfused-suite\")")
        dtypes = comma_list(_given(args.dtypes, "float32"), DTYPES, "--dtypes")
        numel = _given(args.numel, "16M")
        if args.full:
            bases = comma_list(_given(args.bases, "sgd,adamw"), BASES, "--bases")
            print(table(report,
                        parse_count(_counts(numel, "--numel")[0]) if args.numel is not None
                        else None,
                        dtypes[0] if len(dtypes) == 1 else None,
                        bases[0] if len(bases) == 1 else None))
        else:
            print(summary_table(report, parse_count(_counts(numel, "--numel")[0]), dtypes[0]))
        # Only the parts the saved run has (an --e2e run has no calibration, few have DDP).
        for key, part in (("calibration", calibration_table), ("e2e", e2e_table),
                          ("e2e_ddp", e2e_ddp_table), ("targets", targets_table)):
            if report.get(key):
                print()
                print(part(report))
        return 0

    if args.ddp_ranks is not None and args.ddp_ranks < 2:
        raise SystemExit(f"--ddp-ranks needs at least 2 ranks, got {args.ddp_ranks}")
    device = runnable_device(args.device)
    # Before anything large is allocated: the heap grows tuned from the start.
    tuned = tune_cpu_allocator() if args.tune_allocator else False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes = _counts(args.sizes, "--sizes") if args.sizes is not None else ["1M", "4M"]
        dtypes, bases = _given(args.dtypes, "float32"), _given(args.bases, "sgd")
        repeats = args.repeats or 3
        batches = [min(b, 8) for b in _batch_sizes(args.batch)][:1]
    else:
        sizes = (_counts(args.sizes, "--sizes") if args.sizes is not None
                 else DEFAULT_SIZES.get(device.type, DEFAULT_SIZES["cpu"]))
        dtypes = _given(args.dtypes, "float32,bfloat16")
        bases = _given(args.bases, "sgd,adamw")
        repeats = args.repeats
        batches = _batch_sizes(args.batch)
    if args.numel is not None:
        sizes = _counts(args.numel, "--numel")[:1]
    dtypes = comma_list(dtypes, DTYPES, "--dtypes")
    bases = comma_list(bases, BASES, "--bases")
    optimizers = comma_list(args.optimizers, OPTIMIZERS, "--optimizers") or list(OPTIMIZERS)
    backends = comma_list(args.backends, _backends.BACKENDS[1:], "--backends")
    for backend in backends or ():
        reason = _backends.unavailable_reason(backend, device)
        if reason is not None:
            raise SystemExit(f"--backends {backend}: {reason}")
    models = comma_list(args.models, MODELS, "--models")
    machine = machine_info(device)
    machine["allocator_tuned"] = tuned
    prefix = "e2e" if args.e2e else "suite"
    output = _given(args.output, str(default_output(device, machine, prefix)))
    # Before measuring: an unwritable path would otherwise fail at the first save, or at the
    # plot after the whole run. The text itself first (Path drops a trailing /), and the JSON
    # before the plot: a directory has no name to give a .png suffix.
    _refuse_unwritable(output)
    path = Path(output)
    if not args.no_plot:
        _refuse_unwritable(path.with_suffix(".png"))
    load_before = _load()
    report = dict(
        benchmark="flatfused-suite", schema=SCHEMA_VERSION,
        command="flatfused bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=str(device),
        machine=machine,
        settings=dict(sizes=[parse_count(s) for s in sizes], dtypes=dtypes, bases=bases,
                      optimizers=optimizers, repeats=repeats, e2e_batches=batches,
                      hyperparameters=HYPER,
                      base_hyperparameters={k: v[1] for k, v in BASES.items()},
                      optimizer_specs=OPTIMIZERS, wsam_available=has_wsam(),
                      byte_budget_accesses={f"{o}/{b}": budget_accesses(o, b)
                                            for o in optimizers for b in bases}),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save(partial: bool) -> None:
        report["seconds"] = time.perf_counter() - t0
        report["partial"] = partial
        report["targets"] = check_targets(report)
        path.write_text(json.dumps(report, indent=2) + "\n")

    # SIGTERM (e.g. a time limit) ends the run like Ctrl-C: what was measured is kept.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    interrupted = False
    try:
        # End to end first: it is short, and the targets need it.
        if not args.no_e2e:
            report["e2e"] = []
            for batch in batches:
                run_e2e(models, device, batch, repeats or E2E_REPEATS,
                        progress=not args.no_progress, rows=report["e2e"],
                        on_update=lambda: save(True))
        if args.ddp_ranks is not None:
            report["e2e_ddp"] = run_e2e_ddp(models, args.ddp_ranks, batches[0],
                                            repeats or 5)
            save(True)
        if not args.e2e:
            run_suite([parse_count(s) for s in sizes], [DTYPES[d] for d in dtypes], optimizers,
                      bases, backends, device, repeats, not args.no_progress, out=report,
                      on_update=lambda _: save(True))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    load_after = _load()
    report["machine"]["load_average_before"] = load_before
    report["machine"]["load_average_after"] = load_after
    # The run itself adds about one unit of load per thread to the load after it.
    cores = os.cpu_count() or 1
    busy = (load_before is not None and load_before[0] > 0.75 * cores) or (
        load_after is not None and load_after[0] - torch.get_num_threads() > 0.75 * cores)
    report["machine"]["busy"] = busy
    save(interrupted)

    if report.get("results"):
        print(table(report))
        sizes_run = sorted({r["numel"] for r in report["results"]})
        shown = max([n for n in sizes_run if n <= 16 << 20] or sizes_run)
        print(f"\nsummary at {format_count(shown)} {dtypes[0]} (optimizer-only ms per step):")
        print(summary_table(report, shown, dtypes[0]))
        print()
        print(calibration_table(report))
    if report.get("e2e"):
        print()
        print(e2e_table(report))
        hint = _page_fault_hint(report)
        if hint:
            print(hint, file=sys.stderr)
    if report.get("e2e_ddp"):
        print()
        print(e2e_ddp_table(report))
    if report["targets"]:
        print()
        print(targets_table(report))
    if busy:
        print(f"\nnote: the machine was busy (load average {load_before} -> {load_after} on "
              f"{os.cpu_count()} cores): timings are noisy", file=sys.stderr)
    print(f"\nwrote {path} ({report['seconds']:.0f} s{', partial' if interrupted else ''})")
    if report.get("results") and not args.no_plot:
        png = plot(report, path.with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
