"""The input a backbone sees: its own normalisation (`data.mean: auto`), the geometry of
`data.resize`, and the square window of `resize=mask`, each against a computation by hand."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.data.augment import build_transform
from jaguar_reid.data.images import image_loader, load_cached, load_image
from jaguar_reid.data.preprocess import (
    auto_square,
    backbone_input,
    centre_square,
    mean_colour,
    normalisation,
    resolve_input,
    square_window,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _cfg(*args: str):
    return load_config(["model.backbone=resnet18", "data.img_size=8", *args])


def test_backbones_bring_their_own_statistics():
    eva = backbone_input("eva02_large_patch14_448.mim_m38m_ft_in22k_in1k")
    assert eva["mean"] == pytest.approx(CLIP_MEAN) and eva["std"] == pytest.approx(CLIP_STD)
    assert backbone_input("tf_efficientnet_lite0")["std"] == pytest.approx((0.5, 0.5, 0.5))
    assert backbone_input("resnet18")["mean"] == pytest.approx((0.485, 0.456, 0.406))
    # The default recipe resolves to CLIP's normalisation, which its backbone was trained on.
    cfg = resolve_input(load_config([]))
    assert cfg.data.mean == pytest.approx(list(CLIP_MEAN))
    assert cfg.data.interpolation == "bicubic"


def test_explicit_values_override_auto_and_bad_ones_are_named():
    cfg = resolve_input(_cfg("data.mean=[0.1, 0.2, 0.3]"))
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    assert cfg.data.std == pytest.approx([0.229, 0.224, 0.225])  # still resnet18's own
    with pytest.raises(ConfigError, match="data.mean"):
        _cfg("data.mean=[0.1, 0.2]")
    with pytest.raises(ConfigError, match="data.std"):
        _cfg("data.std=[0.0, 1.0, 1.0]")
    with pytest.raises(ConfigError, match="data.interpolation"):
        _cfg("data.interpolation=cubic")
    with pytest.raises(ConfigError, match="data.resize"):
        _cfg("data.resize=stretch")


def test_evaluation_normalises_with_the_backbone_statistics():
    colour = (200, 100, 50)
    image = Image.new("RGB", (8, 8), colour)
    cfg = _cfg("model.backbone=tf_efficientnet_lite0")
    out = build_transform(cfg, train=False)(image).numpy()
    expected = (np.array(colour) / 255 - 0.5) / 0.5
    assert np.allclose(out[:, 4, 4], expected, atol=1e-5)
    mean, std, _ = normalisation(_cfg())
    out = build_transform(_cfg(), train=False)(image).numpy()
    assert np.allclose(out[:, 4, 4], (np.array(colour) / 255 - mean) / np.array(std),
                       atol=1e-5)


def _two_tone(width: int = 16, height: int = 8) -> Image.Image:
    """A wide image: left half red, right half blue."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(array)


def _rgb(tensor, cfg) -> np.ndarray:
    """A transform's output back in 0..255 RGB, (H, W, 3)."""
    mean, std, _ = normalisation(cfg)
    array = tensor.numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)
    return array * 255


@pytest.mark.parametrize("mode", ["squash", "letterbox", "crop", "mask"])
def test_geometry_of_each_resize_mode(mode):
    cfg = _cfg(f"data.resize={mode}", "data.interpolation=nearest")
    out = _rgb(build_transform(cfg, train=False)(_two_tone()), cfg)
    assert out.shape == (8, 8, 3)
    red, blue, pad = np.array([255, 0, 0]), np.array([0, 0, 255]), np.array(mean_colour(cfg))
    if mode in ("squash", "mask"):  # the whole image, stretched (mask squares are the loader's)
        assert np.allclose(out[:, :4], red, atol=1) and np.allclose(out[:, 4:], blue, atol=1)
    elif mode == "letterbox":  # 16 x 8 -> 8 x 4 in the middle, mean-coloured bands above/below
        assert np.allclose(out[:2], pad, atol=1) and np.allclose(out[6:], pad, atol=1)
        assert np.allclose(out[2:6, :4], red, atol=1) and np.allclose(out[2:6, 4:], blue, atol=1)
    else:  # crop: 16 x 8 stays, the centre 8 columns are 4 red then 4 blue
        assert np.allclose(out[:, :4], red, atol=1) and np.allclose(out[:, 4:], blue, atol=1)
        wide = _rgb(build_transform(cfg, train=False)(_two_tone(32, 8)), cfg)
        assert np.allclose(wide[:, :4], red, atol=1) and np.allclose(wide[:, 4:], blue, atol=1)


def test_training_crop_works_on_the_shaped_image():
    """With every random step off and the crop keeping the whole square, training sees what
    evaluation sees: the letterbox bands are there, not squashed away."""
    off = ["aug.crop_scale_min=1.0", "aug.affine_p=0", "aug.color_p=0", "aug.blur_p=0",
           "aug.dropout_p=0", "data.interpolation=nearest"]
    cfg = _cfg("data.resize=letterbox", *off)
    train = build_transform(cfg, train=True)(_two_tone(), seed=3)
    assert np.allclose(train.numpy(), build_transform(cfg, train=False)(_two_tone()).numpy(),
                       atol=1e-5)


