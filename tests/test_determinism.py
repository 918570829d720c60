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

from jaguar_reid import submission, train
from jaguar_reid.config import load_config
from jaguar_reid.data import folds as folds_cli
from jaguar_reid.data.folds import make_folds
from jaguar_reid.data.tables import read_train_csv
from jaguar_reid.layout import data_files


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
    train_df = read_train_csv(data_files(cfg)["train"])
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
        runs[name] = tmp_path / name / "same"
    a, b = runs["a"], runs["b"]

    assert (tmp_path / "a" / "folds.csv").read_bytes() == \
        (tmp_path / "b" / "folds.csv").read_bytes()
    for weights in ("model.safetensors", "best.safetensors"):
        wa, wb = load_file(str(a / "fold0" / weights)), load_file(str(b / "fold0" / weights))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (weights, key)
        assert (a / "fold0" / weights).read_bytes() == (b / "fold0" / weights).read_bytes()
    # The comparison can fail: another seed, on the same folds, trains other weights.
    train.main([*tiny_cfg_args, *folds_args(demo_dir, tmp_path, "a", "folds.n_folds=4"),
                "exp=other_seed", "fold=0", "train.epochs=1", "seed=43"])
    other = load_file(str(tmp_path / "a" / "other_seed" / "fold0" / "model.safetensors"))
    assert any(not torch.equal(other[k], wa[k]) for k in wa)
    log = pd.read_csv(a / "fold0" / "log.csv")
    assert log["epoch"].tolist() == [0, 1] and log["loss"].iloc[1:].notna().all()
    columns = ["epoch", "loss", "lr", "pair_auc", "map"]
    pd.testing.assert_frame_equal(log[columns], pd.read_csv(b / "fold0" / "log.csv")[columns])
    with np.load(a / "fold0" / "val_embeddings.npz") as ea, \
            np.load(b / "fold0" / "val_embeddings.npz") as eb:
        assert sorted(ea.files) == sorted(eb.files)
        for key in ea.files:
            assert np.array_equal(ea[key], eb[key]), key

    assert (a / "submission.csv").read_bytes() == (b / "submission.csv").read_bytes()
    with np.load(a / "submission.embeddings.npz") as ea, \
            np.load(b / "submission.embeddings.npz") as eb:
        assert np.array_equal(ea["embeddings"], eb["embeddings"])
    sub = pd.read_csv(a / "submission.csv")
    assert sub["row_id"].tolist() == pd.read_csv(demo_dir / "test.csv")["row_id"].tolist()
    assert sub["similarity"].nunique() > 1  # a real submission, not a constant
