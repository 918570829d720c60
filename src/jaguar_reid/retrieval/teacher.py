"""The teacher ensemble's embeddings for a distilled student (`train.teacher=EXP[,EXP2]`).

Every finished fold of each teacher experiment (its full-data fold too) embeds the training
images and the test images under `embed.tta`; folds are combined the way submit.py combines
them (`submit.ensemble`: mean, or concat, whose cosine is the mean of the models' cosines),
then experiments the same way. The result is computed once and kept in
`<output_dir>/cache/teacher/<key>.npz`, the key made of what decides it (the teachers'
training digests, views, ensemble mode, the decoder's version, and the images' content in
order: `data.source_ids`, never their names or folder, which another round's data or a file
rewritten in place can share): every fold of a student, and every student of the same
teachers, reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import Config
from jaguar_reid.data.csv_tables import resolve_image_paths
from jaguar_reid.data.images import DECODER_VERSION
from jaguar_reid.data.source_ids import ids_digest, require_ids
from jaguar_reid.io_utils import atomic_path
from jaguar_reid.retrieval.embedding import combine_views, embed_fold, ensemble_embeddings
from jaguar_reid.training.digest import experiments_digest


def teacher_names(cfg: Config) -> list[str]:
    names = [n.strip() for n in cfg.train.teacher.split(",") if n.strip()]
    if cfg.exp in names:
        raise ValueError(f"train.teacher={cfg.train.teacher}: experiment {cfg.exp!r} cannot "
                         "teach itself; give the student its own exp=NAME")
    return names


def teacher_folds(cfg: Config, exp: str) -> list[int | str]:
    exp_dir = layout.model_dir(cfg, exp)
    folds = layout.finished_folds(exp_dir, full=True)
    if not folds:
        raise FileNotFoundError(f"train.teacher: experiment {exp!r} has no finished fold in "
                                f"{exp_dir}; train it first")
    return folds


def _content(cfg: Config, names: Sequence[str], csv_path: Path) -> str:
    """One digest of the images' content, in order."""
    paths = resolve_image_paths(layout.data_files(cfg).root, list(names), csv_path)
    return ids_digest(require_ids(cfg, paths))


def cache_key(cfg: Config, train_names: Sequence[str], test_names: Sequence[str]) -> str:
    files = layout.data_files(cfg)
    decided = {"teachers": experiments_digest(cfg, ",".join(teacher_names(cfg))),
               "views": [str(v) for v in cfg.embed.tta],
               "ensemble": cfg.submit.ensemble, "decoder": DECODER_VERSION,
               "train": _content(cfg, train_names, files.train),
               "test": _content(cfg, test_names, files.test)}
    return hashlib.sha256(json.dumps(decided).encode()).hexdigest()[:16]


def _ensemble(cfg: Config, test_names: Sequence[str], device: str
              ) -> tuple[np.ndarray, np.ndarray]:
    files = layout.data_files(cfg)
    views = tuple(cfg.embed.tta)
    mode = "concat" if cfg.submit.ensemble == "concat" else "mean"
    trains, tests = [], []
    for exp in teacher_names(cfg):
        per_fold = [embed_fold(cfg, exp, f, views, True, list(test_names), files, device)
                    for f in teacher_folds(cfg, exp)]
        trains.append(ensemble_embeddings([combine_views(g.train, views) for g in per_fold],
                                          mode))
        tests.append(ensemble_embeddings([combine_views(g.test, views) for g in per_fold],
                                         mode))
    if len(trains) == 1:
        return trains[0], tests[0]
    return ensemble_embeddings(trains, mode), ensemble_embeddings(tests, mode)


def teacher_embeddings(cfg: Config, train_names: Sequence[str], test_names: Sequence[str],
                       device: str) -> tuple[np.ndarray, np.ndarray]:
    """(training images' (N, D), test images' (M, D)) teacher embeddings, L2-normalised, in
    the order of train.csv and of `test_names`; from the cache when it holds them."""
    key = cache_key(cfg, train_names, test_names)
    path = layout.cache_root(cfg) / layout.TEACHER_CACHE / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return data["train"], data["test"]
    train, test = _ensemble(cfg, test_names, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, train=train, test=test)
    print(f"teacher embeddings ({train.shape[1]} dims) of {len(train)} training and "
          f"{len(test)} test images cached in {path}")
    return train, test
