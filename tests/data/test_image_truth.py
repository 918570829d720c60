"""Every reader sees an image as it is meant to be seen: upright by its EXIF orientation, an
empty mask taken for the whole image, and the same files refused with the same one-line error,
through the cache or without it, in the main process or a DataLoader worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from jaguar_reid.config import load_config
from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.data.image_cache import prepare_images, process_image
from jaguar_reid.data.images import MIN_SIDE, ImageDataset, decode_image
from jaguar_reid.io_utils import user_message
from jaguar_reid.keys import choices
from jaguar_reid.retrieval import local
from jaguar_reid.retrieval.floor import embed_plain
from tests.helpers import bomb_png

SIZE = (24, 16)  # (width, height): under the cache's size, so cached pixels are not resized
MAX_PIXELS = 5000


def picture(width: int = SIZE[0], height: int = SIZE[1], seed: int = 0) -> np.ndarray:
    """(h, w, 4) uint8: random colours, a rectangular mask in the middle."""
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[height // 4: 3 * height // 4, width // 4: 3 * width // 4, 3] = 255
    return rgba


def with_orientation(path: Path, stored: np.ndarray, value: int, **save) -> Path:
    """`stored` written with EXIF orientation `value` (the viewer turns it)."""
    exif = Image.Exif()
    exif[0x0112] = value
    Image.fromarray(stored).save(path, exif=exif, **save)
    return path


def bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG of a few dozen bytes whose header claims width x height pixels."""
    return bomb_png(path, width, height)


# --------------------------------------------------------------------------- EXIF orientation


def test_exif_orientation_6_is_turned_upright_exactly(tmp_path):
    upright = picture()
    # Orientation 6: the viewer turns the stored picture 90 degrees clockwise.
    path = with_orientation(tmp_path / "turned.png", np.rot90(upright, 1).copy(), 6)
    decoded = decode_image(path, MAX_PIXELS)
    np.testing.assert_array_equal(decoded.rgba, upright)
    assert [(f.problem, f.action) for f in decoded.findings] == [
        ("EXIF orientation: 6", "EXIF orientation 6 applied")]


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    stored = picture(40, 24)[..., :3]
    path = with_orientation(tmp_path / "turned.jpg", stored, 6, quality=95)
    raw = np.asarray(Image.open(path).convert("RGB"))  # as stored, not turned
    np.testing.assert_array_equal(decode_image(path, MAX_PIXELS).rgba[..., :3],
                                  np.rot90(raw, -1))


@pytest.mark.parametrize("value", range(2, 9))
def test_every_orientation_gives_the_upright_picture(tmp_path, value):
    upright = Image.fromarray(picture())
    # The transposition a viewer applies for `value`, undone to make the stored picture.
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}[value]
    path = with_orientation(tmp_path / "x.png", np.asarray(upright.transpose(undo)), value)
    np.testing.assert_array_equal(decode_image(path).rgba, np.asarray(upright))


