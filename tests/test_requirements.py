"""The requirement files: runtime ranges in pyproject.toml (a lower and an upper bound each),
the development tools apart in requirements-dev.txt, and tools/oldest_requirements.py pinning
exactly the lower bounds (checked here with an independent parse by `packaging`)."""

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency reads TOML there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "oldest_requirements.py"


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_lines(name: str) -> list[str]:
    """The requirement lines of a requirements file: no comments, no blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in (REPO / name).read_text().splitlines())
    return [line for line in lines if line]


def bounds(requirement: Requirement) -> tuple[Version, Version]:
    """The `>=` and `<` versions of a requirement, which must have exactly these two clauses."""
    ops = {spec.operator: Version(spec.version) for spec in requirement.specifier}
    assert sorted(ops) == ["<", ">="] and len(requirement.specifier) == 2, \
        f"{requirement}: wants one '>=' lower and one '<' upper bound, nothing else"
    return ops[">="], ops["<"]


RUNTIME = [Requirement(text) for text in project()["dependencies"]]
EXTRAS = {name: [Requirement(text) for text in reqs]
          for name, reqs in project()["optional-dependencies"].items()}
DEV = [Requirement(line) for line in requirement_lines("requirements-dev.txt")]


@pytest.mark.parametrize("requirement", RUNTIME + EXTRAS["onnx"] + EXTRAS["faiss"]
                         + EXTRAS["kornia"] + DEV, ids=str)
def test_every_requirement_is_a_range(requirement):
    lower, upper = bounds(requirement)
    assert lower < upper
    assert requirement.specifier.contains(lower) and not requirement.specifier.contains(upper)
    assert requirement.marker is None and not requirement.url


def test_runtime_names_are_unique_and_the_usual_ones():
    names = [canonicalize_name(r.name) for r in RUNTIME]
    assert len(names) == len(set(names))
    assert {"torch", "torchvision", "timm", "numpy"} <= set(names)


def test_requirements_txt_is_the_runtime_set():
    """requirements.txt installs this package (and so the runtime ranges), nothing else."""
    assert requirement_lines("requirements.txt") == ["-e ."]


def test_development_tools_do_not_repeat_runtime_dependencies():
    runtime = {canonicalize_name(r.name) for r in RUNTIME}
    dev = [canonicalize_name(r.name) for r in DEV]
    assert len(dev) == len(set(dev))
    assert not runtime & set(dev), "declared in pyproject.toml already"
    assert {"pytest", "hypothesis", "ruff", "packaging"} <= set(dev)


def test_optional_extras_and_development_tools_agree():
    """The ONNX export's and the faiss backend's tests run with the same ranges
    `pip install .[onnx]` and `.[faiss]` give users."""
    dev = {canonicalize_name(r.name): r.specifier for r in DEV}
    for requirement in EXTRAS["onnx"] + EXTRAS["faiss"] + EXTRAS["kornia"]:
        assert dev[canonicalize_name(requirement.name)] == requirement.specifier


def oldest(*args: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          check=True, timeout=60)
    pins = [Requirement(line) for line in done.stdout.split()]
    assert all(len(p.specifier) == 1 and next(iter(p.specifier)).operator == "==" for p in pins)
    return {canonicalize_name(p.name): next(iter(p.specifier)).version for p in pins}


def lower_bounds(requirements: list[Requirement]) -> dict[str, str]:
    return {canonicalize_name(r.name): next(s.version for s in r.specifier if s.operator == ">=")
            for r in requirements}


def test_oldest_requirements_pins_exactly_the_lower_bounds():
    assert oldest() == lower_bounds(RUNTIME)
    assert oldest("--extra", "onnx") == lower_bounds(RUNTIME + EXTRAS["onnx"])


def test_oldest_requirements_refuses_what_it_cannot_pin(tmp_path):
    unreadable = ('["numpy"]', '["numpy<3"]', '["numpy>=1,>=2"]',
                  '["numpy>=1; python_version<\'4\'"]')
    for deps in unreadable:
        pyproject = tmp_path / "pyproject.toml"
        pyproject.write_text(f"[project]\nname = 'x'\ndependencies = {deps}\n")
        done = subprocess.run([sys.executable, str(SCRIPT), "--pyproject", str(pyproject)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stdout == "", deps
        assert "oldest_requirements:" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--extra", "no-such-extra"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no optional dependencies 'no-such-extra'" in done.stderr
