"""Embedding with test-time views, against the model run by hand on the same tensors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jaguar_reid.config import load_config
from jaguar_reid.data.augment import build_transform
from jaguar_reid.data.images import load_image
from jaguar_reid.retrieval.embedding import (
    apply_view,
    combine_views,
    embed_images,
    embed_views,
    ensemble_embeddings,
)
from jaguar_reid.training.model import build_model


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
    x = torch.stack([transform(load_image(p, auto=cfg.data.resize == "auto")) for p in paths])
    with torch.no_grad():
        emb = F.normalize(model(x), dim=1)
        if flip:
            emb = F.normalize(emb + F.normalize(model(x.flip(dims=[3])), dim=1), dim=1)
    return emb.numpy()


def test_embeddings_with_and_without_flip_view(tmp_path, tiny_cfg_args):
    paths = make_images(tmp_path)
    for flip in (False, True):
        views = "[orig,flip]" if flip else "[orig]"
        cfg = load_config([*tiny_cfg_args, f"embed.tta={views}", "embed.batch_size=2",
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


def test_views_keep_the_size_and_do_what_they_say():
    x = torch.arange(2 * 3 * 8 * 10, dtype=torch.float32).reshape(2, 3, 8, 10)
    assert torch.equal(apply_view(x, "orig"), x)
    assert torch.equal(apply_view(x, "flip"), x.flip(dims=[3]))
    for view in ("zoom1.15", "zoom0.87", "flip_zoom1.3", "zoom2"):
        assert apply_view(x, view).shape == x.shape
    # flipping and zooming commute (the zoom is centred)
    assert torch.allclose(apply_view(x, "flip_zoom1.3"), apply_view(x, "zoom1.3").flip(dims=[3]))
    # a constant image stays constant inside; zooming out pads with 0 (the mean colour)
    const = torch.full((1, 3, 10, 10), 2.0)
    assert torch.allclose(apply_view(const, "zoom1.5"), const)
    small = apply_view(const, "zoom0.6")
    assert small[0, 0, 0, 0] == 0 and small[0, 0, 5, 5] == pytest.approx(2.0)
    assert int((small[0, 0] != 0).sum()) == 36  # the 6 x 6 picture in the middle
    with pytest.raises(Exception, match="view"):
        apply_view(x, "zoomx")


def test_views_are_embedded_apart_and_combined_after_normalising(tmp_path, tiny_cfg_args):
    paths = make_images(tmp_path, n=3)
    cfg = load_config([*tiny_cfg_args, "embed.batch_size=2", "model.retrieval=neck"])
    torch.manual_seed(0)
    model = build_model(cfg, n_classes=3).eval()
    per_view = embed_views(model, paths, cfg, "cpu", views=["orig", "flip", "zoom1.2"])
    assert set(per_view) == {"orig", "flip", "zoom1.2"}
    assert set(per_view["orig"]) == {"neck", "backbone", "both"}
    transform = build_transform(cfg, train=False)
    x = torch.stack([transform(load_image(p, auto=cfg.data.resize == "auto")) for p in paths])
    with torch.no_grad():
        zoomed = F.normalize(model(apply_view(x, "zoom1.2")), dim=1).numpy()
    assert np.allclose(per_view["zoom1.2"]["neck"], zoomed, atol=1e-5)
    neck = {v: e["neck"] for v, e in per_view.items()}
    both = combine_views(neck, ["orig", "zoom1.2"])
    by_hand_mean = neck["orig"] / np.linalg.norm(neck["orig"], axis=1, keepdims=True) + zoomed
    assert np.allclose(both, by_hand_mean / np.linalg.norm(by_hand_mean, axis=1, keepdims=True),
                       atol=1e-5)
    with pytest.raises(ValueError, match="not embedded"):
        combine_views(neck, ["orig", "flip_zoom1.1"])


def test_weighted_ensembles():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 9))
    joint = ensemble_embeddings([a, b], "concat", [3.0, 1.0])
    na = a / np.linalg.norm(a, axis=1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=1, keepdims=True)
    # cosine of the weighted concatenation = weighted mean of the models' cosines
    assert np.allclose(joint @ joint.T, 0.75 * na @ na.T + 0.25 * nb @ nb.T, atol=1e-5)
    with pytest.raises(ValueError, match="concat takes any dimensions"):
        ensemble_embeddings([a, b], "mean")
    c = rng.normal(size=(4, 6))
    nc = c / np.linalg.norm(c, axis=1, keepdims=True)
    mean = 0.2 * na + 0.8 * nc
    assert np.allclose(ensemble_embeddings([a, c], "mean", [1, 4]),
                       mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="one weight"):
        ensemble_embeddings([a, c], "mean", [1.0])
