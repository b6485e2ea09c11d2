"""The outputs of ``flatfused sharpness``: the table printed, the per-layer traces' CSV and the
figure (when matplotlib is installed)."""
from __future__ import annotations

import csv
import math


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.6g}"
    return str(x)


def table(res: dict, header: str) -> str:
    rows = [("loss", _fmt(res["loss"]))]
    if "trace" in res:
        tr = res["trace"]
        count = f"{tr['products']} products" if tr["probes"] is None else f"{tr['probes']} probes"
        rows.append((f"Hessian trace ({tr['method']}, {count})", _fmt(tr["value"])))
        lay = res.get("layers")
        if lay and lay.get("types"):
            what = "weights" if lay["params"] == "weight" else "parameters"
            rows.append((f"  over {lay['count']} layers ({'/'.join(lay['types'])} {what}), "
                         f"{lay['numel']:,} parameters", ""))
        rows += [(f"  {name}", _fmt(v)) for name, v in tr["per_layer"].items()]
    if "top_eigenvalues" in res:
        ev = res["top_eigenvalues"]
        for i, v in enumerate(ev["values"]):
            rows.append((f"eigenvalue {i + 1} ({ev['method']})", _fmt(v)))
    if "density" in res:
        d = res["density"]
        nodes = [x for run in d["nodes"] for x in run]
        mean = sum(x * w for n, ws in zip(d["nodes"], d["weights"])
                   for x, w in zip(n, ws)) / len(d["nodes"])
        rows.append((f"density: Ritz values in ({d['iters']} steps x {d['runs']})",
                     f"[{_fmt(min(nodes))}, {_fmt(max(nodes))}]"))
        rows.append(("density: mean eigenvalue (trace / P)", _fmt(mean)))
    if "keskar" in res:
        k = res["keskar"]
        rows.append((f"Keskar sharpness (eps {k['epsilon']:g}, {k['steps']} steps)", _fmt(k["value"])))
    if "noise_stability" in res:
        ns = res["noise_stability"]
        rows.append((f"noise stability (sigma {ns['sigma']:g}, {ns['samples']} draws)",
                     f"{_fmt(ns['mean'])} +- {_fmt(ns['stderr'])}"))
        if "quadratic_prediction" in ns:
            rows.append(("  sigma^2/2 * trace (quadratic model)", _fmt(ns["quadratic_prediction"])))
    width = max(len(name) for name, _ in rows)
    lines = [header, f"{'quantity':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def plot(res: dict, path: str) -> str | None:
    """The eigenvalue density (log scale), the per-layer traces and the top eigenvalues, as
    far as they were measured; None when none was."""
    from . import _plot
    from .density import density_on_grid

    panels = [k for k in ("density", "trace", "top_eigenvalues") if k in res]
    if not panels:
        return None
    _plot.check_path(path)
    # the per-layer panel grows with the layers, so that each keeps a readable label
    heights = [max(3.0, 0.8 + 0.14 * len(res["trace"]["per_layer"])) if k == "trace" else 3.0
               for k in panels]
    fig, axes = _plot.figure(len(panels), heights=heights)
    for ax, kind in zip((a[0] for a in axes), panels):
        if kind == "density":
            d = res["density"]
            grid, dens = density_on_grid(d["nodes"], d["weights"])  # PyHessian-like defaults
            ax.semilogy(grid.tolist(), (dens + 1e-12).tolist())
            ax.set_ylim(bottom=float(dens.max()) * 1e-6)  # six decades, not the numerical floor
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density (SLQ)")
            ax.set_title("Hessian eigenvalue density", fontsize=10)
        elif kind == "trace":
            layers = res["trace"]["per_layer"]
            ax.barh(range(len(layers)), list(layers.values()))
            ax.set_yticks(range(len(layers)), list(layers), fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("trace of the diagonal block")
            ax.set_title(f"per-layer Hessian traces (total {res['trace']['value']:.4g})", fontsize=10)
        else:
            values = res["top_eigenvalues"]["values"]
            ax.bar([str(i + 1) for i in range(len(values))], values)
            ax.set_xlabel("rank")
            ax.set_ylabel("eigenvalue")
            ax.set_title("top Hessian eigenvalues", fontsize=10)
    return _plot.save(fig, path)


def write_layer_csv(res: dict, path: str) -> str:
    """The per-layer traces, one row per layer in the model's order (``index, layer, trace,
    numel, parameters``), then a ``total`` row with their sum (no index)."""
    lay = res["layers"]

    def number(x):  # full precision; NaN/inf as an empty field, as the tracker's CSV
        return repr(float(x)) if math.isfinite(x) else ""

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "layer", "trace", "numel", "parameters"])
        for i, (layer, value) in enumerate(res["trace"]["per_layer"].items()):
            writer.writerow([i, layer, number(value), lay["sizes"][layer],
                             " ".join(lay["parameters"][layer])])
        writer.writerow(["", "total", number(res["trace"]["value"]), lay["numel"], ""])
    return path


def _finite(x):
    """NaN/inf as null: strict JSON has neither."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
