"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) transcribed step by step with plain loops
(`rerank_reference`): the definition the fast paths (`rerank.rerank`,
`rerank_sparse.rerank_sparse`) are tested against, and the benchmarks' baseline. The
conventions are those of `jaguar_reid.retrieval.rerank`'s docstring.
"""

from __future__ import annotations

import numpy as np

from jaguar_reid.retrieval.array_ops import _as_embeddings
from jaguar_reid.retrieval.neighbours import _canonical_sim
from jaguar_reid.retrieval.rerank import _check_norm, _check_rerank_args

__all__ = [
    "rerank_reference",
]


def rerank_reference(emb, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                     norm: str = "none") -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), step by step with plain loops:
    (N, N) float64 final distance ``(1 - lambda) d_J + lambda d`` (``lambda D`` with
    norm="rowmax", see `jaguar_reid.retrieval.rerank`'s docstring). Slow; for tests and
    benchmarks only.

    Conventions (the fast paths follow every one of them exactly):

    * k1 and k2 larger than N are clamped to N before anything else (so the expansion below
      uses round(min(k1, N) / 2)); neighbour lists are cut at N entries, as numpy slicing does
      in the authors' code.
    * ``rank[i]`` lists every image, i itself first (forced: rounding can leave a duplicate as
      close as i), then the others by (distance, index), a stable sort. A "k-nearest" list is
      ``rank[i, :k + 1]``: i and k others, as in the authors' code.
    * R(i, k): the j in i's k-nearest list whose own k-nearest list holds i (so i is in R(i, k)).
    * Expansion: for each j in R(i, k1), R(j, round(k1 / 2)) is added when more than 2/3 of it
      lies in R(i, k1). round() halves to even like numpy.around in the authors' code
      (k1 = 5 -> 2), and "more than 2/3" is the integer test 3 |common| > 2 |R(j)|, equal to
      the authors' float test for every size up to 2000 (checked).
    * V[i, j] = exp(-d(i, j)) (exp(-D(i, j)) with "rowmax") over the expanded set, divided by
      its sum.
    * Local query expansion: V[i] becomes the mean of V over ``rank[i, :k2]`` (i and its k2 - 1
      nearest; k2 = 1 leaves V as it is).
    * d_J(i, j) = 1 - sum_k min(V_ik, V_jk) / sum_k max(V_ik, V_jk); the maximum sum is taken as
      sum V_i + sum V_j - sum min (max(a, b) = a + b - min(a, b)), which is the same number
      without an N-long pass per pair.
    """
    x = _as_embeddings(emb).astype(np.float64)
    k1, k2, lam = _check_rerank_args(k1, k2, lambda_value)
    rowmax = _check_norm(norm)
    n = len(x)
    k1, k2 = min(k1, n), min(k2, n)
    half = round(k1 / 2)

    # Original distance: squared Euclidean distance of unit vectors, from float64 dot products
    # taken one row at a time in a fixed order (see _canonical_sim), so that exact duplicates
    # tie exactly.
    dist = np.empty((n, n))
    for i in range(n):
        dist[i] = np.clip(2.0 - 2.0 * _canonical_sim(x, x[i]), 0.0, 4.0)
    np.fill_diagonal(dist, 0.0)
    # The distance the weights and the blend use (the ranking is the same either way).
    scaled = dist
    if rowmax:
        top = dist.max(axis=1)
        scaled = dist / np.where(top > 0, top, 1.0)[:, None]

    rank = _reference_ranking(dist)
    v = _reference_encoding(rank, scaled, k1, half)
    # Local query expansion over the k2 nearest (i included).
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = _reference_jaccard(v)
    return (1.0 - lam) * jaccard + lam * scaled


def _reference_ranking(dist: np.ndarray) -> np.ndarray:
    """Every row's images: self first, then the others by distance, ties by index (stable)."""
    n = len(dist)
    rank = np.empty((n, n), dtype=np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        rank[i, 0] = i
        rank[i, 1:] = others[np.argsort(dist[i, others], kind="stable")]
    return rank


def _reference_encoding(rank: np.ndarray, scaled: np.ndarray, k1: int, half: int) -> np.ndarray:
    """V: k-reciprocal sets, their expansion, Gaussian-kernel weights of `scaled`, per row."""
    n = len(rank)

    def k_reciprocal(i: int, k: int) -> list[int]:
        return [int(j) for j in rank[i, :k + 1] if i in rank[j, :k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r_i = k_reciprocal(i, k1)
        expanded = set(r_i)
        for j in r_i:
            r_j = k_reciprocal(j, half)
            common = len(set(r_j) & set(r_i))
            if 3 * common > 2 * len(r_j):
                expanded.update(r_j)
        cols = np.array(sorted(expanded))
        weight = np.exp(-scaled[i, cols])
        v[i, cols] = weight / weight.sum()
    return v


def _reference_jaccard(v: np.ndarray) -> np.ndarray:
    """Jaccard distance of V's rows; the sum of minima runs over i's support (min is 0
    elsewhere)."""
    jaccard = np.empty((len(v), len(v)))
    row_sum = v.sum(axis=1)
    for i in range(len(v)):
        support = np.flatnonzero(v[i])
        mins = np.minimum(v[i, support], v[:, support]).sum(axis=1)
        maxs = row_sum[i] + row_sum - mins
        jaccard[i] = 1.0 - mins / maxs
    return jaccard
