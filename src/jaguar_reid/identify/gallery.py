"""The labelled photos a new photo is compared with: every training image of the experiment,
embedded by each fold model, saved with the calibration (`identify_gallery.npz`, carried by
the export) with a small thumbnail of each, so that identification needs neither the
training images nor a GPU; and the labelled photos a user adds (`identify.gallery`).

A fold model's embeddings of the training images come from the tuning's saved view
embeddings where they exist (`retrieval.embedding.ensure_oof_views`: the validation images,
and the training images of closed folds); the training images of grouped folds are embedded
here and kept beside them (`fold<k>/identify_views.npz`), keyed by the same digest (weights
and images by content, decoder and views).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import Config
from jaguar_reid.data.csv_tables import (
    IMAGE_EXTENSIONS,
    read_train_csv,
    resolve_image_paths,
)
from jaguar_reid.identify import files
from jaguar_reid.io_utils import UserInputError, atomic_path

THUMB_SIDE = 128  # px, long side of the thumbnails kept with the gallery
THUMB_QUALITY = 80  # JPEG


class GalleryError(UserInputError):
    """A gallery that cannot be read or used; the message names the file or folder."""


@dataclass(frozen=True, eq=False)
class FoldImages:
    """Every training image of the experiment's data, embedded by one fold model (the views
    combined), in train.csv's order; `is_val`: the fold's validation images."""

    filenames: np.ndarray
    labels: np.ndarray
    is_val: np.ndarray
    embeddings: np.ndarray


@dataclass(frozen=True, eq=False)
class Gallery:
    """Labelled photos, each embedded by every fold model (`embeddings[i]` by fold
    `folds[i]`, whose weights have digest `digests[i]`)."""

    names: np.ndarray  # a train.csv file name, or the path of a photo added by identify.gallery
    labels: np.ndarray
    folds: tuple[str, ...]
    digests: tuple[str, ...]
    views: tuple[str, ...]
    embeddings: tuple[np.ndarray, ...]
    thumbs: tuple[bytes, ...]  # JPEG, long side THUMB_SIDE; b"" where none could be made
    added: np.ndarray  # True for the photos added by identify.gallery (names are paths)
    run_id: str = ""  # the calibrate run that wrote it, also in its identify.json

    def __len__(self) -> int:
        return len(self.names)

    def extended(self, names: Sequence[str], labels: Sequence[str],
                 embeddings: Sequence[np.ndarray], thumbs: Sequence[bytes]) -> Gallery:
        """The gallery with more photos (paths), embedded by the same fold models."""
        return replace(
            self, names=np.r_[self.names, np.asarray(names, dtype=str)],
            labels=np.r_[self.labels, np.asarray(labels, dtype=str)],
            embeddings=tuple(np.concatenate([e, n]).astype(np.float32)
                             for e, n in zip(self.embeddings, embeddings, strict=True)),
            thumbs=(*self.thumbs, *thumbs), added=np.r_[self.added, np.ones(len(names), bool)])


# --------------------------------------------------------------------------- embedding


def fold_images(cfg: Config, exp: str, fold: int, views: Sequence[str],
                device: str) -> FoldImages:
    """Every training image embedded by fold `fold`'s model of `exp` under `views`."""
    from jaguar_reid.data.splits import experiment_folds
    from jaguar_reid.retrieval.embedding import combine_views, ensure_oof_views, fold_config

    saved = ensure_oof_views(cfg, exp, fold, views, device)
    fold_cfg, _ = fold_config(cfg, exp, fold)
    train_df = read_train_csv(layout.data_files(fold_cfg).train)
    folds_df = experiment_folds(fold_cfg, layout.model_dir(fold_cfg, exp), train_df)
    is_val = (folds_df["fold"] == fold).to_numpy()
    names = train_df["filename"].to_numpy().astype(str)
    emb = {str(n): e for n, e in zip(saved.val_filenames, combine_views(saved.val, views),
                                     strict=True)}
    if saved.train:
        emb |= dict(zip(saved.train_filenames.astype(str), combine_views(saved.train, views),
                        strict=True))
    else:  # grouped folds: the tuning never embeds their training images
        rest = [str(n) for n in names[~is_val]]
        emb |= dict(zip(rest, training_views(cfg, exp, fold, rest, views, device, saved.digest),
                        strict=True))
    missing = [n for n in names if n not in emb]
    if missing:
        raise GalleryError(f"experiment {exp!r} fold {fold}: {len(missing)} training image(s) "
                           f"were not embedded (e.g. {missing[0]!r}); train.csv changed since: "
                           "run python -m jaguar_reid.embed again")
    stacked = np.stack([emb[n] for n in names]).astype(np.float32)
    broken = ~np.isfinite(stacked).all(axis=1)
    if broken.any():  # every threshold and rate fitted on them would be NaN
        raise GalleryError(f"experiment {exp!r} fold {fold}: its model embeds "
                           f"{int(broken.sum())} of {len(names)} training images as NaN or "
                           f"inf (e.g. {str(names[broken][0])!r}); the weights are broken: train "
                           "the fold again")
    return FoldImages(names, train_df["ground_truth"].to_numpy().astype(str), is_val, stacked)


