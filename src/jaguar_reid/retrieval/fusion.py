"""Fusion of the global similarity with local keypoint verification into one pair similarity.

For each query, the top-B gallery images by the global similarity are re-checked by local
keypoint matching, which gives an inlier count per verified pair. This module maps
(global similarity, inlier count, verified?) to ONE similarity in [0, 1] with a calibration
fitted by scikit-learn on labelled out-of-fold pairs, never a hand-set weight, and applies the
fitted calibration to the test pairs.

Conventions shared by every function:

* A **pair** is one (query, gallery) entry. ``similarity``, ``inliers`` and ``verified`` are
  arrays of one shape (a flat list of pairs, or a (Q, G) matrix); they are flattened to P pairs
  for fitting and `FusionModel.predict` returns the input's shape.
* ``similarity`` is the global similarity in [0, 1]; NaN or anything outside is an error.
* ``inliers`` is the number of geometrically consistent keypoint matches, >= 0 (a float is
  allowed, e.g. a weighted count). A pair that was not verified must carry 0 inliers: a
  nonzero count there means the caller mixed up its arrays, and it is refused.
* ``verified`` and ``same_identity`` are booleans (or 0/1).

Methods (`METHODS`):

* **"logistic"**: `sklearn.linear_model.LogisticRegression` on `pair_features`; the fused
  similarity is the predicted probability. ``class_weight="balanced"``: same-identity pairs
  are a few percent of all pairs, and an unweighted log-loss is then dominated by the mass of
  easy negatives, so the fitted direction would mostly push far negatives down rather than
  separate positives from the hard negatives around them. Balancing gives each class the same
  total weight. The probabilities are then those of a balanced prior, not the true prevalence,
  which does not matter here: the metric (identity-balanced mAP) only ranks pairs.
* **"isotonic"**: the same (monotone) linear score, then
  `sklearn.isotonic.IsotonicRegression` of that score to the labels (same balanced weights),
  stored as its thresholds and applied with `np.interp`. It corrects a sigmoid that is the
  wrong shape for the score, at the price of flat steps (see `TIE_BREAK`). With the
  tie-break, the output is strictly increasing in the linear score, exactly as the logistic's
  sigmoid is: both methods rank every set of pairs identically, so a ranking metric cannot
  tell them apart. The isotonic map only changes the values (a calibration closer to the
  balanced pair frequencies), which matters where the fused similarity is compared to a
  threshold or blended further, not for the mAP of the fused similarity itself.

**Monotonicity.** The fused similarity never decreases when the global similarity or the
inlier count increases (the verified flag held fixed): more evidence for a match must never
rank a pair lower. A logistic fit can break that when, in the fitting pairs, a feature is
anti-correlated with the label once the others are known (a small sample, a leaky top-B).
The constraint coefficient >= 0 on the features of `MONOTONE` is enforced exactly: if the
unconstrained fit has a negative one, every subset of the monotone features is refitted with
the others fixed at 0, and the feasible fit with the lowest penalised weighted log-loss is
kept (for a convex loss, that is the constrained optimum). The clamped features are reported
in `FusionModel.clamped` so a caller can log them: a clamp says the local matcher carried no
usable signal on those pairs. The verified flag is free in sign (see `pair_features`).

**Cross-fitting.** A calibration scored on the pairs it was fitted on looks better than it
is. `cross_fitted` gives every pair a score from a calibration fitted on the other folds'
pairs only, so out-of-fold scores of the fused similarity (and the choice of method) are
honest; the test pairs are then scored by `fit_fusion` on all labelled pairs.

The fitted model is plain numbers (`FusionModel.to_dict` / `from_dict`, JSON-safe), so it
travels between machines and library versions without pickles; prediction needs numpy only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_sample_weight

FEATURES = ("similarity", "log_inliers", "verified")  # the columns of `pair_features`
MONOTONE = ("similarity", "log_inliers")  # features whose coefficient is kept >= 0
METHODS = ("logistic", "isotonic")
DEFAULT_METHOD = "logistic"
LOGISTIC_C = 1.0  # sklearn's inverse L2 strength: with thousands of pairs, nearly unpenalised
LOGISTIC_TOL = 1e-8  # tight, so the fit is a property of the data, not of the solver's stop
LOGISTIC_MAX_ITER = 1000
# Isotonic tie-break: the output is (1 - eps) * isotonic(z) + eps * sigmoid(z). The flat steps
# of an isotonic fit merge pairs of different linear score z into one value, which throws
# ranking information away; the eps term orders pairs inside a step by z, is too small to
# reorder pairs of different steps by more than eps, and keeps the output in [0, 1].
TIE_BREAK = 1e-6
FORMAT_VERSION = 1  # of `FusionModel.to_dict`; bumped when its meaning changes


# ---------------------------------------------------------------------------- inputs


def _as_flag(name: str, value: np.ndarray) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be booleans (or 0/1), got values {np.unique(arr)[:5]}")
    return arr.astype(bool)


def _check_pairs(similarity: np.ndarray, inliers: np.ndarray, verified: np.ndarray,
                 **labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Checked float64 similarity and inliers, boolean verified (and labels), all flattened."""
    named = {"similarity": similarity, "inliers": inliers, "verified": verified, **labels}
    arrays = {k: np.asarray(v) for k, v in named.items()}
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} has {s[0] if len(s) == 1 else s}" for k, s in shapes.items())
        raise ValueError(f"pair arrays differ in length: {listed}")
    sim = arrays["similarity"].astype(np.float64).ravel()
    if not np.isfinite(sim).all():
        raise ValueError(f"similarity has {int((~np.isfinite(sim)).sum())} NaN/inf values")
    if sim.size and (sim.min() < 0.0 or sim.max() > 1.0):
        raise ValueError(f"similarity must lie in [0, 1], got [{sim.min():.6g}, {sim.max():.6g}]")
    inl = arrays["inliers"].astype(np.float64).ravel()
    if not np.isfinite(inl).all():
        raise ValueError(f"inliers has {int((~np.isfinite(inl)).sum())} NaN/inf values")
    if inl.size and inl.min() < 0:
        raise ValueError(f"inliers must be >= 0 (counts), got a minimum of {inl.min():.6g}")
    flags = {k: _as_flag(k, a).ravel() for k, a in arrays.items()
             if k not in ("similarity", "inliers")}
    if (inl[~flags["verified"]] != 0).any():
        raise ValueError("inliers must be 0 where verified is False (pairs that were not "
                         f"checked), got {int((inl[~flags['verified']] != 0).sum())} nonzero")
    return (sim, inl, *flags.values())


