"""Retrieval metrics for the Jaguar Re-ID competition.

The competition scores a similarity for every ordered pair of test images. Two metrics live here:

* **Identity-balanced mAP** (the leaderboard metric). Every image is a query; all *other* images
  are ranked by similarity, highest first, and the query's average precision (AP) is taken
  against the images of the same identity. APs are averaged within each identity and then
  across identities, so every identity weighs the same whatever its image count.
* **Pair ROC-AUC** (an offline diagnostic). Every ordered pair ``(i, j)`` with ``i != j`` is a
  sample, positive when both images share an identity.

Conventions shared by every function:

* ``sim`` is an ``(N, N)`` matrix; ``sim[q, g]`` is the similarity of gallery image ``g`` to
  query image ``q`` (higher = more alike). It need not be symmetric. The diagonal is ignored:
  an image is never ranked against itself.
* ``labels`` is an ``(N,)`` array of identities of any hashable dtype (str or int).
* A missing score (NaN) off the diagonal is treated as the lowest possible score, i.e. as
  ``-inf``: a submission that leaves a pair out ranks it last (tied with any other missing pair
  and with a genuine ``-inf``).
* Ties are resolved the way ``sklearn.metrics.average_precision_score`` and
  ``sklearn.metrics.roc_auc_score`` resolve them, so the results agree with scikit-learn exactly
  (up to floating-point rounding).
* Computation is in float64.

All functions are pure: arrays in, numbers or arrays out.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "average_precision",
    "identity_balanced_map",
    "pair_roc_auc",
    "pairs_to_matrix",
    "per_identity_ap",
    "per_query_ap",
]

# Elements per block when ranking queries: bounds the temporary arrays (several per element,
# 8 bytes each) to a few tens of MB whatever N is.
_BLOCK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------- validation


def _check_numeric(arr: np.ndarray, name: str) -> None:
    dtype = arr.dtype
    if not (
        np.issubdtype(dtype, np.floating)
        or np.issubdtype(dtype, np.integer)
        or np.issubdtype(dtype, np.bool_)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {dtype}")


def _validate(sim: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and return ``(sim, codes)`` with ``codes`` the labels as ints 0..K-1."""
    sim = np.asarray(sim)
    labels = np.asarray(labels)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square 2-D (N, N) array, got shape {sim.shape}")
    _check_numeric(sim, "sim")
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D (N,) array, got shape {labels.shape}")
    if labels.shape[0] != sim.shape[0]:
        raise ValueError(
            f"labels must have one entry per row of sim: expected length {sim.shape[0]}, "
            f"got {labels.shape[0]}"
        )
    _, codes = np.unique(labels, return_inverse=True)
    return sim, codes.reshape(-1).astype(np.intp, copy=False)


def _as_scores(values: np.ndarray) -> np.ndarray:
    """float64 copy with NaN (a missing score) replaced by -inf, so it ranks last."""
    out = np.array(values, dtype=np.float64, copy=True)
    out[np.isnan(out)] = -np.inf
    return out


# --------------------------------------------------------------------------- average precision


