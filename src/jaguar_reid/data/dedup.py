"""Near-duplicate detection by perceptual hash (DCT pHash), for leak-free folds.

The jaguar training set holds about 209 near-duplicate pairs (burst shots, re-crops), all
inside one identity. A split that puts two of them on both sides of a fold lets validation
recognise a picture it was trained on. Images whose hashes differ in at most
`folds.dup_threshold` of 64 bits are grouped; every split keeps a group on one side.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_BITS = 64
_HASH_SIDE = 8  # 8 x 8 lowest frequencies
_SAMPLE_SIDE = 32  # DCT taken on a 32 x 32 grey thumbnail


def phash(image: Image.Image | np.ndarray) -> np.ndarray:
    """64-bit perceptual hash as a (64,) bool array: the signs of the lowest 8 x 8 DCT
    frequencies of a 32 x 32 grey thumbnail against their median. Robust to resizing,
    re-compression and small crops; blind to colour."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    grey = image.convert("L").resize((_SAMPLE_SIDE, _SAMPLE_SIDE), Image.Resampling.BILINEAR)
    freq = dctn(np.asarray(grey, dtype=np.float64), norm="ortho")[:_HASH_SIDE, :_HASH_SIDE]
    return (freq > np.median(freq)).reshape(-1)


def hash_to_hex(bits: np.ndarray) -> str:
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hex_to_hash(text: str) -> np.ndarray:
    return np.array([c == "1" for c in f"{int(text, 16):064b}"], dtype=bool)


def hamming_matrix(hashes: np.ndarray) -> np.ndarray:
    """(N, 64) bool -> (N, N) number of differing bits."""
    hashes = np.asarray(hashes, dtype=bool)
    if hashes.ndim != 2 or hashes.shape[1] != HASH_BITS:
        raise ValueError(f"hashes must be (N, {HASH_BITS}) bool, got shape {hashes.shape}")
    h = hashes.astype(np.int32)
    # differing bits = ones(a) + ones(b) - 2 * common ones
    ones = h.sum(axis=1)
    return ones[:, None] + ones[None, :] - 2 * (h @ h.T)


def near_duplicate_pairs(hashes: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j at Hamming distance <= threshold."""
    dist = hamming_matrix(hashes)
    i, j = np.nonzero(np.triu(dist <= threshold, k=1))
    return [(int(a), int(b), int(dist[a, b])) for a, b in zip(i, j, strict=True)]


def group_ids(n: int, pairs: list[tuple[int, int, int]] | list[tuple[int, int]]) -> np.ndarray:
    """Connected components of the pair graph: (n,) int, numbered by their first image."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for pair in pairs:
        a, b = root(pair[0]), root(pair[1])
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(n)])
    _, first = np.unique(roots, return_index=True)
    order = {r: k for k, r in enumerate(roots[np.sort(first)])}
    return np.array([order[r] for r in roots], dtype=np.int64)


def duplicate_groups(hashes: np.ndarray, labels: np.ndarray,
                     threshold: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Groups of near-duplicates inside one identity, and the cross-identity pairs.

    Only same-identity pairs are joined: a near-duplicate across two identities is more likely
    a labelling mistake than a leak, so it is returned for the data check to report instead of
    being allowed to merge two identities' groups.
    """
    labels = np.asarray(labels).astype(str)
    pairs = near_duplicate_pairs(hashes, threshold)
    same = [p for p in pairs if labels[p[0]] == labels[p[1]]]
    cross = [p for p in pairs if labels[p[0]] != labels[p[1]]]
    return group_ids(len(labels), same), cross
