"""Tests for jaguar_reid.retrieval.fusion: the fitted fusion of global similarity and inlier
counts against AUCs, a plain Newton fit, monotonicity and the JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from jaguar_reid.retrieval.fusion import (
    FEATURES,
    LOGISTIC_C,
    METHODS,
    FusionModel,
    cross_fitted,
    fit_fusion,
    pair_features,
)

# ---------------------------------------------------------------------------- data


def _pairs(n: int, seed: int, inliers_inform: bool = True,
           positive_rate: float = 0.08) -> tuple[np.ndarray, ...]:
    """Synthetic pairs: latent global evidence u and local evidence v; the label depends on
    u + v (or on u alone when the inliers carry no information). Only the top 70% by
    similarity are verified, the rest carry 0 inliers, as the pipeline's top-B does."""
    rng = np.random.default_rng(seed)
    u, v, noise = rng.normal(size=(3, n))
    signal = u + v if inliers_inform else u
    y = signal + 0.3 * noise > np.quantile(signal + 0.3 * noise, 1.0 - positive_rate)
    sim = np.clip(0.5 + 0.12 * u, 0.0, 1.0)
    verified = sim > np.quantile(sim, 0.3)
    local = v if inliers_inform else rng.normal(size=n)
    inliers = np.where(verified, np.round(np.exp(1.5 + 0.7 * local)), 0.0)
    return sim, inliers, verified, y


def _newton_logistic(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """Independent reference: Newton's method on sum_i w_i logloss_i + |beta|^2 / (2c) with
    balanced weights w = n / (2 n_class) and an unpenalised intercept; returns
    [beta..., intercept]."""
    xt = np.column_stack([x, np.ones(len(x))])
    w = np.where(y, len(y) / (2.0 * y.sum()), len(y) / (2.0 * (~y).sum()))
    penalty = np.diag([1.0 / c] * x.shape[1] + [0.0])
    theta = np.zeros(xt.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-xt @ theta))
        grad = xt.T @ (w * (p - y)) + penalty @ theta
        hess = xt.T @ (xt * (w * p * (1.0 - p))[:, None]) + penalty
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    return theta


def _grid() -> tuple[np.ndarray, np.ndarray]:
    sim, inl = np.meshgrid(np.linspace(0.0, 1.0, 41), np.arange(0, 300, 7.0), indexing="ij")
    return sim, inl  # axis 0: similarity rises, axis 1: inliers rise


def _assert_monotone(model: FusionModel) -> None:
    sim, inl = _grid()
    for flag in (True, False):
        inliers = inl if flag else np.zeros_like(inl)
        fused = model.predict(sim, inliers, np.full(sim.shape, flag))
        assert fused.shape == sim.shape
        assert (np.diff(fused, axis=0) >= 0).all(), "decreases as similarity rises"
        assert (np.diff(fused, axis=1) >= 0).all(), "decreases as inliers rise"
        assert ((fused >= 0) & (fused <= 1)).all()


# ---------------------------------------------------------------------------- quality


@pytest.mark.parametrize("method", METHODS)
def test_fusion_beats_each_feature_when_both_inform(method):
    model = fit_fusion(*_pairs(4000, seed=1), method=method)
    sim, inl, ver, y = _pairs(4000, seed=2)  # scored on fresh pairs
    fused = roc_auc_score(y, model.predict(sim, inl, ver))
    alone = roc_auc_score(y, sim), roc_auc_score(y, inl)
    assert fused > max(alone) + 0.04, (fused, alone)
    assert fused > 0.97


def test_uninformative_inliers_barely_change_the_similarity_ranking():
    model = fit_fusion(*_pairs(4000, seed=3, inliers_inform=False))
    sim, inl, ver, y = _pairs(4000, seed=4, inliers_inform=False)
    fused, alone = roc_auc_score(y, model.predict(sim, inl, ver)), roc_auc_score(y, sim)
    assert fused > alone - 0.005, (fused, alone)


# ---------------------------------------------------------------------------- logistic


def test_logistic_matches_an_independent_newton_fit():
    sim, inl, ver, y = _pairs(1500, seed=5)
    model = fit_fusion(sim, inl, ver, y, "logistic")
    assert model.clamped == ()
    x = np.column_stack([sim, np.log1p(inl), ver.astype(float)])
    theta = _newton_logistic(x, y, LOGISTIC_C)
    expected = 1.0 / (1.0 + np.exp(-(x @ theta[:-1] + theta[-1])))
    np.testing.assert_allclose(model.predict(sim, inl, ver), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.coef, theta[:-1], rtol=1e-4, atol=1e-4)


def test_pair_features_are_documented_columns():
    x = pair_features(np.array([0.2, 0.9]), np.array([0, 12]), np.array([False, True]))
    np.testing.assert_array_equal(x, [[0.2, 0.0, 0.0], [0.9, np.log1p(12), 1.0]])
    assert x.shape[1] == len(FEATURES)


