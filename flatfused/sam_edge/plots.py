"""The original's four figures, drawn from the rows of a run (one per check), against the step:

- ``eigenvalues``: the Hessian's operator norm (or its top eigenvalues), the SAM edge and 2/η;
- ``eigenvalues_se_only``: the same without 2/η, which would squash a SAM run's curves;
- ``alignments``: |cos| of the gradient and of the SAM gradient with the top eigenvector;
- ``loss``: the training loss.

Each axis starts at 0 and ends 10% above the largest finite value, as the original's. The format
follows the file's suffix (.pdf or .png). matplotlib is imported only here.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

from ..sharpness import _plot


def _top(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else 1.0


def _axes(title: str):
    fig, axes = _plot.figure(1, height=4.0, width=6.4)
    ax = axes[0][0]
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    return fig, ax


def _eigenvalue_curves(ax, rows, steps, k: int) -> List[float]:
    drawn = []
    if k == 1:
        values = [r["hessian_norm"] for r in rows]
        ax.plot(steps, values, color="b", label=r"$\|H\|_{op}$")
        return values
    for i in range(1, k + 1):
        values = [abs(r[f"eigenvalue_{i}"]) for r in rows]
        ax.plot(steps, values, color="b", alpha=1.0 - 0.6 * (i - 1) / (k - 1),
                label=rf"$|\lambda_{i}|$")
        drawn += values
    return drawn


def write(rows: List[Dict[str, float]], k: int, title: str, paths: Dict[str, str]) -> List[str]:
    """Draws the figures whose paths are given (keys as in the module docstring); returns the
    paths written. ``rows`` must not be empty."""
    steps = [r["step"] for r in rows]
    edges = [r["sam_edge"] for r in rows]
    two_over_eta = rows[0]["two_over_eta"]
    written = []
    for key in ("eigenvalues", "eigenvalues_se_only"):
        if not paths.get(key):
            continue
        fig, ax = _axes(title)
        top = _top(_eigenvalue_curves(ax, rows, steps, k) + edges)
        ax.plot(steps, edges, color="g", label="SAM edge")
        if key == "eigenvalues":
            ax.axhline(two_over_eta, color="m", label=r"$2/\eta$")
            top = max(top, two_over_eta)
        ax.set_ylim(0, 1.1 * top)
        ax.legend(loc="best", fontsize=8)
        written.append(_plot.save(fig, paths[key]))
    if paths.get("alignments"):
        fig, ax = _axes(title)
        g = [r["grad_alignment"] for r in rows]
        s = [r["sam_grad_alignment"] for r in rows]
        ax.plot(steps, g, color="b", label="original gradient alignments")
        ax.plot(steps, s, color="g", label="SAM gradient alignments")
        ax.set_ylim(0, 1.1 * _top(g + s))
        ax.legend(loc="best", fontsize=8)
        written.append(_plot.save(fig, paths["alignments"]))
    if paths.get("loss"):
        fig, ax = _axes(title)
        losses = [r["loss"] for r in rows]
        ax.plot(steps, losses, color="b", label="training loss")
        ax.set_ylim(0, 1.1 * _top(losses))
        ax.legend(loc="best", fontsize=8)
        written.append(_plot.save(fig, paths["loss"]))
    return written
