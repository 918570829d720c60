"""Embedding with test-time views, against the model run by hand on the same tensors."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from src.augment import build_transform
from src.config import load_config
from src.data import load_image
from src.embed import embed_images
from src.model import build_model


def make_images(tmp_path, n=5):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def by_hand(model, cfg, paths, flip):
    transform = build_transform(cfg, train=False)
    x = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        emb = F.normalize(model(x), dim=1)
        if flip:
            emb = F.normalize(emb + F.normalize(model(x.flip(dims=[3])), dim=1), dim=1)
    return emb.numpy()


def test_embeddings_with_and_without_flip_view(tmp_path, tiny_cfg_args):
    paths = make_images(tmp_path)
    for flip in (False, True):
        cfg = load_config([*tiny_cfg_args, f"embed.tta_flip={flip}", "embed.batch_size=2",
                           "model.retrieval=neck"])
        torch.manual_seed(0)
        model = build_model(cfg, n_classes=3).eval()
        got = embed_images(model, paths, cfg, "cpu")
        assert got.shape == (5, cfg.model.embed_dim) and got.dtype == np.float32
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        assert np.allclose(got, by_hand(model, cfg, paths, flip), atol=1e-5)
    # the flip view really changes the embedding (the images are not symmetric)
    plain = by_hand(model, cfg, paths, flip=False)
    assert not np.allclose(got, plain, atol=1e-3)
