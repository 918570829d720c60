"""Submission: fold models -> test embeddings -> similarity of every test.csv row.

`python submit.py exp=NAME [key=value ...]` embeds the test images with each fold model of the
experiment, ensembles the L2-normalised embeddings, scores every (query, gallery) row by cosine
similarity mapped to [0, 1], checks the result against sample_submission.csv and writes it
atomically. Where `test_labels.csv` lies beside test.csv it also scores the submission with the
leaderboard metric. Nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.cache import prepare_images
from src.config import Config, load_config, load_saved_config
from src.data import (
    DataError,
    data_files,
    pair_image_names,
    read_sample_submission,
    read_test_csv,
    read_train_csv,
)
from src.embed import embed_images, ensemble_embeddings
from src.io_utils import atomic_path, atomic_write_json, read_json, resolve_device, run_main
from src.metrics import identity_balanced_map, pair_roc_auc, pairs_to_matrix
from src.model import load_trained_model
from src.train import fold_dir, parse_fold_spec


def cosine_to_unit(cos: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1], strictly increasing, so every ranking is kept."""
    return np.clip((cos + 1.0) / 2.0, 0.0, 1.0)


def pair_similarity(emb_n: np.ndarray, query_idx: np.ndarray,
                    gallery_idx: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows `query_idx[i]`, `gallery_idx[i]` of L2-normalised (N, D)."""
    sim = emb_n.astype(np.float32) @ emb_n.astype(np.float32).T
    return sim[query_idx, gallery_idx].astype(np.float64)


def pair_indices(test_df: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    position = {name: i for i, name in enumerate(names)}
    query = test_df["query_image"].map(position)
    gallery = test_df["gallery_image"].map(position)
    for column, idx in (("query_image", query), ("gallery_image", gallery)):
        if idx.isna().any():
            row = idx.index[idx.isna()][0]
            raise DataError(f"test.csv: row {row + 2}: {column} {test_df.at[row, column]!r} "
                            "is not among the embedded images")
    return query.to_numpy(np.int64), gallery.to_numpy(np.int64)


def build_submission(test_df: pd.DataFrame, similarity: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"row_id": test_df["row_id"].to_numpy(), "similarity": similarity})


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame, sample_path: str | Path) -> None:
    """Same row_ids in the same order as the sample, every similarity finite and in [0, 1]."""
    if len(sub) != len(sample):
        raise DataError(f"submission has {len(sub)} rows but {sample_path} has {len(sample)}")
    ids, expected = sub["row_id"].to_numpy(), sample["row_id"].to_numpy()
    mismatch = np.flatnonzero(ids != expected)
    if len(mismatch):
        i = mismatch[0]
        raise DataError(f"submission row {i}: row_id {ids[i]} but {sample_path} has "
                        f"{expected[i]} there (row_ids must match in order)")
    values = sub["similarity"].to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if len(bad):
        i = bad[0]
        raise DataError(f"submission row {i} (row_id {ids[i]}): similarity {values[i]} is not a "
                        f"finite number in [0, 1] ({len(bad)} such rows)")


def write_submission(sub: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    if path.exists():
        print(f"replacing {path}")
    with atomic_path(path, suffix=".csv") as tmp:
        sub.to_csv(tmp, index=False, float_format="%.7f")


def score_submission(test_df: pd.DataFrame, similarity: np.ndarray,
                     labels_df: pd.DataFrame) -> dict[str, float]:
    """The leaderboard metric on a submission, from the rows as written (local test labels)."""
    names = pair_image_names(test_df)
    label_of = dict(zip(labels_df["filename"], labels_df["ground_truth"], strict=True))
    missing = [n for n in names if n not in label_of]
    if missing:
        raise DataError(f"test_labels.csv: no label for {len(missing)} test image(s), "
                        f"e.g. {missing[:3]}")
    query, gallery = pair_indices(test_df, names)
    sim = pairs_to_matrix(query, gallery, similarity, len(names))
    labels = np.array([label_of[n] for n in names])
    return {"map": identity_balanced_map(sim, labels), "pair_auc": pair_roc_auc(sim, labels)}


def _fold_config(cfg: Config, fold: int | str) -> tuple[Config, Path]:
    """The fold's own saved config for the model, with today's data and embedding settings."""
    directory = fold_dir(cfg, fold)
    weights, saved = directory / "model.safetensors", directory / "config.yaml"
    saved_cfg = load_saved_config(saved)
    model = saved_cfg.model
    if cfg.submit.retrieval:  # the retrieval embedding is a choice made after training
        model = Config({**model, "retrieval": cfg.submit.retrieval})
    merged = Config({**saved_cfg, "model": model, "embed": cfg.embed, "device": cfg.device,
                     "cache": cfg.cache,
                     "output_dir": cfg.output_dir,
                     "data": Config({**saved_cfg.data, "dir": cfg.data.dir,
                                     "num_workers": cfg.data.num_workers})})
    return merged, weights


def run(cfg: Config) -> dict:
    files = data_files(cfg)
    exp_dir = Path(cfg.output_dir) / cfg.exp
    folds = parse_fold_spec(cfg.submit.folds, cfg.folds.n_folds)
    missing = [str(fold_dir(cfg, f)) for f in folds
               if not (fold_dir(cfg, f) / "model.safetensors").is_file()
               or not (fold_dir(cfg, f) / "config.yaml").is_file()]
    if missing:
        raise FileNotFoundError(
            f"experiment {cfg.exp!r}: no trained model in {', '.join(missing)}; train them "
            f"(bash train.sh exp={cfg.exp} fold=...) or choose submit.folds=..."
        )
    test_df = read_test_csv(files["test"])
    sample = read_sample_submission(files["sample"])
    names = pair_image_names(test_df)
    query, gallery = pair_indices(test_df, names)
    device = resolve_device(cfg.device)

    per_fold = []
    for fold in folds:
        fold_cfg, weights = _fold_config(cfg, fold)
        # Test images are prepared the way this fold's model saw its training images.
        paths, load, _ = prepare_images(fold_cfg, names, files["test"], "test images")
        model = load_trained_model(fold_cfg, weights)
        print(f"embedding {len(paths)} test images with {weights}")
        per_fold.append(embed_images(model, paths, fold_cfg, device, load))
    emb_n = ensemble_embeddings(per_fold, cfg.submit.ensemble)
    similarity = cosine_to_unit(pair_similarity(emb_n, query, gallery))
    sub = build_submission(test_df, similarity)
    validate_submission(sub, sample, files["sample"])

    # Everything this run makes is named after its submission file, so a second submission
    # of the same experiment (other folds, other settings) never replaces the first's extras.
    out_path = Path(cfg.submit.file) if cfg.submit.file else exp_dir / "submission.csv"
    stem = out_path.with_suffix("")
    with atomic_path(f"{stem}.embeddings.npz", suffix=".npz") as tmp:
        np.savez(tmp, embeddings=emb_n, filenames=np.array(names))
    write_submission(sub, out_path)
    print(f"wrote {out_path} ({len(sub)} rows, folds {', '.join(str(f) for f in folds)})")

    result: dict = {"submission": str(out_path), "rows": len(sub), "folds": folds}
    if files["test_labels"].is_file():
        labels_df = read_train_csv(files["test_labels"])
        result["test"] = score_submission(test_df, similarity, labels_df)
        oof = exp_dir / "oof_scores.json"
        result["oof"] = read_json(oof)["mean"] if oof.is_file() else None
        atomic_write_json(f"{stem}.scores.json", result)
        print(_cv_vs_test(result))
    return result


def _cv_vs_test(result: dict) -> str:
    test, oof = result["test"], result["oof"]
    lines = ["| | identity-balanced mAP | pair AUC |", "|---|---|---|"]
    if oof:
        lines.append(f"| out-of-fold (mean over folds) | {oof['map']:.4f} | "
                     f"{oof['pair_auc']:.4f} |")
    lines.append(f"| local test (test_labels.csv) | {test['map']:.4f} | {test['pair_auc']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    cfg = load_config(argv)
    run(cfg)


if __name__ == "__main__":
    run_main(main)
