"""The post-processing step against plain computations: query expansion by a loop, re-ranking
by the paper's reference, the closed-set gallery by hand, prototypes by a softmax loop; the
memory guard's two answers."""

import numpy as np
import pytest

from jaguar_reid.io_utils import UserInputError
from jaguar_reid.retrieval.postprocess import (
    PostSettings,
    all_pairs,
    identity_posteriors,
    mean_prototypes,
    postprocess_pairs,
    prototype_similarity,
)
from jaguar_reid.retrieval.rerank_reference import rerank_reference


def unit(rng, n, d=8, ids=None):
    x = rng.normal(size=(n, d))
    if ids is not None:  # clustered: identities share a direction
        x += 2.5 * rng.normal(size=(ids.max() + 1, d))[ids]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def aqe_loop(x, k):
    """Average QE: mean of the image and its k nearest others (float64 cosine), normalised."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    for i in range(len(x)):
        sims = x @ x[i]
        sims[i] = np.inf  # the image itself first
        order = np.argsort(-sims, kind="stable")[:k + 1]
        m = x[order].mean(axis=0)
        out[i] = m / np.linalg.norm(m)
    return out


def test_everything_off_is_the_cosine_mapped_to_unit():
    rng = np.random.default_rng(0)
    x = unit(rng, 7)
    rows, cols = all_pairs(7)
    got = postprocess_pairs(x, rows, cols, PostSettings())
    expected = [(1 + float(x[i].astype(np.float64) @ x[j])) / 2
                for i, j in zip(rows, cols, strict=True)]
    assert np.allclose(got, expected, atol=1e-6)


def test_query_expansion_matches_a_loop():
    rng = np.random.default_rng(1)
    x = unit(rng, 12, ids=np.arange(12) % 3)
    rows, cols = all_pairs(12)
    got = postprocess_pairs(x, rows, cols, PostSettings(qe_k=2)).reshape(12, 12)
    q = aqe_loop(x, 2)
    assert np.allclose(got, (1 + q @ q.T) / 2, atol=1e-5)
    # DBA then QE: the same map twice
    got2 = postprocess_pairs(x, rows, cols, PostSettings(qe_k=2, dba_k=2)).reshape(12, 12)
    q2 = aqe_loop(aqe_loop(x, 2).astype(np.float32), 2)
    assert np.allclose(got2, (1 + q2 @ q2.T) / 2, atol=1e-5)


@pytest.mark.parametrize("k1,k2,lam,w", [(4, 2, 0.3, 1.0), (20, 6, 0.1, 0.5), (3, 1, 0.0, 0.25)])
def test_rerank_and_blend_match_the_reference(k1, k2, lam, w):
    rng = np.random.default_rng(2)
    ids = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])  # identity 2 has one image
    x = unit(rng, len(ids), ids=ids)
    n = len(x)
    rows, cols = all_pairs(n)
    s = PostSettings(rerank=True, k1=k1, k2=k2, lambda_value=lam, blend=w)
    got = postprocess_pairs(x, rows, cols, s).reshape(n, n)
    d = rerank_reference(x, k1, k2, lam)  # k1 = 20 > N: clamped, as the reference does
    raw = (1 + x.astype(np.float64) @ x.T.astype(np.float64)) / 2
    expected = w * np.clip(1 - d / (1 + 3 * lam), 0, 1) + (1 - w) * raw
    assert np.allclose(got, expected, atol=1e-5)


def test_rowmax_rerank_maps_its_own_range_to_similarity():
    rng = np.random.default_rng(4)
    ids = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])
    x = unit(rng, len(ids), ids=ids)
    n = len(x)
    rows, cols = all_pairs(n)
    s = PostSettings(rerank=True, k1=4, k2=2, lambda_value=0.3, rerank_norm="rowmax")
    got = postprocess_pairs(x, rows, cols, s).reshape(n, n)
    d = rerank_reference(x, 4, 2, 0.3, norm="rowmax")  # in [0, 1]: similarity 1 - d
    assert np.allclose(got, 1.0 - d, atol=1e-5)
    assert not np.allclose(got, got.T, atol=1e-3)  # ordered pairs differ, as in the authors' code


@pytest.mark.parametrize("norm", ["none", "rowmax"])
def test_memory_guard_takes_the_sparse_path_or_stops(norm):
    rng = np.random.default_rng(3)
    x = unit(rng, 40, ids=np.arange(40) % 6)
    rows, cols = all_pairs(40)
    s = PostSettings(rerank=True, k1=6, k2=3, lambda_value=0.3, rerank_norm=norm)
    dense = postprocess_pairs(x, rows, cols, s)
    sparse = postprocess_pairs(x, rows, cols, s, max_dense_bytes=1)
    assert np.allclose(dense, sparse, atol=1e-6)
    with pytest.raises(UserInputError, match="post.max_dense_gb.*post.on_large=sparse"):
        postprocess_pairs(x, rows, cols, s, max_dense_bytes=1, on_large="stop")


def test_closed_gallery_reranks_the_union_and_answers_the_test_pairs():
    rng = np.random.default_rng(4)
    test_ids, train_ids = np.array([0, 1, 2, 3, 0, 1]), np.repeat(np.arange(4), 3)
    centres = 2.5 * rng.normal(size=(4, 8))
    test = unit(rng, 6) + centres[test_ids]
    train = unit(rng, 12) + centres[train_ids]
    test = (test / np.linalg.norm(test, axis=1, keepdims=True)).astype(np.float32)
    train = (train / np.linalg.norm(train, axis=1, keepdims=True)).astype(np.float32)
    rows, cols = all_pairs(6)
    s = PostSettings(rerank=True, k1=4, k2=2, lambda_value=0.3, blend=0.5, closed_gallery=True,
                     qe_k=1)
    got = postprocess_pairs(test, rows, cols, s, train_emb=train).reshape(6, 6)
    union = aqe_loop(np.concatenate([test, train]), 1).astype(np.float32)
    d = rerank_reference(union, 4, 2, 0.3)[:6, :6]
    raw = (1 + union[:6].astype(np.float64) @ union[:6].T.astype(np.float64)) / 2
    assert np.allclose(got, 0.5 * (1 - d / 1.9) + 0.5 * raw, atol=1e-5)
    with pytest.raises(ValueError, match="training images"):
        postprocess_pairs(test, rows, cols, s)


def test_prototype_posteriors_and_similarity():
    rng = np.random.default_rng(5)
    train_ids = np.array(["b", "a", "a", "c", "b", "c"])
    train = unit(rng, 6)
    classes, protos = mean_prototypes(train, train_ids)
    assert classes.tolist() == ["a", "b", "c"]
    for c, proto in zip(classes, protos, strict=True):
        m = train[train_ids == c].astype(np.float64).mean(axis=0)
        assert np.allclose(proto, m / np.linalg.norm(m), atol=1e-6)
    x = unit(rng, 4)
    p = identity_posteriors(x, protos, 10.0)
    for i in range(4):
        logits = [10.0 * float(x[i] @ pr) for pr in protos]
        e = np.exp(np.array(logits) - max(logits))
        assert np.allclose(p[i], e / e.sum(), atol=1e-6)
    # sub-centres: a class's cosine is its closest centre's
    centres = unit(rng, 6)  # 3 classes x 2 centres, class-major
    p2 = identity_posteriors(x, centres, 5.0, subcenters=2)
    cos = x.astype(np.float64) @ centres.T.astype(np.float64)
    best = np.stack([cos[:, 0:2].max(1), cos[:, 2:4].max(1), cos[:, 4:6].max(1)], axis=1)
    e = np.exp(5 * best - (5 * best).max(1, keepdims=True))
    assert np.allclose(p2, e / e.sum(1, keepdims=True), atol=1e-6)
    rows, cols = all_pairs(4)
    sim = prototype_similarity([p, p2], rows, cols)
    expected = [(p[i] @ p[j] + p2[i] @ p2[j]) / 2 for i, j in zip(rows, cols, strict=True)]
    assert np.allclose(sim, expected) and sim.min() >= 0 and sim.max() <= 1
    # blended into the final similarity with its weight
    s = PostSettings(proto_weight=0.4)
    got = postprocess_pairs(x, rows, cols, s, posteriors=[p])
    raw = (1 + np.einsum("pd,pd->p", x[rows].astype(np.float64), x[cols].astype(np.float64))) / 2
    assert np.allclose(got, 0.6 * raw + 0.4 * np.einsum("pc,pc->p", p[rows], p[cols]), atol=1e-6)


def test_settings_round_trip_and_bad_embeddings():
    s = PostSettings(views=("orig", "flip"), qe_k=3, rerank=True, lambda_value=0.6)
    d = s.to_dict()
    assert d["lambda"] == 0.6 and d["views"] == ["orig", "flip"]
    assert PostSettings.from_mapping(d) == s
    assert "re-rank k1=20" in s.describe() and "QE k=3" in s.describe()
    x = np.full((3, 4), 0.5, dtype=np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        postprocess_pairs(x, *all_pairs(3), PostSettings())


def test_pair_dot_dense_and_blocked_paths_agree():
    from jaguar_reid.retrieval.postprocess import pair_dot

    rng = np.random.default_rng(6)
    x = unit(rng, 30)
    rows, cols = all_pairs(30)  # most pairs: one matrix product
    loop = [float(x[i].astype(np.float64) @ x[j]) for i, j in zip(rows, cols, strict=True)]
    assert np.allclose(pair_dot(x, rows, cols), loop, atol=1e-12)
    few = rng.integers(0, 30, size=(2, 7))  # a few pairs: gathered blocks
    assert np.allclose(pair_dot(x, few[0], few[1]),
                       [float(x[i].astype(np.float64) @ x[j]) for i, j in few.T], atol=1e-12)
    assert pair_dot(x, np.zeros(0, int), np.zeros(0, int)).shape == (0,)


def test_only_the_steps_that_use_them_embed_the_training_images():
    assert not PostSettings(rerank=True, qe_k=2).needs_training_images
    assert PostSettings(closed_gallery=True).needs_training_images
    assert PostSettings(proto_weight=0.2, proto_source="mean").needs_training_images
    assert not PostSettings(proto_weight=0.2, proto_source="arcface").needs_training_images