def training_views(cfg: Config, exp: str, fold: int, names: list[str], views: Sequence[str],
                   device: str, digest: str) -> np.ndarray:
    """The fold's training images `names` embedded by its model (views combined), read from
    `fold<k>/identify_views.npz` in the work folder when it was made from the same weights,
    images and views (`digest`), else made and saved."""
    from jaguar_reid.data.image_cache import prepare_images
    from jaguar_reid.retrieval.embedding import combine_views, embed_views, fold_config
    from jaguar_reid.training.model import load_trained_model

    path = layout.fold_dir(layout.work_dir(cfg, exp), fold) / files.TRAIN_VIEWS
    fold_cfg, weights = fold_config(cfg, exp, fold)
    kind = fold_cfg.model.retrieval  # submit.retrieval may choose another than training's
    key = f"{digest}|{kind}|{'+'.join(views)}"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) == key and data["names"].astype(str).tolist() == names:
                return data["embeddings"]
    files_ = layout.data_files(fold_cfg)
    images = prepare_images(fold_cfg, names, files_.train, "train images")
    print(f"{exp} fold {fold}: embedding {len(names)} training images for identification")
    per_view = embed_views(load_trained_model(fold_cfg, weights), images.paths, fold_cfg,
                           device, images.load, views)
    emb = combine_views({v: per_view[v][kind] for v in per_view}, views)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, key=np.array(key), names=np.array(names, dtype=str), embeddings=emb)
    return emb


def thumbnail_jpeg(path: Path | None, cfg: Config, side: int = THUMB_SIDE) -> bytes:
    """A small JPEG of the photo as the model saw it (alpha mode applied), or b""."""
    from PIL import Image

    from jaguar_reid.reporting.reading import thumbnail

    small = thumbnail(path, cfg, side)
    if small is None:
        return b""
    out = io.BytesIO()
    Image.fromarray(small).save(out, "JPEG", quality=THUMB_QUALITY)
    return out.getvalue()


def build_gallery(cfg: Config, exp: str, folds: Sequence[int], views: Sequence[str],
                  device: str) -> Gallery:
    """The experiment's training images embedded by each of its fold models `folds`."""
    from jaguar_reid.retrieval.embedding import fold_config
    from jaguar_reid.training.digest import weights_digest

    per_fold = [fold_images(cfg, exp, f, views, device) for f in folds]
    first = per_fold[0]
    digests = tuple(weights_digest(cfg, fold_config(cfg, exp, f)[1]) for f in folds)
    files_ = layout.data_files(cfg)
    paths = resolve_image_paths(files_.root, first.filenames, files_.train)
    print(f"{exp}: thumbnails of {len(paths)} gallery photos")
    thumbs = tuple(thumbnail_jpeg(p, cfg) for p in paths)
    return Gallery(first.filenames, first.labels, tuple(str(f) for f in folds), digests,
                   tuple(views), tuple(f.embeddings for f in per_fold), thumbs,
                   np.zeros(len(first.filenames), bool))


