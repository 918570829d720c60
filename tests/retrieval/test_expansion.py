"""Tests for jaguar_reid.retrieval.expansion: query expansion and DBA against plain loops."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_reid.retrieval.expansion import average_query_expansion, database_augmentation
from tests.retrieval.unit_vectors import (
    clustered,
    original_distance,
    qe_loop,
    random_unit,
    with_duplicates,
)


@pytest.mark.parametrize(("k", "alpha"), [(1, 0.0), (3, 0.0), (3, 3.0), (10, 1.0), (100, 0.5)])
def test_query_expansion_matches_loop(k, alpha):
    emb, _ = clustered(11)
    out = average_query_expansion(emb, k, alpha)
    assert out.dtype == np.float32 and out.shape == emb.shape
    np.testing.assert_allclose(out, qe_loop(emb, k, alpha), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_query_expansion_alpha_zero_is_plain_average():
    emb = random_unit(40, 8, seed=12)
    d = original_distance(emb)
    out = average_query_expansion(emb, 4)
    for i in range(len(emb)):
        members = [i] + [j for j in np.argsort(d[i], kind="stable") if j != i][:4]
        mean = emb[members].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(out[i], mean / np.linalg.norm(mean), atol=1e-6)


def test_query_expansion_k_zero_is_identity_and_chunks_agree():
    emb, _ = clustered(13)
    np.testing.assert_allclose(average_query_expansion(emb, 0), emb, atol=1e-7)
    with_ties = with_duplicates()
    for x in (emb, with_ties):
        np.testing.assert_allclose(average_query_expansion(x, 5, 2.0, chunk_size=3),
                                   average_query_expansion(x, 5, 2.0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(average_query_expansion(with_ties, 5, 2.0),
                               qe_loop(with_ties, 5, 2.0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(database_augmentation(emb, 3, 1.0),
                                  average_query_expansion(emb, 3, 1.0))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        average_query_expansion(emb, 2, -1.0)
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        average_query_expansion(emb, -1)


def test_faiss_backend_gives_the_same_expansion():
    pytest.importorskip("faiss")
    emb, _ = clustered(11, n_ids=12)
    for alpha in (0.0, 3.0):
        np.testing.assert_allclose(
            average_query_expansion(emb, 4, alpha, backend="faiss", chunk_size=9),
            average_query_expansion(emb, 4, alpha, backend="torch"), rtol=0, atol=1e-6)


def test_repeated_expansion_is_answered_from_memory_as_a_copy(monkeypatch):
    from jaguar_reid.retrieval import expansion

    emb, _ = clustered(5)
    calls = []
    real = expansion._expand
    monkeypatch.setattr(expansion, "_expand", lambda *a: calls.append(a[1:3]) or real(*a))
    first = average_query_expansion(emb, 3, 3.0)
    first[:] = 0  # the caller's copy: the memory keeps its own
    again = average_query_expansion(emb, 3, 3.0)
    assert calls == [(3, 3.0)]
    np.testing.assert_allclose(again, qe_loop(emb, 3, 3.0), rtol=0, atol=1e-6)
    average_query_expansion(emb, 3, 0.0)
    average_query_expansion(emb[:-1], 3, 3.0)
    assert calls == [(3, 3.0), (3, 0.0), (3, 3.0)]  # other settings, other input: computed
