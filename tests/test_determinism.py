"""Same inputs, same seed, same bytes: folds files, trained weights and submissions (CPU).

A run that cannot be repeated cannot be compared with another: every figure in
docs/experiments.md assumes that re-running a command gives the very same files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from jaguar_reid import layout, submission, train
from jaguar_reid.config import load_config
from jaguar_reid.data import splits as folds_cli
from jaguar_reid.data.csv_tables import read_train_csv
from jaguar_reid.data.splits import make_folds


def folds_args(demo_dir, tmp_path, name: str, *extra: str) -> list[str]:
    return [f"data.dir={demo_dir}", f"output_dir={tmp_path / name}",
            f"folds.file={tmp_path / name / 'folds.csv'}", "cache.workers=1", *extra]


@pytest.mark.parametrize("strategy", ["grouped", "closed"])
def test_same_seed_same_folds_file(demo_dir, tmp_path, strategy):
    """Two runs of `python -m jaguar_reid.folds` with their own caches write the same bytes; the
    near-duplicate grouping (from the image hashes) is part of what is compared."""
    for name in ("a", "b"):
        folds_cli.main(folds_args(demo_dir, tmp_path, name, f"folds.strategy={strategy}",
                                  "folds.n_folds=4"))
    first = (tmp_path / "a" / "folds.csv").read_bytes()
    assert first == (tmp_path / "b" / "folds.csv").read_bytes()
    assert len(pd.read_csv(tmp_path / "a" / "folds.csv")) == len(
        read_train_csv(demo_dir / "train.csv"))


def test_other_seed_other_split_same_seed_same_split(demo_dir):
    cfg = load_config([f"data.dir={demo_dir}", "folds.strategy=closed", "folds.n_folds=4",
                       "folds.dup_threshold=-1"])
    train_df = read_train_csv(layout.data_files(cfg).train)
    split = make_folds(train_df, cfg)
    again = make_folds(train_df, load_config([f"data.dir={demo_dir}", "folds.strategy=closed",
                                              "folds.n_folds=4", "folds.dup_threshold=-1"]))
    pd.testing.assert_frame_equal(split, again)
    other = make_folds(train_df, load_config([f"data.dir={demo_dir}", "folds.strategy=closed",
                                              "folds.n_folds=4", "folds.dup_threshold=-1",
                                              "folds.seed=7"]))
    assert (split["fold"] != other["fold"]).any()


@pytest.mark.slow
def test_two_trainings_give_the_same_weights_and_submission(demo_dir, tmp_path, tiny_cfg_args):
    """Two independent runs (own output folder, cache and folds file) of the tiny demo recipe
    on the CPU: bit-identical weights, validation embeddings, log and submission file; a third
    run with another seed shows the comparison can tell."""
    runs = {}
    for name in ("a", "b"):
        args = [*tiny_cfg_args, *folds_args(demo_dir, tmp_path, name, "folds.n_folds=4"),
                "exp=same", "fold=0", "submit.folds=0", "train.epochs=1"]
        train.main(args)
        submission.main(args)
        runs[name] = load_config(args)
    cfg_a, cfg_b = runs["a"], runs["b"]
    a, b = layout.model_dir(cfg_a), layout.model_dir(cfg_b)
    fold_a, fold_b = layout.fold_dir(a, 0), layout.fold_dir(b, 0)

    assert layout.folds_path(cfg_a).read_bytes() == layout.folds_path(cfg_b).read_bytes()
    for weights in (layout.MODEL_WEIGHTS, layout.BEST_WEIGHTS):
        wa, wb = load_file(str(fold_a / weights)), load_file(str(fold_b / weights))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (weights, key)
        assert (fold_a / weights).read_bytes() == (fold_b / weights).read_bytes()
    # The comparison can fail: another seed, on the same folds, trains other weights.
    other_args = [*tiny_cfg_args, *folds_args(demo_dir, tmp_path, "a", "folds.n_folds=4"),
                  "exp=other_seed", "fold=0", "train.epochs=1", "seed=43"]
    train.main(other_args)
    other = load_file(str(layout.fold_dir(layout.model_dir(load_config(other_args)), 0)
                          / layout.MODEL_WEIGHTS))
    assert any(not torch.equal(other[k], wa[k]) for k in wa)
    log = pd.read_csv(fold_a / layout.TRAIN_LOG)
    assert log["epoch"].tolist() == [0, 1] and log["loss"].iloc[1:].notna().all()
    columns = ["epoch", "loss", "lr", "pair_auc", "map"]
    pd.testing.assert_frame_equal(log[columns], pd.read_csv(fold_b / layout.TRAIN_LOG)[columns])
    with np.load(fold_a / layout.VAL_EMBEDDINGS) as ea, \
            np.load(fold_b / layout.VAL_EMBEDDINGS) as eb:
        assert sorted(ea.files) == sorted(eb.files)
        for key in ea.files:
            assert np.array_equal(ea[key], eb[key]), key

    sub_a, sub_b = layout.submission_path(cfg_a, "same"), layout.submission_path(cfg_b, "same")
    assert sub_a.read_bytes() == sub_b.read_bytes()
    with np.load(layout.submission_extra(sub_a, layout.EMBEDDINGS_EXTRA)) as ea, \
            np.load(layout.submission_extra(sub_b, layout.EMBEDDINGS_EXTRA)) as eb:
        assert np.array_equal(ea["embeddings"], eb["embeddings"])
    sub = pd.read_csv(sub_a)
    test_rows = pd.read_csv(layout.data_files(cfg_a).test)["row_id"]
    assert sub["row_id"].tolist() == test_rows.tolist()
    assert sub["similarity"].nunique() > 1  # a real submission, not a constant