def _anti_inlier_pairs(seed: int) -> tuple[np.ndarray, ...]:
    """Fitting data where, given the similarity, more inliers mean a different identity."""
    rng = np.random.default_rng(seed)
    n = 2000
    u = rng.normal(size=n)
    y = u + 0.5 * rng.normal(size=n) > 1.3
    sim = np.clip(0.5 + 0.12 * u, 0.0, 1.0)
    verified = np.ones(n, bool)
    inliers = np.round(np.exp(2.0 + 0.6 * rng.normal(size=n) - 1.2 * y))
    return sim, inliers, verified, y


def test_negative_inlier_coefficient_is_clamped_to_the_constrained_fit():
    sim, inl, ver, y = _anti_inlier_pairs(seed=6)
    x = pair_features(sim, inl, ver)
    free = LogisticRegression(class_weight="balanced", tol=1e-10, max_iter=1000).fit(x, y)
    assert free.coef_[0][FEATURES.index("log_inliers")] < -0.5  # sklearn goes negative here
    model = fit_fusion(sim, inl, ver, y)
    assert model.clamped == ("log_inliers",)
    assert model.coef[FEATURES.index("log_inliers")] == 0.0
    # The others are refitted without the clamped column: the Newton fit on the rest.
    keep = [FEATURES.index("similarity"), FEATURES.index("verified")]
    theta = _newton_logistic(x[:, keep], y, LOGISTIC_C)
    expected = 1.0 / (1.0 + np.exp(-(x[:, keep] @ theta[:-1] + theta[-1])))
    np.testing.assert_allclose(model.predict(sim, inl, ver), expected, rtol=0, atol=1e-6)
    _assert_monotone(model)
    _assert_monotone(fit_fusion(sim, inl, ver, y, "isotonic"))


@pytest.mark.parametrize("method", METHODS)
def test_fused_similarity_never_drops_as_evidence_rises(method):
    _assert_monotone(fit_fusion(*_pairs(2000, seed=7), method=method))


def test_both_monotone_features_clamped_leaves_only_the_verified_flag():
    rng = np.random.default_rng(8)
    n = 1000
    y = rng.random(n) < 0.2
    sim = np.clip(0.6 - 0.2 * y + 0.05 * rng.normal(size=n), 0, 1)
    inl = np.round(np.exp(2.0 - y + 0.3 * rng.normal(size=n)))
    model = fit_fusion(sim, inl, np.ones(n, bool), y)
    assert model.clamped == ("similarity", "log_inliers")
    assert model.coef[:2] == (0.0, 0.0)
    _assert_monotone(model)


# ---------------------------------------------------------------------------- isotonic


def test_isotonic_is_bounded_monotone_and_keeps_ranks_inside_flat_steps():
    sim, inl, ver, y = _pairs(2000, seed=9)
    model = fit_fusion(sim, inl, ver, y, "isotonic")
    z = model.linear_score(sim, inl, ver)
    fused = model.predict(sim, inl, ver)
    assert ((fused >= 0) & (fused <= 1)).all()
    order = np.argsort(z, kind="stable")
    z_sorted, fused_sorted = z[order], fused[order]
    assert (np.diff(fused_sorted) >= 0).all()
    distinct = np.diff(z_sorted) > 0
    assert (np.diff(fused_sorted)[distinct] > 0).all(), "distinct scores were merged"
    # The steps are real: without the tie-break most distinct scores tie.
    flat = fit_fusion(sim, inl, ver, y, "isotonic", tie_break=0.0).predict(sim, inl, ver)
    assert (np.diff(flat[order])[distinct] == 0).mean() > 0.5
    assert np.abs(flat - fused).max() <= 1e-6
    # The stored thresholds reproduce sklearn's own isotonic fit of the same score.
    w = np.where(y, len(y) / (2.0 * y.sum()), len(y) / (2.0 * (~y).sum()))
    iso = IsotonicRegression(out_of_bounds="clip").fit(z, y.astype(float), sample_weight=w)
    probe = np.linspace(z.min() - 1, z.max() + 1, 500)
    np.testing.assert_allclose(np.interp(probe, model.x_thresholds, model.y_thresholds),
                               iso.predict(probe), atol=1e-12)


# ---------------------------------------------------------------------------- saving


@pytest.mark.parametrize("method", METHODS)
def test_json_round_trip_predicts_identically(method):
    sim, inl, ver, y = _pairs(1000, seed=10)
    model = fit_fusion(sim, inl, ver, y, method)
    back = FusionModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back == model
    np.testing.assert_array_equal(back.predict(sim, inl, ver), model.predict(sim, inl, ver))


@pytest.mark.parametrize("key", ["format", "method", "features", "coef", "intercept",
                                 "clamped", "x_thresholds", "y_thresholds", "tie_break"])
