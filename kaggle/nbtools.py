"""What the Kaggle notebooks share. They import it from the code dataset (`CODE/kaggle`),
read-only and never installed, so it needs only the standard library (`packaging` where
Kaggle has it).

- `install_missing`: the package's requirements (pyproject.toml: its dependencies and the
  extras the job names) that this Python lacks or has too old, installed from an attached
  wheels folder with no index, so a submission runs offline; where the folder lacks a wheel,
  it names each one and prints the `pip download` command that fetches them for this Python.
- `run`: a pipeline command in a child process, its output streamed into the notebook, the
  package taken from the code dataset, no bytecode written beside it, stopped at a deadline.
- `copy_writable`: an earlier session's output (attached, read-only) copied to be trained on.
"""

from __future__ import annotations

import codecs
import functools
import operator
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Sequence
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None
try:
    from packaging.markers import Marker
    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # then `satisfies` compares versions, markers are taken as met and every
    Marker = SpecifierSet = sys_tags = Version = None  # wheel as made for this Python


def requirements(code: str | Path, extras: Sequence[str] | str = ()) -> list[str]:
    """`[project] dependencies` of the code dataset's pyproject.toml, and the optional
    dependencies of each of `extras` (the features the job uses beyond the default recipe;
    a string is one extra: `OPTIONAL = "losses"` means `["losses"]`)."""
    extras = [extras] if isinstance(extras, str) else list(extras)
    path = Path(code) / "pyproject.toml"
    if tomllib is not None:
        project = tomllib.loads(path.read_text())["project"]
        base, optional = project["dependencies"], project.get("optional-dependencies", {})
    else:
        base, optional = _read_lists(path.read_text())
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"OPTIONAL: no extra {', '.join(map(repr, unknown))} in {path}; "
                         f"its extras: {', '.join(optional)}")
    return [*base, *(req for extra in extras for req in optional[extra])]


def _read_lists(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """Python 3.10 (no tomllib): [project]'s `dependencies` and the lists of
    [project.optional-dependencies], read by pattern (comments dropped, one list a key)."""
    parts = re.split(r"^\[([^\]]+)\]\s*$", re.sub(r"#[^\n]*", "", text), flags=re.MULTILINE)
    tables = dict(zip(parts[1::2], parts[2::2], strict=True))

    def lists(body: str) -> dict[str, list[str]]:
        return {key: re.findall(r'"([^"]+)"', items) for key, items in
                re.findall(r"^([\w-]+)\s*=\s*\[(.*?)\]", body, re.MULTILINE | re.DOTALL)}
    return (lists(tables.get("project", "")).get("dependencies", []),
            lists(tables.get("project.optional-dependencies", "")))


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
    """'timm[x]>=1.0.9,<2; python_version>"3"' -> ('timm', ['>=1.0.9', '<2'], 'python_...');
    the older form of wheels' metadata too: 'torch (>=1.6.0)' -> ('torch', ['>=1.6.0'], '')."""
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)(?:;(.*))?",
                     requirement)
    name, specs, marker = found.groups()
    specs = specs.strip().removeprefix("(").removesuffix(")")
    return name, [s.strip() for s in specs.split(",") if s.strip()], (marker or "").strip()


def _meets(version: str, spec: str) -> bool:
    if SpecifierSet is not None:
        try:
            return SpecifierSet(spec).contains(version, prereleases=True)
        except ValueError:  # a version packaging cannot read: compare its numbers
            pass
    return satisfies(version, spec)


def _above(version: str, spec: str) -> bool:
    """`version` is newer than the version `spec` ('<3', '==1.26', '~=1.26') names: a failed
    upper bound or pin that asks for something older, never a reason to install."""
    op, wanted = re.match(r"\s*(~=|===|>=|<=|==|!=|>|<)?\s*(.*)", spec).groups()
    if op not in ("<", "<=", "==", "~=", "==="):
        return False
    if Version is not None:
        try:
            return Version(version) > Version(wanted.removesuffix(".*"))
        except InvalidVersion:
            pass
    have, want = _padded(_release(version), _release(wanted))
    return have > want


def _marker_met(requirement: str, marker: str) -> bool:
    try:
        return Marker(marker).evaluate()
    except Exception as exc:  # packaging's InvalidMarker, or a name it cannot evaluate
        raise ValueError(f"requirement {requirement!r}: cannot read its environment marker "
                         f"{marker!r} ({exc}); expected one like python_version < '3.13'"
                         ) from None


