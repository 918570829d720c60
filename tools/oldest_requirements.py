"""Print the oldest versions pyproject.toml's dependency ranges allow, one `name==lower` a line:

    pip install $(python tools/oldest_requirements.py)              # the runtime set
    pip install $(python tools/oldest_requirements.py --extra onnx)  # and an optional extra

so that the test suite can be run against exactly the lower bounds (Kaggle's images ship
older libraries than a fresh install picks). Each dependency must have a `>=` lower bound;
anything this does not understand (no lower bound, an environment marker) stops it with a
message rather than printing a wrong pin. Needs no package beyond the standard library (on
Python 3.10, the TOML reader comes from `tomli` or pip's own copy of it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# A requirement as pyproject states ours: a name, optional [extras], comma-separated clauses.
REQUIREMENT = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[^\]]*\])?\s*(.*)")
CLAUSE = re.compile(r"(~=|===|==|!=|<=|>=|<|>)\s*(\S+)")


def lower_pin(requirement: str) -> str:
    """'timm>=1.0.9,<2' -> 'timm==1.0.9'."""
    parsed = REQUIREMENT.fullmatch(requirement)
    if parsed is None:
        raise ValueError(f"{requirement!r}: cannot read it")
    name, extras, rest = parsed.groups()
    if ";" in rest or "@" in rest:
        raise ValueError(f"{requirement!r}: markers and direct references are not supported")
    lowers = []
    for clause in filter(None, (c.strip() for c in rest.split(","))):
        found = CLAUSE.fullmatch(clause)
        if found is None:
            raise ValueError(f"{requirement!r}: cannot read {clause!r}")
        if found.group(1) == ">=":
            lowers.append(found.group(2))
    if len(lowers) != 1:
        raise ValueError(f"{requirement!r}: needs exactly one '>=' lower bound")
    return f"{name}{extras or ''}=={lowers[0]}"


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"no optional dependencies {extra!r} in {pyproject} "
                             f"(there are: {', '.join(sorted(optional)) or 'none'})")
        wanted += optional[extra]
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", action="append", default=[],
                        help="add an optional-dependencies group (repeatable)")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    try:
        pins = [lower_pin(r) for r in requirements(args.pyproject, args.extra)]
    except ValueError as error:
        print(f"oldest_requirements: {error}", file=sys.stderr)
        return 1
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
