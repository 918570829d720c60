"""Training losses: ArcFace's cross-entropy and, beside it, losses on the ranking of a batch.

The leaderboard scores a ranking; ArcFace trains a classifier and hopes the ranking follows.
The pair losses work on the batch's cosine similarities directly (each with its weight in
`loss.<name>`, 0 = off, summed with ArcFace's):
  contrastive       positives pulled to cosine 1, negatives pushed below `contrastive_margin`
  multi_similarity  Wang et al. 2019
  smooth_ap         Brown et al. 2020: 1 - AP with every rank step smoothed by a sigmoid
  recall_k          Patel et al. 2022: 1 - recall@k with the rank and the "rank <= k" test
                    smoothed, averaged over `recall_ks`
The first three are pytorch-metric-learning's. What no library has is written here and tested
against plain loops: the Recall@k surrogate, SiMix (its similarity mixup) and the soft-label
contrastive and multi-similarity losses of Metrix (embedding mixup, Venkataramanan et al.
2022). `loss.xbm_size` puts contrastive and multi-similarity behind pytorch-metric-learning's
cross-batch memory, for the small batches of a large backbone.

pytorch-metric-learning is the optional extra `losses` (Kaggle's image lacks it): imported only
when one of its losses is on, so the default recipe (ArcFace alone) and the submission need it
not; asking for one without it stops in one line naming the extra.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from jaguar_reid.config import PAIR_LOSS_KEYS as PAIR_LOSSES
from jaguar_reid.config import Config
from jaguar_reid.extras import require
from jaguar_reid.training import distill

LIBRARY_LOSSES = ("contrastive", "multi_similarity", "smooth_ap")  # pytorch-metric-learning's
MEMORY_LOSSES = ("contrastive", "multi_similarity")  # what CrossBatchMemory can wrap
METRIX_LOSSES = ("contrastive", "multi_similarity")  # Metrix's soft forms (recall_k: SiMix)
POS_MARGIN = 1.0  # contrastive: positives are pulled until their cosine reaches 1


def pair_losses_on(cfg: Config) -> list[str]:
    """The pair losses with a weight above 0."""
    return [name for name in PAIR_LOSSES if cfg.loss[name] > 0]


def metric_learning(setting: str) -> tuple[ModuleType, ModuleType]:
    """pytorch_metric_learning's `losses` and `distances`, or one line naming `setting` (the
    key=value that asked for them) and the extra that provides them."""
    return (require("pytorch_metric_learning.losses", setting),
            require("pytorch_metric_learning.distances", setting))


def require_extras(cfg: Config) -> None:
    """Every optional library the run's losses use imports, or one line naming the first
    key=value that asks for a missing one: called before any work (the image cache, the
    teachers' embeddings), not when the first fold builds its Criterion."""
    for name in pair_losses_on(cfg):
        if name in LIBRARY_LOSSES:
            metric_learning(f"loss.{name}={cfg.loss[name]:g}")
    if cfg.train.teacher and cfg.train.distill_loss == "contr_reg":
        distill.metric_learning()


# --------------------------------------------------------------------------- Recall@k, SiMix

def recall_k_surrogate(sim: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor,
                       ks: list[int], tau1: float, tau2: float) -> torch.Tensor:
    """1 - smoothed recall@k (Patel et al. 2022) of queries against a gallery.

    sim (Q, M): query-gallery cosines; positive (Q, M): same identity; valid (Q, M): the
    gallery items each query is ranked against (its own image excluded). A positive p's rank is
    1 + sum over other valid items z of sigmoid((s_z - s_p) / tau1); recall@k of a query is
    min(sum over positives of sigmoid((k + 1/2 - rank_p) / tau2), k) / min(k, positives),
    averaged over `ks`, then over the queries that have a positive. The step sits between
    ranks k and k + 1, so sharp temperatures give recall@k itself (the paper's k - rank
    counts a positive at rank k as one half).
    """
    positive, valid = positive & valid, valid.float()
    diff = (sim.unsqueeze(1) - sim.unsqueeze(2)) / tau1  # [q, p, z] = (s_z - s_p) / tau1
    eye = torch.eye(sim.shape[1], dtype=torch.bool, device=sim.device)
    beaten = torch.sigmoid(diff).masked_fill(eye, 0.0) * valid.unsqueeze(1)
    rank = 1.0 + beaten.sum(dim=2)  # (Q, M)
    n_pos = positive.sum(dim=1).float()
    recalls = []
    for k in ks:
        hits = (torch.sigmoid((k + 0.5 - rank) / tau2) * positive).sum(dim=1)
        recalls.append(torch.minimum(hits, torch.full_like(hits, k))
                       / n_pos.clamp(max=k).clamp(min=1))
    has_pos = n_pos > 0
    if not has_pos.any():
        return sim.sum() * 0.0
    return 1.0 - torch.stack(recalls, dim=1)[has_pos].mean()


def simix(sim: torch.Tensor, labels: torch.Tensor, alpha: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SiMix: every pair (i, j) of same-identity batch items gives a virtual gallery item whose
    cosine to each query is lam * s(q, i) + (1 - lam) * s(q, j), lam ~ Beta(alpha, alpha), of
    that identity. Virtual items built from the query itself are not ranked for it.

    sim (B, B) -> (similarities (B, B + V), gallery labels (B + V), valid (B, B + V))."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    same = labels[i] == labels[j]
    i, j = i[same], j[same]
    lam = torch.distributions.Beta(alpha, alpha).sample((len(i),)).to(sim)
    virtual = lam * sim[:, i] + (1.0 - lam) * sim[:, j]
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1)
    valid = torch.cat([rows != rows.T, (rows != i) & (rows != j)], dim=1)
    return torch.cat([sim, virtual], dim=1), torch.cat([labels, labels[i]]), valid


def recall_k_loss(emb: torch.Tensor, labels: torch.Tensor, cfg: Config,
                  mix_alpha: float = 0.0) -> torch.Tensor:
    """The Recall@k surrogate of a batch, each item a query against the others (and, with
    `mix_alpha` > 0, against SiMix's virtual items)."""
    emb = F.normalize(emb.float(), dim=1)
    sim = emb @ emb.T
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1)
    gallery_labels, valid = labels, rows != rows.T
    if mix_alpha > 0:
        sim, gallery_labels, valid = simix(sim, labels, mix_alpha)
    positive = labels.unsqueeze(1) == gallery_labels.unsqueeze(0)
    return recall_k_surrogate(sim, positive, valid, [int(k) for k in cfg.loss.recall_ks],
                              cfg.loss.recall_tau1, cfg.loss.recall_tau2)