def pair_features(similarity: np.ndarray, inliers: np.ndarray,
                  verified: np.ndarray) -> np.ndarray:
    """(P, 3) float64 features of each pair, in the order of `FEATURES`:

    * ``similarity``: the global evidence, already in [0, 1];
    * ``log_inliers``: ``log1p(inliers)``. Inlier counts are heavy-tailed (a few pairs of the
      same flank reach hundreds); evidence grows with the count but the step from 0 to 10
      matters far more than from 200 to 210, which a log expresses, and log1p keeps 0 at 0;
    * ``verified`` (0/1): without it, "not checked" (outside the top-B) and "checked, no
      geometric support" both read inliers = 0, yet the second is evidence against a match
      and the first is no evidence at all. Its coefficient is free in sign.
    """
    sim, inl, ver = _check_pairs(similarity, inliers, verified)
    return np.column_stack([sim, np.log1p(inl), ver.astype(np.float64)])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # no overflow for large |z|


# ---------------------------------------------------------------------------- model


@dataclass(frozen=True)
class FusionModel:
    """A fitted calibration: plain numbers, so it saves to JSON and predicts with numpy only.

    ``coef`` follows `FEATURES`; ``clamped`` names the `MONOTONE` features whose coefficient
    was held at 0 to keep the fit monotone. ``x_thresholds`` / ``y_thresholds`` are the
    isotonic map of the linear score (empty for "logistic")."""

    method: str
    coef: tuple[float, ...]
    intercept: float
    clamped: tuple[str, ...] = ()
    x_thresholds: tuple[float, ...] = ()
    y_thresholds: tuple[float, ...] = ()
    tie_break: float = TIE_BREAK

    def __post_init__(self) -> None:
        _check_model(self)

    def linear_score(self, similarity: np.ndarray, inliers: np.ndarray,
                     verified: np.ndarray) -> np.ndarray:
        """The logistic's linear score z = features @ coef + intercept, of the input's shape."""
        features = pair_features(similarity, inliers, verified)
        z = features @ np.asarray(self.coef, dtype=np.float64) + self.intercept
        return z.reshape(np.shape(similarity))

    def predict(self, similarity: np.ndarray, inliers: np.ndarray,
                verified: np.ndarray) -> np.ndarray:
        """The fused similarity in [0, 1], of the input's shape."""
        z = self.linear_score(similarity, inliers, verified)
        if self.method == "logistic":
            return _sigmoid(z)
        steps = np.interp(z, self.x_thresholds, self.y_thresholds)  # clips outside the fit
        return (1.0 - self.tie_break) * steps + self.tie_break * _sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (Python floats round-trip exactly through `json`)."""
        return {"format": FORMAT_VERSION, "method": self.method, "features": list(FEATURES),
                "coef": [float(c) for c in self.coef], "intercept": float(self.intercept),
                "clamped": list(self.clamped),
                "x_thresholds": [float(x) for x in self.x_thresholds],
                "y_thresholds": [float(y) for y in self.y_thresholds],
                "tie_break": float(self.tie_break)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionModel:
        """The model `to_dict` wrote; a ValueError naming the key on anything amiss."""
        for key in ("format", "method", "features", "coef", "intercept", "clamped",
                    "x_thresholds", "y_thresholds", "tie_break"):
            if key not in data:
                raise ValueError(f"fusion model: missing key {key!r}")
        if data["format"] != FORMAT_VERSION:
            raise ValueError(f"fusion model: key 'format' is {data['format']!r}, this code "
                             f"reads {FORMAT_VERSION}")
        if tuple(data["features"]) != FEATURES:
            raise ValueError(f"fusion model: key 'features' is {data['features']!r}, this code "
                             f"computes {list(FEATURES)}")
        return cls(method=data["method"], coef=_numbers(data, "coef"),
                   intercept=_scalar(data, "intercept"),
                   clamped=tuple(str(c) for c in data["clamped"]),
                   x_thresholds=_numbers(data, "x_thresholds"),
                   y_thresholds=_numbers(data, "y_thresholds"),
                   tie_break=_scalar(data, "tie_break"))


def _numbers(data: Mapping[str, Any], key: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in np.atleast_1d(np.asarray(data[key], dtype=np.float64)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"fusion model: key {key!r} must hold numbers ({err})") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"fusion model: key {key!r} holds NaN/inf")
    return values


def _scalar(data: Mapping[str, Any], key: str) -> float:
    if isinstance(data[key], (list, tuple, dict)):
        raise ValueError(f"fusion model: key {key!r} must be one number, got {data[key]!r}")
    return _numbers(data, key)[0]


def _check_model(model: FusionModel) -> None:
    """The invariants `predict` relies on; messages name the `to_dict` key."""
    if model.method not in METHODS:
        raise ValueError(f"fusion model: key 'method' is {model.method!r}, expected one of "
                         f"{METHODS}")
    if len(model.coef) != len(FEATURES):
        raise ValueError(f"fusion model: key 'coef' has {len(model.coef)} values, expected "
                         f"{len(FEATURES)} ({', '.join(FEATURES)})")
    if unknown := set(model.clamped) - set(MONOTONE):
        raise ValueError(f"fusion model: key 'clamped' names {sorted(unknown)}, not in "
                         f"{MONOTONE}")
    if len(model.x_thresholds) != len(model.y_thresholds):
        raise ValueError("fusion model: keys 'x_thresholds' and 'y_thresholds' differ in "
                         f"length ({len(model.x_thresholds)} vs {len(model.y_thresholds)})")
    if model.method == "isotonic" and not model.x_thresholds:
        raise ValueError("fusion model: key 'x_thresholds' is empty for method 'isotonic'")
    if np.any(np.diff(model.x_thresholds) < 0) or np.any(np.diff(model.y_thresholds) < 0):
        raise ValueError("fusion model: keys 'x_thresholds'/'y_thresholds' must be "
                         "non-decreasing")
    if not 0.0 <= model.tie_break < 1.0:
        raise ValueError(f"fusion model: key 'tie_break' must lie in [0, 1), got "
                         f"{model.tie_break}")


# ---------------------------------------------------------------------------- fitting


def _fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, columns: list[int],
                  c: float, tol: float, max_iter: int) -> tuple[np.ndarray, float, float]:
    """Coefficients (zeros outside ``columns``), intercept and penalised weighted log-loss of
    a balanced logistic fit on ``x[:, columns]``."""
    coef = np.zeros(x.shape[1])
    if columns:
        fit = LogisticRegression(C=c, class_weight="balanced", tol=tol, max_iter=max_iter)
        fit.fit(x[:, columns], y)
        coef[columns], intercept = fit.coef_[0], float(fit.intercept_[0])
    else:  # nothing left but the intercept: the balanced prior, log-odds 0
        intercept = 0.0
    z = x @ coef + intercept
    # sklearn's objective up to a positive factor: sum_i w_i * logloss_i + |coef|^2 / (2C)
    loss = float(weight @ np.logaddexp(0.0, np.where(y, -z, z))) + coef @ coef / (2.0 * c)
    return coef, intercept, loss


def _fit_monotone(x: np.ndarray, y: np.ndarray, c: float, tol: float,
                  max_iter: int) -> tuple[np.ndarray, float, tuple[str, ...]]:
    """The balanced logistic fit with the coefficients of `MONOTONE` kept >= 0 (see the
    module docstring): coef, intercept and the clamped feature names."""
    weight = compute_sample_weight("balanced", y)
    monotone = [FEATURES.index(f) for f in MONOTONE]
    free = [i for i in range(len(FEATURES)) if i not in monotone]
    best: tuple[float, np.ndarray, float, tuple[str, ...]] | None = None
    # Largest subsets first: the full fit, when feasible, is the answer and stops the search.
    for size in range(len(monotone), -1, -1):
        for kept in itertools.combinations(monotone, size):
            coef, intercept, loss = _fit_logistic(x, y, weight, sorted(free + list(kept)),
                                                  c, tol, max_iter)
            if (coef[monotone] < 0).any():
                continue
            clamped = tuple(FEATURES[i] for i in monotone if i not in kept)
            if best is None or loss < best[0]:
                best = (loss, coef, intercept, clamped)
        if best is not None and size == len(monotone):
            break
    assert best is not None  # the fit without monotone features is always feasible
    return best[1], best[2], best[3]


def fit_fusion(similarity: np.ndarray, inliers: np.ndarray, verified: np.ndarray,
               same_identity: np.ndarray, method: str = DEFAULT_METHOD, *,
               c: float = LOGISTIC_C, tie_break: float = TIE_BREAK, tol: float = LOGISTIC_TOL,
               max_iter: int = LOGISTIC_MAX_ITER) -> FusionModel:
    """Fit the calibration of `method` on labelled pairs (``same_identity``: True when the two
    images show the same jaguar)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    if not 0.0 <= tie_break < 1.0:
        raise ValueError(f"tie_break must lie in [0, 1), got {tie_break}")
    sim, inl, ver, y = _check_pairs(similarity, inliers, verified, same_identity=same_identity)
    if y.all() or not y.any():
        raise ValueError(f"cannot fit a calibration from pairs of one class: {int(y.sum())} "
                         f"same-identity and {int((~y).sum())} different-identity pairs")
    x = pair_features(sim, inl, ver)
    coef, intercept, clamped = _fit_monotone(x, y, c, tol, max_iter)
    model = FusionModel("logistic", tuple(float(v) for v in coef), intercept, clamped,
                        tie_break=tie_break)
    if method == "logistic":
        return model
    z = model.linear_score(sim, inl, ver)
    iso = IsotonicRegression(out_of_bounds="clip", increasing=True, y_min=0.0, y_max=1.0)
    iso.fit(z, y.astype(np.float64), sample_weight=compute_sample_weight("balanced", y))
    return FusionModel("isotonic", model.coef, intercept, clamped,
                       tuple(float(v) for v in iso.X_thresholds_),
                       tuple(float(v) for v in iso.y_thresholds_), tie_break)


