"""The checks of single key values that the declarations in `keys` name (`check=`): test-time
view names, colour triples, plain folder names. Each returns why a value is refused, or None."""

from __future__ import annotations

import re
from typing import Any

VIEW_PATTERN = re.compile(r"^(orig|flip|(flip_)?zoom(\d+(\.\d*)?|\.\d+))$")


def view_reason(view: Any) -> str | None:
    """Why `view` is not a test-time view (orig | flip | zoom<f> | flip_zoom<f>, 0.5 <= f <= 2),
    or None."""
    if not isinstance(view, str) or not VIEW_PATTERN.match(view):
        return (f"view {view!r} is not one of orig, flip, zoom<f>, flip_zoom<f> (e.g. "
                "zoom1.15)")
    if "zoom" in view and not 0.5 <= float(view.split("zoom")[1]) <= 2.0:
        return f"view {view!r} zooms outside 0.5..2"
    return None


def _views(values: list) -> str | None:
    return next(filter(None, (view_reason(v) for v in values)), None)


def _three(values: list) -> str | None:
    return None if len(values) == 3 else f"expects 3 values (r, g, b); got {values!r}"


def _plain_name(value: str) -> str | None:
    if not value or "/" in value or value in (".", ".."):
        return f"must be a plain folder name; got {value!r}"
    return None
