"""The calibration's fits and thresholds against independent computations: the temperature
against a grid of the likelihood, the thresholds against brute force over every candidate,
the logistic against a direct minimisation, the rates against counting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_softmax

from jaguar_reid.identify.calibration import (
    Calibration,
    Decision,
    KnownQueries,
    fit_decision,
    fit_temperature,
    max_false_new_threshold,
    pick_threshold,
    rates_at,
    unmeasured_rates,
)


def _known(seed: int, temperature: float, n: int = 3000, classes: int = 20) -> KnownQueries:
    """Queries whose individual is drawn from softmax(temperature x similarity)."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-0.2, 0.8, (n, classes))
    p = np.exp(log_softmax(temperature * scores, axis=1))
    truth = np.array([rng.choice(classes, p=row) for row in p])
    half = n // 2
    return KnownQueries([scores[:half], scores[half:]], [truth[:half], truth[half:]])


def test_temperature_is_the_likelihoods_maximum_and_recovers_the_truth():
    known = _known(0, 12.0)
    fitted = fit_temperature(known)
    scores, truth = np.concatenate(known.scores), np.concatenate(known.truth)
    grid = np.linspace(8, 16, 321)  # steps of 0.025
    nll = [-log_softmax(t * scores, axis=1)[np.arange(len(truth)), truth].sum() for t in grid]
    assert fitted == pytest.approx(grid[int(np.argmin(nll))], abs=0.03)
    assert fitted == pytest.approx(12.0, rel=0.1)


def test_max_false_new_threshold_is_the_highest_that_keeps_the_share():
    rng = np.random.default_rng(1)
    z = np.round(rng.normal(size=997), 2)  # ties on purpose
    for share in (0.01, 0.05, 0.2):
        t = max_false_new_threshold(z, share)
        assert np.mean(z < t) <= share
        higher = np.unique(z[z > t])
        assert not len(higher) or np.mean(z < higher[0]) > share


def test_rates_are_counts():
    known_z = np.array([0.1, 0.5, 0.9, 0.95, 0.3])
    right = np.array([True, False, True, False, True])
    new_z = np.array([0.2, 0.6, 0.4, 0.1])
    r = rates_at(0.45, known_z, right, new_z, new_share=0.25)
    assert (r.known, r.new) == (5, 4)
    assert r.top1 == pytest.approx(3 / 5)
    assert (r.known_named_right, r.known_named_wrong, r.known_called_new) == \
        pytest.approx((1 / 5, 2 / 5, 2 / 5))
    assert (r.new_named, r.new_called_new) == pytest.approx((1 / 4, 3 / 4))
    assert r.precision_known == pytest.approx(1 / 3)
    # named photos: 0.75 x 3/5 of the known ones, 0.25 x 1/4 of the new; right: 0.75 x 1/5
    assert r.precision == pytest.approx(0.75 * 0.2 / (0.75 * 0.6 + 0.25 * 0.25))
    alone = rates_at(0.45, known_z, right, None, new_share=0.25)
    assert alone.new_named is None and alone.precision is None and alone.new == 0


def _precision(t: float, known_z, right, new_z, share: float) -> float:
    named, new_named = known_z >= t, np.mean(new_z >= t)
    kept = (1 - share) * named.mean() + share * new_named
    return (1 - share) * (named & right).mean() / kept if kept else 0.0


def test_min_precision_threshold_matches_brute_force():
    rng = np.random.default_rng(2)
    known_z = rng.normal(1.0, 1.0, 400)
    right = rng.random(400) < expit(2 * known_z)  # more confident, more often right
    new_z = rng.normal(-1.0, 1.0, 300)
    for share, target in ((0.5, 0.9), (0.2, 0.95), (0.5, 0.8)):
        chosen = pick_threshold("min_precision", target, known_z, right, new_z, share)
        candidates = np.unique(np.r_[known_z, new_z])[::-1]  # highest first
        ok = [_precision(t, known_z, right, new_z, share) >= target for t in candidates]
        stop = ok.index(False) if False in ok else len(ok)
        assert chosen == candidates[stop - 1]


def test_an_unreachable_precision_is_an_error():
    known_z = np.array([1.0, 0.5])
    with pytest.raises(ValueError, match="no threshold reaches precision"):
        pick_threshold("min_precision", 0.99, known_z, np.array([False, True]), None, 0.5)


def _direct_logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Balanced weighted log-loss minimised directly (no penalty): [coef..., intercept]."""
    w = np.where(y, 0.5 / y.mean(), 0.5 / (1 - y.mean()))

    def loss(theta):
        z = x @ theta[:-1] + theta[-1]
        return float(w @ np.logaddexp(0, np.where(y, -z, z)))
    return minimize(loss, np.zeros(x.shape[1] + 1), method="BFGS").x


def test_decision_is_a_balanced_logistic_with_nonnegative_weights():
    rng = np.random.default_rng(3)
    top_known, top_new = rng.normal(0.8, 0.08, 600), rng.normal(0.6, 0.08, 200)
    known = np.column_stack([top_known, np.abs(rng.normal(0.15, 0.05, 600))])
    new = np.column_stack([top_new, np.abs(rng.normal(0.05, 0.03, 200))])
    d = fit_decision(known, new)
    x = np.concatenate([known, new])
    y = np.r_[np.ones(600, bool), np.zeros(200, bool)]
    direct = _direct_logistic(x, y)
    assert d.method == "logistic" and d.clamped == ()
    assert [*d.coef, d.intercept] == pytest.approx(direct.tolist(), rel=0.02, abs=0.05)
    z = d.score(known[:3])
    assert d.known_probability(z, 0.5) == pytest.approx(expit(z))
    assert d.known_probability(z, 0.2) == pytest.approx(expit(z + math.log(4)))


def test_a_feature_that_points_the_wrong_way_is_held_at_zero():
    rng = np.random.default_rng(4)
    known = np.column_stack([rng.normal(0.8, 0.05, 500), rng.normal(0.05, 0.02, 500)])
    new = np.column_stack([rng.normal(0.6, 0.05, 500), rng.normal(0.15, 0.02, 500)])
    d = fit_decision(known, new)
    assert d.clamped == ("margin",) and d.coef[1] == 0 and d.coef[0] > 0
    assert fit_decision(known, None) == Decision("top_similarity", (1.0, 0.0), 0.0)


def test_calibration_round_trips_through_json_and_names_a_bad_key():
    known = _known(5, 10.0, n=200, classes=5)
    rates = rates_at(0.3, np.linspace(0, 1, 10), np.ones(10, bool), None, 0.5)
    cal = Calibration("nearest", ("orig", "flip"), fit_temperature(known),
                      Decision("top_similarity", (1.0, 0.0), 0.0), 0.3, "max_false_new", 0.05,
                      0.5, rates, unmeasured_rates(None, "max_false_new"), {"closed_exp": "a"})
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal
    assert "unmeasured" in back.promise() and "30.0%" in back.promise()
    broken = cal.to_dict()
    del broken["threshold"]
    with pytest.raises(ValueError, match="threshold"):
        Calibration.from_dict(broken)
    with pytest.raises(ValueError, match="format"):
        Calibration.from_dict({**cal.to_dict(), "format": 99})
