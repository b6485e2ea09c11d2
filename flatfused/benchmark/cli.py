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

from .ddp import e2e_ddp_table, run_e2e_ddp
from .e2e import (E2E_CONTENDERS, E2E_REPEATS, HEADLINE_E2E_CONTENDERS, MODELS, e2e_estimates,
                  run_e2e)
from .progress import Progress
from .report import (_load, calibration_table, default_output, e2e_table, headline_table,
                     machine_info, plot, results_dir, summary_table, table, targets_table)
from .spec import (BASES, DEFAULT_SIZES, DTYPES, HEADLINE, HYPER, OPTIMIZERS, SCHEMA_VERSION,
                   budget_accesses, format_count, has_wsam, parse_count)
from .suite import plan_suite, run_suite, suite_estimates
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


def threads_for_load(load: float | None, cores: int, default: int) -> int:
    """The intra-op threads a run should use when the machine's other work already keeps
    ``load`` of its ``cores`` busy: every thread of a parallel region waits at its barrier for
    the slowest, so a thread that finds no free core costs each region a scheduler time slice.
    torch's ``default`` while the cores the load leaves free hold all its threads (to half a
    core), else as many threads as there are free cores, rounded (at least one)."""
    if load is None or default <= 1 or load <= cores - default + 0.5:
        return default
    return max(1, min(default, int(cores - load + 0.5)))


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


def _parser() -> Parser:
    parser = Parser(
        prog="flatfused bench",
        description="Time flatfused's optimizers against the reference, the best pure-PyTorch "
                    "version and other libraries' (optimizer work only, against the STREAM "
                    "floor), and whole training steps against AdamW. Without --full: the "
                    "headline (NSO, SAM, WSAM over SGD momentum at one size, one model end to "
                    "end), a few minutes on a 2-core CPU. See docs/benchmarks.md.")
    parser.add_argument("--full", action="store_true",
                        help="the whole suite: every optimizer over SGD and AdamW, fp32 and "
                             "bf16, 1M-64M parameters (CUDA: up to 1G), two models at two "
                             "batch sizes end to end (10-20 minutes on 2 cores); with "
                             "--from-json: the full table")
    parser.add_argument("--quick", action="store_true",
                        help="the whole suite at 1M and 4M, float32, SGD, 3 repeats, a small "
                             "end-to-end batch (what --sizes, --dtypes, --bases, --repeats give "
                             "overrides it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated parameter counts (default 16M, CUDA 64M; --full: "
                             "1M,4M,16M,64M, CUDA up to 1G as far as memory allows)")
    parser.add_argument("--numel", default=None, help="one parameter count (same as --sizes N)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default float32; --full: float32,bfloat16)")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated, from {list(OPTIMIZERS)} (default: "
                             f"{','.join(HEADLINE['optimizers'])}; --full: all)")
    parser.add_argument("--bases", default=None,
                        help="comma-separated (default sgd; --full: sgd,adamw)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated flatfused backends (default: every available one; "
                             "'torch' only up to 1M)")
    parser.add_argument("--repeats", type=positive(int), default=None,
                        help=f"timed steps per measurement (default 5 up to 16M parameters, 3 "
                             f"above; {E2E_REPEATS} end to end)")
    # Together they would measure nothing and write an empty report.
    only_or_none = parser.add_mutually_exclusive_group()
    only_or_none.add_argument("--e2e", action="store_true", help="only the end-to-end benchmark")
    only_or_none.add_argument("--no-e2e", action="store_true",
                              help="skip the end-to-end benchmark")
    parser.add_argument("--models", default=None,
                        help=f"end-to-end models, comma-separated, from {sorted(MODELS)} "
                             "(default resnet18; --full: resnet18,vit)")
    parser.add_argument("--batch", default=None,
                        help="end-to-end batch sizes, comma-separated (default 32; --full: "
                             "32,128: the optimizer's fixed cost weighs more at the smaller one)")
    parser.add_argument("--e2e-contenders", default=None,
                        help="end-to-end contenders, comma-separated, from the full suite's "
                             "(e.g. 'adamw,nso flatfused,nso flatfused every5,sam flatfused "
                             "every5+reuse': the cheap schedules; default: the mode's)")
    parser.add_argument("--ddp-ranks", type=int, default=None,
                        help="also time end-to-end NSO steps under DDP on this many CPU ranks, "
                             "at least 2 (gloo, one thread each, the first --batch per rank; "
                             "default: off)")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch.set_num_threads (default: torch's choice, fewer when other "
                             "work already keeps the cores busy: see the note it prints)")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="call flatfused.tune_cpu_allocator() first (glibc keeps freed "
                             "memory: no page faults between CPU steps; flatfused/allocator.py)")
    parser.add_argument("--output", default=None,
                        help=f"JSON path, checked before measuring (default: {results_dir()}/"
                             "<headline|suite|e2e>_<device>_<name>.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-json", default=None,
                        help="print the tables of a saved result instead of measuring (the "
                             "summary at --numel, default 16M; --full: the full table, filtered "
                             "by --numel, --dtypes, --bases)")
    return parser


