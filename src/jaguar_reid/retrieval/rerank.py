"""Retrieval post-processing: k-reciprocal re-ranking of embeddings, the dense path and the
steps the sparse path (`rerank_sparse`) shares, and re-ranked distances as [0, 1] scores.

The leaderboard scores every ordered pair of test images, so queries and gallery are the same
N images. Cosine similarity alone ranks each pair on its own; k-reciprocal re-ranking (Zhong,
Zheng, Cao and Li, CVPR 2017) lets each image's neighbourhood vote as well: two images are
close when their sets of *mutual* nearest neighbours overlap (Jaccard distance), blended with
the original distance. (Query expansion and DBA, the other vote of the neighbourhood, are in
`jaguar_reid.retrieval.expansion`; the exact neighbour search in
`jaguar_reid.retrieval.neighbours`.)

Conventions shared by every function here, in `rerank_sparse` and in `rerank_reference`:

* ``emb`` is ``(N, D)``, L2-normalised rows (checked to 1e-3), numpy or torch.
* The **original distance** is ``d(i, j) = 2 - 2 cos(i, j)``, the squared Euclidean distance of
  unit vectors, clipped to ``[0, 4]``, with ``d(i, i) = 0`` exactly. It orders pairs exactly as
  cosine does. (The authors' code squares Euclidean distances too but then divides each column
  by its maximum; for unit vectors ``d`` is already bounded, and a per-column scale would make
  the distance asymmetric and depend on the gallery's farthest image, so it is not done here.)
* **Ranking**: an image is its own first neighbour (rank 0) whatever the rounding of its
  self-similarity; the others follow by increasing ``d``, ties broken by the lower index.
  Distances that decide a ranking are float64 dot products summed in one fixed order
  (`neighbours._canonical_sim`), so equal vectors tie exactly in every path. The fast paths
  screen neighbours in float32 and take float64 only where float32 rounding (bounded, not
  guessed) could change a neighbour list, so their lists are the reference's.
* k1 and k2 larger than N are clamped to N.
* ``norm`` (`RERANK_NORMS`): "none" uses d as it is. "rowmax" divides row i of d by its
  largest entry before the Gaussian weights of V and the final blend, as the authors' Python
  code does (there it is written as a column division followed by a transpose, which for a
  symmetric distance is the row division): ``D(i, j) = d(i, j) / max_k d(i, k)``. Neighbour
  lists are unchanged (a positive factor per row), D lies in [0, 1], and the final distance is
  no longer symmetric: ``(1 - lambda) d_J(i, j) + lambda D(i, j)``. A row whose largest
  distance is 0 (every image identical) is left undivided. The ``k1, k2, lambda`` of a
  write-up that used the authors' code mean the same thing here only with "rowmax".

`rerank_reference.rerank_reference` is a plain, loop-by-loop transcription of the paper (for
tests and benchmarks). `rerank` (dense ``(N, N)`` result) and `rerank_sparse.rerank_sparse` +
`rerank_sparse.rerank_pairs` (any N: only pairs that share k-reciprocal support are stored) are
the vectorised torch versions the pipeline uses, on the CPU or CUDA; all three agree to 1e-5
(float32 rounding of the original distance). `distance_to_similarity` and `blend` map
re-ranked distances back to [0, 1] scores.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from jaguar_reid.config import Config
from jaguar_reid.keys import choices, default
from jaguar_reid.retrieval.array_ops import (
    _as_embeddings,
    _check_chunk,
    _check_int,
    _check_unit_interval,
    _numpy_ok,
    _repeat,
    _sort,
    _sum_into,
    _take,
    _tensor,
    _unique,
)
from jaguar_reid.retrieval.neighbours import (
    _ACCUMULATOR_BYTES,
    _SCREEN_MARGIN,
    DEFAULT_CHUNK,
    _distance64,
    _dot_error_bound,
    _neighbours,
)

RERANK_NORMS = choices("post.rerank_norm")

__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "RERANK_NORMS",
    "blend",
    "distance_to_similarity",
    "estimate_rerank_memory",
    "rerank",
]


def _gib_to_bytes(gib: float) -> int:
    return int(gib * 2**30)


def dense_limit_bytes(cfg: Config) -> int:
    """`post.max_dense_gb` in bytes: the largest dense N x N re-ranking step allowed."""
    return _gib_to_bytes(cfg.post.max_dense_gb)


# rerank() refuses a dense result beyond
DEFAULT_MAX_DENSE_BYTES = _gib_to_bytes(default("post.max_dense_gb"))

# Jaccard step: (query, column, other image) triples generated per chunk of query rows (the
# dense float64 slab their sums accumulate into holds at most `_ACCUMULATOR_BYTES`).
_TRIPLE_BUDGET = 1 << 21


# --------------------------------------------------------------------------- validation


def _check_rerank_args(k1, k2, lambda_value) -> tuple[int, int, float]:
    return (_check_int(k1, "k1", 1), _check_int(k2, "k2", 1),
            _check_unit_interval(lambda_value, "lambda_value"))


def _check_norm(norm) -> bool:
    """True for "rowmax", False for "none"."""
    if norm not in RERANK_NORMS:
        raise ValueError(f"norm must be one of {', '.join(RERANK_NORMS)}, got {norm!r}")
    return norm == "rowmax"


def _row_scale(row_max: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row divisor of d for "rowmax" (float64): the row's largest distance, 1 where that
    is 0 within the rounding of x's similarities (a row of identical images, whose float32
    distances are rounding, has nothing to scale)."""
    row_max = row_max.double()
    return torch.where(row_max > 4.0 * _dot_error_bound(x), row_max, torch.ones_like(row_max))


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
    `rerank_sparse` + `rerank_pairs` there, or raise `max_dense_bytes`.

    The result is linear in lambda: ``(1 - lambda) d_J + lambda d``. For small N (a tuning
    fold) both terms are kept (`_PARTS`, a few recent embeddings), so a grid over lambda, and
    a blend step after it, re-rank each (embeddings, k1, k2, norm) once."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    rowmax = _check_norm(norm)
    x, k1, k2, lam, block, n = _prepare(emb, k1, k2, lambda_value, chunk_size, device)
    itemsize = 4 if dtype == "float32" else 8
    need = estimate_rerank_memory(n, k1, True, k2=k2, itemsize=itemsize)
    if need > max_dense_bytes:
        raise ValueError(
            f"rerank: a dense {n} x {n} re-ranked distance matrix needs about "
            f"{need / 2**30:.1f} GiB, over max_dense_bytes={max_dense_bytes / 2**30:.1f} GiB; "
            "use rerank_sparse() and rerank_pairs() for the pairs you need, or raise "
            "max_dense_bytes")
    work = x if dtype == "float32" else x.double()
    if 2 * n * n * itemsize > _PARTS_BYTES:
        return _rerank_at(x, work, k1, k2, lam, rowmax, block).cpu().numpy()
    key = (hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest(), x.shape, k1, k2, rowmax,
           dtype, str(x.device), block)
    parts = _PARTS.pop(key, None)
    if parts is None:
        parts = (_rerank_at(x, work, k1, k2, 0.0, rowmax, block), _original_distance(work, rowmax))
    _PARTS[key] = parts  # most recent last
    while len(_PARTS) > _PARTS_KEPT:
        _PARTS.popitem(last=False)
    jaccard, original = parts
    return (jaccard * (1.0 - lam) + original * lam).cpu().numpy()


# The two terms of recent small re-rankings, by their embeddings' bytes and settings.
_PARTS: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_PARTS_KEPT = 16
_PARTS_BYTES = 64 << 20  # larger re-rankings are computed at their lambda and not kept


def _original_distance(work: torch.Tensor, rowmax: bool) -> torch.Tensor:
    """d = 2 - 2 cos clipped to [0, 4] with d(i, i) = 0, or for "rowmax" D = d / its row's
    largest value (`_row_scale`), in work's precision."""
    d = torch.clamp(work @ work.T, -1.0, 1.0).mul_(-2.0).add_(2.0)
    d.fill_diagonal_(0.0)
    if rowmax:
        d = d / _row_scale(d.max(dim=1).values, work).to(d.dtype)[:, None]
    return d


def _rerank_at(x: torch.Tensor, work: torch.Tensor, k1: int, k2: int, lam: float,
               rowmax: bool, block: int) -> torch.Tensor:
    """The dense re-ranked distance at one lambda (see `rerank`), on x's device."""
    n = x.shape[0]
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
    return out


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