# --------------------------------------------------------------------------- the file


def save_gallery(gallery: Gallery, path: Path) -> None:
    blob = np.frombuffer(b"".join(gallery.thumbs), dtype=np.uint8)
    offsets = np.cumsum([0, *(len(t) for t in gallery.thumbs)])
    arrays = {f"embeddings_{i}": e for i, e in enumerate(gallery.embeddings)}
    np.savez(path, names=gallery.names.astype(str), labels=gallery.labels.astype(str),
             folds=np.array(gallery.folds, dtype=str), digests=np.array(gallery.digests, str),
             views=np.array(gallery.views, dtype=str), thumbs=blob, offsets=offsets,
             run_id=np.array(gallery.run_id), **arrays)


def read_gallery(path: Path) -> Gallery:
    """A gallery `save_gallery` wrote; one line naming the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            folds = tuple(str(f) for f in data["folds"])
            blob, offsets = data["thumbs"].tobytes(), data["offsets"]
            names = data["names"].astype(str)
            gallery = Gallery(names, data["labels"].astype(str), folds,
                              tuple(str(d) for d in data["digests"]),
                              tuple(str(v) for v in data["views"]),
                              tuple(data[f"embeddings_{i}"] for i in range(len(folds))),
                              tuple(blob[a:b] for a, b in zip(offsets[:-1], offsets[1:],
                                                               strict=True)),
                              np.zeros(len(names), bool),
                              str(data["run_id"]) if "run_id" in data else "")
    except (OSError, ValueError, KeyError) as exc:
        raise GalleryError(f"{path}: not a gallery of python -m jaguar_reid.identify.calibrate "
                           f"({exc}); run the calibration again") from None
    sizes = {len(gallery.labels), len(gallery.thumbs), *(len(e) for e in gallery.embeddings)}
    if sizes != {len(names)} or len(gallery.digests) != len(folds) or not folds:
        raise GalleryError(f"{path}: its arrays disagree in length; run the calibration again")
    return gallery


# --------------------------------------------------------------------------- added photos


def _note_left_out(folders: list[Path], loose: list[Path],
                   out: list[tuple[Path, str]]) -> None:
    """Name what a gallery folder holds that is not FOLDER/<individual>/<photo>."""
    for item in loose:
        print(f"identify.gallery: left out {item}: a photo outside an <individual>/ folder "
              "(whose individual would it be?)")
    found = {individual for _, individual in out}
    for sub in folders:
        if sub.name not in found:
            print(f"identify.gallery: left out {sub}/: no photo in it")


def added_photos(spec: str) -> list[tuple[Path, str]]:
    """(photo, individual) of `identify.gallery`: a folder of `<individual>/` folders (photos
    anywhere beneath each), or a CSV of filename,ground_truth whose names are found beneath
    the CSV's folder."""
    path = Path(spec)
    if path.is_dir():
        items = [i for i in sorted(path.iterdir()) if not i.name.startswith(".")]
        folders = [i for i in items if i.is_dir()]
        out = [(p, sub.name) for sub in folders for p in sorted(sub.rglob("*"))
               if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
               and not p.name.startswith(".")]
        _note_left_out(folders, [i for i in items if i.is_file()
                                 and i.suffix.lower() in IMAGE_EXTENSIONS], out)
        if not out:
            raise GalleryError(f"identify.gallery {spec}: no photo in a <individual>/ folder "
                               "beneath it (expected FOLDER/<individual>/<photo>)")
        return out
    if path.is_file():
        table = read_train_csv(path)
        photos = resolve_image_paths(path.parent, table["filename"], path)
        return list(zip(photos, table["ground_truth"].astype(str), strict=True))
    raise GalleryError(f"identify.gallery {spec}: no such folder or CSV file")
