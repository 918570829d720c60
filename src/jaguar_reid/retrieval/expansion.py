"""Average / alpha query expansion and database-side augmentation (DBA) of embeddings.

The leaderboard scores every ordered pair of test images, so queries and gallery are the same
N images. Each embedding becomes the (weighted) mean of itself and its nearest neighbours
(`average_query_expansion`, `database_augmentation`), the neighbours found by the exact search
of `jaguar_reid.retrieval.neighbours`. ``emb`` is ``(N, D)``, L2-normalised rows (checked to
1e-3), numpy or torch.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np
import torch

from jaguar_reid.retrieval.array_ops import _as_embeddings, _check_chunk, _check_int, _take, _tensor
from jaguar_reid.retrieval.neighbours import (
    _PAIR_ELEMENTS,
    DEFAULT_CHUNK,
    _neighbours,
    resolve_knn_backend,
)

__all__ = [
    "average_query_expansion",
    "database_augmentation",
]

# Recent small expansions by their input's bytes and settings: a tuning search scores many
# re-ranking settings over the same expanded embeddings.
_EXPANDED: OrderedDict[tuple, np.ndarray] = OrderedDict()
_EXPANDED_KEPT = 32
_EXPANDED_BYTES = 16 << 20  # larger inputs are expanded each time and not kept


def average_query_expansion(emb, k: int, alpha: float = 0.0, *,
                            chunk_size: int = DEFAULT_CHUNK, device: str = "cpu",
                            backend: str = "torch") -> np.ndarray:
    """(N, D) -> (N, D) float32: each embedding replaced by the weighted mean of itself and its k
    nearest *other* images (k + 1 vectors; the image is its own first neighbour), then
    L2-normalised.

    Weights are ``max(cos, 0) ** alpha`` (the image itself weighs 1): alpha = 0 is plain average
    query expansion, alpha > 0 is alpha-QE (Radenovic, Tolias and Chum, 2018), which lets close
    neighbours count more and drops dissimilar ones. k = 0 returns the input (normalised); k is
    clamped to N - 1. A mean that cancels to the zero vector keeps the original embedding.
    Neighbours come from exact chunked search (`chunk_size` rows per block; candidates screened
    by `backend`, see `nearest_neighbours`), the N x N similarity matrix is never held. A
    small input expanded again with the same settings is answered from `_EXPANDED`."""
    x_np = _as_embeddings(emb)
    k = _check_int(k, "k", 0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number) \
            or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    block = _check_chunk(chunk_size)
    if x_np.nbytes > _EXPANDED_BYTES:
        return _expand(x_np, k, float(alpha), block, device, backend)
    key = (hashlib.sha1(np.ascontiguousarray(x_np).tobytes()).hexdigest(), x_np.shape, k,
           float(alpha), block, device, backend)
    out = _EXPANDED.pop(key, None)
    if out is None:
        out = _expand(x_np, k, float(alpha), block, device, backend)
    _EXPANDED[key] = out  # most recent last
    while len(_EXPANDED) > _EXPANDED_KEPT:
        _EXPANDED.popitem(last=False)
    return out.copy()


def _expand(x_np: np.ndarray, k: int, alpha: float, block: int, device: str,
            backend: str) -> np.ndarray:
    n = len(x_np)
    k = min(k, n - 1)
    x = _tensor(x_np, device)
    if k == 0:
        return torch.nn.functional.normalize(x.double(), dim=1).float().cpu().numpy()
    nbr, dist = _neighbours(x, k + 1, block, backend=resolve_knn_backend(backend, device, n))
    # cos = 1 - d / 2 (the image itself: d = 0, weight 1); 0 ** 0 = 1 keeps alpha = 0 plain.
    weight = (1.0 - dist / 2.0).clamp(min=0.0).pow(float(alpha))
    out = torch.empty_like(x)
    rows_per_step = max(1, _PAIR_ELEMENTS // ((k + 1) * x.shape[1]))
    for a in range(0, n, rows_per_step):
        r = slice(a, a + rows_per_step)
        mean = torch.einsum("nk,nkd->nd", weight[r], _take(x, nbr[r]).double())
        norm = mean.norm(dim=1, keepdim=True)
        out[r] = torch.where(norm > 0, mean / norm.clamp(min=1e-300), x[r].double()).float()
    return out.cpu().numpy()


def database_augmentation(emb, k: int, alpha: float = 0.0, *,
                          chunk_size: int = DEFAULT_CHUNK, device: str = "cpu",
                          backend: str = "torch") -> np.ndarray:
    """Database-side augmentation (DBA): every gallery embedding replaced by the weighted mean
    of itself and its k nearest gallery neighbours, exactly as `average_query_expansion`.

    With separate query and gallery sets the two differ: DBA rewrites the gallery from gallery
    neighbours once, offline; QE rewrites each query from its neighbours *in* the gallery (which
    may be augmented already). Here queries are the gallery, so one application of either is the
    same map, and "DBA then QE" is that map applied twice, the second time to the output of the
    first: ``average_query_expansion(database_augmentation(emb, k), k)``."""
    return average_query_expansion(emb, k, alpha, chunk_size=chunk_size, device=device,
                                   backend=backend)
