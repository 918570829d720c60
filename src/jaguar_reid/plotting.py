"""The one matplotlib set-up of the project: the Agg backend, no display, no GUI.

A foundation module: standard library and matplotlib only. matplotlib is imported when a
function here is first called, never at import, so importing a module that may draw (the data
check, the report, and through it training) costs nothing and selects no backend.
"""

from __future__ import annotations

import io
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BACKEND = "Agg"  # renders to files and buffers only: works without a display, in workers too
DPI = 100


def setup_matplotlib() -> ModuleType:
    """matplotlib with the Agg backend selected; call it before drawing anything."""
    import matplotlib

    matplotlib.use(BACKEND)
    return matplotlib


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (close every figure it opens: it keeps them)."""
    setup_matplotlib()
    import matplotlib.pyplot as plt

    return plt


def new_figure(width: float, height: float) -> Figure:
    """A bare Figure of `width` x `height` inches, constrained layout: no pyplot, so no global
    state to close and nothing shared between threads or worker processes."""
    setup_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png_bytes(fig: Figure) -> bytes:
    """The figure as a PNG file's bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
