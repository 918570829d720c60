"""Retrieval post-processing: query expansion and k-reciprocal re-ranking of embeddings.

The leaderboard scores every ordered pair of test images, so queries and gallery are the same
N images. Cosine similarity alone ranks each pair on its own; the methods here let each image's
neighbourhood vote as well:

* **Average / alpha query expansion** (`average_query_expansion`, `database_augmentation`):
  each embedding becomes the (weighted) mean of itself and its nearest neighbours.
* **k-reciprocal re-ranking** (Zhong, Zheng, Cao and Li, CVPR 2017): two images are close when
  their sets of *mutual* nearest neighbours overlap (Jaccard distance), blended with the
  original distance.

Conventions shared by every function:

* ``emb`` is ``(N, D)``, L2-normalised rows (checked to 1e-3), numpy or torch.
* The **original distance** is ``d(i, j) = 2 - 2 cos(i, j)``, the squared Euclidean distance of
  unit vectors, clipped to ``[0, 4]``, with ``d(i, i) = 0`` exactly. It orders pairs exactly as
  cosine does. (The authors' code squares Euclidean distances too but then divides each column
  by its maximum; for unit vectors ``d`` is already bounded, and a per-column scale would make
  the distance asymmetric and depend on the gallery's farthest image, so it is not done here.)
* **Ranking**: an image is its own first neighbour (rank 0) whatever the rounding of its
  self-similarity; the others follow by increasing ``d``, ties broken by the lower index.
  Distances that decide a ranking are float64 dot products summed in one fixed order
  (`_canonical_sim`), so equal vectors tie exactly in every path. The fast paths screen
  neighbours in float32 and take float64 only where float32 rounding (bounded, not guessed)
  could change a neighbour list, so their lists are the reference's.
* k1 and k2 larger than N are clamped to N.
* ``norm`` (`RERANK_NORMS`): "none" uses d as it is. "rowmax" divides row i of d by its
  largest entry before the Gaussian weights of V and the final blend, as the authors' Python
  code does (there it is written as a column division followed by a transpose, which for a
  symmetric distance is the row division): ``D(i, j) = d(i, j) / max_k d(i, k)``. Neighbour
  lists are unchanged (a positive factor per row), D lies in [0, 1], and the final distance is
  no longer symmetric: ``(1 - lambda) d_J(i, j) + lambda D(i, j)``. A row whose largest
  distance is 0 (every image identical) is left undivided. The ``k1, k2, lambda`` of a
  write-up that used the authors' code mean the same thing here only with "rowmax".

`rerank_reference` is a plain, loop-by-loop transcription of the paper (for tests and
benchmarks). `rerank` (dense ``(N, N)`` result) and `rerank_sparse` + `rerank_pairs` (any N:
only pairs that share k-reciprocal support are stored) are the vectorised torch versions the
pipeline uses, on the CPU or CUDA; all three agree to 1e-5 (float32 rounding of the original
distance). `distance_to_similarity` and `blend` map re-ranked distances back to [0, 1] scores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from jaguar_reid.config import Config, declare_choices, schema

RERANK_NORMS = declare_choices("post.rerank_norm", ("none", "rowmax"))
# Who screens the nearest-neighbour candidates (see `nearest_neighbours`). "auto", from
# bench/knn_backends.py's side-by-side figures (bench/README.md): on the CPU torch's half
# (upper-triangle) product wins at N = 20,000 (7.0 s against faiss's 9.5) and faiss wins at
# 100,000 (107 s against 206), so faiss from AUTO_FAISS_MIN_N images on; on CUDA, torch.
KNN_BACKENDS = declare_choices("post.knn_backend", ("auto", "torch", "faiss"))
AUTO_FAISS_MIN_N = 50_000

__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "KNN_BACKENDS",
    "RERANK_NORMS",
    "SparseRerank",
    "average_query_expansion",
    "blend",
    "database_augmentation",
    "distance_to_similarity",
    "estimate_rerank_memory",
    "faiss_available",
    "nearest_neighbours",
    "resolve_knn_backend",
    "rerank",
    "rerank_pairs",
    "rerank_reference",
    "rerank_sparse",
]



def dense_limit_bytes(cfg: Config) -> int:
    """`post.max_dense_gb` in bytes: the largest dense N x N re-ranking step allowed."""
    return int(cfg.post.max_dense_gb * 2**30)


DEFAULT_MAX_DENSE_BYTES = dense_limit_bytes(schema())  # rerank() refuses a dense result beyond

# Rows per block of the chunked similarity products (a block is at most 2048 x 2048 floats,
# 16 MB in float32), so no N x N similarity matrix is held just to find neighbours.
DEFAULT_CHUNK = 2048
# Extra candidates screened in float32 beyond the k kept after exact float64 re-ranking. A
# neighbour can only be missed when more than this many candidates sit within float32 rounding
# of the k-th; rows where that cannot be ruled out are recomputed in full in float64.
_SCREEN_MARGIN = 8
# Jaccard step: (query, column, other image) triples generated per chunk of query rows, and
# bytes of the dense float64 slab (rows x N) their sums accumulate into.
_TRIPLE_BUDGET = 1 << 21
_ACCUMULATOR_BYTES = 1 << 27
# Image pairs per chunk when computing float64 distances of given pairs (pairs x D floats).
_PAIR_ELEMENTS = 1 << 23
_NORM_TOLERANCE = 1e-3


# --------------------------------------------------------------------------- validation


def _as_embeddings(emb, name: str = "emb") -> np.ndarray:
    """(N, D) finite, L2-normalised rows -> float32 numpy array (no copy when already so)."""
    if isinstance(emb, torch.Tensor):
        emb = emb.detach().cpu().numpy()
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D (N, D) array with N >= 1 and D >= 1, "
                         f"got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr))
    bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if len(bad):
        raise ValueError(f"{name} rows must be L2-normalised: row {bad[0]} has norm "
                         f"{norms[bad[0]]:.6g} ({len(bad)} such rows); divide by the norms first")
    return arr


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_unit_interval(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) \
            or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_rerank_args(k1, k2, lambda_value) -> tuple[int, int, float]:
    return (_check_int(k1, "k1", 1), _check_int(k2, "k2", 1),
            _check_unit_interval(lambda_value, "lambda_value"))


def _check_norm(norm) -> bool:
    """True for "rowmax", False for "none"."""
    if norm not in RERANK_NORMS:
        raise ValueError(f"norm must be one of {', '.join(RERANK_NORMS)}, got {norm!r}")
    return norm == "rowmax"


@functools.cache
def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_knn_backend(backend: str, device: str = "cpu", n: int = 0) -> str:
    """"torch" or "faiss" for `backend` on `device` with `n` images: "auto" is faiss on the CPU
    from `AUTO_FAISS_MIN_N` images on where it is installed, torch otherwise. faiss runs on the
    CPU (the embeddings are moved there); asking for it where it is not installed is an
    error."""
    if backend not in KNN_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(KNN_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        big_on_cpu = torch.device(device).type == "cpu" and n >= AUTO_FAISS_MIN_N
        return "faiss" if big_on_cpu and faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise ValueError("post.knn_backend=faiss needs the faiss-cpu package (pip install "
                         "'.[faiss]', or faiss-cpu); or set post.knn_backend=torch or auto")
    return backend


def _row_scale(row_max: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row divisor of d for "rowmax" (float64): the row's largest distance, 1 where that
    is 0 within the rounding of x's similarities (a row of identical images, whose float32
    distances are rounding, has nothing to scale)."""
    row_max = row_max.double()
    return torch.where(row_max > 4.0 * _dot_error_bound(x), row_max, torch.ones_like(row_max))