def _ap_rows(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """AP of each row of a ``(B, M)`` block, tie-aware exactly like scikit-learn.

    scikit-learn computes ``AP = sum_n (R_n - R_{n-1}) P_n`` over *distinct* score thresholds:
    tied items enter the ranking together, so each relevant item is credited with the precision
    measured at the end of its tie group (not at its own position inside the group). That is
    what this computes: AP = mean over relevant items of precision at their group's end.

    ``scores`` must be NaN-free (see ``_as_scores``). Returns ``(B,)``; NaN for rows with no
    relevant item.
    """
    b, m = scores.shape
    if m == 0:
        return np.full(b, np.nan)
    order = np.argsort(-scores, axis=1, kind="stable")
    s_sorted = np.take_along_axis(scores, order, axis=1)
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    cum_tp = np.cumsum(rel_sorted, axis=1, dtype=np.int64)

    # Index of the last element of each element's tie group: a reversed running minimum over
    # the positions where the next score differs.
    positions = np.arange(m)
    is_group_end = np.ones((b, m), dtype=bool)
    is_group_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    end_marks = np.where(is_group_end, positions, m)
    group_end = np.minimum.accumulate(end_marks[:, ::-1], axis=1)[:, ::-1]

    precision_at_end = np.take_along_axis(cum_tp, group_end, axis=1) / (group_end + 1.0)
    n_pos = cum_tp[:, -1]
    total = np.sum(np.where(rel_sorted, precision_at_end, 0.0), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = total / n_pos
    ap[n_pos == 0] = np.nan
    return ap


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of one ranked query.

    Args:
        scores: ``(M,)`` scores of the M candidates, higher = ranked earlier. NaN counts as the
            lowest possible score (ranked last).
        relevant: ``(M,)`` bool, True for the candidates that are correct matches.

    Returns:
        AP in [0, 1], equal to ``sklearn.metrics.average_precision_score(relevant, scores)``
        including its handling of tied scores; NaN if no candidate is relevant (AP undefined).
    """
    scores = np.asarray(scores)
    relevant = np.asarray(relevant)
    if scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D (M,) array, got shape {scores.shape}")
    _check_numeric(scores, "scores")
    if relevant.shape != scores.shape:
        raise ValueError(
            f"relevant must have the shape of scores {scores.shape}, got {relevant.shape}"
        )
    rel = relevant.astype(bool)
    return float(_ap_rows(_as_scores(scores)[None, :], rel[None, :])[0])


def per_query_ap(sim: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of every image used as a query against all the other images.

    Args:
        sim: ``(N, N)`` similarity, ``sim[q, g]`` = score of gallery ``g`` for query ``q``.
            The diagonal is ignored; NaN elsewhere is a missing score, ranked last.
        labels: ``(N,)`` identity of each image (any hashable dtype).

    Returns:
        ``(N,)`` float64 AP per query; NaN where the query has no other image of its identity.
    """
    sim, codes = _validate(sim, labels)
    n = sim.shape[0]
    out = np.full(n, np.nan)
    if n < 2:
        return out
    counts = np.bincount(codes)
    # Queries without a positive have undefined AP; skipping them saves their sort.
    valid = np.flatnonzero(counts[codes] > 1)
    m = n - 1
    block = max(1, _BLOCK_ELEMENTS // m)
    cols = np.arange(m)
    for start in range(0, valid.size, block):
        rows = valid[start : start + block]
        # Gallery column indices for each row with its own column cut out.
        gallery = cols[None, :] + (cols[None, :] >= rows[:, None])
        scores = _as_scores(np.take_along_axis(sim[rows], gallery, axis=1))
        relevant = codes[gallery] == codes[rows][:, None]
        out[rows] = _ap_rows(scores, relevant)
    return out


def _identity_means(ap: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Mean AP per identity code over its non-NaN queries; NaN for identities with none."""
    n_ids = int(codes.max()) + 1 if codes.size else 0
    ok = ~np.isnan(ap)
    sums = np.bincount(codes[ok], weights=ap[ok], minlength=n_ids)
    counts = np.bincount(codes[ok], minlength=n_ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def identity_balanced_map(sim: np.ndarray, labels: np.ndarray) -> float:
    """Leaderboard metric: mean over identities of the mean AP of that identity's queries.

    Args:
        sim: ``(N, N)`` similarity (see ``per_query_ap``).
        labels: ``(N,)`` identity of each image.

    Returns:
        Identity-balanced mAP in [0, 1]. Queries with no positive are skipped (not scored 0);
        identities whose queries are all skipped are left out. NaN if no query has a positive.
    """
    sim, codes = _validate(sim, labels)
    means = _identity_means(per_query_ap(sim, codes), codes)
    means = means[~np.isnan(means)]
    return float(np.mean(means)) if means.size else float("nan")


def per_identity_ap(sim: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean AP of each identity's queries, keyed by ``str(label)``.

    Args:
        sim: ``(N, N)`` similarity (see ``per_query_ap``).
        labels: ``(N,)`` identity of each image.

    Returns:
        ``{str(identity): mean AP}``; identities with no query that has a positive (a single
        image) are omitted. The mean of the values is ``identity_balanced_map``.
    """
    sim, codes = _validate(sim, labels)
    uniques = np.unique(np.asarray(labels))
    keys = [str(u) for u in uniques.tolist()]
    if len(set(keys)) != len(keys):
        # e.g. 1 and "1" in an object array: distinct identities that would share one key.
        raise ValueError("labels contain distinct identities with the same str() form")
    means = _identity_means(per_query_ap(sim, codes), codes)
    return {k: float(v) for k, v in zip(keys, means, strict=True) if not np.isnan(v)}


# --------------------------------------------------------------------------- ROC-AUC


def pair_roc_auc(sim: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC of same-identity vs different-identity over all ordered pairs ``i != j``.

    Uses the Mann-Whitney form: AUC = P(score of a random positive pair > score of a random
    negative pair), ties counting one half, which equals ``sklearn.metrics.roc_auc_score`` on
    the off-diagonal entries. Cost O(P log P) for P = N(N-1) pairs.

    Args:
        sim: ``(N, N)`` similarity; the diagonal is ignored; NaN off the diagonal is a missing
            score, ranked lowest.
        labels: ``(N,)`` identity of each image.

    Returns:
        AUC in [0, 1]; NaN if there is no positive or no negative pair.
    """
    sim, codes = _validate(sim, labels)
    n = sim.shape[0]
    off_diag = ~np.eye(n, dtype=bool)
    same = (codes[:, None] == codes[None, :])[off_diag]
    values = _as_scores(sim[off_diag])
    pos = values[same]
    neg = np.sort(values[~same])
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # For each positive: negatives strictly below count 1, tied negatives count 1/2, so
    # 2 * credit = (#neg < p) + (#neg <= p). Integer sums keep it exact.
    below = np.searchsorted(neg, pos, side="left")
    below_or_tied = np.searchsorted(neg, pos, side="right")
    twice_credit = int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return twice_credit / (2.0 * n_pos * n_neg)


# --------------------------------------------------------------------------- submissions


def _as_index(idx: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        # Tolerate float columns from a CSV as long as they hold whole numbers.
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold whole numbers, got non-integer values")
    return arr.astype(np.int64)


def pairs_to_matrix(
    query_idx: np.ndarray, gallery_idx: np.ndarray, values: np.ndarray, n: int
) -> np.ndarray:
    """Scatter pair rows (e.g. a submission's rows) into an ``(n, n)`` similarity matrix.

    Args:
        query_idx: ``(P,)`` int, query image index of each row, in ``[0, n)``.
        gallery_idx: ``(P,)`` int, gallery image index of each row, in ``[0, n)``.
        values: ``(P,)`` similarity of each row.
        n: number of images.

    Returns:
        ``(n, n)`` float64 matrix with ``out[q, g] = value``; entries never given are NaN (which
        the metrics rank last).

    Raises:
        ValueError: arrays of different lengths, an index out of range, or a ``(q, g)`` pair
            given more than once.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    n = int(n)
    q = _as_index(query_idx, "query_idx")
    g = _as_index(gallery_idx, "gallery_idx")
    vals = np.asarray(values)
    if vals.ndim != 1:
        raise ValueError(f"values must be a 1-D array, got shape {vals.shape}")
    _check_numeric(vals, "values")
    if not (q.size == g.size == vals.size):
        raise ValueError(
            "query_idx, gallery_idx and values must have the same length, got "
            f"{q.size}, {g.size} and {vals.size}"
        )
    for name, arr in (("query_idx", q), ("gallery_idx", g)):
        bad = np.flatnonzero((arr < 0) | (arr >= n))
        if bad.size:
            raise ValueError(
                f"{name} out of range [0, {n}): value {arr[bad[0]]} at row {bad[0]} "
                f"({bad.size} row(s) out of range)"
            )
    flat = q * n + g
    _, first, counts = np.unique(flat, return_index=True, return_counts=True)
    if np.any(counts > 1):
        dup = int(np.flatnonzero(counts > 1)[0])
        row = int(first[dup])
        raise ValueError(
            f"pair (query {q[row]}, gallery {g[row]}) appears {counts[dup]} times; "
            f"{int(np.sum(counts > 1))} duplicated pair(s) in all"
        )
    out = np.full((n, n), np.nan)
    out.reshape(-1)[flat] = vals.astype(np.float64)
    return out
