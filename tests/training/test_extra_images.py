"""Test images beside train.csv's in a fold (pseudo-labelled or unlabelled), the teacher's
targets that follow them, and starting from another experiment's fold (`train.init`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jaguar_reid import layout
from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.io_utils import atomic_write_json
from jaguar_reid.training.loop import Extra, load_init, split_fold
from jaguar_reid.training.model import build_model
from tests.helpers import TINY_ARGS, fake_experiment

FOLDS = pd.DataFrame({"filename": [f"t{i}.png" for i in range(6)],
                      "ground_truth": ["a", "a", "b", "b", "c", "c"],
                      "fold": [0, 1, 0, 1, 0, 0]})  # grouped-like: c only in fold 0
PATHS = [Path(f"/cache/t{i}.png") for i in range(6)]
EXTRA = Extra(names=["q0.png", "q1.png", "q2.png"],
              paths=[Path("/cache/q0.png"), Path("/cache/q1.png"), Path("/cache/q2.png")],
              identities=["b", "c", None])


def test_extra_images_join_the_training_side_of_identities_it_trains():
    targets = np.arange(9 * 2, dtype=np.float32).reshape(9, 2)  # 6 rows, then 3 extra
    split = split_fold(FOLDS, 1, PATHS, EXTRA, targets)
    # fold 1 validates t1, t3; trains t0, t2, t4, t5 (a, b, c, c) + q0 (b) + q1 (c) + q2 (none)
    assert [p.name for p in split.train_paths] == ["t0.png", "t2.png", "t4.png", "t5.png",
                                                   "q0.png", "q1.png", "q2.png"]
    assert split.classes == ["a", "b", "c"]
    assert split.train_labels == [0, 1, 2, 2, 1, 2, -1]
    assert split.counts == [1, 2, 3] and split.n_extra == 3
    assert [p.name for p in split.val_paths] == ["t1.png", "t3.png"]
    rows = [0, 2, 4, 5, 6, 7, 8]
    assert torch.equal(split.train_targets, torch.from_numpy(targets[rows]))


def test_a_pseudo_label_of_a_validation_only_identity_is_left_out():
    # fold 0 validates t0, t2, t4, t5: identity c has no training image there
    split = split_fold(FOLDS, 0, PATHS, EXTRA)
    assert split.classes == ["a", "b"]
    assert [p.name for p in split.train_paths] == ["t1.png", "t3.png", "q0.png", "q2.png"]
    assert split.train_labels == [0, 1, 1, -1] and split.n_extra == 2
    assert split.train_targets is None
    plain = split_fold(FOLDS, 0, PATHS)
    assert plain.n_extra == 0 and len(plain.train_paths) == 2


def test_init_needs_a_finished_fold_with_the_same_identities(tmp_path):
    args = [*TINY_ARGS, f"output_dir={tmp_path}", "exp=first"]
    cfg = load_config(args)
    fake_experiment(cfg, folds=(0, 1), metrics={"classes": ["a", "b", "c", "d"]}, n_classes=4)
    fake_experiment(load_config([*args, "exp=half"]), folds=(0,), finished=False, n_classes=4)
    model = build_model(cfg, n_classes=4)
    start = load_config([*args, "exp=second", "train.init=first"])
    load_init(start, 1, model, ["a", "b", "c", "d"])
    saved = build_model(cfg, n_classes=4)
    from safetensors.torch import load_file
    saved.load_state_dict(load_file(str(layout.fold_dir(tmp_path / "first", 1)
                                        / layout.MODEL_WEIGHTS)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 saved.state_dict().values(), strict=True))
    with pytest.raises(ConfigError, match="fold 1 was trained on 4 identities, this fold "
                                          "trains on 3"):
        load_init(start, 1, model, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="fold 0 is not finished"):
        load_init(load_config([*args, "exp=x", "train.init=half"]), 0, model, list("abcd"))
    atomic_write_json(layout.fold_dir(tmp_path / "first", 1) / layout.FOLD_METRICS,
                      {"classes": ["a", "b"]})
    fake_experiment(load_config([*args, "exp=other", "model.embed_dim=8"]), folds=(1,),
                    metrics={"classes": ["a", "b", "c", "d"]}, n_classes=4)
    with pytest.raises(ConfigError, match="does not fit model.backbone"):
        load_init(load_config([*args, "exp=x", "train.init=other"]), 1, model, list("abcd"))
