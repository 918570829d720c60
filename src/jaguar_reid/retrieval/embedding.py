"""Embeddings: a model over a list of images, with test-time views, L2-normalised; and the
ensemble of several fold models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from jaguar_reid import layout
from jaguar_reid.config import (
    Config,
    check_view,
    experiment_names,
    load_config,
    load_saved_config,
    with_recipe_of,
)
from jaguar_reid.data.augment import build_transform
from jaguar_reid.data.csv_tables import DataError, read_train_csv, resolve_image_paths
from jaguar_reid.data.image_cache import prepare_images
from jaguar_reid.data.images import DECODER_VERSION, ImageDataset, ImageLoader, image_loader
from jaguar_reid.data.source_ids import ids_digest, require_ids
from jaguar_reid.data.splits import experiment_folds
from jaguar_reid.io_utils import (
    amp_dtype,
    atomic_path,
    loader_workers,
    read_json,
    resolve_device,
    say_once,
)
from jaguar_reid.keys import choices
from jaguar_reid.progress import bar as progress_bar
from jaguar_reid.training.digest import weights_digest
from jaguar_reid.training.model import RETRIEVAL_MODES, load_trained_model


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def view_zoom(view: str) -> float:
    return float(view.split("zoom")[1]) if "zoom" in view else 1.0


def apply_view(images: torch.Tensor, view: str) -> torch.Tensor:
    """A test-time view of a normalised batch (B, C, H, W), same size as the input.

    `flip` mirrors left-right. `zoom<f>` resizes by f and centre-crops back (f > 1), or pads
    with zeros (f < 1): zero is the mean colour after normalisation. Done on the batch, on the
    device, so every view shares one decode and works for any backbone (a ViT keeps its
    input size)."""
    check_view(view, "view")
    out = images.flip(dims=[3]) if view.startswith("flip") else images
    f = view_zoom(view)
    if f == 1.0:
        return out
    h, w = out.shape[-2:]
    # Sizes differ from the input's by an even number of pixels, so the crop or the padding
    # is exactly centred (and a zoom commutes with the flip).
    nh, nw = (max(2 - n % 2, n + 2 * round(n * (f - 1) / 2)) for n in (h, w))
    resized = F.interpolate(out, size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=f < 1.0)
    if f > 1.0:
        top, left = (nh - h) // 2, (nw - w) // 2
        return resized[..., top:top + h, left:left + w]
    top, left = (h - nh) // 2, (w - nw) // 2
    return F.pad(resized, (left, w - nw - left, top, h - nh - top))


@torch.no_grad()
def embed_views(model: torch.nn.Module, paths: Sequence[Path], cfg: Config, device: str,
                load: ImageLoader | None = None, views: Sequence[str] = ("orig",),
                desc: str = "embedding") -> dict[str, dict[str, np.ndarray]]:
    """{view: {kind: (N, D) float32 L2-normalised}} for every retrieval embedding (`neck`,
    `backbone`, `both`; see `ReIDModel.embed`): one decode per image, one forward per view.
    Kept per view so that any set of views can be combined later (`combine_views`) without
    embedding again. `load` reads one file (default: from the sources with the config's alpha
    mode). `desc` names the progress bar (`progress.bar`: on a terminal)."""
    views = list(dict.fromkeys(check_view(v, "views") for v in views))
    model.eval().to(device)
    dataset = ImageDataset(paths, None, build_transform(cfg, train=False),
                           load or image_loader(cfg))
    loader = DataLoader(dataset, batch_size=cfg.embed.batch_size, shuffle=False,
                        num_workers=loader_workers(cfg.data.num_workers),
                        pin_memory=device.startswith("cuda"))
    dtype = amp_dtype(device, cfg.train.amp, cfg.train.amp_dtype)
    chunks: dict[str, dict[str, list[np.ndarray]]] = {v: {} for v in views}
    for images, _, _ in progress_bar(loader, desc=desc, unit="batch"):
        images = images.to(device, non_blocking=True)
        for view in views:
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                embedded = model.embed(apply_view(images, view))
            for kind, emb in embedded.items():
                chunks[view].setdefault(kind, []).append(
                    F.normalize(emb.float(), dim=1).cpu().numpy())
    out: dict[str, dict[str, np.ndarray]] = {}
    for view in views:
        if not chunks[view]:
            dims = _embedding_dims(model, cfg)
            out[view] = {k: np.zeros((0, dims.get(k, cfg.model.embed_dim)), np.float32)
                         for k in RETRIEVAL_MODES}
        else:
            out[view] = {k: np.concatenate(parts).astype(np.float32)
                         for k, parts in chunks[view].items()}
    return out


def _embedding_dims(model: torch.nn.Module, cfg: Config) -> dict[str, int]:
    features = getattr(getattr(model, "backbone", None), "num_features", None)
    if not features:
        return {}
    backbone = features * (2 if cfg.model.tokens == "both" else 1)
    return {"neck": cfg.model.embed_dim, "backbone": backbone,
            "both": cfg.model.embed_dim + backbone}


def combine_views(per_view: dict[str, np.ndarray], views: Sequence[str]) -> np.ndarray:
    """Mean of the chosen views' normalised embeddings, re-normalised (a view does not
    dominate by its norm)."""
    missing = [v for v in views if v not in per_view]
    if not views or missing:
        raise ValueError(f"views {missing or list(views)} not embedded; have {sorted(per_view)}")
    total = np.sum([l2_normalize(per_view[v].astype(np.float64)) for v in views], axis=0)
    return l2_normalize(total).astype(np.float32)


def embed_all(model: torch.nn.Module, paths: Sequence[Path], cfg: Config,
              device: str, load: ImageLoader | None = None) -> dict[str, np.ndarray]:
    """Every retrieval embedding of the images with the views of `embed.tta` combined."""
    per_view = embed_views(model, paths, cfg, device, load, cfg.embed.tta)
    return {kind: combine_views({v: per_view[v][kind] for v in per_view}, cfg.embed.tta)
            for kind in per_view[cfg.embed.tta[0]]}


def embed_images(model: torch.nn.Module, paths: Sequence[Path], cfg: Config,
                 device: str, load: ImageLoader | None = None) -> np.ndarray:
    """The retrieval embedding `model.retrieval` chose, (N, D) float32, L2-normalised."""
    return embed_all(model, paths, cfg, device, load)[cfg.model.retrieval]


ENSEMBLE_MODES = ("mean", "concat")  # of embeddings; submit.ensemble adds "similarity"
# The retrieval embedding chosen at submission time; empty: each experiment's own.
SUBMIT_RETRIEVAL = choices("submit.retrieval")


def ensemble_embeddings(embeddings: Sequence[np.ndarray], mode: str = "mean",
                        weights: Sequence[float] | None = None) -> np.ndarray:
    """One embedding per image from several models' embeddings of the same images.

    `mean`: weighted average of the L2-normalised embeddings, re-normalised. Cheap and common;
    it assumes the models' spaces roughly agree (fold models share their initialisation), and
    needs equal dimensions. `concat`: the normalised embeddings side by side, each scaled by
    sqrt(weight / total), re-normalised: its cosine similarity is exactly the weighted mean of
    the models' cosine similarities, whatever their spaces or dimensions.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble mode must be one of {', '.join(ENSEMBLE_MODES)}; got {mode!r}")
    if not embeddings:
        raise ValueError("no embeddings to ensemble")
    weights = [1.0] * len(embeddings) if weights is None or not len(weights) else list(weights)
    if len(weights) != len(embeddings) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one weight >= 0 per embedding ({len(embeddings)}), not all 0; "
                         f"got {weights}")
    rows = {len(e) for e in embeddings}
    shapes = {e.shape for e in embeddings}
    if len(rows) != 1 or (mode == "mean" and len(shapes) != 1):
        raise ValueError(f"embeddings to ensemble differ in shape: {sorted(shapes)}"
                         + (" (submit.ensemble=concat takes any dimensions)"
                            if len(rows) == 1 else ""))
    normed = [l2_normalize(e.astype(np.float64)) for e in embeddings]
    if not all(np.isfinite(e).all() for e in normed):
        raise ValueError("embeddings contain NaN or infinite values")
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    if mode == "mean":
        combined = np.tensordot(share, np.stack(normed), axes=1)
    else:
        combined = np.concatenate([np.sqrt(w) * e for w, e in zip(share, normed, strict=True)],
                                  axis=1)
    return l2_normalize(combined).astype(np.float32)


