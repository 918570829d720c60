"""Running the Kaggle notebooks as Kaggle runs them, for tests/test_kaggle.py and, in the
replica of Kaggle's Python, tests/test_kaggle_replica.py: a notebook's code cells (its settings
cell filled in) as one script in a fresh Python, every process of the run refusing the
network, every dataset it reads read-only and checked unchanged, file by file."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tests.helpers import REPO, set_writable, snapshot

KAGGLE = REPO / "kaggle"
NOTEBOOKS = ("submit.ipynb", "train.ipynb")
SETTINGS_MARKER = "# --- settings: the only cell to edit ---"
# What kaggle/README.md puts into the code dataset; the caches a checkout gathers stay out.
CODE_FILES = ("src", "configs", "folds", "kaggle", "pyproject.toml", "submit.py", "train.sh")
CODE_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def nbtools() -> ModuleType:
    """kaggle/nbtools.py, loaded as the notebooks load it: from its file, not installed."""
    spec = importlib.util.spec_from_file_location("nbtools", KAGGLE / "nbtools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cells(name: str) -> list[dict]:
    return json.loads((KAGGLE / name).read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


# A sitecustomize.py on PYTHONPATH: every Python process of the run (the notebook, the
# submit.py or train.sh it starts, the pip it runs) refuses connections and name lookups, as
# Kaggle's offline sessions do, and logs at exit which jaguar_reid it imported.
GUARD = '''
import atexit
import os
import socket
import sys


def _refuse(*args, **kwargs):
    raise OSError("network disabled for this notebook run (tests/notebooks.py)")


def _local_only(connect):
    def guarded(self, address):
        if self.family == getattr(socket, "AF_UNIX", None):  # pipes between local processes
            return connect(self, address)
        return _refuse()
    return guarded


socket.socket.connect = _local_only(socket.socket.connect)
socket.socket.connect_ex = _local_only(socket.socket.connect_ex)
socket.create_connection = _refuse
socket.getaddrinfo = _refuse


@atexit.register
def _record():
    package = sys.modules.get("jaguar_reid")
    with open(os.environ["KAGGLE_TEST_LOG"], "a") as log:
        log.write(f"{os.getpid()} {getattr(package, '__file__', None)}\\n")
'''

# Run before the notebook's cells: a connection to a port that is listening (the test's) must
# be refused, so the guard, not an absent server, is what stops it; and a name lookup.
PROOF = '''
import os
import socket

_port = int(os.environ["KAGGLE_TEST_PORT"])
for _attempt in (lambda: socket.socket().connect(("127.0.0.1", _port)),
                 lambda: socket.create_connection(("127.0.0.1", _port), timeout=5),
                 lambda: socket.getaddrinfo("pypi.org", 443)):
    try:
        _attempt()
    except OSError as exc:
        assert "network disabled" in str(exc), exc
    else:
        raise SystemExit("the network guard let a connection through")
'''


def with_settings(text: str, values: dict[str, object]) -> str:
    """The settings cell with each `NAME = ...` line replaced; every name must be there."""
    lines = text.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if re.match(rf"{name}\s*=", line)]
        assert len(hits) == 1, f"the settings cell has no single {name} = line"
        lines[hits[0]] = f"{name} = {value!r}"
    return "\n".join(lines)


def notebook_script(name: str, settings: dict[str, object], upto: int | None = None) -> str:
    """The notebook's code cells (the first `upto` of them) as one script."""
    code = [source(c) for c in cells(name) if c["cell_type"] == "code"][:upto]
    code[0] = with_settings(code[0], settings)
    return "\n\n".join([PROOF, *code]) + "\n"


def code_dataset(dest: Path) -> Path:
    """The code dataset: this checkout's files the notebooks use, no caches."""
    for name in CODE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=CODE_IGNORED)
        else:
            shutil.copy2(REPO / name, dest / name)
    return dest


@dataclass(frozen=True)
class NotebookRun:
    """One notebook run: its exit status, its output, and per Python process of the run, its
    pid and the jaguar_reid it imported ("None": none)."""

    returncode: int
    stdout: str
    stderr: str
    processes: list[tuple[str, str]]


def run_notebook(name: str, settings: dict[str, object], inputs: Path, tmp_path: Path,
                 ok: bool = True, upto: int | None = None) -> NotebookRun:
    """Run a notebook's code cells (`settings` in its first; the first `upto` of them) as one
    script in a fresh Python (this one's executable), the network refused, in the working
    folder `settings["WORK"]`, with every dataset under `inputs` read-only; checks that nothing
    under `inputs` changed, that each process took jaguar_reid from the code dataset and, with
    `ok`, that the run succeeded."""
    guard, log = tmp_path / "guard", tmp_path / f"{name}.log"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    log.unlink(missing_ok=True)
    script = tmp_path / f"{name}.py"
    script.write_text(notebook_script(name, settings, upto))
    Path(settings["WORK"]).mkdir(parents=True, exist_ok=True)
    # The notebook itself must keep bytecode out of the code dataset.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    inputs.mkdir(parents=True, exist_ok=True)
    set_writable(inputs, False)
    before = snapshot(inputs, folders=True)
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:  # a port that would answer
            env.update(PYTHONPATH=str(guard), KAGGLE_TEST_LOG=str(log),
                       KAGGLE_TEST_PORT=str(server.getsockname()[1]))
            result = subprocess.run([sys.executable, str(script)], cwd=settings["WORK"],
                                    env=env, capture_output=True, text=True, timeout=600)
        if ok:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        after = snapshot(inputs, folders=True)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"written into a read-only dataset: {changed[:10]}"
    finally:
        set_writable(inputs, True)
    runs = ([tuple(line.split(" ", 1)) for line in log.read_text().splitlines()]
            if log.is_file() else [])
    code = Path(settings["CODE"]) / "src"
    assert all(Path(f).is_relative_to(code) for _, f in runs if f != "None")
    return NotebookRun(result.returncode, result.stdout, result.stderr, runs)
