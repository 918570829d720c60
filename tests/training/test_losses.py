"""The training losses beside ArcFace: the hand-written ones against plain loops (and, with hard
labels, against pytorch-metric-learning), the library ones as the loop calls them, and the
keys that turn them on."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss, SmoothAPLoss
from pytorch_metric_learning.reducers import MeanReducer

from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.training.losses import (
    Criterion,
    metrix_mix,
    recall_k_surrogate,
    simix,
    soft_contrastive,
    soft_multi_similarity,
)

PK = ["train.sampler=pk", "train.pk_k=4", "train.batch_size=16"]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def recall_k_by_loops(sim, positive, valid, ks, tau1, tau2) -> float:
    """The surrogate written out one query, one positive, one competitor at a time."""
    per_query = []
    for q in range(sim.shape[0]):
        pos = [p for p in range(sim.shape[1]) if positive[q, p] and valid[q, p]]
        if not pos:
            continue
        ranks = {p: 1.0 + sum(sig((sim[q, z] - sim[q, p]) / tau1)
                              for z in range(sim.shape[1]) if z != p and valid[q, z])
                 for p in pos}
        values = [min(sum(sig((k + 0.5 - ranks[p]) / tau2) for p in pos), k) / min(k, len(pos))
                  for k in ks]
        per_query.append(sum(values) / len(values))
    return 1.0 - sum(per_query) / len(per_query)


def batch(n_ids: int = 4, k: int = 4, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_ids * k, dim, generator=gen)
    labels = torch.arange(n_ids).repeat_interleave(k)
    return emb, labels


def test_recall_k_surrogate_matches_plain_loops():
    gen = torch.Generator().manual_seed(1)
    sim = torch.rand(6, 9, generator=gen, dtype=torch.float64) * 2 - 1
    positive = torch.rand(6, 9, generator=gen) < 0.3
    valid = torch.rand(6, 9, generator=gen) < 0.85
    ks, tau1, tau2 = [1, 2, 4], 0.05, 0.5
    got = recall_k_surrogate(sim, positive, valid, ks, tau1, tau2)
    assert got.item() == pytest.approx(recall_k_by_loops(sim.numpy(), positive.numpy(),
                                                         valid.numpy(), ks, tau1, tau2),
                                       abs=1e-9)


def test_recall_k_surrogate_becomes_recall_at_k_at_small_temperatures():
    """With sharp sigmoids the surrogate is 1 - recall@k: the share of a query's positives
    within its top k, out of min(k, positives)."""
    emb, labels = batch(seed=3)
    emb = torch.nn.functional.normalize(emb.double(), dim=1)
    sim = emb @ emb.T
    n = len(labels)
    valid = ~torch.eye(n, dtype=torch.bool)
    positive = labels[:, None] == labels[None, :]
    for k in (1, 2, 4):
        expected = []
        for q in range(n):
            order = [z for z in torch.argsort(sim[q], descending=True).tolist() if z != q]
            hits = sum(bool(positive[q, z]) for z in order[:k])
            expected.append(hits / min(k, int(positive[q].sum()) - 1))
        got = recall_k_surrogate(sim, positive, valid, [k], 1e-6, 1e-6)
        assert got.item() == pytest.approx(1 - np.mean(expected), abs=1e-6)


def test_simix_adds_mixed_similarities_of_same_identity_pairs():
    torch.manual_seed(0)
    emb, labels = batch(n_ids=3, k=3)
    sim = emb @ emb.T
    mixed, gallery_labels, valid = simix(sim, labels, alpha=1.0)
    pairs = [(i, j) for i, j in itertools.combinations(range(len(labels)), 2)
             if labels[i] == labels[j]]
    assert mixed.shape == (9, 9 + len(pairs)) and len(pairs) == 9
    assert torch.equal(mixed[:, :9], sim)
    for col, (i, j) in enumerate(pairs, start=9):
        assert gallery_labels[col] == labels[i]
        # One lam per virtual item, the same for every query.
        lam = (mixed[0, col] - sim[0, j]) / (sim[0, i] - sim[0, j])
        assert 0 <= lam <= 1
        assert torch.allclose(mixed[:, col], lam * sim[:, i] + (1 - lam) * sim[:, j], atol=1e-5)
        for q in range(9):  # a virtual item made from the query itself is not ranked for it
            assert bool(valid[q, col]) == (q not in (i, j))
    assert not valid[:, :9].diagonal().any()


def soft_losses_by_loops(sim, target, weight, margin, alpha, beta, base):
    pos = sum(t * w * max(1 - s, 0)
              for s, t, w in zip(sim.flat, target.flat, weight.flat, strict=True))
    neg = sum((1 - t) * w * max(s - margin, 0)
              for s, t, w in zip(sim.flat, target.flat, weight.flat, strict=True))
    contrastive = pos / (target * weight).sum() + neg / ((1 - target) * weight).sum()
    rows = []
    for s, t, w in zip(sim, target, weight, strict=True):
        p = math.log(1 + sum(ti * wi * math.exp(-alpha * (si - base))
                             for si, ti, wi in zip(s, t, w, strict=True))) / alpha
        n = math.log(1 + sum((1 - ti) * wi * math.exp(beta * (si - base))
                             for si, ti, wi in zip(s, t, w, strict=True))) / beta
        rows.append(p + n)
    return contrastive, sum(rows) / len(rows)


def test_soft_pair_losses_match_plain_loops():
    gen = torch.Generator().manual_seed(2)
    sim = torch.rand(5, 7, generator=gen, dtype=torch.float64) * 2 - 1
    target = torch.rand(5, 7, generator=gen, dtype=torch.float64)
    weight = (torch.rand(5, 7, generator=gen) < 0.8).double()
    want_c, want_ms = soft_losses_by_loops(sim.numpy(), target.numpy(), weight.numpy(),
                                           0.3, 2.0, 10.0, 0.5)
    assert soft_contrastive(sim, target, weight, 0.3).item() == pytest.approx(want_c, rel=1e-9)
    got = soft_multi_similarity(sim, target, weight, 2.0, 10.0, 0.5)
    assert got.item() == pytest.approx(want_ms, rel=1e-9)


def test_soft_pair_losses_with_hard_labels_are_the_library_losses():
    """Metrix's soft forms reduce to pytorch-metric-learning's losses when the pair labels are
    0 or 1 (self pairs left out)."""
    emb, labels = batch(seed=5)
    norm = torch.nn.functional.normalize(emb, dim=1)
    sim = norm @ norm.T
    target = (labels[:, None] == labels[None, :]).float()
    weight = 1.0 - torch.eye(len(labels))
    library_c = ContrastiveLoss(pos_margin=1.0, neg_margin=0.3, distance=CosineSimilarity(),
                                reducer=MeanReducer())(emb, labels)
    assert soft_contrastive(sim, target, weight, 0.3).item() == pytest.approx(
        library_c.item(), rel=1e-5)
    library_ms = MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(emb, labels)
    assert soft_multi_similarity(sim, target, weight, 2.0, 50.0, 0.5).item() == pytest.approx(
        library_ms.item(), rel=1e-5)


def test_metrix_mixes_two_identities_with_interpolated_labels():
    torch.manual_seed(0)
    emb, labels = batch(n_ids=3, k=2)
    sim, target, weight = metrix_mix(emb, labels, alpha=2.0)
    norm = torch.nn.functional.normalize(emb, dim=1)
    n = len(labels)
    assert sim.shape == target.shape == weight.shape == (n, n)
    for col in range(n):
        # Column `col` mixes item col with an item of another identity: anchors of col's
        # identity get lam, anchors of the partner's get 1 - lam, the rest 0.
        own = target[labels == labels[col], col]
        assert torch.allclose(own, own[0].expand_as(own)) and 0 < own[0] < 1
        partner = [a for a in range(n) if labels[a] != labels[col] and target[a, col] > 0]
        assert partner and torch.allclose(target[partner, col], 1 - own[0])
        assert weight[col, col] == 0 and weight[:, col].sum() == n - 2
        others = [a for a in range(n) if target[a, col] == 0]
        assert len(others) == n - 4
    # The mixed items are unit vectors, and the similarities their cosines to the anchors.
    assert torch.all(sim.abs() <= 1 + 1e-6)
    assert metrix_mix(norm[:2], torch.tensor([1, 1]), 2.0) is None


def test_criterion_sums_its_weighted_terms_and_sorts_batches_for_smooth_ap():
    cfg = load_config([*PK, "loss.arcface=0.5", "loss.smooth_ap=2", "loss.multi_similarity=1",
                       "loss.recall_k=0.25", "train.metrix_alpha=2"])
    torch.manual_seed(0)
    criterion = Criterion(cfg, 8)
    emb, labels = batch()
    logits = torch.randn(len(labels), 4)
    torch.manual_seed(1)
    total = criterion(emb, logits, labels)
    parts = criterion.parts
    assert set(parts) == {"arcface", "smooth_ap", "multi_similarity", "multi_similarity_mix",
                          "recall_k"}
    weights = {"arcface": 0.5, "smooth_ap": 2, "multi_similarity": 1,
               "multi_similarity_mix": 1, "recall_k": 0.25}
    assert total.item() == pytest.approx(sum(w * parts[k] for k, w in weights.items()),
                                         rel=1e-5)
    # Smooth-AP of a shuffled batch: the same loss (the library's reads consecutive groups).
    library = SmoothAPLoss(temperature=0.01)(emb, labels).item()
    assert parts["smooth_ap"] == pytest.approx(library, rel=1e-5)
    order = torch.randperm(len(labels))
    only_ap = Criterion(load_config([*PK, "loss.arcface=0", "loss.smooth_ap=1"]), 8)
    assert only_ap(emb[order], None, labels[order]).item() == pytest.approx(library, rel=1e-5)


def test_cross_batch_memory_state_round_trips():
    """The checkpoint carries the memory: a restored criterion scores the next batch as the
    one that never stopped, and a fresh one (empty memory) scores it differently."""
    cfg = load_config([*PK, "loss.arcface=0", "loss.contrastive=1", "loss.xbm_size=32"])
    running, restored, fresh = (Criterion(cfg, 8) for _ in range(3))
    for seed in range(3):
        running(*batch(seed=seed)[:1], None, batch(seed=seed)[1])
    restored.load_memory_state(running.memory_state())
    emb, labels = batch(seed=9)
    want = running(emb, None, labels).item()
    assert restored(emb, None, labels).item() == want
    assert fresh(emb, None, labels).item() != pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("args,message", [
    (["loss.multi_similarity=1"], r"loss\.multi_similarity' needs several images .*"
                                  r"train\.sampler=pk"),
    ([*PK, "train.pk_k=1", "train.batch_size=4", "loss.smooth_ap=1"], r"train\.pk_k >= 2"),
    ([*PK, "loss.arcface=0"], "nothing would train"),
    (["train.sampler=pk", "train.batch_size=4", "loss.recall_k=1"], "no negatives"),
    ([*PK, "loss.xbm_size=64", "loss.smooth_ap=1"], r"loss\.xbm_size' keeps embeddings"),
    ([*PK, "loss.xbm_size=8", "loss.contrastive=1"], "at least one batch"),
    ([*PK, "train.metrix_alpha=2", "loss.smooth_ap=1"], r"train\.metrix_alpha' mixes"),
    ([*PK, "loss.recall_k=1", "loss.recall_ks=[0,4]"], r"loss\.recall_ks"),
    ([*PK, "loss.recall_k=1", "loss.recall_tau1=0"], r"loss\.recall_tau1"),
    (["loss.recall_k=-1"], r"loss\.recall_k"),
    (["train.teacher=a", "loss.contrastive=1", "fold=full"], "cannot train a student"),
])
def test_bad_loss_settings_are_named(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)
