"""Out-of-fold scores of an experiment: `python -m jaguar_reid.scoring exp=NAME`.

Fold models embed into different spaces, so pairs are formed only inside one fold's
validation images, scored with that fold's model; the experiment's figure is the mean over
folds. Writes `oof_scores.json` and `oof_scores.md` beside the folds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from jaguar_reid import layout
from jaguar_reid.config import (
    METRICS,
    Config,
    load_config,
    load_saved_config,
)
from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.io_utils import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    resolve_device,
)
from jaguar_reid.keys import choices
from jaguar_reid.retrieval.embedding import embed_all
from jaguar_reid.retrieval.floor import FLOOR_NAME, FloorEmbedder, below_floor
from jaguar_reid.retrieval.metrics import identity_balanced_map, pair_roc_auc
from jaguar_reid.text import markdown_table
from jaguar_reid.training.model import RETRIEVAL_MODES

FloorFn = Callable[[list[str]], np.ndarray]  # file names -> plain floor embeddings
TUNE_METRICS = choices("tune.metric")
MONITORS = choices("train.monitor")  # scored each epoch
METRIC_NAMES = {"pair_auc": "pair ROC-AUC", "map": "identity-balanced mAP"}


def score_embeddings(emb_n: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cosine similarity of L2-normalised embeddings (N, D) -> both metrics over all pairs."""
    sim = emb_n.astype(np.float64) @ emb_n.astype(np.float64).T
    return {"pair_auc": pair_roc_auc(sim, labels), "map": identity_balanced_map(sim, labels)}


def validation_scores(model: torch.nn.Module, paths: list[Path], labels: np.ndarray, *,
                      cfg: Config, device: str, load) -> tuple[dict[str, np.ndarray],
                                                               dict[str, float]]:
    """A training fold's validation: every retrieval embedding of its images and their
    scores, `<metric>_<kind>` for each kind and `pair_auc` / `map` of `model.retrieval`."""
    embs = embed_all(model, paths, cfg, device, load)
    scores = {f"{metric}_{kind}": value for kind in RETRIEVAL_MODES
              for metric, value in score_embeddings(embs[kind], labels).items()}
    chosen = cfg.model.retrieval
    scores.update(pair_auc=scores[f"pair_auc_{chosen}"], map=scores[f"map_{chosen}"])
    return embs, scores


def collect_fold_scores(exp_dir: Path, floor: FloorFn | None = None) -> list[dict]:
    """One row per finished validation fold: fold, images, identities, metrics, untrained
    (epoch 0) and, given `floor` (file names -> plain floor embeddings), the plain floor's."""
    rows = []
    for fold in layout.finished_folds(exp_dir):
        fold_path = layout.fold_dir(exp_dir, fold)
        npz_path = fold_path / layout.VAL_EMBEDDINGS
        if not npz_path.is_file():
            raise DataError(f"{fold_path}: a finished fold without {layout.VAL_EMBEDDINGS}; "
                            "copy the whole fold folder, or train the fold again")
        with np.load(npz_path, allow_pickle=False) as data:
            emb, labels = data["embeddings"], data["labels"]
            kinds = {k: data[k] for k in RETRIEVAL_MODES if k in data.files}
            names = data["filenames"] if "filenames" in data.files else None
        for values in (emb, *kinds.values()):
            bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
            if len(bad):  # NaN would rank last and give a plausible, wrong score
                which = names[bad[0]] if names is not None else f"row {bad[0]}"
                raise DataError(f"{npz_path}: the embedding of {which} is not finite "
                                f"({len(bad)} row(s)); train fold {fold} again")
        row = {"fold": fold, "images": len(labels),
               "identities": len(np.unique(labels)), **score_embeddings(emb, labels)}
        if kinds:
            row["by_kind"] = {k: score_embeddings(e, labels) for k, e in kinds.items()}
        untrained = read_json(fold_path / layout.FOLD_METRICS).get("untrained")
        if untrained:
            row["untrained"] = untrained
        if floor is not None and names is not None:
            row["floor"] = score_embeddings(floor(names.astype(str).tolist()), labels)
        rows.append(row)
    return rows