def _show_saved(args) -> int:
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
    elif report.get("settings", {}).get("mode") == "headline":
        print(headline_table(report, parse_count(_counts(numel, "--numel")[0]), dtypes[0]))
    else:
        print(summary_table(report, parse_count(_counts(numel, "--numel")[0]), dtypes[0]))
    # Only the parts the saved run has (an --e2e run has no calibration, few have DDP).
    for key, part in (("calibration", calibration_table), ("e2e", e2e_table),
                      ("e2e_ddp", e2e_ddp_table), ("targets", targets_table)):
        if report.get(key):
            print()
            print(part(report))
    return 0


def _settings(args, device: torch.device) -> dict:
    """What to measure: the headline's choices, or with --full (--quick) the whole suite's,
    each replaced by what its option gives. Every value is checked here, before measuring."""
    full = args.full or args.quick
    if args.quick:
        sizes = _counts(args.sizes, "--sizes") if args.sizes is not None else ["1M", "4M"]
        dtypes, bases = _given(args.dtypes, "float32"), _given(args.bases, "sgd")
        repeats = args.repeats or 3
        batches = [min(b, 8) for b in _batch_sizes(_given(args.batch, "32,128"))][:1]
    elif full:
        sizes = (_counts(args.sizes, "--sizes") if args.sizes is not None
                 else DEFAULT_SIZES.get(device.type, DEFAULT_SIZES["cpu"]))
        dtypes = _given(args.dtypes, "float32,bfloat16")
        bases = _given(args.bases, "sgd,adamw")
        repeats = args.repeats
        batches = _batch_sizes(_given(args.batch, "32,128"))
    else:
        sizes = (_counts(args.sizes, "--sizes") if args.sizes is not None
                 else HEADLINE["sizes"].get(device.type, HEADLINE["sizes"]["cpu"]))
        dtypes = _given(args.dtypes, HEADLINE["dtype"])
        bases = _given(args.bases, HEADLINE["base"])
        repeats = args.repeats or HEADLINE["repeats"]
        batches = _batch_sizes(_given(args.batch, ",".join(map(str, HEADLINE["batches"]))))
    if args.numel is not None:
        sizes = _counts(args.numel, "--numel")[:1]
    optimizers = comma_list(args.optimizers, OPTIMIZERS, "--optimizers") or (
        list(OPTIMIZERS) if full else list(HEADLINE["optimizers"]))
    models = comma_list(_given(args.models, "resnet18,vit" if full else
                               ",".join(HEADLINE["models"])), MODELS, "--models")
    # --repeats (and --quick's 3) count the end-to-end rounds too.
    e2e_repeats = (args.repeats or 3 if args.quick else args.repeats or E2E_REPEATS if full
                   else args.repeats or HEADLINE["e2e_repeats"])
    return dict(mode="full" if full else "headline", sizes=[parse_count(s) for s in sizes],
                dtypes=comma_list(dtypes, DTYPES, "--dtypes"),
                bases=comma_list(bases, BASES, "--bases"), optimizers=optimizers,
                repeats=repeats, e2e_repeats=e2e_repeats, e2e_batches=batches, models=models,
                e2e_contenders=comma_list(args.e2e_contenders, E2E_CONTENDERS, "--e2e-contenders")
                or (E2E_CONTENDERS if full else HEADLINE_E2E_CONTENDERS))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.from_json:
        return _show_saved(args)
    threads = torch.get_num_threads()
    try:
        return _measure(args, argv)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep theirs


