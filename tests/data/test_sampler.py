"""Training batches: a pure function of (seed, epoch), shared out across ranks exactly as one
process with gradient accumulation would take them; P x K batches."""

from collections import Counter

import numpy as np
import pytest

from jaguar_reid.data.sampler import TrainBatchSampler, pk_order


def flat(batches):
    return [item for batch in batches for item in batch]


def test_random_epochs_are_permutations_repeatable_and_distinct():
    labels = list(range(50))
    sampler = TrainBatchSampler(labels, batch_size=8, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert len(first) == len(sampler) == 6  # 50 // 8 full batches; the tail is dropped
    indices = [i for i, _ in flat(first)]
    assert len(set(indices)) == 48 and set(indices) <= set(range(50))
    again = TrainBatchSampler(labels, batch_size=8, seed=3)
    again.set_epoch(1)
    assert list(again) == first
    sampler.set_epoch(2)
    assert [i for i, _ in flat(sampler)] != indices
    seeds = [s for _, s in flat(first)]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("mode", ["random", "pk"])
def test_ranks_split_the_batches_one_process_accumulates(mode):
    """2 ranks x batch 4 x accumulation 1 == 1 process x batch 4 x accumulation 2: the same
    (image, seed) pairs in the same micro-steps, and the same number of optimiser steps."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 9, size=70).tolist()
    single = TrainBatchSampler(labels, 4, seed=5, mode=mode, k=2, grad_accum=2)
    ranks = [TrainBatchSampler(labels, 4, seed=5, mode=mode, k=2, rank=r, world_size=2)
             for r in (0, 1)]
    for sampler in (single, *ranks):
        sampler.set_epoch(4)
    one = list(single)
    per_rank = [list(r) for r in ranks]
    assert single.steps_per_epoch() == ranks[0].steps_per_epoch()
    assert len(per_rank[0]) == len(per_rank[1]) == len(one) // 2
    for step, (a, b) in enumerate(zip(*per_rank, strict=True)):
        assert one[2 * step] == a and one[2 * step + 1] == b


def test_pk_batches_hold_p_identities_of_k_images():
    rng = np.random.default_rng(1)
    # A long tail: identity 0 has 1 image, identity 1 has 3, the rest 5 to 20.
    labels = np.concatenate([[0], [1] * 3, *[[c] * int(rng.integers(5, 21)) for c in range(2, 12)]])
    order = pk_order(labels, p=4, k=3, rng=np.random.default_rng(2))
    assert len(order) % 12 == 0
    for batch in order.reshape(-1, 12):
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
    seen = Counter(labels[order].tolist())
    assert seen[0] >= 3  # the one-image identity is repeated to fill its K
    # Identities drain together: of the 48 chunks of K, at most one batch's worth is left over
    # (fewer than P identities remain at the end), over several seeds.
    chunks = sum(-(-n // 3) for n in Counter(labels.tolist()).values())
    assert chunks == 48
    for seed in range(20):
        order = pk_order(labels, p=4, k=3, rng=np.random.default_rng(seed))
        assert len(order) // 12 >= chunks // 4 - 1


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="multiple of train.pk_k"):
        TrainBatchSampler([0, 1] * 10, batch_size=6, seed=0, mode="pk", k=4)
    with pytest.raises(ValueError, match="only 2 identities"):
        TrainBatchSampler([0, 1] * 10, batch_size=8, seed=0, mode="pk", k=2)
    with pytest.raises(ValueError, match="do not fill one optimiser step"):
        TrainBatchSampler([0] * 10, batch_size=4, seed=0, world_size=2, grad_accum=2)
    with pytest.raises(ValueError, match="train.sampler"):
        TrainBatchSampler([0] * 10, batch_size=4, seed=0, mode="balanced")
