"""Training curves as TensorBoard event files, with `report.tensorboard=true`: for watching a
run live (TensorBoard, or a Kaggle notebook, which renders them), offline, beside the
experiment: `<exp>/tensorboard/fold<k>/`.

Every scalar is at the optimiser step it belongs to (the schedule's step count, which a resume
restores): `train/loss` and `train/lr` per step, then per epoch `epoch/loss`, `epoch/lr`,
`epoch/images_per_s` and the validation scores `val/<metric>` at the epoch's last step (epoch
0, the model before training, at step 0). A resumed run opens its writer with `purge_step` one
after the checkpoint's step, so whatever the killed run wrote past its checkpoint is dropped
and the curves hold each step once. A fresh run removes the event files of an earlier one.

tensorboard is an optional dependency (the extra `tensorboard`); without the setting nothing
here is imported and the loop's cost is one no-op call per step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from jaguar_reid.extras import MissingExtra, missing_message, require
from jaguar_reid.io_utils import explain_disk_full

if TYPE_CHECKING:
    from torch.optim import Optimizer

TENSORBOARD_DIR = "tensorboard"  # in the experiment folder, one folder per fold
FEATURE = "report.tensorboard=true"
EVENT_FILES = "events.out.tfevents.*"
FLUSH_SECS = 30  # a live view lags the run by at most this
EPOCH_KEYS = ("loss", "lr", "images_per_s")  # of a log row: the epoch's training side
NOT_CURVES = ("epoch", "seconds")  # of a log row: the axis and the wall clock
KEPT = ("the curves written before are kept, and so is the fold's last checkpoint (the run "
        "resumes from it; report.tensorboard=false trains without curves)")


def curves_dir(fold_dir: Path) -> Path:
    """`<exp>/tensorboard/<fold folder name>/` for a fold folder `<exp>/<fold folder>`."""
    return fold_dir.parent / TENSORBOARD_DIR / fold_dir.name


def summary_writer_class() -> type:
    """torch's SummaryWriter, or the one line naming the extra to install."""
    require("tensorboard", FEATURE)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # an unusable tensorboard (torch checks its version)
        raise MissingExtra(missing_message("tensorboard", FEATURE)) from None
    return SummaryWriter


class NoCurves:
    """What the loop writes to without `report.tensorboard`: nothing."""

    def step(self, step: int, loss: float, optimizer: Optimizer) -> None:
        pass

    def epoch(self, step: int, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Curves(NoCurves):
    """One fold's event files. `resume_step`: the optimiser step of the checkpoint a resumed
    run starts from; None for a fresh run. A write that fails for a full disk is one line
    naming the folder (`DiskFullError`)."""

    def __init__(self, directory: Path, resume_step: int | None) -> None:
        writer_class = summary_writer_class()
        quiet_writer_threads()
        self.directory = directory
        with self._writing():
            directory.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                for old in directory.glob(EVENT_FILES):
                    old.unlink()
            purge = None if resume_step is None else resume_step + 1
            self.writer = writer_class(log_dir=str(directory), purge_step=purge,
                                       flush_secs=FLUSH_SECS)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        # The writer's thread keeps the error that stopped it; the next write or flush here
        # raises it again, in the training's own thread.
        with explain_disk_full(self.directory, KEPT):
            yield

    def step(self, step: int, loss: float, optimizer: Optimizer) -> None:
        """Optimiser step `step`'s loss (the mean over its accumulated batches) and learning
        rate (the largest of the parameter groups', as the log's), before it is taken."""
        with self._writing():
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", max(g["lr"] for g in optimizer.param_groups),
                                   step)

    def epoch(self, step: int, row: dict) -> None:
        """An epoch's log row; written through before the epoch's checkpoint, so a run killed
        after its checkpoint has this epoch's values on disk."""
        with self._writing():
            for key, value in row.items():
                if key in NOT_CURVES or not isinstance(value, int | float) or \
                        not math.isfinite(value):
                    continue
                tag = f"epoch/{key}" if key in EPOCH_KEYS else f"val/{key}"
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        with self._writing():
            self.writer.close()


def quiet_writer_threads() -> None:
    """Leave out the traceback that tensorboard's writer thread prints when a write fails (a
    full disk): the thread keeps its error, and the next write or flush raises it here, where
    it becomes one line. Every other thread's error is reported as before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        kind = type(args.thread)
        if kind.__name__ == "_AsyncWriterThread" and kind.__module__.startswith("tensorboard"):
            return
        previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def open_curves(enabled: bool, fold_dir: Path, resume_step: int | None) -> NoCurves:
    """The fold's curves when `report.tensorboard` (on the writing process), else NoCurves."""
    return Curves(curves_dir(fold_dir), resume_step) if enabled else NoCurves()
