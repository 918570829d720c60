"""Out-of-fold scores of an experiment: `python -m src.scoring exp=NAME`.

Fold models embed into different spaces, so pairs are formed only inside one fold's
validation images, scored with that fold's model; the experiment's figure is the mean over
folds. Writes `oof_scores.json` and `oof_scores.md` beside the folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.config import load_config
from src.data import DataError
from src.io_utils import atomic_write_json, atomic_write_text, read_json, run_main
from src.metrics import identity_balanced_map, pair_roc_auc

METRICS = ("pair_auc", "map")
# The retrieval embeddings a fold saves beside the chosen one (see src.model.RETRIEVAL_MODES).
RETRIEVAL_KINDS = ("neck", "backbone", "both")
METRIC_NAMES = {"pair_auc": "pair ROC-AUC", "map": "identity-balanced mAP"}


def score_embeddings(emb_n: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cosine similarity of L2-normalised embeddings (N, D) -> both metrics over all pairs."""
    sim = emb_n.astype(np.float64) @ emb_n.astype(np.float64).T
    return {"pair_auc": pair_roc_auc(sim, labels), "map": identity_balanced_map(sim, labels)}


def collect_fold_scores(exp_dir: Path) -> list[dict]:
    """One row per finished validation fold: fold, images, identities, metrics (and untrained)."""
    rows = []
    for fold_path in sorted(exp_dir.glob("fold[0-9]*"), key=lambda p: int(p.name[4:])):
        npz_path = fold_path / "val_embeddings.npz"
        if not (fold_path / "metrics.json").is_file() or not npz_path.is_file():
            continue
        with np.load(npz_path, allow_pickle=False) as data:
            emb, labels = data["embeddings"], data["labels"]
            kinds = {k: data[k] for k in RETRIEVAL_KINDS if k in data.files}
            names = data["filenames"] if "filenames" in data.files else None
        for values in (emb, *kinds.values()):
            bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
            if len(bad):  # NaN would rank last and give a plausible, wrong score
                which = names[bad[0]] if names is not None else f"row {bad[0]}"
                raise DataError(f"{npz_path}: the embedding of {which} is not finite "
                                f"({len(bad)} row(s)); train fold {fold_path.name[4:]} again")
        row = {"fold": int(fold_path.name[4:]), "images": len(labels),
               "identities": len(np.unique(labels)), **score_embeddings(emb, labels)}
        if kinds:
            row["by_kind"] = {k: score_embeddings(e, labels) for k, e in kinds.items()}
        untrained = read_json(fold_path / "metrics.json").get("untrained")
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
    for kind in RETRIEVAL_KINDS:
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
    lines = ["| fold | images | identities | pair AUC | mAP |", "|---|---|---|---|---|"]
    for row in summary["folds"]:
        lines.append(f"| {row['fold']} | {row['images']} | {row['identities']} | "
                     f"{row['pair_auc']:.4f} | {row['map']:.4f} |")
    mean = summary["mean"]
    lines.append(f"| mean | | | {mean['pair_auc']:.4f} | {mean['map']:.4f} |")
    if "untrained_mean" in summary:
        base = summary["untrained_mean"]
        lines.append(f"| untrained (epoch 0) | | | {base['pair_auc']:.4f} | {base['map']:.4f} |")
    if summary.get("by_kind"):
        lines += ["", "| retrieval embedding (mean of folds) | pair AUC | mAP | "
                  "before training: pair AUC | mAP |", "|---|---|---|---|---|"]
        for kind, entry in summary["by_kind"].items():
            base = entry.get("untrained", {"pair_auc": float("nan"), "map": float("nan")})
            lines.append(f"| {kind} | {entry['pair_auc']:.4f} | {entry['map']:.4f} | "
                         f"{base['pair_auc']:.4f} | {base['map']:.4f} |")
    return "\n".join(lines)


def score_experiment(exp_dir: str | Path, quiet: bool = False) -> dict:
    exp_dir = Path(exp_dir)
    rows = collect_fold_scores(exp_dir)
    if not rows:
        raise FileNotFoundError(f"{exp_dir}: no finished validation folds "
                                "(fold<k>/metrics.json and val_embeddings.npz)")
    summary = summarise(rows)
    table = format_table(summary)
    atomic_write_json(exp_dir / "oof_scores.json", summary)
    atomic_write_text(exp_dir / "oof_scores.md",
                      f"# Out-of-fold scores: {exp_dir.name}\n\nPairs inside each fold's "
                      f"validation images, scored by that fold's model.\n\n{table}\n")
    if not quiet:
        print(f"out-of-fold scores ({exp_dir}):\n{table}")
    return summary


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    score_experiment(Path(cfg.output_dir) / cfg.exp)


if __name__ == "__main__":
    run_main(main)
