"""Small shared helpers: atomic writes, device choice, seeding, JSON."""

from __future__ import annotations

import errno
import glob
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from jaguar_reid.errors import UserInputError  # re-exported: most modules import it from here

DEBUG_ENV = "JAGUAR_REID_DEBUG"  # set to 1: a user's mistake shows its whole traceback
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(exc: BaseException) -> str:
    """One line for a user's mistake. An error raised in a DataLoader worker arrives wrapped in
    the worker's traceback; its last line is the message the worker raised."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror and \
            not isinstance(exc, UserInputError | FileNotFoundError):
        return (f"{exc.filename}: {exc.strerror.lower()}; the folders written (output_dir, "
                "and the files named by keys) must be writable folders with free space")
    text = str(exc)
    if _WORKER_TRACEBACK in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a command-line entry point: a user's mistake (a bad config, CSV or file, a folder
    that cannot be written, a full disk) prints one clear line and exits 2, not a traceback;
    `JAGUAR_REID_DEBUG=1` shows the traceback."""
    import sys

    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UserInputError, OSError) as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {user_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


# The process umask, read once at import (os.umask can only be read by setting it, which is
# not thread-safe): what a plain write would give a new file.
UMASK = os.umask(0o022)
os.umask(UMASK)


class DiskFullError(UserInputError):
    """A write failed because its disk (or the user's quota) is full; nothing earlier was lost."""


# Below this much free space, a failed write is taken for a full disk even when the writer hid
# the errno: torch.save reports ENOSPC as a RuntimeError from its C++ stream ("unexpected pos").
_NEARLY_FULL_BYTES = 1 << 20
_DISK_FULL = {code: reason for code, reason in (
    (errno.ENOSPC, "no space left on the device"),
    (getattr(errno, "EDQUOT", None), "disk quota exceeded"),  # absent on Windows
) if code is not None}
# A write the file system refuses: its error is its own, whatever the free space.
_REFUSED = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _disk_full_reason(exc: BaseException, directory: Path) -> str | None:
    """Why `exc` looks like a full disk, or None. Looks through the exception's chain for
    ENOSPC / EDQUOT (by errno or, for writers that only keep the text, by its strerror), then
    at the free space left in `directory`; a write refused (a read-only file system, no
    permission: EROFS / EACCES / EPERM anywhere in the chain) is never a full disk, however
    little space is left."""
    seen: set[int] = set()
    refused = False
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return _DISK_FULL[current.errno]
        for code, reason in _DISK_FULL.items():
            if os.strerror(code) in str(current):
                return reason
        if isinstance(current, OSError) and current.errno in _REFUSED:
            refused = True
        current = current.__cause__ or current.__context__
    if refused:
        return None
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    if stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES:
        return f"{stat.f_bavail * stat.f_frsize} bytes free"
    return None


def _disk_full_error(path: Path, reason: str, kept: str) -> DiskFullError:
    return DiskFullError(f"{path}: the disk is full ({reason}) while writing it; {kept}. Free "
                         f"some space (df -h {path.parent}) and run the same command again")


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Wait for an exclusive lock on `path` (a side file, created if missing) and hold it in
    the block: for read-modify-write of a file that is itself replaced atomically, where a
    lock on the file would be held on one that is no longer there. No lock without fcntl
    (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def explain_disk_full(path: str | Path, kept: str) -> Iterator[None]:
    """Turn a full disk while writing `path` in place into a `DiskFullError` naming the file
    and saying what was kept (`kept`); any other error passes through unchanged."""
    path = Path(path)
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        reason = _disk_full_reason(exc, path.parent)
        if reason is None:
            raise
        raise _disk_full_error(path, reason, kept) from exc


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`.

    A run that dies while writing leaves the previous file untouched and at worst a stray
    temporary file (named `.<name>.*.tmp`) beside it (`remove_stray_temps`). A full disk is a
    `DiskFullError` that says so; the temporary file is removed. `suffix` keeps a file type
    visible to writers that look at the extension (numpy adds `.npz` otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    kept = f"the earlier {path.name} is intact" if existed else f"no {path.name} was written"
    with explain_disk_full(path, kept):
        tmp = temporary_beside(path, suffix)
    try:
        # A full disk is judged inside, before the partial file is removed (its size is what
        # filled the disk); the finally below removes it.
        with explain_disk_full(path, kept + " and the partial copy was removed"):
            yield tmp
            settle(tmp, path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_beside(path: Path, suffix: str = "") -> Path:
    """An empty temporary file beside `path` (`.<name>.*.tmp<suffix>`), for writing it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def settle(tmp: Path, path: Path) -> None:
    """A written temporary file made ready to replace `path`: the mode a plain write would
    give it, or the one of the file it replaces (mkstemp makes it private, 0600, and some
    writers, safetensors, replace it with a private file of their own; some file systems
    have no modes), and its bytes on disk."""
    with suppress(OSError):
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~UMASK)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())


_SAID: set[str] = set()


def say_once(text: str) -> None:
    """Print a note once per process (a note about a file or experiment that many folds or
    steps read)."""
    if text not in _SAID:
        _SAID.add(text)
        print(text)


def remove_stray_temps(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (`.<name>.*.tmp*`) that `atomic_path` leaves beside each of
    `names` when its writer is killed; returns them. Only where no other live process writes
    these names (training calls it under the fold's lock), or it would pull a file from under
    a writer."""
    removed = []
    for name in names:
        for tmp in sorted(Path(directory).glob(f".{glob.escape(name)}.*.tmp*")):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(data: Any) -> str:
    """`data` as the indented JSON every file here is written in (numpy values and paths
    included)."""
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json_text(data))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class DamagedFileError(UserInputError):
    """A file the pipeline wrote that no longer reads as what it wrote."""


def read_json(path: str | Path) -> Any:
    """A JSON file; one that is not (emptied, truncated, edited by hand) is one line naming
    it."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFileError(f"{path}: not valid JSON ({exc}); it was damaged or edited: "
                               "make it again with the step that wrote it") from None


DEVICES = "auto, cpu, cuda or cuda:<GPU number> (cuda:0, cuda:1, ...)"  # device=
_DEVICE = re.compile(r"auto|cpu|cuda(?::(0|[1-9][0-9]*))?", re.ASCII)


def resolve_device(name: str, gpus: int = 1) -> str:
    """`auto` picks CUDA when present; an explicit CUDA request without a GPU is an error, and
    so is a name torch would refuse later (checked first, on any machine). On CUDA, the
    `gpus` GPUs the run will use (from the one named, `cuda:<i>`, else the first) must be
    there and have kernels in this torch build (`cuda_kernels`): a GPU it cannot drive stops
    here in one line, not at its first operation."""
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise UserInputError(f"device={name!r}: expected {DEVICES}")
    import torch

    given = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise UserInputError(f"device={name!r} asked for, but torch sees no CUDA device; "
                             "use device=cpu or device=auto")
    from jaguar_reid.cuda_kernels import check_gpus

    check_gpus(given, int(match.group(1) or 0), max(1, gpus))
    return name


AMP_DTYPES = ("auto", "bf16", "fp16")  # train.amp_dtype
# bf16 tensor cores start with Ampere (compute capability 8.0). Below it (Kaggle's T4 7.5, P100
# 6.0) torch.cuda.is_bf16_supported() still says yes by default, through slow emulation.
NATIVE_BF16_CAPABILITY = (8, 0)


def amp_dtype(device: str, enabled: bool, choice: str = "auto"):
    """Autocast dtype on a GPU: `choice` bf16 or fp16, or `auto`: bf16 where the GPU computes
    it natively (compute capability 8.0+), else fp16 (trained with a loss scaler); None (full
    fp32) on the CPU or with amp off."""
    import torch

    if choice not in AMP_DTYPES:
        raise ValueError(f"train.amp_dtype must be one of {', '.join(AMP_DTYPES)}; got {choice!r}")
    if not (enabled and device.startswith("cuda")):
        return None
    if choice != "auto":
        return torch.bfloat16 if choice == "bf16" else torch.float16
    native = torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY
    return torch.bfloat16 if native else torch.float16


def loader_workers(value: int | str) -> int:
    """`data.num_workers`: a number as given, or `auto`: the CPUs this process may use, at most
    4 (more than the CPUs makes PyTorch warn, and slows every step)."""
    if value != "auto":
        return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    # Legacy global state: third-party augmentations still draw from it.
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)
