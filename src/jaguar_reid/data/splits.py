"""Cross-validation splits, written once to `folds/` and reused by every later step.

Two strategies:
- `grouped`: identity-disjoint folds (all images of an identity in one fold), balanced by image
  count. It measures recognising individuals never trained on: the hardest, most honest check.
- `closed`: every identity spread over the folds (stratified), like the closed-set test where
  every test jaguar also has training images.

The order comes from SHA-256 of (seed, name), not from a library RNG, so a split is the same
on every machine and every numpy/pandas/sklearn version.

    python -m jaguar_reid.folds config=configs/demo.yaml  # writes the folds CSV, prints counts
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from jaguar_reid import layout
from jaguar_reid.config import Config, load_config
from jaguar_reid.data.csv_tables import DataError, read_train_csv, resolve_image_paths
from jaguar_reid.data.dedup import duplicate_groups, hash_to_hex, hex_to_hash, phash
from jaguar_reid.data.image_cache import prepare_images
from jaguar_reid.data.images import read_rgba
from jaguar_reid.io_utils import atomic_path
from jaguar_reid.keys import choices

STRATEGIES = choices("folds.strategy")
FOLD_COLUMNS = ("filename", "ground_truth", "fold")  # and "group" (near-duplicates)


def stable_key(seed: int, name: str) -> int:
    """A pseudo-random but platform-independent sort key for `name`."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def assign_grouped_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold per image with every identity inside one fold; folds balanced by image count.

    Largest identities are placed first, each into the fold with the fewest images so far
    (ties: the lower fold), which keeps folds within one identity's size of each other.
    """
    labels = np.asarray(labels).astype(str)
    identities, counts = np.unique(labels, return_counts=True)
    if len(identities) < n_folds:
        raise ValueError(f"grouped folds need at least {n_folds} identities (one per fold), "
                         f"got {len(identities)}; lower folds.n_folds or use "
                         "folds.strategy=closed")
    order = sorted(range(len(identities)),
                   key=lambda i: (-counts[i], stable_key(seed, identities[i])))
    sizes = np.zeros(n_folds, dtype=np.int64)
    fold_of_identity: dict[str, int] = {}
    for i in order:
        fold = int(np.argmin(sizes))
        fold_of_identity[identities[i]] = fold
        sizes[fold] += counts[i]
    return np.array([fold_of_identity[label] for label in labels], dtype=np.int64)


def assign_closed_folds(labels: np.ndarray, n_folds: int, seed: int,
                        groups: np.ndarray | None = None) -> np.ndarray:
    """Fold per image with each identity's images dealt round-robin over the folds.

    `groups` (optional, one id per image) keeps images that must stay together (e.g.
    near-duplicates) in one fold; by default every image is its own group. Each identity's deal
    starts at the fold that is smallest so far, so folds stay balanced when identities have
    fewer images than folds.
    """
    labels = np.asarray(labels).astype(str)
    n = len(labels)
    if groups is None:
        groups = np.arange(n)
    groups = np.asarray(groups).astype(str)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} labels")
    if n < n_folds:
        raise ValueError(f"closed folds need at least {n_folds} images, got {n}")
    for group in np.unique(groups):
        if len(np.unique(labels[groups == group])) > 1:
            raise ValueError(f"group {group!r} mixes identities; a group must be one identity")

    folds = np.full(n, -1, dtype=np.int64)
    sizes = np.zeros(n_folds, dtype=np.int64)
    for identity in sorted(np.unique(labels), key=lambda s: stable_key(seed, s)):
        members = np.flatnonzero(labels == identity)
        unit_ids = sorted(np.unique(groups[members]),
                          key=lambda g: (-np.sum(groups[members] == g), stable_key(seed, g)))
        # Start where the folds are smallest so small identities do not all pile into fold 0.
        start = int(np.argmin(sizes))
        for j, unit in enumerate(unit_ids):
            fold = (start + j) % n_folds
            idx = members[groups[members] == unit]
            folds[idx] = fold
            sizes[fold] += len(idx)
    if (sizes == 0).any():
        raise ValueError(f"closed folds: fold(s) {np.flatnonzero(sizes == 0).tolist()} got no "
                         f"images; lower folds.n_folds")
    return folds


def assign_folds(labels: np.ndarray, n_folds: int, strategy: str, seed: int,
                 groups: np.ndarray | None = None) -> np.ndarray:
    """`groups` only matter for `closed`: `grouped` keeps whole identities together, and
    near-duplicate groups never span identities."""
    if strategy == "grouped":
        return assign_grouped_folds(labels, n_folds, seed)
    if strategy == "closed":
        return assign_closed_folds(labels, n_folds, seed, groups)
    raise ValueError(f"unknown fold strategy {strategy!r}; expected grouped or closed")


def near_duplicate_groups(train_df: pd.DataFrame, cfg: Config,
                          hashes: Sequence[str | None] | None) -> np.ndarray:
    """Group id per image: near-duplicates of one identity share one (see src/dedup.py).
    Hashes come from the preprocessing cache; without it they are computed here, once."""
    if hashes is None:
        files = layout.data_files(cfg)
        paths = resolve_image_paths(files.root, train_df["filename"], files.train)
        hashes = [hash_to_hex(phash(read_rgba(p, cfg.data.max_pixels)[..., :3])) for p in paths]
    bits = np.stack([hex_to_hash(h) if h else np.zeros(64, bool) for h in hashes])
    groups, cross = duplicate_groups(bits, train_df["ground_truth"].to_numpy(),
                                     cfg.folds.dup_threshold)
    n_dup = int((np.bincount(groups) > 1).sum())
    if n_dup or cross:
        print(f"near-duplicates: {n_dup} group(s) kept inside one fold; {len(cross)} pair(s) "
              "across identities (python -m jaguar_reid.datacheck lists them)")
    return groups


def make_folds(train_df: pd.DataFrame, cfg: Config,
               hashes: Sequence[str | None] | None = None) -> pd.DataFrame:
    labels = train_df["ground_truth"].to_numpy()
    if cfg.folds.dup_threshold >= 0:
        groups = near_duplicate_groups(train_df, cfg, hashes)
    else:
        groups = np.arange(len(train_df))
    folds = assign_folds(labels, cfg.folds.n_folds, cfg.folds.strategy, cfg.folds.seed, groups)
    out = train_df[["filename", "ground_truth"]].copy()
    out["fold"] = folds
    out["group"] = groups
    return out


def check_folds(folds_df: pd.DataFrame, train_df: pd.DataFrame, n_folds: int,
                path: Path) -> None:
    """A saved split must describe exactly today's train.csv, or every score is suspect."""
    merged = train_df.merge(folds_df, on="filename", how="outer", suffixes=("", "_folds"),
                            indicator=True)
    only_train = merged.loc[merged["_merge"] == "left_only", "filename"].tolist()
    only_folds = merged.loc[merged["_merge"] == "right_only", "filename"].tolist()
    if only_train or only_folds:
        raise DataError(
            f"{path}: does not match train.csv ({len(only_train)} image(s) missing from the "
            f"folds, e.g. {only_train[:3]}; {len(only_folds)} not in train.csv, e.g. "
            f"{only_folds[:3]}); delete it to re-split, or set folds.file"
        )
    both = merged[merged["_merge"] == "both"]
    changed = both.index[both["ground_truth"] != both["ground_truth_folds"]]
    if len(changed):
        row = both.loc[changed[0]]
        raise DataError(f"{path}: label of {row['filename']!r} is {row['ground_truth_folds']!r} "
                        f"but train.csv says {row['ground_truth']!r}; delete it to re-split")
    seen = sorted(folds_df["fold"].unique().tolist())
    if seen != list(range(n_folds)):
        raise DataError(f"{path}: holds folds {seen}, but folds.n_folds={n_folds}")


