"""What the recipes share around their training: the grid of runs (optimizers x seeds), each
run's directory, strict JSON, and the comparison: the table (mean ± std over seeds per
optimizer) as ``summary.json`` and ``summary.md``, and the per-layer Hessian traces side by
side as ``layer_traces.csv`` and ``layer_traces.png``."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch

__all__ = ["run_dir", "write_json", "summarize", "compare_layers", "machine", "seeds_flag",
           "device_of", "count_training_forwards", "refused", "finish", "OUTPUT_FILES"]

# What a recipe's --out receives besides its runs' directories.
OUTPUT_FILES = ("summary.json", "summary.md", "layer_traces.csv", "layer_traces.png")


def seeds_flag(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct integers in [0, 2**31) (the Trainer's and Lightning's seeds
    take 32-bit values)."""
    from flatfused._argtypes import comma_list

    items = comma_list(text, None, "--seeds")
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise SystemExit(f"--seeds: integers, got {text!r}") from None
    bad = [s for s in seeds if not 0 <= s < 2**31]
    if bad:
        raise SystemExit(f"--seeds: must be in [0, 2**31), got {bad}")
    return seeds


def run_dir(out: str, kind: str, seed: int) -> str:
    """``OUT/<optimizer>-seed<k>``: one run's outputs."""
    return os.path.join(out, f"{kind}-seed{seed}")


def _finite(x):
    """NaN/inf as null (strict JSON has neither); tensors as numbers."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str, data) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def machine() -> dict:
    """Where the numbers were measured (the load, since these machines are shared)."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    for name in ("transformers", "lightning", "flatfused"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", None)
    return info


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list, columns, out: str, title: str, command: str,
              started: float) -> dict:
    """The comparison over ``results`` (each run's metrics dict, with ``optimizer`` and
    ``seed``): per optimizer, the mean and standard deviation over seeds of each column
    (``(key, title, format, scale)``; ``key`` a dotted path into the metrics, the table shows
    the values times ``scale``). Writes
    ``OUT/summary.json`` and ``OUT/summary.md`` and returns the summary."""
    kinds = list(dict.fromkeys(r["optimizer"] for r in results))
    rows = {}
    for kind in kinds:
        runs = [r for r in results if r["optimizer"] == kind]
        row = {"seeds": [r["seed"] for r in runs], "radius": runs[0].get("radius")}
        for key, _, _, _ in columns:
            mean, std = _mean_std([_get(r, key) for r in runs])
            row[key] = {"mean": mean, "std": std, "values": [_get(r, key) for r in runs]}
        rows[kind] = row
    summary = {"title": title, "command": command, "seconds": time.time() - started,
               "machine": machine(), "optimizers": rows,
               "runs": [os.path.relpath(r["dir"], out) for r in results]}
    summary["files"] = compare_layers(results, out)
    write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(table(summary, columns) + "\n")
    return summary


def compare_layers(results: list, out: str) -> list:
    """Each optimizer's per-layer Hessian traces (mean over its seeds), one column per
    optimizer: ``OUT/layer_traces.csv`` and the grouped bars of ``OUT/layer_traces.png``. The
    paths written (none when no run measured them)."""
    means = {}
    for kind in dict.fromkeys(r["optimizer"] for r in results):
        traces = [r["sharpness"]["per_layer_trace"] for r in results
                  if r["optimizer"] == kind and "sharpness" in r]
        if traces:
            means[kind] = {layer: statistics.fmean(t[layer] for t in traces)
                           for layer in traces[0]}
    if not means:
        return []
    layers = list(next(iter(means.values())))
    path = os.path.join(out, "layer_traces.csv")
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", *means])
        for layer in layers:
            writer.writerow([layer, *(repr(float(m[layer])) for m in means.values())])
        writer.writerow(["total", *(repr(float(sum(m.values()))) for m in means.values())])
    try:
        from flatfused.sharpness import _plot
    except ImportError:  # pragma: no cover - part of flatfused
        return [path]
    fig, axes = _plot.figure(1, height=max(3.0, 0.9 + 0.12 * len(layers) * len(means)))
    ax = axes[0][0]
    width = 0.8 / len(means)
    for i, (kind, m) in enumerate(means.items()):
        ax.barh([j + i * width for j in range(len(layers))], [m[layer] for layer in layers],
                height=width, label=f"{kind} (total {sum(m.values()):.4g})")
    ax.set_yticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Hessian trace of the layer's weight block (mean over seeds)")
    ax.legend(fontsize=8)
    ax.set_title("per-layer Hessian traces of the fine-tuned models", fontsize=10)
    return [path, _plot.save(fig, os.path.join(out, "layer_traces.png"))]


def _get(metrics: dict, key: str):
    for part in key.split("."):
        if not isinstance(metrics, dict) or part not in metrics:
            return None
        metrics = metrics[part]
    return metrics


def table(summary: dict, columns) -> str:
    """A markdown table: one row per optimizer, ``mean ± std`` over its seeds."""
    head = ["optimizer", "radius", "seeds"] + [t for _, t, _, _ in columns]
    lines = ["| " + " | ".join(head) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(columns)]
    for kind, row in summary["optimizers"].items():
        radius = row["radius"]
        cells = [kind, f"{radius[0]} {radius[1]:g}" if radius else "", str(len(row["seeds"]))]
        for key, _, fmt, scale in columns:
            mean, std = row[key]["mean"], row[key]["std"]
            if mean is None:
                cells.append("n/a")
            elif len(row["seeds"]) > 1:
                cells.append(f"{fmt.format(scale * mean)} ± {fmt.format(scale * std)}")
            else:
                cells.append(fmt.format(scale * mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([f"{summary['title']}", "", *lines])


def device_of(choice: str) -> str:
    """``--device``: auto (cuda when available), cpu, or cuda when there is one."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return choice


def count_training_forwards(model):
    """A one-element list counting the model's forward passes in training mode (each
    optimizer's passes per step, as run)."""
    count = [0]

    def hook(module, args):
        if module.training:
            count[0] += 1

    model.register_forward_pre_hook(hook)
    return count


def refused(prog: str, exc: SystemExit) -> int:
    """A recipe's exit status for a ``SystemExit`` raised while it checks its arguments: a
    message is one line on stderr and status 2; argparse's own exits keep their code."""
    if isinstance(exc.code, str):
        print(f"{prog}: error: {exc.code}", file=sys.stderr)
        return 2
    return exc.code or 0


def finish(results: list, columns, out: str, title: str, prog: str, argv, started: float) -> int:
    """Summarize the runs (:func:`summarize`), print the table and where it went; status 0."""
    command = shlex.join([prog] + list(sys.argv[1:] if argv is None else argv))
    summary = summarize(results, columns, out, title, command, started)
    print()
    print(table(summary, columns))
    print(f"\nwrote {os.path.join(out, 'summary.md')} and summary.json")
    return 0
