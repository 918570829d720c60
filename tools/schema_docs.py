"""Write `configs/default.yaml` and the key reference in `docs/configuration.md` from the schema
(`src/jaguar_reid/keys.py`): `python tools/schema_docs.py` writes both;
`python tools/schema_docs.py --check` writes nothing and exits 1 naming each file that differs
from what it would write (a test runs the same comparison).

default.yaml: the keys' header as comments, then the top-level keys and one block per section,
each key at its default with `# doc [role] (range or choices)` beside it. docs/configuration.md:
the part between `<!-- keys: begin ...-->` and `<!-- keys: end -->`, one table per section.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # this checkout's package, whatever is installed

from jaguar_reid import keys, schema  # noqa: E402

DEFAULT_YAML = REPO / "configs" / "default.yaml"
REFERENCE = REPO / "docs" / "configuration.md"
WIDTH = 100  # the longest line written, as ruff's line length
COMMENT_COLUMN = 25  # where a key's comment starts when the key and its value fit before it
MIN_COMMENT = 40  # a comment narrower than this goes on the lines below its key instead
TOP = "top level"  # the reference's heading of the keys outside any section
TOP_DOC = "Keys outside any section, at the top of the file."
BEGIN = re.compile(r"^<!-- keys: begin\b.*-->$", re.MULTILINE)
END = re.compile(r"^<!-- keys: end -->$", re.MULTILINE)
# In a table cell: a pipe, a backslash, `*`, `<` before a tag name, `_` outside a word.
MARKDOWN_ESCAPE = re.compile(r"[\\|*]|<(?=[A-Za-z/])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
NO_BREAK = "\0"  # a space the comment is never wrapped at
PLAIN = re.compile(r"[A-Za-z0-9_./<>-]+")  # a string written without quotes (if YAML agrees)


# --------------------------------------------------------------------------- values


def _float_text(value: float) -> str:
    """`value` as YAML 1.1 reads back as a float: 2e-05 -> 2.0e-5 (a dot, a signed exponent)."""
    text = repr(value)
    if text in ("inf", "-inf", "nan"):
        return {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}[text]
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    mantissa = mantissa if "." in mantissa else mantissa + ".0"
    return f"{mantissa}e{exponent[0]}{int(exponent[1:])}"


def _string_text(value: str) -> str:
    if PLAIN.fullmatch(value) and not value.startswith("-") \
            and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)  # a JSON string is a YAML double-quoted one; "" stays ""


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, str):
        return _string_text(value)
    raise TypeError(f"no YAML text for {value!r} ({type(value).__name__})")


def value_text(value: Any) -> str:
    """A default in YAML flow style, checked to read back as itself (types included)."""
    text = (f"[{', '.join(_scalar_text(v) for v in value)}]" if isinstance(value, list)
            else _scalar_text(value))
    back = yaml.safe_load(f"v: {text}")["v"]
    if back != value or type(back) is not type(value):
        raise ValueError(f"{value!r} written as {text!r} reads back as {back!r}")
    return text


# --------------------------------------------------------------------------- default.yaml


def key_comment(spec: schema.Key) -> str:
    """`doc [role] (bounds)`: what default.yaml writes beside a key (the bounds are kept on one
    line: their spaces are NO_BREAK until `commented` wraps the comment)."""
    bounds = schema.bounds_text(spec).replace(" ", NO_BREAK)
    return f"{spec.doc} [{spec.role}]" + (f" ({bounds})" if bounds else "")


def commented(code: str, comment: str) -> list[str]:
    """`code` with `comment` beside it at the common column (or two spaces after a longer
    `code`), wrapped at WIDTH under its first line; below `code` when too little room is left."""
    column = max(COMMENT_COLUMN, len(code) + 2)
    if WIDTH - column - 2 < MIN_COMMENT:
        return [code, *commented("", comment)]
    wrapped = textwrap.wrap(comment, WIDTH - column - 2, break_long_words=False,
                            break_on_hyphens=False)
    lines = [f"{code if i == 0 else '':<{column}}# {line}" for i, line in enumerate(wrapped)]
    return [line.replace(NO_BREAK, " ") for line in lines]


def key_lines(spec: schema.Key, indent: str) -> list[str]:
    code = f"{indent}{spec.name.split('.')[-1]}: {value_text(spec.default)}"
    return commented(code, key_comment(spec))


def sections() -> dict[str, list[schema.Key]]:
    """The keys by section in declaration order; "" holds the top-level keys, first."""
    out: dict[str, list[schema.Key]] = {"": []}
    for name, spec in keys.SPECS.items():
        out.setdefault(name.split(".")[0] if "." in name else "", []).append(spec)
    return out


def render_default_yaml() -> str:
    """The whole text of configs/default.yaml."""
    docs = schema.section_docs(keys.Settings)
    lines = [f"# {line}".rstrip() for line in keys.HEADER.splitlines()]
    for name, specs in sections().items():
        lines.append("")
        if name:
            lines.extend(commented(f"{name}:", docs[name]))
        for spec in specs:
            lines.extend(key_lines(spec, "  " if name else ""))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- key reference


def cell(text: str) -> str:
    """`text` safe in a Markdown table cell, shown as written: pipes escaped, and whatever could
    read as an HTML tag (`<exp>`) or emphasis (`*`, `_` outside a word)."""
    return MARKDOWN_ESCAPE.sub(r"\\\g<0>", text)


def table_row(spec: schema.Key) -> str:
    default = value_text(spec.default).replace("|", "\\|")
    cells = (f"`{spec.name}`", f"`{default}`", spec.role, cell(schema.bounds_text(spec)),
             cell(spec.doc))
    return "| " + " | ".join(cells) + " |"


def render_reference_block() -> str:
    """The key reference written between the markers (the markers excluded)."""
    docs = {"": TOP_DOC, **schema.section_docs(keys.Settings)}
    lines = [""]
    for name, specs in sections().items():
        lines += [f"### {name or TOP}", "", cell(docs[name]), "",
                  "| key | default | role | values | what it does |", "|---|---|---|---|---|"]
        lines += [table_row(spec) for spec in specs]
        lines.append("")
    return "\n".join(lines) + "\n"


def reference_markers(text: str) -> tuple[int, int]:
    """Where the generated block starts (after the begin line) and ends (at the end line)."""
    begin, end = BEGIN.search(text), END.search(text)
    if begin is None or end is None or end.start() < begin.end():
        raise ValueError(f"{REFERENCE}: needs the lines '<!-- keys: begin ...-->' and then "
                         "'<!-- keys: end -->'")
    return begin.end() + 1, end.start()


def render_reference(text: str) -> str:
    """The reference's text `text` with the block between its markers rewritten."""
    start, stop = reference_markers(text)
    return text[:start] + render_reference_block() + text[stop:]


# --------------------------------------------------------------------------- files


def rendered() -> dict[Path, str]:
    """Each generated file and the text it should hold."""
    return {DEFAULT_YAML: render_default_yaml(), REFERENCE: render_reference(REFERENCE.read_text())}


def stale(files: dict[Path, str]) -> list[Path]:
    """The files whose text differs from `files`' (a missing one included)."""
    return [p for p, text in files.items() if not p.is_file() or p.read_text() != text]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each file that is not current")
    args = parser.parse_args(argv)
    files = rendered()
    differs = stale(files)
    if args.check:
        for path in differs:
            print(f"{shown(path)} differs from the schema: run python tools/schema_docs.py",
                  file=sys.stderr)
        return 1 if differs else 0
    for path in differs:
        path.write_text(files[path])
        print(f"wrote {shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
