"""What exact neighbour search, query expansion and re-ranking share: the checked embedding
input, argument checks, and array primitives that take numpy's routines on the CPU and torch's
elsewhere.

``emb`` is ``(N, D)``, L2-normalised rows (checked to 1e-3), numpy or torch.
"""

from __future__ import annotations

import numpy as np
import torch

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
