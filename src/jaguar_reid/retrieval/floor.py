"""The plain frozen floor: the baseline anyone would write first, beside every score.

The untouched backbone (the same weights file, or the same seeded random initialisation),
timm's own evaluation transform for it (`timm.data.create_transform` of its pretrained
configuration: its mean and std, its resize and centre crop, its input size), global average
pooling, cosine similarity. None of the pipeline's preprocessing (alpha modes, cache, resize
mode, normalisation settings) is used, so a loss the pipeline's input causes shows up against
it; epoch 0 of a training log cannot show that, since it shares that input.

Embeddings are computed once per backbone and image and kept in
`<output_dir>/floor/<key>.npz` by the image's content (`data.source_ids`: the sha256 of its
bytes, never its name: the competition's two rounds share file names), so every fold and
experiment of one backbone shares them and a rewritten image is embedded again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from jaguar_reid import layout
from jaguar_reid.config import Config
from jaguar_reid.data.csv_tables import resolve_image_paths
from jaguar_reid.data.images import DECODER_VERSION, read_rgba
from jaguar_reid.data.source_ids import require_ids
from jaguar_reid.io_utils import atomic_path, file_lock
from jaguar_reid.training.digest import weights_digest
from jaguar_reid.training.model import create_backbone

FLOOR_VERSION = 2  # bumped when the recipe changes (2: rows by content, not file name)
FLOOR_NAME = "plain frozen floor (timm eval transform, average pool, cosine)"


def floor_key(cfg: Config) -> str:
    """What decides the floor's embeddings: the backbone and its starting weights."""
    weights = weights_digest(cfg, cfg.model.weights) if cfg.model.weights else (
        "timm-hub" if cfg.model.pretrained else f"random-seed{cfg.seed}")
    text = json.dumps([FLOOR_VERSION, DECODER_VERSION, cfg.model.backbone, weights])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def floor_model(cfg: Config) -> tuple[torch.nn.Module, object]:
    """The untouched backbone with timm's average pooling, and timm's eval transform for it.
    A random initialisation is seeded with `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_backbone(cfg, global_pool="avg", own_size=True).eval()
    data_cfg = timm.data.resolve_model_data_config(model)
    return model, timm.data.create_transform(**data_cfg, is_training=False)


@torch.no_grad()
def embed_plain(model: torch.nn.Module, transform, paths: Sequence[Path], device: str,
                batch_size: int, max_pixels: int | None = None) -> np.ndarray:
    """(N, D) float32 L2-normalised pooled features of the images' RGB (alpha dropped)."""
    model.to(device)
    out = []
    for start in range(0, len(paths), batch_size):
        batch = [transform(Image.fromarray(read_rgba(p, max_pixels)[..., :3]))
                 for p in paths[start:start + batch_size]]
        features = model(torch.stack(batch).to(device)).float()
        out.append(F.normalize(features, dim=1).cpu().numpy())
    width = getattr(model, "num_features", 0)
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


class FloorEmbedder:
    """Floor embeddings of images named in a CSV of `data.dir`, computed where missing and
    kept by the images' content."""

    def __init__(self, cfg: Config, device: str) -> None:
        self.cfg, self.device = cfg, device
        self.path = layout.work_root(cfg) / layout.FLOOR_DIR / f"{floor_key(cfg)}.npz"
        self._model = None
        self._known: dict[str, np.ndarray] | None = None  # the file's rows, read once

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        with np.load(self.path, allow_pickle=False) as data:
            return dict(zip(data["ids"].tolist(), data["embeddings"], strict=True))

    def embed(self, names: Sequence[str], csv_path: Path) -> np.ndarray:
        """(N, D) floor embeddings of `names` (file names as `csv_path` gives them)."""
        paths = resolve_image_paths(layout.data_files(self.cfg).root, [str(n) for n in names],
                                    csv_path)
        ids = require_ids(self.cfg, paths)
        if self._known is None:
            self._known = self._read()
        todo = {c: p for c, p in zip(ids, paths, strict=True) if c not in self._known}
        if todo:
            if self._model is None:
                self._model = floor_model(self.cfg)
            new = embed_plain(*self._model, list(todo.values()), self.device,
                              self.cfg.embed.batch_size, self.cfg.data.max_pixels)
            self._known = self._save(dict(zip(todo, new, strict=True)))
        return np.stack([self._known[c] for c in ids]).astype(np.float32)

    def _save(self, new: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add `new` to the file under its lock (another run may have added rows); returns
        every row the file now holds."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            merged = {**self._read(), **new}
            with atomic_path(self.path, suffix=".npz") as tmp:
                np.savez(tmp, ids=np.array(list(merged)),
                         embeddings=np.stack(list(merged.values())))
        return merged


def below_floor(what: str, score: dict | None, floor: dict | None) -> str | None:
    """The one line that says a result ends below the plain floor (identity-balanced mAP),
    or None."""
    if not score or not floor or score.get("map") is None or floor.get("map") is None:
        return None
    if score["map"] >= floor["map"]:
        return None
    return (f"WARNING: {what} mAP {score['map']:.4f} is below the {FLOOR_NAME}: "
            f"{floor['map']:.4f}")
