"""Preprocessing cache: every source image decoded once, cropped and resized, stored as PNG.

The jaguar images are ~3000 x 2000 RGBA PNGs; decoding them is the slowest thing a training
epoch would do. The cache keeps each image cropped to its mask (when the alpha mode crops)
and shrunk so its long side is `cache.size`, alpha kept, so the background can still be filled
or blanked at load time. It lives in `<output_dir>/cache/<digest of the settings>/`; an
`index.json` there records each source's size and mtime, so a changed source or changed
settings rebuild only what changed.

    python -m jaguar_reid.cache [config=...] [data.dir=...]  # build (or refresh): train, test

Every decode also yields a record of what the image is (size, mode, mask coverage, perceptual
hash, problems and what was done about them): the data check and the near-duplicate grouping
read those records instead of decoding the images again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from jaguar_reid import layout
from jaguar_reid.config import Config, load_config
from jaguar_reid.data.csv_tables import (
    DataError,
    pair_image_names,
    read_test_csv,
    read_train_csv,
    resolve_image_paths,
)
from jaguar_reid.data.dedup import hash_to_hex, phash
from jaguar_reid.data.images import (
    SIXTEEN_BIT_MODES,
    ImageLoader,
    image_loader,
    mask_box,
    to_rgba,
)
from jaguar_reid.io_utils import atomic_path, atomic_write_text, file_lock

# 2: cached files are named after the source's path, not its stem alone.
CACHE_VERSION = 2
# Dimensions no photograph has: a side this short, or more pixels than data.max_pixels.
_MIN_SIDE = 8


def cache_size(cfg: Config) -> int:
    """Long side of cached images: a margin above the training size leaves room for crops."""
    return cfg.cache.size if cfg.cache.size > 0 else int(round(cfg.data.img_size * 1.25))


def cache_settings(cfg: Config) -> dict:
    return {"version": CACHE_VERSION, "crop": cfg.data.alpha != "rgb",
            "crop_margin": cfg.data.crop_margin, "size": cache_size(cfg),
            "max_pixels": cfg.data.max_pixels}


def cached_name(src: str | Path) -> str:
    """The cache's file for a source image: its stem (readable) and a digest of its full
    path, so `train/0001.png` and `test/0001.png` (or `a.png` and `a.jpg`) never share one."""
    digest = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:10]
    return f"{Path(src).stem}-{digest}.png"


def cache_dir(cfg: Config) -> Path:
    settings = cache_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return layout.cache_root(cfg) / digest


def empty_record(src: Path) -> dict:
    """The record of an image before anything is known about it."""
    return {"filename": src.name, "path": str(src), "width": None, "height": None, "mode": None,
            "mask_fraction": None, "phash": None, "problems": [], "action": ""}


def unusable_record(record: dict, problem: str) -> dict:
    """Mark `record` as an image the pipeline cannot use, for `problem`."""
    record["problems"].append(problem)
    record["action"] = "error"
    return record


def _decode(src: str, record: dict, max_pixels: int) -> tuple[np.ndarray, bool] | None:
    """(RGBA array, whether the file has alpha), with size and mode in `record`; None when
    the image cannot be used (the record then says why)."""
    try:
        with Image.open(src) as img:
            width, height = img.size
            record.update(width=width, height=height, mode=img.mode)
            if width * height > max_pixels or min(width, height) < _MIN_SIDE:
                unusable_record(record, f"absurd dimensions: {width}x{height}")
                return None
            img.load()
            has_alpha = "A" in img.mode or (img.mode == "P" and "transparency" in img.info)
            return to_rgba(img), has_alpha
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires on open for images far above its pixel limit.
        unusable_record(record, f"absurd dimensions: {exc}")
    except FileNotFoundError:
        unusable_record(record, "missing")
    except OSError as exc:
        # Pillow's message quotes the path: a folder named `truncated/` must not decide.
        message = str(exc).replace(str(src), "")
        kind = "truncated" if "truncated" in message.lower() else "unreadable"
        unusable_record(record, f"{kind}: {exc}")
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        unusable_record(record, f"unreadable: {exc}")
    return None


def _cut_to_mask(rgba: np.ndarray, has_alpha: bool, margin: float,
                 problems: list[str], actions: list[str]) -> np.ndarray:
    """The mask's box (plus margin); the whole image, said so, without a usable mask."""
    box = mask_box(rgba[..., 3], margin) if has_alpha else None
    if box is None:
        problems.append("empty mask" if has_alpha else "no alpha")
        actions.append("whole image used")
        return rgba
    top, bottom, left, right = box
    return rgba[top:bottom, left:right]


def _write_resized(rgba: np.ndarray, dst: str, size: int) -> None:
    """PNG of `rgba` with its long side at most `size` (Lanczos), written atomically."""
    image = Image.fromarray(np.ascontiguousarray(rgba), mode="RGBA")
    scale = size / max(image.size)
    if scale < 1:
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    with atomic_path(dst, suffix=".png") as tmp:
        # Low compression: the cache is read often and written once; decode speed matters.
        image.save(tmp, format="PNG", compress_level=1)


