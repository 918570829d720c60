"""Local verification in the pipeline: the `local.*` keys -> cached local features of image
files, inlier counts of each query's top-B pairs, and the fused similarity.

`retrieval.local` (features and matching) and `retrieval.fusion` (the calibration) are pure;
this module gives them files, caches and a config:

* **Features** are computed once per image and settings and kept in the cache folder,
  `<cache>/local/features-<digest>/<key>.npz`, the key naming the image by its content
  (`data.source_ids`: the sha256 of its bytes; never its path, size or mtime, which a rewrite
  in place or another data folder with the same names can share), the digest naming the
  feature keys of `local.*` and the decoder's version. Every fold, experiment and tuning run
  reuses them; a rewritten image is read again.
* **Inlier counts** are kept per unordered pair of image keys in
  `<cache>/local/pairs-<digest>.npz` (digest: the feature and the matching keys), merged and
  rewritten atomically after each batch of new pairs, so a run that dies loses only the pairs
  of its last batch.
* **The shortlist** is each query's `local.top_b` most similar images by the similarity the
  pipeline has so far (post-processed): N x B pairs at most, never N^2.
* **Fusion**: (similarity, inliers, verified) -> one similarity by a `FusionModel` fitted out
  of fold (`python -m jaguar_reid.tune`, step "local"); never a hand-set weight.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jaguar_reid import layout
from jaguar_reid.config import Config
from jaguar_reid.data.images import DECODER_VERSION
from jaguar_reid.data.source_ids import content_ids, require_ids
from jaguar_reid.extras import require
from jaguar_reid.io_utils import atomic_path
from jaguar_reid.keys import choices
from jaguar_reid.progress import bar as progress_bar
from jaguar_reid.retrieval import fusion, learned, local

GEOMETRY = choices("local.model")
FUSIONS = choices("local.fusion")
MATCH_METHODS = choices("local.method")
EXTRACTORS = choices("local.extractor")  # disk: local.weights
MATCHERS = choices("local.matcher")  # lightglue: matcher_weights
FEATURE_KEYS = ("extractor", "max_side", "max_keypoints", "mask_erode")
MATCH_KEYS = ("matcher", "ratio", "min_matches", "ransac_threshold", "method", "model")
LOCAL_DIR = "local"     # in the cache folder
SAVE_EVERY = 2000       # new pairs matched between two writes of the pair cache


def _digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def _file_digest(cfg: Config, path: str) -> str:
    """A weight file known by its content (a renamed copy is the same model), its digest
    remembered as an image's is (`data.source_ids`): read once per file version."""
    (digest,) = content_ids(cfg, [path])
    if digest is None:
        raise FileNotFoundError(f"{path}: local weights file not found")
    return digest[:16]


def check_learned(cfg: Config) -> None:
    """`check_local` on the config's `local.*` keys."""
    check_local(cfg.local)


def check_local(keys: Mapping) -> None:
    """The learned extractor and matcher `keys` (`local.*`) ask for need kornia and local
    weight files (nothing is downloaded): checked before any work, each missing one named."""
    learned_keys = [f"local.{key}={keys[key]}" for key, kind in (("extractor", "disk"),
                                                                  ("matcher", "lightglue"))
                    if keys.get(key) == kind]
    if learned_keys:
        require("kornia.feature", ", ".join(learned_keys))
    if keys.get("extractor") == "disk":
        learned.check_weights(keys.get("weights") or None, "disk")
    if keys.get("matcher") == "lightglue":
        learned.check_weights(keys.get("matcher_weights") or None, "lightglue")


def feature_settings(cfg: Config) -> dict:
    out = {k: cfg.local[k] for k in FEATURE_KEYS} | {"version": local.FEATURE_FILE_VERSION,
                                                     "decoder": DECODER_VERSION}
    if cfg.local.extractor == "disk":
        out["weights"] = _file_digest(cfg, cfg.local.weights)
    return out


def match_settings(cfg: Config) -> dict:
    out = feature_settings(cfg) | {k: cfg.local[k] for k in MATCH_KEYS}
    if cfg.local.matcher == "lightglue":
        out["matcher_weights"] = _file_digest(cfg, cfg.local.matcher_weights)
    return out


def image_features(cfg: Config, path: Path, device: str = "cpu") -> local.LocalFeatures:
    """One file's local features by `local.extractor` (uncached)."""
    if cfg.local.extractor == "disk":
        return learned.disk_features(path, cfg.local.weights, cfg.local.max_side,
                                     cfg.local.max_keypoints, max_pixels=cfg.data.max_pixels,
                                     mask_erode=cfg.local.mask_erode, device=device)
    return local.image_features(path, cfg.local.max_side, cfg.local.max_keypoints,
                                max_pixels=cfg.data.max_pixels, mask_erode=cfg.local.mask_erode)


