"""``flatfused demo``'s compute-flatness trade-off: how much of its full optimizer's gain over
SGD each cheap schedule keeps, as a table and a plot against passes per step.

The gain kept is ``(SGD - cheap) / (SGD - full)`` for the Hessian trace (lower is flatter) and
``(cheap - SGD) / (full - SGD)`` for test accuracy: 100% is the full optimizer's gain, 0% SGD's
result, below 0 worse than SGD. It is the ratio of the seed means, with the range of the paired
per-seed ratios (same data, initialisation and batch order) beside it, so that one lucky seed
cannot hide.
"""
from __future__ import annotations

import math
from pathlib import Path

from .demo_variants import VARIANTS

# (measure, which direction is better): the two gains the table reports
GAINS = (("hessian_trace", "lower"), ("test_acc", "higher"))


def _kept(sgd: float, full: float, cheap: float, better: str) -> float | None:
    gain = full - sgd if better == "higher" else sgd - full
    if not gain > 0:
        return None  # the full optimizer gains nothing over SGD: no fraction of it to keep
    return (cheap - sgd if better == "higher" else sgd - cheap) / gain


def kept_gains(results: dict, summary: dict, names) -> dict:
    """For each cheap schedule whose full optimizer and SGD ran too: per measure, the fraction
    of the full optimizer's mean gain over SGD it keeps (``mean``, None when the full optimizer
    gains nothing) and the paired per-seed fractions (``seeds``, None where a seed's full run
    gained nothing)."""
    out = {}
    for name in names:
        variant = VARIANTS[name]
        if not variant.cheap or "sgd" not in names or variant.family not in names:
            continue
        out[name] = {}
        for key, better in GAINS:
            means = [summary[n][key]["mean"] for n in ("sgd", variant.family, name)]
            per_seed = [_kept(s[key], f[key], c[key], better) for s, f, c in zip(
                results["sgd"], results[variant.family], results[name])]
            out[name][key] = dict(mean=_kept(*means, better), seeds=per_seed)
    return out


def _pct(x: float) -> str:
    return str(round(100 * x) + 0)  # + 0: no "-0"


def _percent(kept: dict) -> str:
    if kept["mean"] is None:
        return "n/a (no gain to keep)"
    text = f"{_pct(kept['mean'])}%"
    seeds = [k for k in kept["seeds"] if k is not None]
    if len(seeds) > 1:
        text += f" ({_pct(min(seeds))} to {_pct(max(seeds))})"
    missing = len(kept["seeds"]) - len(seeds)
    if missing:
        text += f" (no gain in {missing}/{len(kept['seeds'])} seeds)"
    return text


def tradeoff_table(cfg, summary: dict, names, plans: dict, kept: dict) -> str:
    """Markdown: per optimizer its radius, passes per step, steps (full ones), passes, test
    accuracy, Hessian trace and the gains kept."""
    head = ["optimizer", "radius", "passes/step", "steps (full)", "passes", "test acc %",
            "Hessian trace", "trace gain kept", "acc gain kept"]
    rows = [head, ["---", "---"] + ["---:"] * (len(head) - 2)]
    for name in names:
        variant, p = VARIANTS[name], plans[name]
        radius = variant.radius(cfg)
        acc, trace = summary[name]["test_acc"], summary[name]["hessian_trace"]
        row = [variant.label(cfg),
               "-" if radius is None else f"{variant.radius_name} {radius:.3g}",
               f"{p['passes'] / p['steps']:.2f}", f"{p['steps']} ({p['full_steps']})",
               str(p["passes"]), f"{acc['mean']:.1f} ± {acc['std']:.1f}",
               f"{trace['mean']:.1f} ± {trace['std']:.1f}"]
        if name in kept:
            row += [_percent(kept[name]["hessian_trace"]), _percent(kept[name]["test_acc"])]
        else:
            row += ["", ""]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


COLORS = {"sgd": "#7f7f7f", "sam": "#1f77b4", "nso": "#d62728"}


def _marker(variant) -> str:
    if variant.reuse:
        return "D"
    if variant.every:
        return "s"
    return "^" if variant.late else "o"


def plot_tradeoff(cfg, summary: dict, names, plans: dict, path: Path, title: str) -> str | None:
    """Test accuracy and Hessian trace (mean ± std) against passes per step, one point per
    optimizer: colour by family, shape by schedule, hollow where the radius is scaled (a legend,
    not labels, since several schedules share a passes-per-step value); None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    legend_rows = math.ceil(len(names) / 3)
    height = 4.4 + 0.2 * legend_rows
    fig, axes = plt.subplots(1, 2, figsize=(11, height))
    xs = [plans[n]["passes"] / plans[n]["steps"] for n in names]
    for ax, (key, label) in zip(axes, (("test_acc", "test accuracy % (higher is better)"),
                                       ("hessian_trace", "Hessian trace (lower is flatter)"))):
        for name, x in zip(names, xs):
            variant = VARIANTS[name]
            m = summary[name][key]
            color = COLORS[variant.family]
            ax.errorbar([x], [m["mean"]], yerr=[m["std"]], fmt=_marker(variant), capsize=3,
                        color=color, markerfacecolor="white" if variant.scaled else color,
                        markersize=6, label=variant.label(cfg))
        ax.set_xlabel("forward-backward passes per step (the same total passes for all)",
                      fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_xlim(0.9, max(xs) + 0.1)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def radius_verdicts(results: dict, summary: dict, names, labels: dict) -> list[str]:
    """For each schedule run with both radii: the scaled radius against the same one, in test
    accuracy and Hessian trace, with the paired seeds it was better in."""
    lines = []
    for name in names:
        variant = VARIANTS[name]
        twin = name.removesuffix("-scaled")
        if not variant.scaled or twin not in names:
            continue
        parts = []
        for key, title, better in (("test_acc", "test acc", "higher"),
                                   ("hessian_trace", "Hessian trace", "lower")):
            sign = 1 if better == "higher" else -1
            wins = sum(sign * s[key] > sign * t[key] for s, t in zip(results[name], results[twin]))
            parts.append(f"{title} {summary[name][key]['mean']:.1f} vs "
                         f"{summary[twin][key]['mean']:.1f} ({better} in {wins}/"
                         f"{len(results[name])} seeds)")
        lines.append(f"{labels[name]} against the same radius: " + ", ".join(parts))
    return lines