def test_from_dict_names_a_missing_key(key):
    data = fit_fusion(*_pairs(500, seed=11), method="isotonic").to_dict()
    del data[key]
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        FusionModel.from_dict(data)


@pytest.mark.parametrize(("key", "value"), [("method", "svm"), ("coef", [1.0, 2.0]),
                                            ("features", ["similarity", "inliers"]),
                                            ("intercept", "nan"), ("format", 99)])
def test_from_dict_names_a_wrong_value(key, value):
    data = fit_fusion(*_pairs(500, seed=12)).to_dict()
    data[key] = value
    with pytest.raises(ValueError, match=f"key '{key}'"):
        FusionModel.from_dict(data)


# ---------------------------------------------------------------------------- cross-fitting


@pytest.mark.parametrize("method", METHODS)
def test_cross_fitted_never_uses_the_folds_own_labels(method):
    sim, inl, ver, y = _pairs(2400, seed=13)
    groups = np.arange(len(y)) % 3
    base = cross_fitted(groups, sim, inl, ver, y, method)
    flipped = y.copy()
    flipped[groups == 1] = ~flipped[groups == 1]
    again = cross_fitted(groups, sim, inl, ver, flipped, method)
    np.testing.assert_array_equal(again[groups == 1], base[groups == 1])
    assert np.abs(again[groups != 1] - base[groups != 1]).max() > 1e-3  # the flip was seen
    # Each fold is scored by the fit on the other folds.
    held = groups == 0
    model = fit_fusion(sim[~held], inl[~held], ver[~held], y[~held], method)
    np.testing.assert_array_equal(base[held], model.predict(sim[held], inl[held], ver[held]))


def test_cross_fitted_needs_two_folds():
    sim, inl, ver, y = _pairs(200, seed=14)
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_fitted(np.zeros(len(y), int), sim, inl, ver, y)


def test_cross_fitted_names_the_fold_whose_training_pairs_are_one_class():
    sim, inl, ver, y = _pairs(200, seed=15)
    groups = np.where(y, 1, 0)  # fold 0's training pairs (fold 1) are all positives
    with pytest.raises(ValueError, match="fold 0.*one class"):
        cross_fitted(groups, sim, inl, ver, y)


# ---------------------------------------------------------------------------- bad inputs


def _good() -> dict[str, np.ndarray]:
    sim, inl, ver, y = _pairs(100, seed=16, positive_rate=0.2)
    return {"similarity": sim, "inliers": inl, "verified": ver, "same_identity": y}


@pytest.mark.parametrize(("change", "message"), [
    ({"inliers": np.zeros(99)}, r"inliers has 99.*similarity has 100|similarity has 100.*"
                                r"inliers has 99"),
    ({"same_identity": np.ones(100, bool)}, "cannot fit a calibration from pairs of one class"),
    ({"same_identity": np.zeros(100, bool)}, "cannot fit a calibration from pairs of one class"),
    ({"similarity": np.full(100, np.nan)}, "similarity has 100 NaN"),
    ({"similarity": np.linspace(0, 1.2, 100)}, r"similarity must lie in \[0, 1\]"),
    ({"similarity": np.linspace(-0.1, 1, 100)}, r"similarity must lie in \[0, 1\]"),
    ({"inliers": np.full(100, -1.0)}, "inliers must be >= 0"),
    ({"inliers": np.full(100, np.nan)}, "inliers has 100 NaN"),
    ({"inliers": np.full(100, 3.0), "verified": np.zeros(100, bool)},
     "inliers must be 0 where verified is False"),
    ({"verified": np.full(100, 2)}, "verified must be booleans"),
    ({"same_identity": np.full(100, 0.5)}, "same_identity must be booleans"),
])
def test_fit_refuses_bad_pairs(change, message):
    args = _good() | change
    with pytest.raises(ValueError, match=message):
        fit_fusion(**args)


def test_fit_refuses_unknown_method_and_bad_knobs():
    with pytest.raises(ValueError, match="method must be one of"):
        fit_fusion(**_good(), method="svm")
    with pytest.raises(ValueError, match="tie_break"):
        fit_fusion(**_good(), tie_break=1.0)
    with pytest.raises(ValueError, match="c must be > 0"):
        fit_fusion(**_good(), c=0.0)


def test_predict_checks_its_pairs_and_keeps_their_shape():
    model = fit_fusion(**_good())
    with pytest.raises(ValueError, match=r"similarity must lie in \[0, 1\]"):
        model.predict(np.array([1.5]), np.array([0]), np.array([False]))
    sim, inl = _grid()
    assert model.predict(sim, inl, np.ones(sim.shape, bool)).shape == sim.shape
    assert model.predict(np.zeros(0), np.zeros(0), np.zeros(0, bool)).shape == (0,)
