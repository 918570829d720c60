"""Tests for jaguar_reid.retrieval.neighbours: the exact neighbour lists against a plain sort,
on both backends, and the choice of backend."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_reid.extras import MissingExtra
from jaguar_reid.retrieval import neighbours as nb
from tests.retrieval.unit_vectors import clustered, original_distance, random_unit, with_duplicates


def reference_lists(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Self first, then the others by (float64 distance, index): a stable argsort."""
    d = original_distance(emb)
    n = len(emb)
    idx = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        idx[i] = np.concatenate([[i], others[np.argsort(d[i, others], kind="stable")]])[:k]
    return idx, np.take_along_axis(d, idx, axis=1)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("data", ["random", "clustered", "duplicates"])
def test_nearest_neighbours_are_the_reference_lists_on_both_backends(backend, data):
    if backend == "faiss":
        pytest.importorskip("faiss")
    emb = {"random": lambda: random_unit(80, 16), "clustered": lambda: clustered(9)[0],
           "duplicates": with_duplicates}[data]()
    for k in (1, 4, 21):
        want_i, want_d = reference_lists(emb, k)
        got_i, got_d = nb.nearest_neighbours(emb, k, backend=backend, chunk_size=13)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, rtol=0, atol=1e-15)


def test_knn_backend_resolution(monkeypatch):
    big = nb.AUTO_FAISS_MIN_N
    monkeypatch.setattr(nb, "faiss_available", lambda: True)
    assert nb.resolve_knn_backend("torch", "cpu", big) == "torch"
    assert nb.resolve_knn_backend("auto", "cuda", big) == "torch"
    assert nb.resolve_knn_backend("auto", "cpu", big - 1) == "torch"
    assert nb.resolve_knn_backend("auto", "cpu", big) == "faiss"
    monkeypatch.setattr(nb, "faiss_available", lambda: False)
    assert nb.resolve_knn_backend("auto", "cpu", big) == "torch"  # not installed: torch
    with pytest.raises(MissingExtra, match=r"faiss needs faiss-cpu.*jaguar-reid\[faiss\]"):
        nb.resolve_knn_backend("faiss", "cpu")
    with pytest.raises(ValueError, match="backend must be one of auto, torch, faiss"):
        nb.resolve_knn_backend("annoy")
