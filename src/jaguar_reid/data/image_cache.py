"""Preprocessing cache: every source image decoded once, cropped and resized, stored as PNG.

The jaguar images are ~3000 x 2000 RGBA PNGs; decoding them is the slowest thing a training
epoch would do. The cache keeps each image cropped to its mask (when the alpha mode crops)
and shrunk so its long side is `cache.size`, alpha kept, so the background can still be filled
or blanked at load time. It lives in `<output_dir>/cache/<digest of the settings>/`, each
entry named by the source's content (`source_ids`: the sha256 of its bytes), so a changed
source, or another data folder holding the same file names, never gets another's pixels, and
changed settings rebuild only what changed; `layout.CACHE_INDEX` there holds each content's record.

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
from PIL import Image
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
    DECODER_VERSION,
    ImageError,
    ImageLoader,
    cut_box,
    decode_image,
    image_loader,
)
from jaguar_reid.data.source_ids import content_ids
from jaguar_reid.io_utils import atomic_path, atomic_write_text, file_lock

# 3: entries named by the source's content, not its path.
CACHE_VERSION = 3


def cache_size(cfg: Config) -> int:
    """Long side of cached images: a margin above the training size leaves room for crops."""
    return cfg.cache.size if cfg.cache.size > 0 else int(round(cfg.data.img_size * 1.25))


def cache_settings(cfg: Config) -> dict:
    return {"version": CACHE_VERSION, "decoder": DECODER_VERSION,
            "crop": cfg.data.alpha != "rgb", "crop_margin": cfg.data.crop_margin,
            "size": cache_size(cfg), "max_pixels": cfg.data.max_pixels}


def cached_name(content_id: str) -> str:
    """The cache's file for a source of this content (`source_ids`): identical bytes share
    it, whatever their names; other bytes never do."""
    return f"{content_id[:32]}.png"


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


def _write_resized(rgba: np.ndarray, dst: str, size: int) -> None:
    """PNG of `rgba` with its long side at most `size` (Lanczos), written atomically."""
    image = Image.fromarray(np.ascontiguousarray(rgba, dtype=np.uint8))  # (H, W, 4): RGBA
    scale = size / max(image.size)
    if scale < 1:
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    with atomic_path(dst, suffix=".png") as tmp:
        # Low compression: the cache is read often and written once; decode speed matters.
        image.save(tmp, format="PNG", compress_level=1)


def process_image(src: str, dst: str, crop: bool, margin: float, size: int,
                  max_pixels: int) -> dict:
    """Decode `src` (`images.decode_image`, as every reader does), write its cached form to
    `dst`, and return its record.

    A problem that leaves no usable image (unreadable, truncated, absurd dimensions) is
    recorded with action "error" and nothing is written; the caller decides what to do.
    """
    record = empty_record(Path(src))
    try:
        image = decode_image(src, max_pixels)
    except ImageError as exc:
        if exc.size is not None:
            record.update(width=exc.size[0], height=exc.size[1])
        return unusable_record(record, exc.problem)
    height, width = image.rgba.shape[:2]
    record.update(width=width, height=height, mode=image.mode,
                  mask_fraction=image.mask_fraction,
                  phash=hash_to_hex(phash(image.rgba[..., :3])),
                  problems=[f.problem for f in image.findings],
                  action="; ".join(f.action for f in image.findings))
    _write_resized(cut_box(image.rgba, "crop", margin) if crop else image.rgba, dst, size)
    return record


def _process_star(args: tuple) -> dict:
    return process_image(*args)


def _read_index(path: Path) -> dict:
    """The cache's index (content id -> {"record": ...}); one that cannot be read (edited by
    hand, another tool's file) only costs a rebuild, said so, because every entry can be made
    again from the sources."""
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"note: {path} is unreadable ({exc}); rebuilding the cache")
        return {}
    if not isinstance(index, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("record"), dict) for e in index.values()):
        print(f"note: {path} is not a cache index; rebuilding the cache")
        return {}
    return index


def _jobs(paths: Sequence[Path], ids: list[str | None], index: dict, directory: Path,
          settings: dict) -> dict[str, tuple]:
    """The decodes to run, one per content not cached yet (two names of one content: one)."""
    jobs: dict[str, tuple] = {}
    for src, content in zip(paths, ids, strict=True):
        if content is None or content in jobs:
            continue
        dst = directory / cached_name(content)
        entry = index.get(content)
        if entry is None or not (dst.is_file() or entry["record"]["action"] == "error"):
            jobs[content] = (str(src), str(dst), settings["crop"], settings["crop_margin"],
                             settings["size"], settings["max_pixels"])
    return jobs


def _run(jobs: dict[str, tuple], workers: int, desc: str) -> dict[str, dict]:
    """Each job's record, by content id, decoded in `workers` processes."""
    progress = {"total": len(jobs), "desc": desc, "disable": None, "mininterval": 1.0}
    args = list(jobs.values())
    if workers > 1 and len(args) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_process_star, args, chunksize=4), **progress))
    else:
        results = list(tqdm(map(_process_star, args), **progress))
    return {content: {"record": record}
            for content, record in zip(jobs, results, strict=True)}


def _record(src: Path, content: str | None, index: dict) -> dict:
    """The record of `src` (its own name and path on its content's record)."""
    if content is None:
        return unusable_record(empty_record(Path(src)), "missing")
    stored = index[content]["record"]
    return {**stored, "problems": list(stored["problems"]), "filename": Path(src).name,
            "path": str(src)}


def build_cache(paths: Sequence[Path], cfg: Config, desc: str = "cache",
                raise_on_error: bool = True) -> tuple[list[Path], list[dict]]:
    """Cached file and record for each source path (in order), building only what is missing:
    entries are found by content (`source_ids`), so a rewritten source is decoded again. A
    missing source's "cached file" is the source path itself. With `raise_on_error`, an image
    that cannot be used stops with an error naming every such file."""
    directory = cache_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    index_path = directory / layout.CACHE_INDEX
    index = _read_index(index_path)
    settings = cache_settings(cfg)
    atomic_write_text(directory / "settings.json", json.dumps(settings, indent=2) + "\n")
    workers = cfg.cache.workers or os.cpu_count() or 1
    # A source rewritten between its hashing and its decoding is filed under its old digest;
    # its stamp moved, so the next build hashes it again and decodes the new bytes.
    ids = content_ids(cfg, paths, workers)
    jobs = _jobs(paths, ids, index, directory, settings)
    if jobs:
        ours = _run(jobs, workers, f"{desc}: {directory}")
        # Another process (a training beside a submission) may have added entries since we
        # read the index: merge into the latest under a lock, so neither loses the other's.
        with file_lock(directory / "index.lock"):
            index = {**index, **_read_index(index_path), **ours}
            atomic_write_text(index_path, json.dumps(index) + "\n")
        print(f"{desc}: {len(jobs)} image(s) decoded into {directory}, "
              f"{len(paths) - len(jobs)} already cached")
    cached = [Path(src) if c is None else directory / cached_name(c)
              for src, c in zip(paths, ids, strict=True)]
    records = [_record(src, c, index) for src, c in zip(paths, ids, strict=True)]
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
