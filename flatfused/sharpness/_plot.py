"""matplotlib, imported only when a plot is asked for, without touching pyplot's global state."""
from __future__ import annotations

import os

FORMATS = (".png", ".pdf")


def check_path(path) -> str:
    """The plot path as a string; refuses a suffix other than .png/.pdf before any work is done."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"plot path must end in .png or .pdf, got {path!r}")
    return path


def figure(nrows: int, ncols: int = 1, height: float = 2.6, width: float = 7.0, heights=None):
    """A Figure and its axes on the Agg canvas (``heights``: one height per row, in inches,
    instead of ``height`` each). pyplot is avoided on purpose: it would pick (or need) a GUI
    backend and keep the figure alive in its global registry."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib "
                          "(or pip install 'flatfused[plot]')") from exc
    heights = list(heights) if heights is not None else [height] * nrows
    fig = Figure(figsize=(width * ncols, sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, height_ratios=heights)
    return fig, axes


def save(fig, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
