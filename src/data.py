"""Competition files: CSV readers, finding images beneath the data folder, loading, datasets.

Errors name the file and the row (row numbers are the CSV's own line numbers, header = line 1),
so a user can open the file and look.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError
from torch.utils.data import Dataset

from src.config import Config, ConfigError
from src.io_utils import UserInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TRAIN_COLUMNS = ("filename", "ground_truth")
TEST_COLUMNS = ("row_id", "query_image", "gallery_image")
SUBMISSION_COLUMNS = ("row_id", "similarity")


class DataError(UserInputError):
    """Input data that cannot be used; the message names the file and row."""


def _line(index: int) -> int:
    """DataFrame index -> line number in the CSV (header is line 1)."""
    return int(index) + 2


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file, expected columns {', '.join(columns)}") from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}, "
            f"found {', '.join(df.columns)}"
        )
    df = df[list(columns)].copy()
    for column in columns:
        df[column] = df[column].str.strip()
        empty = df.index[df[column] == ""]
        if len(empty):
            raise DataError(f"{path}: row {_line(empty[0])}: empty value in column '{column}'")
    return df


def _check_filenames(path: Path, df: pd.DataFrame, column: str) -> None:
    for index, name in df[column].items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise DataError(
                f"{path}: row {_line(index)}: {column} {name!r} must be a file name inside the "
                "data folder (no absolute paths, no '..')"
            )


def _to_int_column(path: Path, df: pd.DataFrame, column: str) -> pd.Series:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        index = df.index[bad][0]
        raise DataError(f"{path}: row {_line(index)}: {column} must be an integer, "
                        f"got {df.at[index, column]!r}")
    return values.astype(np.int64)


def read_train_csv(path: str | Path) -> pd.DataFrame:
    """`train.csv` -> DataFrame[filename, ground_truth]; one row per image, names unique."""
    path = Path(path)
    df = _read_csv(path, TRAIN_COLUMNS)
    if df.empty:
        raise DataError(f"{path}: no rows")
    _check_filenames(path, df, "filename")
    dup = df.index[df["filename"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: row {_line(dup[0])}: filename {df.at[dup[0], 'filename']!r} "
                        "appears more than once")
    return df.reset_index(drop=True)


def read_test_csv(path: str | Path) -> pd.DataFrame:
    """`test.csv` -> DataFrame[row_id (int), query_image, gallery_image]."""
    path = Path(path)
    df = _read_csv(path, TEST_COLUMNS)
    if df.empty:
        raise DataError(f"{path}: no rows")
    df["row_id"] = _to_int_column(path, df, "row_id")
    dup = df.index[df["row_id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: row {_line(dup[0])}: row_id {df.at[dup[0], 'row_id']} "
                        "appears more than once")
    _check_filenames(path, df, "query_image")
    _check_filenames(path, df, "gallery_image")
    return df


def read_sample_submission(path: str | Path) -> pd.DataFrame:
    """`sample_submission.csv` -> DataFrame[row_id (int), similarity (str)]; only row_ids matter."""
    path = Path(path)
    df = _read_csv(path, SUBMISSION_COLUMNS)
    df["row_id"] = _to_int_column(path, df, "row_id")
    return df


def pair_image_names(test_df: pd.DataFrame) -> list[str]:
    """Every image a test pair names, in order of first appearance (queries first)."""
    return list(dict.fromkeys([*test_df["query_image"], *test_df["gallery_image"]]))


def index_images(root: str | Path) -> dict[str, list[Path]]:
    """Every image file beneath `root`, keyed by file name (Kaggle nests `train/train/`)."""
    root = Path(root)
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Our own outputs never hold source images; skipping hidden folders avoids caches.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                index.setdefault(name, []).append(Path(dirpath) / name)
    return index


def resolve_image_paths(root: str | Path, names: Iterable[str], csv_path: str | Path,
                        index: dict[str, list[Path]] | None = None) -> list[Path]:
    """Map each CSV file name to one image file beneath `root`.

    A name with a folder part (`train/x.png`) is taken relative to `root`; a bare name is looked
    up anywhere beneath it. Missing or ambiguous names are errors that name the CSV.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.dir {str(root)!r} is not a folder")
    names = list(names)
    if index is None:
        index = index_images(root)
    paths: list[Path] = []
    missing: list[str] = []
    for name in names:
        if Path(name).parent != Path("."):
            candidate = root / name
            if candidate.is_file():
                paths.append(candidate)
                continue
        found = index.get(Path(name).name, [])
        if len(found) == 1:
            paths.append(found[0])
        elif not found:
            missing.append(name)
        else:
            shown = ", ".join(str(p) for p in found[:3])
            raise DataError(f"{csv_path}: image {name!r} is found more than once beneath "
                            f"{root}: {shown}; keep one copy")
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{csv_path}: {len(missing)} image(s) not found beneath {root}: "
                        f"{shown}{more}")
    return paths


ALPHA_MODES = ("rgb", "crop", "crop_fill", "crop_blur")


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def to_rgba(img: Image.Image) -> np.ndarray:
    """A loaded PIL image as (H, W, 4) uint8; alpha is 255 everywhere when it has none.
    16-bit, grayscale and palette images are converted."""
    if img.mode in SIXTEEN_BIT_MODES:
        # Pillow's 8-bit conversion clips 16-bit values; rescale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.round(arr / top * 255).astype(np.uint8), mode="L")
    return np.asarray(img.convert("RGBA"))


