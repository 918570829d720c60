"""The plain frozen floor against the 30 lines anyone would write: timm's model with average
pooling, timm's own eval transform, cosine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from jaguar_reid import layout
from jaguar_reid.config import load_config
from jaguar_reid.data.csv_tables import read_train_csv, resolve_image_paths
from jaguar_reid.retrieval import floor as floor_mod
from jaguar_reid.retrieval.floor import FloorEmbedder, below_floor
from jaguar_reid.retrieval.metrics import identity_balanced_map

SHARED = Path(__file__).resolve().parents[3] / "shared"
LITE0 = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"


def _plain(model_name: str, paths: list[Path], transform: str = "timm",
           **create) -> np.ndarray:
    """The baseline written out: create, timm's eval transform (or the full frame: crop_pct 1,
    squashed where the image has transparent pixels), pooled features, L2."""
    model = timm.create_model(model_name, num_classes=0, global_pool="avg", **create).eval()
    data_cfg = timm.data.resolve_model_data_config(model)
    full = {**data_cfg, "crop_pct": 1.0}

    def prepared(path: Path) -> torch.Tensor:
        image = Image.open(path)
        masked = image.mode == "RGBA" and np.asarray(image)[..., 3].min() <= 127
        if transform == "timm":
            chosen = data_cfg
        else:
            chosen = {**full, "crop_mode": "squash" if masked else "center"}
        return timm.data.create_transform(**chosen)(image.convert("RGB"))

    with torch.no_grad():
        features = model(torch.stack([prepared(p) for p in paths])).numpy().astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _chosen(cfg) -> dict:
    return json.loads(FloorEmbedder(cfg, "cpu").choice_path.read_text())


def _images(demo_dir: Path, n: int) -> tuple[list[str], list[Path]]:
    names = read_train_csv(demo_dir / "train.csv")["filename"].tolist()[:n]
    return names, resolve_image_paths(demo_dir, names, demo_dir / "train.csv")


def test_random_init_floor_is_the_stronger_plain_baseline(demo_dir, tmp_path):
    """Both transforms written out with timm alone: the floor is the one with the higher mAP
    on the training images, and its embeddings are that transform's."""
    cfg = load_config(["model.backbone=resnet18", f"data.dir={demo_dir}",
                       f"output_dir={tmp_path}", "seed=7", "embed.batch_size=3"])
    train = read_train_csv(demo_dir / "train.csv")
    names, paths = _images(demo_dir, len(train))
    state = torch.get_rng_state()
    got = FloorEmbedder(cfg, "cpu").embed(names[:5], layout.data_files(cfg).train)
    assert torch.equal(torch.get_rng_state(), state)  # the floor leaves training's RNG alone
    embs, maps = {}, {}
    for transform in ("timm", "full"):
        torch.manual_seed(7)
        embs[transform] = emb = _plain("resnet18", paths, transform)
        maps[transform] = identity_balanced_map(emb @ emb.T, train["ground_truth"].to_numpy())
    choice = _chosen(cfg)
    assert choice["map"] == pytest.approx(maps, abs=1e-6)
    assert choice["transform"] == max(maps, key=maps.get)
    assert np.allclose(got, embs[choice["transform"]][:5], atol=1e-5)


def test_floor_embeddings_are_kept_and_reused(demo_dir, tmp_path, monkeypatch):
    cfg = load_config(["model.backbone=resnet18", f"data.dir={demo_dir}",
                       f"output_dir={tmp_path}"])
    names = read_train_csv(demo_dir / "test_labels.csv")["filename"].tolist()[:6]
    csv = layout.data_files(cfg).test
    first = FloorEmbedder(cfg, "cpu").embed(names[:4], csv)  # the choice is made here
    calls = []
    real = floor_mod.embed_plain

    def counting(model, transform, paths, *args):
        calls.append(len(paths))
        return real(model, transform, paths, *args)
    monkeypatch.setattr(floor_mod, "embed_plain", counting)
    again = FloorEmbedder(cfg, "cpu").embed([names[5], *names[:4]], csv)
    assert calls == [1]  # only the new image was embedded
    assert np.array_equal(again[1:], first)


@pytest.mark.skipif(not LITE0.is_file(), reason="../shared absent")
def test_pretrained_floor_matches_the_plain_baseline(demo_dir, tmp_path):
    cfg = load_config(["model.backbone=tf_efficientnet_lite0", f"model.weights={LITE0}",
                       f"data.dir={demo_dir}", f"output_dir={tmp_path}"])
    names, paths = _images(demo_dir, 4)
    got = FloorEmbedder(cfg, "cpu").embed(names, layout.data_files(cfg).train)
    expected = _plain("tf_efficientnet_lite0", paths, _chosen(cfg)["transform"],
                      pretrained=True, pretrained_cfg_overlay={"file": str(LITE0)})
    assert np.allclose(got, expected, atol=1e-5)


def test_below_floor_says_so_only_when_below():
    assert below_floor("x:", {"map": 0.5}, {"map": 0.6}).startswith("WARNING: x: mAP 0.5000")
    assert below_floor("x:", {"map": 0.6}, {"map": 0.6}) is None
    assert below_floor("x:", {"map": 0.6}, None) is None
