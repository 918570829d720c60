"""Training batches: which images, in what order, with which augmentation seed.

Each epoch's order is a pure function of (seed, epoch), so a resumed run continues exactly,
and several GPUs split the very batches one GPU would see: every optimiser step consumes a
window of `batch_size x world_size x grad_accum` images; micro-step a of the window goes to
the ranks in turn, rank r taking `batch_size` consecutive images. One process with
`grad_accum = N` and N processes with `grad_accum = 1` therefore see the same images per step.
An incomplete last window is dropped.

`random`: a permutation of the training images. `pk`: batches of P identities x K images
(P = batch_size / K), images drawn without replacement within an identity and repeated only
to fill an identity's last K, so rare jaguars are seen as often as their images allow and
every batch has positives for every identity in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from jaguar_reid.keys import choices

SAMPLERS = choices("train.sampler")


def random_order(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(n)


def pk_order(labels: Sequence[int], p: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices in batches of `p` distinct identities x `k` images each (flattened)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < p:
        raise ValueError(f"pk sampler: P = {p} identities per batch, but only {len(classes)} "
                         "identities are in training (lower train.batch_size or raise "
                         "train.pk_k)")
    remaining: dict[int, list[np.ndarray]] = {}
    for label in classes:
        idx = rng.permutation(np.flatnonzero(labels == label))
        short = (-len(idx)) % k
        if short:  # top up to a multiple of k, repeating as few images as possible
            idx = np.concatenate([idx, rng.choice(idx, short, replace=short > len(idx))])
        remaining[int(label)] = list(idx.reshape(-1, k))
    # Each batch draws P identities with probability proportional to their chunks left, so
    # large identities drain alongside small ones and little is left over at the end (a
    # uniform shuffle of chunks leaves the big identities' chunks for last, unusable).
    batches: list[np.ndarray] = []
    while True:
        alive = [label for label, chunks in remaining.items() if chunks]
        if len(alive) < p:
            break
        weight = np.array([len(remaining[label]) for label in alive], dtype=np.float64)
        chosen = rng.choice(len(alive), size=p, replace=False, p=weight / weight.sum())
        batches.append(np.concatenate([remaining[alive[c]].pop() for c in chosen]))
    return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's batches as lists of (dataset index, augmentation seed)."""

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int, mode: str = "random",
                 k: int = 4, rank: int = 0, world_size: int = 1, grad_accum: int = 1) -> None:
        if mode not in SAMPLERS:
            raise ValueError(f"train.sampler must be one of {', '.join(SAMPLERS)}; got {mode!r}")
        if mode == "pk" and (k < 1 or batch_size % k):
            raise ValueError(f"pk sampler: train.batch_size={batch_size} must be a multiple of "
                             f"train.pk_k={k}")
        self.labels = np.asarray(labels)
        self.batch_size, self.seed, self.mode, self.k = batch_size, seed, mode, k
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.window = batch_size * world_size * grad_accum
        self.epoch = 0
        self._cached: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
        if self.steps_per_epoch() == 0:
            raise ValueError(
                f"{len(self.labels)} training images do not fill one optimiser step of "
                f"train.batch_size x gpus x train.grad_accum = {self.window} images")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole epoch across ranks: indices and their augmentation seeds."""
        # len() and iteration both need it; the last epoch's order is kept.
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        self._cached = (epoch, self._make_order(epoch))
        return self._cached[1]

    def _make_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "pk":
            order = pk_order(self.labels, self.batch_size // self.k, self.k, rng)
        else:
            order = random_order(len(self.labels), rng)
        seeds = rng.integers(0, 2**31 - 1, size=len(order))
        keep = len(order) // self.window * self.window
        return order[:keep], seeds[:keep]

    def steps_per_epoch(self) -> int:
        # pk epochs vary a little in length; epoch 0's is the estimate (used by the scheduler).
        return len(self.epoch_order(0)[0]) // self.window

    def __len__(self) -> int:
        return len(self.epoch_order(self.epoch)[0]) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, seeds = self.epoch_order(self.epoch)
        chunk = self.batch_size * self.world_size
        for start in range(0, len(order), chunk):
            lo = start + self.rank * self.batch_size
            yield [(int(i), int(s)) for i, s in
                   zip(order[lo:lo + self.batch_size], seeds[lo:lo + self.batch_size],
                       strict=True)]