def summarise_folds(rows: list[dict]) -> dict:
    mean = {m: float(np.nanmean([r[m] for r in rows])) for m in METRICS}
    summary = {"folds": rows, "mean": mean}
    for key, mean_key in (("untrained", "untrained_mean"), ("floor", "floor_mean")):
        if all(key in r for r in rows):
            summary[mean_key] = {m: float(np.nanmean([r[key][m] for r in rows]))
                                 for m in METRICS}
    untrained = [r["untrained"] for r in rows if "untrained" in r]
    # Every retrieval embedding, trained and before training: which one to use is decided here.
    by_kind = {}
    for kind in RETRIEVAL_MODES:
        if all(kind in r.get("by_kind", {}) for r in rows):
            entry = {m: float(np.nanmean([r["by_kind"][kind][m] for r in rows]))
                     for m in METRICS}
            if all(f"map_{kind}" in u for u in untrained) and len(untrained) == len(rows):
                entry["untrained"] = {m: float(np.nanmean([u[f"{m}_{kind}"] for u in untrained]))
                                      for m in METRICS}
            by_kind[kind] = entry
    if by_kind:
        summary["by_kind"] = by_kind
    return summary


def format_table(summary: dict) -> str:
    """Markdown table, also readable in a terminal."""
    rows = [[row["fold"], row["images"], row["identities"], f"{row['pair_auc']:.4f}",
             f"{row['map']:.4f}"] for row in summary["folds"]]
    mean = summary["mean"]
    rows.append(["mean", "", "", f"{mean['pair_auc']:.4f}", f"{mean['map']:.4f}"])
    if "untrained_mean" in summary:
        base = summary["untrained_mean"]
        rows.append(["untrained (epoch 0)", "", "", f"{base['pair_auc']:.4f}",
                     f"{base['map']:.4f}"])
    if "floor_mean" in summary:
        base = summary["floor_mean"]
        rows.append([FLOOR_NAME, "", "", f"{base['pair_auc']:.4f}", f"{base['map']:.4f}"])
    text = markdown_table(["fold", "images", "identities", "pair AUC", "mAP"], rows)
    if summary.get("by_kind"):
        kinds = []
        for kind, entry in summary["by_kind"].items():
            base = entry.get("untrained", {"pair_auc": float("nan"), "map": float("nan")})
            kinds.append([kind, f"{entry['pair_auc']:.4f}", f"{entry['map']:.4f}",
                          f"{base['pair_auc']:.4f}", f"{base['map']:.4f}"])
        text += "\n\n" + markdown_table(["retrieval embedding (mean of folds)", "pair AUC",
                                          "mAP", "before training: pair AUC", "mAP"], kinds)
    return text


def score_experiment(exp_dir: str | Path, quiet: bool = False,
                     out_dir: str | Path | None = None, floor: FloorFn | None = None) -> dict:
    """Score the finished folds of the experiment in `exp_dir` (its model folder) and write
    the tables into `out_dir` (default: the same folder); with `floor`, the plain floor's
    scores of the same pairs beside them."""
    exp_dir = Path(exp_dir)
    out_dir = Path(out_dir or exp_dir)
    rows = collect_fold_scores(exp_dir, floor)
    if not rows:
        raise FileNotFoundError(f"{exp_dir}: no finished validation folds "
                                "(fold<k>/metrics.json and val_embeddings.npz)")
    summary = summarise_folds(rows)
    table = format_table(summary)
    atomic_write_json(out_dir / layout.OOF_SCORES, summary)
    atomic_write_text(out_dir / layout.OOF_SCORES_MD,
                      f"# Out-of-fold scores: {exp_dir.name}\n\nPairs inside each fold's "
                      f"validation images, scored by that fold's model.\n\n{table}\n")
    if not quiet:
        print(f"out-of-fold scores ({exp_dir}):\n{table}")
    return summary


def floor_for(cfg: Config, device: str) -> FloorFn | None:
    """File names of train.csv -> their plain floor embeddings (`floor.enabled`), else None."""
    if not cfg.floor.enabled:
        return None
    floor = FloorEmbedder(cfg, device)
    return lambda names: floor.embed(names, layout.data_files(cfg).train)


def report_floor(what: str, summary: dict) -> None:
    """Print the one line that says an experiment ends below the plain floor, if it does."""
    line = below_floor(what, summary.get("mean"), summary.get("floor_mean"))
    if line:
        print(line)


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    saved = layout.model_dir(cfg) / layout.RUN_CONFIG
    if saved.is_file():  # the floor of the experiment's own backbone and starting weights
        trained = load_saved_config(saved)
        cfg = Config({**cfg, "model": trained.model, "seed": trained.seed})
    summary = score_experiment(layout.model_dir(cfg), out_dir=layout.work_dir(cfg),
                               floor=floor_for(cfg, resolve_device(cfg.device)))
    report_floor(f"experiment {cfg.exp!r} out of fold:", summary)
