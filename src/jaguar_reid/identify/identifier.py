"""Identification as a Python object: load the models, the gallery and the calibration once,
then identify any number of photos.

    from jaguar_reid.identify import Identifier
    identifier = Identifier.load("exports/dogs")                    # an export or experiment
    for record in identifier.identify(["photo1.jpg", "camera7/"]):  # files and folders
        print(record.photo, record.verdict, record.identity, record.candidates[0])

`jaguar-reid identify` is this object plus the CSV and HTML writers. For each photo: every
fold model embeds it (the calibration's views) and gives each known individual a similarity
(`identify.score` at calibration) and the photo a known-vs-new score, exactly as out of fold;
the fold models' similarities and scores are averaged (the mean keeps the calibrated scale);
the calibration turns them into probabilities and the verdict "known" (the top candidate
named) or "new individual". A photo
that cannot be read is an `Identification` with verdict "error" and its reason; the others go
on. Photos are read and embedded `embed.batch_size` at a time, with a progress bar.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import Config, load_config, load_saved_config, with_recipe_of
from jaguar_reid.identify import files
from jaguar_reid.identify.calibration import Calibration
from jaguar_reid.identify.candidates import (
    best_photo,
    decision_features,
    identity_codes,
    identity_scores,
    prototype_scores,
    softmax,
    top_k,
)
from jaguar_reid.identify.gallery import (
    Gallery,
    GalleryError,
    added_photos,
    read_gallery,
    thumbnail_jpeg,
)
from jaguar_reid.identify.photos import Refused, collect_photos, read_photos
from jaguar_reid.io_utils import UserInputError, read_json, resolve_device, say_once

KNOWN, NEW, ERROR = "known", "new", "error"  # the verdicts


class IdentifyError(UserInputError):
    """Identification cannot start: no calibration, another model's gallery, a bad key."""


@dataclass(frozen=True, eq=False)
class Candidate:
    """One known individual a photo may show."""

    identity: str
    probability: float  # P(it is this individual); see `Identifier.probabilities_with_new`
    similarity: float  # the individual's similarity to the photo (cosine, fold models' mean)
    gallery_photo: str  # its closest gallery photo (a train.csv name, or an added photo's path)
    gallery_index: int  # that photo's row in the gallery
    inliers: int | None = None  # with identify.local: keypoint matches that fit one geometry
    matches: tuple[np.ndarray, np.ndarray] | None = None  # their (x, y) in each file's pixels


@dataclass(frozen=True, eq=False)
class Identification:
    """What one photo shows: `verdict` known (`identity` named), new, or error (`error`)."""

    photo: Path
    verdict: str
    identity: str | None = None
    new_probability: float | None = None  # P(a new individual); None where unmeasured
    known_score: float | None = None  # the calibrated known-vs-new score (threshold: known)
    candidates: tuple[Candidate, ...] = ()
    error: str | None = None


@dataclass(frozen=True, eq=False)
class FoldModel:
    fold: str
    cfg: Config  # the fold's own recipe, loaders in this process
    model: Any  # the trained torch module