def check(requirement: str) -> tuple[str | None, str]:
    """(installed version or None, verdict): "ok"; "missing"; "old" (below the range: to be
    installed); "new" (newer than the range's upper bound or pin only: used as it is, since the
    upper bounds are the next major releases, not known breakage, Kaggle's own torch must stay
    and a downgrade would change what the image's other libraries were built against)."""
    name, specs, marker = _split(requirement)
    if marker and Marker is not None and not _marker_met(requirement, marker):
        return None, "ok"  # not meant for this Python or platform
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return None, "missing"
    failed = [s for s in specs if not _meets(version, s)]
    if not failed:
        return version, "ok"
    return version, "new" if all(_above(version, s) for s in failed) else "old"


def unsatisfied(reqs: list[str], verbose: bool = False) -> list[str]:
    """The requirements this Python lacks or has older than their range."""
    out = []
    for req in reqs:
        version, verdict = check(req)
        if verbose:
            note = {"old": "too old", "new": "newer than tested, used as it is"}.get(verdict,
                                                                                verdict)
            print(f"{req:<34} installed: {version or '-':<16} {note}")
        if verdict in ("missing", "old"):
            out.append(req)
    return out


# --------------------------------------------------------------------------- wheels

def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name(path: Path) -> tuple[str, str, bool] | None:
    """(name, version, made for this Python and machine) from a wheel's file name
    (`name-version[-build]-python-abi-platform.whl`), or None for a name that is not one."""
    if sys_tags is not None:
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except (InvalidWheelFilename, InvalidVersion):
            return None
        return str(name), str(version), not tags.isdisjoint(_this_python_tags())
    parts = path.name.removesuffix(".whl").split("-")
    return (parts[0], parts[1], True) if len(parts) in (5, 6) else None


@functools.cache
def _this_python_tags() -> frozenset:
    return frozenset(sys_tags())