# --------------------------------------------------------------------------- fold models


def fold_config(cfg: Config, exp: str, fold: int | str) -> tuple[Config, Path]:
    """The config a fold's model is read with: its own saved recipe (how it was trained: the
    model, normalisation, size, resize and alpha modes, the cache settings that decide pixels)
    and today's runtime and after-training settings, `submit.retrieval` when set; and its
    weights file, read from the experiment's model folder (`layout.model_dir`)."""
    directory = layout.fold_dir(layout.model_dir(cfg, exp), fold)
    weights, saved = directory / layout.MODEL_WEIGHTS, directory / layout.RUN_CONFIG
    if not weights.is_file() or not saved.is_file():
        raise FileNotFoundError(f"experiment {exp!r}: no trained model in {directory} "
                                f"({layout.MODEL_WEIGHTS} and {layout.RUN_CONFIG}); train it "
                                f"with bash train.sh exp={exp} fold={fold}, or choose "
                                "submit.folds=...")
    merged, differing = with_recipe_of(load_saved_config(saved), cfg)
    merged.exp = exp
    if cfg.submit.retrieval:  # the retrieval embedding is a choice made after training
        merged.model.retrieval = cfg.submit.retrieval
    if differing:
        say_once(f"note: experiment {exp!r} is read with the recipe it was trained with, not "
                 f"today's: {', '.join(differing)}")
    return merged, weights


