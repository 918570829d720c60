"""What the Kaggle notebooks share. They import it from the code dataset (`CODE/kaggle`),
read-only and never installed, so it needs only the standard library (`packaging` where
Kaggle has it).

- `install_missing`: the package's requirements (pyproject.toml) that this Python lacks or has
  too old, installed from an attached wheels folder with no index: a submission runs offline.
- `run`: a pipeline command in a child process, its output streamed into the notebook, the
  package taken from the code dataset, no bytecode written beside it, stopped at a deadline.
- `copy_writable`: an earlier session's output (attached, read-only) copied to be trained on.
"""

from __future__ import annotations

import codecs
import operator
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None
try:
    from packaging.markers import Marker
    from packaging.specifiers import SpecifierSet
except ImportError:  # then `satisfies` compares versions, and markers are taken as met
    Marker = SpecifierSet = None


def requirements(code: str | Path) -> list[str]:
    """`[project] dependencies` of the code dataset's pyproject.toml."""
    text = (Path(code) / "pyproject.toml").read_text()
    if tomllib is not None:
        return list(tomllib.loads(text)["project"]["dependencies"])
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    return re.findall(r'"([^"]+)"', block.group(1)) if block else []


# --------------------------------------------------------------------------- versions

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
        ">": operator.gt, "<": operator.lt}


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: '2.5.1+cu121' -> (2, 5, 1), '2.0rc1' -> (2, 0)."""
    found = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(n) for n in found.group().split(".")) if found else ()


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)), b + (0,) * (width - len(b))


def satisfies(version: str, specifiers: str) -> bool:
    """`version` meets every comparison of `specifiers` ('>=1.0.9,<2'), by release numbers
    alone (a '2.4.0rc1' passes '>=2.4'): where `packaging` is missing; enough for our ranges."""
    for spec in filter(None, (s.strip() for s in specifiers.split(","))):
        op, wanted = re.match(r"(~=|===|>=|<=|==|!=|>|<)?\s*(.*)", spec).groups()
        have, want = _padded(_release(version), _release(wanted))
        if op == "~=":  # compatible release: at least `wanted`, same prefix but for its last part
            prefix = len(_release(wanted)) - 1
            ok = have >= want and have[:prefix] == want[:prefix]
        else:
            ok = _OPS.get(op or "==", operator.eq)(have, want)
        if not ok:
            return False
    return True


def _split(requirement: str) -> tuple[str, list[str], str]:
    """'timm[x]>=1.0.9,<2; python_version>"3"' -> ('timm', ['>=1.0.9', '<2'], 'python_...')."""
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)(?:;(.*))?",
                     requirement)
    name, specs, marker = found.groups()
    return name, [s.strip() for s in specs.split(",") if s.strip()], (marker or "").strip()


def _meets(version: str, spec: str) -> bool:
    if SpecifierSet is not None:
        try:
            return SpecifierSet(spec).contains(version, prereleases=True)
        except ValueError:  # a version packaging cannot read: compare its numbers
            pass
    return satisfies(version, spec)


def check(requirement: str) -> tuple[str | None, str]:
    """(installed version or None, verdict): "ok"; "missing"; "old" (below the range: to be
    installed); "new" (past the range's upper bound only: used as it is, since the upper
    bounds are the next major releases, not known breakage, and Kaggle's own torch must stay)."""
    name, specs, marker = _split(requirement)
    if marker and Marker is not None and not Marker(marker).evaluate():
        return None, "ok"  # not meant for this Python or platform
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return None, "missing"
    failed = [s for s in specs if not _meets(version, s)]
    if not failed:
        return version, "ok"
    return version, "new" if all(s.startswith("<") for s in failed) else "old"


def unsatisfied(reqs: list[str], verbose: bool = False) -> list[str]:
    """The requirements this Python lacks or has older than their range."""
    out = []
    for req in reqs:
        version, verdict = check(req)
        if verbose:
            note = {"old": "too old", "new": "newer than tested, used as it is"}.get(verdict,
                                                                                verdict)
            print(f"{req:<28} installed: {version or '-':<16} {note}")
        if verdict in ("missing", "old"):
            out.append(req)
    return out


def install_missing(code: str | Path, wheels: str | Path = "") -> None:
    """Every requirement of the code dataset met, installing from `wheels` (a folder of
    .whl files, `pip install --no-index`: offline) only what is missing or too old."""
    missing = unsatisfied(requirements(code), verbose=True)
    if not missing:
        print("every requirement is met: nothing to install")
        return
    if not wheels:
        raise RuntimeError(f"missing or too old: {', '.join(missing)}; attach a wheels dataset "
                           "(kaggle/README.md) and set WHEELS")
    run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
         *missing], code)
    still = unsatisfied(requirements(code))
    if still:
        raise RuntimeError(f"still missing after installing from {wheels}: {', '.join(still)}")


# --------------------------------------------------------------------------- commands

def child_env(code: str | Path) -> dict[str, str]:
    """The package from the code dataset; no bytecode caches, which would be written beside
    the (read-only) code; output unbuffered, so the notebook shows it as it comes."""
    path = os.pathsep.join(p for p in (str(Path(code) / "src"), os.environ.get("PYTHONPATH"))
                           if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1"}


def _stop(proc: subprocess.Popen, stopped: threading.Event, grace_s: float = 60.0) -> None:
    """The whole process group (fold-parallel training has children): SIGTERM, then SIGKILL.
    Checkpoints are written atomically, so a run stopped anywhere resumes from its last epoch."""
    stopped.set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run(cmd: list[str], code: str | Path, deadline: float | None = None) -> bool:
    """Run `cmd` with `child_env`; True when it finished, False when `deadline` (a
    `time.time()`) came first and it was stopped (or not started); raises when it failed."""
    if deadline is not None and time.time() >= deadline:
        print(f"not started, past the deadline: {shlex.join(cmd)}")
        return False
    print(f"$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_env(code), start_new_session=True)
    stopped = threading.Event()
    timer = None
    if deadline is not None:
        timer = threading.Timer(deadline - time.time(), _stop, (proc, stopped))
        timer.daemon = True
        timer.start()
    # Raw chunks, not lines: progress bars redraw with '\r', which the notebook understands.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := proc.stdout.read1(1 << 16):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        returncode = proc.wait()
    except BaseException:  # the kernel interrupted: its own session keeps the child from SIGINT
        _stop(proc, threading.Event(), grace_s=10.0)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if stopped.is_set():
        print(f"\nstopped at the deadline: {shlex.join(cmd)}")
        return False
    if returncode:
        raise subprocess.CalledProcessError(returncode, cmd)
    return True


def gpu_count() -> int:
    """GPUs on this machine (nvidia-smi), without importing torch into the notebook."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def copy_writable(src: str | Path, dst: str | Path) -> None:
    """`src` (an attached, read-only dataset) copied to `dst`, every copy writable."""
    shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=shutil.copyfile)
    for path in [Path(dst), *Path(dst).rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
