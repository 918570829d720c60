"""The plain frozen floor: the baseline anyone would write first, beside every score.

The untouched backbone (the same weights file, or the same seeded random initialisation),
global average pooling, cosine similarity, and the stronger of two input transforms, both from
timm's pretrained configuration of the backbone (its mean and std, its interpolation, its input
size):
- `timm`: timm's own evaluation transform (`timm.data.create_transform`: its resize and centre
  crop at the backbone's crop_pct, 0.875 for most CNNs: the outer eighth of the frame is cut);
- `full`: `data.resize=auto`'s rule, the one the pipeline and the zero-training run use: an
  image with an alpha mask squashed whole, one without cut to its centre square with the short
  side whole (crop_pct 1).
Neither wins everywhere: on aligned dog faces timm's zoom gains a little, on full-frame wild
photos (animals small, off-centre) cutting the border loses them. So both are scored on the
training images (identity-balanced mAP over at most `CHOICE_IMAGES` of them; the floor trains
nothing, so this is out of sample) and the higher is the floor, for the out-of-fold scores and
the test alike: the floor is never the weaker baseline. The choice and both scores are kept in
`<output_dir>/floor/<key>.choice.json`.

None of the pipeline's other preprocessing (alpha modes, cache, normalisation settings) is
used, so a loss the pipeline's input causes shows up against it; epoch 0 of a training log
cannot show that, since it shares that input.

Embeddings are computed once per backbone, transform and image and kept in
`<output_dir>/floor/<key>-<transform>.npz` by the image's content (`data.source_ids`: the
sha256 of its bytes, never its name: the competition's two rounds share file names), so every
fold and experiment of one backbone shares them and a rewritten image is embedded again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from jaguar_reid import layout
from jaguar_reid.config import Config
from jaguar_reid.data.csv_tables import read_train_csv, resolve_image_paths
from jaguar_reid.data.images import DECODER_VERSION, has_mask, read_rgba
from jaguar_reid.data.source_ids import require_ids
from jaguar_reid.io_utils import atomic_path, atomic_write_json, file_lock, read_json
from jaguar_reid.retrieval.metrics import identity_balanced_map
from jaguar_reid.training.digest import weights_digest
from jaguar_reid.training.model import create_backbone

# Bumped when the recipe changes (2: rows by content, not file name; 3: two transforms, the
# stronger kept).
FLOOR_VERSION = 3
FLOOR_NAME = ("plain frozen floor (untouched backbone, the stronger of timm's eval crop and "
              "the full frame, average pool, cosine)")
TRANSFORMS = ("timm", "full")
CHOICE_IMAGES = 1000  # training images the transforms are compared on (stable, by name)


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


@dataclass(frozen=True)
class FullFrame:
    """`data.resize=auto`'s rule with timm's resizing: an image with an alpha mask squashed
    whole, one without cut to its centre square, the short side whole (crop_pct 1)."""

    squash: Callable[[Image.Image], torch.Tensor]
    crop: Callable[[Image.Image], torch.Tensor]

    @classmethod
    def of(cls, model: torch.nn.Module) -> FullFrame:
        data_cfg = {**timm.data.resolve_model_data_config(model), "crop_pct": 1.0}
        return cls(timm.data.create_transform(**{**data_cfg, "crop_mode": "squash"}),
                   timm.data.create_transform(**{**data_cfg, "crop_mode": "center"}))

    def of_rgba(self, rgba: np.ndarray) -> torch.Tensor:
        image = Image.fromarray(rgba[..., :3])
        return self.squash(image) if has_mask(rgba) else self.crop(image)


def transforms_for(model: torch.nn.Module, timm_transform) -> dict[str, object]:
    """The floor's candidate transforms by name (`TRANSFORMS`)."""
    return {"timm": timm_transform, "full": FullFrame.of(model)}


def _apply(transform, rgba: np.ndarray) -> torch.Tensor:
    if isinstance(transform, FullFrame):
        return transform.of_rgba(rgba)
    return transform(Image.fromarray(rgba[..., :3]))


@torch.no_grad()
def embed_plain(model: torch.nn.Module, transform, paths: Sequence[Path], device: str,
                batch_size: int, max_pixels: int | None = None) -> np.ndarray:
    """(N, D) float32 L2-normalised pooled features of the images' RGB (alpha dropped; a
    `FullFrame` transform reads it to choose its geometry)."""
    model.to(device)
    out = []
    for start in range(0, len(paths), batch_size):
        batch = [_apply(transform, read_rgba(p, max_pixels))
                 for p in paths[start:start + batch_size]]
        features = model(torch.stack(batch).to(device)).float()
        out.append(F.normalize(features, dim=1).cpu().numpy())
    width = getattr(model, "num_features", 0)
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


