"""Competition files: CSV readers, finding images beneath the data folder, loading, datasets.

Errors name the file and the row (row numbers are the CSV's own line numbers, header = line 1),
so a user can open the file and look.
"""

from __future__ import annotations

import csv
import os
import warnings
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
# Texts that pandas (and spreadsheets) write for a missing value: as a label they almost surely
# mean "unknown", and reading them as an identity called "NaN" would train a fake jaguar.
MISSING_MARKERS = frozenset({"nan", "-nan", "none", "null", "na", "n/a", "<na>", "#n/a",
                             "#n/a n/a", "#na", "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan"})
# Larger ids are not whole numbers a float holds exactly; no competition file has them.
_MAX_ID = 2**53


class DataError(UserInputError):
    """Input data that cannot be used; the message names the file and row."""


def _line(index: int) -> int:
    """DataFrame index -> line number in the CSV (header is line 1)."""
    return int(index) + 2


def _long_line(path: Path, n_header: int) -> str:
    """Where a row has more fields than the header ("line N: M fields"), for the error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            for row in reader:
                if len(row) > n_header:
                    return f"line {reader.line_num}: {len(row)} fields"
    except (csv.Error, UnicodeDecodeError):
        pass
    return "a row has more fields than the header"


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # pandas would take a row with one field too many as an index column and shift every
            # value one column left; with index_col=False it warns and drops the extra field.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning as exc:
        header = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=0).columns
        raise DataError(f"{path}: {_long_line(path, len(header))}, but the header has "
                        f"{len(header)} ({', '.join(header)}); quote values that hold commas"
                        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {str(exc).strip()}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: empty file, expected columns {', '.join(columns)}") from exc
    # pandas renames a repeated header name to `name.1`; which copy is meant is a guess.
    header = pd.read_csv(path, dtype=str, keep_default_na=False, header=None, nrows=1,
                         index_col=False).iloc[0].str.strip().tolist()
    repeated = sorted({c for c in header if c in columns and header.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the "
                        "header")
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
    as_float = values.astype(np.float64)
    # `inf` and `1e30` parse as numbers; cast to int64 they would crash or wrap around silently.
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float)) | (np.abs(as_float) > _MAX_ID)
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
    # `a.png` and `./a.png` are one file: twice in train.csv it could land on both sides of a
    # fold and leak.
    dup = df.index[df["filename"].map(lambda name: Path(name).as_posix()).duplicated()]
    if len(dup):
        raise DataError(f"{path}: row {_line(dup[0])}: filename {df.at[dup[0], 'filename']!r} "
                        "appears more than once")
    missing = df.index[df["ground_truth"].str.lower().isin(MISSING_MARKERS)]
    if len(missing):
        raise DataError(f"{path}: row {_line(missing[0])}: ground_truth "
                        f"{df.at[missing[0], 'ground_truth']!r} marks a missing label; expected "
                        "an identity name (remove unlabelled images from the file)")
    return df.reset_index(drop=True)


def read_test_csv(path: str | Path) -> pd.DataFrame:
    """`test.csv` -> DataFrame[row_id (int), query_image, gallery_image]."""
    path = Path(path)
    df = _read_csv(path, TEST_COLUMNS)
    if df.empty:
        raise DataError(f"{path}: no rows")
    df["row_id"] = _to_int_column(path, df, "row_id")
    _check_unique_ids(path, df)
    _check_filenames(path, df, "query_image")
    _check_filenames(path, df, "gallery_image")
    return df


def _check_unique_ids(path: Path, df: pd.DataFrame) -> None:
    dup = df.index[df["row_id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: row {_line(dup[0])}: row_id {df.at[dup[0], 'row_id']} "
                        "appears more than once")


def read_sample_submission(path: str | Path) -> pd.DataFrame:
    """`sample_submission.csv` -> DataFrame[row_id (int), similarity (str)]; only row_ids matter."""
    path = Path(path)
    df = _read_csv(path, SUBMISSION_COLUMNS)
    if df.empty:
        raise DataError(f"{path}: no rows")
    df["row_id"] = _to_int_column(path, df, "row_id")
    _check_unique_ids(path, df)
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


def outside_root(root: str | Path, path: str | Path) -> Path | None:
    """Where `path` really leads (symbolic links followed) when that is outside `root`;
    None when it stays inside."""
    real = Path(os.path.realpath(path))
    return None if real.is_relative_to(Path(os.path.realpath(root))) else real


def resolve_image_paths(root: str | Path, names: Iterable[str], csv_path: str | Path,
                        index: dict[str, list[Path]] | None = None) -> list[Path]:
    """Map each CSV file name to one image file beneath `root`.

    A name with a folder part (`train/x.png`) is taken relative to `root`; a bare name is looked
    up anywhere beneath it. Missing or ambiguous names are errors that name the CSV, and so is
    a file whose symbolic links lead outside `root`: the CSVs are not trusted to choose what
    is read.
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
        path = None
        if Path(name).parent != Path("."):
            candidate = root / name
            if candidate.is_file():
                path = candidate
        if path is None:
            found = index.get(Path(name).name, [])
            if not found:
                missing.append(name)
                continue
            if len(found) > 1:
                shown = ", ".join(str(p) for p in found[:3])
                raise DataError(f"{csv_path}: image {name!r} is found more than once beneath "
                                f"{root}: {shown}; keep one copy")
            path = found[0]
        real = outside_root(root, path)
        if real is not None:
            raise DataError(f"{csv_path}: image {name!r} is {path}, which leads to {real}, "
                            f"outside the data folder {root}; copy the image into it")
        paths.append(path)
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


def read_rgba(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Any image file as (H, W, 4) uint8 (see `to_rgba`). An image of more than `max_pixels`
    pixels (`data.max_pixels`) is refused before it is decoded: a small file can claim
    gigapixels (a decompression bomb)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise DataError(f"{path}: {width}x{height} pixels, more than data.max_pixels="
                                f"{max_pixels}; refused unread (decompression bomb guard)")
            img.load()
            return to_rgba(img)
    except Image.DecompressionBombError as exc:
        # Pillow's own guard, on open, far above its pixel limit; not an OSError.
        raise DataError(f"{path}: refused unread: {exc}") from exc
    except DataError:
        raise
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
               seed: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """An image as RGB, prepared by the alpha mode (see `apply_alpha`). `seed` is accepted so
    every loader takes the same arguments; nothing here is random. `max_pixels`: see
    `read_rgba`."""
    return Image.fromarray(apply_alpha(read_rgba(path, max_pixels), alpha, margin, tuple(fill)))


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
                   fill=tuple(cfg.data.fill), max_pixels=cfg.data.max_pixels)


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
