"""Near-duplicates: a picture's resized, re-compressed and slightly cropped copies are grouped;
different pictures are not; folds never split a group."""

import io

import numpy as np
import pytest
from PIL import Image

from jaguar_reid.data.dedup import (
    duplicate_groups,
    group_ids,
    hamming_matrix,
    hash_to_hex,
    hex_to_hash,
    near_duplicate_pairs,
    phash,
)
from jaguar_reid.data.splits import assign_closed_folds

# The configured default: copies measured up to 8 bits apart (3% cropped off each side),
# distinct demo pictures at least 16.
THRESHOLD = 10


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Distinct real-looking pictures: the demo's spotted animals on cluttered backgrounds."""
    from jaguar_reid.data.demo import generate_demo_dataset

    out = tmp_path_factory.mktemp("pictures")
    generate_demo_dataset(out, seed=3, n_ids=2, min_images=6, max_images=6, image_size=192)
    paths = sorted((out / "train" / "train").glob("*.png"))[:12]
    return [Image.open(p).convert("RGB") for p in paths]


def variants(img: Image.Image) -> list[Image.Image]:
    w, h = img.size
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=60)
    return [
        img.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
        Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        img.crop((w // 30, h // 30, w - w // 30, h - h // 30)),  # about 3% off each side
    ]


def test_copies_are_near_and_other_pictures_far(pictures):
    hashes = np.stack([phash(p) for p in pictures])
    dist = hamming_matrix(hashes)
    off = dist[~np.eye(len(pictures), dtype=bool)]
    assert off.min() > THRESHOLD  # no two different pictures collide
    for picture, h in zip(pictures, hashes, strict=True):
        for copy in variants(picture):
            assert int((phash(copy) != h).sum()) <= THRESHOLD


def test_hamming_matches_a_loop_and_hex_round_trips():
    rng = np.random.default_rng(0)
    bits = rng.random((7, 64)) > 0.5
    dist = hamming_matrix(bits)
    for i in range(7):
        for j in range(7):
            assert dist[i, j] == sum(a != b for a, b in zip(bits[i], bits[j], strict=True))
        assert (hex_to_hash(hash_to_hex(bits[i])) == bits[i]).all()
    with pytest.raises(ValueError, match="64"):
        hamming_matrix(bits[:, :10])


def test_groups_are_connected_components():
    pairs = [(0, 3, 1), (3, 5, 2), (1, 2, 0)]
    assert group_ids(7, pairs).tolist() == [0, 1, 1, 0, 2, 0, 3]
    assert group_ids(3, []).tolist() == [0, 1, 2]


def test_groups_stay_inside_identities(pictures):
    originals = pictures[:4]
    images = [*originals, *(variants(originals[0])[:2]), variants(originals[1])[0]]
    labels = np.array(["a", "b", "c", "d", "a", "x", "b"])  # index 5 is a copy under label x
    hashes = np.stack([phash(p) for p in images])
    groups, cross = duplicate_groups(hashes, labels, THRESHOLD)
    assert groups[0] == groups[4] and groups[1] == groups[6]
    assert len(set(groups[[0, 1, 2, 3]])) == 4
    assert groups[5] != groups[0]  # never merged across identities...
    assert {(p[0], p[1]) for p in cross} >= {(0, 5), (4, 5)}  # ...but reported
    assert all(d <= THRESHOLD for *_, d in near_duplicate_pairs(hashes, THRESHOLD))


def test_closed_folds_never_split_a_duplicate_group(pictures):
    images, labels = [], []
    for k, picture in enumerate(pictures):
        for copy in [picture, *variants(picture)]:
            images.append(copy)
            labels.append(f"id{k % 4}")
    groups, _ = duplicate_groups(np.stack([phash(p) for p in images]), np.array(labels),
                                 THRESHOLD)
    assert len(np.unique(groups)) == len(pictures)  # each picture with its copies
    folds = assign_closed_folds(np.array(labels), 3, seed=0, groups=groups)
    for group in np.unique(groups):
        assert len(np.unique(folds[groups == group])) == 1
