"""Faults, tried for real: runs killed with SIGKILL (mid-epoch, mid-checkpoint, mid-submission),
a full disk, two runs of one fold at once, a checkpoint that carries code. Each test checks that
the pipeline goes on and loses nothing. docs/bad_inputs.md ("Faults") is the table of these.

A killed run is a child process (`python child.py MODE ...`, the script below) that patches one
function to SIGKILL itself at a chosen point, so the kill lands at the same place every time;
it is started again with the very command a user would type (`bash train.sh ...`). Every
training child runs on one thread, so a resumed run and an uninterrupted one sum in the same
order and must end bit-identical.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from jaguar_reid import layout, submission, train
from jaguar_reid.io_utils import (
    DiskFullError,
    atomic_path,
    atomic_write_text,
    remove_stray_temps,
    run_main,
)
from jaguar_reid.training import loop
from jaguar_reid.training.checkpoint import (
    append_log,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from jaguar_reid.training.lock import LOCK_NAME, FoldBusyError, fold_lock
from tests.helpers import REPO, TINY_ARGS, base_args, fake_experiment, fold_path, make_data

LOG_COLUMNS = ["epoch", "loss", "lr", "pair_auc", "map", "map_neck", "map_backbone", "map_both"]

CHILD = r'''
"""argv: MODE MARKER key=value...: run jaguar_reid.train (submit.py for MODE
submission-write) with one function patched to SIGKILL this process at the point MODE names."""
import io
import os
import shutil
import signal
import sys
import time
from pathlib import Path

mode, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]


def die(where):
    print(f"SIGKILL {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def write_half_and_die(path, data, where):
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    die(where)


after_epoch = None
if mode == "mid-epoch":  # in the second epoch, after its second optimiser step (of three)
    from jaguar_reid.training import loop

    epochs_done, steps = [], []
    after_epoch = lambda fold, epoch: epochs_done.append(epoch)  # noqa: E731
    real_step = loop.optimizer_step

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        if epochs_done:
            steps.append(1)
            if len(steps) == 2:
                die(f"in epoch {epochs_done[-1] + 1} after step 2")
    loop.optimizer_step = step
elif mode.startswith("checkpoint-write:"):  # half of checkpoint N written, then killed
    import torch

    n, real_save, calls = int(mode.split(":")[1]), torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == n:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            previous = Path(f).parent / "checkpoint.pt"
            if previous.exists():  # a copy of the checkpoint on disk when the kill comes
                shutil.copyfile(previous, marker)
            write_half_and_die(f, buffer.getvalue(), f"writing checkpoint {n}")
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif mode == "submission-write":  # half of the new submission.csv written, then killed
    import pandas as pd

    real_to_csv = pd.DataFrame.to_csv

    def to_csv(self, path=None, *args, **kwargs):
        if path is not None and Path(path).name.startswith(".submission.csv."):
            text = real_to_csv(self, None, *args, **kwargs)
            write_half_and_die(path, text.encode(), "writing submission.csv")
        return real_to_csv(self, path, *args, **kwargs)
    pd.DataFrame.to_csv = to_csv
elif mode == "pause":  # after epoch 1: MARKER appears, then wait for MARKER.go
    def pause(fold, epoch):
        if epoch == 1:
            marker.write_text(str(os.getpid()))
            while not marker.with_suffix(".go").exists():
                time.sleep(0.05)
    after_epoch = pause

from jaguar_reid import train
from jaguar_reid.config import load_config
from jaguar_reid.io_utils import run_main

if mode == "submission-write":
    from jaguar_reid.submission import main
else:
    def main(args):
        train.run(load_config(args), after_epoch=after_epoch)
run_main(main, argv)
'''


# --------------------------------------------------------------------------- helpers


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    pythonpath = [str(REPO / "src"), str(REPO), *([path] if path else [])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_child(tmp_path: Path, mode: str, args: list[str],
              marker: Path | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run([sys.executable, str(script), mode, str(marker or tmp_path / "m"),
                           *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)


def train_sh(args: list[str]) -> subprocess.CompletedProcess:
    """`bash train.sh ARGS`, as a user types it."""
    return subprocess.run(["bash", str(REPO / "train.sh"), *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def killed(result: subprocess.CompletedProcess, where: str) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert f"SIGKILL {where}" in result.stdout, result.stdout[-3000:]


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def train_args(demo_dir: Path, tmp: Path, exp: str, *extra: str) -> list[str]:
    """Three short epochs with EMA: every epoch's checkpoint carries weights, AdamW moments,
    schedule, EMA and RNG states."""
    return [*TINY_ARGS, f"data.dir={demo_dir}", f"output_dir={tmp / 'out'}",
            f"folds.file={tmp / 'folds.csv'}", "folds.n_folds=4", "fold=0", "train.epochs=3",
            "train.ema=true", f"exp={exp}", *extra]


def temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp*"))


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_run(reference: Path, fold: Path) -> None:
    """`fold` finished with the very weights, embeddings, log and scores of `reference`, and
    left nothing of its interruption behind."""
    assert (fold / layout.FOLD_METRICS).is_file()
    assert not (fold / layout.CHECKPOINT).exists() and not (fold / LOCK_NAME).exists()
    assert not temps(fold), temps(fold)
    for name in (layout.MODEL_WEIGHTS, layout.BEST_WEIGHTS):
        same_tensors(load_file(str(reference / name)), load_file(str(fold / name)))
    with np.load(reference / layout.VAL_EMBEDDINGS) as a, \
            np.load(fold / layout.VAL_EMBEDDINGS) as b:
        for key in ("embeddings", "neck", "backbone", "both", "filenames"):
            assert np.array_equal(a[key], b[key]), key
    pd.testing.assert_frame_equal(pd.read_csv(reference / layout.TRAIN_LOG)[LOG_COLUMNS],
                                  pd.read_csv(fold / layout.TRAIN_LOG)[LOG_COLUMNS])
    ref, got = (json.loads((d / layout.FOLD_METRICS).read_text()) for d in (reference, fold))
    for key in ("map", "pair_auc", "epochs_run", "best_epoch", "weights", "classes"):
        assert ref[key] == got[key], key


def cli_error(main, argv: list[str], capsys) -> str:
    """Run an entry point as its script does: exit status 2 and one `error: ...` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and "\n" not in err, err
    return err


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training on one thread too: with the 2 CPU cores shared, two threads wait
    on each other far longer than one takes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every killed one is compared with (a child on one thread too)."""
    tmp = tmp_path_factory.mktemp("reference")
    args = train_args(demo_dir, tmp, "straight")
    succeeded(train_sh(args))
    return fold_path(args)


# --------------------------------------------------------------------------- killed training


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_bit_identical(reference, demo_dir, tmp_path):
    args = train_args(demo_dir, tmp_path, "killed")
    killed(run_child(tmp_path, "mid-epoch", args), "in epoch 2 after step 2")
    fold = fold_path(args)
    assert load_checkpoint(fold / layout.CHECKPOINT)["epoch"] == 1
    assert pd.read_csv(fold / layout.TRAIN_LOG)["epoch"].tolist() == [0, 1]
    assert not (fold / layout.FOLD_METRICS).exists()

    out = succeeded(train_sh(args))
    assert f"fold 0: resuming after epoch 1 from {fold / layout.CHECKPOINT}" in out
    assert_same_run(reference, fold)


@pytest.mark.slow
@pytest.mark.parametrize("save", [1, 2], ids=["first-checkpoint", "second-checkpoint"])
def test_sigkill_mid_checkpoint_write_keeps_the_previous_one(reference, demo_dir, tmp_path,
                                                             save):
    """Half of the new checkpoint is on disk when the kill comes: the previous checkpoint is
    untouched (byte for byte) or, for the first, there is none; the half-written temporary
    file is removed when the fold starts again, and the fold ends as if never killed."""
    args = train_args(demo_dir, tmp_path, "killed")
    before = tmp_path / "checkpoint-at-kill.pt"
    killed(run_child(tmp_path, f"checkpoint-write:{save}", args, before), "writing checkpoint")
    fold = fold_path(args)
    (stray,) = temps(fold)
    assert stray.name.startswith(f".{layout.CHECKPOINT}.") and stray.stat().st_size > 0
    if save == 1:
        assert not (fold / layout.CHECKPOINT).exists() and not before.exists()
    else:
        assert (fold / layout.CHECKPOINT).read_bytes() == before.read_bytes()
        assert load_checkpoint(fold / layout.CHECKPOINT)["epoch"] == 1

    out = succeeded(train_sh(args))
    assert f"fold 0: removed 1 temporary file(s) a killed run left: {stray.name}" in out
    assert ("resuming after epoch 1" in out) == (save == 2)
    assert_same_run(reference, fold)


class Killed(BaseException):
    """Stands for SIGKILL in-process: no `except Exception` in the pipeline catches it."""


@pytest.mark.parametrize("when", ["while-writing-checkpoint", "after-checkpoint"])
def test_best_weights_match_the_checkpoint_after_a_kill(demo_dir, tmp_path, monkeypatch, when):
    """Found a defect: the best weights were written before the epoch's checkpoint. A run
    killed between the two resumed from the previous checkpoint with a newer best file; if the
    epoch run again scored lower (on a GPU it need not repeat itself exactly), the kept
    "best (epoch 1)" weights were the killed epoch 2's. Now they are written after the
    checkpoint, and a resume whose checkpoint is the best epoch writes them again from it.

    Scripted validation scores: the killed run's epoch 2 is its best; the resumed run's epoch 2
    scores lower than epoch 1 ("while-writing-checkpoint", resumed after epoch 1), or epoch 3
    lower than epoch 2 ("after-checkpoint": killed while writing the best file, resumed after
    epoch 2)."""
    args = train_args(demo_dir, tmp_path, "best", "train.ema=false", "train.select=best")
    fold = fold_path(args)
    real_evaluate = train.validation_scores

    def scripted(values):
        values = iter(values)

        def evaluate(*a, **k):
            embs, scores = real_evaluate(*a, **k)
            return embs, {**scores, "map": next(values)}
        return evaluate
    real_torch_save, real_save_weights = torch.save, loop.save_weights

    def die_at_second_checkpoint(obj, f, *a, **k):
        if obj["epoch"] == 2:
            raise Killed
        real_torch_save(obj, f, *a, **k)

    best_writes = []

    def die_writing_best_of_epoch_2(state, path):
        if path.name == layout.BEST_WEIGHTS:
            best_writes.append(path)
            if len(best_writes) == 2:  # epoch 1's, then epoch 2's
                raise Killed
        real_save_weights(state, path)
    monkeypatch.setattr(train, "validation_scores", scripted([0.1, 0.5, 0.9]))
    if when == "while-writing-checkpoint":
        monkeypatch.setattr(torch, "save", die_at_second_checkpoint)
    else:
        monkeypatch.setattr(loop, "save_weights", die_writing_best_of_epoch_2)
    with pytest.raises(Killed):
        train.main(args)
    monkeypatch.undo()
    resume_epoch = load_checkpoint(fold / layout.CHECKPOINT)["epoch"]
    # Epoch 1's or epoch 2's weights, as that checkpoint holds them: the best epoch's.
    expected = load_checkpoint(fold / layout.CHECKPOINT)["model"]
    assert resume_epoch == (1 if when == "while-writing-checkpoint" else 2)

    later = [0.4, 0.3] if resume_epoch == 1 else [0.3]
    monkeypatch.setattr(train, "validation_scores", scripted([*later, 0.0]))
    train.main(args)
    metrics = json.loads((fold / layout.FOLD_METRICS).read_text())
    assert metrics["weights"] == f"best (epoch {resume_epoch})"
    same_tensors(expected, load_file(str(fold / layout.BEST_WEIGHTS)))
    same_tensors(expected, load_file(str(fold / layout.MODEL_WEIGHTS)))


# --------------------------------------------------------------------------- killed submit.py


@pytest.mark.slow
def test_sigkill_mid_submission_write_keeps_the_previous_file(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    args = [*TINY_ARGS, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    exp = fake_experiment(args)
    submission.main(args)
    first = (exp / layout.SUBMISSION).read_bytes()

    # Another retrieval embedding: another file, had the killed write gone through.
    other = [*args, "submit.retrieval=backbone"]
    killed(run_child(tmp_path, "submission-write", other), "writing submission.csv")
    assert (exp / layout.SUBMISSION).read_bytes() == first
    (stray,) = exp.glob(f".{layout.SUBMISSION}.*.tmp*")
    assert 0 < stray.stat().st_size < len(first)

    # The stray file is ignored: the next submission is written and differs from the first.
    submission.main(other)
    second = (exp / layout.SUBMISSION).read_bytes()
    assert second != first and len(second.splitlines()) == len(first.splitlines())


# --------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_full_disk_at_submission_keeps_the_previous_file(tmp_path, monkeypatch, capsys, code):
    data = make_data(tmp_path / "data")
    args = [*TINY_ARGS, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    exp = fake_experiment(args)
    submission.main(args)
    first = (exp / layout.SUBMISSION).read_bytes()
    outputs = {p.name: p.read_bytes() for p in exp.glob(f"{layout.SUBMISSION[:-4]}*")}
    assert len(outputs) >= 2  # the submission and its embeddings
    real_to_csv = pd.DataFrame.to_csv

    def to_csv(self, path=None, *a, **k):
        if path is not None and Path(path).name.startswith(".submission.csv."):
            Path(path).write_text("row_id,similarity\n0,0.12")  # part of it, then the disk fills
            raise OSError(code, os.strerror(code), str(path))
        return real_to_csv(self, path, *a, **k)
    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    err = cli_error(submission.main, [*args, "submit.retrieval=backbone"], capsys)
    reason = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
    assert err.startswith(f"error: {exp / layout.SUBMISSION}: the disk is full ({reason})")
    assert "are all intact and the partial copies were removed" in err
    assert (exp / layout.SUBMISSION).read_bytes() == first
    assert {p.name: p.read_bytes() for p in exp.glob(f"{layout.SUBMISSION[:-4]}*")} == outputs
    assert not temps(exp)


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the size asked (`small_disk(size)`; `remount` changes it); skipped
    where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: str, remount: bool = False) -> Path:
        where = tmp_path / "disk"
        where.mkdir(exist_ok=True)
        options = f"remount,size={size}" if remount else f"size={size}"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the patched "
                        "writer tests cover the same code")
        if not remount:
            mounted.append(where)
        return where
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


WRITERS = {
    # torch.save reports a full disk as a RuntimeError without errno (found: was a traceback)
    "checkpoint": lambda path, n: save_checkpoint(path, {"x": torch.zeros(n)}),
    # safetensors as a SafetensorError holding only the text of the error (found: the same)
    "weights": lambda path, n: save_weights({"x": torch.zeros(n)}, path),
    "text": lambda path, n: atomic_write_text(path, "x" * 4 * n),
    "npz": lambda path, n: _savez(path, np.zeros(n, dtype=np.float32)),
}


def _savez(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, a=array)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_full_real_disk_is_a_clear_error_and_keeps_the_earlier_file(small_disk, writer):
    """A 256 KiB tmpfs: a small file fits, a 400 KiB one does not."""
    disk = small_disk("256k")
    path = disk / f"out.{writer}"
    WRITERS[writer](path, 1000)
    earlier = path.read_bytes()
    with pytest.raises(DiskFullError) as info:
        WRITERS[writer](path, 100_000)
    message = str(info.value)
    assert message.startswith(f"{path}: the disk is full")
    assert f"the earlier {path.name} is intact" in message and f"df -h {disk}" in message
    assert path.read_bytes() == earlier
    assert os.listdir(disk) == [path.name]  # the partial temporary file is gone


def test_full_real_disk_while_appending_the_log(small_disk):
    disk = small_disk("64k")
    log = disk / layout.TRAIN_LOG
    row = {"epoch": 0, "loss": 1.0, "lr": 0.1}
    append_log(log, row)
    with pytest.raises(OSError), open(disk / "filler", "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 4096)
    earlier = log.read_text()
    with pytest.raises(DiskFullError, match=f"{log}: the disk is full .*its earlier rows are "
                                            "kept and the checkpoint is intact"):
        for epoch in range(1, 1000):  # the last page of the file fills first
            append_log(log, {**row, "epoch": epoch})
    assert log.read_text().startswith(earlier)


@pytest.mark.slow
def test_training_on_a_full_real_disk_stops_clearly_and_resumes(small_disk, demo_dir, tmp_path,
                                                                capsys):
    """output_dir on a 300 MiB tmpfs: epoch 1's checkpoint (about 180 MB: weights, EMA, AdamW
    moments) and best weights fit, epoch 2's checkpoint does not fit beside them. The run
    stops with one clear line, epoch 1's checkpoint intact; with more room the same command
    resumes after epoch 1 and finishes."""
    disk = small_disk("300m")
    args = [*train_args(demo_dir, tmp_path, "full"), f"output_dir={disk}"]
    fold = fold_path(args)
    err = cli_error(train.main, args, capsys)
    assert err.startswith(f"error: {fold / layout.CHECKPOINT}: the disk is full")
    assert f"the earlier {layout.CHECKPOINT} is intact and the partial copy was removed" in err
    assert load_checkpoint(fold / layout.CHECKPOINT)["epoch"] == 1
    assert not temps(fold) and not (fold / LOCK_NAME).exists()

    small_disk("700m", remount=True)
    train.main(args)
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert pd.read_csv(fold / layout.TRAIN_LOG)["epoch"].tolist() == [0, 1, 2, 3]
    assert (fold / layout.FOLD_METRICS).is_file() and not (fold / layout.CHECKPOINT).exists()


# --------------------------------------------------------------------------- one fold, one run


def _hold(directory: str, ready, release) -> None:
    with fold_lock(Path(directory), "holder"):
        ready.set()
        release.wait(120)


def _start_holder(directory: Path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(directory), ready, release))
    holder.start()
    assert ready.wait(60), "the lock holder did not start"
    return holder, release


def test_a_fold_being_trained_is_refused_and_free_again_after(demo_dir, tmp_path, capsys):
    args = train_args(demo_dir, tmp_path, "busy", "train.epochs=1", "train.ema=false")
    fold = fold_path(args)
    holder, release = _start_holder(fold)
    try:
        err = cli_error(train.main, args, capsys)
        assert f"experiment 'busy', fold 0 is being trained by another process (pid " \
               f"{holder.pid} on host " in err
        assert f"lock file {fold / LOCK_NAME}" in err
        assert not (fold / layout.CHECKPOINT).exists()
        assert not (fold / layout.TRAIN_LOG).exists()
        with fold_lock(fold_path(args, 1), "fold 1"):  # another fold of the experiment is free
            pass
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0 and not (fold / LOCK_NAME).exists()
    train.main(args)
    assert (fold / layout.FOLD_METRICS).is_file()
    assert not (fold / LOCK_NAME).exists()


def test_a_sigkilled_holder_leaves_no_blocking_lock(demo_dir, tmp_path):
    args = train_args(demo_dir, tmp_path, "stale", "train.epochs=1", "train.ema=false")
    fold = fold_path(args)
    holder, _ = _start_holder(fold)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)
    assert holder.exitcode == -signal.SIGKILL
    assert (fold / LOCK_NAME).read_text().split()[0] == str(holder.pid)  # left behind
    train.main(args)
    assert (fold / layout.FOLD_METRICS).is_file() and not (fold / LOCK_NAME).exists()


def test_a_lock_on_a_removed_lock_file_is_not_taken_for_the_fold(tmp_path, monkeypatch):
    """The race a releasing holder opens: we open train.lock, the holder removes it and lets
    go, we lock the old file. Locking a file no one else can see is not holding the fold: the
    path is opened again, and the lock is then one a second process runs into."""
    from jaguar_reid.training import lock

    real_open, opened = os.open, []

    def open_then_lose_the_race(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:
            os.unlink(path)  # the holder removes the file just after our open
        opened.append(fd)
        return fd
    monkeypatch.setattr(lock.os, "open", open_then_lose_the_race)
    with fold_lock(tmp_path, "first"):
        monkeypatch.undo()
        assert len(opened) == 2
        with pytest.raises(FoldBusyError, match="second is being trained"), \
                fold_lock(tmp_path, "second"):
            pass


@pytest.mark.slow
def test_two_train_sh_on_one_fold(demo_dir, tmp_path):
    """The literal case: `bash train.sh` is training fold 0 (held after epoch 1) when a second
    `bash train.sh fold=0` starts; the second exits with status 2 and one line naming the
    experiment, the fold, the lock file and the first one's pid; the first finishes."""
    args = train_args(demo_dir, tmp_path, "twice", "train.epochs=2", "train.ema=false")
    fold = fold_path(args)
    paused = tmp_path / "paused"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    first = subprocess.Popen([sys.executable, str(script), "pause", str(paused), *args],
                             cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not paused.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert paused.exists(), first.communicate(timeout=60)
        second = train_sh(args)
        assert second.returncode == 2
        err = second.stderr.strip()
        assert err.startswith("error: experiment 'twice', fold 0 is being trained by another "
                              f"process (pid {first.pid} on host ")
        assert f"lock file {fold / LOCK_NAME}" in err and "\n" not in err
    finally:
        paused.with_suffix(".go").write_text("")
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert pd.read_csv(fold / layout.TRAIN_LOG)["epoch"].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("content", ["code", "truncated"])
def test_bad_checkpoint_is_refused_in_one_line(demo_dir, tmp_path, capsys, content):
    """A checkpoint.pt that carries code is refused unread (found: the error was torch's
    message of several lines, advising `weights_only=False`, i.e. to run the code); a cut
    one is named too. Both in one `error:` line."""
    args = train_args(demo_dir, tmp_path, "evil", "train.epochs=1")
    fold = fold_path(args)
    fold.mkdir(parents=True)
    marker, path = tmp_path / "ran", fold / layout.CHECKPOINT
    if content == "code":
        torch.save({"training_digest": "x", "epoch": 1, "x": _Payload(marker)}, path)
    else:
        torch.save({"training_digest": "x", "epoch": 1, "x": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    err = cli_error(train.main, args, capsys)
    assert err.startswith(f"error: {path}: unreadable checkpoint")
    assert err.endswith("delete it to start the fold again")
    if content == "code":
        assert "could run code, so it was not read" in err and "weights_only" not in err
        assert not marker.exists()
        imports, strings = _pickle_contents(path)  # the file really carries a call to run:
        assert {"__builtin__.getattr", "pathlib.Path"} <= imports and "touch" in strings


def _pickle_contents(path: Path) -> tuple[set[str], list[str]]:
    """The globals a torch checkpoint's pickle would import ("module.name") and its strings,
    read with pickletools, never unpickled (torch.save writes a zip holding data.pkl)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    imports, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            imports.add(".".join(str(arg).split()))
        elif op.name.endswith("UNICODE"):
            strings.append(arg)
    return imports, strings


# --------------------------------------------------------------------------- small pieces


def test_stray_temporary_files_are_removed_only_for_the_names_given(tmp_path):
    for name in (".checkpoint.pt.ab12cd.tmp.pt", ".log.csv.x.tmp.csv", ".oof_views.npz.y.tmp.npz",
                 "checkpoint.pt", ".checkpoint.pt.keep"):
        (tmp_path / name).write_text("x")
    removed = remove_stray_temps(tmp_path, ["checkpoint.pt", "log.csv"])
    assert sorted(p.name for p in removed) == [".checkpoint.pt.ab12cd.tmp.pt",
                                              ".log.csv.x.tmp.csv"]
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.pt.keep", ".oof_views.npz.y.tmp.npz",
                                            "checkpoint.pt"]


def test_atomic_write_gives_the_mode_of_a_plain_write(tmp_path):
    """Found: files written through atomic_path were private (0600, mkstemp's mode), unlike
    the log written in place: a teammate or another container user could not read them."""
    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode
    os.chmod(tmp_path / "a.txt", 0o640)
    atomic_write_text(tmp_path / "a.txt", "y")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_saved_weights_get_the_mode_of_a_plain_write(tmp_path):
    """Found: safetensors replaces the temporary file with a private one of its own, so every
    model.safetensors was 0600, unreadable to a teammate or a container's other user."""
    import torch

    from jaguar_reid.training.checkpoint import save_weights

    save_weights({"w": torch.zeros(3)}, tmp_path / "model.safetensors")
    (tmp_path / "plain.bin").write_bytes(b"x")
    assert (tmp_path / "model.safetensors").stat().st_mode == \
        (tmp_path / "plain.bin").stat().st_mode