def wheels_in(folder: str | Path) -> dict[str, list[tuple[str, Path]]]:
    """The wheels of `folder` this Python can install, by distribution name: [(version,
    path)]. Only the folder's top level, the one place `pip install --find-links` looks; a
    file whose name is not a wheel's, or a wheel for another Python or machine, is left out
    with a note."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(Path(folder).glob("*.whl")) if folder else []:
        parsed = _wheel_name(path)
        if parsed is None:
            print(f"note: {path.name} is not a wheel's file name "
                  "(name-version-python-abi-platform.whl): left out")
        elif not parsed[2]:
            print(f"note: {path.name} is for another Python or machine than this "
                  f"(Python {platform.python_version()}, {platform.machine()}): left out")
        else:
            found.setdefault(_canonical(parsed[0]), []).append(parsed[1:2] + (path,))
    return found


def nested_wheels(folder: str | Path) -> list[Path]:
    """The folders below `folder` that hold wheels pip will not see (a dataset's upload may
    nest the folder that was uploaded)."""
    return sorted({p.parent for p in Path(folder).rglob("*.whl")} - {Path(folder)}) \
        if folder else []


def provider(wheels: dict[str, list[tuple[str, Path]]], requirement: str) -> Path | None:
    """A wheel of `wheels` that meets `requirement`, or None."""
    name, specs, _ = _split(requirement)
    return next((path for version, path in wheels.get(_canonical(name), [])
                 if all(_meets(version, spec) for spec in specs)), None)


def wheel_requirements(path: str | Path) -> list[str]:
    """A wheel's own requirements (Requires-Dist of its METADATA), but those of its extras."""
    with zipfile.ZipFile(path) as whl:
        meta = next(n for n in whl.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        headers = HeaderParser().parsestr(whl.read(meta).decode("utf-8", "replace"))
    return [req for req in headers.get_all("Requires-Dist") or []
            if not re.search(r"\bextra\b", req.partition(";")[2])]


def to_fetch(needed: list[str], wheels: dict[str, list[tuple[str, Path]]]
             ) -> list[tuple[str, str]]:
    """What `wheels` must still hold for `needed` (requirements this Python does not meet) to
    install with no index, each with why: every one no wheel meets, and every requirement of
    the wheels to be installed that neither this Python nor another wheel meets."""
    fetch: list[tuple[str, str]] = []
    queue: list[tuple[str, str]] = [(req, "") for req in needed]
    seen: set[str] = set()
    while queue:
        req, needed_by = queue.pop(0)
        name = _canonical(_split(req)[0])
        if name in seen:
            continue
        seen.add(name)
        wheel = provider(wheels, req)
        if wheel is not None:
            queue += [(dep, wheel.name) for dep in wheel_requirements(wheel)
                      if check(dep)[1] in ("missing", "old")]
            continue
        version, _ = check(req)
        why = f"{version} installed, too old" if version else "not installed"
        fetch.append((req, why + (f"; needed by {needed_by}" if needed_by else "")))
    return fetch


def platform_tags() -> list[str]:
    """The wheel platforms this machine runs, for `pip download --platform`: its own glibc's
    manylinux tag and the two most wheels carry (manylinux_2_28, manylinux2014 = 2.17)."""
    libc, version = platform.libc_ver()
    arch = platform.machine()
    found = re.match(r"(\d+)\.(\d+)", version) if libc == "glibc" else None
    if not found:
        return [f"manylinux2014_{arch}"]
    glibc = (int(found.group(1)), int(found.group(2)))
    return [f"manylinux_{glibc[0]}_{glibc[1]}_{arch}",
            *(tag for floor, tag in (((2, 28), f"manylinux_2_28_{arch}"),
                                     ((2, 17), f"manylinux2014_{arch}")) if glibc > floor)]


def download_command(reqs: list[str]) -> str:
    """The one command that fetches a wheel for each of `reqs`, for this Python and machine,
    without their dependencies (what this Python has already is not fetched again)."""
    platforms = [arg for tag in platform_tags() for arg in ("--platform", tag)]
    return shlex.join(["pip", "download", "--no-deps", "--python-version",
                       "{}.{}".format(*sys.version_info[:2]), "--only-binary=:all:", *platforms,
                       "-d", "wheels", *reqs])


def wheels_message(fetch: list[tuple[str, str]], wheels: str | Path) -> str:
    """What to attach, wheel by wheel, and the one command that downloads them."""
    where = (f"WHEELS ({wheels}) lacks a wheel for each of these" if wheels else
             "attach a dataset of wheels for each of these and set WHEELS to its path")
    nested = nested_wheels(wheels)
    return "\n".join([
        f"{where}:", *(f"    {req}    ({why})" for req, why in fetch),
        *([f"WHEELS holds wheels in sub-folders, which pip does not read: set WHEELS to the "
           f"folder that holds them ({', '.join(map(str, nested))})"] if nested else []),
        "On a machine with internet, this command downloads exactly these wheels into wheels/;"
        " upload that folder as a dataset (kaggle/README.md, \"Wheels\"):",
        f"    {download_command([req for req, _ in fetch])}"])


def install_missing(code: str | Path, wheels: str | Path = "",
                    extras: Sequence[str] | str = ()) -> None:
    """Every requirement of the code dataset (and of `extras`) met, installing from `wheels`
    (a folder of .whl files, `pip install --no-index`: offline) only what is missing or too
    old; where `wheels` lacks one, a message naming each wheel to attach and the command that
    downloads them."""
    reqs = requirements(code, extras)
    missing = unsatisfied(reqs, verbose=True)
    if not missing:
        print("every requirement is met: nothing to install")
        return
    fetch = to_fetch(missing, wheels_in(wheels))
    if fetch:
        raise SystemExit(wheels_message(fetch, wheels))
    run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
         *missing], code)
    still = unsatisfied(reqs)
    if still:
        raise SystemExit(f"still missing after installing from {wheels}: {', '.join(still)}")
    print(f"every requirement is met, {', '.join(missing)} installed from {wheels}")


# --------------------------------------------------------------------------- commands

def child_env(code: str | Path) -> dict[str, str]:
    """The package from the code dataset, run by the notebook's own Python (train.sh reads
    PYTHON; `python` on PATH may be another one); no bytecode caches, which would be written
    beside the (read-only) code; output unbuffered, so the notebook shows it as it comes;
    progress bars on, though the child writes into a pipe (the notebook draws them)."""
    path = os.pathsep.join(p for p in (str(Path(code) / "src"), os.environ.get("PYTHONPATH"))
                           if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHON": sys.executable,
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
            "JAGUAR_REID_PROGRESS": os.environ.get("JAGUAR_REID_PROGRESS", "1")}


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
