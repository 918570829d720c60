"""Outputs committed together: a failure while writing leaves every earlier file as it was; a
kill between the renames is completed by the next run."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest

from jaguar_reid import commit
from jaguar_reid.io_utils import DiskFullError

NAMES = ("submission.csv", "submission.embeddings.npz", "submission.scores.json")
LOCK = ".submission.commit.lock"


def _earlier(folder: Path) -> dict[str, bytes]:
    for name in NAMES:
        (folder / name).write_bytes(f"earlier {name}".encode())
    return _state(folder)


def _state(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` but the commit's lock (an empty side file that stays)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name != LOCK and not p.is_dir()}


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


RACE = ("identities.csv", "identities.scores.json")
RACE_TRIALS = 40


def _race_worker(run: str, folders: list[Path], barrier, errors: Path) -> None:
    """One of two processes committing `RACE` to each of `folders`, trial by trial in step
    with the other, its renames slowed so that the two runs' renames would interleave."""
    rng = random.Random(f"{run}{os.getpid()}")
    real = os.replace

    def slow_replace(src, dst):
        time.sleep(rng.uniform(0, 0.003))
        real(src, dst)

    commit.os.replace = slow_replace  # this child's os only
    failures = []
    for folder in folders:
        barrier.wait(timeout=30)
        try:
            commit.commit_together(
                {folder / n: (lambda p, n=n: p.write_text(f"{run} {n}")) for n in RACE},
                "identify")
        except Exception as exc:  # every failure is the test's finding
            failures.append(f"{folder.name}: {exc!r}")
    errors.write_text("\n".join(failures))
    os._exit(1 if failures else 0)


def test_two_runs_committing_at_once_take_turns(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (and fcntl locks)")
    ctx = multiprocessing.get_context("fork")
    folders = [tmp_path / f"trial{i}" for i in range(RACE_TRIALS)]
    for folder in folders:
        folder.mkdir()
        for n in RACE:
            (folder / n).write_text(f"earlier {n}")
    barrier = ctx.Barrier(2)
    workers = {run: ctx.Process(target=_race_worker,
                                args=(run, folders, barrier, tmp_path / f"errors.{run}"))
               for run in "AB"}
    for worker in workers.values():
        worker.start()
    for worker in workers.values():
        worker.join(timeout=60)
        if worker.is_alive():  # stuck: its exit code stays None and is reported below
            worker.kill()
            worker.join()
    found = []  # every finding at once: a failed run, a folder mixing two runs, a stray file
    for run, worker in workers.items():
        errors = tmp_path / f"errors.{run}"
        if worker.exitcode != 0:
            said = errors.read_text() if errors.is_file() else ""
            found.append(f"run {run} exited {worker.exitcode}: {said}")
    for folder in folders:
        left = sorted({p.name for p in folder.iterdir()} - {*RACE, ".identify.commit.lock"})
        if left:  # no temporary file and no journal; the lock's side file stays
            found.append(f"{folder.name} keeps {left}")
        texts = [(folder / n).read_text() for n in RACE]
        if len({t.split()[0] for t in texts}) != 1 or texts[0].startswith("earlier"):
            found.append(f"{folder.name} mixes {texts}")  # or kept none of the two runs
    assert not found, f"{RACE_TRIALS} trials:\n" + "\n".join(found)


def test_a_full_disk_while_writing_the_journal_removes_the_new_copies(tmp_path, monkeypatch):
    before = _earlier(tmp_path)

    def full(path, data):
        raise DiskFullError(f"{path}: the disk is full (no space left on the device)")

    monkeypatch.setattr(commit, "atomic_write_json", full)
    with pytest.raises(DiskFullError, match="disk is full"):
        commit.commit_together(_writers(tmp_path), "submission")
    assert _state(tmp_path) == before  # every earlier file as it was, no temporary file


def test_an_earlier_journal_that_cannot_be_completed_removes_the_new_copies(tmp_path):
    before = _earlier(tmp_path)
    (tmp_path / "gone").mkdir()  # a killed run's rename onto a folder: it fails again
    stale = tmp_path / ".stale.tmp"
    stale.write_text("stale")
    (tmp_path / ".submission.commit.json").write_text(
        json.dumps({"renames": [[str(stale), str(tmp_path / "gone")]]}))
    with pytest.raises(commit.CommitError, match="gone: cannot be put in place"):
        commit.commit_together(_writers(tmp_path), "submission")
    after = _state(tmp_path)
    assert {n: after.pop(n) for n in NAMES} == before  # and none of ours is left:
    assert set(after) == {".stale.tmp", ".submission.commit.json"}  # the killed run's stay


def test_a_read_only_file_system_is_not_a_full_disk(tmp_path, monkeypatch):
    from jaguar_reid import io_utils

    class Nearly:
        f_bavail, f_frsize = 9, 4096  # 36864 bytes free

    monkeypatch.setattr(io_utils.os, "statvfs", lambda path: Nearly())
    assert io_utils._disk_full_reason(RuntimeError("writer failed"), tmp_path) == (
        "36864 bytes free")  # the guess still stands for an error that hides its errno
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        refused = OSError(code, os.strerror(code))
        assert io_utils._disk_full_reason(refused, tmp_path) is None
        try:
            try:
                raise refused
            except OSError as exc:
                raise RuntimeError("unexpected pos 64") from exc
        except RuntimeError as wrapped:
            assert io_utils._disk_full_reason(wrapped, tmp_path) is None
