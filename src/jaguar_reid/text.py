"""Plain-text rendering shared by every step: the one Markdown table renderer.

A foundation module: standard library only, so any module may import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    # A '|' would split the cell and a newline would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, also readable in a terminal: the header row, the `|---|` separator,
    then one line per row; no trailing newline. Cells come formatted as text by the caller
    (anything else is `str()`-ed); only `|` (escaped) and newlines (made spaces) are changed."""
    lines = [_line(headers), "|" + "---|" * len(headers)]
    lines += [_line(row) for row in rows]
    return "\n".join(lines)