def test_square_window_by_hand():
    rgba = np.arange(6 * 10 * 4, dtype=np.int64).reshape(6, 10, 4) % 251
    pad = (7, 8, 9)
    # A 2 x 4 box at rows 1-2, columns 3-6: a 4 x 4 square from row 0 (centred), columns 3-6.
    out = square_window(rgba, (1, 3, 3, 7), pad)
    assert np.array_equal(out, rgba[0:4, 3:7])
    # A box at the right edge: the window runs past the image, padded with alpha 0.
    out = square_window(rgba, (0, 6, 8, 10), pad)  # 6 x 2 box -> 6 x 6 window, columns 6..11
    assert out.shape == (6, 6, 4)
    assert np.array_equal(out[:, :4], rgba[:, 6:10])
    assert (out[:, 4:, :3] == pad).all() and (out[:, 4:, 3] == 0).all()
    # No box: the whole image, padded to a square around its centre (letterbox).
    out = square_window(rgba, None, pad)
    assert out.shape == (10, 10, 4)
    assert np.array_equal(out[2:8], rgba) and (out[:2, :, 3] == 0).all()


def test_mask_mode_loaders_centre_the_animal(tmp_path):
    """A small animal in the corner of a wide photo: `resize=mask` returns the square around
    it, from the source (context kept with alpha rgb) and from a cached crop alike."""
    rgba = np.zeros((40, 80, 4), np.uint8)
    rgba[..., :3] = (0, 255, 0)
    rgba[..., 3] = 0
    rgba[2:12, 60:70] = (255, 0, 0, 255)  # the animal: 10 x 10 near the top right
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    pad = (1, 2, 3)
    out = np.asarray(load_image(path, alpha="rgb", margin=0.0, square=pad))
    assert out.shape == (10, 10, 3) and (out == (255, 0, 0)).all()
    out = np.asarray(load_image(path, alpha="crop_fill", margin=0.5, fill=(9, 9, 9),
                                square=pad))
    # The box grown by half its size (clipped at the top: 17 x 20), squared: 2 rows above.
    assert out.shape == (20, 20, 3)
    assert (out[4:14, 5:15] == (255, 0, 0)).all() and (out[0, 0] == (9, 9, 9)).all()
    crop = tmp_path / "crop.png"
    Image.fromarray(rgba[0:17, 55:75]).save(crop)  # what the cache keeps: box + margin
    out = np.asarray(load_cached(crop, alpha="crop_fill", fill=(9, 9, 9), square=pad))
    assert out.shape == (20, 20, 3) and (out[4:14, 5:15] == (255, 0, 0)).all()  # the same


def test_auto_squares_by_hand():
    image = np.arange(4 * 10 * 3, dtype=np.uint8).reshape(4, 10, 3)
    # No mask: the centre square, the short side whole (columns 3..6 of 10).
    assert np.array_equal(centre_square(image), image[:, 3:7])
    assert np.array_equal(auto_square(image, has_mask=False), image[:, 3:7])
    tall = image.transpose(1, 0, 2)  # 10 x 4: rows 3..6
    assert np.array_equal(centre_square(tall), tall[3:7])
    # A mask: the image as it is; the transform squashes it.
    assert auto_square(image, has_mask=True) is image


@pytest.mark.parametrize("train", [False, True])
def test_auto_is_squash_for_masked_images_and_crop_for_full_frames(tmp_path, train):
    """The whole path, loader and transform (training's random crop too, same seed): a masked
    image under auto gives squash's tensor, a maskless one crop's."""
    rgba = np.zeros((24, 60, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (24, 60, 3))
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # a mask (one transparent pixel)
    masked, plain = tmp_path / "masked.png", tmp_path / "plain.png"
    Image.fromarray(rgba).save(masked)
    Image.fromarray(rgba[..., :3]).save(plain)
    args = ["data.interpolation=nearest", "aug.affine_p=0", "aug.color_p=0", "aug.blur_p=0",
            "aug.dropout_p=0"]

    def tensor(mode: str, path) -> np.ndarray:
        cfg = _cfg(f"data.resize={mode}", *args)
        image = image_loader(cfg)(path)
        transform = build_transform(cfg, train=train)
        return (transform(image, seed=5) if train else transform(image)).numpy()
    assert np.array_equal(tensor("auto", masked), tensor("squash", masked))
    if not train:  # crop mode's random crop works on its resized square: another resolution
        assert np.array_equal(tensor("auto", plain), tensor("crop", plain))


def test_auto_loaders_keep_masked_images_and_crop_full_frames(tmp_path):
    """`data.resize=auto`'s loaders: a photo without a mask gives its centre square, one with
    a mask the whole (cut) image; the source and the cache agree."""
    frame = np.zeros((20, 60, 3), np.uint8)
    frame[:, :20], frame[:, 20:40], frame[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    plain = tmp_path / "frame.png"  # RGB, no alpha
    Image.fromarray(frame).save(plain)
    out = np.asarray(load_image(plain, auto=True))
    assert out.shape == (20, 20, 3) and (out == (0, 255, 0)).all()  # the middle third only
    rgba = np.zeros((20, 60, 4), np.uint8)
    rgba[..., :3] = frame
    rgba[2:18, 5:55, 3] = 255  # a mask over most of it, its corners cut (no animal is a box)
    rgba[2, 5, 3] = rgba[17, 54, 3] = 0
    masked = tmp_path / "masked.png"
    Image.fromarray(rgba).save(masked)
    out = np.asarray(load_image(masked, alpha="crop", margin=0.0, auto=True))
    assert out.shape == (16, 50, 3)  # the box as it is: the transform squashes it
    cached = tmp_path / "cached.png"
    Image.fromarray(rgba[2:18, 5:55]).save(cached)  # what the cache keeps for alpha=crop
    assert np.array_equal(np.asarray(load_cached(cached, alpha="crop", auto=True)), out)
    full = _cfg("data.resize=auto")
    assert full.data.resize == "auto" and load_config([]).data.resize == "auto"