def matcher(cfg: Config, device: str = "cpu") -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """(a, b) -> inlier coordinates (xy in a, xy in b) by `local.matcher`; their number is the
    pair's inlier count."""
    geometry = {"min_matches": cfg.local.min_matches,
                "ransac_threshold": cfg.local.ransac_threshold, "method": cfg.local.method,
                "model": cfg.local.model}
    if cfg.local.matcher == "lightglue":
        return functools.partial(learned.lightglue_inlier_matches,
                                 weights=cfg.local.matcher_weights, device=device, **geometry)
    return functools.partial(local.inlier_matches, ratio=cfg.local.ratio, **geometry)


def image_keys(cfg: Config, paths: Sequence[Path]) -> list[str]:
    """Each file named by its content (`data.source_ids`), shortened for file names."""
    return [digest[:32] for digest in require_ids(cfg, paths)]


def features_for(cfg: Config, paths: Sequence[Path], device: str = "cpu",
                 keys: Sequence[str] | None = None) -> list[local.LocalFeatures]:
    """Local features of each file, from the cache where present (computed and saved where
    not). `keys`: the files' `image_keys` when the caller has them already."""
    folder = layout.cache_root(cfg) / LOCAL_DIR / f"features-{_digest(feature_settings(cfg))}"
    folder.mkdir(parents=True, exist_ok=True)
    keys = image_keys(cfg, paths) if keys is None else keys
    out = []
    for path, key in progress_bar(zip(paths, keys, strict=True), desc="local features",
                                  total=len(paths), unit="image"):
        file = folder / f"{key}.npz"
        if file.is_file():
            out.extend(local.load_features(file))
            continue
        feats = image_features(cfg, path, device)
        local.save_features(file, [feats])
        out.append(feats)
    return out


class PairCache:
    """Inlier counts by unordered pair of image keys, on disk between runs."""

    def __init__(self, cfg: Config) -> None:
        self.path = layout.cache_root(cfg) / LOCAL_DIR / \
            f"pairs-{_digest(match_settings(cfg))}.npz"
        self.counts: dict[tuple[str, str], int] = {}
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                self.counts = dict(zip(zip(data["a"].tolist(), data["b"].tolist(), strict=True),
                                       data["count"].tolist(), strict=True))

    @staticmethod
    def key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.counts)
        with atomic_path(self.path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, a=np.array([k[0] for k in keys], dtype=str),
                     b=np.array([k[1] for k in keys], dtype=str),
                     count=np.array(list(self.counts.values()), dtype=np.int32))


def verify_shortlist(cfg: Config, paths: Sequence[Path], similarity: np.ndarray,
                     device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(inliers int32 (N, N), verified bool (N, N)) for the N files: each image's
    `local.top_b` most similar others (by `similarity`, (N, N)) matched, both orders filled."""
    check_learned(cfg)
    n = len(paths)
    rows, cols = local.shortlist_pairs(similarity, cfg.local.top_b)
    keys = image_keys(cfg, paths)
    feats = features_for(cfg, paths, device, keys)
    match = None
    if cfg.local.matcher == "lightglue":
        inliers_of = matcher(cfg, device)
        match = lambda a, b: len(inliers_of(a, b)[0])  # noqa: E731
    store = PairCache(cfg)
    known = {(int(i), int(j)): store.counts[PairCache.key(keys[i], keys[j])]
             for i, j in zip(rows, cols, strict=True)
             if PairCache.key(keys[i], keys[j]) in store.counts}
    bar = progress_bar(desc="local matching", total=len(rows) - len(known), unit="pair")
    for a in range(0, len(rows), SAVE_EVERY):
        r, c = rows[a:a + SAVE_EVERY], cols[a:a + SAVE_EVERY]
        before = len(known)
        local.verify_pairs(feats, r, c, cfg.local.ratio, cfg.local.min_matches,
                           cfg.local.ransac_threshold, cfg.local.method, model=cfg.local.model,
                           cache=known, workers=cfg.local.workers, match=match,
                           advance=bar.update)
        if len(known) > before:
            for (i, j), count in known.items():
                store.counts[PairCache.key(keys[i], keys[j])] = count
            store.save()
    bar.close()
    counts = np.array([known[(int(i), int(j))] for i, j in zip(rows, cols, strict=True)],
                      dtype=np.int32)
    return local.dense_inliers(local.inlier_matrix(n, rows, cols, counts))


def fused_similarity(model: fusion.FusionModel, similarity: np.ndarray, inliers: np.ndarray,
                     verified: np.ndarray) -> np.ndarray:
    """The calibrated similarity of every pair, in [0, 1]."""
    return model.predict(np.clip(similarity, 0.0, 1.0), inliers, verified)
