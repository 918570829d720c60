"""Post-processing: embeddings -> the similarity of every asked (query, gallery) pair in [0, 1].

Steps, each off by default and switched on only where `python -m jaguar_reid.tune` measured a
gain out
of fold (see `PostSettings`):

1. database-side augmentation, then (alpha-)query expansion of the embeddings;
2. k-reciprocal re-ranking, mapped to [0, 1] and blended with the raw similarity;
3. closed-set extras: the training images join the gallery of steps 1-2 (every test identity
   has training images), and an identity-prototype similarity (do two images' posteriors over
   the training identities agree?) is blended in.

Re-ranking runs dense when its N x N working set fits `max_dense_bytes` and otherwise on the
sparse path (the same exact distances, pairs only), or stops with a message saying what to set.
Pure functions: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from jaguar_reid.io_utils import UserInputError
from jaguar_reid.keys import choices, default
from jaguar_reid.retrieval.expansion import average_query_expansion, database_augmentation
from jaguar_reid.retrieval.rerank import (
    DEFAULT_MAX_DENSE_BYTES,
    blend,
    distance_to_similarity,
    estimate_rerank_memory,
    rerank,
)
from jaguar_reid.retrieval.rerank_sparse import rerank_pairs, rerank_sparse

PROTO_SOURCES = choices("post.proto_source")
ON_LARGE = choices("post.on_large")  # past post.max_dense_gb
DEFAULT_ON_LARGE = default("post.on_large")
DEFAULT_KNN_BACKEND = default("post.knn_backend")
_PAIR_CHUNK = 1 << 12  # pairs per block when dotting rows: bounds the temporaries


def _default(key: str) -> Any:
    """A field whose default is key `post.<key>`'s (`jaguar_reid.keys`)."""
    return field(default_factory=lambda: default(f"post.{key}"))


@dataclass(frozen=True)
class PostSettings:
    """One post-processing choice; field names are the config's `post.*` keys (`lambda` is
    `lambda_value` here, a Python keyword)."""

    views: tuple[str, ...] = field(default_factory=lambda: tuple(default("embed.tta")))
    qe_k: int = _default("qe_k")
    qe_alpha: float = _default("qe_alpha")
    dba_k: int = _default("dba_k")
    rerank: bool = _default("rerank")
    k1: int = _default("k1")
    k2: int = _default("k2")
    lambda_value: float = _default("lambda")
    rerank_norm: str = _default("rerank_norm")
    blend: float = _default("blend")
    closed_gallery: bool = _default("closed_gallery")
    proto_weight: float = _default("proto_weight")
    proto_source: str = _default("proto_source")
    proto_scale: float = _default("proto_scale")
    local: bool = _default("local")

    @classmethod
    def from_mapping(cls, data: Mapping, views: Sequence[str] | None = None,
                     source: str = "post-processing settings") -> PostSettings:
        """From a saved choice (`postprocess.json`): a key that is not a choice's is an error
        naming it and `source`, never dropped."""
        names = {f.name for f in fields(cls)}
        values = {("lambda_value" if k == "lambda" else k): v for k, v in data.items()}
        unknown = sorted(k for k in values if k not in names)
        if unknown:
            raise UserInputError(f"{source}: unknown post-processing key {unknown[0]!r} (known: "
                                 f"{', '.join(sorted(cls().to_dict()))}); it was saved by "
                                 "another version: run python -m jaguar_reid.tune again")
        if views is not None:
            values["views"] = views
        if "views" in values:
            values["views"] = tuple(values["views"])
        return cls(**values)

    @classmethod
    def from_config(cls, post: Mapping, views: Sequence[str]) -> PostSettings:
        """From a config's `post` section and views: its keys that make a choice (the others,
        such as `use_tuned` or `max_dense_gb`, steer how a choice is applied)."""
        chosen = {k: v for k, v in post.items() if k in cls().to_dict()}
        return cls.from_mapping(chosen, views=views)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["views"] = list(self.views)
        out["lambda"] = out.pop("lambda_value")
        return out

    @property
    def needs_training_images(self) -> bool:
        # ArcFace prototypes are the head's weights: no training image is embedded for them.
        return self.closed_gallery or (self.proto_weight > 0 and self.proto_source == "mean")

    def describe(self) -> str:
        parts = ["views " + "+".join(self.views)]
        if self.dba_k:
            parts.append(f"DBA k={self.dba_k}")
        if self.qe_k:
            parts.append(f"QE k={self.qe_k} alpha={self.qe_alpha:g}")
        if self.rerank:
            norm = " rowmax" if self.rerank_norm == "rowmax" else ""
            parts.append(f"re-rank{norm} k1={self.k1} k2={self.k2} lambda={self.lambda_value:g}"
                         + (f" blend {self.blend:g}" if self.blend < 1 else ""))
        if self.closed_gallery:
            parts.append("training gallery")
        if self.proto_weight > 0:
            parts.append(f"prototypes ({self.proto_source}) w={self.proto_weight:g} "
                         f"scale={self.proto_scale:g}")
        if self.local:
            parts.append("local verification")
        return ", ".join(parts)


