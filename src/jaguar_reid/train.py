"""Train the folds of an experiment: `bash train.sh fold=0..4 [key=value ...]`
(`python -m jaguar_reid.train ...`).

Prepares the image cache and the folds file once, trains each fold asked for
(`training.loop.train_fold`, validated by `retrieval.scoring.validation_scores`), then writes
the out-of-fold scores, a leaderboard row and the report. `fold=full` trains on every image
with no validation (`fold_full/`). With `gpus>1`: one fold data-parallel under torchrun, or
folds side by side (`parallel=folds`).

Beside train.csv's images: `data.pseudo` adds pseudo-labelled test images to each fold's
training side, `train.init` starts each fold from another experiment's same fold, and
`train.teacher` trains a student towards a teacher ensemble's embeddings (training images and,
unlabelled, test images; `training.distill`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from jaguar_reid import layout
from jaguar_reid.config import Config, load_config, parse_fold_spec, save_config
from jaguar_reid.data.csv_tables import (
    DataError,
    pair_image_names,
    read_pseudo_csv,
    read_test_csv,
    read_train_csv,
)
from jaguar_reid.data.image_cache import prepare_images
from jaguar_reid.data.images import ImageLoader, image_loader
from jaguar_reid.data.preprocess import resolve_input
from jaguar_reid.data.splits import keep_with_experiment, load_or_create_folds
from jaguar_reid.io_utils import resolve_device
from jaguar_reid.reporting.page import after_run
from jaguar_reid.retrieval.oof import (
    floor_for,
    report_floor,
    score_experiment,
    validation_scores,
)
from jaguar_reid.retrieval.teacher import teacher_embeddings
from jaguar_reid.training import curves, distributed, losses
from jaguar_reid.training.loop import Extra, FoldHooks, train_fold
from jaguar_reid.training.model import check_start_weights


def prepare(cfg: Config) -> tuple[pd.DataFrame, list[Path], ImageLoader, ImageLoader]:
    """Image cache and folds file (made once, then only read), and the image loaders."""
    files = layout.data_files(cfg)
    train_df = read_train_csv(files.train)
    images = prepare_images(cfg, train_df["filename"], files.train, "train images")
    records = images.records
    hashes = None if records is None else [r["phash"] for r in records]
    train_load = image_loader(cfg, cached=records is not None, train=True)
    folds_df = load_or_create_folds(cfg, train_df, hashes)
    return folds_df, images.paths, images.load, train_load


def extra_images(cfg: Config, folds_df: pd.DataFrame) -> Extra | None:
    """The test images that join the training side: `data.pseudo`'s rows with their identity
    and, for a student (`train.teacher`), every other test image, unlabelled."""
    files = layout.data_files(cfg)
    test_names = pair_image_names(read_test_csv(files.test)) if (
        cfg.data.pseudo or cfg.train.teacher) else []
    names, identities = [], []
    if cfg.data.pseudo:
        pseudo = read_pseudo_csv(cfg.data.pseudo)
        known, trained = set(test_names), set(folds_df["ground_truth"])
        for i, (name, identity) in enumerate(zip(pseudo["filename"], pseudo["identity"],
                                                 strict=True)):
            where = f"{cfg.data.pseudo}: row {i + 2}"
            if name not in known:
                raise DataError(f"{where}: {name!r} is not a test image of {files.test}")
            if identity not in trained:
                raise DataError(f"{where}: identity {identity!r} is not in {files.train}; "
                                "pseudo-labels name training identities")
        names, identities = list(pseudo["filename"]), list(pseudo["identity"])
    if cfg.train.teacher:
        taken = set(names)
        names += [n for n in test_names if n not in taken]
        identities += [None] * (len(names) - len(identities))
    if not names:
        return None
    paths = prepare_images(cfg, names, files.test, "test images for training").paths
    return Extra(names, paths, identities)


def student(cfg: Config, folds_df: pd.DataFrame, extra: Extra | None,
            device: str) -> tuple[Config, np.ndarray | None]:
    """With `train.teacher`: the student's config, whose neck gives the teachers' dimensions,
    and the teachers' embedding of every training row, then of every extra image."""
    if not cfg.train.teacher:
        return cfg, None
    train, test = teacher_embeddings(cfg, list(folds_df["filename"]),
                                     extra.names if extra else [], device)
    dim = train.shape[1]
    if cfg.model.embed_dim != dim or cfg.model.retrieval != "neck":
        print(f"student of {cfg.train.teacher}: model.embed_dim={dim} (the teachers' "
              "embedding), model.retrieval=neck")
        cfg = Config({**cfg, "model": Config({**cfg.model, "embed_dim": dim,
                                              "retrieval": "neck"})})
    if cfg.fold != layout.FULL:
        print(f"note: the teachers {cfg.train.teacher} trained on this student's validation "
              "images, so its out-of-fold scores flatter it; judge it on a held-out test "
              "(train it with fold=full)")
    return cfg, np.concatenate([train, test])


