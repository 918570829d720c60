"""The calibration of identification, fitted on out-of-fold queries (`identify.calibrate`
gathers them), and what it promises. Pure: arrays in, a `Calibration` of plain numbers out.

Two kinds of out-of-fold query, each scored against its fold's training photos by that fold's
model (the model never saw the query):

* **known**: a closed fold's validation photo; its individual has training photos.
* **new**: a grouped fold's validation photo; its individual has none (never seen at all).

Three things are fitted:

1. **P(individual | known)**: softmax(T x similarity) over the gallery's individuals, the
   temperature T by maximum likelihood on the known queries (temperature scaling).
2. **The known-vs-new score** z of a photo: with new queries, a balanced logistic regression
   of known against new on (top similarity, its margin over the second), each coefficient
   kept >= 0 (more similarity never makes a photo look newer); P(known) = sigmoid(z + log((1 -
   s) / s)) for a share s of new individuals (`identify.new_share`; balanced weights fit the
   odds of s = 0.5). Without new queries z is the top similarity and P(known) is not given.
3. **The threshold** on z, for a target: `max_false_new` (the highest threshold that calls
   at most that share of known photos new) or `min_precision` (the lowest threshold at which
   named photos, and those of every higher threshold, are right at least that often, new
   individuals counted at share s).

The rates at the threshold are measured on the same out-of-fold queries and stored beside it;
a rate that needs queries that were not given is `None` and named in `unmeasured`, never
guessed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_sample_weight

from jaguar_reid.identify.candidates import decision_features
from jaguar_reid.keys import choices
from jaguar_reid.retrieval.votes import Curve, choose_threshold

FORMAT = 1  # of `Calibration.to_dict`; bumped when its meaning changes
FEATURES = ("top_similarity", "margin")  # `candidates.decision_features`, in order
TARGETS = choices("identify.target")
LOGISTIC = "logistic"
TOP_SIMILARITY = "top_similarity"
# Similarities are cosines (a spread of tenths): an almost unpenalised fit, so the odds are the
# data's, not the penalty's.
LOGISTIC_C = 1e4
TEMPERATURE_RANGE = (0.1, 1000.0)


class CalibrationError(ValueError):
    """A calibration that cannot be fitted from these queries; the message says why."""


@dataclass(frozen=True)
class KnownQueries:
    """Out-of-fold queries whose individual is in their gallery, of every fold: each fold's
    similarities to its gallery individuals (their number differs by fold) and the index of
    the query's own individual."""

    scores: Sequence[np.ndarray]  # per fold (Q_f, C_f)
    truth: Sequence[np.ndarray]   # per fold (Q_f,)

    def features(self) -> np.ndarray:
        return np.concatenate([decision_features(s) for s in self.scores])

    def right(self) -> np.ndarray:
        """Whether each query's most similar individual is its own."""
        return np.concatenate([np.argmax(s, axis=1) == t
                               for s, t in zip(self.scores, self.truth, strict=True)])

    def __len__(self) -> int:
        return sum(len(t) for t in self.truth)


@dataclass(frozen=True)
class Decision:
    """The known-vs-new score z = features @ coef + intercept (see the module docstring)."""

    method: str  # logistic | top_similarity
    coef: tuple[float, float]
    intercept: float
    clamped: tuple[str, ...] = ()  # features whose coefficient was held at 0

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ np.asarray(self.coef) + self.intercept

    def known_probability(self, z: np.ndarray, new_share: float) -> np.ndarray | None:
        """P(known individual) at a share `new_share` of new ones; None without a logistic."""
        if self.method != LOGISTIC:
            return None
        shifted = np.asarray(z, dtype=np.float64) + math.log((1 - new_share) / new_share)
        return np.exp(-np.logaddexp(0.0, -shifted))


@dataclass(frozen=True)
class Rates:
    """What the threshold does to out-of-fold queries: shares of the known ones (named right,
    named wrong, called new) and of the new ones (called new, given a known name). `None`:
    not measured (no such queries)."""

    known: int
    new: int
    top1: float  # known queries whose most similar individual is theirs (no threshold)
    known_named_right: float
    known_named_wrong: float
    known_called_new: float
    new_called_new: float | None
    new_named: float | None
    precision: float | None  # named photos given the right name, new ones at new_share
    precision_known: float  # the same among known individuals only