# --------------------------------------------------------------------------- building blocks


def expand(emb: np.ndarray, settings: PostSettings, device: str = "cpu",
           knn_backend: str = DEFAULT_KNN_BACKEND) -> np.ndarray:
    """DBA then query expansion (each skipped at k = 0), on the whole set given."""
    out = np.asarray(emb, dtype=np.float32)
    if settings.dba_k:
        out = database_augmentation(out, settings.dba_k, settings.qe_alpha, device=device,
                                    backend=knn_backend)
    if settings.qe_k:
        out = average_query_expansion(out, settings.qe_k, settings.qe_alpha, device=device,
                                      backend=knn_backend)
    return out


def pair_dot(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Row-wise dot products of x[rows] and x[cols] in float64, in blocks (never N x N)."""
    x = np.asarray(x, dtype=np.float64)
    if not len(rows):
        return np.zeros(0, dtype=np.float64)
    top = int(max(rows.max(), cols.max())) + 1
    if len(rows) >= top * top // 4:  # most pairs of the first `top` rows: one matrix product
        sub = x[:top]
        return (sub @ sub.T)[rows, cols]
    out = np.empty(len(rows), dtype=np.float64)
    for a in range(0, len(rows), _PAIR_CHUNK):
        out[a:a + _PAIR_CHUNK] = np.einsum("pd,pd->p", x[rows[a:a + _PAIR_CHUNK]],
                                           x[cols[a:a + _PAIR_CHUNK]])
    return out


def pair_cosine(emb: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """cos(emb[rows[t]], emb[cols[t]]) of L2-normalised rows, clipped to [-1, 1]."""
    return np.clip(pair_dot(emb, rows, cols), -1.0, 1.0)


def cosine_to_unit(cos: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1], strictly increasing, so every ranking is kept."""
    return np.clip((np.asarray(cos, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)


def mean_prototypes(train_emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, (C, D) L2-normalised mean embedding of each training identity)."""
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    sums = np.zeros((len(classes), train_emb.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, np.asarray(train_emb, dtype=np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return classes, (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def identity_posteriors(emb: np.ndarray, prototypes: np.ndarray, scale: float,
                        subcenters: int = 1) -> np.ndarray:
    """(N, C) softmax(scale * cos) of each image to each identity's prototype. With
    sub-centres (ArcFace weights laid out class-major, `subcenters` rows a class) a class's
    cosine is its closest centre's, as in training."""
    w = np.asarray(prototypes, dtype=np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    cos = np.asarray(emb, dtype=np.float64) @ w.T
    if subcenters > 1:
        cos = cos.reshape(len(cos), -1, subcenters).max(axis=2)
    logits = scale * cos
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def prototype_similarity(posteriors: Sequence[np.ndarray], rows: np.ndarray,
                         cols: np.ndarray) -> np.ndarray:
    """P(same identity) = sum_c p_i(c) p_j(c), in [0, 1], averaged over the models given (one
    (N, C) posterior matrix each: fold models have their own spaces and heads)."""
    if not posteriors:
        raise ValueError("prototype similarity needs at least one posterior matrix")
    total = np.zeros(len(rows), dtype=np.float64)
    for p in posteriors:
        total += pair_dot(p, rows, cols)
    return np.clip(total / len(posteriors), 0.0, 1.0)


def reranked_distance(emb: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                      settings: PostSettings, *, max_dense_bytes: int,
                      on_large: str = DEFAULT_ON_LARGE, device: str = "cpu",
                      knn_backend: str = DEFAULT_KNN_BACKEND) -> tuple[np.ndarray, str]:
    """Re-ranked distance of the pairs, and which path computed it ("dense" or "sparse").

    The memory guard: the dense path's estimate (`estimate_rerank_memory`) is checked against
    `max_dense_bytes` before anything is allocated. The dense path computes the whole
    similarity matrix anyway and screens neighbours from it; `knn_backend` serves the sparse
    path."""
    n = len(emb)
    k1, k2 = min(settings.k1, n), min(settings.k2, n)
    need = estimate_rerank_memory(n, k1, True, k2=k2)
    if need <= max_dense_bytes:
        d = rerank(emb, k1, k2, settings.lambda_value, norm=settings.rerank_norm,
                   device=device, max_dense_bytes=max_dense_bytes)
        return d[rows, cols].astype(np.float64), "dense"
    if on_large == "stop":
        raise UserInputError(
            f"re-ranking {n} images densely needs about {need / 2**30:.1f} GiB, over "
            f"post.max_dense_gb={max_dense_bytes / 2**30:g}; set post.on_large=sparse (same "
            f"result, pairs only) or raise post.max_dense_gb to at least "
            f"{need / 2**30 * 1.1:.1f}")
    result = rerank_sparse(emb, k1, k2, settings.lambda_value, norm=settings.rerank_norm,
                           device=device, backend=knn_backend)
    return rerank_pairs(emb, rows, cols, result), "sparse"


# --------------------------------------------------------------------------- the whole step


def postprocess_pairs(emb: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                      settings: PostSettings, *, train_emb: np.ndarray | None = None,
                      posteriors: Sequence[np.ndarray] | None = None,
                      max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
                      on_large: str = DEFAULT_ON_LARGE, device: str = "cpu",
                      knn_backend: str = DEFAULT_KNN_BACKEND) -> np.ndarray:
    """Similarity in [0, 1] of the pairs (rows[t], cols[t]) of the N images `emb` (N, D),
    L2-normalised, views already combined.

    `train_emb` (M, D), in the same space, joins the gallery when `settings.closed_gallery`:
    query expansion and re-ranking then see N + M images, and only the pairs asked for are
    returned. `posteriors` (one (N, C) matrix per model, see `identity_posteriors`) give the
    prototype similarity when `settings.proto_weight` > 0. A step that is off costs nothing.
    """
    emb = np.asarray(emb, dtype=np.float32)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if not np.isfinite(emb).all():
        bad = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
        raise ValueError(f"embedding row {bad} holds NaN or infinite values")
    gallery = emb
    if settings.closed_gallery:
        if train_emb is None or not len(train_emb):
            raise ValueError("post.closed_gallery needs the training images' embeddings")
        if train_emb.shape[1] != emb.shape[1]:
            raise ValueError(f"training embeddings have {train_emb.shape[1]} dims, the test's "
                             f"{emb.shape[1]}")
        gallery = np.concatenate([emb, np.asarray(train_emb, dtype=np.float32)])
    gallery = expand(gallery, settings, device, knn_backend)
    sim = cosine_to_unit(pair_cosine(gallery, rows, cols))
    if settings.rerank:
        d, _ = reranked_distance(gallery, rows, cols, settings, max_dense_bytes=max_dense_bytes,
                                 on_large=on_large, device=device, knn_backend=knn_backend)
        sim = blend(sim, distance_to_similarity(d, settings.lambda_value, settings.rerank_norm),
                    settings.blend)
    if settings.proto_weight > 0:
        if not posteriors:
            raise ValueError("post.proto_weight > 0 needs identity posteriors")
        proto = prototype_similarity(posteriors, rows, cols)
        sim = (1.0 - settings.proto_weight) * sim + settings.proto_weight * proto
    return np.clip(sim, 0.0, 1.0)


def all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair of n images, query-major (the diagonal included, as a square matrix
    reshapes)."""
    rows, cols = np.divmod(np.arange(n * n, dtype=np.int64), n)
    return rows, cols
