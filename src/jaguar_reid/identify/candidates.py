"""Photos against a labelled gallery: each known individual's similarity to each photo, and
what the new-individual decision reads from them. Pure functions: arrays in, arrays out.

An individual's similarity to a photo is the cosine of the photo's embedding to its closest
gallery photo (`nearest`) or to the mean of its gallery photos (`prototype`); the candidates
of a photo are the individuals by that similarity, highest first.
"""

from __future__ import annotations

import numpy as np

from jaguar_reid.keys import choices

SCORES = choices("identify.score")
# The second-best similarity of a gallery with a single individual: the lowest cosine, so the
# margin says "nothing else is close".
NO_SECOND = -1.0


def identity_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(individuals sorted, each gallery photo's index into them)."""
    classes, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    return classes, codes.astype(np.int64)


def identity_scores(photo_cos: np.ndarray, codes: np.ndarray, n_ids: int,
                    score: str = "nearest") -> np.ndarray:
    """(Q, C) similarity of each photo to each individual from `photo_cos` (Q, N), the cosines
    of the photos to the N gallery photos, `codes` (N,) each gallery photo's individual.
    `nearest`: the highest cosine among the individual's photos. `prototype` needs the
    embeddings and is `prototype_scores`."""
    if score != "nearest":
        raise ValueError(f"identity_scores computes nearest; got {score!r}")
    cos = np.asarray(photo_cos, dtype=np.float64)
    out = np.full((len(cos), n_ids), -np.inf)
    for c in range(n_ids):
        members = codes == c
        if members.any():
            out[:, c] = cos[:, members].max(axis=1)
    return out


def prototype_scores(photos: np.ndarray, gallery: np.ndarray, codes: np.ndarray,
                     n_ids: int) -> np.ndarray:
    """(Q, C) cosine of each L2-normalised photo embedding to each individual's mean gallery
    embedding (re-normalised)."""
    sums = np.zeros((n_ids, gallery.shape[1]))
    np.add.at(sums, codes, np.asarray(gallery, dtype=np.float64))
    protos = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return np.asarray(photos, dtype=np.float64) @ protos.T


def best_photo(photo_cos: np.ndarray, codes: np.ndarray, n_ids: int) -> np.ndarray:
    """(Q, C) index of each individual's closest gallery photo to each photo (the one shown
    beside it)."""
    cos = np.asarray(photo_cos, dtype=np.float64)
    out = np.zeros((len(cos), n_ids), dtype=np.int64)
    for c in range(n_ids):
        members = np.flatnonzero(codes == c)
        if len(members):
            out[:, c] = members[np.argmax(cos[:, members], axis=1)]
    return out


def decision_features(scores: np.ndarray) -> np.ndarray:
    """(Q, 2): the top similarity and its margin over the second: a known individual's photo
    is close to one individual and clearly closer to it than to any other."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] == 0:
        raise ValueError("the gallery holds no individual")
    top = np.sort(scores, axis=1)[:, ::-1]
    second = top[:, 1] if scores.shape[1] > 1 else np.full(len(top), NO_SECOND)
    return np.column_stack([top[:, 0], top[:, 0] - second])


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """(Q, C) softmax(temperature x similarity) over the individuals: P(individual | the photo
    shows a known one)."""
    logits = temperature * np.asarray(scores, dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """(Q, min(k, C)) column indices of each row's k highest values, highest first (ties: the
    lower index first, so results repeat)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values, axis=1, kind="stable")
    return order[:, :min(k, values.shape[1])]
