"""Where everything lives: the one owner of every path and file name of the pipeline.

Two roots, both plain folders:
- the **model folder** of an experiment: what training wrote (fold folders with weights,
  saved configs, validation embeddings, out-of-fold scores). Read-only for every later step.
  By default `<output_dir>/<exp>/`; `models=PATH` reads it from anywhere (a copied run, a
  Kaggle dataset under `/kaggle/input/...`): PATH is the experiment folder itself, or a folder
  holding `<exp>/` folders.
- the **work folder**: everything made after training (the preprocessing cache, view
  embeddings for tuning, the tuned choice, submissions, reports, the leaderboard), always under
  `output_dir` (`<output_dir>/<exp>/` for an experiment's files).

A fold is **finished** when its `metrics.json` exists: training writes it last.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder that holds jaguar_reid/
REPO_ROOT = PACKAGE_PARENT.parent  # a checkout: src/jaguar_reid -> the repository


def _shipped(name: str) -> Path:
    """A folder of the repository (`configs`, `folds`); from an installed wheel, the copy
    installed beside the environment (pyproject's data-files)."""
    local = REPO_ROOT / name
    installed = Path(sys.prefix) / "share" / "jaguar-reid" / name
    return local if local.is_dir() or not installed.is_dir() else installed


CONFIG_DIR = _shipped("configs")
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
# Committed fold assignments of the known data sets; outside a checkout, ./folds.
FOLDS_DIR = REPO_ROOT / "folds" if (REPO_ROOT / "pyproject.toml").is_file() else Path("folds")

FULL = "full"  # the fold name of a run on every image, with no validation

# A fold folder's files, written by training (jaguar_reid.training.loop).
MODEL_WEIGHTS = "model.safetensors"   # the kept weights
BEST_WEIGHTS = "best.safetensors"     # the best epoch's weights by validation
VAL_EMBEDDINGS = "val_embeddings.npz"
FOLD_METRICS = "metrics.json"         # written last: the fold is finished
TRAIN_LOG = "log.csv"
RUN_CONFIG = "config.yaml"            # also the experiment's own, beside its folds
CHECKPOINT = "checkpoint.pt"          # while training; removed when the fold finishes
FOLD_LOCK = "train.lock"
FOLD_FILES = (MODEL_WEIGHTS, BEST_WEIGHTS, VAL_EMBEDDINGS, FOLD_METRICS, TRAIN_LOG, RUN_CONFIG,
              CHECKPOINT)

# An experiment folder's files.
EXP_FOLDS = "folds.csv"               # the fold assignment its folds were trained on
OOF_SCORES = "oof_scores.json"
OOF_SCORES_MD = "oof_scores.md"
OOF_VIEWS = "oof_views.npz"           # per fold, in the work folder: views for tuning
POST_CHOICE = "postprocess.json"      # the tuned post-processing
POST_CHOICE_MD = "postprocess.md"
SUBMISSION = "submission.csv"
SCORES_EXTRA = "scores.json"          # beside a submission: its local test scores
EMBEDDINGS_EXTRA = "embeddings.npz"   # beside a submission: the test embeddings
PSEUDO = "pseudo.csv"                 # pseudo-labelled test images (python -m jaguar_reid.pseudo)
PSEUDO_CURVE = "pseudo_curve.csv"     # beside it: out-of-fold precision and coverage per threshold
TEACHER_CACHE = "teacher"             # in the cache folder: teacher embeddings for distillation
REPORT_DIR = "report"
REPORT_INDEX = "index.html"           # in the report folder: the page to open
REPORT_SUMMARY = "summary.md"          # in the report folder: the same in Markdown
FOLD_LOGS_DIR = "logs"                # fold-parallel children's output
MANIFEST = "manifest.json"            # an exported experiment: each file's size and sha256
ONNX_MODEL = "model.onnx"             # in an exported fold folder, with export.onnx=true

# The output folder's own files.
LEADERBOARD = "leaderboard.csv"
CACHE_DIR = "cache"
DATACHECK_DIR = "datacheck"
FLOOR_DIR = "floor"                  # plain frozen floor embeddings, by backbone and weights
SOURCE_IDS = "source_ids.json"      # in the cache folder: files' content digests, by stat
CACHE_INDEX = "index.json"           # in a preprocessing cache's folder: each content's record

# The competition's files inside data.dir.
DATA_FILES = {"train": "train.csv", "test": "test.csv", "sample": "sample_submission.csv",
              "test_labels": "test_labels.csv"}


# --------------------------------------------------------------------------- folds

def fold_name(fold: int | str) -> str:
    """A fold's folder name: `fold3`, `fold_full`."""
    return "fold_full" if fold == FULL else f"fold{int(fold)}"


def fold_of(directory: Path) -> int | str | None:
    """The fold a folder name stands for (`fold3` -> 3, `fold_full` -> full), else None."""
    name = Path(directory).name
    if name == "fold_full":
        return FULL
    return int(name[4:]) if name.startswith("fold") and name[4:].isdigit() else None


def fold_dir(exp_dir: str | Path, fold: int | str) -> Path:
    return Path(exp_dir) / fold_name(fold)


def is_finished(directory: str | Path) -> bool:
    """The one definition: training wrote the fold's metrics.json, which it writes last."""
    return (Path(directory) / FOLD_METRICS).is_file()


def fold_dirs(exp_dir: str | Path) -> list[Path]:
    """Every fold folder of an experiment, finished or not: numbered ones in order, then
    fold_full."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    found = [(fold_of(p), p) for p in exp_dir.iterdir() if p.is_dir()]
    numbered = sorted((f, p) for f, p in found if isinstance(f, int))
    full = [p for f, p in found if f == FULL]
    return [p for _, p in numbered] + full


def finished_folds(exp_dir: str | Path, full: bool = False) -> list[int | str]:
    """The finished folds of an experiment in order; the validation folds only, unless
    `full` (then fold_full last, where finished)."""
    out = [fold_of(p) for p in fold_dirs(exp_dir) if is_finished(p)]
    return [f for f in out if full or f != FULL]


# --------------------------------------------------------------------------- experiments

def work_root(cfg: Any) -> Path:
    return Path(cfg.output_dir)


def work_dir(cfg: Any, exp: str | None = None) -> Path:
    """Where an experiment's (or an `a+b` ensemble's) later files are written."""
    return work_root(cfg) / (exp or cfg.exp)


def model_dir(cfg: Any, exp: str | None = None) -> Path:
    """Where an experiment's trained folds are read: `models=PATH` (the experiment folder
    itself, or a folder holding `<exp>/`), else the work folder."""
    exp = exp or cfg.exp
    models = str(cfg.get("models", "") or "")
    if not models:
        return work_dir(cfg, exp)
    root = Path(models)
    looks_like_exp = (root / RUN_CONFIG).is_file() or bool(fold_dirs(root))
    return root if looks_like_exp and not (root / exp).is_dir() else root / exp


def read_path(cfg: Any, name: str, exp: str | None = None) -> Path:
    """An experiment file made both by training and later steps (`oof_scores.json`,
    `postprocess.json`): the work folder's, else the one that came with the model folder
    (a copied or exported experiment)."""
    exp = exp or cfg.exp
    written = work_dir(cfg, exp) / name
    shipped = model_dir(cfg, exp) / name if "+" not in exp else written
    return written if written.is_file() or not shipped.is_file() else shipped


def oof_views_path(cfg: Any, exp: str, fold: int) -> Path:
    return fold_dir(work_dir(cfg, exp), fold) / OOF_VIEWS


def submission_path(cfg: Any, exp: str) -> Path:
    """`submit.file`, else `<output_dir>/<exp>/submission.csv`; its extras are named after it
    (`submission.embeddings.npz`, `submission.scores.json`)."""
    return Path(cfg.submit.file) if cfg.submit.file else work_dir(cfg, exp) / SUBMISSION


def pseudo_path(cfg: Any, name: str) -> Path:
    """`pseudo.file`, else `<output_dir>/<exp or a+b>/pseudo.csv`."""
    return Path(cfg.pseudo.file) if cfg.pseudo.file else work_dir(cfg, name) / PSEUDO


def submission_extra(submission: str | Path, what: str) -> Path:
    """`<stem>.<what>` beside a submission file (`embeddings.npz`, `scores.json`)."""
    return Path(f"{Path(submission).with_suffix('')}.{what}")


def report_dir(cfg: Any, exp: str | None = None) -> Path:
    return work_dir(cfg, exp) / REPORT_DIR


def fold_logs_dir(cfg: Any) -> Path:
    return work_dir(cfg) / FOLD_LOGS_DIR


def leaderboard_path(cfg: Any) -> Path:
    return work_root(cfg) / LEADERBOARD


def cache_root(cfg: Any) -> Path:
    return work_root(cfg) / CACHE_DIR


def datacheck_dir(cfg: Any) -> Path:
    return work_root(cfg) / DATACHECK_DIR / Path(cfg.data.dir).resolve().name


@dataclass(frozen=True)
class DataFiles:
    """The competition's files: `root` (data.dir) and each CSV of `DATA_FILES` inside it."""

    root: Path
    train: Path
    test: Path
    sample: Path
    test_labels: Path  # only a labelled local copy of the data has it

    @classmethod
    def under(cls, root: str | Path) -> DataFiles:
        root = Path(root)
        return cls(root, **{key: root / name for key, name in DATA_FILES.items()})


def data_files(cfg: Any) -> DataFiles:
    """The competition's files of `data.dir`."""
    return DataFiles.under(cfg.data.dir)


def folds_path(cfg: Any) -> Path:
    """`folds.file`, else `folds/<data folder>_<strategy>_<n>f_s<seed>.csv`; where `folds/`
    cannot be written (the code as a read-only Kaggle dataset) and holds no such file, the same
    name under `<output_dir>/folds/`, so a new split is made there instead of failing."""
    if cfg.folds.file:
        return Path(cfg.folds.file)
    name = Path(cfg.data.dir).resolve().name
    file = f"{name}_{cfg.folds.strategy}_{cfg.folds.n_folds}f_s{cfg.folds.seed}.csv"
    shipped = FOLDS_DIR / file
    if shipped.is_file() or _writable(FOLDS_DIR):
        return shipped
    return work_root(cfg) / FOLDS_DIR.name / file


def _writable(folder: Path) -> bool:
    """Whether files can be made in `folder` (or in the nearest existing folder above it,
    which would hold it); a read-only mount says no, also to root."""
    folder = Path(folder).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)