def read_rgba(path: str | Path) -> np.ndarray:
    """Any image file as (H, W, 4) uint8 (see `to_rgba`)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgba(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image: {exc}") from exc


def mask_box(alpha: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the mask (alpha > 127), grown by `margin` x its size on
    each side and clipped to the image; None for an empty mask."""
    rows = np.flatnonzero((alpha > 127).any(axis=1))
    cols = np.flatnonzero((alpha > 127).any(axis=0))
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dy, dx = round((bottom - top) * margin), round((right - left) * margin)
    height, width = alpha.shape
    return max(0, top - dy), min(height, bottom + dy), max(0, left - dx), min(width, right + dx)


def fill_background(rgba: np.ndarray, mode: str, fill: tuple[int, int, int] = (128, 128, 128),
                    blur_radius: float = 0.05) -> np.ndarray:
    """(H, W, 4) -> (H, W, 3): `crop_fill` paints outside the mask with `fill`; `crop_blur`
    replaces it by a strong blur of the image (the animal stays sharp, the scene's colours
    stay); other modes keep the RGB. `blur_radius` is a fraction of the image's long side."""
    rgb = rgba[..., :3]
    background = rgba[..., 3] <= 127
    if mode not in ("crop_fill", "crop_blur") or not background.any():
        return rgb
    out = rgb.copy()
    if mode == "crop_fill":
        out[background] = fill
    else:
        radius = max(1.0, blur_radius * max(rgb.shape[:2]))
        blurred = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))
        out[background] = blurred[background]
    return out


def apply_alpha(rgba: np.ndarray, mode: str, margin: float = 0.05,
                fill: tuple[int, int, int] = (128, 128, 128)) -> np.ndarray:
    """(H, W, 4) -> (h, w, 3) RGB by the alpha mode:
    `rgb` keeps the whole RGB; `crop` cuts to the mask's box (plus margin); `crop_fill` and
    `crop_blur` also fill the background (see `fill_background`). An empty mask keeps the
    whole image."""
    if mode not in ALPHA_MODES:
        raise ValueError(f"alpha mode must be one of {', '.join(ALPHA_MODES)}; got {mode!r}")
    if mode == "rgb":
        return rgba[..., :3]
    box = mask_box(rgba[..., 3], margin)
    if box is None:
        return rgba[..., :3]
    top, bottom, left, right = box
    return fill_background(rgba[top:bottom, left:right], mode, fill)


def load_image(path: str | Path, alpha: str = "rgb", margin: float = 0.05,
               fill: tuple[int, int, int] = (128, 128, 128),
               seed: int | None = None) -> Image.Image:
    """An image as RGB, prepared by the alpha mode (see `apply_alpha`). `seed` is accepted so
    every loader takes the same arguments; nothing here is random."""
    return Image.fromarray(apply_alpha(read_rgba(path), alpha, margin, tuple(fill)))


def load_cached(path: str | Path, alpha: str = "rgb",
                fill: tuple[int, int, int] = (128, 128, 128),
                blank_prob: float = 0.0, seed: int | None = None) -> Image.Image:
    """A cached image (already cropped by the cache when the mode crops) as RGB: only the
    background fill of the alpha mode is left to apply. With probability `blank_prob` the
    background is painted black instead, as the competition's second round does to its test
    images (a training augmentation; the draw comes from `seed`, the sampler's per-image seed,
    so runs and resumed runs repeat it)."""
    rgba = read_rgba(path)
    if blank_prob > 0 and np.random.default_rng([int(seed or 0), 1]).random() < blank_prob:
        return Image.fromarray(fill_background(rgba, "crop_fill", (0, 0, 0)))
    return Image.fromarray(fill_background(rgba, alpha, fill))


def image_loader(cfg: Config, cached: bool = False, train: bool = False):
    """The image-loading callable for this config's alpha settings (picklable for workers):
    from the preprocessing cache, or straight from the source files. `train` adds the
    background-blanking augmentation (cache only: it needs the kept alpha)."""
    if cached:
        blank = cfg.train.bg_blank_prob if train else 0.0
        return partial(load_cached, alpha=cfg.data.alpha, fill=tuple(cfg.data.fill),
                       blank_prob=blank)
    if train and cfg.train.bg_blank_prob > 0:
        raise ConfigError("train.bg_blank_prob needs cache.enabled=true (the cache keeps the "
                          "mask the augmentation paints with)")
    return partial(load_image, alpha=cfg.data.alpha, margin=cfg.data.crop_margin,
                   fill=tuple(cfg.data.fill))


class ImageDataset(Dataset):
    """Images with integer labels (-1 where unknown); yields (tensor, label, index).

    An item is an index, or (index, seed) from the training sampler: the seed drives every
    random draw for that image (background blanking, augmentations)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, transform,
                 load=load_image) -> None:
        self.paths = list(paths)
        self.load = load
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        if isinstance(item, tuple):
            index, seed = item
            image = self.load(self.paths[index], seed=seed)
            return self.transform(image, seed=seed), self.labels[index], index
        image = self.load(self.paths[item])
        return self.transform(image), self.labels[item], item


def data_files(cfg: Config) -> dict[str, Path]:
    root = Path(cfg.data.dir)
    return {
        "root": root,
        "train": root / "train.csv",
        "test": root / "test.csv",
        "sample": root / "sample_submission.csv",
        "test_labels": root / "test_labels.csv",
    }
