"""Tests for jaguar_reid.retrieval.metrics against independent computations (scikit-learn and
plain loops)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from jaguar_reid.retrieval import metrics
from jaguar_reid.retrieval.metrics import (
    average_precision,
    identity_balanced_map,
    pair_roc_auc,
    pairs_to_matrix,
    per_identity_ap,
    per_query_ap,
)

# ---------------------------------------------------------------------------- references


def _fill_missing(sim: np.ndarray) -> np.ndarray:
    """NaN -> a finite value below every real score (sklearn rejects non-finite scores)."""
    sim = np.array(sim, dtype=np.float64)
    finite = sim[np.isfinite(sim)]
    low = (finite.min() if finite.size else 0.0) - 1.0
    sim[np.isnan(sim)] = low
    return sim


def ref_per_query_ap(sim: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Plain loop: sklearn AP per query over all other images."""
    sim = _fill_missing(sim)
    labels = np.asarray(labels)
    n = len(labels)
    out = np.full(n, np.nan)
    for q in range(n):
        others = np.arange(n) != q
        y = labels[others] == labels[q]
        if y.any():
            out[q] = average_precision_score(y, sim[q, others])
    return out


def ref_identity_means(sim: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    ap = ref_per_query_ap(sim, labels)
    means = {}
    for ident in sorted(set(np.asarray(labels).tolist())):
        vals = [a for a, lab in zip(ap, labels, strict=True) if lab == ident and not np.isnan(a)]
        if vals:
            means[str(ident)] = sum(vals) / len(vals)
    return means


def ref_identity_balanced_map(sim: np.ndarray, labels: np.ndarray) -> float:
    means = ref_identity_means(sim, labels)
    return float(np.mean(list(means.values()))) if means else float("nan")


def ref_pair_auc(sim: np.ndarray, labels: np.ndarray) -> float:
    sim = _fill_missing(sim)
    labels = np.asarray(labels)
    off = ~np.eye(len(labels), dtype=bool)
    same = (labels[:, None] == labels[None, :])[off]
    return float(roc_auc_score(same, sim[off]))


def random_case(seed: int, tied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Unequal identity sizes, including a singleton identity; optionally heavily tied."""
    rng = np.random.default_rng(seed)
    sizes = [1, 2, 3, 5, 8, int(rng.integers(2, 12))]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    labels = labels[rng.permutation(labels.size)]
    n = labels.size
    if tied:
        sim = rng.integers(0, 4, size=(n, n)).astype(np.float64)
    else:
        sim = rng.normal(size=(n, n))
        # Push same-identity pairs up so APs spread over (0, 1) rather than sit near chance.
        sim += 1.0 * (labels[:, None] == labels[None, :])
    return sim, labels


def perfect_sim(labels: np.ndarray) -> np.ndarray:
    return (labels[:, None] == labels[None, :]).astype(np.float64)


# ---------------------------------------------------------------------------- average_precision


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=40)
    relevant = rng.random(40) < 0.3
    relevant[0] = True
    assert average_precision(scores, relevant) == pytest.approx(
        average_precision_score(relevant, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_ties(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    scores = rng.integers(0, 3, size=30)
    relevant = rng.random(30) < 0.4
    relevant[1] = True
    assert average_precision(scores, relevant) == pytest.approx(
        average_precision_score(relevant, scores), abs=1e-12
    )


def test_average_precision_single_relevant() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    relevant = np.array([False, False, True, False, False])
    # The one relevant item is ranked 3rd -> AP = 1/3.
    assert average_precision(scores, relevant) == pytest.approx(1 / 3)
    assert average_precision(scores, relevant) == pytest.approx(
        average_precision_score(relevant, scores)
    )


def test_average_precision_tie_group_uses_precision_at_group_end() -> None:
    # Relevant item tied with one irrelevant item at the top: precision at the tie = 1/2.
    assert average_precision([1.0, 1.0, 0.0], [True, False, False]) == pytest.approx(0.5)


def test_average_precision_no_relevant_is_nan() -> None:
    assert np.isnan(average_precision([0.3, 0.2], [False, False]))


def test_average_precision_nan_score_ranks_last() -> None:
    scores = np.array([np.nan, 0.2, 0.1])
    relevant = np.array([True, False, False])
    assert average_precision(scores, relevant) == pytest.approx(1 / 3)


def test_average_precision_bad_shapes() -> None:
    with pytest.raises(ValueError, match="relevant"):
        average_precision(np.zeros(3), np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="1-D"):
        average_precision(np.zeros((2, 2)), np.zeros((2, 2), dtype=bool))


# ---------------------------------------------------------------------------- mAP


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_per_query_ap_and_map_match_reference(seed: int, tied: bool) -> None:
    sim, labels = random_case(seed, tied=tied)
    ref = ref_per_query_ap(sim, labels)
    got = per_query_ap(sim, labels)
    assert got.shape == labels.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    # The singleton identity (size 1) is skipped, not scored 0.
    assert np.isnan(got).sum() == 1
    assert identity_balanced_map(sim, labels) == pytest.approx(
        ref_identity_balanced_map(sim, labels), abs=1e-12
    )
    got_ids = per_identity_ap(sim, labels)
    ref_ids = ref_identity_means(sim, labels)
    assert got_ids.keys() == ref_ids.keys()
    for key, value in ref_ids.items():
        assert got_ids[key] == pytest.approx(value, abs=1e-12)


def test_blocked_computation_matches_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    sim, labels = random_case(7, tied=True)
    whole = per_query_ap(sim, labels)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 1)  # one query per block
    np.testing.assert_array_equal(per_query_ap(sim, labels), whole)


def test_diagonal_is_ignored() -> None:
    sim, labels = random_case(3)
    base = per_query_ap(sim, labels)
    for diag in (np.inf, -np.inf, np.nan, 0.0):
        changed = sim.copy()
        np.fill_diagonal(changed, diag)
        np.testing.assert_array_equal(per_query_ap(changed, labels), base)
        assert pair_roc_auc(changed, labels) == pair_roc_auc(sim, labels)


def test_hand_computed_case() -> None:
    # Images 0,1 = "a"; 2,3 = "b"; 4 = "c" (single image -> its query is skipped).
    labels = np.array(["a", "a", "b", "b", "c"])
    nan = np.nan
    sim = np.array(
        [
            #  0    1    2    3    4
            [nan, 0.2, 0.9, 0.1, 0.5],  # q0: order 2,4,1,3 -> positive 1 at rank 3: AP 1/3
            [0.8, nan, 0.3, 0.2, 0.1],  # q1: positive 0 first: AP 1
            [0.7, 0.3, nan, 0.5, 0.6],  # q2: order 0,4,3,1 -> positive 3 at rank 3: AP 1/3
            [0.4, 0.1, 0.4, nan, 0.2],  # q3: {0,2} tied first -> precision 1/2 there: AP 1/2
            [0.1, 0.2, 0.3, 0.4, nan],  # q4: no positive -> NaN, skipped
        ]
    )
    # a: (1/3 + 1) / 2 = 2/3;  b: (1/3 + 1/2) / 2 = 5/12;  mAP = (2/3 + 5/12) / 2 = 13/24.
    expected = Fraction(2, 3) / 2 + Fraction(5, 12) / 2
    assert expected == Fraction(13, 24)
    np.testing.assert_allclose(per_query_ap(sim, labels)[:4], [1 / 3, 1, 1 / 3, 1 / 2])
    assert np.isnan(per_query_ap(sim, labels)[4])
    assert per_identity_ap(sim, labels) == pytest.approx({"a": 2 / 3, "b": 5 / 12})
    assert identity_balanced_map(sim, labels) == pytest.approx(13 / 24)
    assert identity_balanced_map(sim, labels) == pytest.approx(
        ref_identity_balanced_map(sim, labels)
    )
    assert pair_roc_auc(sim, labels) == pytest.approx(ref_pair_auc(sim, labels))


def test_identity_balancing_differs_from_query_mean() -> None:
    # Identity A: 4 images, every A query ranks its 3 positives first -> AP 1 each.
    # Identity B: 2 images; each B query ranks image 0 (an A) above its one positive -> AP 1/2.
    labels = np.array(["A", "A", "A", "A", "B", "B"])
    sim = np.zeros((6, 6))
    sim[:4, :4] = 1.0
    sim[4, 0] = sim[5, 0] = 1.0
    sim[4, 5] = sim[5, 4] = 0.5
    ap = per_query_ap(sim, labels)
    np.testing.assert_allclose(ap, [1, 1, 1, 1, 0.5, 0.5])
    # Mean over queries: (4 * 1 + 2 * 1/2) / 6 = 5/6; identity-balanced: (1 + 1/2) / 2 = 3/4.
    assert np.mean(ap) == pytest.approx(5 / 6)
    assert identity_balanced_map(sim, labels) == pytest.approx(3 / 4)
    assert per_identity_ap(sim, labels) == pytest.approx({"A": 1.0, "B": 0.5})


def test_labels_dtype_does_not_matter() -> None:
    sim, labels = random_case(11)
    as_str = np.array([f"jaguar_{lab}" for lab in labels])
    assert identity_balanced_map(sim, labels) == identity_balanced_map(sim, as_str)
    assert pair_roc_auc(sim, labels) == pair_roc_auc(sim, as_str)
    assert set(per_identity_ap(sim, as_str)) == {
        f"jaguar_{k}" for k in per_identity_ap(sim, labels)
    }
    assert all(isinstance(k, str) for k in per_identity_ap(sim, labels))


def test_missing_scores_rank_last() -> None:
    sim, labels = random_case(5)
    rng = np.random.default_rng(5)
    sim[rng.random(sim.shape) < 0.2] = np.nan
    np.testing.assert_allclose(
        per_query_ap(sim, labels), ref_per_query_ap(sim, labels), rtol=0, atol=1e-12
    )
    assert identity_balanced_map(sim, labels) == pytest.approx(
        ref_identity_balanced_map(sim, labels), abs=1e-12
    )
    assert pair_roc_auc(sim, labels) == pytest.approx(ref_pair_auc(sim, labels), abs=1e-12)


def test_missing_positive_scores_worst_case() -> None:
    # Every positive pair missing: each positive ties at the bottom with the missing negatives.
    labels = np.array([0, 0, 1, 1])
    sim = np.full((4, 4), np.nan)
    sim[0, 2] = sim[1, 3] = sim[2, 0] = sim[3, 1] = 1.0
    # q: one negative scored, positive tied with the other negative at the bottom -> 1/3.
    np.testing.assert_allclose(per_query_ap(sim, labels), [1 / 3] * 4)
    # AUC: each positive beats 0 negatives, ties 1 of 2 -> 1/4 per positive.
    assert pair_roc_auc(sim, labels) == pytest.approx(0.25)


# ---------------------------------------------------------------------------- ROC-AUC


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_pair_roc_auc_matches_sklearn(seed: int, tied: bool) -> None:
    sim, labels = random_case(20 + seed, tied=tied)
    assert pair_roc_auc(sim, labels) == pytest.approx(ref_pair_auc(sim, labels), abs=1e-12)


def test_pair_roc_auc_asymmetric() -> None:
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 5, size=30)
    sim = rng.normal(size=(30, 30)) + 2.0 * np.triu(labels[:, None] == labels[None, :])
    assert not np.allclose(sim, sim.T)
    got = pair_roc_auc(sim, labels)
    assert got == pytest.approx(ref_pair_auc(sim, labels), abs=1e-12)
    # The transpose scores other (q, g) orderings, so the AUC generally changes.
    assert pair_roc_auc(sim.T, labels) == pytest.approx(ref_pair_auc(sim.T, labels), abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_reversed_scores_give_one_minus_auc(tied: bool) -> None:
    sim, labels = random_case(9, tied=tied)
    assert pair_roc_auc(-sim, labels) == pytest.approx(1.0 - pair_roc_auc(sim, labels), abs=1e-12)


def test_perfect_similarity() -> None:
    labels = np.array([3, 3, 1, 1, 1, 7, 2, 2])  # 7 is a singleton
    sim = perfect_sim(labels)
    assert identity_balanced_map(sim, labels) == 1.0
    assert pair_roc_auc(sim, labels) == 1.0
    assert pair_roc_auc(1.0 - sim, labels) == 0.0


# ---------------------------------------------------------------------------- invariance


@pytest.mark.parametrize(
    "transform",
    [lambda s: (s + 1) / 2, np.exp, lambda s: 3.0 * s - 7.0],
    ids=["affine_half", "exp", "affine"],
)
@pytest.mark.parametrize("tied", [False, True])
def test_increasing_transform_invariance(transform, tied: bool) -> None:
    sim, labels = random_case(13, tied=tied)
    sim = np.tanh(sim)  # keep exp well inside float range
    new = transform(sim)
    np.testing.assert_allclose(per_query_ap(new, labels), per_query_ap(sim, labels), atol=1e-12)
    assert identity_balanced_map(new, labels) == pytest.approx(
        identity_balanced_map(sim, labels), abs=1e-12
    )
    assert pair_roc_auc(new, labels) == pytest.approx(pair_roc_auc(sim, labels), abs=1e-12)


# ---------------------------------------------------------------------------- degenerate inputs


def test_no_positives_gives_nan() -> None:
    labels = np.arange(5)
    sim = np.random.default_rng(0).normal(size=(5, 5))
    assert np.all(np.isnan(per_query_ap(sim, labels)))
    assert np.isnan(identity_balanced_map(sim, labels))
    assert per_identity_ap(sim, labels) == {}
    assert np.isnan(pair_roc_auc(sim, labels))


def test_no_negatives_gives_nan_auc() -> None:
    labels = np.zeros(4, dtype=int)
    sim = np.random.default_rng(1).normal(size=(4, 4))
    assert np.isnan(pair_roc_auc(sim, labels))
    # mAP is still defined (every item relevant -> AP 1).
    assert identity_balanced_map(sim, labels) == 1.0


def test_tiny_inputs() -> None:
    assert per_query_ap(np.zeros((0, 0)), np.array([])).shape == (0,)
    assert np.isnan(identity_balanced_map(np.zeros((1, 1)), np.array(["x"])))
    assert np.isnan(pair_roc_auc(np.zeros((1, 1)), np.array(["x"])))


@pytest.mark.parametrize("fn", [per_query_ap, identity_balanced_map, per_identity_ap, pair_roc_auc])
def test_bad_shapes_raise(fn) -> None:
    with pytest.raises(ValueError, match="square"):
        fn(np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="square"):
        fn(np.zeros(9), np.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        fn(np.zeros((3, 3)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="expected length 3, got 4"):
        fn(np.zeros((3, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="real numbers"):
        fn(np.full((2, 2), "a"), np.zeros(2))


# ---------------------------------------------------------------------------- pairs_to_matrix


def test_pairs_to_matrix_round_trip() -> None:
    rng = np.random.default_rng(0)
    n = 7
    full = rng.normal(size=(n, n))
    q, g = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    perm = rng.permutation(n * n)  # submission rows come in any order
    q, g = q.ravel()[perm], g.ravel()[perm]
    out = pairs_to_matrix(q, g, full[q, g], n)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, full)


def test_pairs_to_matrix_missing_entries_are_nan_and_rank_last() -> None:
    labels = np.array([0, 0, 1, 1])
    # Only score the positive pairs; every negative pair is missing.
    q = np.array([0, 1, 2, 3])
    g = np.array([1, 0, 3, 2])
    out = pairs_to_matrix(q, g, np.full(4, 0.1), 4)
    assert np.isnan(out).sum() == 12
    assert identity_balanced_map(out, labels) == 1.0
    assert pair_roc_auc(out, labels) == 1.0


def test_pairs_to_matrix_duplicate_raises() -> None:
    with pytest.raises(ValueError, match=r"pair \(query 1, gallery 2\) appears 2 times"):
        pairs_to_matrix(np.array([0, 1, 1]), np.array([1, 2, 2]), np.zeros(3), 3)


@pytest.mark.parametrize(
    ("q", "g", "match"),
    [
        ([0, 3], [1, 0], "query_idx out of range"),
        ([0, 1], [-1, 0], "gallery_idx out of range"),
    ],
)
def test_pairs_to_matrix_out_of_range_raises(q, g, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pairs_to_matrix(np.array(q), np.array(g), np.zeros(2), 3)


def test_pairs_to_matrix_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same length"):
        pairs_to_matrix(np.array([0, 1]), np.array([1]), np.zeros(2), 3)
    with pytest.raises(ValueError, match="whole numbers"):
        pairs_to_matrix(np.array([0.5]), np.array([1]), np.zeros(1), 3)
    with pytest.raises(ValueError, match="non-negative integer"):
        pairs_to_matrix(np.array([0]), np.array([1]), np.zeros(1), -1)
    # Whole-number floats (as read from a CSV) are accepted.
    out = pairs_to_matrix(np.array([0.0]), np.array([1.0]), np.array([0.25]), 2)
    assert out[0, 1] == 0.25