def _as_text(value: Any) -> str:
    """A Python value as the command line writes it (`key=value`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """`{"device": "cpu", "identify": {"top_k": 3}, "local.top_b": 5}` -> key=value texts."""
    out = []
    for name, value in overrides.items():
        if isinstance(value, Mapping):
            out += override_args({f"{name}.{k}": v for k, v in value.items()})
        else:
            out.append(f"{name}={_as_text(value)}")
    return out


def identify_config(args: Sequence[str]) -> Config:
    """The config of identification: with no `config=`, the experiment's own saved config
    (found by `models=` / `exp=`) under the command line's keys, so an export identifies
    with the settings it was trained and calibrated with."""
    args = list(args)
    cfg = load_config(args)
    if any(a.startswith("config=") for a in args):
        return cfg
    saved = layout.model_dir(cfg) / layout.RUN_CONFIG
    if not saved.is_file():
        return cfg
    # The saved recipe; this machine's folders and every later choice from today's keys (an
    # export's config names the training machine's output_dir, whose files are not this one's).
    theirs = load_saved_config(saved)
    merged, differing = with_recipe_of(theirs, cfg)
    if not any(a.startswith("exp=") for a in args):  # models= names the experiment's folder
        merged.exp = theirs.exp
    if differing:
        say_once(f"note: experiment {cfg.exp!r} identifies with the recipe it was trained "
                 f"with, not today's: {'; '.join(differing)}")
    return merged


class Identifier:
    """The fold models, the gallery and the calibration of one experiment, loaded once."""

    def __init__(self, cfg: Config, calibration: Calibration, gallery: Gallery,
                 models: Sequence[FoldModel], device: str) -> None:
        self.cfg, self.calibration, self.gallery = cfg, calibration, gallery
        self.models, self.device = list(models), device
        self.classes, self.codes = identity_codes(gallery.labels)
        self._find: Callable[[str], Path | None] | None = None  # training photos by name

    # ----------------------------------------------------------------------- loading

    @classmethod
    def load(cls, models: str | Path | None = None, *, exp: str | None = None,
             config: str | Path | None = None, **overrides: Any) -> Identifier:
        """From an exported or trained experiment folder `models` (or a folder of `<exp>/`
        folders, with `exp`); keys as `device="cpu"`, `identify={"top_k": 3}` or
        `**{"identify.top_k": 3}`. A training folder without the export's manifest needs
        `models_verify=False`; with `models=None`, `exp` is read from `<output_dir>/<exp>/`."""
        args = [f"models={models}"] if models is not None else []
        args += [f"exp={exp}"] if exp else []
        args += [f"config={config}"] if config else []
        return cls.from_config(identify_config(args + override_args(overrides)))

    @classmethod
    def from_config(cls, cfg: Config) -> Identifier:
        from jaguar_reid.manifest import verify_manifest

        verify_manifest(layout.model_dir(cfg), required=bool(cfg.models) and cfg.models_verify)
        calibration, gallery = read_calibrated(cfg)
        device = resolve_device(cfg.device)
        _note_settings(cfg, calibration)
        cfg = fixed_by_calibration(cfg, calibration)
        identifier = cls(cfg, calibration, gallery, load_fold_models(cfg, gallery), device)
        if cfg.identify.gallery:
            identifier = identifier.with_added(added_photos(cfg.identify.gallery))
        if cfg.identify.local:
            from jaguar_reid.retrieval.verify import check_learned

            check_learned(cfg)
        return identifier

    def with_added(self, photos: Sequence[tuple[Path, str]]) -> Identifier:
        """The same identifier with more labelled photos in its gallery (unreadable ones
        named and left out)."""
        paths = [p for p, _ in photos]
        per_fold, refused = self.embed(paths)
        for message in refused.values():
            print(f"identify.gallery: skipped {message}")
        kept = [i for i, p in enumerate(paths) if p not in refused]
        labels = [photos[i][1] for i in kept]
        thumbs = [thumbnail_jpeg(paths[i], self.cfg) for i in kept]
        gallery = self.gallery.extended([str(paths[i]) for i in kept], labels, per_fold, thumbs)
        print(f"identify.gallery: {len(kept)} photos of {len(set(labels))} individuals added "
              f"({len(set(labels) - set(self.classes))} not in the training images)")
        return Identifier(self.cfg, self.calibration, gallery, self.models, self.device)

    @property
    def probabilities_with_new(self) -> bool:
        """Whether a candidate's probability counts the chance of a new individual (fitted
        with new-individual queries); else it is P(individual | a known one)."""
        return self.calibration.decision.method == "logistic"

    # ----------------------------------------------------------------------- identifying

    def identify(self, photos: str | Path | Iterable[str | Path], progress: bool = True
                 ) -> list[Identification]:
        """One `Identification` per photo (folders expanded), in order."""
        from tqdm import tqdm

        paths = collect_photos([photos] if isinstance(photos, (str, Path)) else photos)
        batch = self.cfg.embed.batch_size
        out: list[Identification] = []
        with tqdm(total=len(paths), unit="photo", desc="identify", disable=not progress) as bar:
            for start in range(0, len(paths), batch):
                chunk = paths[start:start + batch]
                out += self.identify_batch(chunk)
                bar.update(len(chunk))
        return out

    def identify_batch(self, paths: Sequence[Path]) -> list[Identification]:
        per_fold, refused = self.embed(paths)
        good = [p for p in paths if p not in refused]
        decided = iter(self.decide(per_fold, good) if good else [])
        return [Identification(p, ERROR, error=refused[p]) if p in refused else next(decided)
                for p in paths]

    def embed(self, paths: Sequence[Path]) -> tuple[list[np.ndarray], dict[Path, str]]:
        """Each fold model's embeddings (views of the calibration combined) of the readable
        photos, in order, and the reason of each unreadable one."""
        from jaguar_reid.data.images import image_loader
        from jaguar_reid.retrieval.embedding import combine_views, embed_views

        views = list(self.calibration.views)
        read: dict[str, dict[Path, object]] = {}
        per_fold, refused = [], {}
        for fm in self.models:
            loader = image_loader(fm.cfg)
            key = repr(sorted(loader.keywords.items()))  # one read per input recipe
            if key not in read:
                read[key] = dict(zip(paths, read_photos(paths, loader), strict=True))
            images = read[key]
            refused |= {p: im.message for p, im in images.items() if isinstance(im, Refused)}
            good = [p for p in paths if not isinstance(images[p], Refused)]
            emb = embed_views(fm.model, good, fm.cfg, self.device,
                              lambda path, seed=None, images=images: images[path], views)
            per_fold.append((good, combine_views(
                {v: e[fm.cfg.model.retrieval] for v, e in emb.items()}, views)))
        good = [p for p in paths if p not in refused]
        return [_rows_of(kept, emb, good) for kept, emb in per_fold], refused

    def decide(self, per_fold: Sequence[np.ndarray], paths: Sequence[Path]
               ) -> list[Identification]:
        """The calibrated answer for photos embedded by every fold model. Each fold model's
        similarities and known-vs-new score are those the calibration measured (one model per
        query); several models' are averaged, which keeps their calibrated scale."""
        cal, n_ids = self.calibration, len(self.classes)
        cos = [e.astype(np.float64) @ g.T for e, g in
               zip(per_fold, self.gallery.embeddings, strict=True)]
        if cal.score == "prototype":
            per_model = [prototype_scores(e, g, self.codes, n_ids) for e, g in
                         zip(per_fold, self.gallery.embeddings, strict=True)]
        else:
            per_model = [identity_scores(c, self.codes, n_ids) for c in cos]
        scores = np.mean(per_model, axis=0)
        z = np.mean([cal.decision.score(decision_features(s)) for s in per_model], axis=0)
        known = cal.decision.known_probability(z, self.cfg.identify.new_share)
        prob = softmax(scores, cal.temperature)
        if known is not None:
            prob = prob * known[:, None]
        best = best_photo(np.mean(cos, axis=0), self.codes, n_ids)
        order = top_k(scores, self.cfg.identify.top_k)
        out = []
        for i, path in enumerate(paths):
            cands = tuple(Candidate(str(self.classes[c]), float(prob[i, c]),
                                    float(scores[i, c]), str(self.gallery.names[best[i, c]]),
                                    int(best[i, c])) for c in order[i])
            if self.cfg.identify.local:
                cands = self.verified(path, cands)
            named = bool(z[i] >= cal.threshold)
            out.append(Identification(path, KNOWN if named else NEW,
                                      cands[0].identity if named else None,
                                      None if known is None else float(1 - known[i]),
                                      float(z[i]), cands))
        return out

    # ----------------------------------------------------------------------- local features

    def gallery_file(self, index: int) -> Path | None:
        """The file of gallery photo `index`: an added photo's path, or a training image
        found beneath data.dir (None where the training images are not on this machine)."""
        if self.gallery.added[index]:
            return Path(self.gallery.names[index])
        if self._find is None:
            from jaguar_reid.reporting.reading import image_finder

            self._find, root = image_finder([self.cfg.data.dir])
            if root is None:
                say_once(f"identify.local: data.dir {self.cfg.data.dir!r} is not on this "
                         "machine, so the training photos' keypoints cannot be matched")
        return self._find(str(self.gallery.names[index]))

    def verified(self, photo: Path, cands: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        """The candidates with the keypoint matches of the photo and each one's closest
        gallery photo (`local.*`; inliers None where that photo's file is not here)."""
        from dataclasses import replace

        from jaguar_reid.retrieval import verify

        ours = verify.image_features(self.cfg, photo)
        match = verify.matcher(self.cfg)
        out = []
        for cand in cands:
            path = self.gallery_file(cand.gallery_index)
            if path is None:
                out.append(cand)
                continue
            (theirs,) = verify.features_for(self.cfg, [path])
            xy_ours, xy_theirs = match(ours, theirs)
            out.append(replace(cand, inliers=len(xy_ours), matches=(xy_ours, xy_theirs)))
        return tuple(out)


def _rows_of(kept: Sequence[Path], emb: np.ndarray, good: Sequence[Path]) -> np.ndarray:
    """`emb` (one row per path of `kept`) in the order of `good`: a fold reads a photo that
    another fold's recipe refused, and only the photos every fold read are identified."""
    row = {p: i for i, p in enumerate(kept)}
    return emb[[row[p] for p in good]] if len(good) else emb[:0]


def read_calibrated(cfg: Config) -> tuple[Calibration, Gallery]:
    """The calibration and its gallery, checked to come from one calibrate run."""
    from jaguar_reid.commit import finish_commits, no_commit_running

    path = files.read(cfg, files.CALIBRATION)
    writable = path.parent.is_dir() and os.access(path.parent, os.W_OK)
    if writable:
        finish_commits(path.parent, files.COMMIT_NAME)  # a calibrate killed while renaming
    _note_where(cfg, path)
    calibration, gallery = _read_pair(cfg, path)
    if gallery.run_id != calibration.run_id and writable:
        with no_commit_running(path.parent, files.COMMIT_NAME):  # a calibrate mid-commit
            calibration, gallery = _read_pair(cfg, path)
    if gallery.run_id != calibration.run_id:
        raise IdentifyError(f"{path} and {path.parent / files.GALLERY} were written by two "
                            "different calibrate runs (one killed while putting them in place, "
                            "or a file copied over the other); run python -m jaguar_reid.identify."
                            f"calibrate exp={cfg.exp} again")
    return calibration, gallery


def _read_pair(cfg: Config, path: Path) -> tuple[Calibration, Gallery]:
    calibration = read_calibration(cfg, path)
    gallery_path = path.parent / files.GALLERY
    if not gallery_path.is_file():
        raise IdentifyError(f"{gallery_path}: no gallery beside {path}; run python -m "
                            f"jaguar_reid.identify.calibrate exp={cfg.exp} again")
    return calibration, read_gallery(gallery_path)


def _note_where(cfg: Config, path: Path) -> None:
    """Say so when this machine's calibration is read in place of the one the models came
    with (a calibration made here after the export wins, as every later step's files do)."""
    shipped = layout.model_dir(cfg) / files.CALIBRATION
    if cfg.models and shipped.is_file() and path.resolve() != shipped.resolve() and \
            path.read_bytes() != shipped.read_bytes():
        say_once(f"note: identifying with the calibration in {path.parent} (made on this "
                 f"machine), not the one that came with the models ({shipped}); give "
                 "another output_dir to use theirs")


def read_calibration(cfg: Config, path: Path) -> Calibration:
    """`path` (where `files.read` found identify.json) as a Calibration; one line if not."""
    if not path.is_file():
        where = dict.fromkeys([str(layout.work_dir(cfg)), str(layout.model_dir(cfg))])
        raise IdentifyError(
            f"experiment {cfg.exp!r}: no {files.CALIBRATION} in {' or '.join(where)}; "
            f"calibrate it first: python -m jaguar_reid.identify.calibrate exp={cfg.exp} "
            "(with identify.grouped_exp=...)")
    try:
        return Calibration.from_dict(read_json(path))
    except ValueError as exc:
        raise IdentifyError(f"{path}: not a calibration this code reads ({exc}); run python "
                            f"-m jaguar_reid.identify.calibrate exp={cfg.exp} again") from None


def load_fold_models(cfg: Config, gallery: Gallery) -> list[FoldModel]:
    """The fold models the gallery was embedded with, each checked to be those weights."""
    from jaguar_reid.retrieval.embedding import fold_config
    from jaguar_reid.training.digest import weights_digest
    from jaguar_reid.training.model import load_trained_model

    out = []
    for fold, digest in zip(gallery.folds, gallery.digests, strict=True):
        fold_cfg, weights = fold_config(cfg, cfg.exp, int(fold))
        if weights_digest(cfg, weights) != digest:
            raise GalleryError(f"{weights}: not the weights the gallery of {cfg.exp!r} was "
                               "embedded with (retrained or replaced since the calibration); "
                               f"run python -m jaguar_reid.identify.calibrate exp={cfg.exp} "
                               "again")
        fold_cfg = copy.deepcopy(fold_cfg)
        fold_cfg.data.num_workers = 0  # photos arrive decoded (`read_photos`)
        out.append(FoldModel(fold, fold_cfg, load_trained_model(fold_cfg, weights).eval()))
    return out


def fixed_by_calibration(cfg: Config, cal: Calibration) -> Config:
    """`cfg` with the keys the calibration fixed set to its values: the gallery was embedded,
    and the probabilities and threshold fitted, with exactly these."""
    out = copy.deepcopy(cfg)
    out.identify.score, out.identify.new_share = cal.score, cal.new_share
    out.identify.target = cal.target
    out.embed.tta, out.submit.retrieval = list(cal.views), cal.retrieval
    return out


# Keys fixed at calibration, noted only when set to another value than their default.
CALIBRATION_KEYS = {"identify.new_share": lambda cal: cal.new_share,
                    "submit.retrieval": lambda cal: cal.retrieval,
                    "identify.target": lambda cal: cal.target,
                    "identify.max_false_new": lambda cal: cal.target_value
                    if cal.target == "max_false_new" else None,
                    "identify.min_precision": lambda cal: cal.target_value
                    if cal.target == "min_precision" else None}


def _note_settings(cfg: Config, cal: Calibration) -> None:
    """Say where today's keys differ from those the calibration fixed (the calibration's
    apply: its numbers were fitted with them)."""
    from jaguar_reid.keys import SPECS

    for name, fixed in CALIBRATION_KEYS.items():
        today = cfg.get_path(name)
        if today != SPECS[name].default and today != fixed(cal):
            say_once(f"note: {name}={today} is fixed at calibration; the calibration's "
                     f"({cal.target}={cal.target_value:g}, new_share={cal.new_share:g}, "
                     f"submit.retrieval={cal.retrieval!r}) applies: calibrate again to change it")
    if cfg.identify.score != cal.score:
        say_once(f"note: identify.score={cfg.identify.score} differs from the calibration's "
                 f"{cal.score!r}, which applies (calibrate again to change it)")
    if list(dict.fromkeys(cfg.embed.tta)) != list(cal.views):
        say_once(f"note: embed.tta={list(cfg.embed.tta)} differs from the calibration's views "
                 f"{list(cal.views)}, which apply (calibrate again to change them)")


def timed_identify(identifier: Identifier, photos: Iterable[str | Path],
                   progress: bool = True) -> tuple[list[Identification], float]:
    """The identifications and the wall-clock seconds they took."""
    start = time.perf_counter()
    records = identifier.identify(photos, progress)
    return records, time.perf_counter() - start
