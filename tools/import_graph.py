"""Print the package's import graph and fail on a cycle or an import that runs back up the
pipeline: `python tools/import_graph.py [--quiet]` (CI runs it through the tests).

Stages, in pipeline order; a module may import modules of its own stage or of earlier ones:
  0 foundation  schema, keys, config, layout, io_utils, plotting, text, manifest, cli, commit,
                extras, progress, cuda_kernels, errors, key_checks
  1 data        jaguar_reid.data.*
  2 training    jaguar_reid.training.*
  3 retrieval   jaguar_reid.retrieval.*
  4 reporting   jaguar_reid.reporting.*
  5 submission  jaguar_reid.submission
  6 identify    jaguar_reid.identify.* (a new photo named, calibrated out of fold)
  7 sweeping    jaguar_reid.sweeping.* (a sweep's plan and table)
  8 commands    the `python -m jaguar_reid.<step>` modules (train, tune, ...): nothing imports
                them
Every import counts, at the top of a module or inside a function.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "jaguar_reid"
ROOT = Path(__file__).resolve().parent.parent / "src" / PACKAGE
STAGES = {"foundation": 0, "data": 1, "training": 2, "retrieval": 3, "reporting": 4,
          "submission": 5, "identify": 6, "sweeping": 7, "commands": 8}
# cli is the table of steps: it loads a step's module by name only when that step runs.
FOUNDATION = {"schema", "keys", "config", "layout", "io_utils", "plotting", "text", "manifest",
              "cli", "commit", "extras", "progress", "cuda_kernels",
              "errors", "key_checks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "foundation"  # the package's own __init__
    if parts[1] in ("data", "training", "retrieval", "reporting", "identify", "sweeping"):
        return parts[1]
    if parts[1] in FOUNDATION:
        return "foundation"
    return "submission" if parts[1] == "submission" else "commands"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (`from jaguar_reid.x import y` names module
    `jaguar_reid.x.y` when that is a module, else `jaguar_reid.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == PACKAGE:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return {m for m in found if m in modules}


def build_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    modules = set(files)
    return {m: imports_of(p, modules) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a later stage than the importer's, and any import of a command."""
    bad = []
    for module, targets in graph.items():
        for target in sorted(targets):
            later = STAGES[stage(target)] > STAGES[stage(module)]
            if later or (stage(target) == "commands" and module != target):
                bad.append(f"{module} ({stage(module)}) imports {target} ({stage(target)})")
    return bad


def describe(graph: dict[str, set[str]]) -> str:
    lines = []
    for name in sorted(graph, key=lambda m: (STAGES[stage(m)], m)):
        short = sorted(t.removeprefix(PACKAGE + ".") for t in graph[name])
        lines.append(f"[{stage(name)}] {name.removeprefix(PACKAGE + '.') or PACKAGE}"
                     + (f" -> {', '.join(short)}" if short else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="print only the problems")
    args = parser.parse_args(argv)
    graph = build_graph()
    if not args.quiet:
        print(describe(graph))
    problems = upward_imports(graph)
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
