"""Preprocessing cache, measured side by side in one run (no dataset needed).

    python bench/cache_speed.py [--n 200] [--width 3000] [--height 2000] [--read 20]

Writes N synthetic RGBA PNGs the size of the jaguar photos (textured, so they compress about
as badly as photographs), then reports
  - the time to build the cache for all N on every CPU core;
  - images per second of the training data path (decode + alpha crop + train transform at
    448 px) reading the originals vs reading the cache, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from jaguar_reid.config import load_config  # noqa: E402
from jaguar_reid.data.augment import build_transform  # noqa: E402
from jaguar_reid.data.image_cache import build_cache  # noqa: E402
from jaguar_reid.data.images import (
    ImageDataset,
    image_loader,  # noqa: E402
)


def write_photos(folder: Path, n: int, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    # Coarse shapes plus fine grain: compresses like a photo, not like a flat test card.
    coarse = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    yy, xx = np.mgrid[0:height, 0:width]
    mask = (((yy - height / 2) / (height * 0.35)) ** 2 + ((xx - width / 2) / (width * 0.4)) ** 2
            < 1).astype(np.uint8) * 255
    paths = []
    for i in range(n):
        grain = rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
        rgba = np.dstack([base + grain, np.roll(mask, i * 7, axis=1)])
        path = folder / f"train_{i:04d}.png"
        Image.fromarray(rgba, "RGBA").save(path, compress_level=3)
        paths.append(path)
    return paths


def images_per_second(read, items: list, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        read(items[i % len(items)])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--read", type=int, default=20, help="originals read for the rate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        paths = write_photos(tmp_path, args.n, args.width, args.height)
        mb = sum(p.stat().st_size for p in paths) / args.n / 2**20
        print(f"wrote {args.n} RGBA PNGs {args.width}x{args.height} ({mb:.1f} MB each) in "
              f"{time.perf_counter() - t0:.0f} s")
        cfg = load_config([f"output_dir={tmp_path / 'out'}", "data.img_size=448",
                           "data.alpha=crop_fill"])
        t0 = time.perf_counter()
        cached, _ = build_cache(paths, cfg)
        build_s = time.perf_counter() - t0
        print(f"cache build: {args.n} images in {build_s:.1f} s on {os.cpu_count()} cores "
              f"({args.n / build_s:.2f} images/s)")
        load_original, load_cache = image_loader(cfg), image_loader(cfg, cached=True)
        n_cache = max(args.read, min(args.n, 200))
        decode_original = images_per_second(load_original, paths, args.read)
        decode_cache = images_per_second(load_cache, cached, n_cache)
        print(f"decode + alpha crop, 1 process: originals {decode_original:.2f} images/s, "
              f"cache {decode_cache:.1f} images/s, ratio {decode_cache / decode_original:.1f}x")
        transform = build_transform(cfg, train=True)
        original = ImageDataset(paths, None, transform, load_original)
        from_cache = ImageDataset(cached, None, transform, load_cache)
        rate_original = images_per_second(original.__getitem__, list(range(args.n)), args.read)
        rate_cache = images_per_second(from_cache.__getitem__, list(range(args.n)), n_cache)
        print(f"training data path (+ train transform at 448 px), 1 process: originals "
              f"{rate_original:.2f} images/s, cache {rate_cache:.1f} images/s, "
              f"ratio {rate_cache / rate_original:.1f}x")


if __name__ == "__main__":
    main()