def _measure(args, argv) -> int:
    if args.ddp_ranks is not None and args.ddp_ranks < 2:
        raise SystemExit(f"--ddp-ranks needs at least 2 ranks, got {args.ddp_ranks}")
    device = runnable_device(args.device)
    chosen = _settings(args, device)
    backends = comma_list(args.backends, _backends.BACKENDS[1:], "--backends")
    for backend in backends or ():
        reason = _backends.unavailable_reason(backend, device)
        if reason is not None:
            raise SystemExit(f"--backends {backend}: {reason}")
    machine = machine_info(device)
    prefix = "e2e" if args.e2e else "suite" if chosen["mode"] == "full" else "headline"
    output = _given(args.output, str(default_output(device, machine, prefix)))
    # Before measuring: an unwritable path would otherwise fail at the first save, or at the
    # plot after the whole run. The text itself first (Path drops a trailing /), and the JSON
    # before the plot: a directory has no name to give a .png suffix.
    _refuse_unwritable(output)
    path = Path(output)
    if not args.no_plot:
        _refuse_unwritable(path.with_suffix(".png"))
        if not _has_matplotlib():
            print("note: matplotlib is not installed: the run writes no plot "
                  "(pip install matplotlib, or pass --no-plot)", file=sys.stderr)
    # Every input checked; before anything large is allocated, the heap grows tuned from the
    # start.
    machine["allocator_tuned"] = tune_cpu_allocator() if args.tune_allocator else False
    load_before = _load()
    machine["threads_from"] = _choose_threads(args, device, load_before)
    machine["threads"] = torch.get_num_threads()
    report = dict(
        benchmark="flatfused-suite", schema=SCHEMA_VERSION,
        command="flatfused bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device=str(device),
        machine=machine,
        settings=dict(chosen, hyperparameters=HYPER,
                      base_hyperparameters={k: v[1] for k, v in BASES.items()},
                      optimizer_specs=OPTIMIZERS, wsam_available=has_wsam(),
                      byte_budget_accesses={f"{o}/{b}": budget_accesses(o, b)
                                            for o in chosen["optimizers"]
                                            for b in chosen["bases"]}),
    )
    dtypes = [DTYPES[d] for d in chosen["dtypes"]]
    e2e_repeats = chosen["e2e_repeats"]
    # One progress line over the whole run, its time left estimated from the plan.
    items = []
    if not args.no_e2e:
        for batch in chosen["e2e_batches"]:
            items += e2e_estimates(chosen["models"], batch, e2e_repeats,
                                   chosen["e2e_contenders"])
    if not args.e2e:
        headline = chosen["mode"] == "headline"
        items += suite_estimates(plan_suite(chosen["sizes"], dtypes, chosen["optimizers"],
                                            chosen["bases"], backends, device, chosen["repeats"],
                                            headline, log=lambda *a, **k: None), not headline)
    bar = Progress(items, not args.no_progress)
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
            report["e2e"], report["e2e_unavailable"] = [], []
            for batch in chosen["e2e_batches"]:
                run_e2e(chosen["models"], device, batch, e2e_repeats,
                        contenders=chosen["e2e_contenders"], rows=report["e2e"],
                        unavailable=report["e2e_unavailable"], on_update=lambda: save(True),
                        bar=bar)
        if args.ddp_ranks is not None:
            report["e2e_ddp"] = run_e2e_ddp(chosen["models"], args.ddp_ranks,
                                            chosen["e2e_batches"][0], chosen["repeats"] or 5)
            save(True)
        if not args.e2e:
            run_suite(chosen["sizes"], dtypes, chosen["optimizers"], chosen["bases"], backends,
                      device, chosen["repeats"], not args.no_progress, out=report,
                      on_update=lambda _: save(True), headline=chosen["mode"] == "headline",
                      bar=bar)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    load_after = _load()
    report["machine"]["load_average_before"] = load_before
    report["machine"]["load_average_after"] = load_after
    # The run itself adds about one unit of load per thread to the load after it.
    cores = os.cpu_count() or 1
    busy = (load_before is not None and load_before[0] > 0.75 * cores) or (
        load_after is not None and load_after[0] - torch.get_num_threads() > 0.75 * cores)
    report["machine"]["busy"] = busy
    save(interrupted)
    _print_report(report, chosen)
    if busy:
        print(f"\nnote: the machine was busy (load average {load_before} -> {load_after} on "
              f"{os.cpu_count()} cores): timings are noisy", file=sys.stderr)
    if any(r.get("floor_note") == "unexplained" for r in report.get("results", [])):
        print("\nnote: a row is above its floor with no explanation (see the table's notes)",
              file=sys.stderr)
    print(f"\nwrote {path} ({report['seconds']:.0f} s{', partial' if interrupted else ''})")
    if (report.get("results") or report.get("e2e")) and not args.no_plot:
        png = plot(report, path.with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    return 0


def _choose_threads(args, device: torch.device, load: list[float] | None) -> str:
    """Sets torch's intra-op threads for the run (see :func:`threads_for_load`); says why."""
    if args.threads:
        torch.set_num_threads(args.threads)
        return "--threads"
    if device.type != "cpu":
        return "torch's default"
    cores, default = os.cpu_count() or 1, torch.get_num_threads()
    threads = threads_for_load(load and load[0], cores, default)
    if threads == default:
        return "torch's default"
    torch.set_num_threads(threads)
    print(f"note: other work keeps the load average at {load[0]} on {cores} cores: timing "
          f"with {threads} thread{'s' * (threads > 1)} instead of {default}, the floor too "
          f"(--threads {default} to insist)", file=sys.stderr)
    return f"the load ({default} by default)"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _print_report(report: dict, chosen: dict) -> None:
    results = report.get("results")
    if results and chosen["mode"] == "headline":
        shown = sorted({r["numel"] for r in results})[0]
        dtype = chosen["dtypes"][0]
        print(f"optimizer-only ms per step at {format_count(shown)} {dtype} (each backward "
              "pass simulated and timed apart; docs/benchmarks.md):")
        print(headline_table(report, shown, dtype))
        print()
        print(calibration_table(report))
    elif results:
        print(table(report))
        sizes_run = sorted({r["numel"] for r in results})
        shown = max([n for n in sizes_run if n <= 16 << 20] or sizes_run)
        print(f"\nsummary at {format_count(shown)} {chosen['dtypes'][0]} (optimizer-only ms per "
              "step):")
        print(summary_table(report, shown, chosen["dtypes"][0]))
        print()
        print(calibration_table(report))
    if report.get("e2e") or report.get("e2e_unavailable"):
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


if __name__ == "__main__":
    raise SystemExit(main())
