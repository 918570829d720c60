"""What decides a trained fold: the training digest, free of paths and machine settings, so
an experiment folder copied to another place or machine still skips its finished folds and
resumes its checkpoints; and the content digest of a weights file, computed once per file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from jaguar_reid.config import Config, config_digest, schema_value, to_plain
from jaguar_reid.io_utils import atomic_write_json, file_lock, read_json
from jaguar_reid.layout import (
    FOLD_METRICS,
    WEIGHT_DIGESTS,
    cache_root,
    finished_folds,
    fold_dir,
    model_dir,
)
from jaguar_reid.manifest import file_sha256

# Keys that never change the trained weights: where things are, how fast, what happens after
# training. Every other key decides the weights.
NOT_DECIDING = ("exp", "exps", "models", "output_dir", "fold", "device", "parallel", "embed",
                "post", "tune", "submit", "report", "data.dir", "data.num_workers",
                "cache.workers", "folds.file", "model.weights", "train.overwrite",
                "train.compile", "model.grad_checkpointing", "model.allow_random_init",
                "train.amp_dtype", "export", "pseudo", "data.pseudo", "train.init",
                "train.teacher")

# Keys added after folds were already being trained (issue 16), each at its default, which
# trains exactly as before: at that value they are left out of the digest, so a fold trained
# before they existed still skips and resumes. A change of one of these defaults must remove
# it from here.
ADDED_AT_DEFAULT = ("loss", "train.metrix_alpha", "model.attention", "model.glam_reduction")


def _get(plain: dict, dotted: str) -> object:
    node = plain
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _drop(plain: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = plain
    for part in parents:
        node = node.get(part, {})
    node.pop(last, None)


def folds_digest(folds_df: pd.DataFrame) -> str:
    """The fold assignment itself (file name -> fold), whichever file it was read from."""
    text = "\n".join(f"{n},{f}" for n, f in zip(folds_df["filename"], folds_df["fold"],
                                                  strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def training_digest(cfg: Config, folds_df: pd.DataFrame) -> str:
    """Digest of what decides the trained weights: the recipe, the fold assignment and the
    starting weights' content (`model.weights` by its bytes, not its path)."""
    plain = to_plain(cfg)
    for dotted in NOT_DECIDING:
        _drop(plain, dotted)
    for dotted in ADDED_AT_DEFAULT:
        if _get(plain, dotted) == to_plain(schema_value(dotted)):
            _drop(plain, dotted)
    plain["folds_digest"] = folds_digest(folds_df)
    plain["weights_digest"] = weights_digest(cfg, cfg.model.weights) if cfg.model.weights else ""
    # Paths and names replaced by what they hold: pseudo-labels by their bytes, the starting
    # and the teacher experiments by how their folds were trained.
    plain["pseudo_digest"] = file_sha256(Path(cfg.data.pseudo)) if cfg.data.pseudo else ""
    plain["init_digest"] = experiments_digest(cfg, cfg.train.init)
    plain["teacher_digest"] = experiments_digest(cfg, cfg.train.teacher)
    if cfg.train.teacher:  # how the teachers' embeddings are made
        plain["teacher_views"] = [str(v) for v in cfg.embed.tta]
        plain["teacher_ensemble"] = cfg.submit.ensemble
    return config_digest(Config(plain))


def experiments_digest(cfg: Config, names: str) -> list[str]:
    """The training digests of the finished folds of experiments `a[,b]` (empty: none)."""
    out = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        exp_dir = model_dir(cfg, name)
        out += [read_json(fold_dir(exp_dir, f) / FOLD_METRICS).get("training_digest", "")
                for f in finished_folds(exp_dir, full=True)]
    return out


def weights_digest(cfg: Config, path: str | Path) -> str:
    """sha256 of a file's bytes, remembered in `<output_dir>/cache/weight_digests.json` by
    (path, size, modification time): 1.2 GB of EVA-02 L weights is read once, not per run."""
    path = Path(path)
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = cache_root(cfg) / WEIGHT_DIGESTS
    known = read_json(index) if index.is_file() else {}
    if key in known:
        return known[key]
    value = file_sha256(path)
    index.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(index.with_name(index.name + ".lock")):
        merged = read_json(index) if index.is_file() else {}
        merged[key] = value
        atomic_write_json(index, merged)
    return value
