"""Out-of-fold scores of an experiment: `python -m jaguar_reid.scoring exp=NAME`.

Fold models embed into different spaces, so pairs are formed only inside one fold's
validation images, scored with that fold's model; the experiment's figure is the mean over
folds. Writes `oof_scores.json` and `oof_scores.md` beside the folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jaguar_reid import layout
from jaguar_reid.config import METRICS, Config, declare_choices, load_config
from jaguar_reid.data.tables import DataError
from jaguar_reid.io_utils import atomic_write_json, atomic_write_text, read_json, run_main
from jaguar_reid.retrieval.embed import embed_all
from jaguar_reid.retrieval.metrics import identity_balanced_map, pair_roc_auc
from jaguar_reid.text import markdown_table
from jaguar_reid.training.model import RETRIEVAL_MODES

TUNE_METRICS = declare_choices("tune.metric", METRICS)
MONITORS = declare_choices("train.monitor", METRICS)  # scored each epoch
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


def collect_fold_scores(exp_dir: Path) -> list[dict]:
    """One row per finished validation fold: fold, images, identities, metrics (and untrained)."""
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
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    mean = {m: float(np.nanmean([r[m] for r in rows])) for m in METRICS}
    summary = {"folds": rows, "mean": mean}
    untrained = [r["untrained"] for r in rows if "untrained" in r]
    if len(untrained) == len(rows):
        summary["untrained_mean"] = {m: float(np.nanmean([u[m] for u in untrained]))
                                     for m in METRICS}
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
                     out_dir: str | Path | None = None) -> dict:
    """Score the finished folds of the experiment in `exp_dir` (its model folder) and write
    the tables into `out_dir` (default: the same folder)."""
    exp_dir = Path(exp_dir)
    out_dir = Path(out_dir or exp_dir)
    rows = collect_fold_scores(exp_dir)
    if not rows:
        raise FileNotFoundError(f"{exp_dir}: no finished validation folds "
                                "(fold<k>/metrics.json and val_embeddings.npz)")
    summary = summarise(rows)
    table = format_table(summary)
    atomic_write_json(out_dir / layout.OOF_SCORES, summary)
    atomic_write_text(out_dir / layout.OOF_SCORES_MD,
                      f"# Out-of-fold scores: {exp_dir.name}\n\nPairs inside each fold's "
                      f"validation images, scored by that fold's model.\n\n{table}\n")
    if not quiet:
        print(f"out-of-fold scores ({exp_dir}):\n{table}")
    return summary


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    score_experiment(layout.model_dir(cfg), out_dir=layout.work_dir(cfg))


if __name__ == "__main__":
    run_main(main)