def _check_chunk(chunk_size) -> int:
    return _check_int(chunk_size, "chunk_size", 1)


def _tensor(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


# On the CPU, numpy's take, repeat and bincount run several times faster than torch's advanced
# indexing, repeat_interleave and index_add (measured on 2 cores); tensors share memory with
# numpy there, so these helpers cost no copy. Elsewhere (CUDA) they use torch. Tests turn
# _NUMPY_ON_CPU off to run the torch branches on the CPU.
_NUMPY_ON_CPU = True


def _numpy_ok(t: torch.Tensor) -> bool:
    return _NUMPY_ON_CPU and t.device.type == "cpu"


def _take(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] along the first axis: shape idx.shape + src.shape[1:]."""
    if _numpy_ok(src):
        return torch.from_numpy(np.take(src.numpy(), idx.numpy(), axis=0))
    return src.index_select(0, idx.reshape(-1)).view(*idx.shape, *src.shape[1:])


def _repeat(values: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """values[s] repeated counts[s] times, end to end (total = counts.sum())."""
    if _numpy_ok(values):
        return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
    return torch.repeat_interleave(values, counts, output_size=total)


def _sort(values: torch.Tensor, descending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort along the last axis: (sorted values, indices). (torch's parallel CPU sort
    was seen to stall for 100 ms and more on a small array while another process held the
    second core; numpy's sort is single-threaded.)"""
    if _numpy_ok(values):
        arr = values.numpy()
        idx = np.argsort(-arr if descending else arr, axis=-1, kind="stable")
        return torch.from_numpy(np.take_along_axis(arr, idx, axis=-1)), torch.from_numpy(idx)
    return torch.sort(values, dim=-1, descending=descending, stable=True)


def _unique(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct values, index of each element's value among them)."""
    if _numpy_ok(key):
        uniq, inverse = np.unique(key.numpy(), return_inverse=True)
        return torch.from_numpy(uniq), torch.from_numpy(inverse.reshape(-1))
    return torch.unique(key, sorted=True, return_inverse=True)


def _sum_into(key: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) float64 array of the weights summed by key."""
    if _numpy_ok(key):
        return torch.from_numpy(np.bincount(key.numpy(), weights=weight.numpy(),
                                            minlength=size))
    return torch.zeros(size, dtype=torch.float64, device=key.device).index_add_(0, key, weight)


# --------------------------------------------------------------------------- exact neighbours


def _dot_error_bound(x: torch.Tensor) -> float:
    """Bound on |computed - exact| of a dot product of two rows of x as a matrix product
    computes it: gamma_D = D u / (1 - D u) times the norms, which holds for any summation order,
    doubled for margin. u is the unit roundoff of x's dtype, or of the reduced precision torch
    may use for float32 products (TF32 on CUDA; "high"/"medium" matmul precision)."""
    precision = torch.get_float32_matmul_precision()
    if x.dtype == torch.float64:
        unit = 2.0 ** -53
    elif precision == "medium":
        unit = 2.0 ** -8  # bfloat16
    elif precision == "high" or (x.device.type == "cuda"
                                 and torch.backends.cuda.matmul.allow_tf32):
        unit = 2.0 ** -11  # TF32, which rounds the inputs too (hence D + 2 terms)
    else:
        unit = 2.0 ** -24
    terms = x.shape[1] + 2
    gamma = terms * unit / (1.0 - terms * unit) if terms * unit < 0.5 else math.inf
    return 2.0 * gamma * (1.0 + _NORM_TOLERANCE) ** 2 + 1e-12


def _sim_to_distance(sim: torch.Tensor) -> torch.Tensor:
    return (2.0 - 2.0 * sim).clamp_(0.0, 4.0)


def _canonical_sim(a, b):
    """Float64 dot products along the last axis of two broadcastable arrays (numpy, or torch
    off the CPU), computed one fixed way: exact float64 products of the float32 entries, then
    numpy's pairwise sum along each row. Equal inputs give bitwise-equal results wherever they
    sit, so exact duplicates tie exactly and the fast paths reproduce `rerank_reference`'s
    distances bit for bit (a matrix product's rounding depends on its blocking)."""
    if isinstance(a, np.ndarray):
        return np.multiply(a, b, dtype=np.float64).sum(axis=-1)
    return (a.double() * b.double()).sum(dim=-1)


def _distance64(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Float64 original distance d(rows[t], cols[t]) of given pairs, chunked; d(i, i) = 0."""
    out = torch.empty(len(rows), dtype=torch.float64, device=x.device)
    step = max(1, _PAIR_ELEMENTS // x.shape[1])
    xn = x.numpy() if _numpy_ok(x) else x
    for a in range(0, len(rows), step):
        r, c = rows[a:a + step], cols[a:a + step]
        ri, ci = (r.numpy(), c.numpy()) if xn is not x else (r, c)
        sim = torch.as_tensor(_canonical_sim(xn[ri], xn[ci]), device=x.device)
        out[a:a + step] = torch.where(r == c, 0.0, _sim_to_distance(sim))
    return out


def _merge_top(best_s: torch.Tensor, best_i: torch.Tensor, rows: slice,
               cand_s: torch.Tensor, cand_i: torch.Tensor) -> None:
    """best[rows] <- the best `width` of best[rows] and the (rows, C) candidates."""
    val = torch.cat([best_s[rows], cand_s], dim=1)
    idx = torch.cat([best_i[rows], cand_i], dim=1)
    val, pick = val.topk(best_s.shape[1], dim=1)
    best_s[rows] = val
    best_i[rows] = idx.gather(1, pick)


def _merge_block(best_s: torch.Tensor, best_i: torch.Tensor, row0: int, col0: int,
                 sim: torch.Tensor, transposed: bool) -> None:
    """Fold one block of similarities into the running float32 shortlists of its rows (the
    block's rows, or its columns when `transposed`).

    Once a row's shortlist is full only entries above its current lowest can enter, and after
    the first blocks those are a few per row: one comparison picks them out, several times
    cheaper than a top-k over the whole block."""
    dev = sim.device
    n_rows = sim.shape[1] if transposed else sim.shape[0]
    rows = slice(row0, row0 + n_rows)
    width = best_s.shape[1]
    floor = best_s[rows, -1]
    if not torch.isinf(floor).any():
        hits = (sim > (floor[None, :] if transposed else floor[:, None])).nonzero()
        if len(hits) <= 4 * width * n_rows:  # else most of the block qualifies: top-k below
            if len(hits) == 0:
                return
            val = sim[hits[:, 0], hits[:, 1]]
            r, c = (hits[:, 1], hits[:, 0]) if transposed else (hits[:, 0], hits[:, 1])
            if transposed:
                order = _sort(r)[1]
                r, c, val = r[order], c[order], val[order]
            # Each row's hits laid out in a padded (rows, most hits) matrix.
            counts = torch.bincount(r, minlength=n_rows)
            rank = torch.arange(len(r), device=dev) - (torch.cumsum(counts, 0) - counts)[r]
            pad_s = torch.full((n_rows, int(counts.max())), -math.inf, dtype=sim.dtype,
                               device=dev)
            pad_i = torch.full(pad_s.shape, -1, dtype=torch.long, device=dev)
            pad_s[r, rank] = val
            pad_i[r, rank] = c + col0
            _merge_top(best_s, best_i, rows, pad_s, pad_i)
            return
    # Shortlists still filling: a top-k of every row (of a transposed copy: top-k along a
    # transposed view is twice as slow).
    view = sim.T.contiguous() if transposed else sim
    val, idx = view.topk(min(width, view.shape[1]), dim=1)
    _merge_top(best_s, best_i, rows, val, idx + col0)


def _neighbours(x: torch.Tensor, k: int, block: int,
                on_block: Callable[[slice, slice, torch.Tensor], None] | None = None,
                cuts: tuple[int, ...] = (), backend: str = "torch"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest neighbours of every row of x, itself first: ((N, k) int64 indices,
    (N, k) float64 distances). k is clamped to N.

    Exact in what the callers use: the *set* of the first w entries, for w = k and every w in
    `cuts`, is the set the reference's (float64 distance, index) order gives. Between cuts the
    order may differ from it; distances are float32-accurate.

    Similarities are computed block by block over the upper triangle only (each block serves
    its rows and, transposed, its columns), so the N x N matrix never exists and the product
    costs half of N^2 D. `on_block(rows, cols, sim)` sees every block once, before the
    diagonal of a diagonal block is masked (the dense path writes its output there).
    backend "faiss" screens the candidates with faiss instead (no `on_block`); the float64
    check that follows is the same, so the exact sets are the same."""
    n = x.shape[0]
    k = min(k, n)
    others = k - 1
    screen = min(n - 1, others + _SCREEN_MARGIN)
    dev = x.device
    if x.dtype != torch.float32:  # faiss computes in float32 only; the bound is x's dtype's
        backend = "torch"
    best_s, best_i = _shortlist(x, screen, block, on_block, backend)
    self_idx = torch.arange(n, device=dev)[:, None]
    if others == 0:
        return self_idx, torch.zeros((n, 1), dtype=torch.float64, device=dev)

    # Shortlist in (float32 similarity descending, index) order: sort by index, then stably.
    best_i, order = _sort(best_i)
    best_s = best_s.gather(1, order)
    best_s, order = _sort(best_s, descending=True)
    best_i = best_i.gather(1, order)
    dist = _sim_to_distance(best_s.double())
    s64 = best_s.double()
    _make_exact(x, best_i, dist, s64, k, cuts, block)
    nbr = torch.cat([self_idx, best_i[:, :others]], dim=1)
    dist = torch.cat([torch.zeros((n, 1), dtype=torch.float64, device=dev),
                      dist[:, :others]], dim=1)
    return nbr, dist


def _faiss_shortlist(x: torch.Tensor, screen: int, block: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_shortlist` by faiss's exact inner-product index (float32 products, whose rounding
    `_dot_error_bound` covers like a matrix product's). Each row's own entry is dropped, or the
    last one where duplicates pushed it out of the `screen + 1` returned."""
    import faiss

    xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    n = len(xn)
    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    best_s = np.empty((n, screen), dtype=np.float32)
    best_i = np.empty((n, screen), dtype=np.int64)
    for a in range(0, n, block):
        sims, idx = index.search(xn[a:a + block], screen + 1)
        rows = np.arange(len(idx))
        is_self = idx == (a + rows)[:, None]
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), screen)
        keep = np.ones(idx.shape, dtype=bool)
        keep[rows, drop] = False
        best_s[a:a + len(idx)] = sims[keep].reshape(-1, screen)
        best_i[a:a + len(idx)] = idx[keep].reshape(-1, screen)
    return (torch.from_numpy(best_s).to(x.device, x.dtype),
            torch.from_numpy(best_i).to(x.device))


def _faiss_row_min(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each row's smallest similarity to any row (the farthest image), by faiss: the largest
    inner product with the negated row."""
    import faiss

    xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    out = np.concatenate([-index.search(-xn[a:a + block], 1)[0][:, 0]
                          for a in range(0, len(xn), block)])
    return torch.from_numpy(out).to(x.device, x.dtype)


def _shortlist(x: torch.Tensor, screen: int, block: int,
               on_block: Callable[[slice, slice, torch.Tensor], None] | None,
               backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """The `screen` most similar other rows of every row (float32 similarities, indices),
    unordered, from blocks of the upper triangle (torch), or from faiss (which has no
    blocks to show `on_block`)."""
    if backend == "faiss" and screen > 0:
        if on_block is not None:
            raise ValueError("the faiss backend computes no similarity blocks to hand on")
        return _faiss_shortlist(x, screen, block)
    n, dev = x.shape[0], x.device
    best_s = torch.full((n, screen), -math.inf, dtype=x.dtype, device=dev)
    best_i = torch.full((n, screen), -1, dtype=torch.long, device=dev)
    starts = range(0, n, block)
    for a in starts:
        ra = slice(a, min(a + block, n))
        for b in starts[a // block:]:
            rb = slice(b, min(b + block, n))
            sim = x[ra] @ x[rb].T
            if on_block is not None:
                on_block(ra, rb, sim)
            if screen == 0:
                continue
            if a == b:
                sim.fill_diagonal_(-math.inf)  # an image is not its own candidate here
            _merge_block(best_s, best_i, a, b, sim, transposed=False)
            if a != b:
                _merge_block(best_s, best_i, b, a, sim, transposed=True)
    return best_s, best_i


def _make_exact(x: torch.Tensor, best_i: torch.Tensor, dist: torch.Tensor, s64: torch.Tensor,
                k: int, cuts: tuple[int, ...], block: int) -> None:
    """Fix in place the shortlist entries whose float32 order may differ from float64's
    around the cuts the callers use (k and `cuts`)."""
    n, screen = s64.shape
    others, dev = k - 1, x.device
    # A float32 similarity is within err of the exact one, so a cut whose float32 gap exceeds
    # 2 err splits the shortlist exactly as float64 would. Around a narrower cut (exact ties
    # included) only the entries within 2 err of it can be on the wrong side: those windows get
    # float64 distances and are put in the reference's (distance, index) order in place.
    err2 = 2.0 * _dot_error_bound(x)
    place = torch.arange(screen, device=dev)
    window = torch.zeros((n, screen), dtype=torch.bool, device=dev)
    for width in {*cuts, k}:
        before = min(width, k) - 1  # others before the cut
        if 1 <= before < screen:
            narrow = s64[:, before - 1] - s64[:, before] <= err2
            sure_above = (s64 > (s64[:, before] + err2)[:, None]).sum(dim=1)
            maybe_above = (s64 >= (s64[:, before - 1] - err2)[:, None]).sum(dim=1)
            window |= (narrow[:, None] & (place >= sure_above[:, None])
                       & (place < maybe_above[:, None]))
    if window.any():
        _order_windows(x, best_i, dist, window)
    # Where the gap to the shortlist's last entry is that narrow, a neighbour may never have
    # been shortlisted: those rows are redone from full float64 rows.
    if screen < n - 1:
        rows = torch.nonzero(s64[:, others - 1] - s64[:, -1] <= err2).flatten()
        if len(rows):
            best_i[rows, :others], dist[rows, :others] = _full_rows64(x, rows, others, block)


def _order_windows(x: torch.Tensor, best_i: torch.Tensor, dist: torch.Tensor,
                   window: torch.Tensor) -> None:
    """Within each run of True in `window` (N, C), replace the distances by exact float64 ones
    and reorder the run's entries by (distance, index), in place."""
    rows, cols = torch.nonzero(window, as_tuple=True)
    idx = best_i[rows, cols]
    d64 = _distance64(x, rows, idx)
    # The run each entry belongs to, named by its first column.
    place = torch.arange(window.shape[1], device=window.device)
    starts = window.clone()
    starts[:, 1:] &= ~window[:, :-1]
    run_first = torch.where(starts, place, -1).cummax(dim=1).values[rows, cols]
    # Sort by (row, run, distance, index): stable sorts from the last key to the first.
    order = _sort(idx)[1]
    order = order[_sort(d64[order])[1]]
    order = order[_sort((rows * window.shape[1] + run_first)[order])[1]]
    rows, run_first, idx, d64 = rows[order], run_first[order], idx[order], d64[order]
    # Entry t of a run goes to column run_first + t.
    group = rows * window.shape[1] + run_first
    is_first = torch.ones_like(group, dtype=torch.bool)
    is_first[1:] = group[1:] != group[:-1]
    first_at = torch.where(is_first, torch.arange(len(group), device=group.device), 0)
    rank = torch.arange(len(group), device=group.device) - first_at.cummax(dim=0).values
    best_i[rows, run_first + rank] = idx
    dist[rows, run_first + rank] = d64


def _full_rows64(x: torch.Tensor, rows: torch.Tensor, others: int,
                 block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `others` nearest non-self neighbours of the given rows from full float64 rows."""
    n = x.shape[0]
    idx_out, dist_out = [], []
    step = max(1, min(block, _ACCUMULATOR_BYTES // (8 * n)))
    for a in range(0, len(rows), step):
        r = rows[a:a + step]
        d = torch.empty((len(r), n), dtype=torch.float64, device=x.device)
        for b in range(0, n, block):
            cols = torch.arange(b, min(b + block, n), device=x.device)
            d[:, b:b + block] = _distance64(x, r[:, None].expand(-1, len(cols)).reshape(-1),
                                            cols.repeat(len(r))).view(len(r), -1)
        d[torch.arange(len(r), device=x.device), r] = math.inf  # self is listed separately
        # Columns are already in index order, so a stable sort breaks ties by index.
        d, order = _sort(d)
        idx_out.append(order[:, :others])
        dist_out.append(d[:, :others])
    return torch.cat(idx_out), torch.cat(dist_out)


def nearest_neighbours(emb, k: int, *, backend: str = "auto", device: str = "cpu",
                       chunk_size: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of every row, the row itself first: ((N, k) int64 indices,
    (N, k) float64 original distances d), exactly in `rerank_reference`'s order (distance,
    then index), whichever backend screens the candidates: "torch" (blocked matrix products,
    CPU or CUDA), "faiss" (an exact inner-product index, CPU) or "auto" (see
    `resolve_knn_backend`). Both give the same arrays bit for bit: candidates are screened in
    float32, then every listed distance is recomputed in float64 and the lists sorted by it.
    k is clamped to N."""
    x = _tensor(_as_embeddings(emb), device)
    k = _check_int(k, "k", 1)
    block = _check_chunk(chunk_size)
    n = x.shape[0]
    backend = resolve_knn_backend(backend, device, n)
    k = min(k, n)
    nbr, _ = _neighbours(x, k, block, cuts=(k,), backend=backend)
    rows = torch.arange(n, device=x.device)[:, None].expand(-1, k).reshape(-1)
    dist = _distance64(x, rows, nbr.reshape(-1)).view(n, k)
    # (distance, index) order after the row itself, which stays first.
    tail_i, tail_d = nbr[:, 1:], dist[:, 1:]
    order = _sort(tail_i)[1]
    tail_i, tail_d = tail_i.gather(1, order), tail_d.gather(1, order)
    order = _sort(tail_d)[1]
    nbr = torch.cat([nbr[:, :1], tail_i.gather(1, order)], dim=1)
    dist = torch.cat([dist[:, :1], tail_d.gather(1, order)], dim=1)
    return nbr.cpu().numpy(), dist.cpu().numpy()


# --------------------------------------------------------------------------- query expansion


def average_query_expansion(emb, k: int, alpha: float = 0.0, *,
                            chunk_size: int = DEFAULT_CHUNK, device: str = "cpu",
                            backend: str = "torch") -> np.ndarray:
    """(N, D) -> (N, D) float32: each embedding replaced by the weighted mean of itself and its k
    nearest *other* images (k + 1 vectors; the image is its own first neighbour), then
    L2-normalised.

    Weights are ``max(cos, 0) ** alpha`` (the image itself weighs 1): alpha = 0 is plain average
    query expansion, alpha > 0 is alpha-QE (Radenovic, Tolias and Chum, 2018), which lets close
    neighbours count more and drops dissimilar ones. k = 0 returns the input (normalised); k is
    clamped to N - 1. A mean that cancels to the zero vector keeps the original embedding.
    Neighbours come from exact chunked search (`chunk_size` rows per block; candidates screened
    by `backend`, see `nearest_neighbours`), the N x N similarity matrix is never held."""
    x_np = _as_embeddings(emb)
    k = _check_int(k, "k", 0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number) \
            or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    block = _check_chunk(chunk_size)
    n = len(x_np)
    k = min(k, n - 1)
    x = _tensor(x_np, device)
    if k == 0:
        return torch.nn.functional.normalize(x.double(), dim=1).float().cpu().numpy()
    nbr, dist = _neighbours(x, k + 1, block, backend=resolve_knn_backend(backend, device, n))
    # cos = 1 - d / 2 (the image itself: d = 0, weight 1); 0 ** 0 = 1 keeps alpha = 0 plain.
    weight = (1.0 - dist / 2.0).clamp(min=0.0).pow(float(alpha))
    out = torch.empty_like(x)
    rows_per_step = max(1, _PAIR_ELEMENTS // ((k + 1) * x.shape[1]))
    for a in range(0, n, rows_per_step):
        r = slice(a, a + rows_per_step)
        mean = torch.einsum("nk,nkd->nd", weight[r], _take(x, nbr[r]).double())
        norm = mean.norm(dim=1, keepdim=True)
        out[r] = torch.where(norm > 0, mean / norm.clamp(min=1e-300), x[r].double()).float()
    return out.cpu().numpy()


def database_augmentation(emb, k: int, alpha: float = 0.0, *,
                          chunk_size: int = DEFAULT_CHUNK, device: str = "cpu",
                          backend: str = "torch") -> np.ndarray:
    """Database-side augmentation (DBA): every gallery embedding replaced by the weighted mean
    of itself and its k nearest gallery neighbours, exactly as `average_query_expansion`.

    With separate query and gallery sets the two differ: DBA rewrites the gallery from gallery
    neighbours once, offline; QE rewrites each query from its neighbours *in* the gallery (which
    may be augmented already). Here queries are the gallery, so one application of either is the
    same map, and "DBA then QE" is that map applied twice, the second time to the output of the
    first: ``average_query_expansion(database_augmentation(emb, k), k)``."""
    return average_query_expansion(emb, k, alpha, chunk_size=chunk_size, device=device,
                                   backend=backend)


# --------------------------------------------------------------------------- reference


def rerank_reference(emb, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                     norm: str = "none") -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), step by step with plain loops:
    (N, N) float64 final distance ``(1 - lambda) d_J + lambda d`` (``lambda D`` with
    norm="rowmax", see the module's docstring). Slow; for tests and benchmarks only.

    Conventions (the fast paths follow every one of them exactly):

    * k1 and k2 larger than N are clamped to N before anything else (so the expansion below
      uses round(min(k1, N) / 2)); neighbour lists are cut at N entries, as numpy slicing does
      in the authors' code.
    * ``rank[i]`` lists every image, i itself first (forced: rounding can leave a duplicate as
      close as i), then the others by (distance, index), a stable sort. A "k-nearest" list is
      ``rank[i, :k + 1]``: i and k others, as in the authors' code.
    * R(i, k): the j in i's k-nearest list whose own k-nearest list holds i (so i is in R(i, k)).
    * Expansion: for each j in R(i, k1), R(j, round(k1 / 2)) is added when more than 2/3 of it
      lies in R(i, k1). round() halves to even like numpy.around in the authors' code
      (k1 = 5 -> 2), and "more than 2/3" is the integer test 3 |common| > 2 |R(j)|, equal to
      the authors' float test for every size up to 2000 (checked).
    * V[i, j] = exp(-d(i, j)) (exp(-D(i, j)) with "rowmax") over the expanded set, divided by
      its sum.
    * Local query expansion: V[i] becomes the mean of V over ``rank[i, :k2]`` (i and its k2 - 1
      nearest; k2 = 1 leaves V as it is).
    * d_J(i, j) = 1 - sum_k min(V_ik, V_jk) / sum_k max(V_ik, V_jk); the maximum sum is taken as
      sum V_i + sum V_j - sum min (max(a, b) = a + b - min(a, b)), which is the same number
      without an N-long pass per pair.
    """
    x = _as_embeddings(emb).astype(np.float64)
    k1, k2, lam = _check_rerank_args(k1, k2, lambda_value)
    rowmax = _check_norm(norm)
    n = len(x)
    k1, k2 = min(k1, n), min(k2, n)
    half = round(k1 / 2)

    # Original distance: squared Euclidean distance of unit vectors, from float64 dot products
    # taken one row at a time in a fixed order (see _canonical_sim), so that exact duplicates
    # tie exactly.
    dist = np.empty((n, n))
    for i in range(n):
        dist[i] = np.clip(2.0 - 2.0 * _canonical_sim(x, x[i]), 0.0, 4.0)
    np.fill_diagonal(dist, 0.0)
    # The distance the weights and the blend use (the ranking is the same either way).
    scaled = dist
    if rowmax:
        top = dist.max(axis=1)
        scaled = dist / np.where(top > 0, top, 1.0)[:, None]

    rank = _reference_ranking(dist)
    v = _reference_encoding(rank, scaled, k1, half)
    # Local query expansion over the k2 nearest (i included).
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = _reference_jaccard(v)
    return (1.0 - lam) * jaccard + lam * scaled


def _reference_ranking(dist: np.ndarray) -> np.ndarray:
    """Every row's images: self first, then the others by distance, ties by index (stable)."""
    n = len(dist)
    rank = np.empty((n, n), dtype=np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        rank[i, 0] = i
        rank[i, 1:] = others[np.argsort(dist[i, others], kind="stable")]
    return rank


def _reference_encoding(rank: np.ndarray, scaled: np.ndarray, k1: int, half: int) -> np.ndarray:
    """V: k-reciprocal sets, their expansion, Gaussian-kernel weights of `scaled`, per row."""
    n = len(rank)

    def k_reciprocal(i: int, k: int) -> list[int]:
        return [int(j) for j in rank[i, :k + 1] if i in rank[j, :k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r_i = k_reciprocal(i, k1)
        expanded = set(r_i)
        for j in r_i:
            r_j = k_reciprocal(j, half)
            common = len(set(r_j) & set(r_i))
            if 3 * common > 2 * len(r_j):
                expanded.update(r_j)
        cols = np.array(sorted(expanded))
        weight = np.exp(-scaled[i, cols])
        v[i, cols] = weight / weight.sum()
    return v


def _reference_jaccard(v: np.ndarray) -> np.ndarray:
    """Jaccard distance of V's rows; the sum of minima runs over i's support (min is 0
    elsewhere)."""
    jaccard = np.empty((len(v), len(v)))
    row_sum = v.sum(axis=1)
    for i in range(len(v)):
        support = np.flatnonzero(v[i])
        mins = np.minimum(v[i, support], v[:, support]).sum(axis=1)
        maxs = row_sum[i] + row_sum - mins
        jaccard[i] = 1.0 - mins / maxs
    return jaccard


# --------------------------------------------------------------------------- fast re-ranking


@dataclass(frozen=True)
class _SparseRows:
    """CSR rows of an N x N matrix on one device: entries sorted by (row, col)."""
    rowptr: torch.Tensor  # (N + 1,) int64
    row: torch.Tensor     # (nnz,) int64, row of each entry
    col: torch.Tensor     # (nnz,) int64
    val: torch.Tensor     # (nnz,) float64


def _csr(row: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int) -> _SparseRows:
    counts = torch.bincount(row, minlength=n)
    return _SparseRows(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]), row, col, val)


def _segments(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Positions starts[s], ..., starts[s] + counts[s] - 1 of every segment s, end to end."""
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts
    return _repeat(starts - first, counts, total) + torch.arange(total, device=counts.device)


def _reciprocal_mask(nbr: torch.Tensor, width: int) -> torch.Tensor:
    """(N, width) bool: is position p of i's list reciprocal, i.e. is i in nbr[j, :width] for
    j = nbr[i, p]?"""
    n = nbr.shape[0]
    lists = nbr[:, :width].contiguous()
    out = torch.empty((n, width), dtype=torch.bool, device=nbr.device)
    step = max(1, (1 << 22) // (width * width))
    for a in range(0, n, step):
        rows = torch.arange(a, min(a + step, n), device=nbr.device)
        out[a:a + step] = (_take(lists, lists[a:a + step]) == rows[:, None, None]).any(dim=2)
    return out


def _encoding(x: torch.Tensor, nbr: torch.Tensor, dist: torch.Tensor, k1: int,
              k2: int, scale: torch.Tensor | None = None) -> _SparseRows:
    """The k-reciprocal feature V after local query expansion, sparse, exactly as in
    rerank_reference (k1, k2 already clamped to N); `scale` (N,): "rowmax"'s row divisors."""
    n, dev = nbr.shape[0], nbr.device
    w1 = min(k1 + 1, n)  # i and its k1 nearest
    wh = min(round(k1 / 2) + 1, n)  # i and its round(k1 / 2) nearest
    recip1 = _reciprocal_mask(nbr, w1)
    reciph = _reciprocal_mask(nbr, wh)
    size_h = reciph.sum(dim=1)
    half_sets = torch.where(reciph, nbr[:, :wh], -1)  # R(j, k1/2), -1 = not a member

    rows_l, cols_l = [], []
    step = max(1, (1 << 22) // (w1 * wh * w1))
    for a in range(0, n, step):
        cand = nbr[a:a + step, :w1]
        r_set = torch.where(recip1[a:a + step], cand, -1)  # R(i, k1), -1 = not a member
        cand_h = _take(half_sets, cand)  # (b, w1, wh): R(j, k1/2) of each listed j
        common = ((cand_h[..., None] == r_set[:, None, None, :]).any(dim=3)
                  & (cand_h >= 0)).sum(dim=2)
        grow = recip1[a:a + step] & (3 * common > 2 * _take(size_h, cand))
        added = torch.where(grow[..., None], cand_h, -1).flatten(1)
        # The expanded set: R(i, k1) and every R(j, k1/2) that qualified, without repeats.
        members = _sort(torch.cat([r_set, added], dim=1))[0]
        keep = members >= 0
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        row_idx = torch.arange(a, a + len(cand), device=dev)[:, None].expand_as(members)
        rows_l.append(row_idx[keep])
        cols_l.append(members[keep])
    row, col = torch.cat(rows_l), torch.cat(cols_l)

    # exp(-d) weights: d from i's neighbour list where the member is on it, else recomputed.
    d = torch.empty(len(row), dtype=torch.float64, device=dev)
    on_list = torch.empty(len(row), dtype=torch.bool, device=dev)
    step = max(1, (1 << 22) // nbr.shape[1])
    for a in range(0, len(row), step):
        r = row[a:a + step]
        hit = _take(nbr, r) == col[a:a + step, None]
        on_list[a:a + step] = hit.any(dim=1)
        where = hit.to(torch.uint8).argmax(dim=1, keepdim=True)
        d[a:a + step] = _take(dist, r).gather(1, where).squeeze(1)
    missing = torch.nonzero(~on_list).flatten()
    if len(missing):
        d[missing] = _distance64(x, row[missing], col[missing])
    if scale is not None:
        d = d / _take(scale, row)
    weight = torch.exp(-d)
    v = _csr(row, col, weight / _take(_sum_into(row, weight, n), row), n)
    return v if k2 == 1 else _local_expansion(v, nbr[:, :k2].contiguous())


def _local_expansion(v: _SparseRows, lists: torch.Tensor) -> _SparseRows:
    """Row i of the result = mean of v's rows lists[i]; repeated columns are summed after
    sorting the (row, column) keys."""
    n, k2 = lists.shape
    dev = lists.device
    counts = v.rowptr[1:] - v.rowptr[:-1]
    cum = torch.cumsum(_take(counts, lists).sum(dim=1), 0).cpu().numpy()
    rows_l, cols_l, vals_l = [], [], []
    a = 0
    while a < n:
        base = cum[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(cum, base + _TRIPLE_BUDGET, side="right")))
        src = lists[a:b].reshape(-1)
        src_counts = _take(counts, src)
        pos = _segments(_take(v.rowptr, src), src_counts)
        out_row = _repeat(torch.arange(a * k2, b * k2, device=dev) // k2, src_counts, len(pos))
        key = out_row * n + _take(v.col, pos)
        uniq, inverse = _unique(key)
        rows_l.append(uniq // n)
        cols_l.append(uniq % n)
        vals_l.append(_sum_into(inverse, _take(v.val, pos), len(uniq)) / k2)
        a = b
    return _csr(torch.cat(rows_l), torch.cat(cols_l), torch.cat(vals_l), n)


def _support_slabs(v: _SparseRows, n: int) -> Iterator[tuple[int, int, torch.Tensor,
                                                            torch.Tensor]]:
    """Jaccard sums s(i, j) = sum_k min(V_ik, V_jk) for j >= i, in slabs of consecutive query
    rows: yields (r0, r1, s, row_sum), s a fresh (r1 - r0, N - r0) float64 array with
    s[i - r0, j - r0] = s(i, j) for j >= i and 0 for j < i, row_sum the (N,) sums |V_i|.

    s is symmetric, so only half is computed: for each entry (i, k) of V only the rows j >= i of
    column k are visited (column k's tail from i's own place on), one (i, j, min) triple each,
    summed into the dense slab. Pairs sharing no column get no triple: s = 0, d_J = 1
    exactly."""
    dev = v.row.device
    row_sum = _sum_into(v.row, v.val, n)
    order = _sort(v.col)[1]  # column-major copy; rows ascend within a column
    csc_row, csc_val = _take(v.row, order), _take(v.val, order)
    csc_place = torch.empty_like(order)
    csc_place[order] = torch.arange(len(order), device=dev)
    col_end = torch.cumsum(torch.bincount(v.col, minlength=n), 0)
    tail = _take(col_end, v.col) - csc_place  # rows j >= i in the entry's column, i included
    row_triples = _take(torch.cat([tail.new_zeros(1), torch.cumsum(tail, 0)]), v.rowptr)
    row_triples = row_triples.cpu().numpy()

    cap = max(1, _ACCUMULATOR_BYTES // (8 * n))
    r0 = 0
    while r0 < n:
        r1 = int(np.searchsorted(row_triples, row_triples[r0] + _TRIPLE_BUDGET, side="right"))
        r1 = min(max(r1 - 1, r0 + 1), r0 + cap, n)
        width = n - r0
        e0, e1 = int(v.rowptr[r0]), int(v.rowptr[r1])
        counts = tail[e0:e1]
        total = int(row_triples[r1] - row_triples[r0])
        pos = _segments(csc_place[e0:e1], counts)
        key = _repeat((v.row[e0:e1] - r0) * width - r0, counts, total) + _take(csc_row, pos)
        mins = torch.minimum(_repeat(v.val[e0:e1], counts, total), _take(csc_val, pos))
        yield r0, r1, _sum_into(key, mins, (r1 - r0) * width).view(r1 - r0, width), row_sum
        r0 = r1


def _mirror_rows(out: torch.Tensor, r0: int, r1: int) -> None:
    """Copy the upper triangle of rows r0:r1 of a square matrix onto its lower triangle."""
    if _numpy_ok(out):  # numpy's transposed copy is faster than torch's here
        o = out.numpy()
        block = o[r0:r1, r0:r1]
        lower = np.tril_indices(r1 - r0, -1)
        block[lower] = block.T[lower]
        o[r1:, r0:r1] = o[r0:r1, r1:].T
    else:
        block = out[r0:r1, r0:r1]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)
        out[r1:, r0:r1] = out[r0:r1, r1:].T


def estimate_rerank_memory(n: int, k1: int, dense: bool, *, k2: int = 6,
                           itemsize: int = 4) -> int:
    """Approximate peak bytes `rerank` (dense=True) or `rerank_sparse` (dense=False) allocates
    for N images, the embeddings themselves not counted.

    Dense: the N x N result (itemsize bytes a cell) plus the working set. Sparse: the working
    set plus the stored pairs, 12 bytes each (16 while the result is assembled). Their number
    depends on the data; it is taken as min(N, 90 k2 (k1 + 1)) / 2 a row, the upper triangle
    of what random 1024-d unit embeddings approach as N grows (at k1 = 20, k2 = 6: 2000 pairs
    a row, all of them, at N = 2000; 7700 at N = 20000; levelling off near 11000). Clustered
    embeddings give fewer.
    """
    n = _check_int(n, "n", 1)
    k1 = _check_int(k1, "k1", 1)
    k2 = _check_int(k2, "k2", 1)
    width = min(n, max(k1 + 1, k2) + _SCREEN_MARGIN)
    # Shortlists and neighbour lists (~40 bytes an entry); V after expansion (~80 bytes an
    # entry with its column-major copy and temporaries; about 0.8 k2 (k1 + 1) entries a row on
    # random embeddings).
    v_entries = min(n, k2 * (k1 + 1))
    state = n * (40 * width + 80 * v_entries)
    # Similarity blocks, the Jaccard slab and its temporaries, the triple arrays.
    working = (6 * min(n, DEFAULT_CHUNK) ** 2 * 4 + 3 * min(_ACCUMULATOR_BYTES, 8 * n * n)
               + 64 * min(_TRIPLE_BUDGET, n * n))
    if dense:
        return int(n * n * itemsize + state + working)
    pairs = n * min(n, 90 * k2 * (k1 + 1)) // 2
    return int(state + working + 16 * pairs)


def _rerank_cuts(k1: int, k2: int) -> tuple[int, int, int]:
    """Neighbour-list prefixes whose membership re-ranking uses (see _encoding)."""
    return k1 + 1, round(k1 / 2) + 1, k2


def _prepare(emb, k1, k2, lambda_value, chunk_size, device):
    x_np = _as_embeddings(emb)
    k1, k2, lam = _check_rerank_args(k1, k2, lambda_value)
    block = _check_chunk(chunk_size)
    n = len(x_np)
    return _tensor(x_np, device), min(k1, n), min(k2, n), lam, block, n


def rerank(emb, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
           norm: str = "none", dtype: str = "float32", device: str = "cpu",
           chunk_size: int = DEFAULT_CHUNK,
           max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES) -> np.ndarray:
    """k-reciprocal re-ranking, vectorised: (N, N) final distance ``(1 - lambda) d_J +
    lambda d`` (``lambda D`` with norm="rowmax") in `dtype` ("float32" or "float64"; the latter
    also takes the similarities in float64), equal to `rerank_reference` (same conventions) to
    1e-5. `device` may be "cuda".

    The neighbour search writes ``(1 - lambda) + lambda d`` (i.e. d_J = 1) into the upper
    triangle block by block; V, its local expansion and the Jaccard sums are sparse, and each
    slab of rows is then corrected where pairs share support and mirrored into the lower
    triangle (the result is symmetric). With "rowmax" the search writes d into both triangles
    and each row is scaled once its maximum is known; the Jaccard correction, symmetric, is
    then subtracted from both triangles.

    Raises ValueError when `estimate_rerank_memory` exceeds `max_dense_bytes`: use
    `rerank_sparse` + `rerank_pairs` there, or raise `max_dense_bytes`."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    rowmax = _check_norm(norm)
    x, k1, k2, lam, block, n = _prepare(emb, k1, k2, lambda_value, chunk_size, device)
    need = estimate_rerank_memory(n, k1, True, k2=k2, itemsize=4 if dtype == "float32" else 8)
    if need > max_dense_bytes:
        raise ValueError(
            f"rerank: a dense {n} x {n} re-ranked distance matrix needs about "
            f"{need / 2**30:.1f} GiB, over max_dense_bytes={max_dense_bytes / 2**30:.1f} GiB; "
            "use rerank_sparse() and rerank_pairs() for the pairs you need, or raise "
            "max_dense_bytes")
    work = x if dtype == "float32" else x.double()
    out = torch.empty((n, n), dtype=work.dtype, device=x.device)
    write, row_max = _dense_writer(out, lam, rowmax)
    nbr, dist = _neighbours(work, max(k1 + 1, k2), block, on_block=write,
                            cuts=_rerank_cuts(k1, k2))
    scale = None
    if rowmax:
        scale = _row_scale(row_max, work)
        # out holds d: (1 - lambda) + lambda d / max_i, i.e. the result where d_J = 1.
        out.mul_((lam / scale).to(out.dtype)[:, None]).add_(1.0 - lam)
    v = _encoding(x, nbr, dist, k1, k2, scale)
    for r0, r1, s, row_sum in _support_slabs(v, n):
        # (1 - lambda) d_J = (1 - lambda) - (1 - lambda) s / (|V_i| + |V_j| - s): subtract the
        # second term (0 where s = 0) in the output's precision.
        s = s.to(out.dtype)
        denom = (row_sum[r0:r1, None].to(out.dtype) - s).add_(row_sum[None, r0:].to(out.dtype))
        if rowmax:
            _subtract_both_triangles(out, r0, r1, s.div_(denom).mul_(1.0 - lam))
        else:
            out[r0:r1, r0:].addcdiv_(s, denom, value=-(1.0 - lam))  # fused, one pass
            _mirror_rows(out, r0, r1)
    return out.cpu().numpy()


def _dense_writer(out: torch.Tensor, lam: float, rowmax: bool
                  ) -> tuple[Callable[[slice, slice, torch.Tensor], None], torch.Tensor | None]:
    """The neighbour search's block callback filling `out`, and (for "rowmax") the running row
    maxima of d it keeps."""
    row_max = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device) if rowmax else None

    def write(ra: slice, rb: slice, sim: torch.Tensor) -> None:
        block_out = out[ra, rb]
        torch.clamp(sim, -1.0, 1.0, out=block_out)  # d clipped to [0, 4]
        if row_max is None:
            # (1 - lambda) + lambda (2 - 2 sim) = (1 + lambda) - 2 lambda sim, in place.
            block_out.mul_(-2.0 * lam).add_(1.0 + lam)
            if ra == rb:
                block_out.fill_diagonal_(1.0 - lam)  # d(i, i) = 0 exactly
            return
        block_out.mul_(-2.0).add_(2.0)
        if ra == rb:
            block_out.fill_diagonal_(0.0)
        else:
            out[rb, ra] = block_out.T
        row_max[ra] = torch.maximum(row_max[ra], block_out.max(dim=1).values)
        row_max[rb] = torch.maximum(row_max[rb], block_out.max(dim=0).values)

    return write, row_max


def _subtract_both_triangles(out: torch.Tensor, r0: int, r1: int, corr: torch.Tensor) -> None:
    """out[i, j] -= c(i, j) and out[j, i] -= c(i, j) for the slab's pairs j >= i (corr is
    (r1 - r0, N - r0), 0 for j < i), the diagonal once."""
    out[r0:r1, r0:] -= corr
    out[r1:, r0:r1] -= corr[:, r1 - r0:].T
    out[r0:r1, r0:r1] -= torch.triu(corr[:, :r1 - r0], 1).T


@dataclass(frozen=True)
class SparseRerank:
    """`rerank_sparse`'s result: the pairs that share k-reciprocal support, upper triangle.

    Row i (CSR layout) holds the images j >= i with d_J(i, j) < 1, ascending (i itself always
    among them): ``indices[indptr[i]:indptr[i + 1]]``, with their Jaccard distance `jaccard`
    and final distance `distance` = ``(1 - lambda) d_J + lambda d`` (float32). Both are
    symmetric, so the lower triangle is not stored. Every pair not stored has d_J = 1 exactly
    and final distance ``(1 - lambda) + lambda d(i, j)``; `rerank_pairs` answers any pair. Not a
    scipy matrix on purpose: there an absent entry would read as distance 0.

    With norm "rowmax" the final distance is not symmetric: `distance` is that of (i, j), row
    i's, and `row_scale` (N,) holds each row's divisor of d, from which `rerank_pairs` gives
    either order."""
    n: int
    k1: int
    k2: int
    lambda_value: float
    indptr: np.ndarray    # (N + 1,) int64
    indices: np.ndarray   # (nnz,) int32
    jaccard: np.ndarray   # (nnz,) float32
    distance: np.ndarray  # (nnz,) float32
    norm: str = "none"
    row_scale: np.ndarray | None = None  # (N,) float64 with "rowmax"


def rerank_sparse(emb, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                  norm: str = "none", device: str = "cpu", chunk_size: int = DEFAULT_CHUNK,
                  backend: str = "torch") -> SparseRerank:
    """k-reciprocal re-ranking for any N: only the pairs with d_J < 1 are kept (see
    `SparseRerank`), so memory grows with N times the pairs an image shares support with, not
    with N^2. Same neighbours, V and Jaccard sums as `rerank`, so the same distances;
    `rerank_pairs` gives the distance of any pair. `backend` screens the neighbour candidates
    (see `nearest_neighbours`; the exact sets, hence V, are the same either way)."""
    rowmax = _check_norm(norm)
    x, k1, k2, lam, block, n = _prepare(emb, k1, k2, lambda_value, chunk_size, device)
    backend = resolve_knn_backend(backend, device, n)
    if n >= 2 ** 31:
        raise ValueError(f"emb has {n} rows; column indices are stored as int32")
    row_min = torch.ones(n, dtype=x.dtype, device=x.device)

    def track(ra: slice, rb: slice, sim: torch.Tensor) -> None:
        # The farthest image of each row is its least similar one (sim, hence d, clipped).
        row_min[ra] = torch.minimum(row_min[ra], sim.min(dim=1).values.clamp(min=-1.0))
        row_min[rb] = torch.minimum(row_min[rb], sim.min(dim=0).values.clamp(min=-1.0))

    faiss = backend == "faiss"
    nbr, dist = _neighbours(x, max(k1 + 1, k2), block,
                            on_block=track if rowmax and not faiss else None,
                            cuts=_rerank_cuts(k1, k2), backend=backend)
    if rowmax and faiss:
        row_min = _faiss_row_min(x, block)
    scale = _row_scale(2.0 - 2.0 * row_min, x) if rowmax else None
    v = _encoding(x, nbr, dist, k1, k2, scale)
    counts = np.zeros(n, dtype=np.int64)
    cols_l, jac_l, dist_l = [], [], []
    for r0, r1, s, row_sum in _support_slabs(v, n):
        width = n - r0
        flat = torch.nonzero(s.view(-1)).flatten()  # row-major: sorted by (i, j)
        li, lj = flat // width, flat % width
        i, j = li + r0, lj + r0
        shared = _take(s.view(-1), flat)
        jaccard = 1.0 - shared / (_take(row_sum, i) + _take(row_sum, j) - shared)
        final = (1.0 - lam) * jaccard
        if lam > 0:
            sim = _take((x[r0:r1] @ x[r0:].T).view(-1), flat).double()
            d = torch.where(i == j, 0.0, _sim_to_distance(sim))
            final += lam * (d / _take(scale, i) if rowmax else d)
        counts[r0:r1] = torch.bincount(li, minlength=r1 - r0).cpu().numpy()
        cols_l.append(j.to(torch.int32).cpu().numpy())
        jac_l.append(jaccard.float().cpu().numpy())
        dist_l.append(final.float().cpu().numpy())
    indptr = np.concatenate([[0], np.cumsum(counts)])
    # One array at a time, so the chunk lists and their concatenation coexist for one only.
    indices = np.concatenate(cols_l)
    del cols_l
    jaccard_all = np.concatenate(jac_l)
    del jac_l
    distance = np.concatenate(dist_l)
    return SparseRerank(n=n, k1=k1, k2=k2, lambda_value=lam, indptr=indptr, indices=indices,
                        jaccard=jaccard_all, distance=distance, norm=norm,
                        row_scale=scale.cpu().numpy() if rowmax else None)


def rerank_pairs(emb, rows, cols, result: SparseRerank) -> np.ndarray:
    """Final re-ranked distance (float64) of the pairs (rows[t], cols[t]), from `rerank_sparse`'s
    result for the same `emb`: stored pairs are looked up (either order), the others get
    ``(1 - lambda) + lambda d`` with d computed in float64."""
    x_np = _as_embeddings(emb)
    n = len(x_np)
    if not isinstance(result, SparseRerank):
        raise ValueError(f"result must be the SparseRerank from rerank_sparse, got "
                         f"{type(result).__name__}")
    if result.n != n:
        raise ValueError(f"result is for {result.n} images but emb has {n} rows")
    rows, cols = np.asarray(rows), np.asarray(cols)
    for name, idx in (("rows", rows), ("cols", cols)):
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"{name} must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{name} must index 0..{n - 1}, got values in "
                             f"[{idx.min()}, {idx.max()}]")
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols must have the same length, got {len(rows)} and "
                         f"{len(cols)}")
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    lam = result.lambda_value
    # Only j >= i is stored, columns ascending within a row: binary search in row min(i, j)
    # for max(i, j), all pairs at once (no N-wide or nnz-wide temporary).
    lo, want = np.minimum(rows, cols), np.maximum(rows, cols)
    pos, end = result.indptr[lo].copy(), result.indptr[lo + 1]
    hi = end.copy()
    while True:
        active = pos < hi
        if not active.any():
            break
        mid = (pos + hi) // 2
        go_right = active & (result.indices[np.minimum(mid, len(result.indices) - 1)] < want)
        pos = np.where(go_right, mid + 1, pos)
        hi = np.where(active & ~go_right, mid, hi)
    found = pos < end
    found[found] = result.indices[pos[found]] == want[found]
    if result.norm == "rowmax":
        # Asymmetric: (1 - lambda) d_J + lambda d / scale of the pair's own row, d_J = 1 where
        # the pair shares no support.
        jaccard = np.ones(len(rows), dtype=np.float64)
        jaccard[found] = result.jaccard[pos[found]]
        x = torch.from_numpy(x_np)
        d = _distance64(x, torch.from_numpy(rows), torch.from_numpy(cols)).numpy()
        return (1.0 - lam) * jaccard + lam * d / result.row_scale[rows]
    out = np.empty(len(rows), dtype=np.float64)
    out[found] = result.distance[pos[found]]
    miss = np.flatnonzero(~found)
    if len(miss):
        x = torch.from_numpy(x_np)
        d = _distance64(x, torch.from_numpy(rows[miss]), torch.from_numpy(cols[miss]))
        out[miss] = (1.0 - lam) + lam * d.numpy()
    return out


# --------------------------------------------------------------------------- scores in [0, 1]


def distance_to_similarity(d, lambda_value: float, norm: str = "none") -> np.ndarray:
    """Re-ranked distance -> similarity in [0, 1], strictly decreasing, so rankings are kept:
    ``1 - d / (1 + 3 lambda)``, and ``1 - d`` for norm "rowmax".

    d_J lies in [0, 1] and d in [0, 4], so ``(1 - lambda) d_J + lambda d`` lies in
    [0, 1 + 3 lambda], and the bound is reached (opposite unit vectors sharing no support).
    lambda = 1 gives back ``(1 + cos) / 2``, the raw mapping of the submission. With "rowmax"
    D lies in [0, 1], and so does the final distance. The result is clipped to [0, 1] against
    rounding."""
    lam = _check_unit_interval(lambda_value, "lambda_value")
    top = 1.0 if _check_norm(norm) else 1.0 + 3.0 * lam
    d = np.asarray(d, dtype=np.float64)
    return np.clip(1.0 - d / top, 0.0, 1.0)


def blend(raw_sim01, reranked_sim01, w: float) -> np.ndarray:
    """``w * reranked + (1 - w) * raw``, both similarities in [0, 1] (e.g. (1 + cos) / 2 and
    `distance_to_similarity`), same shape; w in [0, 1]."""
    w = _check_unit_interval(w, "w")
    raw = np.asarray(raw_sim01, dtype=np.float64)
    rer = np.asarray(reranked_sim01, dtype=np.float64)
    if raw.shape != rer.shape:
        raise ValueError(f"raw_sim01 and reranked_sim01 must have the same shape, got "
                         f"{raw.shape} and {rer.shape}")
    for name, arr in (("raw_sim01", raw), ("reranked_sim01", rer)):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ValueError(f"{name} must hold finite values in [0, 1], got range "
                             f"[{np.nanmin(arr)}, {np.nanmax(arr)}]")
    return w * rer + (1.0 - w) * raw
