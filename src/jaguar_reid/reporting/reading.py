"""Reading an experiment for its report: the files of `output/<exp>/` into dataclasses, and the
data folder's images as thumbnails.

Nothing here raises for a missing or unreadable part: each one adds a line to a `missing` list,
which the page shows, and the part is left out.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from jaguar_reid import layout
from jaguar_reid.config import Config, ConfigError, dump_config, load_saved_config
from jaguar_reid.io_utils import DamagedFileError, read_json
from jaguar_reid.reporting.runs import tuned_scores
from jaguar_reid.retrieval.oof import collect_fold_scores, summarise_folds

# Long side of a retrieval-strip thumbnail in pixels (enough to tell rosettes apart).
THUMB_PX = 160


@dataclass
class FoldData:
    """What one fold folder holds; None for each missing file."""

    name: str                      # "0", "1", ... or "full"
    directory: Path
    metrics: dict | None = None
    log: pd.DataFrame | None = None
    embeddings: np.ndarray | None = None
    labels: np.ndarray | None = None
    filenames: np.ndarray | None = None
    unfinished: bool = False       # checkpoint.pt present: training under way or stopped

    @property
    def number(self) -> int | None:
        return int(self.name) if self.name.isdigit() else None


@dataclass
class ExperimentData:
    exp_dir: Path
    folds: list[FoldData]
    oof: dict | None
    oof_source: str
    postprocess: dict | None
    submissions: list[tuple[str, dict]]
    config_text: str
    config_source: str
    exp_cfg: Config
    missing: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- one file

def read_json_part(path: Path, missing: list[str]) -> dict | None:
    """A JSON object file's contents; None when absent, or when unreadable (a note added):
    a half-finished or hand-edited file must not stop the report."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, DamagedFileError) as exc:
        missing.append(f"{path}: unreadable ({exc}); left out")
        return None
    if not isinstance(data, dict):
        missing.append(f"{path}: expected a JSON object, got {type(data).__name__}; left out")
        return None
    return data


# --------------------------------------------------------------------------- a fold

def _read_log(path: Path, label: str, missing: list[str]) -> pd.DataFrame | None:
    """A fold's log.csv; None (a note added) when absent or unreadable."""
    if not path.is_file():
        missing.append(f"{label}: no log.csv; no training curves")
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        missing.append(f"{label}: {path.name} unreadable ({exc}); no training curves")
        return None