def cross_fitted(groups: np.ndarray, similarity: np.ndarray, inliers: np.ndarray,
                 verified: np.ndarray, same_identity: np.ndarray,
                 method: str = DEFAULT_METHOD, *, c: float = LOGISTIC_C,
                 tie_break: float = TIE_BREAK, tol: float = LOGISTIC_TOL,
                 max_iter: int = LOGISTIC_MAX_ITER) -> np.ndarray:
    """Out-of-fold fused similarity of every pair: the pairs of fold g are scored by a
    calibration fitted on the pairs of the other folds only (``groups``: fold id per pair).
    Returns the input's shape."""
    groups = np.asarray(groups)
    shape = np.shape(similarity)
    if groups.shape != shape:
        raise ValueError(f"pair arrays differ in length: groups has {groups.shape}, "
                         f"similarity has {shape}")
    sim, inl, ver, y = _check_pairs(similarity, inliers, verified, same_identity=same_identity)
    folds = np.unique(groups.ravel())
    if len(folds) < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds in groups, got {len(folds)}")
    flat = groups.ravel()
    out = np.empty(sim.shape, dtype=np.float64)
    for fold in folds:
        held, train = flat == fold, flat != fold
        try:
            model = fit_fusion(sim[train], inl[train], ver[train], y[train], method, c=c,
                               tie_break=tie_break, tol=tol, max_iter=max_iter)
        except ValueError as err:
            raise ValueError(f"fold {fold.item()!r}: fitting on the other folds' pairs: "
                             f"{err}") from None
        out[held] = model.predict(sim[held], inl[held], ver[held])
    return out.reshape(shape)
