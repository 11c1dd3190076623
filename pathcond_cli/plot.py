"""``--plot FILE.png``: the picture of what the rescaling did.

One panel per layer (node with parameters): the distribution of log10 diag(G) over its parameters before
and after, on a shared axis; above them, one panel of the per-layer relative SGD step factors
g_after/g_before (geometric mean, bar from min to max). Histograms are drawn from the same entries as the
report's medians (all of a layer's entries up to ``analysis.MEDIAN_SAMPLE``, an evenly strided sample
beyond).

matplotlib is optional (``pip install "pathcond[plot]"``): :func:`require_matplotlib` is called before any
work, so a missing one is a usage error (exit 2) that costs nothing. The PNG is written to a temporary file
beside its target and renamed into place, so a failure never leaves half a picture.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .analysis import Analysis

INSTALL_HINT = 'pip install "pathcond[plot]"'
COLUMNS = 4
DPI = 80


@dataclass
class PlotInfo:
    path: Path
    layer_panels: int  # histogram panels drawn (one per layer, in the report's order)
    size: tuple[int, int]  # width, height in pixels


def require_matplotlib() -> None:
    """A usage error (exit 2) with the install hint when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def check_plot_path(path: Path) -> None:
    """What the name alone can tell: a .png file name (the format is chosen by it, and it keeps a typo from
    naming a model)."""
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: give a file name ending in .png")


def write_plot(analysis: Analysis, path: Path, title: str) -> PlotInfo:
    """Draw the figure and move it into place atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig, panels = _figure(Figure, analysis, title)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; a picture gets the usual mode
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return PlotInfo(path, panels, (width, height))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _figure(Figure, analysis: Analysis, title: str):
    """The figure and its number of layer panels."""
    import numpy as np

    from .analysis import layer_entries, layer_samples

    rows = analysis.layers
    entries = layer_entries(analysis)
    u = analysis.u
    n_rows = math.ceil(len(rows) / COLUMNS) if rows else 0
    fig = Figure(figsize=(4.0 * COLUMNS, 2.4 + max(0.25 * len(rows), 2.0) + 2.4 * n_rows), layout="constrained")
    spec = fig.add_gridspec(1 + n_rows, COLUMNS, height_ratios=[max(0.25 * len(rows), 2.0)] + [2.4] * n_rows)
    fig.suptitle(title, fontsize=10)
    _steps_panel(fig.add_subplot(spec[0, :]), rows)
    ln10 = math.log(10.0)
    for k, row in enumerate(rows):
        ax = fig.add_subplot(spec[1 + k // COLUMNS, k % COLUMNS])
        before, after = (t.numpy() / ln10 for t in layer_samples(entries[row.node], u))
        both = np.concatenate([before, after])
        if both.size:
            lo, hi = float(both.min()), float(both.max())
            bins = np.linspace(lo - 0.05, hi + 0.05, 31)
            ax.hist(before, bins=bins, color="tab:red", alpha=0.5, label="before")
            ax.hist(after, bins=bins, color="tab:green", alpha=0.5, label="after")
        step = row.relative_step
        ax.set_title(f"{_short(row.node)} ({row.op})\nrel. step ×{step.geo_mean:.2g} [{step.min:.2g}, {step.max:.2g}]",
                     fontsize=8)
        ax.set_xlabel("log10 diag(G)", fontsize=7)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    return fig, len(fig.axes) - 1  # the relative-step panel, then one per layer


def _steps_panel(ax, rows) -> None:
    """Per-layer relative SGD step factor after/before: a dot at the geometric mean, a bar to min and max."""
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows):
        step = row.relative_step
        if all(math.isfinite(v) and v > 0 for v in (step.min, step.geo_mean, step.max)):
            ax.plot([step.min, step.max], [y, y], color="grey", lw=2)
            ax.plot([step.geo_mean], [y], "o", color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(ys, [_short(r.node) for r in rows], fontsize=7)
    ax.set_xlabel("relative SGD step after / before = g_after / g_before (● geometric mean, bar: min to max)",
                  fontsize=8)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


__all__ = ["INSTALL_HINT", "PlotInfo", "check_plot_path", "require_matplotlib", "write_plot"]
