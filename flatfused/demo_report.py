"""The reports of ``flatfused demo``: mean and spread per optimizer, one verdict line per
measure, the Markdown table and the bar-chart figure."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .demo_tradeoff import COLORS
from .demo_variants import VARIANTS

# (key, column title, which direction is better, format)
MEASURES = (
    ("test_acc", "test acc %", "higher", "{:.1f}"),
    ("memorised", "noisy labels fit %", "lower", "{:.1f}"),
    ("train_loss", "train loss", "lower", "{:.3f}"),
    ("hessian_trace", "Hessian trace", "lower", "{:.1f}"),
    ("top_eigenvalue", "top eigenvalue", "lower", "{:.2f}"),
    ("keskar", "Keskar sharpness", "lower", "{:.2f}"),
    ("noise_stability", "noise stability", "lower", "{:.4f}"),
)
FLATNESS = ("hessian_trace", "top_eigenvalue", "keskar", "noise_stability")



def summarise(results: dict, names) -> dict:
    """mean and std (sample std over seeds; 0 for one seed) of each measure per optimizer."""
    summary = {}
    for name in names:
        runs = results[name]
        summary[name] = {}
        for key, *_ in MEASURES:
            values = [r[key] for r in runs]
            summary[name][key] = dict(
                mean=statistics.fmean(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0)
    return summary


def verdicts(results: dict, summary: dict, names, labels: dict) -> list[str]:
    """One honest line per measure: the best optimizer by mean, in how many seeds it was best
    (paired: same data, init and order), and whether its lead exceeds the seed spread."""
    lines = []
    if len(names) < 2:
        return lines
    seeds = len(results[names[0]])
    for key, title, better, fmt in MEASURES:
        sign = 1 if better == "higher" else -1
        order = sorted(names, key=lambda n: -sign * summary[n][key]["mean"])
        best, second = order[0], order[1]
        b, s = summary[best][key], summary[second][key]
        wins = sum(
            all(sign * results[best][i][key] > sign * results[o][i][key] for o in names if o != best)
            for i in range(seeds))
        gap = abs(b["mean"] - s["mean"])
        if gap == 0:
            tied = [labels[n] for n in order if summary[n][key]["mean"] == b["mean"]]
            lines.append(f"{title} ({better} is better): {', '.join(tied)} tie")
            continue
        word = "best" if key in ("test_acc", "memorised", "train_loss") else "flattest"
        line = (f"{title} ({better} is better): {word} {labels[best]}, best in {wins}/{seeds} "
                f"seeds; lead over {labels[second]} {fmt.format(gap)} ")
        if seeds == 1:
            line += "(one seed: no spread to judge it by)"
        else:
            line += (("exceeds" if gap > b["std"] + s["std"] else "does NOT exceed")
                     + f" the seed spread (std {fmt.format(b['std'])} + {fmt.format(s['std'])})")
        lines.append(line)
    return lines


def table(summary: dict, names, labels: dict) -> str:
    head = ["optimizer"] + [title for _, title, _, _ in MEASURES]
    rows = [head, ["---"] + ["---:"] * len(MEASURES)]
    for name in names:
        row = [labels[name]]
        for key, _, _, fmt in MEASURES:
            m = summary[name][key]
            row.append(f"{fmt.format(m['mean'])} ± {fmt.format(m['std'])}")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plot(summary: dict, names, labels: dict, path: Path, title: str) -> str | None:
    """Bar charts with ±1 std error bars, one panel per measure (horizontal, one bar per
    optimizer, cheap schedules lighter than their family's full optimizer); None if matplotlib
    is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cols = 4
    rows = math.ceil(len(MEASURES) / cols)
    fig, axes = plt.subplots(rows, cols, sharey=True,
                             figsize=(2.6 * cols + 2.2, (1.0 + 0.22 * len(names)) * rows))
    axes = list(axes.flat)
    where = list(range(len(names)))[::-1]  # the first optimizer on top
    for ax, (key, label, better, _) in zip(axes, MEASURES):
        means = [summary[n][key]["mean"] for n in names]
        stds = [summary[n][key]["std"] for n in names]
        bars = ax.barh(where, means, xerr=stds, capsize=2,
                       color=[COLORS[VARIANTS[n].family] for n in names])
        for bar, n in zip(bars, names):
            if VARIANTS[n].cheap:
                bar.set_alpha(0.55)
        ax.set_yticks(where, [labels[n] for n in names])
        ax.set_title(f"{label}\n({better} is better)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(MEASURES):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
