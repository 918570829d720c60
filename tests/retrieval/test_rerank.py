"""Tests for jaguar_reid.retrieval.rerank, rerank_sparse and rerank_reference: the fast paths
against the plain reference, the authors' code and plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaguar_reid.retrieval import array_ops, neighbours
from jaguar_reid.retrieval import rerank as rr
from jaguar_reid.retrieval.expansion import average_query_expansion
from jaguar_reid.retrieval.metrics import identity_balanced_map
from jaguar_reid.retrieval.rerank import (
    blend,
    distance_to_similarity,
    estimate_rerank_memory,
    rerank,
)
from jaguar_reid.retrieval.rerank_reference import rerank_reference
from jaguar_reid.retrieval.rerank_sparse import SparseRerank, rerank_pairs, rerank_sparse
from tests.helpers import SHARED
from tests.retrieval.unit_vectors import (
    clustered,
    original_distance,
    qe_loop,
    random_unit,
    unit,
    with_duplicates,
)

TOL = 1e-5  # the agreement the module promises between all paths

# ---------------------------------------------------------------------------- data


def sparse_as_dense(emb: np.ndarray, result: SparseRerank) -> np.ndarray:
    n = len(emb)
    rows, cols = np.divmod(np.arange(n * n), n)
    return rerank_pairs(emb, rows, cols, result).reshape(n, n)


def assert_all_paths_agree(emb: np.ndarray, k1: int, k2: int, lam: float,
                           chunk_size: int = neighbours.DEFAULT_CHUNK,
                           norm: str = "none") -> np.ndarray:
    ref = rerank_reference(emb, k1, k2, lam, norm=norm)
    dense = rerank(emb, k1, k2, lam, chunk_size=chunk_size, norm=norm)
    assert dense.shape == ref.shape and dense.dtype == np.float32
    np.testing.assert_allclose(dense, ref, rtol=0, atol=TOL)
    # float64 throughout: only the rowmax divisor's float32-free rounding differs
    np.testing.assert_allclose(rerank(emb, k1, k2, lam, dtype="float64", chunk_size=chunk_size,
                                      norm=norm), ref, rtol=0, atol=1e-12)
    sparse = sparse_as_dense(emb, rerank_sparse(emb, k1, k2, lam, chunk_size=chunk_size,
                                                norm=norm))
    np.testing.assert_allclose(sparse, ref, rtol=0, atol=TOL)
    return ref


# ---------------------------------------------------------------------------- re-ranking


@pytest.mark.parametrize(("k1", "k2", "lam"), [
    (20, 6, 0.3),   # the defaults
    (5, 3, 0.3),    # round(5 / 2) = 2: half to even, as numpy.around
    (20, 1, 0.3),   # no local query expansion
    (4, 12, 0.2),   # k2 longer than the k1 list
    (3, 2, 0.0),    # Jaccard distance alone
    (1, 1, 0.5),
])
@pytest.mark.parametrize("norm", ["none", "rowmax"])
def test_fast_paths_match_reference_random(k1, k2, lam, norm):
    assert_all_paths_agree(random_unit(60, 16), k1, k2, lam, norm=norm)


@pytest.mark.parametrize(("seed", "k1", "k2"), [(0, 20, 6), (1, 5, 3), (2, 8, 1), (3, 3, 4)])
def test_fast_paths_match_reference_clustered(seed, k1, k2):
    emb, _ = clustered(seed)
    assert_all_paths_agree(emb, k1, k2, 0.3)
    assert_all_paths_agree(emb, k1, k2, 0.3, chunk_size=7, norm="rowmax")


def test_faiss_backend_gives_the_same_sparse_reranking():
    pytest.importorskip("faiss")
    emb, _ = clustered(11, n_ids=12)
    for norm in ("none", "rowmax"):
        ref = rerank_reference(emb, 8, 3, 0.3, norm=norm)
        got = sparse_as_dense(emb, rerank_sparse(emb, 8, 3, 0.3, norm=norm, backend="faiss"))
        np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------- the authors' code


def authors_re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
                       k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """The authors' Python re-ranking (Zhong et al., the version fast-reid and most Kaggle
    solutions carry), transcribed step for step with its float32 casts, its column-maximum
    division and transpose, its unstable argsort and its float 2/3 test. Inputs are Euclidean
    distances (it squares them). It returns the query rows against every image; with the gallery
    being the queries (our case) that is the whole (N, N) matrix."""
    n_query = q_g_dist.shape[0]
    everything = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                                 np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    n_all = everything.shape[0]
    original = np.power(everything, 2).astype(np.float32)
    original = np.transpose(1.0 * original / np.max(original, axis=0))
    v = np.zeros_like(original).astype(np.float32)
    initial_rank = np.argsort(original).astype(np.int32)
    for i in range(n_all):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for cand in recip:
            half = int(np.around(k1 / 2.0)) + 1
            c_forward = initial_rank[cand, :half]
            c_backward = initial_rank[c_forward, :half]
            c_recip = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2.0 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = 1.0 * weight / np.sum(weight)
    original = original[:n_query, ]
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=np.float32)
        for i in range(n_all):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
    inv_index = [np.where(v[:, i] != 0)[0] for i in range(n_all)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(n_query):
        temp_min = np.zeros(shape=[1, n_all], dtype=np.float32)
        nonzero = np.where(v[i, :] != 0)[0]
        for j in nonzero:
            images = inv_index[j]
            temp_min[0, images] = temp_min[0, images] + np.minimum(v[i, j], v[images, j])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    return jaccard * (1 - lambda_value) + original * lambda_value


def authors_on_one_set(euclid: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """The authors' code where every image is both query and gallery (the call that scores
    every pair of N images): q_q is the whole matrix, q_g and g_g are empty."""
    n = len(euclid)
    return authors_re_ranking(np.zeros((n, 0)), euclid, np.zeros((0, 0)), k1, k2, lam)


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 3, 0.1), (10, 1, 0.6)])
def test_rowmax_matches_the_authors_code(k1, k2, lam):
    emb, _ = clustered(21, n_ids=14, d=24)
    official = authors_on_one_set(np.sqrt(original_distance(emb)), k1, k2, lam)
    np.testing.assert_allclose(rerank(emb, k1, k2, lam, norm="rowmax"), official, rtol=0,
                               atol=TOL)
    np.testing.assert_allclose(rerank_reference(emb, k1, k2, lam, norm="rowmax"), official,
                               rtol=0, atol=TOL)
    # Without the row division the same k1, k2, lambda give other distances, and rankings.
    plain = rerank(emb, k1, k2, lam)
    assert np.abs(plain - official).max() > 0.01
    if lam > 0:
        assert not np.array_equal(np.argsort(plain, axis=1), np.argsort(official, axis=1))


def test_rowmax_is_row_scaled_and_asymmetric():
    emb, _ = clustered(5)
    d = original_distance(emb)
    lam = 1.0  # the Jaccard part vanishes: D itself
    got = rerank(emb, 20, 6, lam, norm="rowmax", dtype="float64")
    np.testing.assert_allclose(got, d / d.max(axis=1, keepdims=True), atol=1e-12)
    assert got.max() <= 1.0 + 1e-12 and not np.allclose(got, got.T)
    same = rerank(np.repeat(emb[:1], 5, axis=0), 3, 2, 0.3, norm="rowmax")
    assert np.isfinite(same).all()  # a row of identical images is left undivided


@pytest.mark.parametrize("n", [1, 2, 5])
def test_tiny_galleries(n):
    emb = random_unit(n, 8, seed=n)
    ref = assert_all_paths_agree(emb, 20, 6, 0.3)  # k1, k2 > N: clamped to N
    np.testing.assert_allclose(np.diag(ref), 0.0, atol=1e-12)
    if n == 1:
        assert rerank(emb).tolist() == [[0.0]]


def test_ties_and_duplicates_match_reference(monkeypatch):
    calls = {"windows": 0, "full rows": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(neighbours, "_order_windows",
                        spy("windows", neighbours._order_windows))
    monkeypatch.setattr(neighbours, "_full_rows64",
                        spy("full rows", neighbours._full_rows64))
    emb = with_duplicates()
    for k1, k2, lam in [(5, 3, 0.3), (20, 6, 0.3), (2, 1, 0.0), (9, 4, 0.5)]:
        assert_all_paths_agree(emb, k1, k2, lam, chunk_size=16)
    assert calls["windows"] > 0 and calls["full rows"] > 0  # both exact fallbacks ran


def test_coarse_embeddings_with_many_exact_ties():
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        x = np.round(rng.normal(size=(120, 8)) * 2) / 2  # few distinct values: many equal cosines
        x[np.linalg.norm(x, axis=1) == 0, 0] = 1.0
        assert_all_paths_agree(unit(x), 12, 4, 0.3, chunk_size=32)


def test_torch_branches_used_off_the_cpu(monkeypatch):
    # The helpers take numpy's routines on the CPU and torch's elsewhere (CUDA); run the torch
    # ones here so they are tested without a GPU.
    monkeypatch.setattr(array_ops, "_NUMPY_ON_CPU", False)
    assert_all_paths_agree(random_unit(60, 16), 20, 6, 0.3, chunk_size=16)
    emb, _ = clustered(2)
    assert_all_paths_agree(emb, 8, 3, 0.3)
    np.testing.assert_allclose(average_query_expansion(emb, 3, 1.0), qe_loop(emb, 3, 1.0),
                               rtol=0, atol=1e-6)


def test_small_blocks_do_not_change_the_result():
    emb, _ = clustered(4, n_ids=12)
    assert_all_paths_agree(emb, 6, 3, 0.3, chunk_size=7)


def test_lambda_one_gives_the_original_distance():
    emb, _ = clustered(5)
    d = original_distance(emb)
    np.testing.assert_array_equal(rerank_reference(emb, 20, 6, 1.0), d)
    np.testing.assert_allclose(rerank(emb, 20, 6, 1.0), d, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rerank(emb, 20, 6, 1.0, dtype="float64"), d, rtol=0, atol=1e-14)


def test_result_is_symmetric_with_zero_diagonal_and_in_range():
    emb, _ = clustered(6)
    for lam in (0.0, 0.3, 1.0):
        out = rerank(emb, 10, 4, lam)
        np.testing.assert_allclose(out, out.T, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.diag(out), 0.0, atol=1e-6)
        assert out.min() >= -1e-6 and out.max() <= 1 + 3 * lam + 1e-6


def test_torch_input_and_jaccard_is_one_off_support():
    emb = random_unit(50, 16, seed=7)
    out = rerank(torch.from_numpy(emb), 3, 1, 0.0)
    np.testing.assert_allclose(out, rerank_reference(emb, 3, 1, 0.0), rtol=0, atol=TOL)
    # With small k1 most pairs share no support: d_J is exactly 1 there.
    assert (out == 1.0).mean() > 0.5


def test_reranking_improves_retrieval_on_clustered_embeddings():
    gains = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        labels = np.repeat(np.arange(30), 6)
        x = unit(rng.normal(size=(30, 32))[labels] + rng.normal(size=(180, 32)))
        raw = identity_balanced_map(x.astype(np.float64) @ x.T, labels)
        reranked = identity_balanced_map(-rerank(x, 20, 6, 0.3), labels)
        gains.append(reranked - raw)
    assert min(gains) > 0.03, gains  # measured +0.07 to +0.10


@pytest.mark.slow
def test_fast_matches_reference_larger():
    emb, _ = clustered(8, n_ids=120, sizes=(1, 10), d=64, noise=0.8)
    assert_all_paths_agree(emb, 20, 6, 0.3, chunk_size=256)


# ---------------------------------------------------------------------------- sparse result


def test_sparse_result_layout():
    emb, _ = clustered(9)
    res = rerank_sparse(emb, 8, 3, 0.3)
    n = len(emb)
    assert res.n == n and res.indptr.shape == (n + 1,) and res.indptr[-1] == len(res.indices)
    assert res.indices.dtype == np.int32 and res.distance.dtype == np.float32
    dense = rerank(emb, 8, 3, 0.3)
    ref_jaccard = rerank_reference(emb, 8, 3, 0.0)
    for i in range(n):
        cols = res.indices[res.indptr[i]:res.indptr[i + 1]]
        assert cols[0] == i and np.all(np.diff(cols) > 0)  # upper triangle, ascending
        # Stored exactly where the Jaccard distance is below 1.
        expected = np.flatnonzero(ref_jaccard[i, i:] < 1.0) + i
        np.testing.assert_array_equal(cols, expected)
        np.testing.assert_allclose(res.distance[res.indptr[i]:res.indptr[i + 1]],
                                   dense[i, cols], rtol=0, atol=TOL)


def test_rerank_pairs_on_random_pairs():
    emb, _ = clustered(10, n_ids=15)
    n = len(emb)
    res = rerank_sparse(emb, 20, 6, 0.3)
    dense = rerank(emb, 20, 6, 0.3)
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, n, 500), rng.integers(0, n, 500)
    np.testing.assert_allclose(rerank_pairs(emb, rows, cols, res), dense[rows, cols],
                               rtol=0, atol=TOL)
    np.testing.assert_allclose(rerank_pairs(emb, cols, rows, res), dense[rows, cols],
                               rtol=0, atol=TOL)
    assert rerank_pairs(emb, np.array([], dtype=int), np.array([], dtype=int), res).shape == (0,)


def test_rerank_pairs_validation():
    emb = random_unit(20, 8)
    res = rerank_sparse(emb, 5, 2, 0.3)
    with pytest.raises(ValueError, match="20 images but emb has 19"):
        rerank_pairs(emb[:19], [0], [1], res)
    with pytest.raises(ValueError, match="cols must index 0..19"):
        rerank_pairs(emb, [0], [20], res)
    with pytest.raises(ValueError, match="same length"):
        rerank_pairs(emb, [0, 1], [1], res)
    with pytest.raises(ValueError, match="rows must be a 1-D integer array"):
        rerank_pairs(emb, [0.5], [1], res)
    with pytest.raises(ValueError, match="SparseRerank"):
        rerank_pairs(emb, [0], [1], rerank(emb))


# ---------------------------------------------------------------------------- memory, errors


def test_memory_guard_names_the_setting():
    emb = random_unit(30, 8)
    with pytest.raises(ValueError, match="max_dense_bytes") as err:
        rerank(emb, max_dense_bytes=1000)
    assert "rerank_sparse" in str(err.value)


def test_memory_estimate():
    dense = [estimate_rerank_memory(n, 20, True) for n in (1000, 20_000, 100_000)]
    assert dense == sorted(dense)
    assert dense[2] > 100_000 ** 2 * 4  # the N x N float32 result alone is 40 GB
    assert estimate_rerank_memory(20_000, 20, True) < rr.DEFAULT_MAX_DENSE_BYTES  # dense fits
    assert estimate_rerank_memory(100_000, 20, False) < 24 << 30
    assert estimate_rerank_memory(20_000, 20, True, itemsize=8) > \
        estimate_rerank_memory(20_000, 20, True)
    with pytest.raises(ValueError, match="k1 must be an integer >= 1"):
        estimate_rerank_memory(100, 0, True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k1": 0}, "k1 must be an integer >= 1"),
    ({"k2": True}, "k2 must be an integer >= 1"),
    ({"lambda_value": 1.5}, r"lambda_value must be a number in \[0, 1\]"),
    ({"dtype": "float16"}, "dtype must be"),
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ({"norm": "colmax"}, "norm must be one of none, rowmax, got 'colmax'"),
])
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rerank(random_unit(10, 4), **kwargs)


@pytest.mark.parametrize(("emb", "message"), [
    (np.ones((3, 4)), "must be L2-normalised: row 0 has norm 2"),
    (np.ones(4), r"2-D \(N, D\) array"),
    (np.zeros((0, 4)), r"2-D \(N, D\) array"),
    (np.array([[np.nan, 0.0]]), "NaN or infinite"),
    (np.array([["a", "b"]]), "real numbers"),
])
def test_embedding_errors(emb, message):
    for fn in (rerank, rerank_sparse, rerank_reference):
        with pytest.raises(ValueError, match=message):
            fn(emb)
    with pytest.raises(ValueError, match=message):
        average_query_expansion(emb, 1)


# ---------------------------------------------------------------------------- scores in [0, 1]


def test_distance_to_similarity():
    for lam in (0.0, 0.3, 1.0):
        top = 1.0 + 3.0 * lam
        d = np.linspace(0.0, top, 11)
        sim = distance_to_similarity(d, lam)
        assert sim[0] == 1.0 and sim[-1] == 0.0 and np.all(np.diff(sim) < 0)
        np.testing.assert_allclose(distance_to_similarity(np.linspace(0.0, 1.0, 5), lam,
                                                          "rowmax"), np.linspace(1.0, 0.0, 5))
    emb, _ = clustered(14)
    cos = emb.astype(np.float64) @ emb.T
    np.testing.assert_allclose(distance_to_similarity(rerank(emb, lambda_value=1.0), 1.0),
                               (1.0 + cos) / 2.0, atol=1e-6)
    with pytest.raises(ValueError, match="lambda_value"):
        distance_to_similarity(d, 2.0)


def test_blend():
    raw, rer = np.array([0.2, 0.9]), np.array([0.6, 0.1])
    np.testing.assert_allclose(blend(raw, rer, 0.0), raw)
    np.testing.assert_allclose(blend(raw, rer, 1.0), rer)
    np.testing.assert_allclose(blend(raw, rer, 0.25), [0.3, 0.7])
    with pytest.raises(ValueError, match=r"w must be a number in \[0, 1\]"):
        blend(raw, rer, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        blend(raw, rer[:1], 0.5)
    with pytest.raises(ValueError, match=r"reranked_sim01 must hold finite values in \[0, 1\]"):
        blend(raw, np.array([0.5, 1.2]), 0.5)


DOGS = SHARED / "datasets" / "dogfacenet-reid"
LITE0 = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"


@pytest.mark.shared
@pytest.mark.skipif(not (DOGS.is_dir() and LITE0.is_file()), reason="../shared absent")
def test_fast_paths_match_reference_on_real_embeddings():
    """Pretrained ImageNet features of real dog photos (clustered the way real embeddings are,
    many near ties): 12 dogs x 1-6 images, one dog with a single image, k1 = 20 above every
    identity's count."""
    import pandas as pd

    from jaguar_reid.config import load_config
    from jaguar_reid.retrieval.embedding import embed_views
    from jaguar_reid.training.model import build_model

    train = pd.read_csv(DOGS / "train.csv")
    dogs = sorted(train["ground_truth"].unique())[:12]
    take = [train[train["ground_truth"] == d].head(1 if i == 0 else 6)
            for i, d in enumerate(dogs)]
    rows = pd.concat(take)
    cfg = load_config(["config=configs/dogface_lite0.yaml", f"model.weights={LITE0}",
                       "data.dir=" + str(DOGS), "device=cpu", "embed.batch_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg, n_classes=2)
    paths = [DOGS / "train" / f for f in rows["filename"]]
    emb = embed_views(model, paths, cfg, "cpu")["orig"]["backbone"]
    assert len(emb) == len(rows) and rows["ground_truth"].value_counts().min() == 1
    ref = rerank_reference(emb, 20, 6, 0.3)
    assert np.abs(rerank(emb, 20, 6, 0.3) - ref).max() < TOL
    sparse = rerank_sparse(emb, 20, 6, 0.3)
    n = len(emb)
    r, c = np.divmod(np.arange(n * n), n)
    assert np.abs(rerank_pairs(emb, r, c, sparse).reshape(n, n) - ref).max() < TOL
    # and the re-ranking does what it is for on these features
    labels = rows["ground_truth"].to_numpy()
    assert identity_balanced_map(-ref, labels) > identity_balanced_map(emb @ emb.T, labels) - 0.02


@pytest.mark.parametrize("norm", ["none", "rowmax"])
def test_a_lambda_grid_reranks_once_and_matches_each_lambda_alone(monkeypatch, norm):
    """Small re-rankings keep d_J and d: every lambda is their blend, equal to re-ranking at
    that lambda directly (the path large N takes) and to the reference."""
    emb = random_unit(60, 16, seed=3)
    calls = []
    real = rr._rerank_at

    def counting(*args):
        calls.append(args[2:5])
        return real(*args)
    monkeypatch.setattr(rr, "_rerank_at", counting)
    lambdas = (0.05, 0.1, 0.3, 0.6, 1.0)
    kept = {lam: rerank(emb, 9, 3, lam, norm=norm) for lam in lambdas}
    assert len(calls) == 1  # one Jaccard for the whole grid
    rerank(random_unit(60, 16, seed=4), 9, 3, 0.3, norm=norm)
    rerank(emb, 10, 3, 0.3, norm=norm)
    assert len(calls) == 3  # other embeddings, another k1: re-ranked again
    monkeypatch.setattr(rr, "_PARTS_BYTES", 0)  # large N: each lambda computed alone
    for lam in lambdas:
        alone = rerank(emb, 9, 3, lam, norm=norm)
        np.testing.assert_allclose(kept[lam], alone, rtol=0, atol=TOL)
        np.testing.assert_allclose(kept[lam], rerank_reference(emb, 9, 3, lam, norm=norm),
                                   rtol=0, atol=TOL)
    assert len(calls) == 3 + len(lambdas)