@dataclass(frozen=True)
class FoldEmbeddings:
    """One fold model's embeddings of the test images (and of the training images, when
    asked), every view kept apart, with what the prototypes need from the model."""

    exp: str
    kind: str  # the retrieval embedding the fold submits (`model.retrieval`)
    test: dict[str, np.ndarray]  # {view: (N, D)}, in the order of the test names
    head: np.ndarray  # the ArcFace head's weight
    subcenters: int
    train: dict[str, np.ndarray] | None = None  # {view: (M, D)}, in train.csv's order
    train_labels: np.ndarray | None = None


def embed_fold(cfg: Config, exp: str, fold: int | str, views: tuple[str, ...],
               with_train: bool, test_names: list[str], files: layout.DataFiles,
               device: str) -> FoldEmbeddings:
    """One fold model's test images (and training images, `with_train`) under every view,
    kept apart, with what the prototypes need from the model."""
    fold_cfg, weights = fold_config(cfg, exp, fold)
    # Test images are prepared the way this fold's model saw its training images.
    images = prepare_images(fold_cfg, test_names, files.test, "test images")
    model = load_trained_model(fold_cfg, weights)
    print(f"embedding {len(images.paths)} test images with {weights}, views {', '.join(views)}")
    kind = fold_cfg.model.retrieval
    test = {v: e[kind] for v, e in embed_views(model, images.paths, fold_cfg, device,
                                               images.load, views, "test images").items()}
    for emb in test.values():
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if len(bad):
            raise DataError(f"{weights}: the model's embedding of test image "
                            f"{test_names[bad[0]]!r} is not finite ({len(bad)} image(s)); the "
                            "weights are damaged or the fold diverged: train it again")
    head = model.head.weight.detach().float().cpu().numpy()
    train, train_labels = None, None
    if with_train:
        train_df = read_train_csv(files.train)
        images = prepare_images(fold_cfg, train_df["filename"], files.train, "train images")
        print(f"embedding {len(images.paths)} training images (closed-set extras)")
        train = {v: e[kind] for v, e in embed_views(model, images.paths, fold_cfg, device,
                                                    images.load, views,
                                                    "training images").items()}
        train_labels = train_df["ground_truth"].to_numpy().astype(str)
    return FoldEmbeddings(exp, kind, test, head, fold_cfg.model.subcenters, train,
                          train_labels)


VIEWS_VERSION = 2  # bumped whenever a view's definition changes: saved view embeddings go stale


@dataclass(frozen=True)
class OofViews:
    """A fold's saved view embeddings (`ensure_oof_views`): its validation images, and its
    training images where the folds are closed, each under every view."""

    kind: str  # the retrieval embedding
    views: list[str]
    digest: str  # of the weights, the images' content and the versions: what it was made from
    val_labels: np.ndarray
    val_filenames: np.ndarray
    train_labels: np.ndarray  # empty unless the folds are closed
    train_filenames: np.ndarray
    val: dict[str, np.ndarray]  # {view: (N, D)}
    train: dict[str, np.ndarray]  # {view: (M, D)}; empty unless the folds are closed
    head_weight: np.ndarray  # the ArcFace head: weight, subcenters, the classes it scores
    subcenters: int
    classes: np.ndarray


def read_oof_views(path: Path) -> OofViews:
    """A fold's saved view embeddings, as `ensure_oof_views` wrote them."""
    with np.load(path, allow_pickle=False) as data:
        views = [str(v) for v in data["views"]]
        return OofViews(
            kind=str(data["kind"]), views=views, digest=str(data["digest"]),
            val_labels=data["val_labels"], val_filenames=data["val_filenames"],
            train_labels=data["train_labels"], train_filenames=data["train_filenames"],
            val={v: data[f"val.{v}"] for v in views},
            train={v: data[f"train.{v}"] for v in views if f"train.{v}" in data.files},
            head_weight=data["head_weight"], subcenters=int(data["subcenters"]),
            classes=data["classes"])


def closed_share(folds_df, fold: int) -> float:
    """Share of a fold's validation identities that also have training images (closed folds:
    1; grouped folds: 0)."""
    is_val = (folds_df["fold"] == fold).to_numpy()
    val_ids = set(folds_df.loc[is_val, "ground_truth"])
    train_ids = set(folds_df.loc[~is_val, "ground_truth"])
    return len(val_ids & train_ids) / max(1, len(val_ids))


