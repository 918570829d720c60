"""Exact nearest neighbours of L2-normalised embeddings, screened by torch or faiss.

The search behind query expansion, DBA and k-reciprocal re-ranking (`expansion`, `rerank`,
`rerank_sparse`):

* The **original distance** is ``d(i, j) = 2 - 2 cos(i, j)``, the squared Euclidean distance of
  unit vectors, clipped to ``[0, 4]``, with ``d(i, i) = 0`` exactly. It orders pairs exactly as
  cosine does.
* **Ranking**: an image is its own first neighbour (rank 0) whatever the rounding of its
  self-similarity; the others follow by increasing ``d``, ties broken by the lower index.
  Distances that decide a ranking are float64 dot products summed in one fixed order
  (`_canonical_sim`), so equal vectors tie exactly in every path. The fast paths screen
  neighbours in float32 and take float64 only where float32 rounding (bounded, not guessed)
  could change a neighbour list, so their lists are the reference's (`rerank_reference`).
* Candidates are screened by torch (blocked matrix products over the upper triangle, CPU or
  CUDA) or faiss (an exact inner-product index, CPU): `KNN_BACKENDS`, `resolve_knn_backend`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from jaguar_reid.extras import MissingExtra, missing_message
from jaguar_reid.keys import choices
from jaguar_reid.retrieval.array_ops import (
    _NORM_TOLERANCE,
    _as_embeddings,
    _check_chunk,
    _check_int,
    _numpy_ok,
    _sort,
    _tensor,
)

# Who screens the nearest-neighbour candidates (see `nearest_neighbours`). "auto", from
# bench/knn_backends.py's side-by-side figures (bench/README.md): on the CPU torch's half
# (upper-triangle) product wins at N = 20,000 (7.0 s against faiss's 9.5) and faiss wins at
# 100,000 (107 s against 206), so faiss from AUTO_FAISS_MIN_N images on; on CUDA, torch.
KNN_BACKENDS = choices("post.knn_backend")
AUTO_FAISS_MIN_N = 50_000

__all__ = [
    "KNN_BACKENDS",
    "faiss_available",
    "nearest_neighbours",
    "resolve_knn_backend",
]

# Rows per block of the chunked similarity products (a block is at most 2048 x 2048 floats,
# 16 MB in float32), so no N x N similarity matrix is held just to find neighbours.
DEFAULT_CHUNK = 2048
# Extra candidates screened in float32 beyond the k kept after exact float64 re-ranking. A
# neighbour can only be missed when more than this many candidates sit within float32 rounding
# of the k-th; rows where that cannot be ruled out are recomputed in full in float64.
_SCREEN_MARGIN = 8
# Bytes of a dense float64 slab (rows x N): the full float64 rows of `_full_rows64` here, and
# the slab re-ranking's Jaccard sums accumulate into (`rerank._support_slabs`).
_ACCUMULATOR_BYTES = 1 << 27
# Image pairs per chunk when computing float64 distances of given pairs (pairs x D floats).
_PAIR_ELEMENTS = 1 << 23


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
        raise MissingExtra(f"{missing_message('faiss', 'post.knn_backend=faiss')}; or set "
                           "post.knn_backend=torch or auto")
    return backend


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
