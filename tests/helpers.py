"""What the test files share, so that no test file imports another: the tiny training recipe,
the repository's folders, a tiny competition data set, and the one builder of fake
experiments. Every path and file name of the pipeline's output comes from `jaguar_reid.layout`.

Heavy imports (torch, the model) happen inside the functions that need them: test files that
do not train stay free of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaguar_reid import layout

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # ../shared: real data sets and weights, where present

# A config that trains in seconds: small CNN, small images, one short epoch.
TINY_ARGS = [
    "config=configs/demo.yaml",
    "model.backbone=resnet18",
    "model.embed_dim=32",
    "data.img_size=32",
    "data.num_workers=0",
    "model.allow_random_init=true",  # tiny backbones from random weights, on purpose
    "train.epochs=1",
    "train.batch_size=16",
    "embed.batch_size=32",
    "device=cpu",
    "report.enabled=false",  # the report has its own tests; the end-to-end tests turn it on
    # The plain floor embeds every image at the backbone's native size after each training;
    # the tests of the floor pass floor.enabled=true after these.
    "floor.enabled=false",
]

# --------------------------------------------------------------------------- a tiny data set

IDS = ("Marcela", "Kwang", "Pixana", "Bagua")
TRAIN_HEADER = "filename,ground_truth\n"
TEST_HEADER = "row_id,query_image,gallery_image\n"
SAMPLE_HEADER = "row_id,similarity\n"


def tiny_png(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    """A small RGBA image with a rectangular mask, different for every seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    rgba = rng.integers(0, 255, (height, width, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[height // 4: 3 * height // 4, width // 4: 3 * width // 4, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def make_data(root: Path) -> Path:
    """12 train images of 4 identities, 3 test images, every ordered test pair."""
    files = layout.DataFiles.under(root)
    train = [(f"train_{i:04d}.png", IDS[i % len(IDS)]) for i in range(12)]
    test = [f"test_{i:04d}.png" for i in range(1, 4)]
    for i, (name, _) in enumerate(train):
        tiny_png(root / "train" / "train" / name, i)
    for i, name in enumerate(test):
        tiny_png(root / "test" / "test" / name, 100 + i)
    pairs = [(q, g) for q in test for g in test if q != g]
    files.train.write_text(TRAIN_HEADER + "".join(f"{f},{g}\n" for f, g in train))
    files.test.write_text(
        TEST_HEADER + "".join(f"{i},{q},{g}\n" for i, (q, g) in enumerate(pairs)))
    files.sample.write_text(
        SAMPLE_HEADER + "".join(f"{i},0.5\n" for i in range(len(pairs))))
    return root


def base_args(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    """Settings for `make_data`'s data set: output and folds file under tmp_path, 2 folds,
    one worker, the CPU."""
    return [f"data.dir={data}", f"output_dir={tmp_path / 'out'}",
            f"folds.file={tmp_path / 'folds.csv'}", "folds.n_folds=2", "cache.workers=1",
            "device=cpu", "data.num_workers=0", "model.allow_random_init=true", *extra]


# --------------------------------------------------------------------------- where runs write

def _config(cfg: Any):
    from jaguar_reid.config import load_config

    return load_config(list(cfg)) if isinstance(cfg, list | tuple) else cfg


def exp_path(cfg: Any) -> Path:
    """The experiment folder of a config (or of command-line arguments) holding its folds."""
    return layout.model_dir(_config(cfg))


def fold_path(cfg: Any, fold: int | str = 0) -> Path:
    """A fold folder of a config's (or command-line arguments') experiment."""
    return layout.fold_dir(exp_path(cfg), fold)


# --------------------------------------------------------------------------- fake experiments

PerFold = Mapping[str, Any] | Callable[[Any], Any] | None


def _per_fold(value: Any, fold: int | str) -> Any:
    return value(fold) if callable(value) else value


def fake_experiment(cfg: Any, folds: Iterable[int | str] = (0,), *,
                    weights: str | bytes | None = "random", val: PerFold = None,
                    metrics: PerFold = None, log: str | Callable[[Any], str | None] | None = None,
                    finished: bool = True, exp_config: bool = False,
                    n_classes: int = len(IDS)) -> Path:
    """Fold folders as training leaves them, without training. `cfg` is a config or its
    command-line arguments; returns the experiment folder (`layout.model_dir`).

    Every fold gets its config (`layout.RUN_CONFIG`, `fold` set), then, where asked:
    - `weights` (`layout.MODEL_WEIGHTS`): "random", an untrained model of `cfg` (seeded);
      "nan", that model with every float weight NaN; "garbage" or any bytes: a file that is
      not a weights file; None: no file.
    - `val` (`layout.VAL_EMBEDDINGS`): the arrays to save, a mapping or `fold -> mapping`.
    - `log` (`layout.TRAIN_LOG`): its text, or `fold -> text or None`.
    - `metrics` (`layout.FOLD_METRICS`): written last, as training does, so the fold is
      finished (`layout.is_finished`): {"fold": k} with the entries given (a mapping or
      `fold -> mapping`). `finished=False` leaves it out: a fold started, never finished.
    With `exp_config`, the experiment's own config too, beside its folds.
    """
    from jaguar_reid.config import Config, save_config
    from jaguar_reid.io_utils import atomic_write_json

    cfg = _config(cfg)
    exp = layout.model_dir(cfg)
    exp.mkdir(parents=True, exist_ok=True)
    if exp_config:
        save_config(cfg, exp / layout.RUN_CONFIG)
    for fold in folds:
        directory = layout.fold_dir(exp, fold)
        directory.mkdir(parents=True, exist_ok=True)
        save_config(Config({**cfg, "fold": str(fold)}), directory / layout.RUN_CONFIG)
        if weights is not None:
            _fake_weights(cfg, directory / layout.MODEL_WEIGHTS, weights, n_classes)
        arrays = _per_fold(val, fold)
        if arrays is not None:
            np.savez(directory / layout.VAL_EMBEDDINGS, **arrays)
        text = _per_fold(log, fold)
        if text is not None:
            (directory / layout.TRAIN_LOG).write_text(text)
        if finished:
            atomic_write_json(directory / layout.FOLD_METRICS,
                              {"fold": fold, **(_per_fold(metrics, fold) or {})})
    return exp


def _fake_weights(cfg: Any, path: Path, weights: str | bytes, n_classes: int) -> None:
    if weights == "garbage":
        weights = b"these are not weights"
    if isinstance(weights, bytes):
        path.write_bytes(weights)
        return
    if weights not in ("random", "nan"):
        raise ValueError(f"weights: 'random', 'nan', 'garbage', bytes or None; got {weights!r}")
    import torch
    from safetensors.torch import save_file

    from jaguar_reid.training.model import build_model

    torch.manual_seed(0)
    state = build_model(cfg, n_classes=n_classes).state_dict()
    if weights == "nan":
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point()
                 and k != "head.margins" else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


# --------------------------------------------------------------------------- read-only folders

def snapshot(root: Path, folders: bool = False) -> dict[str, tuple[int, int, str]]:
    """Every file beneath `root` (and every folder, with `folders`): size, modification time
    and content digest. Tests run as root write through chmod, so "left untouched" is proved
    by comparing two snapshots."""
    import hashlib

    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() or folders:
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            out[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns, digest)
    return out


def set_writable(root: Path, writable: bool) -> None:
    """`root` and everything beneath it read-only (as a Kaggle dataset is), or writable again
    by its owner."""
    import stat

    bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~bits)


# --------------------------------------------------------------------------- synthetic coats

COAT_BACKGROUND = 170


def spots(seed: int, size: tuple[int, int] = (320, 400), count: int = 120) -> np.ndarray:
    """A grayscale coat: dark ellipses of random size and angle on a noisy light ground."""
    import cv2

    rng = np.random.default_rng(seed)
    height, width = size
    noise = rng.normal(0, 6, size)
    img = np.clip(COAT_BACKGROUND + noise, 0, 255).astype(np.uint8)
    for _ in range(count):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(3, 14)), int(rng.integers(3, 14)))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    int(rng.integers(0, 90)), -1)
    return img


def warp(img: np.ndarray, angle_deg: float = 17.0, scale: float = 0.9) -> np.ndarray:
    """Rotated, scaled and seen in slight perspective: the same coat from another camera."""
    import cv2

    height, width = img.shape[:2]
    affine = cv2.getRotationMatrix2D((width / 2, height / 2), angle_deg, scale)
    homography = np.vstack([affine, [2e-4, 0, 1]])
    return cv2.warpPerspective(img, homography, (width, height), borderValue=COAT_BACKGROUND)


def coat_png(path: Path, array: np.ndarray) -> Path:
    """A coat saved as a PNG at `path`."""
    Image.fromarray(array).save(path)
    return path


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG of a few dozen bytes whose header claims width x height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path
