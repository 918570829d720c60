"""`python -m jaguar_reid.pseudo exp=A | exps=A,B [pseudo.min_precision=0.98]`: pseudo-labels
for the test images, with a threshold whose precision is measured, not guessed.

1. Out of fold: each finished fold of each experiment gives its validation images a posterior
   over that fold's training identities (softmax of the scaled cosine to each identity's mean
   training embedding); `retrieval.pseudo.ensemble_votes` turns the experiments' posteriors
   into a label and a confidence. The folds must be `closed` (validation identities have
   training images, as the test's do), so the label can be right or wrong: that gives the
   precision and coverage of every threshold, and the threshold for `pseudo.min_precision`.
2. On the test: the same fold models, with prototypes from every training image (the fold's
   training and validation images, already embedded in step 1), vote per fold as above;
   `retrieval.pseudo.fold_votes` averages the folds' confidences.
3. The test images at or above the threshold are written to `pseudo.csv` (filename, identity,
   confidence), the curve beside it; with `test_labels.csv`, their real precision is printed.

Train on them with `bash train.sh data.pseudo=PATH train.init=A exp=A_pl1 ...`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from jaguar_reid import layout
from jaguar_reid.config import Config, experiment_names, load_config
from jaguar_reid.data.csv_tables import DataError, pair_image_names, read_test_csv, read_train_csv
from jaguar_reid.io_utils import UserInputError, atomic_path, resolve_device
from jaguar_reid.retrieval.embedding import (
    combine_views,
    embed_fold,
    ensure_oof_views,
    require_finished_folds,
)
from jaguar_reid.retrieval.postprocess import identity_posteriors, mean_prototypes
from jaguar_reid.retrieval.votes import (
    Curve,
    choose_threshold,
    ensemble_votes,
    fold_votes,
    precision_coverage,
)
from jaguar_reid.text import markdown_table

PRECISION_LEVELS = (1.0, 0.99, 0.98, 0.95, 0.9, 0.8)  # rows of the printed curve


class PseudoError(UserInputError):
    """Pseudo-labels cannot be chosen from these experiments."""


def _posteriors(emb: np.ndarray, train: np.ndarray, train_labels: np.ndarray,
                scale: float) -> tuple[np.ndarray, np.ndarray]:
    classes, protos = mean_prototypes(train, train_labels)
    return classes, identity_posteriors(emb, protos, scale)


def _same_classes(per_model: list[tuple[np.ndarray, np.ndarray]], where: str) -> np.ndarray:
    classes = per_model[0][0]
    if any(not np.array_equal(c, classes) for c, _ in per_model[1:]):
        raise PseudoError(f"{where}: the experiments train on different identities; pseudo-"
                          "labels need experiments trained on the same folds file")
    return classes


def shared_folds(cfg: Config, exps: list[str]) -> list[int]:
    folds = sorted(set.intersection(*(set(require_finished_folds(cfg, e)) for e in exps)))
    if not folds:
        raise PseudoError(f"experiments {', '.join(exps)} share no finished validation fold")
    return folds


def out_of_fold(cfg: Config, exps: list[str], folds: list[int], views: list[str],
                device: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of every validation image of the folds, one vote per experiment."""
    confidence, correct = [], []
    for fold in folds:
        per_model = []
        for exp in exps:
            saved = ensure_oof_views(cfg, exp, fold, views, device)
            if not saved.train:
                raise PseudoError(
                    f"experiment {exp!r} fold {fold}: its validation identities have no "
                    "training images (grouped folds), so no pseudo-label can be checked "
                    "there; train the experiment on closed folds (folds.strategy=closed)")
            per_model.append(_posteriors(combine_views(saved.val, views),
                                         combine_views(saved.train, views),
                                         saved.train_labels, cfg.pseudo.scale))
        classes = _same_classes(per_model, f"fold {fold}")
        label, conf = ensemble_votes([p for _, p in per_model])
        confidence.append(conf)
        correct.append(classes[label] == saved.val_labels)
    return np.concatenate(confidence), np.concatenate(correct)