class _Store:
    """The floor embeddings of one transform, by the images' content, in one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._known: dict[str, np.ndarray] | None = None  # the file's rows, read once

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        with np.load(self.path, allow_pickle=False) as data:
            return dict(zip(data["ids"].tolist(), data["embeddings"], strict=True))

    def missing(self, ids: Sequence[str]) -> list[int]:
        if self._known is None:
            self._known = self._read()
        return [i for i, c in enumerate(ids) if c not in self._known]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        return np.stack([self._known[c] for c in ids]).astype(np.float32)

    def save(self, new: dict[str, np.ndarray]) -> None:
        """Add `new` to the file under its lock (another run may have added rows)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            merged = {**self._read(), **new}
            with atomic_path(self.path, suffix=".npz") as tmp:
                np.savez(tmp, ids=np.array(list(merged)),
                         embeddings=np.stack(list(merged.values())))
        self._known = merged


class FloorEmbedder:
    """Floor embeddings of images named in a CSV of `data.dir`, computed where missing and
    kept by the images' content, under the transform chosen on the training images."""

    def __init__(self, cfg: Config, device: str) -> None:
        self.cfg, self.device = cfg, device
        self.key = floor_key(cfg)
        folder = layout.work_root(cfg) / layout.FLOOR_DIR
        self.stores = {t: _Store(folder / f"{self.key}-{t}.npz") for t in TRANSFORMS}
        self.choice_path = folder / f"{self.key}.choice.json"
        self._model = None
        self._chosen: str | None = None

    def _embed(self, transform: str, names: Sequence[str], csv_path: Path) -> np.ndarray:
        paths = resolve_image_paths(layout.data_files(self.cfg).root, [str(n) for n in names],
                                    csv_path)
        ids = require_ids(self.cfg, paths)
        store = self.stores[transform]
        todo = store.missing(ids)
        if todo:
            if self._model is None:
                model, timm_transform = floor_model(self.cfg)
                self._model = (model, transforms_for(model, timm_transform))
            model, transforms = self._model
            new = embed_plain(model, transforms[transform], [paths[i] for i in todo],
                              self.device, self.cfg.embed.batch_size, self.cfg.data.max_pixels)
            store.save(dict(zip([ids[i] for i in todo], new, strict=True)))
        return store.rows(ids)

    def choice(self) -> str:
        """The transform of the floor: the one with the higher identity-balanced mAP on the
        training images (remembered per backbone, weights and training images)."""
        if self._chosen is None:
            train_csv = layout.data_files(self.cfg).train
            table = read_train_csv(train_csv)
            order = sorted(range(len(table)), key=lambda i: hashlib.sha256(
                str(table["filename"].iloc[i]).encode()).hexdigest())[:CHOICE_IMAGES]
            names = [str(table["filename"].iloc[i]) for i in sorted(order)]
            labels = table["ground_truth"].astype(str).to_numpy()[sorted(order)]
            digest = hashlib.sha256(json.dumps([names, labels.tolist()]).encode()).hexdigest()
            saved = read_json(self.choice_path) if self.choice_path.is_file() else {}
            if saved.get("images") != digest[:16]:
                scores = {}
                for t in TRANSFORMS:
                    emb = self._embed(t, names, train_csv).astype(np.float64)
                    scores[t] = identity_balanced_map(emb @ emb.T, labels)
                saved = {"transform": max(TRANSFORMS, key=lambda t: scores[t]),
                         "map": scores, "count": len(names), "images": digest[:16]}
                atomic_write_json(self.choice_path, saved)
            self._chosen = saved["transform"]
        return self._chosen

    def embed(self, names: Sequence[str], csv_path: Path) -> np.ndarray:
        """(N, D) floor embeddings of `names` (file names as `csv_path` gives them)."""
        return self._embed(self.choice(), names, csv_path)


def below_floor(what: str, score: dict | None, floor: dict | None) -> str | None:
    """The one line that says a result ends below the plain floor (identity-balanced mAP),
    or None."""
    if not score or not floor or score.get("map") is None or floor.get("map") is None:
        return None
    if score["map"] >= floor["map"]:
        return None
    return (f"WARNING: {what} mAP {score['map']:.4f} is below the {FLOOR_NAME}: "
            f"{floor['map']:.4f}")
