"""`report.tensorboard=true`: training writes TensorBoard event files (per-step loss and
learning rate, per-epoch validation scores) that read back as the run's own log; a run killed
mid-epoch and resumed holds every step once; the setting changes nothing else; without
tensorboard installed it stops in one line before any training."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from jaguar_reid import layout
from jaguar_reid.config import load_config
from jaguar_reid.extras import MissingExtra, missing_message
from jaguar_reid.training import curves, loop
from tests.helpers import fold_path


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (purged steps left out)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def run_args(demo_dir, tmp_path, tiny_cfg_args, *extra):
    return [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "fold=0",
            "train.epochs=2", "train.batch_size=8", *extra]


class Killed(Exception):
    pass


@pytest.mark.slow
def test_curves_hold_the_log_and_survive_a_resume(demo_dir, tmp_path, tiny_cfg_args,
                                                  monkeypatch):
    pytest.importorskip("tensorboard")
    from jaguar_reid import train

    args = run_args(demo_dir, tmp_path, tiny_cfg_args)
    train.main([*args, "exp=off"])
    train.main([*args, "exp=on", "report.tensorboard=true"])
    off, on = fold_path([*args, "exp=off"]), fold_path([*args, "exp=on"])
    assert not (off.parent / curves.TENSORBOARD_DIR).exists()
    # The setting changes no result.
    assert (off / layout.MODEL_WEIGHTS).read_bytes() == (on / layout.MODEL_WEIGHTS).read_bytes()

    found = scalars(curves.curves_dir(on))
    log = pd.read_csv(on / layout.TRAIN_LOG)
    steps = [s for s, _ in found["train/loss"]]
    per_epoch = len(steps) // 2
    assert per_epoch >= 2 and steps == list(range(1, 2 * per_epoch + 1))
    assert [s for s, _ in found["train/lr"]] == steps
    # Epoch 0 (before training) at step 0, each epoch at its last step; the values are the
    # log's (stored as float32).
    epoch_steps = [0, per_epoch, 2 * per_epoch]
    for metric in ("map", "pair_auc", "map_backbone"):
        assert found[f"val/{metric}"] == [
            (s, pytest.approx(v, rel=1e-6)) for s, v in zip(epoch_steps, log[metric],
                                                            strict=True)]
    assert [s for s, _ in found["epoch/loss"]] == epoch_steps[1:]  # epoch 0 has no loss
    # An epoch's loss is the mean of its batches' losses; its steps' are those losses.
    for epoch in (1, 2):
        batch = [v for s, v in found["train/loss"]
                 if (epoch - 1) * per_epoch < s <= epoch * per_epoch]
        assert log["loss"][epoch] == pytest.approx(np.mean(batch), rel=0.05)
    # The schedule warms up: the learning rate of step 1 is below the peak.
    lrs = [v for _, v in found["train/lr"]]
    assert lrs[0] < max(lrs)

    # Killed in the middle of epoch 2, after some of its steps reached the event file.
    real_step, calls = loop.optimizer_step, []

    def dying_step(*a, **k):
        calls.append(1)
        if len(calls) == per_epoch + 2:
            raise Killed
        return real_step(*a, **k)
    monkeypatch.setattr(loop, "optimizer_step", dying_step)
    with pytest.raises(Killed):
        train.run(load_config([*args, "exp=resumed", "report.tensorboard=true"]))
    resumed = fold_path([*args, "exp=resumed"])
    killed = scalars(curves.curves_dir(resumed))
    assert max(s for s, _ in killed["train/loss"]) == per_epoch + 2  # past the checkpoint
    monkeypatch.undo()
    train.main([*args, "exp=resumed", "report.tensorboard=true"])
    again = scalars(curves.curves_dir(resumed))
    assert [s for s, _ in again["train/loss"]] == steps  # each step once
    assert again["train/loss"] == found["train/loss"]  # the resumed run's are the same
    assert again["val/map"] == found["val/map"]


def test_fresh_run_clears_earlier_curves_and_resume_purges(tmp_path):
    """Unit level: a fresh writer removes old event files; a resumed one hides the steps
    after its checkpoint's."""
    pytest.importorskip("tensorboard")
    fold = tmp_path / "exp" / "fold0"
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    first = curves.open_curves(True, fold, None)
    for step in range(1, 7):
        first.step(step, float(step), opt)
    first.epoch(3, {"epoch": 1, "loss": 2.0, "seconds": 1.0, "map": 0.25, "pair_auc": float("nan")})
    first.close()
    found = scalars(curves.curves_dir(fold))
    assert found["val/map"] == [(3, 0.25)] and "val/pair_auc" not in found
    assert "val/seconds" not in found and "val/epoch" not in found

    second = curves.open_curves(True, fold, 3)  # resumed from the step-3 checkpoint
    second.step(4, 40.0, opt)
    second.close()
    found = scalars(curves.curves_dir(fold))
    assert found["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert found["train/lr"][0] == (1, 0.5)

    third = curves.open_curves(True, fold, None)  # a fresh run of the fold
    third.step(1, 9.0, opt)
    third.close()
    assert scalars(curves.curves_dir(fold))["train/loss"] == [(1, 9.0)]
    assert isinstance(curves.open_curves(False, fold, None), curves.NoCurves)


def test_without_tensorboard_one_line_before_training(demo_dir, tmp_path, tiny_cfg_args,
                                                      monkeypatch):
    from jaguar_reid import train

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    built = []
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: built.append(1))
    args = run_args(demo_dir, tmp_path, tiny_cfg_args, "exp=notb", "report.tensorboard=true")
    with pytest.raises(MissingExtra) as err:
        train.main(args)
    assert str(err.value) == missing_message("tensorboard", "report.tensorboard=true")
    assert "pip install 'jaguar-reid[tensorboard]'" in str(err.value)
    assert not built


FULL_DISK = '''\
import errno, sys, time
from pathlib import Path
from tensorboard.summary.writer import record_writer
from jaguar_reid.io_utils import DiskFullError
from jaguar_reid.training import curves

real_flush = record_writer.RecordWriter.flush


def full(self):
    raise OSError(errno.ENOSPC, "No space left on device")


import torch
opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
record_writer.RecordWriter.flush = full  # full before the writer's first event
try:
    curves.Curves(Path(sys.argv[1]) / "fold0", None)
except DiskFullError as exc:
    print(f"create: {exc}")
record_writer.RecordWriter.flush = real_flush
run = curves.Curves(Path(sys.argv[1]) / "fold1", None)
run.step(1, 1.0, opt)
record_writer.RecordWriter.flush = full  # full in the middle of the run
try:
    run.step(2, 1.0, opt)
    run.epoch(2, {"epoch": 1, "loss": 1.0, "map": 0.5})
except DiskFullError as exc:
    print(f"epoch: {exc}")
time.sleep(0.5)  # the writer threads have ended and said what they say
'''


def test_full_disk_is_one_line_naming_the_folder(tmp_path):
    """A full disk under the event files, when the writer opens them or mid-run: a
    DiskFullError naming the fold's curves folder, and no traceback from tensorboard's writer
    thread. In a process of its own, where that thread's report would reach stderr."""
    pytest.importorskip("tensorboard")
    import subprocess

    from tests.helpers import REPO

    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], text=True,
                          capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["create", "epoch"]
    for line, fold in zip(lines, ("fold0", "fold1"), strict=True):
        assert line.endswith(f"{tmp_path / fold}: the disk is full (no space left on the "
                             f"device) while writing it; {curves.KEPT}. Free some space (df "
                             f"-h {tmp_path}) and run the same command again")
