"""``--plot``: a PNG of blocks in use and memory pressure over the run's steps.

matplotlib is imported here, on demand, and drawn through its Agg canvas
without pyplot, so the demo never touches a user's global matplotlib
state and the core keeps numpy and pluggy as its only dependencies.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ...config import CacheConfig
from ...errors import InvalidArgument, PagedKvError
from ...policy.pressure import MemoryPressure
from .scheduler import StepRecord

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

__all__ = ["check_plot_target", "write_plot"]


def _matplotlib() -> tuple[type[FigureCanvasAgg], type[Figure]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PagedKvError(f"--plot needs matplotlib, which is not installed ({exc}); "
                           "pip install matplotlib") from exc
    return FigureCanvasAgg, Figure


def check_plot_target(path: str) -> None:
    """Fail before the run, not after it, if the plot cannot be written (no matplotlib, no such folder)."""
    _matplotlib()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidArgument(f"--plot {path}: the folder {folder} does not exist")


def write_plot(path: str, records: list[StepRecord], config: CacheConfig, title: str) -> None:
    """Draw blocks in use (with the pressure watermarks) and the pressure level per step into ``path``."""
    FigureCanvasAgg, Figure = _matplotlib()  # noqa: N806 (classes)
    steps = [r.step for r in records]
    fig = Figure(figsize=(10, 6), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot(steps, [r.used_blocks for r in records], color="tab:blue", label="blocks in use")
    top.plot(steps, [r.running for r in records], color="tab:green", lw=0.8, label="running requests")
    top.plot(steps, [r.swapped for r in records], color="tab:red", lw=0.8, label="swapped-out requests")
    n = config.num_blocks
    for level, fraction in (("medium", config.pressure.medium), ("high", config.pressure.high),
                            ("critical", config.pressure.critical)):
        top.axhline(fraction * n, color="grey", ls=":", lw=0.8)
        top.annotate(level, (0, fraction * n), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                     va="bottom")
    top.axhline(n, color="black", lw=0.8)
    top.set_ylabel(f"blocks (pool: {n})")
    top.set_title(title)
    top.legend(loc="upper right", fontsize=8)
    bottom.step(steps, [int(r.level) for r in records], where="post", color="tab:orange")
    bottom.set_yticks([int(level) for level in MemoryPressure], [level.name for level in MemoryPressure])
    bottom.set_ylim(-0.3, 3.3)
    bottom.set_ylabel("pressure")
    bottom.set_xlabel("step")
    fig.savefig(path, dpi=100)