def on_test(cfg: Config, exps: list[str], folds: list[int], views: list[str],
            device: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(test image names, identity, confidence) from every fold model of every experiment."""
    files = layout.data_files(cfg)
    names = pair_image_names(read_test_csv(files.test))
    per_fold, classes = [], None
    for fold in folds:
        per_model = []
        for exp in exps:
            got = embed_fold(cfg, exp, fold, tuple(views), False, names, files, device)
            # Prototypes from every training image: the fold's own training and validation
            # images, which out_of_fold has already embedded with this model.
            saved = ensure_oof_views(cfg, exp, fold, views, device)
            every = np.concatenate([combine_views(saved.train, views),
                                    combine_views(saved.val, views)])
            labels = np.concatenate([saved.train_labels, saved.val_labels])
            per_model.append(_posteriors(combine_views(got.test, views), every, labels,
                                         cfg.pseudo.scale))
        classes = _same_classes(per_model, f"test, fold {fold}")
        per_fold.append([p for _, p in per_model])
    label, confidence = fold_votes(per_fold)
    return names, classes[label], confidence


def curve_table(curve: Curve, test_conf: np.ndarray, levels: tuple[float, ...]) -> str:
    """For each precision level: its threshold, out-of-fold coverage and test images kept."""
    rows = []
    for level in levels:
        t = choose_threshold(curve, level)
        if t is None:
            rows.append([f"{level:.2f}", "none", "0.000", "0"])
            continue
        coverage = curve.coverage[np.flatnonzero(curve.thresholds == t)[0]]
        rows.append([f"{level:.2f}", f"{t:.4f}", f"{coverage:.3f}",
                     str(int((test_conf >= t).sum()))])
    return markdown_table(["precision at least", "threshold", "OOF coverage",
                           "test images kept"], rows)


def real_precision(cfg: Config, kept: pd.DataFrame, names: list[str],
                   identity: np.ndarray) -> dict | None:
    """With test_labels.csv: precision of the kept pseudo-labels, and of every test image's."""
    path = layout.data_files(cfg).test_labels
    if not path.is_file():
        return None
    labels = read_train_csv(path)
    truth = dict(zip(labels["filename"], labels["ground_truth"], strict=True))
    missing = [n for n in names if n not in truth]
    if missing:
        raise DataError(f"{path}: no label for {len(missing)} test image(s), e.g. {missing[:3]}")
    right = np.array([truth[n] == i for n, i in zip(names, identity, strict=True)])
    kept_right = np.array([truth[n] == i for n, i in zip(kept["filename"], kept["identity"],
                                                        strict=True)], dtype=bool)
    return {"kept": len(kept), "kept_precision": float(kept_right.mean()) if len(kept) else None,
            "all_precision": float(right.mean())}


def write_csv(df: pd.DataFrame, path: Path) -> None:
    if path.exists():
        print(f"replacing {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.10f")


def run(cfg: Config) -> dict:
    exps = experiment_names(cfg)
    device = resolve_device(cfg.device)
    views = list(dict.fromkeys(["orig", *cfg.embed.tta]))
    folds = shared_folds(cfg, exps)
    confidence, correct = out_of_fold(cfg, exps, folds, views, device)
    curve = precision_coverage(confidence, correct)
    names, identity, test_conf = on_test(cfg, exps, folds, views, device)
    levels = tuple(sorted({*PRECISION_LEVELS, cfg.pseudo.min_precision}, reverse=True))
    print(f"out of fold: {len(confidence)} validation images of folds "
          f"{', '.join(map(str, folds))}, {correct.mean():.3f} labelled right at coverage 1")
    print(curve_table(curve, test_conf, levels))
    threshold = choose_threshold(curve, cfg.pseudo.min_precision)
    if threshold is None:
        raise PseudoError(f"no threshold reaches precision {cfg.pseudo.min_precision} out of "
                          f"fold (the most confident images: {curve.precision[0]:.3f}); lower "
                          "pseudo.min_precision or train better models")
    keep = test_conf >= threshold
    kept = pd.DataFrame({"filename": np.array(names)[keep], "identity": identity[keep],
                         "confidence": test_conf[keep]}).sort_values(
        "confidence", ascending=False, kind="stable")
    name = "+".join(exps)
    path = layout.pseudo_path(cfg, name)
    write_csv(pd.DataFrame({"threshold": curve.thresholds, "precision": curve.precision,
                            "coverage": curve.coverage}), path.with_name(layout.PSEUDO_CURVE))
    write_csv(kept, path)
    result = {"file": str(path), "threshold": threshold, "kept": int(keep.sum()),
              "test_images": len(names), "oof_images": len(confidence), "folds": folds,
              "real": real_precision(cfg, kept, names, identity)}
    print(f"threshold {threshold:.4f} (out-of-fold precision >= {cfg.pseudo.min_precision}): "
          f"{result['kept']} of {len(names)} test images pseudo-labelled -> {path}")
    real = result["real"]
    if real is not None:
        shown = "n/a" if real["kept_precision"] is None else f"{real['kept_precision']:.3f}"
        print(f"test_labels.csv: the kept pseudo-labels are {shown} right (every test image's "
              f"label: {real['all_precision']:.3f})")
    return result


def main(argv: list[str]) -> None:
    run(load_config(argv))


if __name__ == "__main__":
    from jaguar_reid.cli import run_step

    run_step("pseudo")
