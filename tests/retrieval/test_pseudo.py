"""The pseudo-label selection core against plain loops."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_reid.retrieval.votes import (
    choose_threshold,
    ensemble_votes,
    fold_votes,
    precision_coverage,
)


def _votes_by_loop(posteriors):
    n = posteriors[0].shape[0]
    labels, confidence = [], []
    for i in range(n):
        mean = [sum(p[i][c] for p in posteriors) / len(posteriors)
                for c in range(posteriors[0].shape[1])]
        best = max(range(len(mean)), key=lambda c: (mean[c], -c))
        ranked = sorted(mean, reverse=True)
        agree = sum(int(np.argmax(p[i]) == best) for p in posteriors) / len(posteriors)
        labels.append(best)
        confidence.append(agree * (ranked[0] - ranked[1]))
    return np.array(labels), np.array(confidence)


def test_votes_match_a_plain_loop():
    rng = np.random.default_rng(0)
    posteriors = [rng.dirichlet(np.ones(6), size=40) for _ in range(5)]
    label, confidence = ensemble_votes(posteriors)
    ref_label, ref_conf = _votes_by_loop(posteriors)
    assert np.array_equal(label, ref_label)
    assert np.allclose(confidence, ref_conf, atol=1e-12)


def test_a_disputed_label_is_less_confident_than_an_agreed_one():
    agreed = np.array([[0.7, 0.2, 0.1]])
    disputed = np.array([[0.3, 0.5, 0.2]])  # one model of three prefers identity 1
    label, confidence = ensemble_votes([agreed, agreed, agreed])
    assert label[0] == 0 and confidence[0] == pytest.approx(0.5)
    label, confidence = ensemble_votes([agreed, agreed, disputed])
    mean = (2 * agreed + disputed) / 3
    assert label[0] == 0
    assert confidence[0] == pytest.approx(2 / 3 * (mean[0, 0] - mean[0, 1]))
    with pytest.raises(ValueError, match="C >= 2"):
        ensemble_votes([np.ones((3, 1))])


def _curve_by_loop(confidence, correct):
    rows = []
    for t in sorted(set(confidence.tolist()), reverse=True):
        kept = [c for x, c in zip(confidence, correct, strict=True) if x >= t]
        rows.append((t, sum(kept) / len(kept), len(kept) / len(confidence)))
    return rows


def test_curve_matches_a_plain_loop_with_ties():
    rng = np.random.default_rng(1)
    confidence = rng.integers(0, 8, size=60) / 8.0  # many ties
    correct = rng.random(60) < confidence
    curve = precision_coverage(confidence, correct)
    ref = _curve_by_loop(confidence, correct)
    assert np.allclose(curve.thresholds, [r[0] for r in ref])
    assert np.allclose(curve.precision, [r[1] for r in ref])
    assert np.allclose(curve.coverage, [r[2] for r in ref])
    assert curve.coverage[-1] == 1.0


def test_threshold_stops_before_the_first_stretch_that_falls_short():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([True, True, False, True, True, True])
    curve = precision_coverage(confidence, correct)
    # precision by threshold: 1, 1, 2/3, 3/4, 4/5, 5/6
    assert choose_threshold(curve, 1.0) == pytest.approx(0.8)
    # 0.8 is met again from 0.5 down, but 0.7 and 0.6 fell short: the gate stays at 0.8.
    assert choose_threshold(curve, 0.8) == pytest.approx(0.8)
    assert choose_threshold(curve, 0.6) == pytest.approx(0.4)
    wrong_first = precision_coverage(np.array([0.9, 0.1]), np.array([False, True]))
    assert choose_threshold(wrong_first, 0.5) is None
    with pytest.raises(ValueError, match="same, non-zero length"):
        precision_coverage(np.array([0.5]), np.array([True, False]))


def test_fold_votes_average_each_folds_own_confidence():
    rng = np.random.default_rng(3)
    per_fold = [[rng.dirichlet(np.ones(5), size=30) for _ in range(2)] for _ in range(4)]
    label, confidence = fold_votes(per_fold)
    every = [p for fold in per_fold for p in fold]
    for i in range(30):
        mean = sum(p[i] for p in every) / len(every)
        assert label[i] == int(np.argmax(mean))
        terms = []
        for fold in per_fold:
            own_label, own_conf = _votes_by_loop([p[i:i + 1] for p in fold])
            terms.append(own_conf[0] if own_label[0] == label[i] else 0.0)
        assert confidence[i] == pytest.approx(sum(terms) / len(terms), abs=1e-12)


def test_one_fold_votes_as_the_out_of_fold_models_do():
    rng = np.random.default_rng(4)
    fold = [rng.dirichlet(np.ones(4), size=12) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(fold_votes([fold]), ensemble_votes(fold),
                                                      strict=True))
    with pytest.raises(ValueError, match="at least one fold"):
        fold_votes([])
