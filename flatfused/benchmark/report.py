"""Tables, the plot, and the machine facts a report records."""
from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import torch

import flatfused
from flatfused.allocator import allocator_env

from .floor import FLOOR_NOTES, STREAM_COUNTS, last_level_cache_bytes
from .peers import PEERS, package_version
from .spec import format_count


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _floor_cell(r: dict) -> str:
    """The row's share of its floor, what set the floor (a STREAM kernel or the normals), and
    the note that explains a share above 100%."""
    if "floor_fraction" not in r:  # a schema-2 report: the median against a plain copy
        return f"{100 * r['copy_fraction']:.0f}% of copy" if "copy_fraction" in r else "-"
    note = r.get("floor_note")
    return (f"{100 * r['floor_fraction']:.0f}% of {r.get('floor_bound', 'floor')}"
            + (f" ({note})" if note else ""))


def _missing(report: dict, numel=None, dtype=None, base=None) -> list[dict]:
    """The contenders that did not run (unavailable or failed), as rows of their own."""
    out = []
    for key, what in (("unavailable", "reason"), ("errors", "error")):
        for r in report.get(key, []):
            if (numel and r["numel"] != numel) or (dtype and r["dtype"] != dtype) or \
                    (base and r["base"] != base):
                continue
            out.append(dict(r, missing=("unavailable: " if key == "unavailable" else "failed: ")
                            + r[what]))
    return out