@dataclass(frozen=True)
class Calibration:
    """Everything `Identifier` needs besides the models and the gallery; plain numbers."""

    score: str  # identify.score it was fitted with
    views: tuple[str, ...]
    temperature: float
    decision: Decision
    threshold: float
    target: str
    target_value: float
    new_share: float
    rates: Rates
    unmeasured: tuple[str, ...] = ()
    sources: Mapping[str, Any] = field(default_factory=dict)
    retrieval: str = ""  # submit.retrieval the gallery was embedded with ("": model.retrieval)
    run_id: str = ""  # the calibrate run that wrote it, also in its gallery

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["views"] = list(self.views)
        out["decision"]["coef"] = list(self.decision.coef)
        out["decision"]["clamped"] = list(self.decision.clamped)
        out["unmeasured"] = list(self.unmeasured)
        out["sources"] = dict(self.sources)
        return {"format": FORMAT, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """What `to_dict` wrote; a ValueError naming the key on anything amiss."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"key 'format' is {got!r}; this code reads {FORMAT}")
        try:
            decision = Decision(str(data["decision"]["method"]),
                                tuple(float(c) for c in data["decision"]["coef"]),
                                float(data["decision"]["intercept"]),
                                tuple(str(c) for c in data["decision"]["clamped"]))
            rates = Rates(**data["rates"])
            cal = cls(str(data["score"]), tuple(str(v) for v in data["views"]),
                      float(data["temperature"]), decision, float(data["threshold"]),
                      str(data["target"]), float(data["target_value"]),
                      float(data["new_share"]), rates,
                      tuple(str(u) for u in data["unmeasured"]), dict(data["sources"]),
                      str(data.get("retrieval", "")), str(data.get("run_id", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed key {exc}") from None
        _check(cal)
        return cal

    def promise(self) -> str:
        """The rates at the threshold, in words."""
        return promise_text(self.rates)


def _check(cal: Calibration) -> None:
    numbers = [cal.temperature, cal.threshold, *cal.decision.coef, cal.decision.intercept]
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("keys 'temperature', 'threshold' and 'decision' must be finite")
    if cal.decision.method not in (LOGISTIC, TOP_SIMILARITY) or len(cal.decision.coef) != 2:
        raise ValueError(f"key 'decision': method {cal.decision.method!r} with "
                         f"{len(cal.decision.coef)} coefficients")
    if cal.target not in TARGETS or not 0 < cal.new_share < 1 or cal.temperature <= 0:
        raise ValueError("keys 'target', 'new_share' or 'temperature' out of range")


# ---------------------------------------------------------------------------- fitting


def fit_temperature(known: KnownQueries) -> float:
    """The T of softmax(T x similarity) that maximises the likelihood of every known query's
    own individual (the negative log-likelihood is convex in T)."""
    if not len(known):
        raise CalibrationError("no known-individual query to fit the probabilities on")

    def nll(log_t: float) -> float:
        total = 0.0
        for scores, truth in zip(known.scores, known.truth, strict=True):
            logits = math.exp(log_t) * np.asarray(scores, dtype=np.float64)
            norm = np.logaddexp.reduce(logits, axis=1)
            total -= float(np.sum(logits[np.arange(len(truth)), truth] - norm))
        return total

    low, high = (math.log(v) for v in TEMPERATURE_RANGE)
    found = minimize_scalar(nll, bounds=(low, high), method="bounded",
                            options={"xatol": 1e-6})
    return float(math.exp(found.x))


def _logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray,
              columns: list[int]) -> tuple[np.ndarray, float, float]:
    """Coefficients (0 outside `columns`), intercept and weighted log-loss of a balanced fit."""
    coef = np.zeros(x.shape[1])
    intercept = 0.0
    if columns:
        fit = LogisticRegression(C=LOGISTIC_C, class_weight="balanced", tol=1e-10,
                                 max_iter=10_000)
        fit.fit(x[:, columns], y)
        coef[columns], intercept = fit.coef_[0], float(fit.intercept_[0])
    z = x @ coef + intercept
    return coef, intercept, float(weight @ np.logaddexp(0.0, np.where(y, -z, z)))


def fit_decision(known_features: np.ndarray, new_features: np.ndarray | None) -> Decision:
    """The known-vs-new score: a balanced logistic regression with coefficients >= 0 (every
    subset of features refitted where the full fit breaks that; the feasible fit of least
    loss kept; with both held at 0, every photo gets the same score: the similarities did not
    tell known from new out of fold); without new queries, the top similarity itself."""
    if new_features is None or not len(new_features):
        return Decision(TOP_SIMILARITY, (1.0, 0.0), 0.0)
    x = np.concatenate([known_features, new_features]).astype(np.float64)
    y = np.r_[np.ones(len(known_features), bool), np.zeros(len(new_features), bool)]
    weight = compute_sample_weight("balanced", y)
    best = None
    for size in (2, 1, 0):
        for kept in itertools.combinations(range(2), size):
            coef, intercept, loss = _logistic(x, y, weight, list(kept))
            if (coef < 0).any() or (best is not None and loss >= best[0]):
                continue
            best = (loss, coef, intercept, tuple(FEATURES[i] for i in range(2) if i not in kept))
        if best is not None:
            break
    assert best is not None  # the intercept alone is always feasible
    return Decision(LOGISTIC, (float(best[1][0]), float(best[1][1])), best[2], best[3])


def rates_at(threshold: float, known_z: np.ndarray, known_right: np.ndarray,
             new_z: np.ndarray | None, new_share: float) -> Rates:
    """The shares `Rates` holds at `threshold` (named: z >= threshold)."""
    named = np.asarray(known_z) >= threshold
    right = named & np.asarray(known_right, bool)
    named_right, named_share = float(right.mean()), float(named.mean())
    precision_known = named_right / named_share if named_share else float("nan")
    new_named = None if new_z is None or not len(new_z) else float(
        np.mean(np.asarray(new_z) >= threshold))
    precision = None
    if new_named is not None:
        kept = (1 - new_share) * named_share + new_share * new_named
        precision = (1 - new_share) * named_right / kept if kept else float("nan")
    return Rates(known=len(known_z), new=0 if new_z is None else len(new_z),
                 top1=float(np.mean(known_right)), known_named_right=named_right,
                 known_named_wrong=named_share - named_right,
                 known_called_new=1.0 - named_share,
                 new_called_new=None if new_named is None else 1.0 - new_named,
                 new_named=new_named, precision=precision, precision_known=precision_known)


def precision_curve(known_z: np.ndarray, known_right: np.ndarray, new_z: np.ndarray | None,
                    new_share: float) -> Curve:
    """Precision of the named photos at every threshold (each distinct z), highest first;
    coverage: the share of known photos named."""
    values = np.concatenate([known_z, new_z if new_z is not None else []])
    thresholds = np.unique(values)[::-1]
    known_z, right = np.asarray(known_z), np.asarray(known_right, bool)
    named = known_z[None, :] >= thresholds[:, None]
    named_right = (named & right).mean(axis=1)
    named_known = named.mean(axis=1)
    if new_z is not None and len(new_z):
        named_new = (np.asarray(new_z)[None, :] >= thresholds[:, None]).mean(axis=1)
    else:
        named_new = np.zeros(len(thresholds))
    kept = (1 - new_share) * named_known + new_share * named_new
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(kept > 0, (1 - new_share) * named_right / kept, 0.0)
    return Curve(thresholds=thresholds, precision=precision, coverage=named_known)


def max_false_new_threshold(known_z: np.ndarray, share: float) -> float:
    """The highest threshold calling at most `share` of the known photos new (z below it)."""
    z = np.sort(np.asarray(known_z, dtype=np.float64))
    if not len(z):
        raise CalibrationError("no known-individual query to choose the threshold on")
    allowed = math.floor(share * len(z) + 1e-9)  # photos that may fall below the threshold
    return float(z[min(allowed, len(z) - 1)])


def pick_threshold(target: str, value: float, known_z: np.ndarray, known_right: np.ndarray,
                   new_z: np.ndarray | None, new_share: float) -> float:
    """The threshold on z for `target` (see the module docstring)."""
    if target == "max_false_new":
        return max_false_new_threshold(known_z, value)
    if target != "min_precision":
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    curve = precision_curve(known_z, known_right, new_z, new_share)
    chosen = choose_threshold(curve, value)
    if chosen is None:
        raise CalibrationError(
            f"no threshold reaches precision {value} out of fold (the most confident photos: "
            f"{curve.precision[0]:.3f}); lower identify.min_precision")
    return chosen


def unmeasured_rates(new_z: np.ndarray | None, target: str) -> tuple[str, ...]:
    """Plain sentences naming what could not be measured without new-individual queries."""
    if new_z is not None and len(new_z):
        return ()
    out = ["how often a new individual is given a known name (no grouped-fold experiment: "
           "set identify.grouped_exp)",
           "P(new individual): the probabilities are P(individual | the photo shows a known "
           "one)"]
    if target == "min_precision":
        out.append("precision with new individuals among the photos: the threshold reaches "
                   "identify.min_precision among known individuals only")
    return tuple(out)


def percent(value: float | None) -> str:
    return "unmeasured" if value is None else f"{100 * value:.1f}%"


def promise_text(rates: Rates) -> str:
    """'at this threshold, out of fold: a known individual is called new 5.0% of the time; a
    new individual is given a known name 12.0% of the time'."""
    known = (f"a known individual is called new {percent(rates.known_called_new)} of the time "
             f"and given a wrong name {percent(rates.known_named_wrong)} "
             f"({rates.known} photos)")
    if rates.new_named is None:
        new = "how often a new individual is given a known name is unmeasured (no new-" \
              "individual queries)"
    else:
        new = (f"a new individual is given a known name {percent(rates.new_named)} of the time "
               f"({rates.new} photos)")
    return f"at this threshold, out of fold: {known}; {new}"
