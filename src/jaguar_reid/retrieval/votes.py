"""Pseudo-labels, the selection core: each unlabelled image gets the training identity its
models agree on, with a confidence, and a confidence threshold is chosen where its precision is
known, from out-of-fold images whose identities have training images (`closed` folds), as the
test's do.

Pure arrays in and out. The posteriors come from `postprocess.identity_posteriors` (softmax of
the scaled cosine to each identity's prototype), one array per fold model or experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def ensemble_votes(posteriors: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One (N, C) posterior per model, over the same C identities -> (label, confidence), each
    (N,). The label is the argmax of the mean posterior. The confidence is the share of models
    whose own argmax is that label, times the mean posterior's margin (top-1 minus top-2): a
    label one fold model disputes, or two identities nearly tied, both lower it."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in posteriors])
    if stack.ndim != 3 or stack.shape[2] < 2:
        raise ValueError(f"posteriors must be (models, N, C) with C >= 2; got {stack.shape}")
    mean = stack.mean(axis=0)
    label = mean.argmax(axis=1)
    agreement = (stack.argmax(axis=2) == label[None]).mean(axis=0)
    top2 = np.sort(mean, axis=1)[:, -2:]
    return label, agreement * (top2[:, 1] - top2[:, 0])


def fold_votes(per_fold: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Test images voted on by several fold models, each fold with one posterior per
    experiment -> (label, confidence). The label is the argmax of the mean of every posterior.
    The confidence is each fold's own `ensemble_votes` confidence (0 where that fold chose
    another label), averaged over the folds: each term is measured on the same scale as the
    out-of-fold confidence, where one model per experiment votes, so the out-of-fold curve
    reads it; averaging fold models only removes noise."""
    if not per_fold:
        raise ValueError("fold_votes needs at least one fold")
    mean = np.mean([np.mean(np.stack(f), axis=0) for f in per_fold], axis=0)
    label = mean.argmax(axis=1)
    confidence = np.zeros(len(label))
    for posteriors in per_fold:
        fold_label, fold_conf = ensemble_votes(posteriors)
        confidence += np.where(fold_label == label, fold_conf, 0.0)
    return label, confidence / len(per_fold)


@dataclass(frozen=True)
class Curve:
    """Precision and coverage of the images kept at each threshold (kept: confidence >= t),
    thresholds from the highest to the lowest."""

    thresholds: np.ndarray
    precision: np.ndarray
    coverage: np.ndarray


def precision_coverage(confidence: np.ndarray, correct: np.ndarray) -> Curve:
    """The curve over every distinct confidence; `correct`: the pseudo-label was right."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidence.shape != correct.shape or confidence.ndim != 1 or not confidence.size:
        raise ValueError("confidence and correct must be 1-D arrays of the same, non-zero "
                         f"length; got {confidence.shape} and {correct.shape}")
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], np.cumsum(correct[order])
    # The last position of each distinct confidence: ties are kept or dropped together.
    last = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    kept = last + 1
    return Curve(thresholds=conf[last], precision=hits[last] / kept,
                 coverage=kept / confidence.size)


def choose_threshold(curve: Curve, min_precision: float) -> float | None:
    """The lowest threshold at which the kept images, and those of every higher threshold,
    are at least `min_precision` right; None when even the most confident images are not.
    Every higher threshold too: a lucky run of right labels further down must not open the
    gate past a stretch that fell short."""
    meets = curve.precision >= min_precision
    if not meets[0]:
        return None
    fails = np.flatnonzero(~meets)
    end = fails[0] if fails.size else meets.size
    return float(curve.thresholds[end - 1])
