"""Outputs committed together: a failure while writing leaves every earlier file as it was; a
kill between the renames is completed by the next run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from jaguar_reid import commit
from jaguar_reid.io_utils import DiskFullError

NAMES = ("submission.csv", "submission.embeddings.npz", "submission.scores.json")


def _earlier(folder: Path) -> dict[str, bytes]:
    for name in NAMES:
        (folder / name).write_bytes(f"earlier {name}".encode())
    return _state(folder)


def _state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _writers(folder: Path, fail_at: int | None = None, error: BaseException | None = None):
    def writer(i: int, name: str):
        def write(path: Path) -> None:
            if i == fail_at:
                path.write_bytes(b"partial")
                raise error
            path.write_bytes(f"new {name}".encode())
        return write
    return {folder / name: writer(i, name) for i, name in enumerate(NAMES)}


def test_every_file_is_put_in_place(tmp_path):
    _earlier(tmp_path)
    commit.commit_together(_writers(tmp_path), "submission")
    assert _state(tmp_path) == {n: f"new {n}".encode() for n in NAMES}


@pytest.mark.parametrize("fail_at", range(len(NAMES)))
def test_a_failure_at_any_file_leaves_every_earlier_file(tmp_path, fail_at):
    before = _earlier(tmp_path)
    with pytest.raises(ValueError, match="boom"):
        commit.commit_together(_writers(tmp_path, fail_at, ValueError("boom")), "submission")
    assert _state(tmp_path) == before  # and no temporary file is left


def test_a_full_disk_after_the_first_file_is_said_and_loses_nothing(tmp_path):
    before = _earlier(tmp_path)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(DiskFullError, match="disk is full"):
        commit.commit_together(_writers(tmp_path, 1, full), "submission")
    assert _state(tmp_path) == before


def test_a_kill_between_renames_is_completed_by_the_next_run(tmp_path, monkeypatch):
    _earlier(tmp_path)
    real = os.replace

    def replace_then_die(src, dst):
        if str(dst).endswith(NAMES[1]):
            raise KeyboardInterrupt  # the process dies after one of the three renames
        real(src, dst)

    monkeypatch.setattr(commit.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        commit.commit_together(_writers(tmp_path), "submission")
    monkeypatch.setattr(commit.os, "replace", real)
    assert (tmp_path / ".submission.commit.json").is_file()
    mixed = _state(tmp_path)  # what a reader would see: hence the journal
    assert mixed[NAMES[0]] == b"new submission.csv" and mixed[NAMES[1]].startswith(b"earlier")
    assert commit.finish_commits(tmp_path, "submission")
    assert _state(tmp_path) == {n: f"new {n}".encode() for n in NAMES}
    assert not commit.finish_commits(tmp_path, "submission")
