"""The numbers of an experiment's report, derived from what `reading` read: pair similarities
and ROC curves per fold, AP per identity, the worst queries with their top-k, and the
thumbnails their strips show. No drawing and no text here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from jaguar_reid.config import Config
from jaguar_reid.reporting.reading import ExperimentData, FoldData, image_finder, thumbnail
from jaguar_reid.retrieval.metrics import per_query_ap

# --------------------------------------------------------------------------- pure numbers

def cosine_matrix(emb_n: np.ndarray) -> np.ndarray:
    """L2-normalised (N, D) embeddings -> (N, N) float64 cosine similarity."""
    emb = np.asarray(emb_n, dtype=np.float64)
    return emb @ emb.T


def pair_similarities(sim: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric (N, N) similarity -> its values for the unordered pairs i < j, split into
    (same identity, different identity)."""
    labels = np.asarray(labels)
    upper = np.triu_indices(len(labels), k=1)
    same = labels[upper[0]] == labels[upper[1]]
    values = np.asarray(sim)[upper]
    return values[same], values[~same]


def roc_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1). The trapezoid area under
    it equals the Mann-Whitney AUC with ties counted one half (`metrics.pair_roc_auc`)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    # Tied scores pass a threshold together: keep only the last index of each tie group.
    last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    tpr = np.cumsum(is_pos)[last] / pos.size
    fpr = np.cumsum(~is_pos)[last] / neg.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def thin_curve(x: np.ndarray, y: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` evenly spread samples of a curve, both ends kept."""
    if len(x) <= points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[keep], y[keep]


def identity_ap_rows(ap_q: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Per-query AP (N,) and identities (N,) of out-of-fold images (all folds together) ->
    one row per identity {identity, ap (mean over its scored queries; NaN if none), images,
    queries}, lowest AP first, unscored identities last."""
    ap_q, labels = np.asarray(ap_q, dtype=np.float64), np.asarray(labels).astype(str)
    rows = []
    for identity in np.unique(labels):
        mine = ap_q[labels == identity]
        scored = mine[~np.isnan(mine)]
        rows.append({"identity": str(identity), "images": int(mine.size),
                     "queries": int(scored.size),
                     "ap": float(scored.mean()) if scored.size else float("nan")})
    rows.sort(key=lambda r: (math.isnan(r["ap"]), r["ap"], r["identity"]))
    return rows


def worst_query_order(ap_q: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` lowest-AP queries (NaN, queries without a positive, left out);
    ties in input order."""
    ap_q = np.asarray(ap_q, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(ap_q))
    return valid[np.argsort(ap_q[valid], kind="stable")][:max(n, 0)]


def top_k_gallery(sim_q: np.ndarray, query: int, k: int) -> np.ndarray:
    """Indices of the `k` most similar images to `query` from its similarity row (N,), the
    query itself left out, most similar first."""
    order = np.argsort(-np.asarray(sim_q, dtype=np.float64), kind="stable")
    return order[order != query][:max(k, 0)]


# --------------------------------------------------------------------------- the experiment

@dataclass
class FoldScores:
    """One embedded fold's similarity matrix and per-query AP, computed once."""

    fold: FoldData
    sim: np.ndarray   # (N, N) cosine
    ap: np.ndarray    # (N,) per-query AP; NaN where the query has no other image of its own


@dataclass
class Analysis:
    """What the figures and tables of the report are drawn from; each part empty when its
    inputs are missing."""

    logs: list[tuple[str, pd.DataFrame]]                       # (fold, its log.csv)
    curves: list[tuple[str, np.ndarray, np.ndarray, float]]    # (fold, fpr, tpr, AUC)
    hists: list[tuple[str, np.ndarray, np.ndarray]]            # (fold, same, different)
    identity_rows: list[dict]
    strips: list[dict]
    thumbs: dict[str, np.ndarray | None]                       # strip image name -> pixels
    data_root: Path | None
    matches: list[dict] = field(default_factory=list)          # see local_match_panels


def retrieval_strips(scored: Sequence[FoldScores], n_queries: int, k: int) -> list[dict]:
    """The `n_queries` lowest-AP out-of-fold queries (all folds together), each with its
    top-k inside its own fold (a fold's model scores only its own validation images)."""
    entries = [(s, q) for s in scored for q in range(len(s.ap))]
    all_ap = np.concatenate([s.ap for s in scored]) if scored else np.array([])
    strips = []
    for i in worst_query_order(all_ap, n_queries):
        s, q = entries[i]
        labels, names = s.fold.labels, s.fold.filenames
        hits = [{"filename": str(names[g]), "identity": str(labels[g]),
                 "sim": float(s.sim[q, g]), "right": bool(labels[g] == labels[q])}
                for g in top_k_gallery(s.sim[q], q, k)]
        strips.append({"fold": s.fold.name, "query": str(names[q]),
                       "identity": str(labels[q]), "ap": float(s.ap[q]),
                       "positives": int((labels == labels[q]).sum() - 1), "hits": hits})
    return strips


def score_folds(folds: Sequence[FoldData]) -> list[FoldScores]:
    """Similarities and per-query AP of every numbered fold with embeddings."""
    scored = []
    for fold in folds:
        if fold.embeddings is not None and fold.number is not None:
            sim = cosine_matrix(fold.embeddings)
            scored.append(FoldScores(fold, sim, per_query_ap(sim, fold.labels)))
    return scored


def pair_curves(scored: Sequence[FoldScores]) -> tuple[list, list]:
    """(ROC curves [(fold, fpr, tpr, AUC)], similarity pairs [(fold, same, different)])."""
    curves, hists = [], []
    for s in scored:
        pos, neg = pair_similarities(s.sim, s.fold.labels)
        fpr, tpr = roc_points(pos, neg)
        # No positive or no negative pair: AUC is undefined, as in jaguar_reid.retrieval.metrics.
        # The trapezoid rule written out: np.trapezoid needs numpy 2, and sklearn.metrics costs
        # 1.5 s of import in every command that draws a report.
        auc = (float((np.diff(fpr) * (tpr[1:] + tpr[:-1])).sum() / 2.0) if pos.size and neg.size
               else float("nan"))
        curves.append((s.fold.name, fpr, tpr, auc))
        hists.append((s.fold.name, pos, neg))
    return curves, hists


def strip_thumbnails(cfg: Config, data: ExperimentData, strips: Sequence[dict]
                     ) -> tuple[dict[str, np.ndarray | None], Path | None]:
    """(thumbnails of every image the strips show, the data folder they came from); the
    images not found are named in `data.missing`."""
    find, root = image_finder([cfg.data.dir, data.exp_cfg.data.dir])
    if not strips:
        return {}, root
    names = {s["query"] for s in strips} | {h["filename"] for s in strips for h in s["hits"]}
    thumbs = {name: thumbnail(find(name), data.exp_cfg) for name in sorted(names)}
    lost = sorted(name for name, image in thumbs.items() if image is None)
    if root is None:
        data.missing.append(f"data folder not found ({cfg.data.dir}): the retrieval strips "
                            "show placeholders")
    elif lost:
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        data.missing.append(f"{len(lost)} strip image(s) not found or unreadable beneath "
                            f"{root}: {shown}")
    return thumbs, root


def analyse(cfg: Config, data: ExperimentData) -> Analysis:
    """The report's numbers from the run's files; each part needs only its own inputs."""
    logs = [(f.name, f.log) for f in data.folds if f.log is not None and len(f.log)]
    scored = score_folds(data.folds)
    curves, hists = pair_curves(scored)
    identity_rows: list[dict] = []
    if scored:
        identity_rows = identity_ap_rows(np.concatenate([s.ap for s in scored]),
                                         np.concatenate([s.fold.labels for s in scored]))
    strips = retrieval_strips(scored, cfg.report.worst_queries, cfg.report.top_k)
    thumbs, root = strip_thumbnails(cfg, data, strips)
    matches = local_match_panels(cfg, data, strips)
    return Analysis(logs=logs, curves=curves, hists=hists, identity_rows=identity_rows,
                    strips=strips, thumbs=thumbs, data_root=root, matches=matches)


def local_match_panels(cfg: Config, data: ExperimentData, strips: Sequence[dict]) -> list[dict]:
    """For each worst query, its `report.local_matches` top candidates with the keypoint
    matches local verification counts (only where it is in use: tune.local or post.local):
    {query, candidate, right, inliers, images (two grayscale arrays at the working size),
    points (two (M, 2) arrays in those images' pixels)}. Images not found are left out."""
    per_query = cfg.report.local_matches
    if per_query <= 0 or not (cfg.tune.local or cfg.post.local) or not strips:
        return []
    from jaguar_reid.retrieval import local, verify  # OpenCV: imported only when drawn

    verify.check_learned(cfg)
    match = verify.matcher(cfg)
    find, _ = image_finder([cfg.data.dir, data.exp_cfg.data.dir])
    views: dict[str, tuple | None] = {}

    def view(name: str) -> tuple | None:
        if name not in views:
            path = find(name)
            views[name] = None if path is None else _local_view(cfg, path, local, verify)
        return views[name]

    panels = []
    for strip in strips:
        for hit in strip["hits"][:per_query]:
            q, c = view(strip["query"]), view(hit["filename"])
            if q is None or c is None:
                continue
            xy_q, xy_c = match(q[1], c[1])
            panels.append({"query": strip["query"], "candidate": hit["filename"],
                           "right": hit["right"], "inliers": len(xy_q),
                           "images": (q[0], c[0]), "points": (xy_q * q[2], xy_c * c[2])})
    return panels


def _local_view(cfg: Config, path: Path, local, verify) -> tuple:
    """(grayscale at the working size, local features, scale from file pixels to it)."""
    gray, _ = local.read_for_features(path, cfg.local.max_side, cfg.data.max_pixels)
    feats = verify.image_features(cfg, path)
    return gray, feats, gray.shape[1] / feats.image_size[1]