def process_image(src: str, dst: str, crop: bool, margin: float, size: int,
                  max_pixels: int) -> dict:
    """Decode `src`, write its cached form to `dst`, and return its record.

    A problem that leaves no usable image (unreadable, truncated, absurd dimensions) is
    recorded with action "error" and nothing is written; the caller decides what to do.
    """
    record = empty_record(Path(src))
    decoded = _decode(src, record, max_pixels)
    if decoded is None:
        return record
    rgba, has_alpha = decoded
    problems: list[str] = record["problems"]
    actions: list[str] = []
    mode = record["mode"]
    if mode in ("L", "LA", "1"):
        problems.append("grayscale")
        actions.append("converted to RGB")
    if mode in SIXTEEN_BIT_MODES:
        problems.append("16-bit")
        actions.append("rescaled to 8-bit RGB")
    record["mask_fraction"] = float((rgba[..., 3] > 127).mean()) if has_alpha else None
    record["phash"] = hash_to_hex(phash(rgba[..., :3]))
    out = _cut_to_mask(rgba, has_alpha, margin, problems, actions) if crop else rgba
    _write_resized(out, dst, size)
    record["action"] = "; ".join(actions)
    return record


def _process_star(args: tuple) -> dict:
    return process_image(*args)


def _read_index(path: Path) -> dict:
    """The cache's index; one that cannot be read (edited by hand, another tool's file) only
    costs a rebuild, said so, because every entry can be made again from the sources."""
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"note: {path} is unreadable ({exc}); rebuilding the cache")
        return {}
    if not isinstance(index, dict) or not all(
            isinstance(e, dict) and "stamp" in e and isinstance(e.get("record"), dict)
            for e in index.values()):
        print(f"note: {path} is not a cache index; rebuilding the cache")
        return {}
    return index


def build_cache(paths: Sequence[Path], cfg: Config, desc: str = "cache",
                raise_on_error: bool = True) -> tuple[list[Path], list[dict]]:
    """Cached file and record for each source path (in order), building only what is missing
    or stale. With `raise_on_error`, an image that cannot be used stops with an error naming
    every such file."""
    directory = cache_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    index_path = directory / "index.json"
    index = _read_index(index_path)
    settings = cache_settings(cfg)
    atomic_write_text(directory / "settings.json", json.dumps(settings, indent=2) + "\n")

    cached = [directory / cached_name(p) for p in paths]
    todo = []
    for src, dst in zip(paths, cached, strict=True):
        key = str(Path(src).resolve())
        try:
            stat = os.stat(src)
            stamp = [stat.st_size, stat.st_mtime_ns]
        except FileNotFoundError:
            stamp = None
        entry = index.get(key)
        fresh = (entry is not None and stamp is not None and entry["stamp"] == stamp
                 and (dst.is_file() or entry["record"]["action"] == "error"))
        if not fresh:
            todo.append((key, stamp, (str(src), str(dst), settings["crop"],
                                      settings["crop_margin"], settings["size"],
                                      settings["max_pixels"])))
    if todo:
        workers = cfg.cache.workers or os.cpu_count() or 1
        jobs = [job for _, _, job in todo]
        progress = {"total": len(todo), "desc": f"{desc}: {directory}", "disable": None,
                    "mininterval": 1.0}
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(tqdm(pool.map(_process_star, jobs, chunksize=4), **progress))
        else:
            results = list(tqdm(map(_process_star, jobs), **progress))
        ours = {key: {"stamp": stamp, "record": record}
                for (key, stamp, _), record in zip(todo, results, strict=True)}
        # Another process (a training beside a submission) may have added entries since we
        # read the index: merge into the latest under a lock, so neither loses the other's.
        with file_lock(directory / "index.lock"):
            index = {**index, **_read_index(index_path), **ours}
            atomic_write_text(index_path, json.dumps(index) + "\n")
        print(f"{desc}: {len(todo)} image(s) decoded into {directory}, "
              f"{len(paths) - len(todo)} already cached")

    records = [index[str(Path(p).resolve())]["record"] for p in paths]
    errors = [r for r in records if r["action"] == "error"]
    if errors and raise_on_error:
        shown = "; ".join(f"{r['path']}: {r['problems'][0]}" for r in errors[:5])
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DataError(f"{len(errors)} image(s) cannot be used: {shown}{more} "
                        "(python -m jaguar_reid.datacheck lists every problem)")
    return cached, records


@dataclass(frozen=True)
class PreparedImages:
    """The files to read for some images, in order, and the loader that reads them."""

    paths: list[Path]
    load: ImageLoader
    records: list[dict] | None  # each image's cache record (`build_cache`); None without it


def prepare_images(cfg: Config, names: Sequence[str], csv_path: str | Path,
                   desc: str = "cache") -> PreparedImages:
    """The files to read for `names` and the loader that reads them: cached files when
    `cache.enabled`, else the sources. Records come with the cache (None without it)."""
    sources = resolve_image_paths(Path(cfg.data.dir), names, csv_path)
    if not cfg.cache.enabled:
        return PreparedImages(sources, image_loader(cfg), None)
    cached, records = build_cache(sources, cfg, desc)
    return PreparedImages(cached, image_loader(cfg, cached=True), records)


def main(argv: list[str]) -> None:
    """`python -m jaguar_reid.cache [config=...]`: build or refresh the cache of every
    train and test image."""

    cfg = load_config(argv)
    files = layout.data_files(cfg)
    train_names = read_train_csv(files.train)["filename"]
    test_names = pair_image_names(read_test_csv(files.test))
    build_cache(resolve_image_paths(files.root, train_names, files.train), cfg,
                "train images")
    build_cache(resolve_image_paths(files.root, test_names, files.test), cfg, "test images")
    print(f"cache ready: {cache_dir(cfg)}")
