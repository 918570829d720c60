"""Embeddings: a model over a list of images, with test-time views, L2-normalised; and the
ensemble of several fold models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from src.augment import build_transform
from src.config import Config
from src.data import ImageDataset, image_loader
from src.io_utils import amp_dtype
from src.model import RETRIEVAL_MODES


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


@torch.no_grad()
def embed_all(model: torch.nn.Module, paths: Sequence[Path], cfg: Config,
              device: str, load=None) -> dict[str, np.ndarray]:
    """Every retrieval embedding (`neck`, `backbone`, `both`; see `ReIDModel.embed`) of the
    images, each (N, D) float32 and L2-normalised, from one forward pass per view.

    With `embed.tta_flip` the mirrored image is a second view of the same decoded batch; each
    view is normalised before averaging so no view dominates by its norm. `load` reads one
    file (default: straight from the sources with the config's alpha mode).
    """
    model.eval().to(device)
    dataset = ImageDataset(paths, None, build_transform(cfg, train=False),
                           load or image_loader(cfg))
    loader = DataLoader(dataset, batch_size=cfg.embed.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers, pin_memory=device.startswith("cuda"))
    dtype = amp_dtype(device, cfg.train.amp)
    chunks: dict[str, list[np.ndarray]] = {}
    for images, _, _ in loader:
        images = images.to(device, non_blocking=True)
        views = [images, images.flip(dims=[3])] if cfg.embed.tta_flip else [images]
        totals: dict[str, torch.Tensor] = {}
        for view in views:
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                embedded = model.embed(view)
            for kind, emb in embedded.items():
                totals[kind] = totals.get(kind, 0) + F.normalize(emb.float(), dim=1).cpu()
        for kind, total in totals.items():
            chunks.setdefault(kind, []).append(F.normalize(total, dim=1).numpy())
    if not chunks:
        return {kind: np.zeros((0, cfg.model.embed_dim), np.float32) for kind in RETRIEVAL_MODES}
    return {kind: np.concatenate(parts).astype(np.float32) for kind, parts in chunks.items()}


def embed_images(model: torch.nn.Module, paths: Sequence[Path], cfg: Config,
                 device: str, load=None) -> np.ndarray:
    """The retrieval embedding `model.retrieval` chose, (N, D) float32, L2-normalised."""
    return embed_all(model, paths, cfg, device, load)[cfg.model.retrieval]


ENSEMBLE_MODES = ("mean", "concat")


def ensemble_embeddings(embeddings: Sequence[np.ndarray], mode: str = "mean") -> np.ndarray:
    """One embedding per image from several models' embeddings of the same images.

    `mean`: average of the L2-normalised embeddings, re-normalised. Cheap and common; it
    assumes the models' spaces roughly agree (fold models share their initialisation).
    `concat`: the normalised embeddings side by side, re-normalised; its cosine similarity is
    exactly the mean of the models' cosine similarities, whatever their spaces.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble mode must be one of {', '.join(ENSEMBLE_MODES)}; got {mode!r}")
    if not embeddings:
        raise ValueError("no embeddings to ensemble")
    shapes = {e.shape for e in embeddings}
    if len(shapes) != 1:
        raise ValueError(f"embeddings to ensemble differ in shape: {sorted(shapes)}")
    stacked = np.stack([l2_normalize(e.astype(np.float64)) for e in embeddings])
    if not np.isfinite(stacked).all():
        raise ValueError("embeddings contain NaN or infinite values")
    combined = stacked.mean(axis=0) if mode == "mean" else np.concatenate(stacked, axis=1)
    return l2_normalize(combined).astype(np.float32)