def _read_embeddings(fold: FoldData, label: str, missing: list[str]) -> None:
    """Fill `fold`'s embeddings, labels and file names from its val_embeddings.npz."""
    npz_path = fold.directory / layout.VAL_EMBEDDINGS
    if not npz_path.is_file():
        if fold.number is not None:
            missing.append(f"{label}: no val_embeddings.npz; its ROC curve, similarity "
                           "histogram, per-identity AP and retrieval strips are left out")
        return
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            embeddings, labels = data["embeddings"], data["labels"].astype(str)
            filenames = (data["filenames"].astype(str) if "filenames" in data.files
                         else np.array([f"image {i}" for i in range(len(labels))]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        missing.append(f"{label}: {npz_path.name} unreadable ({exc}); its ROC curve, "
                       "histogram, per-identity AP and strips are left out")
    else:
        fold.embeddings, fold.labels, fold.filenames = embeddings, labels, filenames


def read_fold(directory: Path, missing: list[str]) -> FoldData:
    """A fold folder's files; each one absent or unreadable adds a line to `missing`."""
    name = "full" if directory.name == "fold_full" else directory.name[4:]
    fold = FoldData(name=name, directory=directory,
                    unfinished=(directory / layout.CHECKPOINT).is_file())
    label = f"fold {name}"
    fold.metrics = read_json_part(directory / layout.FOLD_METRICS, missing)
    if not (directory / layout.FOLD_METRICS).is_file():
        state = "training under way or stopped" if fold.unfinished else "not finished"
        missing.append(f"{label}: no metrics.json ({state})")
    fold.log = _read_log(directory / layout.TRAIN_LOG, label, missing)
    _read_embeddings(fold, label, missing)
    return fold


# --------------------------------------------------------------------------- the experiment

def _submission_scores(cfg: Config, exp_dir: Path, missing: list[str]) -> list[tuple[str, dict]]:
    """(file name, contents) of every `*.scores.json` of the experiment (submit.py writes one
    per submission file where the test has labels), submission.scores.json first."""
    first = f"{Path(layout.SUBMISSION).stem}.{layout.SCORES_EXTRA}"
    paths = sorted(exp_dir.glob(f"*.{layout.SCORES_EXTRA}"), key=lambda p: (p.name != first,
                                                                           p.name))
    if cfg.submit.file:
        elsewhere = layout.submission_extra(cfg.submit.file, layout.SCORES_EXTRA)
        if elsewhere.is_file() and elsewhere.resolve() not in {p.resolve() for p in paths}:
            paths.append(elsewhere)
    found = [(p.name if p.parent == exp_dir else str(p), read_json_part(p, missing))
             for p in paths]
    return [(name, scores) for name, scores in found if scores is not None]


def _experiment_config(cfg: Config, exp_dir: Path, missing: list[str]) -> tuple[str, str, Config]:
    """(YAML text, where it came from, resolved config) of the config that produced the run."""
    saved = exp_dir / layout.RUN_CONFIG
    if not saved.is_file():
        missing.append("config.yaml: the experiment saved no config; the page shows this "
                       "command's config")
        return dump_config(cfg), "this command's config (the experiment saved none)", cfg
    text = saved.read_text()
    try:
        return text, str(saved), load_saved_config(saved)
    except ConfigError as exc:
        # Saved under older defaults: the text is still what produced it.
        missing.append(f"{saved}: does not load under today's defaults ({exc}); image settings "
                       "and digest come from this command's config")
        return text, str(saved), cfg


def _scores_from_embeddings(exp_dir: Path, missing: list[str]) -> list[dict]:
    """jaguar_reid.retrieval.oof's per-fold rows, for a run whose oof_scores.json is not
    (yet) written."""
    if not exp_dir.is_dir():
        return []
    try:
        return collect_fold_scores(exp_dir)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        missing.append(f"{exp_dir}: fold files unreadable for scoring ({exc})")
        return []


def _read_oof(cfg: Config, exp_dir: Path, missing: list[str]) -> tuple[dict | None, str]:
    """(out-of-fold scores, where they came from): oof_scores.json, else computed from the
    folds' embeddings."""
    oof = read_json_part(layout.read_path(cfg, layout.OOF_SCORES), missing)
    if oof is not None:
        return oof, layout.OOF_SCORES if oof else ""
    rows = _scores_from_embeddings(exp_dir, missing)
    source = ""
    if rows:
        oof = summarise_folds(rows)
        source = "computed from val_embeddings.npz (no oof_scores.json)"
    missing.append("oof_scores.json absent or unreadable (python -m jaguar_reid.scoring "
                   "exp=NAME writes it)" + ("; scores computed from the folds' embeddings"
                                            if rows else ""))
    return oof, source


def _read_postprocess(cfg: Config, missing: list[str]) -> dict | None:
    postprocess = read_json_part(layout.read_path(cfg, layout.POST_CHOICE), missing)
    if postprocess is None:
        missing.append(f"{layout.POST_CHOICE} absent: no post-processed figures")
    elif tuned_scores(postprocess) is None:
        missing.append(f"{layout.POST_CHOICE} has no 'tuned' step: no post-processed figures")
    return postprocess


def read_experiment(cfg: Config) -> ExperimentData:
    """Everything of `output/<exp>/` the report uses; what is missing is listed, not raised."""
    exp_dir = layout.model_dir(cfg)
    missing: list[str] = []
    if not exp_dir.is_dir():
        missing.append(f"{exp_dir}: no such experiment folder; nothing has run yet")
    config_text, config_source, exp_cfg = _experiment_config(cfg, exp_dir, missing)
    folds = [read_fold(d, missing) for d in layout.fold_dirs(exp_dir)]
    if not folds:
        missing.append("no fold folders (fold<k>/): no training results")
    oof, oof_source = _read_oof(cfg, exp_dir, missing)
    postprocess = _read_postprocess(cfg, missing)
    work = layout.work_dir(cfg)
    submissions = _submission_scores(cfg, work, missing) if work.is_dir() else []
    if not submissions:
        missing.append("no submission scores (submission.scores.json: submit.py writes it where "
                       "test_labels.csv exists): no local test score")
    return ExperimentData(exp_dir=exp_dir, folds=folds, oof=oof, oof_source=oof_source,
                          postprocess=postprocess, submissions=submissions,
                          config_text=config_text, config_source=config_source,
                          exp_cfg=exp_cfg, missing=missing)


# --------------------------------------------------------------------------- images

def image_finder(roots: Sequence[str | Path]) -> tuple[Callable[[str], Path | None], Path | None]:
    """(name -> image file or None, the data folder used): the first of `roots` that is a
    folder, searched like jaguar_reid.data.csv_tables resolves train.csv names (a bare name
    anywhere beneath)."""
    root = next((Path(r) for r in roots if r and Path(r).is_dir()), None)
    if root is None:
        return (lambda name: None), None
    index: dict[str, list[Path]] | None = None

    def find(name: str) -> Path | None:
        nonlocal index
        if Path(name).parent != Path(".") and (root / name).is_file():
            return root / name
        if index is None:
            # jaguar_reid.data.csv_tables brings torch with it; a report without strips never
            # needs it.
            from jaguar_reid.data.csv_tables import index_images
            index = index_images(root)
        found = index.get(Path(name).name, [])
        return found[0] if len(found) == 1 else None

    return find, root


def thumbnail(path: Path | None, cfg: Config, size: int = THUMB_PX) -> np.ndarray | None:
    """(h, w, 3) uint8 of the image as the model saw it (the config's alpha mode), long side
    `size`; None for a missing or unreadable file (the strip shows a placeholder)."""
    if path is None:
        return None
    from PIL import Image

    from jaguar_reid.data.images import apply_alpha, to_rgba

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size * 4, size * 4))  # JPEG decodes at a fraction of full size
            rgb = apply_alpha(to_rgba(img), cfg.data.alpha, cfg.data.crop_margin,
                              tuple(cfg.data.fill))
    except (OSError, SyntaxError, ValueError):
        return None
    small = Image.fromarray(np.ascontiguousarray(rgb))
    small.thumbnail((size, size))
    return np.asarray(small)
