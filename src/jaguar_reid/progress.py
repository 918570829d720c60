"""Progress bars where a person waits (training, embedding, tuning, local verification), one
decision for all of them: shown on a terminal, quiet when the output is a file or a pipe (a log
would fill with redraws), unless `JAGUAR_REID_PROGRESS` says otherwise (1: always, e.g. a
notebook that renders carriage returns and reads the output through a pipe; 0: never)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

PROGRESS_ENV = "JAGUAR_REID_PROGRESS"


def forced() -> bool | None:
    """`JAGUAR_REID_PROGRESS`: True (1), False (0), None (unset or anything else)."""
    value = os.environ.get(PROGRESS_ENV, "").strip()
    return {"1": True, "0": False}.get(value)


def disable(main: bool = True) -> bool | None:
    """tqdm's `disable`: True (hidden) on a process that is not the writing one (the other
    ranks of a data-parallel run) or when turned off; False when forced on; None (tqdm hides
    the bar unless its stream is a terminal) otherwise."""
    if not main:
        return True
    on = forced()
    return None if on is None else not on


def shown(stream: IO[str] | None = None) -> bool:
    """Whether a bar written to `stream` (default: stderr, tqdm's) would show."""
    on = forced()
    if on is not None:
        return on
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def bar(iterable: Iterable | None = None, desc: str = "", main: bool = True,
        **options: Any) -> tqdm:
    """A tqdm bar with the shared settings: gone when done (the line printed after it says what
    happened), at most one redraw a second, `disable` as above."""
    settings = {"leave": False, "mininterval": 1.0, "dynamic_ncols": True,
                "disable": disable(main)} | options
    return tqdm(iterable, desc=desc, **settings)
