"""Several output files put in place together or not at all.

Each file is written beside its target under a temporary name first; a failure there (a full
disk, a writer's error) removes every temporary file and leaves all the previous files as
they were. Only then is a journal written (`.<name>.commit.json`, atomically) listing each
temporary file and its target, the temporary files renamed over their targets (renames take
no space), and the journal removed. A run killed between two renames leaves the journal:
`finish_commits` (run before the next write of the same folder) completes the renames, so
the folder never keeps files from two runs.

The journal and the renames are done under an exclusive lock on a side file,
`.<name>.commit.lock` in the same folder (it stays there, empty): two runs committing the
same name at once take turns, and the folder holds the complete set of the last one. A live
run removes its journal before it lets go of the lock, so a journal found under the lock is
a killed run's, and is completed first. A failure before our journal is in place (a full
disk while writing it, an earlier journal that cannot be completed) removes every temporary
file of this run; once it is in place, a rename that fails keeps the journal and the new
files for the next run to complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from jaguar_reid.io_utils import (
    UserInputError,
    atomic_write_json,
    explain_disk_full,
    file_lock,
    settle,
    temporary_beside,
)

Writer = Callable[[Path], None]  # writes one file at the path it is given
# A target whose writer is REMOVE is deleted by the commit: an earlier run's file that this
# run does not make (its scores, when this run has no labels to score with) must not stay.
REMOVE = None


def _journal(folder: Path, name: str) -> Path:
    return folder / f".{name}.commit.json"


def _lock(folder: Path, name: str) -> Path:
    return folder / f".{name}.commit.lock"


def _write_all(writers: Mapping[Path, Writer | None]) -> dict[Path, Path]:
    """Every file at a temporary path beside its target; on any failure none is left."""
    written: dict[Path, Path] = {}
    names = ", ".join(target.name for target in writers)
    kept = f"the earlier files ({names}) are all intact and the partial copies were removed"
    try:
        for target, write in writers.items():
            if write is REMOVE:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with explain_disk_full(target, kept):
                tmp = written[target] = temporary_beside(target, target.suffix)
                write(tmp)
                settle(tmp, target)
    except BaseException:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise
    return written


def commit_together(writers: Mapping[Path, Writer | None], name: str) -> None:
    """Write every target of `writers` (target -> writer, or REMOVE) as one unit named `name`
    (the journal's name, in the first target's folder)."""
    if not writers:
        return
    written = _write_all(writers)
    folder = next(iter(writers)).parent
    journal = _journal(folder, name)
    steps = [[str(written[p]) if p in written else None, str(p)] for p in writers]
    journaled = False
    try:
        with no_commit_running(folder, name):
            if journal.is_file():  # a killed run's: the live ones remove theirs in the lock
                _apply(journal)
            atomic_write_json(journal, {"renames": steps})
            journaled = True
            _apply(journal)
    except BaseException:
        if not journaled:  # nothing of ours was put in place: the new copies go
            for tmp in written.values():
                tmp.unlink(missing_ok=True)
        raise


def _apply(journal: Path) -> None:
    for tmp, target in json.loads(journal.read_text())["renames"]:
        try:
            if tmp is None:
                Path(target).unlink(missing_ok=True)
            elif Path(tmp).exists():
                os.replace(tmp, target)
        except OSError as exc:
            raise CommitError(f"{target}: cannot be put in place ({exc.strerror}); the new "
                              f"files wait beside it: move it away and run again") from None
    journal.unlink()


class CommitError(UserInputError):
    """A target that cannot be replaced (a folder where a file belongs)."""


def finish_commits(folder: str | Path, name: str) -> bool:
    """Complete a commit a killed run left in `folder` (True when there was one). Without a
    journal nothing is locked or written (a reader's folder may be read-only); with one, it
    is completed under the commit's lock, unless the live run that wrote it removes it first."""
    folder = Path(folder)
    journal = _journal(folder, name)
    if not journal.is_file():
        return False
    with no_commit_running(folder, name):
        if not journal.is_file():  # a live run's, done while we waited
            return False
        _apply(journal)
    return True


@contextmanager
def no_commit_running(folder: str | Path, name: str) -> Iterator[None]:
    """Hold the commit's lock in the block: no run of `name` renames into `folder` meanwhile
    (for a reader that found two files of different runs: one may be mid-commit)."""
    with file_lock(_lock(Path(folder), name)):
        yield
