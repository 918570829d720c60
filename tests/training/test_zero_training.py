"""`train.epochs=0`: the untouched backbone as each fold's model, retrieving with its pooled
features; and the plain frozen floor beside the scores of a run, out of fold and on the test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from jaguar_reid import layout, submission, train
from jaguar_reid.config import load_config
from jaguar_reid.data.csv_tables import resolve_image_paths
from jaguar_reid.retrieval.floor import FloorEmbedder
from jaguar_reid.retrieval.metrics import identity_balanced_map

pytestmark = pytest.mark.slow


def _plain_map(demo_dir, names, labels, seed: int, transform: str) -> float:
    """The floor's mAP on these images, written out with timm alone: timm's eval transform,
    or the full frame (crop_pct 1; the demo's images have masks: squashed)."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=0, global_pool="avg").eval()
    data_cfg = timm.data.resolve_model_data_config(model)
    if transform == "full":
        data_cfg = {**data_cfg, "crop_pct": 1.0, "crop_mode": "squash"}
    prepare = timm.data.create_transform(**data_cfg)
    paths = resolve_image_paths(demo_dir, names, demo_dir / "train.csv")
    with torch.no_grad():
        x = torch.stack([prepare(Image.open(p).convert("RGB")) for p in paths])
        emb = model(x).numpy().astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return identity_balanced_map(emb @ emb.T, np.asarray(labels))


def test_zero_epochs_and_the_plain_floor(demo_dir, tmp_path, tiny_cfg_args, capsys):
    args = [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=4", "exp=zero",
            "train.epochs=0", "floor.enabled=true", "seed=5", "data.mean=auto",
            "data.std=auto"]
    train.main([*args, "fold=0..1"])
    cfg = load_config(args)
    exp = layout.model_dir(cfg)
    chosen = json.loads(FloorEmbedder(cfg, "cpu").choice_path.read_text())["transform"]
    maps = []
    for fold in (0, 1):
        directory = layout.fold_dir(exp, fold)
        saved = load_config([f"config={directory / layout.RUN_CONFIG}"])
        assert saved.model.retrieval == "backbone"  # an untrained neck only adds noise
        # The run saved the values `auto` resolved to: resnet18's own (ImageNet's).
        assert saved.data.mean == pytest.approx([0.485, 0.456, 0.406])
        assert saved.data.interpolation == "bicubic"
        metrics = json.loads((directory / layout.FOLD_METRICS).read_text())
        log = pd.read_csv(directory / layout.TRAIN_LOG)
        assert log["epoch"].tolist() == [0] and metrics["epochs_run"] == 0
        # The kept model is the one epoch 0 scored: its backbone features, untouched.
        assert metrics["map"] == pytest.approx(log["map_backbone"].iloc[0])
        with np.load(directory / layout.VAL_EMBEDDINGS) as data:
            maps.append(_plain_map(demo_dir, data["filenames"].tolist(),
                                   data["labels"].tolist(), seed=5, transform=chosen))
    oof = json.loads((exp / layout.OOF_SCORES).read_text())
    assert oof["floor_mean"]["map"] == pytest.approx(np.mean(maps), abs=1e-6)
    assert "plain frozen floor" in (exp / layout.OOF_SCORES_MD).read_text()

    capsys.readouterr()
    submission.main([*args, "submit.folds=0..1"])
    out = capsys.readouterr().out
    scores = json.loads(layout.submission_extra(
        layout.submission_path(cfg, "zero"), layout.SCORES_EXTRA).read_text())
    assert 0 <= scores["floor"]["map"] <= 1 and scores["oof_floor"] == oof["floor_mean"]
    assert "plain frozen floor" in out and "local test" in out
    below = scores["test"]["map"] < scores["floor"]["map"]
    assert ("is below the plain frozen floor" in out.strip().splitlines()[-1]) == below
    board = pd.read_csv(layout.leaderboard_path(cfg))
    assert board["oof_floor_map"].iloc[0] == pytest.approx(oof["floor_mean"]["map"], abs=1e-5)
    assert board["test_floor_map"].iloc[-1] == pytest.approx(scores["floor"]["map"], abs=1e-5)