def test_local_features_and_the_floor_see_the_upright_pixels(tmp_path):
    upright = picture(48, 32, seed=3)
    turned = with_orientation(tmp_path / "turned.png", np.rot90(upright, 1).copy(), 6)
    plain = tmp_path / "plain.png"
    Image.fromarray(upright).save(plain)
    gray_t, mask_t = local.read_for_features(turned, 512, MAX_PIXELS)
    gray_p, mask_p = local.read_for_features(plain, 512, MAX_PIXELS)
    np.testing.assert_array_equal(gray_t, gray_p)
    np.testing.assert_array_equal(mask_t, mask_p)  # the mask stays on the animal

    def transform(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    model = torch.nn.Flatten()
    model.num_features = 3 * 32 * 48
    both = embed_plain(model, transform, [turned, plain], "cpu", 2, MAX_PIXELS)
    np.testing.assert_array_equal(both[0], both[1])


def test_the_data_check_lists_a_turned_image(tmp_path):
    path = with_orientation(tmp_path / "turned.png", np.rot90(picture(), 1).copy(), 6)
    record = process_image(str(path), str(tmp_path / "out.png"), True, 0.0, 64, MAX_PIXELS)
    assert record["problems"] == ["EXIF orientation: 6"]
    assert record["action"] == "EXIF orientation 6 applied"
    assert (record["width"], record["height"]) == SIZE  # as seen, upright


# --------------------------------------------------------------------------- both paths


def _cfg(data: Path, out: Path, *extra: str):
    return load_config([f"data.dir={data}", f"output_dir={out}", "cache.workers=1",
                        f"data.max_pixels={MAX_PIXELS}", *extra])


def load_both(tmp_path: Path, name: str, *extra: str,
              workers: int = 0) -> dict[bool, np.ndarray | str]:
    """The image `name` of `tmp_path/data` through the cache and without it, loaded by a
    DataLoader with `workers` processes: its pixels, or the one-line error a user sees."""
    out: dict[bool, np.ndarray | str] = {}
    for cached in (True, False):
        cfg = _cfg(tmp_path / "data", tmp_path / "out", f"cache.enabled={cached}", *extra)
        try:
            images = prepare_images(cfg, [name], tmp_path / "data" / "train.csv")
            dataset = ImageDataset(images.paths, None,
                                   lambda img: torch.from_numpy(np.array(img)), images.load)
            batch = next(iter(DataLoader(dataset, batch_size=1, num_workers=workers)))
            out[cached] = batch[0][0].numpy()
        except DataError as exc:
            out[cached] = user_message(exc)
    return out


def _cmyk(path: Path) -> None:
    Image.fromarray(picture()[..., :3]).convert("CMYK").save(path)


def _palette(path: Path) -> None:
    img = Image.fromarray(picture()[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    img.save(path, transparency=0)


def _truncated(path: Path) -> None:
    Image.fromarray(picture(64, 64)).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


CASES = {
    # name: (file, writer, the problem a refused file gets; None: accepted)
    "zero-bytes": ("a.png", lambda p: p.write_bytes(b""), "unreadable: empty file (0 bytes)"),
    "truncated": ("a.png", _truncated, "truncated: image file is truncated"),
    "not-an-image": ("a.png", lambda p: p.write_bytes(b"plain text, not a picture"),
                     "unreadable: cannot identify image file"),
    "too-many-pixels": ("a.png", lambda p: Image.fromarray(picture(100, 100)).save(p),
                        f"absurd dimensions: 100x100 pixels, more than data.max_pixels="
                        f"{MAX_PIXELS}"),
    "bomb": ("a.png", bomb, "absurd dimensions: Image size (400000000 pixels) exceeds limit"),
    "one-pixel": ("a.png", lambda p: Image.new("RGB", (1, 1)).save(p),
                  f"absurd dimensions: 1x1 pixels, a side under {MIN_SIDE}"),
    "too-thin": ("a.png", lambda p: Image.new("RGB", (MIN_SIDE - 1, 30)).save(p),
                 f"absurd dimensions: {MIN_SIDE - 1}x30 pixels, a side under {MIN_SIDE}"),
    "16-bit": ("a.png", lambda p: Image.fromarray(
        picture()[..., 0].astype(np.uint16) * 257).save(p), None),
    "grayscale": ("a.png", lambda p: Image.fromarray(picture()[..., 0]).save(p), None),
    "grayscale-alpha": ("a.png", lambda p: Image.fromarray(picture()).convert("LA").save(p),
                        None),
    "cmyk": ("a.tif", _cmyk, None),
    "palette-transparency": ("a.png", _palette, None),
    "exif-rotated": ("a.png", lambda p: with_orientation(p, np.rot90(picture(), 1).copy(), 6),
                     None),
    "smallest-accepted": ("a.png", lambda p: Image.new("RGB", (MIN_SIDE, MIN_SIDE)).save(p),
                          None),
}


def _dataset(tmp_path: Path, case: str) -> tuple[str, Path]:
    name, write, _ = CASES[case]
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    write(folder / name)
    (tmp_path / "data" / "train.csv").write_text(f"filename,ground_truth\n{name},a\n")
    return name, folder / name


@pytest.mark.parametrize("case", list(CASES))
def test_cache_and_no_cache_accept_and_refuse_alike(tmp_path, case):
    name, path = _dataset(tmp_path, case)
    got = load_both(tmp_path, name, "data.alpha=crop_fill")
    problem = CASES[case][2]
    if problem is None:
        assert isinstance(got[True], np.ndarray), got[True]
        np.testing.assert_array_equal(got[True], got[False])
        return
    # One line naming the file; the cache adds how many files and where to see them all.
    assert got[False].startswith(f"{path}: {problem}") and "\n" not in got[False], got[False]
    assert f"1 image(s) cannot be used: {got[False]} (" in got[True], got[True]


@pytest.mark.parametrize("case", ["zero-bytes", "bomb", "too-thin"])
def test_a_worker_raises_the_same_one_line_error(tmp_path, case):
    """In a DataLoader worker the error comes back wrapped in the worker's traceback: it is
    still our DataError, and what the user sees is the same line as in the main process."""
    name, path = _dataset(tmp_path, case)
    in_main = load_both(tmp_path, name)
    in_worker = load_both(tmp_path, name, "data.num_workers=1", workers=1)
    assert in_worker == in_main
    assert in_worker[False].startswith(f"{path}: {CASES[case][2]}")


# --------------------------------------------------------------------------- empty mask


@pytest.mark.parametrize("resize", ["squash", "mask"])
@pytest.mark.parametrize("alpha", choices("data.alpha"))
@pytest.mark.parametrize("mask", ["transparent", "no-alpha"])
def test_an_empty_mask_is_the_whole_image_in_every_path(tmp_path, alpha, resize, mask):
    rgba = picture(seed=5)
    rgba[..., 3] = 0
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    Image.fromarray(rgba if mask == "transparent" else rgba[..., :3]).save(folder / "e.png")
    opaque = rgba.copy()
    opaque[..., 3] = 255  # a mask that is the whole image
    Image.fromarray(opaque).save(folder / "whole.png")
    (tmp_path / "data" / "train.csv").write_text("filename,ground_truth\ne.png,a\nwhole.png,b\n")
    settings = (f"data.alpha={alpha}", f"data.resize={resize}")
    got = load_both(tmp_path, "e.png", *settings)
    np.testing.assert_array_equal(got[True], got[False])
    np.testing.assert_array_equal(got[True], load_both(tmp_path, "whole.png", *settings)[False])
    if resize == "squash":
        np.testing.assert_array_equal(got[True], rgba[..., :3])  # no grey square, nothing cut
    record = process_image(str(folder / "e.png"), str(tmp_path / "o.png"), alpha != "rgb",
                           0.05, 64, MAX_PIXELS)
    kind = "empty mask" if mask == "transparent" else "no alpha"
    assert record["problems"] == [kind] and record["action"] == "whole image used"
    assert record["mask_fraction"] == (0.0 if mask == "transparent" else None)


def test_a_partial_mask_gives_the_same_pixels_through_both_paths(tmp_path):
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    Image.fromarray(picture(seed=9)).save(folder / "m.png")
    (tmp_path / "data" / "train.csv").write_text("filename,ground_truth\nm.png,a\n")
    for alpha in choices("data.alpha"):
        got = load_both(tmp_path, "m.png", f"data.alpha={alpha}", "data.resize=mask")
        np.testing.assert_array_equal(got[True], got[False])
