"""Images: decoding (any mode, 16-bit too, upright by EXIF), alpha-mask modes, loaders and
the dataset.

`decode_image` is the one decoder: the cache, the cache-free loader, the floor, local
features, folds and the data check all read a source image through it, so they see the same
upright pixels, the same mask, and refuse the same files with the same one-line error."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from jaguar_reid.config import Config, ConfigError
from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.data.preprocess import auto_square, mean_colour, square_window
from jaguar_reid.keys import choices

ALPHA_MODES = choices("data.alpha")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
GRAYSCALE_MODES = ("L", "LA", "La", "1")
# The shortest side a source image may have: no photograph is narrower. The one minimum of the
# pipeline, applied with data.max_pixels (the other bound) wherever a source is decoded.
MIN_SIDE = 8
MASK_LEVEL = 127  # alpha above this is inside the mask
# Bumped when decoding gives other pixels for the same bytes (2: EXIF orientation applied, an
# empty mask made the whole image): every cache of decoded pixels names it in its key.
DECODER_VERSION = 2
_ORIENTATION = int(ExifTags.Base.Orientation)
# Pillow's format plugins raise these on a malformed file (struct and zlib errors escape
# some of them); each is the file's problem, never a traceback.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  struct.error, zlib.error)


class ImageError(DataError):
    """A source image that cannot be used: `<path>: <problem>`, the problem's kind before its
    first ':' (missing, unreadable, truncated, absurd dimensions). One argument builds it, as
    a DataLoader worker's error is rebuilt in the main process."""

    def __init__(self, message: str, problem: str | None = None,
                 size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.problem = message if problem is None else problem
        self.size = size  # (width, height) of an image refused for its dimensions


@dataclass(frozen=True)
class Finding:
    """Something a usable image needed, and what the pipeline did about it."""

    problem: str  # "grayscale", "EXIF orientation: 6", "empty mask", ...
    action: str   # "converted to RGB", "EXIF orientation 6 applied", "whole image used"


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A source image as every reader sees it."""

    rgba: np.ndarray  # (H, W, 4) uint8, upright; alpha 255 everywhere where no mask is usable
    mode: str  # the file's own mode (RGBA, L, I;16, CMYK, P, ...)
    mask_fraction: float | None  # share of pixels inside the file's mask; None: no alpha
    findings: tuple[Finding, ...]


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) a photo asks to be shown at; 1 (as stored) when absent."""
    value = img.getexif().get(_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgba(img: Image.Image) -> np.ndarray:
    """A loaded PIL image as (H, W, 4) uint8, upright by its EXIF orientation (Pillow's
    `exif_transpose`); alpha is 255 everywhere when it has none. 16-bit, grayscale, CMYK and
    palette images are converted."""
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        # Pillow's 8-bit conversion clips 16-bit values; rescale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.round(arr / top * 255).astype(np.uint8))  # 2-D uint8: "L"
    return np.asarray(img.convert("RGBA"))


def _size_problem(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why a source of this size is refused unread, or None (no check without max_pixels)."""
    if max_pixels is None:
        return None
    if width * height > max_pixels:
        return (f"absurd dimensions: {width}x{height} pixels, more than data.max_pixels="
                f"{max_pixels}; refused unread (decompression bomb guard)")
    if min(width, height) < MIN_SIDE:
        return f"absurd dimensions: {width}x{height} pixels, a side under {MIN_SIDE}"
    return None


def _failure(path: Path, exc: BaseException) -> str:
    """The problem a decoding failure means, in one line without the path (the message
    starts with it) and without a folder name deciding the kind."""
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, Image.DecompressionBombError):
        # Pillow's own guard, on open, far above its pixel limit; not an OSError.
        return f"absurd dimensions: {exc}"
    if path.is_file() and path.stat().st_size == 0:
        return "unreadable: empty file (0 bytes)"
    text = str(exc).replace(repr(str(path)), "").replace(str(path), "")
    text = " ".join(text.split()).strip(" :") or type(exc).__name__
    if isinstance(exc, UnidentifiedImageError):
        return f"unreadable: {text} (not an image format Pillow reads)"
    kind = "truncated" if "truncated" in text.lower() else "unreadable"
    return f"{kind}: {text}"


def _findings(mode: str, turned: int, alpha: str) -> tuple[Finding, ...]:
    """What a usable image of file `mode`, EXIF orientation `turned` and mask state `alpha`
    (mask | empty | none) needed."""
    found = []
    if turned != 1:
        found.append(Finding(f"EXIF orientation: {turned}", f"EXIF orientation {turned} applied"))
    if mode in GRAYSCALE_MODES:
        found.append(Finding("grayscale", "converted to RGB"))
    elif mode in SIXTEEN_BIT_MODES:
        found.append(Finding("16-bit", "rescaled to 8-bit RGB"))
    elif mode == "CMYK":
        found.append(Finding("CMYK", "converted to RGB"))
    if alpha != "mask":
        found.append(Finding("empty mask" if alpha == "empty" else "no alpha",
                             "whole image used"))
    return tuple(found)


def _with_usable_mask(rgba: np.ndarray, has_alpha: bool) -> tuple[np.ndarray, str]:
    """(rgba, mask state): an empty mask (no alpha above MASK_LEVEL) is the whole image,
    here once, so no later step (crop, fill, square window, keypoint mask) can paint or cut
    the whole picture away."""
    if not has_alpha:
        return rgba, "none"
    if (rgba[..., 3] > MASK_LEVEL).any():
        return rgba, "mask"
    whole = np.array(rgba)
    whole[..., 3] = 255
    return whole, "empty"


def decode_image(path: str | Path, max_pixels: int | None = None) -> DecodedImage:
    """A source image file decoded for every reader (see `DecodedImage`); `ImageError`
    naming the file when it cannot be used. `max_pixels` (data.max_pixels) marks a source
    image: one of more pixels, or a side under `MIN_SIDE`, is refused before it is decoded (a
    small file can claim gigapixels: a decompression bomb). Without it (a file the pipeline
    wrote, or a test's) sizes are not checked."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            refused = _size_problem(*img.size, max_pixels)
            if refused is not None:
                raise ImageError(f"{path}: {refused}", refused, img.size)
            img.load()
            mode, turned, has_alpha = img.mode, orientation(img), img.has_transparency_data
            rgba = to_rgba(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, *_DECODE_ERRORS) as exc:
        problem = _failure(path, exc)
        raise ImageError(f"{path}: {problem}", problem) from exc
    fraction = float((rgba[..., 3] > MASK_LEVEL).mean()) if has_alpha else None
    rgba, alpha = _with_usable_mask(rgba, has_alpha)
    return DecodedImage(rgba, mode, fraction, _findings(mode, turned, alpha))


def read_rgba(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Any image file as (H, W, 4) uint8, as `decode_image` gives it."""
    return decode_image(path, max_pixels).rgba


def mask_box(alpha: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the mask (alpha > 127), grown by `margin` x its size on
    each side and clipped to the image; None for an empty mask."""
    inside = alpha > MASK_LEVEL
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
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
    background = rgba[..., 3] <= MASK_LEVEL
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


def _squared(rgba: np.ndarray, square: tuple[int, int, int] | None,
             margin: float | None) -> np.ndarray:
    """With `square` (the pad colour of `data.resize=mask`): the square window around the
    mask's box grown by `margin` (the whole image where it has no mask), or, with margin
    None, around the whole image (a crop the alpha mode already cut to the box)."""
    if square is None:
        return rgba
    box = None if margin is None else mask_box(rgba[..., 3], margin)
    return square_window(rgba, box, square)


def cut_box(rgba: np.ndarray, alpha: str, margin: float) -> np.ndarray:
    """The crop modes' cut to the mask's box (what the cache stores for them)."""
    box = None if alpha == "rgb" else mask_box(rgba[..., 3], margin)
    if box is None:
        return rgba
    top, bottom, left, right = box
    return rgba[top:bottom, left:right]


def has_mask(rgba: np.ndarray) -> bool:
    """Does the image carry a usable alpha mask (some pixel outside it)? Decoding makes an
    image without one, or with an empty one, opaque everywhere. (A mask that fills its own box
    exactly, cut to that box, counts as none: the image is then all animal.)"""
    return bool((rgba[..., 3] <= MASK_LEVEL).any())


def _shaped(rgb: np.ndarray, masked: bool, auto: bool) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(auto_square(rgb, masked) if auto else rgb))


def load_image(path: str | Path, alpha: str = "rgb", margin: float = 0.05,
               fill: tuple[int, int, int] = (128, 128, 128),
               seed: int | None = None, max_pixels: int | None = None,
               square: tuple[int, int, int] | None = None, auto: bool = False) -> Image.Image:
    """An image as RGB, prepared by the alpha mode (see `apply_alpha`), or with `square` the
    square window around its mask (see `_squared`), background filled by the alpha mode; with
    `auto` (`data.resize=auto`) made square by `auto_square`.
    `seed` is accepted so every loader takes the same arguments; nothing here is random.
    `max_pixels`: see `read_rgba`."""
    rgba = read_rgba(path, max_pixels)
    if square is None:
        # Decided on the image as the cache would keep it (cut to the box for the crop
        # modes), so both loaders agree.
        masked = has_mask(cut_box(rgba, alpha, margin)) if auto else False
        return _shaped(apply_alpha(rgba, alpha, margin, tuple(fill)), masked, auto)
    window = _squared(cut_box(rgba, alpha, margin), square, margin if alpha == "rgb" else None)
    return Image.fromarray(fill_background(window, alpha, tuple(fill)))


def load_cached(path: str | Path, alpha: str = "rgb",
                fill: tuple[int, int, int] = (128, 128, 128),
                blank_prob: float = 0.0, seed: int | None = None,
                square: tuple[int, int, int] | None = None,
                margin: float | None = None, auto: bool = False) -> Image.Image:
    """A cached image (already cropped by the cache when the mode crops) as RGB: only the
    background fill of the alpha mode is left to apply (and, with `square`, the square window
    around the mask). With probability `blank_prob` the background is painted black instead,
    as the competition's second round does to its test images (a training augmentation; the
    draw comes from `seed`, the sampler's per-image seed, so runs and resumed runs repeat
    it). With `auto`, made square by `auto_square`."""
    rgba = _squared(read_rgba(path), square, margin)
    masked = has_mask(rgba)
    if blank_prob > 0 and np.random.default_rng([int(seed or 0), 1]).random() < blank_prob:
        return _shaped(fill_background(rgba, "crop_fill", (0, 0, 0)), masked, auto)
    return _shaped(fill_background(rgba, alpha, fill), masked, auto)


class ImageLoader(Protocol):
    """What `image_loader` makes: a file (and, in training, the item's seed, which drives the
    random background blanking) to an RGB image. Every loader takes `seed` so the dataset
    calls them all alike."""

    def __call__(self, path: str | Path, seed: int | None = None) -> Image.Image: ...


def image_loader(cfg: Config, cached: bool = False, train: bool = False) -> ImageLoader:
    """The image-loading callable for this config's alpha and resize settings (picklable for
    workers): from the preprocessing cache, or straight from the source files. `train` adds
    the background-blanking augmentation (cache only: it needs the kept alpha)."""
    square = mean_colour(cfg) if cfg.data.resize == "mask" else None
    auto = cfg.data.resize == "auto"
    if cached:
        blank = cfg.train.bg_blank_prob if train else 0.0
        # The cache already cut the crop modes' box with its margin.
        margin = cfg.data.crop_margin if cfg.data.alpha == "rgb" else None
        return partial(load_cached, alpha=cfg.data.alpha, fill=tuple(cfg.data.fill),
                       blank_prob=blank, square=square, margin=margin, auto=auto)
    if train and cfg.train.bg_blank_prob > 0:
        raise ConfigError("train.bg_blank_prob needs cache.enabled=true (the cache keeps the "
                          "mask the augmentation paints with)")
    return partial(load_image, alpha=cfg.data.alpha, margin=cfg.data.crop_margin,
                   fill=tuple(cfg.data.fill), max_pixels=cfg.data.max_pixels, square=square,
                   auto=auto)


class ImageDataset(Dataset):
    """Images with integer labels (-1 where unknown); yields (tensor, label, index).

    An item is an index, or (index, seed) from the training sampler: the seed drives every
    random draw for that image (background blanking, augmentations)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, transform,
                 load: ImageLoader = load_image) -> None:
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
