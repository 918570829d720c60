"""Competition file readers and image loading: formats, nesting, and errors naming file and row."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.augment import build_transform
from src.config import ConfigError, load_config
from src.data import (
    DataError,
    apply_alpha,
    image_loader,
    load_cached,
    load_image,
    mask_box,
    pair_image_names,
    read_rgba,
    read_sample_submission,
    read_test_csv,
    read_train_csv,
    resolve_image_paths,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_train_csv_reads_and_strips(tmp_path):
    df = read_train_csv(write(tmp_path / "train.csv",
                              "filename,ground_truth\ntrain_1.png, Marcela\ntrain_2.png,Kwang\n"))
    assert df.to_dict("list") == {"filename": ["train_1.png", "train_2.png"],
                                  "ground_truth": ["Marcela", "Kwang"]}


@pytest.mark.parametrize("text, fragment", [
    ("file,ground_truth\na.png,x\n", "missing column.*filename"),
    ("filename,label\na.png,x\n", "missing column.*ground_truth"),
    ("filename,ground_truth\na.png,x\nb.png,\n", "row 3: empty value in column 'ground_truth'"),
    ("filename,ground_truth\na.png,x\na.png,y\n", "row 3: filename 'a.png' appears more"),
    ("filename,ground_truth\n../../etc/passwd,x\n", "row 2: .*inside the data folder"),
    ("filename,ground_truth\n", "no rows"),
    ("", "empty file"),
])
def test_train_csv_errors_name_file_and_row(tmp_path, text, fragment):
    path = write(tmp_path / "train.csv", text)
    with pytest.raises(DataError, match=fragment) as info:
        read_train_csv(path)
    assert str(path) in str(info.value)


def test_test_csv_and_sample(tmp_path):
    test = read_test_csv(write(tmp_path / "test.csv",
                               "row_id,query_image,gallery_image\n0,a.png,b.png\n1,b.png,a.png\n"))
    assert test["row_id"].tolist() == [0, 1]
    assert pair_image_names(test) == ["a.png", "b.png"]
    with pytest.raises(DataError, match="row 3: row_id must be an integer"):
        read_test_csv(write(tmp_path / "t2.csv",
                            "row_id,query_image,gallery_image\n0,a,b\nx,b,a\n"))
    with pytest.raises(DataError, match="row 3: row_id 0 appears more than once"):
        read_test_csv(write(tmp_path / "t3.csv",
                            "row_id,query_image,gallery_image\n0,a,b\n0,b,a\n"))
    with pytest.raises(DataError, match="missing column.*gallery_image"):
        read_test_csv(write(tmp_path / "t4.csv", "row_id,query_image\n0,a\n"))
    sample = read_sample_submission(write(tmp_path / "s.csv", "row_id,similarity\n0,0.5\n1,0.5\n"))
    assert sample["row_id"].tolist() == [0, 1]


def test_images_found_in_nested_folders(tmp_path):
    nested = tmp_path / "train" / "train"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "train_1.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train_2.jpg")
    paths = resolve_image_paths(tmp_path, ["train_1.png", "train_2.jpg"], "train.csv")
    assert paths == [nested / "train_1.png", tmp_path / "train_2.jpg"]


def test_missing_and_ambiguous_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match=r"train\.csv: 1 image\(s\) not found.*'y.png'"):
        resolve_image_paths(tmp_path, ["x.png", "y.png"], "train.csv")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "x.png")
    with pytest.raises(DataError, match="found more than once"):
        resolve_image_paths(tmp_path, ["x.png"], "train.csv")
    with pytest.raises(DataError, match="is not a folder"):
        resolve_image_paths(tmp_path / "nope", ["x.png"], "train.csv")


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
    with pytest.raises(DataError, match=r"bad\.png: unreadable image"):
        load_image(tmp_path / "bad.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: unreadable image"):
        load_image(tmp_path / "cut.png")


def test_transform_shapes_and_normalisation():
    cfg = load_config(["data.img_size=32", "data.mean=[0.5, 0.5, 0.5]",
                       "data.std=[0.25, 0.25, 0.25]"])
    img = Image.new("RGB", (64, 20), (255, 0, 128))
    plain = build_transform(cfg, train=False)(img)
    assert plain.shape == (3, 32, 32)
    expected = (np.array([255, 0, 128]) / 255 - 0.5) / 0.25
    assert np.allclose(plain.numpy()[:, 0, 0], expected, atol=1e-6)
    train = build_transform(cfg, train=True)
    assert train(img).shape == (3, 32, 32)


def test_training_augmentation_is_a_function_of_its_seed():
    """Same seed, same augmented image (whatever ran before); other seeds differ. Flip is off
    by default and, when asked for, mirrors exactly."""
    cfg = load_config(["data.img_size=32", "aug.dropout_p=1.0"])
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    train = build_transform(cfg, train=True)
    first = train(img, seed=7)
    train(img, seed=8)
    assert torch.equal(train(img, seed=7), first)
    assert not torch.equal(train(img, seed=8), first)
    assert not torch.equal(build_transform(cfg, train=False)(img), first)

    only_flip = ["data.img_size=40", "aug.crop_scale_min=1.0", "aug.affine_p=0",
                 "aug.color_p=0", "aug.blur_p=0", "aug.dropout_p=0"]
    square = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    plain = build_transform(load_config(only_flip), train=True)(square, seed=1)
    assert torch.equal(plain, build_transform(load_config(only_flip), train=False)(square))
    flipped = build_transform(load_config([*only_flip, "aug.hflip=1.0"]), train=True)
    assert torch.equal(flipped(square, seed=1), plain.flip(dims=[2]))


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
