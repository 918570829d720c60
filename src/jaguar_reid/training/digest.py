"""What decides a trained fold: the training digest, made of the `recipe` keys alone (roles are
declared in `jaguar_reid.keys`), the fold assignment, and what named files and experiments hold
(never a path), so an experiment folder copied to another place or machine still skips its
finished folds and resumes its checkpoints; and the content digest of a weights file, computed
once per file.

A fold trained before roles existed carries the earlier digest (every key except a fixed list,
`local.*` and `floor.*` included); `Digest.matches` still recognises it, whatever today's values
of the keys that no longer decide the weights, so such folds keep skipping and resuming.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from jaguar_reid.config import Config, config_digest, to_plain
from jaguar_reid.data.source_ids import content_ids
from jaguar_reid.io_utils import read_json
from jaguar_reid.keys import SPECS
from jaguar_reid.layout import (
    FOLD_METRICS,
    finished_folds,
    fold_dir,
    model_dir,
)
from jaguar_reid.manifest import file_sha256
from jaguar_reid.schema import RECIPE

DIGEST_VERSION = 2


@dataclass(frozen=True)
class Digest:
    """A fold's training digest (`current`, written with the fold) and the earlier-format
    digests the same recipe had (`earlier`), which a fold trained then carries."""

    current: str
    earlier: tuple[str, ...] = ()

    def matches(self, stored: str | None) -> bool:
        return stored is not None and (stored == self.current or stored in self.earlier)


def _nested(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _value(cfg: Config, dotted: str) -> object:
    return to_plain(cfg.get_path(dotted))


def folds_digest(folds_df: pd.DataFrame) -> str:
    """The fold assignment itself (file name -> fold), whichever file it was read from."""
    text = "\n".join(f"{n},{f}" for n, f in zip(folds_df["filename"], folds_df["fold"],
                                                  strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _content(cfg: Config, folds_df: pd.DataFrame) -> dict:
    """What the content keys and the fold assignment hold, by content: the starting weights by
    their bytes, pseudo-labels by their bytes, the starting and the teacher experiments by how
    their folds were trained."""
    out = {
        "folds_digest": folds_digest(folds_df),
        "weights_digest": weights_digest(cfg, cfg.model.weights) if cfg.model.weights else "",
        "pseudo_digest": file_sha256(Path(cfg.data.pseudo)) if cfg.data.pseudo else "",
        "init_digest": experiments_digest(cfg, cfg.train.init),
        "teacher_digest": experiments_digest(cfg, cfg.train.teacher),
    }
    if cfg.train.teacher:  # how the teachers' embeddings are made
        out["teacher_views"] = [str(v) for v in cfg.embed.tta]
        out["teacher_ensemble"] = cfg.submit.ensemble
    return out


# Each content key and the entry of `_content` that stands for it.
CONTENT_ENTRIES = {"model.weights": "weights_digest", "data.pseudo": "pseudo_digest",
                   "train.init": "init_digest", "train.teacher": "teacher_digest"}


def recipe_values(cfg: Config) -> dict:
    """The recipe keys' values that enter the digest: every `recipe` key but the content keys
    (digested by content) and those at their `neutral` value (added later, training as before
    they existed)."""
    out = {}
    for name, spec in SPECS.items():
        if spec.role != RECIPE or spec.content:
            continue
        value = _value(cfg, name)
        if spec.has_neutral and value == spec.neutral:
            continue
        out[name] = value
    return out


def training_digest(cfg: Config, folds_df: pd.DataFrame) -> Digest:
    """Digest of what decides the trained weights (see the module's doc)."""
    content = _content(cfg, folds_df)
    plain = {**_nested(recipe_values(cfg)), **content, "digest_version": DIGEST_VERSION}
    return Digest(config_digest(Config(plain)), earlier_digests(cfg, content))


# --------------------------------------------------------------------------- the earlier format

# The keys the first digest read (every key of that time except where things are, how fast and
# what happens after training); fixed: keys added since never enter it.
_V1_KEYS = (
    "seed", "gpus", "data.img_size", "data.mean", "data.std", "data.interpolation",
    "data.resize", "data.alpha", "data.crop_margin", "data.fill", "data.max_pixels",
    "cache.enabled", "cache.size", "folds.n_folds", "folds.strategy", "folds.seed",
    "folds.dup_threshold", "model.backbone", "model.pretrained", "model.gem_p", "model.tokens",
    "model.neck_dropout", "model.embed_dim", "model.retrieval", "model.arcface_s",
    "model.arcface_m", "model.arcface_m_min", "model.dynamic_margin", "model.subcenters",
    "model.attention", "model.glam_reduction", "train.epochs", "train.batch_size",
    "train.grad_accum", "train.lr", "train.head_lr", "train.weight_decay", "train.clip_grad",
    "train.layer_decay", "train.freeze_epochs", "train.warmup_epochs", "train.ema",
    "train.ema_decay", "train.amp", "train.sync_bn", "train.sampler", "train.pk_k",
    "train.select", "train.monitor", "train.early_stop", "train.freeze_bn",
    "train.bg_blank_prob", "train.distill_loss", "train.distill_margin", "train.metrix_alpha",
    "loss.arcface", "loss.contrastive", "loss.multi_similarity", "loss.smooth_ap",
    "loss.recall_k", "loss.contrastive_margin", "loss.ms_alpha", "loss.ms_beta", "loss.ms_base",
    "loss.smooth_ap_tau", "loss.recall_ks", "loss.recall_tau1", "loss.recall_tau2",
    "loss.xbm_size", "aug.crop_scale_min", "aug.affine_p", "aug.rotate", "aug.scale",
    "aug.shear", "aug.translate", "aug.color_jitter", "aug.color_p", "aug.blur_p",
    "aug.dropout_p", "aug.hflip", "local.top_b", "local.extractor", "local.weights",
    "local.matcher", "local.matcher_weights", "local.max_side", "local.max_keypoints",
    "local.mask_erode", "local.ratio", "local.min_matches", "local.ransac_threshold",
    "local.method", "local.model", "local.fusion", "local.workers", "floor.enabled",
)
# The local-verification keys' values of that time: folds trained then almost always had them.
_V1_LOCAL = {"local.top_b": 20, "local.extractor": "sift", "local.weights": "",
             "local.matcher": "ratio", "local.matcher_weights": "", "local.max_side": 512,
             "local.max_keypoints": 512, "local.mask_erode": 5, "local.ratio": 0.8,
             "local.min_matches": 8, "local.ransac_threshold": 0.02, "local.method": "magsac",
             "local.model": "homography", "local.fusion": "logistic", "local.workers": 1}
# Sections and keys the first digest left out while at these values (added after it).
_V1_AT_DEFAULT: dict[str, Callable[[dict], bool]] = {
    "loss": lambda loss: loss == {"arcface": 1.0, "contrastive": 0.0, "multi_similarity": 0.0,
                                  "smooth_ap": 0.0, "recall_k": 0.0, "contrastive_margin": 0.5,
                                  "ms_alpha": 2.0, "ms_beta": 50.0, "ms_base": 0.5,
                                  "smooth_ap_tau": 0.01, "recall_ks": [1, 2, 4, 8, 16],
                                  "recall_tau1": 0.01, "recall_tau2": 1.0, "xbm_size": 0},
    "train.metrix_alpha": lambda v: v == 0.0,
    "model.attention": lambda v: v == "none",
    "model.glam_reduction": lambda v: v == 8,
}


def _v1_digest(flat: dict, content: dict) -> str:
    plain = _nested(flat)
    for dotted, at_default in _V1_AT_DEFAULT.items():
        *parents, last = dotted.split(".")
        node = plain
        for part in parents:
            node = node[part]
        if at_default(node[last]):
            del node[last]
    return config_digest(Config({**plain, **content}))


# Keys the first digest read that no longer decide the weights, with the values a fold trained
# then may have had beside today's: such a fold is recognised whatever they say today.
_V1_FREED: dict[str, tuple] = {"floor.enabled": (True, False), "train.amp": (True, False),
                               "data.max_pixels": (60_000_000,)}


def _added_since_v1_at_neutral(cfg: Config) -> bool:
    """Every recipe key the first digest did not know is at its neutral value (else that
    format cannot describe the recipe, and no fold of that time matches it)."""
    return all(spec.content or (spec.has_neutral and _value(cfg, name) == spec.neutral)
               for name, spec in SPECS.items()
               if spec.role == RECIPE and name not in _V1_KEYS)


def earlier_digests(cfg: Config, content: dict) -> tuple[str, ...]:
    """The first format's digest of this recipe, for every value of the keys it read that no
    longer decide the weights: today's `local.*` or those of that time, and either value of
    `_V1_FREED`'s keys. Empty when the recipe uses a key that format did not know."""
    if not _added_since_v1_at_neutral(cfg):
        return ()
    today = {name: _value(cfg, name) for name in _V1_KEYS}
    variants = [today, {**today, **_V1_LOCAL}]
    for name, values in _V1_FREED.items():
        variants = [{**v, name: value} for v in variants for value in (today[name], *values)]
    digests = (_v1_digest(flat, content) for flat in variants)
    return tuple(dict.fromkeys(digests))


# --------------------------------------------------------------------------- named content


def experiments_digest(cfg: Config, names: str) -> list[str]:
    """The training digests of the finished folds of experiments `a[,b]` (empty: none)."""
    out = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        exp_dir = model_dir(cfg, name)
        out += [read_json(fold_dir(exp_dir, f) / FOLD_METRICS).get("training_digest", "")
                for f in finished_folds(exp_dir, full=True)]
    return out


def weights_digest(cfg: Config, path: str | Path) -> str:
    """sha256 of a file's bytes, remembered by the file's stamp (`data.source_ids`): 1.2 GB of
    EVA-02 L weights is read once, not per run, and a file rewritten in place is read again."""
    (digest,) = content_ids(cfg, [path])
    if digest is None:
        raise FileNotFoundError(f"{path}: weights file not found")
    return digest
