"""Image loading: formats converted to RGB, unreadable files named, the alpha mask (crop, fill,
blur) and background blanking."""

import numpy as np
import pytest
from PIL import Image

from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.data.images import (
    apply_alpha,
    image_loader,
    load_cached,
    load_image,
    mask_box,
    read_rgba,
)


def test_rgba_png_and_rgb_jpeg_load_as_rgb(tmp_path):
    rgba = np.zeros((6, 9, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[2:4, 3:6, 3] = 255  # mask
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (9, 6)
    assert np.asarray(img)[..., 0].min() == 200  # RGB kept everywhere, background included
    Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "b.jpg")
    assert load_image(tmp_path / "b.jpg").size == (5, 4)


def test_grayscale_and_16_bit_are_converted(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    assert np.asarray(load_image(tmp_path / "g.png"))[0, 0].tolist() == [77, 77, 77]
    deep = np.full((4, 4), 65535, np.uint16)
    deep[0, 0] = 0
    Image.fromarray(deep).save(tmp_path / "d.png")
    arr = np.asarray(load_image(tmp_path / "d.png"))
    assert arr[1, 1].tolist() == [255, 255, 255] and arr[0, 0].tolist() == [0, 0, 0]


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.png: unreadable: cannot identify image file"):
        load_image(tmp_path / "bad.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: truncated: image file is truncated"):
        load_image(tmp_path / "cut.png")


def hand_made_rgba() -> np.ndarray:
    """20 x 30 image, red inside a 6 x 10 mask at rows 5..10, cols 10..19; blue outside."""
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[5:11, 10:20] = (255, 0, 0, 255)
    return rgba


def test_alpha_rgb_keeps_the_whole_image():
    out = apply_alpha(hand_made_rgba(), "rgb")
    assert out.shape == (20, 30, 3) and out[0, 0].tolist() == [0, 0, 255]


def test_alpha_crop_box_with_margin():
    out = apply_alpha(hand_made_rgba(), "crop", margin=0.0)
    assert out.shape == (6, 10, 3) and (out == [255, 0, 0]).all()
    # margin 0.5: 3 rows and 5 columns more on each side
    assert mask_box(hand_made_rgba()[..., 3], 0.5) == (2, 14, 5, 25)
    grown = apply_alpha(hand_made_rgba(), "crop", margin=0.5)
    assert grown.shape == (12, 20, 3) and grown[0, 0].tolist() == [0, 0, 255]
    # clipped at the border
    assert mask_box(hand_made_rgba()[..., 3], 5.0) == (0, 20, 0, 30)


def test_alpha_crop_fill_paints_the_background():
    out = apply_alpha(hand_made_rgba(), "crop_fill", margin=0.5, fill=(7, 8, 9))
    assert out[0, 0].tolist() == [7, 8, 9]
    assert out[3:9, 5:15].reshape(-1, 3).tolist() == [[255, 0, 0]] * 60
    assert (out.reshape(-1, 3) == [7, 8, 9]).all(axis=1).sum() == 12 * 20 - 60


def test_empty_mask_or_no_alpha_falls_back_to_the_whole_image(tmp_path):
    empty = hand_made_rgba()
    empty[..., 3] = 0
    assert apply_alpha(empty, "crop_fill").shape == (20, 30, 3)
    Image.new("RGB", (9, 4), (1, 2, 3)).save(tmp_path / "plain.jpg")
    rgba = read_rgba(tmp_path / "plain.jpg")
    assert rgba.shape == (4, 9, 4) and (rgba[..., 3] == 255).all()
    assert load_image(tmp_path / "plain.jpg", alpha="crop").size == (9, 4)
    with pytest.raises(ValueError, match="alpha mode"):
        apply_alpha(empty, "blur")


def test_alpha_crop_blur_keeps_the_animal_sharp():
    rgba = hand_made_rgba()
    rgba[..., 1] = np.arange(30, dtype=np.uint8)[None, :] * 8  # a background with detail
    rgba[5:11, 10:20, :3] = (255, 0, 0)
    out = apply_alpha(rgba, "crop_blur", margin=0.5)
    assert out[3:9, 5:15].reshape(-1, 3).tolist() == [[255, 0, 0]] * 60  # the animal as it was
    background = np.ones(out.shape[:2], bool)
    background[3:9, 5:15] = False
    crop = rgba[2:14, 5:25, :3]
    assert not np.array_equal(out[background], crop[background])  # blurred, not kept
    assert (out[background] != [128, 128, 128]).any(axis=1).all()  # and not a flat fill


def test_background_blanking_augmentation(tmp_path):
    Image.fromarray(hand_made_rgba(), "RGBA").save(tmp_path / "c.png")
    always = np.asarray(load_cached(tmp_path / "c.png", "crop", blank_prob=1.0))
    assert always[0, 0].tolist() == [0, 0, 0] and always[5, 10].tolist() == [255, 0, 0]
    never = np.asarray(load_cached(tmp_path / "c.png", "crop", blank_prob=0.0))
    assert never[0, 0].tolist() == [0, 0, 255]
    draws = [np.asarray(load_cached(tmp_path / "c.png", "crop", blank_prob=0.5, seed=s))[0, 0, 2]
             for s in range(200)]
    assert 60 < sum(d == 0 for d in draws) < 140
    # The draw is the seed's: the same seed blanks (or not) every time.
    again = [np.asarray(load_cached(tmp_path / "c.png", "crop", blank_prob=0.5, seed=s))[0, 0, 2]
             for s in range(200)]
    assert again == draws
    cfg = load_config(["train.bg_blank_prob=0.5", "cache.enabled=false"])
    with pytest.raises(ConfigError, match="cache.enabled"):
        image_loader(cfg, cached=False, train=True)