# --------------------------------------------------------------------------- Metrix

def soft_contrastive(sim: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """Contrastive loss with pair labels in [0, 1] (Metrix's generic form): the mean of
    [1 - s]_+ over pairs weighted by target, plus the mean of [s - margin]_+ weighted by
    1 - target; `weight` (0 or 1) drops pairs. Hard targets give pytorch-metric-learning's
    ContrastiveLoss with a MeanReducer."""
    pos, neg = target * weight, (1.0 - target) * weight
    pos_term = (pos * (POS_MARGIN - sim).clamp(min=0)).sum() / pos.sum().clamp(min=1e-12)
    neg_term = (neg * (sim - margin).clamp(min=0)).sum() / neg.sum().clamp(min=1e-12)
    return pos_term + neg_term


def _log1p_weighted_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + sum_j w_j exp(x_j)), stable for large x, w >= 0."""
    logs = x + torch.log(w.clamp(min=0))  # w = 0 -> -inf: the term vanishes
    zero = torch.zeros_like(logs[:, :1])
    return torch.logsumexp(torch.cat([zero, logs], dim=1), dim=1)


def soft_multi_similarity(sim: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                          alpha: float, beta: float, base: float) -> torch.Tensor:
    """Multi-similarity loss with pair labels in [0, 1] (Metrix): per anchor row,
    log(1 + sum target e^{-alpha (s - base)}) / alpha
    + log(1 + sum (1 - target) e^{beta (s - base)}) / beta, averaged over anchors. Hard targets
    give pytorch-metric-learning's MultiSimilarityLoss."""
    pos = _log1p_weighted_sum(-alpha * (sim - base), target * weight) / alpha
    neg = _log1p_weighted_sum(beta * (sim - base), (1.0 - target) * weight) / beta
    return (pos + neg).mean()


