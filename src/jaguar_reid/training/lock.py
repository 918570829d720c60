"""One training process per fold: an exclusive lock on a file in the fold's folder.

Two runs of one fold at once would overwrite each other's checkpoint, log and weights, so
training holds `<fold>/train.lock` (`fcntl.flock`) for the whole fold and a second process is
refused with an error naming the holder. Different folds have different lock files and train
side by side. The kernel drops an flock when its process ends, however it ends (SIGKILL, out of
memory), so a lock file left behind by a killed run never blocks the next one. Where `fcntl` is
missing (Windows) there is no lock.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jaguar_reid.io_utils import UserInputError
from jaguar_reid.layout import FOLD_LOCK

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = FOLD_LOCK  # the name tests and messages use


class FoldBusyError(UserInputError):
    """Another live process holds the fold's lock."""


@contextmanager
def fold_lock(directory: str | Path, what: str) -> Iterator[Path]:
    """Hold `directory/train.lock` inside the block; `what` names the fold in the error
    (`experiment 'e', fold 0`). Raises `FoldBusyError` at once when another process holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    if fcntl is None:
        yield path
        return
    fd = _acquire(path, what)
    try:
        yield path
    finally:
        # Removed while still held, so nobody can lock the old file after us (see _acquire).
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise UserInputError(f"{path}: cannot lock the fold ({exc.strerror}); the file "
                                     "system may not support file locks") from None
            raise FoldBusyError(
                f"{what} is being trained by another process ({holder}; lock file {path}). "
                "Two runs of one fold would overwrite each other's checkpoint: wait for it to "
                "finish or stop it, then run the same command again (other folds can train "
                "side by side)") from None
        # The previous holder may have removed the file between our open and our lock: then
        # the lock is on a file no one else sees, and the path is opened again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """`pid 123 on host h` from the lock file, as its holder wrote it."""
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return "pid not yet written: it is just starting"
    return f"pid {text[0]}" + (f" on host {text[1]}" if len(text) > 1 else "")
