"""Train the folds of an experiment: `bash train.sh fold=0..4 [key=value ...]`
(`python -m jaguar_reid.train ...`).

Prepares the image cache and the folds file once, trains each fold asked for
(`training.loop.train_fold`, validated by `retrieval.scoring.validation_scores`), then writes
the out-of-fold scores, a leaderboard row and the report. `fold=full` trains on every image
with no validation (`fold_full/`). With `gpus>1`: one fold data-parallel under torchrun, or
folds side by side (`parallel=folds`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd

from jaguar_reid import layout
from jaguar_reid.config import Config, load_config, parse_fold_spec, save_config
from jaguar_reid.data.cache import prepare_images
from jaguar_reid.data.folds import keep_with_experiment, load_or_create_folds
from jaguar_reid.data.images import image_loader
from jaguar_reid.data.preprocess import resolve_input
from jaguar_reid.data.tables import read_train_csv
from jaguar_reid.io_utils import resolve_device, run_main
from jaguar_reid.reporting.report import after_run
from jaguar_reid.retrieval.scoring import (
    floor_for,
    report_floor,
    score_experiment,
    validation_scores,
)
from jaguar_reid.training import distributed
from jaguar_reid.training.loop import FoldHooks, train_fold
from jaguar_reid.training.model import check_start_weights


def prepare(cfg: Config) -> tuple[pd.DataFrame, list[Path], object, object]:
    """Image cache and folds file (made once, then only read), and the image loaders."""
    files = layout.data_files(cfg)
    train_df = read_train_csv(files["train"])
    paths, load, records = prepare_images(cfg, train_df["filename"], files["train"],
                                          "train images")
    hashes = None if records is None else [r["phash"] for r in records]
    train_load = image_loader(cfg, cached=records is not None, train=True)
    folds_df = load_or_create_folds(cfg, train_df, hashes)
    return folds_df, paths, load, train_load


def run(cfg: Config, after_epoch: Callable[[int | str, int], None] | None = None) -> dict:
    """Train the folds `cfg.fold` asks for, then rewrite the experiment's out-of-fold report.
    Under torchrun every rank runs this; rank 0 alone writes. `after_epoch(fold, epoch)` is
    called after each epoch's checkpoint (raising there stops the run; it resumes later)."""
    cfg = recipe(cfg)
    start = time.perf_counter()
    folds_to_run = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
    device = resolve_device(cfg.device)
    if distributed.launched_by_torchrun():
        device = distributed.init(device)
    try:
        folds_df, paths, load, train_load = prepare(cfg)
        exp_dir = layout.model_dir(cfg)
        if distributed.is_main():
            exp_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, exp_dir / layout.RUN_CONFIG)
            keep_with_experiment(folds_df, exp_dir)
        hooks = FoldHooks(partial(validation_scores, cfg=cfg, device=device, load=load))
        if after_epoch is not None:
            hooks.after_epoch = after_epoch
        results = {fold: train_fold(cfg, fold, folds_df, paths, train_load, hooks, device)
                   for fold in folds_to_run}
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
    cfg = recipe(load_config(argv))
    if cfg.gpus <= 1 or distributed.launched_by_torchrun():
        run(cfg)
        return
    prepare(cfg)  # the children find the cache and the folds ready, and do not race
    if cfg.parallel == "data":
        distributed.launch_data_parallel(argv, cfg.gpus)
        return
    folds = parse_fold_spec(cfg.fold, cfg.folds.n_folds)
    cuda = resolve_device(cfg.device).startswith("cuda")
    start = time.perf_counter()
    distributed.launch_fold_parallel(argv, folds, cfg.gpus, layout.fold_logs_dir(cfg), cuda)
    _after_training(cfg, folds, time.perf_counter() - start,
                    f"{cfg.gpus} x {resolve_device(cfg.device)}")


if __name__ == "__main__":
    run_main(main)
