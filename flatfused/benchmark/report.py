"""Tables, the plot, and the machine facts a report records."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

import flatfused
from flatfused.allocator import allocator_env

from .spec import format_count


def table(report: dict, numel: int | None = None, dtype: str | None = None,
          base: str | None = None) -> str:
    """The suite's rows as a Markdown table (optionally one size/dtype/base)."""
    lines = ["| optimizer | base | dtype | params | contender | optimizer ms/step | Mparams/s | "
             "vs reference | vs baseline | GB/s | of copy BW | state B/param (beyond base) | "
             "peak B/param |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    for r in report.get("results", []):
        if (numel and r["numel"] != numel) or (dtype and r["dtype"] != dtype) or \
                (base and r["base"] != base):
            continue
        if not r.get("reliable", True):
            r = dict(r, contender=r["contender"] + " (unreliable: backward passes >90% of step)")
        peak = "-" if r["peak_bytes_per_param"] is None else f"{r['peak_bytes_per_param']:.0f}"
        lines.append(
            f"| {r['optimizer']} | {r['base']} | {r['dtype']} | {format_count(r['numel'])} | "
            f"{r['contender']} | {r['optimizer_ms_per_step']:.1f} | {r['params_per_s'] / 1e6:.0f} | "
            f"{x(r['speedup_vs_reference'])} | {x(r['speedup_vs_baseline'])} | "
            f"{r['gb_per_s']:.1f} | {100 * r['copy_fraction']:.0f}% | "
            f"{r['state_bytes_per_param']:.0f} ({r['state_bytes_per_param_beyond_base']:.0f}) | "
            f"{peak} |")
    return "\n".join(lines)


def summary_table(report: dict, numel: int, dtype: str = "float32") -> str:
    """One row per optimizer and base at one size: optimizer ms per step of each contender, with
    flatfused's speedups, share of copy bandwidth and state beyond the base optimizer."""
    rows = [r for r in report.get("results", []) if r["numel"] == numel and r["dtype"] == dtype]
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    head = ["optimizer / base"] + [f"{c} ms" for c in contenders]
    lines = ["| " + " | ".join(head) + " | flatfused vs reference | vs baseline | of copy BW | "
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
            def x(v):
                return "-" if v is None else f"{v:.2f}x"
            cells += [x(ff["speedup_vs_reference"]), x(ff["speedup_vs_baseline"]),
                      f"{100 * ff['copy_fraction']:.0f}%",
                      f"{ff['state_bytes_per_param_beyond_base']:.0f} "
                      f"(reference {group['reference']['state_bytes_per_param_beyond_base']:.0f})"
                      if "reference" in group else
                      f"{ff['state_bytes_per_param_beyond_base']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(report: dict) -> str:
    lines = ["| params | dtype | copy ms (GB/s) | torch normal_ ms | flatfused noise_ ms | "
             "simulated backward ms (add / copy) |", "| ---: | --- | ---: | ---: | --- | ---: |"]
    for c in report.get("calibration", []):
        noise = ", ".join(f"{b} {t:.1f}" for b, t in c["flatfused_noise_ms"].items()) or "-"
        lines.append(f"| {format_count(c['numel'])} | {c['dtype']} | {c['copy_ms']:.2f} "
                     f"({c['copy_gb_per_s']:.1f}) | {c['torch_normal_ms']:.1f} | {noise} | "
                     f"{c['backward_add_ms']:.1f} / {c['backward_copy_ms']:.1f} |")
    return "\n".join(lines)


def e2e_table(report: dict) -> str:
    rows = report.get("e2e", [])
    faults = any(r.get("page_faults_per_step") is not None for r in rows)
    lines = ["| model | params | batch | contender | ms/step (median) | vs AdamW step | "
             "fastest step ms | vs AdamW (fastest) | vs AdamW (paired) |"
             + (" page faults/step |" if faults else ""),
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: |" if faults else "")]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    for r in rows:
        f = r.get("page_faults_per_step")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['contender']} "
                     f"| {r['ms_per_step']:.1f} | {x(r['ratio_vs_adamw'])} | {r['ms_min']:.1f} | "
                     f"{x(r.get('ratio_vs_adamw_min'))} | {x(r.get('ratio_vs_adamw_paired'))} |"
                     + ((" - |" if f is None else f" {f:.0f} |") if faults else ""))
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    lines = ["| target | measured | goal | met |", "| --- | ---: | --- | --- |"]
    for t in report.get("targets", []):
        lines.append(f"| {t['target']} | {t['measured']:.2f} | {t['goal']} | "
                     f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    """Speedup vs the reference against size, one panel per optimizer and base, a line per
    contender and dtype. Needs matplotlib (imported only here)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    results = report.get("results", [])
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
    machine = report.get("machine", {})
    fig.suptitle(f"flatfused bench on {machine.get('gpu') or machine.get('cpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
                python=platform.python_version(),
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


def default_output(device: torch.device, machine: dict, prefix="suite") -> Path:
    name = (machine["gpu"] or machine["cpu"]).replace(" ", "-").replace("/", "-")
    return Path("bench/results") / f"{prefix}_{device.type}_{name}.json"