def ensure_oof_views(cfg: Config, exp: str, fold: int, views: Sequence[str],
                     device: str) -> OofViews:
    """The fold's validation images (and, with closed folds, its training images) embedded
    by the fold's model under every view asked, read from the work folder's
    `fold<k>/oof_views.npz` when it is there for the same weights (by content), kind and
    views, else made and saved (atomically)."""
    fold_cfg, weights = fold_config(cfg, exp, fold)
    kind = fold_cfg.model.retrieval
    views = list(dict.fromkeys(["orig", *views]))
    path = layout.oof_views_path(cfg, exp, fold)
    digest = views_digest(cfg, fold_cfg, weights)
    if path.is_file():
        saved = read_oof_views(path)
        if saved.digest == digest and saved.kind == kind and set(views) <= set(saved.views):
            return saved
    arrays = _embed_fold_views(fold_cfg, weights, exp, fold, views, device)
    arrays.update(kind=np.array(kind), views=np.array(views), digest=np.array(digest))
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return read_oof_views(path)


def views_digest(cfg: Config, fold_cfg: Config, weights: Path) -> str:
    """What saved view embeddings were made from: the weights and the images by their
    content (another round's same-named files, or a file rewritten in place, are embedded
    again), the decoder and the views' definitions."""
    files = layout.data_files(fold_cfg)
    names = read_train_csv(files.train)["filename"]
    sources = resolve_image_paths(Path(fold_cfg.data.dir), names, files.train)
    images = ids_digest(require_ids(cfg, sources))
    return f"{weights_digest(cfg, weights)}:{VIEWS_VERSION}:{DECODER_VERSION}:{images}"


def _embed_fold_views(fold_cfg: Config, weights: Path, exp: str, fold: int,
                      views: list[str], device: str) -> dict[str, np.ndarray]:
    files = layout.data_files(fold_cfg)
    train_df = read_train_csv(files.train)
    folds_df = experiment_folds(fold_cfg, layout.model_dir(fold_cfg, exp), train_df)
    is_val = (folds_df["fold"] == fold).to_numpy()
    images = prepare_images(fold_cfg, train_df["filename"], files.train, "train images")
    model = load_trained_model(fold_cfg, weights)
    splits = {"val": np.flatnonzero(is_val)}
    if closed_share(folds_df, fold) >= 0.5:  # the training images: closed-set extras
        splits["train"] = np.flatnonzero(~is_val)
    kind = fold_cfg.model.retrieval
    arrays: dict[str, np.ndarray] = {}
    names, labels = train_df["filename"].to_numpy(), train_df["ground_truth"].to_numpy()
    for split in ("val", "train"):
        idx = splits.get(split, np.zeros(0, dtype=np.int64))
        arrays[f"{split}_filenames"] = names[idx].astype(str)
        arrays[f"{split}_labels"] = labels[idx].astype(str)
        if split in splits:
            print(f"{exp} fold {fold}: embedding {len(idx)} {split} images, views "
                  f"{', '.join(views)}")
            per_view = embed_views(model, [images.paths[i] for i in idx], fold_cfg, device,
                                   images.load, views, f"{exp} fold {fold} {split}")
            for view in views:
                arrays[f"{split}.{view}"] = per_view[view][kind]
    arrays["head_weight"] = model.head.weight.detach().float().cpu().numpy()
    arrays["subcenters"] = np.array(fold_cfg.model.subcenters)
    metrics_path = weights.parent / layout.FOLD_METRICS
    classes = read_json(metrics_path).get("classes", []) if metrics_path.is_file() else []
    arrays["classes"] = np.array([str(c) for c in classes])
    return arrays


def require_finished_folds(cfg: Config, exp: str) -> list[int]:
    """The finished validation folds of an experiment's model folder; an error when none."""
    exp_dir = layout.model_dir(cfg, exp)
    folds = layout.finished_folds(exp_dir)
    if not folds:
        raise FileNotFoundError(f"{exp_dir}: no finished validation folds (fold<k>/"
                                f"{layout.FOLD_METRICS})")
    return folds


def main(argv: list[str]) -> None:
    """`python -m jaguar_reid.embed exp=NAME [exps=a,b] [tune.views=[...]]`: embed every
    finished fold's validation images (and training images, with closed folds) under orig,
    the candidate views of `tune.views` and `embed.tta`, for `python -m jaguar_reid.tune`."""
    cfg = load_config(argv)
    device = resolve_device(cfg.device)
    views = [*cfg.embed.tta, *cfg.tune.views]
    for exp in experiment_names(cfg):
        for fold in require_finished_folds(cfg, exp):
            saved = ensure_oof_views(cfg, exp, fold, views, device)
            print(f"{layout.oof_views_path(cfg, exp, fold)}: {len(saved.val_labels)} "
                  f"validation, {len(saved.train_labels)} training images, views "
                  f"{', '.join(saved.views)}")
