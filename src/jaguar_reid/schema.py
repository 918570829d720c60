"""How a config key is declared: its type, default, bounds or choices, one line of doc, and its
role. The keys themselves are declared in `jaguar_reid.keys`, one dataclass per section; this
module reads those declarations (`collect`) and checks one value against one key (`coerce`).

Roles say what a key decides, and everything that depends on that follows from them:
- `recipe`: decides the trained weights. Only these enter the training digest (a finished fold
  is reused only for the same recipe), and a trained fold is always read with its own.
- `runtime`: where and how fast (paths, devices, workers, threads, guards). Never in a digest;
  today's value always applies.
- `after`: what happens after training (views, post-processing, tuning, local verification,
  submission, reports). Never in the training digest; today's value applies.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RECIPE, RUNTIME, AFTER = "recipe", "runtime", "after"
ROLES = (RECIPE, RUNTIME, AFTER)
AUTO = "auto"  # a value resolved later (from the backbone, the CPU count, ...)
_UNSET = object()
_META = "jaguar_reid.key"


class BadValue(ValueError):
    """A value a key cannot take; the message names the key (see `config.ConfigError`)."""


@dataclass(frozen=True)
class Key:
    """One config key. `kind` is the value type (bool, int, float, str, list); `item` the type
    of a list's items. Bounds (`ge`, `gt`, `le`, `lt`) apply to a number or to each item of a
    list. `auto`: the text `auto` is also accepted. `neutral`: a recipe key added after folds
    were trained, at the value that trains exactly as before it existed (at that value it stays
    out of the training digest, so older folds keep their digest). `content`: a recipe key naming
    a file or experiments, digested by what they hold rather than by the name."""

    name: str
    kind: type
    default: Any
    role: str
    doc: str
    item: type | None = None
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_items: int = 0
    auto: bool = False
    neutral: Any = _UNSET
    content: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a reason when the value is bad

    @property
    def has_neutral(self) -> bool:
        return self.neutral is not _UNSET


def key(default: Any, role: str, doc: str, **spec: Any) -> Any:
    """A dataclass field declaring one key (see `Key` for `spec`)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}; got {role!r}")
    meta = {_META: {"role": role, "doc": doc, **spec}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A dataclass field holding a section of keys."""
    return field(default_factory=cls)


def _kind(hint: Any) -> tuple[type, type | None]:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return list, item
    return hint, None


def collect(root: type, prefix: str = "") -> dict[str, Key]:
    """Every key declared under dataclass `root`, by dotted name, in declaration order."""
    hints = typing.get_type_hints(root)
    out: dict[str, Key] = {}
    for f in dataclasses.fields(root):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(collect(hints[f.name], name + "."))
            continue
        meta = dict(f.metadata[_META])
        kind, item = _kind(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[name] = Key(name=name, kind=kind, item=item, default=default, **meta)
    return out


def section_docs(root: type) -> dict[str, str]:
    """A section's docstring (its first paragraph, one line) by section name."""
    hints = typing.get_type_hints(root)
    out = {}
    for f in dataclasses.fields(root):
        if dataclasses.is_dataclass(hints[f.name]):
            doc = (hints[f.name].__doc__ or "").strip().split("\n\n")[0]
            out[f.name] = " ".join(doc.split())
    return out


# --------------------------------------------------------------------------- one value


def _type_name(spec: Key) -> str:
    if spec.kind is list:
        name = f"list of {spec.item.__name__}" if spec.item else "list"
    else:
        name = spec.kind.__name__
    return f"auto or {name}" if spec.auto and spec.kind is not str else name


def _number_text(text: str, kind: type) -> Any:
    """A number written as text (`1e-3`, which YAML 1.1 leaves a string), else the text."""
    try:
        return kind(text.strip())
    except ValueError:
        return text


def _scalar(value: Any, kind: type) -> Any:
    """`value` as `kind`, or _UNSET when it is not one (ints pass as floats; a YAML number
    passes as text, since `fold: 0` or `exp: 001` mean text)."""
    if kind is bool:
        return value if isinstance(value, bool) else _UNSET
    if isinstance(value, bool):
        return _UNSET
    if isinstance(value, str) and kind in (int, float):
        value = _number_text(value, kind)  # YAML 1.1 reads `1e-3` as text
    if kind is int:
        return value if isinstance(value, int) else _UNSET
    if kind is float:
        return float(value) if isinstance(value, int | float) else _UNSET
    if kind is str:
        return str(value) if isinstance(value, str | int | float) else _UNSET
    return value


def _bounds_reason(spec: Key, v: Any) -> str | None:
    if isinstance(v, float) and not math.isfinite(v):  # lr=nan trains until the first NaN loss
        return "a finite number"
    rules = ((spec.ge, lambda: v >= spec.ge, ">="), (spec.gt, lambda: v > spec.gt, ">"),
             (spec.le, lambda: v <= spec.le, "<="), (spec.lt, lambda: v < spec.lt, "<"))
    if not all(ok() for bound, ok, _ in rules if bound is not None):
        return " and ".join(f"{op} {_number(bound)}" for bound, _, op in rules
                            if bound is not None)
    return None


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def bounds_text(spec: Key) -> str:
    """The key's range or choices as a reader would write them ("" when free)."""
    if spec.choices:
        parts = [" | ".join(repr(c) if c == "" else str(c) for c in spec.choices)]
    else:
        parts = [f"{op} {_number(bound)}" for bound, op in ((spec.ge, ">="), (spec.gt, ">"),
                                                            (spec.le, "<="), (spec.lt, "<"))
                 if bound is not None]
        if spec.auto:
            parts.insert(0, AUTO)
    if spec.min_items:
        parts.append(f"at least {spec.min_items} item{'s' if spec.min_items > 1 else ''}")
    return ", ".join(parts)


def coerce(spec: Key, value: Any) -> Any:
    """`value` checked against `spec`: its type, bounds, choices and own check. Raises
    `BadValue` with the reason (the caller adds where the value came from)."""
    if spec.auto and value == AUTO:
        return value
    if spec.kind is list:
        if not isinstance(value, list):
            raise BadValue(f"expects {_type_name(spec)} (default {spec.default!r}), got "
                            f"{value!r} ({type(value).__name__})")
        # A whole number stays as written in a list of floats: saved configs and training
        # digests have always held it so.
        items = [v if spec.item is float and type(v) is int
                 else _scalar(v, spec.item) if spec.item else v for v in value]
        if any(v is _UNSET for v in items):
            bad = value[items.index(_UNSET)]
            raise BadValue(f"expects {_type_name(spec)}, got item {bad!r} "
                            f"({type(bad).__name__})")
        if len(items) < spec.min_items:
            raise BadValue(f"needs at least {spec.min_items} value(s); got {value!r}")
        checked = items
    else:
        scalar = _scalar(value, spec.kind)
        if scalar is _UNSET:
            raise BadValue(f"expects {_type_name(spec)} (default {spec.default!r}), got "
                            f"{value!r} ({type(value).__name__})")
        checked = [scalar]
    for v in checked:
        if spec.choices and v not in spec.choices:
            raise BadValue(f"must be one of {bounds_text(spec)}; got {v!r}")
        if isinstance(v, int | float) and not isinstance(v, bool):
            reason = _bounds_reason(spec, v)
            if reason:
                raise BadValue(f"expects {_type_name(spec)} {reason}; got {v!r}")
    out = checked if spec.kind is list else checked[0]
    reason = spec.check(out) if spec.check else None
    if reason:
        raise BadValue(reason)
    return out
