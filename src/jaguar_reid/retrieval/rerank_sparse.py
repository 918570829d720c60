"""k-reciprocal re-ranking for any N: only the pairs that share k-reciprocal support are stored
(`rerank_sparse`, `SparseRerank`), and the distance of any pair is answered from them
(`rerank_pairs`). Same neighbours, V and Jaccard sums as the dense `rerank.rerank`, so the same
distances; the conventions are those of `jaguar_reid.retrieval.rerank`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jaguar_reid.retrieval.array_ops import _as_embeddings, _take
from jaguar_reid.retrieval.neighbours import (
    DEFAULT_CHUNK,
    _distance64,
    _faiss_row_min,
    _neighbours,
    _sim_to_distance,
    resolve_knn_backend,
)
from jaguar_reid.retrieval.rerank import (
    _check_norm,
    _encoding,
    _prepare,
    _rerank_cuts,
    _row_scale,
    _support_slabs,
)

__all__ = [
    "SparseRerank",
    "rerank_pairs",
    "rerank_sparse",
]


@dataclass(frozen=True)
class SparseRerank:
    """`rerank_sparse`'s result: the pairs that share k-reciprocal support, upper triangle.

    Row i (CSR layout) holds the images j >= i with d_J(i, j) < 1, ascending (i itself always
    among them): ``indices[indptr[i]:indptr[i + 1]]``, with their Jaccard distance `jaccard`
    and final distance `distance` = ``(1 - lambda) d_J + lambda d`` (float32). Both are
    symmetric, so the lower triangle is not stored. Every pair not stored has d_J = 1 exactly
    and final distance ``(1 - lambda) + lambda d(i, j)``; `rerank_pairs` answers any pair. Not a
    scipy matrix on purpose: there an absent entry would read as distance 0.

    With norm "rowmax" the final distance is not symmetric: `distance` is that of (i, j), row
    i's, and `row_scale` (N,) holds each row's divisor of d, from which `rerank_pairs` gives
    either order."""
    n: int
    k1: int
    k2: int
    lambda_value: float
    indptr: np.ndarray    # (N + 1,) int64
    indices: np.ndarray   # (nnz,) int32
    jaccard: np.ndarray   # (nnz,) float32
    distance: np.ndarray  # (nnz,) float32
    norm: str = "none"
    row_scale: np.ndarray | None = None  # (N,) float64 with "rowmax"


def rerank_sparse(emb, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                  norm: str = "none", device: str = "cpu", chunk_size: int = DEFAULT_CHUNK,
                  backend: str = "torch") -> SparseRerank:
    """k-reciprocal re-ranking for any N: only the pairs with d_J < 1 are kept (see
    `SparseRerank`), so memory grows with N times the pairs an image shares support with, not
    with N^2. Same neighbours, V and Jaccard sums as `rerank`, so the same distances;
    `rerank_pairs` gives the distance of any pair. `backend` screens the neighbour candidates
    (see `nearest_neighbours`; the exact sets, hence V, are the same either way)."""
    rowmax = _check_norm(norm)
    x, k1, k2, lam, block, n = _prepare(emb, k1, k2, lambda_value, chunk_size, device)
    backend = resolve_knn_backend(backend, device, n)
    if n >= 2 ** 31:
        raise ValueError(f"emb has {n} rows; column indices are stored as int32")
    row_min = torch.ones(n, dtype=x.dtype, device=x.device)

    def track(ra: slice, rb: slice, sim: torch.Tensor) -> None:
        # The farthest image of each row is its least similar one (sim, hence d, clipped).
        row_min[ra] = torch.minimum(row_min[ra], sim.min(dim=1).values.clamp(min=-1.0))
        row_min[rb] = torch.minimum(row_min[rb], sim.min(dim=0).values.clamp(min=-1.0))

    faiss = backend == "faiss"
    nbr, dist = _neighbours(x, max(k1 + 1, k2), block,
                            on_block=track if rowmax and not faiss else None,
                            cuts=_rerank_cuts(k1, k2), backend=backend)
    if rowmax and faiss:
        row_min = _faiss_row_min(x, block)
    scale = _row_scale(2.0 - 2.0 * row_min, x) if rowmax else None
    v = _encoding(x, nbr, dist, k1, k2, scale)
    counts = np.zeros(n, dtype=np.int64)
    cols_l, jac_l, dist_l = [], [], []
    for r0, r1, s, row_sum in _support_slabs(v, n):
        width = n - r0
        flat = torch.nonzero(s.view(-1)).flatten()  # row-major: sorted by (i, j)
        li, lj = flat // width, flat % width
        i, j = li + r0, lj + r0
        shared = _take(s.view(-1), flat)
        jaccard = 1.0 - shared / (_take(row_sum, i) + _take(row_sum, j) - shared)
        final = (1.0 - lam) * jaccard
        if lam > 0:
            sim = _take((x[r0:r1] @ x[r0:].T).view(-1), flat).double()
            d = torch.where(i == j, 0.0, _sim_to_distance(sim))
            final += lam * (d / _take(scale, i) if rowmax else d)
        counts[r0:r1] = torch.bincount(li, minlength=r1 - r0).cpu().numpy()
        cols_l.append(j.to(torch.int32).cpu().numpy())
        jac_l.append(jaccard.float().cpu().numpy())
        dist_l.append(final.float().cpu().numpy())
    indptr = np.concatenate([[0], np.cumsum(counts)])
    # One array at a time, so the chunk lists and their concatenation coexist for one only.
    indices = np.concatenate(cols_l)
    del cols_l
    jaccard_all = np.concatenate(jac_l)
    del jac_l
    distance = np.concatenate(dist_l)
    return SparseRerank(n=n, k1=k1, k2=k2, lambda_value=lam, indptr=indptr, indices=indices,
                        jaccard=jaccard_all, distance=distance, norm=norm,
                        row_scale=scale.cpu().numpy() if rowmax else None)


def rerank_pairs(emb, rows, cols, result: SparseRerank) -> np.ndarray:
    """Final re-ranked distance (float64) of the pairs (rows[t], cols[t]), from `rerank_sparse`'s
    result for the same `emb`: stored pairs are looked up (either order), the others get
    ``(1 - lambda) + lambda d`` with d computed in float64."""
    x_np = _as_embeddings(emb)
    n = len(x_np)
    if not isinstance(result, SparseRerank):
        raise ValueError(f"result must be the SparseRerank from rerank_sparse, got "
                         f"{type(result).__name__}")
    if result.n != n:
        raise ValueError(f"result is for {result.n} images but emb has {n} rows")
    rows, cols = np.asarray(rows), np.asarray(cols)
    for name, idx in (("rows", rows), ("cols", cols)):
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"{name} must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{name} must index 0..{n - 1}, got values in "
                             f"[{idx.min()}, {idx.max()}]")
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols must have the same length, got {len(rows)} and "
                         f"{len(cols)}")
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    lam = result.lambda_value
    # Only j >= i is stored, columns ascending within a row: binary search in row min(i, j)
    # for max(i, j), all pairs at once (no N-wide or nnz-wide temporary).
    lo, want = np.minimum(rows, cols), np.maximum(rows, cols)
    pos, end = result.indptr[lo].copy(), result.indptr[lo + 1]
    hi = end.copy()
    while True:
        active = pos < hi
        if not active.any():
            break
        mid = (pos + hi) // 2
        go_right = active & (result.indices[np.minimum(mid, len(result.indices) - 1)] < want)
        pos = np.where(go_right, mid + 1, pos)
        hi = np.where(active & ~go_right, mid, hi)
    found = pos < end
    found[found] = result.indices[pos[found]] == want[found]
    if result.norm == "rowmax":
        # Asymmetric: (1 - lambda) d_J + lambda d / scale of the pair's own row, d_J = 1 where
        # the pair shares no support.
        jaccard = np.ones(len(rows), dtype=np.float64)
        jaccard[found] = result.jaccard[pos[found]]
        x = torch.from_numpy(x_np)
        d = _distance64(x, torch.from_numpy(rows), torch.from_numpy(cols)).numpy()
        return (1.0 - lam) * jaccard + lam * d / result.row_scale[rows]
    out = np.empty(len(rows), dtype=np.float64)
    out[found] = result.distance[pos[found]]
    miss = np.flatnonzero(~found)
    if len(miss):
        x = torch.from_numpy(x_np)
        d = _distance64(x, torch.from_numpy(rows[miss]), torch.from_numpy(cols[miss]))
        out[miss] = (1.0 - lam) + lam * d.numpy()
    return out
