"""Spread of the CPU speed targets over repeated ``flatfused bench`` runs.

On a shared machine one run's ratios depend on how much memory bandwidth the host leaves it
at that moment (docs/benchmarks.md), so docs/benchmarks.md ("Run-to-run spread") quotes the spread over several runs:

    for i in $(seq 1 8); do
      flatfused bench --numel 16M --dtypes float32 --optimizers nso --bases sgd --no-e2e \\
          --repeats 9 --no-plot --no-progress --output runs/nso16m_$i.json; sleep 15
    done
    python bench/summarize_runs.py runs/*.json --output bench/results/nso16m_runs_cpu.json

Prints min / median / max of each target a run measured (``targets`` of the result JSON) and of
the 16M fp32 copy time, and writes them with the per-run values as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize(paths: list[Path]) -> dict:
    runs = []
    for path in paths:
        report = json.loads(path.read_text())
        copy_ms = [c["copy_ms"] for c in report.get("calibration", [])
                   if c["numel"] == 16 << 20 and c["dtype"] == "float32"]
        runs.append(dict(file=path.name, started=report.get("started"),
                         load_average_before=report["machine"].get("load_average_before"),
                         copy_16m_fp32_ms=copy_ms[0] if copy_ms else None,
                         targets={t["target"]: t["measured"] for t in report.get("targets", [])}))
    names = sorted({name for r in runs for name in r["targets"]})
    spread = {}
    for name in names + ["copy_16m_fp32_ms"]:
        values = [r["targets"].get(name) if name in names else r[name] for r in runs]
        values = [v for v in values if v is not None]
        if values:
            spread[name] = dict(min=min(values), median=statistics.median(values),
                                max=max(values), runs=len(values))
    return dict(runs=runs, spread=spread)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="flatfused bench result JSONs")
    parser.add_argument("--output", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such result file: {', '.join(missing)}")
    summary = summarize(args.results)
    print("| measurement | min | median | max | runs |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, s in summary["spread"].items():
        print(f"| {name} | {s['min']:.2f} | {s['median']:.2f} | {s['max']:.2f} | {s['runs']} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
