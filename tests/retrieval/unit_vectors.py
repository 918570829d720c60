"""Unit-vector embeddings and plain-loop references shared by the tests of
jaguar_reid.retrieval's neighbours, expansion and re-ranking modules."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, d)))


def clustered(seed: int = 0, n_ids: int = 10, sizes: tuple[int, int] = (1, 8), d: int = 16,
              noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Identities with a random number of images each (one-image identities included)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(sizes[0], sizes[1] + 1, size=n_ids)
    counts[0] = 1
    labels = np.repeat(np.arange(n_ids), counts)
    centres = rng.normal(size=(n_ids, d))
    x = centres[labels] + noise * rng.normal(size=(len(labels), d))
    order = rng.permutation(len(labels))
    return unit(x[order]), labels[order]


def with_duplicates(seed: int = 3) -> np.ndarray:
    """Exact copies (ties in every distance), a run of 14 of them longer than the screening
    margin, so both exact fallbacks of the neighbour search run."""
    rng = np.random.default_rng(seed)
    base = random_unit(8, 16, seed)
    x = np.concatenate([np.repeat(base[:1], 14, axis=0), np.repeat(base[1:3], 5, axis=0),
                        random_unit(30, 16, seed + 1), base[3:]])
    return x[rng.permutation(len(x))]


def original_distance(emb: np.ndarray) -> np.ndarray:
    """2 - 2 cos from float64 dot products summed the fixed way of the neighbour search (exact
    products, numpy's pairwise sum along each row), so exact duplicates tie exactly here too."""
    x = emb.astype(np.float64)
    d = np.clip(2.0 - 2.0 * (x[:, None, :] * x[None, :, :]).sum(axis=-1), 0.0, 4.0)
    np.fill_diagonal(d, 0.0)
    return d


def qe_loop(emb: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Plain loop: self first, then the k nearest others by (distance, index)."""
    x = emb.astype(np.float64)
    n = len(x)
    d = original_distance(emb)
    out = np.empty_like(x)
    for i in range(n):
        others = [j for j in np.argsort(d[i], kind="stable") if j != i][:min(k, n - 1)]
        members = [i, *others]
        weights = np.array([max(1.0 - d[i, j] / 2.0, 0.0) ** alpha for j in members])
        weights[0] = 1.0
        mean = (weights[:, None] * x[members]).sum(axis=0)
        out[i] = mean / np.linalg.norm(mean)
    return out