def read_folds(path: Path) -> pd.DataFrame:
    """A saved split; a file edited by hand into something unusable is named, with its row
    (header = line 1), and deleting it re-splits."""
    try:
        # No NaN guessing: a file named `NA.png` is a name, and an empty fold is an error.
        df = pd.read_csv(path, dtype={"filename": str, "ground_truth": str, "fold": str},
                         keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable folds file ({str(exc).strip()}); delete it to "
                        "re-split") from exc
    missing = [c for c in FOLD_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"expected {', '.join(FOLD_COLUMNS)}")
    fold = pd.to_numeric(df["fold"], errors="coerce")
    bad = np.flatnonzero(~np.isfinite(fold.astype(np.float64)) | (fold != fold.round()))
    if len(bad):
        raise DataError(f"{path}: row {bad[0] + 2}: column 'fold' must hold integers, got "
                        f"{df['fold'].iloc[bad[0]]!r}")
    df["fold"] = fold.astype(np.int64)
    # One image in two folds would be trained on and validated on: a silent leak.
    dup = np.flatnonzero(df["filename"].duplicated())
    if len(dup):
        raise DataError(f"{path}: row {dup[0] + 2}: filename {df['filename'].iloc[dup[0]]!r} "
                        "appears more than once; delete the file to re-split")
    return df


