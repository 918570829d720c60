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
from pathlib import Path
from typing import TYPE_CHECKING

from jaguar_reid.extras import MissingExtra, missing_message, require

if TYPE_CHECKING:
    from torch.optim import Optimizer

TENSORBOARD_DIR = "tensorboard"  # in the experiment folder, one folder per fold
FEATURE = "report.tensorboard=true"
EVENT_FILES = "events.out.tfevents.*"
FLUSH_SECS = 30  # a live view lags the run by at most this
EPOCH_KEYS = ("loss", "lr", "images_per_s")  # of a log row: the epoch's training side
NOT_CURVES = ("epoch", "seconds")  # of a log row: the axis and the wall clock


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
    run starts from; None for a fresh run."""

    def __init__(self, directory: Path, resume_step: int | None) -> None:
        writer_class = summary_writer_class()
        directory.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for old in directory.glob(EVENT_FILES):
                old.unlink()
        purge = None if resume_step is None else resume_step + 1
        self.writer = writer_class(log_dir=str(directory), purge_step=purge,
                                   flush_secs=FLUSH_SECS)

    def step(self, step: int, loss: float, optimizer: Optimizer) -> None:
        """Optimiser step `step`'s loss (the mean over its accumulated batches) and learning
        rate (the largest of the parameter groups', as the log's), before it is taken."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", max(g["lr"] for g in optimizer.param_groups), step)

    def epoch(self, step: int, row: dict) -> None:
        """An epoch's log row; written through before the epoch's checkpoint, so a run killed
        after its checkpoint has this epoch's values on disk."""
        for key, value in row.items():
            if key in NOT_CURVES or not isinstance(value, int | float) or \
                    not math.isfinite(value):
                continue
            tag = f"epoch/{key}" if key in EPOCH_KEYS else f"val/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_curves(enabled: bool, fold_dir: Path, resume_step: int | None) -> NoCurves:
    """The fold's curves when `report.tensorboard` (on the writing process), else NoCurves."""
    return Curves(curves_dir(fold_dir), resume_step) if enabled else NoCurves()
