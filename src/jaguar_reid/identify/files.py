"""The file names of identification, and where they are read and written.

The calibration writes `identify.json` (and `identify.md`, the same for a reader) and
`identify_gallery.npz` into the experiment's work folder, together; `export` carries them.
They are read from the work folder first, else from the model folder (an exported
experiment), as `layout.read_path` reads every file a later step makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaguar_reid import layout

CALIBRATION = "identify.json"
CALIBRATION_MD = "identify.md"
GALLERY = "identify_gallery.npz"
TRAIN_VIEWS = "identify_views.npz"  # in a work fold folder: grouped folds' training images
EXPERIMENT_FILES = (CALIBRATION, CALIBRATION_MD, GALLERY)  # written together, exported
RESULTS_DIR = "identify"  # in the work folder, unless identify.out names another
RESULTS_CSV = "identify.csv"
RESULTS_HTML = "identify.html"
COMMIT_NAME = "identify"  # the journal's name of each commit (`jaguar_reid.commit`)


def written(cfg: Any, name: str, exp: str | None = None) -> Path:
    """Where the calibration writes `name`: the experiment's work folder."""
    return layout.work_dir(cfg, exp) / name


def read(cfg: Any, name: str, exp: str | None = None) -> Path:
    """Where `name` is read: the work folder's, else the model folder's."""
    return layout.read_path(cfg, name, exp)


def results_dir(cfg: Any) -> Path:
    return Path(cfg.identify.out) if cfg.identify.out else layout.work_dir(cfg) / RESULTS_DIR