def load_or_create_folds(cfg: Config, train_df: pd.DataFrame | None = None,
                         hashes: Sequence[str | None] | None = None) -> pd.DataFrame:
    """The split for this config: read from `folds/` when it exists (and still matches
    train.csv), else made once and written there."""
    if train_df is None:
        train_df = read_train_csv(layout.data_files(cfg).train)
    path = layout.folds_path(cfg)
    if path.is_file():
        return _read_checked(path, train_df, cfg.folds.n_folds)
    try:
        folds_df = make_folds(train_df, cfg, hashes)
    except ValueError as exc:
        raise DataError(f"{layout.data_files(cfg).train}: {exc}") from exc
    with atomic_path(path) as tmp:
        folds_df.to_csv(tmp, index=False)
    print(f"wrote {path}")
    return folds_df


def _read_checked(path: Path, train_df: pd.DataFrame, n_folds: int) -> pd.DataFrame:
    folds_df = read_folds(path)
    check_folds(folds_df, train_df, n_folds, path)
    # train.csv's row order is the reference every later step indexes by.
    extra = ["fold", "group"] if "group" in folds_df.columns else ["fold"]
    return train_df.merge(folds_df[["filename", *extra]], on="filename", how="left")


def keep_with_experiment(folds_df: pd.DataFrame, exp_dir: Path) -> None:
    """A copy of the assignment an experiment trains on, inside its folder: a copied or
    exported experiment carries its folds (`experiment_folds`)."""
    path = exp_dir / layout.EXP_FOLDS
    if not path.is_file():
        with atomic_path(path) as tmp:
            folds_df[[c for c in FOLD_COLUMNS if c in folds_df.columns] + (
                ["group"] if "group" in folds_df.columns else [])].to_csv(tmp, index=False)


def experiment_folds(cfg: Config, exp_dir: Path, train_df: pd.DataFrame) -> pd.DataFrame:
    """The folds an experiment was trained on: the copy in its folder, else this config's."""
    path = exp_dir / layout.EXP_FOLDS
    if path.is_file():
        return _read_checked(path, train_df, cfg.folds.n_folds)
    return load_or_create_folds(cfg, train_df)


def fold_summary(folds_df: pd.DataFrame) -> pd.DataFrame:
    return folds_df.groupby("fold").agg(images=("filename", "size"),
                                        identities=("ground_truth", "nunique"))


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    train_df = read_train_csv(layout.data_files(cfg).train)
    hashes = None
    if cfg.cache.enabled and cfg.folds.dup_threshold >= 0 and not layout.folds_path(cfg).is_file():
        records = prepare_images(cfg, train_df["filename"], layout.data_files(cfg).train,
                                 "train images").records
        hashes = [r["phash"] for r in records]
    folds_df = load_or_create_folds(cfg, train_df, hashes)
    print(f"{layout.folds_path(cfg)} ({cfg.folds.strategy}, {cfg.folds.n_folds} folds, "
          f"seed {cfg.folds.seed})")
    print(fold_summary(folds_df).to_string())