def table(report: dict, numel: int | None = None, dtype: str | None = None,
          base: str | None = None) -> str:
    """The suite's rows as a Markdown table (optionally one size/dtype/base)."""
    lines = ["| optimizer | base | dtype | params | contender | optimizer ms/step | fastest ms | "
             "Mparams/s | vs reference | vs baseline | GB/s | of floor | "
             "state B/param (beyond base) | peak B/param |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    for r in report.get("results", []):
        if (numel and r["numel"] != numel) or (dtype and r["dtype"] != dtype) or \
                (base and r["base"] != base):
            continue
        if not r.get("reliable", True):  # schema 2: the subtracted passes drowned the step
            r = dict(r, contender=r["contender"] + " (unreliable: backward passes >90% of step)")
        peak = "-" if r["peak_bytes_per_param"] is None else f"{r['peak_bytes_per_param']:.0f}"
        fastest = r.get("optimizer_ms_min")
        lines.append(
            f"| {r['optimizer']} | {r['base']} | {r['dtype']} | {format_count(r['numel'])} | "
            f"{r['contender']} | {r['optimizer_ms_per_step']:.1f} | "
            f"{'-' if fastest is None else f'{fastest:.1f}'} | {r['params_per_s'] / 1e6:.0f} | "
            f"{_x(r['speedup_vs_reference'])} | {_x(r['speedup_vs_baseline'])} | "
            f"{r['gb_per_s']:.1f} | {_floor_cell(r)} | "
            f"{r['state_bytes_per_param']:.0f} ({r['state_bytes_per_param_beyond_base']:.0f}) | "
            f"{peak} |")
    for r in _missing(report, numel, dtype, base):
        lines.append(f"| {r['optimizer']} | {r['base']} | {r['dtype']} | "
                     f"{format_count(r['numel'])} | {r['contender']} | {r['missing']} |"
                     + " |" * 8)
    return "\n".join(lines + _notes(report))


def headline_table(report: dict, numel: int, dtype: str = "float32") -> str:
    """The default run's table: per optimizer every contender in a row of its own (the
    reference, the baseline, flatfused and the peers, or why one did not run), optimizer-only
    time per step and its ratio to each yardstick, the share of the floor and the state."""
    lines = ["| optimizer / base | contender | passes | optimizer ms/step | fastest ms | "
             "vs reference | vs baseline | vs flatfused | of floor | "
             "state beyond base B/param |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    rows = [r for r in report.get("results", []) if r["numel"] == numel and r["dtype"] == dtype]
    missing = _missing(report, numel, dtype)
    groups = list(dict.fromkeys((r["optimizer"], r["base"]) for r in rows + missing))
    for opt, base in groups:
        for r in rows:
            if (r["optimizer"], r["base"]) != (opt, base):
                continue
            lines.append(
                f"| {opt} / {base} | {r['contender']} | {r['passes']:.0f} | "
                f"{r['optimizer_ms_per_step']:.1f} | {r['optimizer_ms_min']:.1f} | "
                f"{_x(r.get('speedup_vs_reference'))} | {_x(r.get('speedup_vs_baseline'))} | "
                f"{_x(r.get('speedup_vs_flatfused'))} | {_floor_cell(r)} | "
                f"{r['state_bytes_per_param_beyond_base']:.0f} |")
        for r in missing:
            if (r["optimizer"], r["base"]) == (opt, base):
                lines.append(f"| {opt} / {base} | {r['contender']} | {r['missing']} |"
                             + " |" * 7)
    return "\n".join(lines + _notes(report))


def _notes(report: dict) -> list[str]:
    """The notes under a table: what each floor note and each peer in it means."""
    results = report.get("results", [])
    notes = sorted({r["floor_note"] for r in results if r.get("floor_note")})
    peers = [c for c in dict.fromkeys(r["contender"] for r in results + _missing(report))
             if c in PEERS]
    out = [f"- ({n}) {FLOOR_NOTES[n]}" for n in notes]
    out += [f"- {p}: {PEERS[p].about}" for p in peers]
    return ["", *out] if out else []


def summary_table(report: dict, numel: int, dtype: str = "float32") -> str:
    """One row per optimizer and base at one size: optimizer ms per step of each contender, with
    flatfused's speedups, share of its floor and state beyond the base optimizer."""
    rows = [r for r in report.get("results", []) if r["numel"] == numel and r["dtype"] == dtype]
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    head = ["optimizer / base"] + [f"{c} ms" for c in contenders]
    lines = ["| " + " | ".join(head) + " | flatfused vs reference | vs baseline | of floor | "
             "state beyond base (B/param) |",
             "| --- |" + " ---: |" * (len(contenders) + 4)]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["optimizer"], r["base"]), {})[r["contender"]] = r
    best = [c for c in contenders if c.startswith("flatfused[") and not c.endswith("3-call")]
    for (opt, base), group in keyed.items():
        cells = [f"{opt} / {base}"]
        for c in contenders:
            r = group.get(c)
            cells.append("-" if r is None else f"{r['optimizer_ms_per_step']:.1f}")
        ff = next((group[c] for c in best if c in group), None)
        if ff is None:
            cells += ["-"] * 4
        else:
            cells += [_x(ff["speedup_vs_reference"]), _x(ff["speedup_vs_baseline"]),
                      _floor_cell(ff),
                      f"{ff['state_bytes_per_param_beyond_base']:.0f} "
                      f"(reference {group['reference']['state_bytes_per_param_beyond_base']:.0f})"
                      if "reference" in group else
                      f"{ff['state_bytes_per_param_beyond_base']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(report: dict) -> str:
    """The floor per size: STREAM's kernels (GB/s as STREAM counts them: no write-allocate
    traffic), which one set the floor, and the normal generators."""
    kernels = list(STREAM_COUNTS)
    lines = ["| params | dtype | threads | " + " | ".join(f"{k} GB/s" for k in kernels)
             + " | floor | torch normal_ ms | flatfused noise_ ms |",
             "| ---: | --- | ---: |" + " ---: |" * len(kernels) + " --- | ---: | --- |"]
    for c in report.get("calibration", []):
        rates = c.get("stream_gb_per_s") or {"copy": c["copy_gb_per_s"]}
        noise = ", ".join(f"{b} {t:.1f}" for b, t in c["flatfused_noise_ms"].items()) or "-"
        cells = [f"{rates[k]:.1f}" if k in rates else "-" for k in kernels]
        resolution = c.get("floor_resolution")
        floor = (f"{c['floor_kernel']}, best of {c['stream_trials'][c['floor_kernel']]}, "
                 f"resolution {'-' if resolution is None else f'{100 * resolution:.0f}%'}"
                 if "floor_kernel" in c else "copy")
        lines.append(f"| {format_count(c['numel'])} | {c['dtype']} | {c.get('threads', '-')} | "
                     + " | ".join(cells) + f" | {floor} | {c['torch_normal_ms']:.1f} | {noise} |")
    return "\n".join(lines)


def e2e_table(report: dict) -> str:
    rows = report.get("e2e", [])
    faults = any(r.get("page_faults_per_step") is not None for r in rows)
    lines = ["| model | params | batch | contender | passes | ms/step (median) | vs AdamW step | "
             "fastest step ms | vs AdamW (fastest) | vs AdamW (paired) |"
             + (" page faults/step |" if faults else ""),
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: |" if faults else "")]
    for r in rows:
        f = r.get("page_faults_per_step")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['contender']} "
                     f"| {r.get('passes', '-')} | {r['ms_per_step']:.1f} | "
                     f"{_x(r['ratio_vs_adamw'])} | {r['ms_min']:.1f} | "
                     f"{_x(r.get('ratio_vs_adamw_min'))} | {_x(r.get('ratio_vs_adamw_paired'))} |"
                     + ((" - |" if f is None else f" {f:.0f} |") if faults else ""))
    for r in report.get("e2e_unavailable", []):
        lines.append(f"| {r['model']} | - | {r['batch']} | {r['contender']} | unavailable: "
                     f"{r['reason']} |" + " |" * (5 + faults))
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    lines = ["| target | measured | goal | met |", "| --- | ---: | --- | --- |"]
    for t in report.get("targets", []):
        lines.append(f"| {t['target']} | {t['measured']:.2f} | {t['goal']} | "
                     f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    """The run as a figure: with several sizes, speedup vs the reference against size (one
    panel per optimizer and base, a line per contender and dtype); with one, each contender's
    optimizer-only time against its floor, and the end-to-end steps against AdamW's. Needs
    matplotlib (imported only here); None without it or without anything to draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    results = report.get("results", [])
    if len({r["numel"] for r in results}) > 1:
        fig = _plot_sizes(plt, results)
    elif results or report.get("e2e"):
        fig = _plot_one_size(plt, results, report.get("e2e", []))
    else:
        return None
    if fig is None:
        return None
    machine = report.get("machine", {})
    fig.suptitle(f"flatfused bench on {machine.get('gpu') or machine.get('cpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sizes(plt, results: list[dict]):
    results = [r for r in results if r.get("speedup_vs_reference") is not None]
    opts = list(dict.fromkeys(r["optimizer"] for r in results))
    bases = list(dict.fromkeys(r["base"] for r in results))
    if not opts:
        return None
    sizes = sorted({r["numel"] for r in results})
    fig, axes = plt.subplots(len(bases), len(opts), figsize=(3.6 * len(opts), 3.2 * len(bases)),
                             squeeze=False, sharex=True)
    for i, base in enumerate(bases):
        for j, opt in enumerate(opts):
            ax = axes[i][j]
            lines = {}
            for r in results:
                if r["optimizer"] != opt or r["base"] != base or r["contender"] == "reference":
                    continue
                lines.setdefault((r["contender"], r["dtype"]), []).append(
                    (r["numel"], r["speedup_vs_reference"]))
            for (contender, dtype), pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if dtype == "float32" else "--", label=f"{contender} {dtype}")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # speedups span 0.5x to 30x
            ax.set_xticks(sizes, [format_count(n) for n in sizes])
            ax.set_title(f"{opt} / {base}", fontsize=9)
            if j == 0:
                ax.set_ylabel("speedup vs reference")
            if i == len(bases) - 1:
                ax.set_xlabel("parameters")
            ax.legend(fontsize=6)
    return fig


def _plot_one_size(plt, results: list[dict], e2e: list[dict]):
    panels = [p for p in (results, e2e) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 0.5 + 0.28 * max(
        len(p) for p in panels)), squeeze=False)
    axes = list(axes[0])
    if results:
        ax = axes.pop(0)
        labels = [f"{r['optimizer']}/{r['base']} {r['contender']}" for r in results]
        y = range(len(results))
        ax.barh(y, [r["optimizer_ms_per_step"] for r in results], color="tab:blue",
                label="median step")
        ax.scatter([r["floor_ms"] for r in results if "floor_ms" in r],
                   [i for i, r in enumerate(results) if "floor_ms" in r], marker="|", s=200,
                   color="black", label="floor", zorder=3)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(f"optimizer ms per step, {format_count(results[0]['numel'])} "
                      f"{results[0]['dtype']} parameters")
        ax.legend(fontsize=7)
    if e2e:
        ax = axes.pop(0)
        labels = [f"{r['model']} b{r['batch']} {r['contender']}" for r in e2e]
        ratios = [r.get("ratio_vs_adamw_paired") or r.get("ratio_vs_adamw") or 0 for r in e2e]
        ax.barh(range(len(e2e)), ratios, color="tab:orange")
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_yticks(list(range(len(e2e))), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("training step / AdamW step (paired)")
    return fig


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    return dict(cpu=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, flatfused=flatfused.__version__,
                pytorch_optimizer=package_version("pytorch_optimizer"),
                python=platform.python_version(),
                last_level_cache_bytes=last_level_cache_bytes(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                cpu_isa=_cpu_isa(),
                allocator_env=allocator_env())  # CPU step times depend on it (allocator.py)


def _cpu_isa() -> str | None:
    """The instruction set the CPU kernels picked at run time (None without the extension)."""
    try:
        from flatfused import _C
        return _C.cpu_isa()
    except Exception:
        return None


def slug(name: str) -> str:
    """A device name as a file name: letters, digits, dots and dashes only, without trademark
    signs, the word CPU or a clock frequency ("Intel(R) Xeon(R) CPU @ 2.20GHz": "Intel-Xeon")."""
    name = re.sub(r"\((R|TM)\)", "", name, flags=re.IGNORECASE)
    name = re.sub(r"@.*$", "", name)
    name = re.sub(r"\b(CPU|Processor)\b", "", name, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-.")
    return name or "unknown"


def results_dir() -> Path:
    """Where runs are written unless ``--output`` says otherwise: outside any source tree, in
    the user's cache directory ($XDG_CACHE_HOME/flatfused/bench, ~/.cache by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "flatfused" / "bench"


def default_output(device: torch.device, machine: dict, prefix="headline") -> Path:
    return results_dir() / f"{prefix}_{device.type}_{slug(machine['gpu'] or machine['cpu'])}.json"