def run(cfg: Config, after_epoch: Callable[[int | str, int], None] | None = None) -> dict:
    """Train the folds `cfg.fold` asks for, then rewrite the experiment's out-of-fold report.
    Under torchrun every rank runs this; rank 0 alone writes. `after_epoch(fold, epoch)` is
    called after each epoch's checkpoint (raising there stops the run; it resumes later)."""
    cfg = recipe(cfg)
    start = time.perf_counter()
    folds_to_run = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
    device = resolve_device(cfg.device, cfg.gpus)
    if distributed.launched_by_torchrun():
        device = distributed.init(device)
    try:
        folds_df, paths, load, train_load = prepare(cfg)
        extra = extra_images(cfg, folds_df)
        cfg, targets = student(cfg, folds_df, extra, device)
        exp_dir = layout.model_dir(cfg)
        if distributed.is_main():
            exp_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, exp_dir / layout.RUN_CONFIG)
            keep_with_experiment(folds_df, exp_dir)
        hooks = FoldHooks(partial(validation_scores, cfg=cfg, device=device, load=load))
        if after_epoch is not None:
            hooks.after_epoch = after_epoch
        results = {fold: train_fold(cfg, fold, folds_df, paths, train_load, hooks, device,
                                    extra, targets) for fold in folds_to_run}
        if distributed.is_main() and not os.environ.get(distributed.CHILD_ENV):
            _after_training(cfg, folds_to_run, time.perf_counter() - start, device)
        return results
    finally:
        distributed.shutdown()


def _after_training(cfg: Config, folds: list, wall_s: float, device: str) -> None:
    summary = None
    if any(f != layout.FULL for f in folds):
        floor = floor_for(cfg, resolve_device(cfg.device))
        summary = score_experiment(layout.model_dir(cfg), floor=floor)
    after_run(cfg, "train", wall_s=wall_s, device=device)
    if summary is not None:  # the last line a user sees
        report_floor(f"experiment {cfg.exp!r} out of fold:", summary)


def recipe(cfg: Config) -> Config:
    """The config a run trains and saves: the backbone's own input settings where `auto`
    asks for them, and with `train.epochs=0` (no training: the untouched backbone with the
    recipe's pooling is each fold's model) retrieval by the pooled backbone features, since
    an untrained neck would only add noise. A backbone without starting weights stops here
    unless `model.allow_random_init`."""
    check_start_weights(cfg)
    cfg = resolve_input(cfg)
    if cfg.train.epochs == 0 and cfg.model.retrieval != "backbone":
        print("train.epochs=0: each fold's model is the untouched backbone; retrieval by its "
              "pooled features (model.retrieval=backbone)")
        cfg = Config({**cfg, "model": Config({**cfg.model, "retrieval": "backbone"})})
    return cfg


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    # What can refuse the run does so before the image cache is built: a GPU this torch build
    # has no kernels for (every one of the run's), a missing tensorboard or losses extra.
    resolve_device(cfg.device, cfg.gpus)
    if cfg.report.tensorboard:
        curves.summary_writer_class()
    losses.require_extras(cfg)
    cfg = recipe(cfg)
    if cfg.gpus <= 1 or distributed.launched_by_torchrun():
        run(cfg)
        return
    # The children find the cache, the folds and the teachers' embeddings ready: no race.
    folds_df = prepare(cfg)[0]
    student(cfg, folds_df, extra_images(cfg, folds_df), resolve_device(cfg.device))
    if cfg.parallel == "data":
        distributed.launch_data_parallel(argv, cfg.gpus)
        return
    folds = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
    start = time.perf_counter()
    distributed.launch_fold_parallel(argv, folds, cfg.gpus, layout.fold_logs_dir(cfg),
                                     resolve_device(cfg.device))
    _after_training(cfg, folds, time.perf_counter() - start,
                    f"{cfg.gpus} x {resolve_device(cfg.device)}")


if __name__ == "__main__":
    from jaguar_reid.cli import run_step

    run_step("train")