def metrix_mix(emb: torch.Tensor, labels: torch.Tensor, alpha: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Embedding mixup for pair losses: item i mixed with a random item j of another identity,
    v = lam e_i + (1 - lam) e_j, lam ~ Beta(alpha, alpha). Returns (cosine of every batch
    anchor to every mixed item, the interpolated pair labels lam [a ~ i] + (1 - lam) [a ~ j],
    weight: 0 where the anchor is i or j itself); None when the batch holds one identity."""
    n = len(labels)
    other = labels.unsqueeze(1) != labels.unsqueeze(0)
    if not other.any():
        return None
    # A uniform draw among each row's other-identity items, from the global generator (saved
    # in checkpoints, so a resumed run draws the same).
    scores = torch.rand(n, n).to(emb.device).masked_fill(~other, -1.0)
    has_other = other.any(dim=1)
    i = torch.arange(n, device=emb.device)[has_other]
    j = scores.argmax(dim=1)[has_other]
    lam = torch.distributions.Beta(alpha, alpha).sample((len(i),)).to(emb)
    emb = F.normalize(emb.float(), dim=1)
    mixed = F.normalize(lam.unsqueeze(1) * emb[i] + (1.0 - lam.unsqueeze(1)) * emb[j], dim=1)
    sim = emb @ mixed.T
    same_i = (labels.unsqueeze(1) == labels[i].unsqueeze(0)).float()
    same_j = (labels.unsqueeze(1) == labels[j].unsqueeze(0)).float()
    target = lam * same_i + (1.0 - lam) * same_j
    rows = torch.arange(n, device=emb.device).unsqueeze(1)
    weight = ((rows != i) & (rows != j)).float()
    return sim, target, weight


# --------------------------------------------------------------------------- all together

def library_loss(name: str, cfg: Config, embed_dim: int) -> nn.Module:
    """pytorch-metric-learning's loss `name` (one of LIBRARY_LOSSES) on cosine similarities,
    behind a cross-batch memory where `loss.xbm_size` asks for one."""
    losses, distances = metric_learning(f"loss.{name}={cfg.loss[name]:g}")
    if name == "smooth_ap":
        return losses.SmoothAPLoss(temperature=cfg.loss.smooth_ap_tau)
    cosine = distances.CosineSimilarity()
    if name == "contrastive":
        loss = losses.ContrastiveLoss(pos_margin=POS_MARGIN,
                                      neg_margin=cfg.loss.contrastive_margin, distance=cosine)
    else:
        loss = losses.MultiSimilarityLoss(alpha=cfg.loss.ms_alpha, beta=cfg.loss.ms_beta,
                                          base=cfg.loss.ms_base, distance=cosine)
    if cfg.loss.xbm_size > 0 and name in MEMORY_LOSSES:
        loss = losses.CrossBatchMemory(loss, embed_dim, memory_size=cfg.loss.xbm_size)
    return loss


class Criterion(nn.Module):
    """The weighted sum of ArcFace's cross-entropy and the configured pair losses, called with
    (neck embeddings, ArcFace logits or None, labels). `parts` gives each term's last value."""

    def __init__(self, cfg: Config, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.weights = {"arcface": cfg.loss.arcface,
                        **{name: cfg.loss[name] for name in pair_losses_on(cfg)}}
        self.mix_alpha = cfg.train.metrix_alpha
        self.library = nn.ModuleDict()
        self.memories: list[str] = []  # the library losses behind a cross-batch memory
        for name in pair_losses_on(cfg):
            if name in LIBRARY_LOSSES:
                self.library[name] = library_loss(name, cfg, embed_dim)
                if cfg.loss.xbm_size > 0 and name in MEMORY_LOSSES:
                    self.memories.append(name)
        if cfg.train.teacher and cfg.train.distill_loss == "contr_reg":
            distill.metric_learning()  # a missing extra is named now, not at the first batch
        # Detached, read only through `parts`: a float per term per step would wait for the
        # GPU on every step.
        self._terms: dict[str, torch.Tensor] = {}

    @property
    def parts(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._terms.items()}

    def forward(self, emb: torch.Tensor, logits: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        if self.weights["arcface"] > 0:
            terms["arcface"] = F.cross_entropy(logits.float(), labels)
        emb = emb.float()
        for name in self.weights:
            if name == "arcface":
                continue
            terms[name] = self._pair_term(name, emb, labels)
            if self.mix_alpha > 0 and name in METRIX_LOSSES:
                terms[f"{name}_mix"] = self._mixed_term(name, emb, labels)
        self._terms = {name: value.detach() for name, value in terms.items()}
        return sum(self.weights[name.removesuffix("_mix")] * value
                   for name, value in terms.items())

    def _pair_term(self, name: str, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if name == "recall_k":
            return recall_k_loss(emb, labels, self.cfg, self.mix_alpha)
        if name == "smooth_ap":
            # The library's Smooth-AP reads the batch as consecutive equal-sized identity
            # groups; a stable sort makes it so whatever order the batch came in.
            order = torch.argsort(labels, stable=True)
            emb, labels = emb[order], labels[order]
        return self.library[name](emb, labels)

    def _mixed_term(self, name: str, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mixed = metrix_mix(emb, labels, self.mix_alpha)
        if mixed is None:
            return emb.sum() * 0.0
        sim, target, weight = mixed
        loss = self.cfg.loss
        if name == "contrastive":
            return soft_contrastive(sim, target, weight, loss.contrastive_margin)
        return soft_multi_similarity(sim, target, weight, loss.ms_alpha, loss.ms_beta,
                                     loss.ms_base)

    # The cross-batch memory is training state: checkpoints carry it, so a resumed run
    # continues with the same memory.
    def memory_state(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name in self.memories:
            loss = self.library[name]
            out[name] = {"embeddings": loss.embedding_memory.detach().cpu(),
                         "labels": loss.label_memory.detach().cpu(),
                         "queue_idx": torch.tensor(int(loss.queue_idx)),
                         "filled": torch.tensor(bool(loss.has_been_filled))}
        return out

    def load_memory_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, saved in state.items():
            loss = self.library[name]
            loss.embedding_memory = saved["embeddings"].clone()
            loss.label_memory = saved["labels"].clone()
            loss.queue_idx = int(saved["queue_idx"])
            loss.has_been_filled = bool(saved["filled"])
