"""Local-feature verification: SIFT on synthetic spot images (a warped copy matches, another
pattern does not), masks, resizing and the coordinate convention, RootSIFT, the shortlist
against a plain loop, the feature file, the pair cache and bad inputs. Real photos where
../shared has them."""

from __future__ import annotations

import csv
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image

from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.retrieval import local
from jaguar_reid.retrieval.local import (
    FeatureFileError,
    LocalFeatures,
    dense_inliers,
    erode_mask,
    image_features,
    inlier_matrix,
    load_features,
    match_pair,
    read_for_features,
    root_sift,
    save_features,
    shortlist_pairs,
    sift_features,
    verify_pairs,
)
from tests.helpers import SHARED, coat_png, spots, warp

DOGS = SHARED / "datasets" / "dogfacenet-reid"


# --------------------------------------------------------------------------- synthetic images


@pytest.fixture(scope="module")
def coat() -> dict[str, LocalFeatures]:
    base = spots(1)
    return {"base": sift_features(base), "warped": sift_features(warp(base)),
            "other": sift_features(spots(2))}


# --------------------------------------------------------------------------- matching


def test_warped_copy_has_many_inliers_and_another_coat_few(coat):
    same = match_pair(coat["base"], coat["warped"])
    other = match_pair(coat["base"], coat["other"])
    assert len(coat["base"]) > 300  # 512 at most
    assert same > 100  # 140 measured
    assert other <= 8  # 4 measured: the 4 matches that determine any homography
    assert same > 10 * max(other, 1)


def test_inlier_matches_follow_the_known_warp_in_either_order(coat):
    from jaguar_reid.retrieval.local import inlier_matches

    xy_a, xy_b = inlier_matches(coat["base"], coat["warped"])
    assert len(xy_a) == len(xy_b) == match_pair(coat["base"], coat["warped"])
    height, width = 320, 400
    affine = cv2.getRotationMatrix2D((width / 2, height / 2), 17.0, 0.9)
    homography = np.vstack([affine, [2e-4, 0, 1]])
    mapped = cv2.perspectiveTransform(xy_a[None].astype(np.float64), homography)[0]
    assert np.median(np.linalg.norm(mapped - xy_b, axis=1)) < 1.5  # pixels
    back_b, back_a = inlier_matches(coat["warped"], coat["base"])
    np.testing.assert_array_equal(back_a, xy_a)
    np.testing.assert_array_equal(back_b, xy_b)


@pytest.mark.parametrize("model", ["homography", "affine", "fundamental"])
@pytest.mark.parametrize("method", ["magsac", "ransac"])
def test_match_pair_is_symmetric_and_deterministic(coat, model, method):
    a, b, c = coat["base"], coat["warped"], coat["other"]
    same = [match_pair(x, y, model=model, method=method) for x, y in ((a, b), (b, a), (a, b))]
    other = [match_pair(x, y, model=model, method=method) for x, y in ((a, c), (c, a))]
    assert len(set(same)) == 1 and len(set(other)) == 1
    assert same[0] > 100 and other[0] <= 10


def test_match_pair_same_counts_in_threads(coat):
    expected = match_pair(coat["base"], coat["warped"], method="ransac")
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda _: match_pair(coat["base"], coat["warped"],
                                                     method="ransac"), range(6)))
    assert counts == [expected] * 6


def test_too_few_matches_give_zero(coat):
    empty = LocalFeatures(np.zeros((0, 2)), np.zeros((0, 128)), (10, 10))
    assert match_pair(coat["base"], empty) == 0
    assert match_pair(empty, empty) == 0
    few = LocalFeatures(coat["base"].xy[:5], coat["base"].descriptors[:5], (320, 400))
    assert match_pair(few, coat["base"]) == 0  # 5 < min_matches = 8
    assert match_pair(coat["base"], coat["warped"], min_matches=10_000) == 0


def test_flat_image_has_zero_keypoints():
    features = sift_features(np.full((64, 80), 128, np.uint8))
    assert features.xy.shape == (0, 2) and features.descriptors.shape == (0, 128)
    assert features.xy.dtype == features.descriptors.dtype == np.float32
    assert features.image_size == (64, 80)


def test_keypoint_cap_keeps_the_strongest():
    img = spots(1)
    capped, full = sift_features(img, max_keypoints=50), sift_features(img, max_keypoints=400)
    assert len(capped) == 50 and len(full) > 50
    # The strongest first in both: the cap is a prefix of the larger set.
    np.testing.assert_array_equal(capped.xy, full.xy[:50])


# --------------------------------------------------------------------------- reading, masks


def test_mask_restricts_keypoints(tmp_path):
    rgb = cv2.cvtColor(spots(3), cv2.COLOR_GRAY2RGB)
    height, width = rgb.shape[:2]
    alpha = np.zeros((height, width), np.uint8)
    alpha[:, : width // 2] = 255  # the right half is background
    path = coat_png(tmp_path / "half.png", np.dstack([rgb, alpha]))
    gray, mask = read_for_features(path, max_side=1000)
    assert gray.shape == mask.shape == (height, width)
    np.testing.assert_array_equal(mask, np.where(alpha > 127, 255, 0))
    features = sift_features(gray, mask, mask_erode=6)
    eroded = erode_mask(mask, 6)
    assert len(features) > 50
    x, y = np.rint(features.xy).astype(int).T
    assert np.all(eroded[y, x] > 0)
    assert features.xy[:, 0].max() < width // 2 - 6
    # Unmasked, the same image has keypoints on both halves.
    assert sift_features(gray).xy[:, 0].max() > width // 2 + 20
    # The cap counts keypoints inside the mask (OpenCV's own cap is applied before its mask).
    assert len(sift_features(gray, mask, max_keypoints=120)) == 120


def test_opaque_alpha_gives_no_mask(tmp_path):
    rgb = cv2.cvtColor(spots(3, (60, 80)), cv2.COLOR_GRAY2RGB)
    opaque = coat_png(tmp_path / "opaque.png", np.dstack([rgb, np.full((60, 80), 255, np.uint8)]))
    plain = coat_png(tmp_path / "plain.jpg", rgb)
    for path in (opaque, plain):
        gray, mask = read_for_features(path)
        assert mask is None and gray.dtype == np.uint8 and gray.shape == (60, 80)


def test_resize_bounds_the_longer_side_and_never_upscales(tmp_path):
    rgba = np.dstack([cv2.cvtColor(spots(4, (200, 300)), cv2.COLOR_GRAY2RGB),
                      np.full((200, 300), 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    path = coat_png(tmp_path / "wide.png", rgba)
    gray, mask = read_for_features(path, max_side=150)
    assert gray.shape == mask.shape == (100, 150)
    assert mask[0, 0] == 0 and mask[-1, -1] == 255
    gray, _ = read_for_features(path, max_side=1000)
    assert gray.shape == (200, 300)
    tall = coat_png(tmp_path / "tall.png", spots(4, (300, 120)))
    assert read_for_features(tall, max_side=100)[0].shape == (100, 40)


def test_coordinates_are_original_pixels_at_any_working_size(tmp_path):
    """Gaussian blobs at known sub-pixel centres (pixel-centre convention): the keypoint on
    each is at its centre in original pixels, whatever the working size. Scaling x alone
    (no half-pixel terms) would be off by 0.5 x (factor - 1) px on each axis."""
    height, width = 360, 480
    yy, xx = np.mgrid[0:height, 0:width]
    centres = np.array([(100.3, 90.7), (330.6, 100.2), (150.1, 260.4), (380.8, 270.9)])
    img = np.full((height, width), 200.0)
    for cx, cy in centres:
        img -= 150 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 9.0**2))
    path = coat_png(tmp_path / "blobs.png", img.clip(0, 255).astype(np.uint8))
    for max_side in (480, 240, 160):
        features = image_features(path, max_side=max_side)
        assert features.image_size == (height, width)
        dist = np.linalg.norm(features.xy[None] - centres[:, None], axis=2).min(axis=1)
        assert dist.max() < 0.25, (max_side, dist)  # 0.05 measured; naive: 0.7 to 1.4


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        read_for_features(bad)
    with pytest.raises(ValueError, match="max_side"):
        read_for_features(bad, max_side=0)


# --------------------------------------------------------------------------- descriptors


def test_root_sift_matches_a_numpy_reference():
    raw = np.random.default_rng(0).uniform(0, 200, (20, 128)).astype(np.float32)
    raw[3] = 0.0
    reference = np.sqrt(raw / np.maximum(raw.sum(axis=1, keepdims=True), 1e-12))
    out = root_sift(raw)
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-7)
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(np.delete(norms, 3), 1.0, rtol=1e-5)
    assert norms[3] == 0


def test_sift_features_root_and_plain_descriptors():
    img = spots(5)
    root, plain = sift_features(img, root=True), sift_features(img, root=False)
    np.testing.assert_array_equal(root.xy, plain.xy)
    np.testing.assert_allclose(np.linalg.norm(plain.descriptors, axis=1), 1.0, rtol=1e-5)
    # L1 normalisation removes plain's L2 scale: RootSIFT of plain is root.
    reference = np.sqrt(plain.descriptors / plain.descriptors.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(root.descriptors, reference, atol=1e-6)


# --------------------------------------------------------------------------- shortlist


def _shortlist_loop(sim: np.ndarray, top_b: int) -> set[tuple[int, int]]:
    n = len(sim)
    pairs = set()
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i, j], j))
        for j in others[:top_b]:
            pairs.add((min(i, j), max(i, j)))
    return pairs


@pytest.mark.parametrize("top_b", [1, 3, 7, 29, 100])
def test_shortlist_matches_a_plain_loop(top_b):
    rng = np.random.default_rng(top_b)
    sim = rng.integers(0, 4, (30, 30)).astype(np.float32)  # few values: many ties
    sim[5] = 1.0  # a whole row of ties
    rows, cols = shortlist_pairs(sim, top_b)
    expected = sorted(_shortlist_loop(sim, top_b))
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == expected
    assert rows.dtype == cols.dtype == np.int64
    assert len(rows) <= 30 * top_b
    # Through a function of row indices, a few rows at a time: the same pairs.
    asked = []

    def rows_of(idx: np.ndarray) -> np.ndarray:
        asked.append(len(idx))
        return sim[idx]

    rows2, cols2 = shortlist_pairs(rows_of, top_b, n=30, block_rows=7)
    np.testing.assert_array_equal(rows2, rows)
    np.testing.assert_array_equal(cols2, cols)
    assert asked == [7, 7, 7, 7, 2]


def test_shortlist_edge_cases():
    assert [a.tolist() for a in shortlist_pairs(np.zeros((1, 1)), 3)] == [[], []]
    rows, cols = shortlist_pairs(np.array([[9.0, -np.inf], [-np.inf, 9.0]]), 5)
    assert rows.tolist() == [0] and cols.tolist() == [1]  # self never chosen


# --------------------------------------------------------------------------- feature files


def test_save_load_round_trip(tmp_path, coat):
    empty = LocalFeatures(np.zeros((0, 2)), np.zeros((0, 128)), (7, 9))
    features = [coat["base"], empty, coat["other"]]
    path = tmp_path / "cache" / "local.npz"
    save_features(path, features)
    save_features(path, features)  # over an existing file
    assert [p.name for p in path.parent.iterdir()] == ["local.npz"]  # no temporary left
    loaded = load_features(path)
    assert len(loaded) == 3
    for got, want in zip(loaded, features, strict=True):
        np.testing.assert_array_equal(got.xy, want.xy)
        np.testing.assert_array_equal(got.descriptors, want.descriptors)
        assert got.image_size == want.image_size
        assert got.xy.dtype == got.descriptors.dtype == np.float32
    assert len(loaded[1]) == 0 and loaded[1].descriptors.shape == (0, 128)
    save_features(tmp_path / "none.npz", [])
    assert load_features(tmp_path / "none.npz") == []
    # A name without .npz is kept as given (numpy would append one to a name).
    save_features(tmp_path / "features.bin", [empty])
    assert load_features(tmp_path / "features.bin")[0].image_size == (7, 9)


def test_bad_feature_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(FeatureFileError, match="corrupt.npz"):
        load_features(corrupt)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, embeddings=np.zeros((3, 4)))
    with pytest.raises(FeatureFileError, match=r"wrong.npz.*expected arrays"):
        load_features(wrong)
    offsets = tmp_path / "offsets.npz"
    np.savez(offsets, version=np.int64(1), xy=np.zeros((4, 2), np.float32),
             descriptors=np.zeros((4, 128), np.float32), offsets=np.array([0, 3]),
             image_sizes=np.array([[5, 5]]))
    with pytest.raises(FeatureFileError, match=r"offsets.npz.*offsets rising from 0 to 4"):
        load_features(offsets)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_features(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- verify_pairs


def test_verify_pairs_cache_skips_the_matcher(coat, monkeypatch):
    features = [coat["base"], coat["warped"], coat["other"]]
    calls = []
    lock = threading.Lock()
    real = local.match_pair

    def counting(a, b, *args, **kwargs):
        with lock:
            calls.append((id(a), id(b)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(local, "match_pair", counting)
    rows, cols = np.array([0, 1, 0, 2]), np.array([1, 0, 2, 0])
    cache: dict[tuple[int, int], int] = {}
    first = verify_pairs(features, rows, cols, cache=cache)
    assert len(calls) == 2  # (0, 1) and (0, 2), each once whatever its order
    assert set(cache) == {(0, 1), (0, 2)}
    assert first.dtype == np.int32
    assert first[0] == first[1] > 100 and first[2] == first[3] <= 8
    second = verify_pairs(features, rows[::-1], cols[::-1], cache=cache)
    assert len(calls) == 2  # nothing new
    np.testing.assert_array_equal(second, first[::-1])
    threaded = verify_pairs(features, np.array([0, 0, 1]), np.array([1, 2, 2]), workers=2)
    assert len(calls) == 5
    np.testing.assert_array_equal(threaded[:2], first[[0, 2]])
    assert threaded[2] == real(features[1], features[2])


def test_inlier_matrix_is_symmetric_and_keeps_verified_zeros():
    rows, cols, counts = np.array([0, 3, 2, 1]), np.array([2, 1, 0, 4]), np.array([5, 0, 5, 9])
    matrix = inlier_matrix(5, rows, cols, counts)
    dense = matrix.toarray()
    np.testing.assert_array_equal(dense, dense.T)
    assert dense[0, 2] == 5 and dense[1, 4] == dense[4, 1] == 9 and dense[1, 3] == 0
    assert matrix.dtype == np.int32 and matrix.nnz == 6  # 3 pairs, both triangles
    stored = {(i, int(j)) for i in range(5)
              for j in matrix.indices[matrix.indptr[i]:matrix.indptr[i + 1]]}
    assert {(1, 3), (3, 1)} <= stored  # verified with 0 inliers: an explicit zero
    inliers, verified = dense_inliers(matrix)
    np.testing.assert_array_equal(inliers, dense)
    assert inliers.dtype == np.int32 and verified.dtype == bool
    assert sorted(zip(*np.nonzero(verified), strict=True)) == sorted(stored)
    assert not verified.diagonal().any()
    with pytest.raises(ValueError, match="two different counts"):
        inlier_matrix(5, np.array([0, 2]), np.array([2, 0]), np.array([1, 2]))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(("call", "message"), [
    (lambda: shortlist_pairs(np.zeros((4, 4)), 0), "top_b must be >= 1"),
    (lambda: shortlist_pairs(np.zeros((4, 3)), 2), r"square \(N, N\)"),
    (lambda: shortlist_pairs(lambda idx: np.zeros((len(idx), 4)), 2), "n .* is required"),
    (lambda: shortlist_pairs(lambda idx: np.zeros((len(idx), 3)), 2, n=4), r"shape \(4, 4\)"),
    (lambda: shortlist_pairs(np.full((3, 3), np.nan), 1), "NaN"),
    (lambda: verify_pairs([], [0, 1], [1]), "rows and cols must have the same length"),
    (lambda: verify_pairs([], [0], [1]), r"rows must be image indices in \[0, 0\)"),
    (lambda: verify_pairs([None] * 3, [0], [3]), r"cols must be image indices in \[0, 3\)"),
    (lambda: verify_pairs([None] * 3, [0.5], [1.0]), "rows must be a 1-D array"),
    (lambda: verify_pairs([None] * 3, [1], [1]), "must differ"),
    (lambda: verify_pairs([None] * 3, [0], [1], workers=0), "workers must be >= 1"),
    (lambda: verify_pairs([None] * 3, [0], [1], method="lmeds"), "method must be one of"),
    (lambda: verify_pairs([None] * 3, [0], [1], model="affine3d"), "model must be one of"),
    (lambda: verify_pairs([None] * 3, [0], [1], min_matches=3), "min_matches must be >= 4"),
    (lambda: inlier_matrix(3, [0], [1], [1, 2]), "counts must have one value per pair"),
    (lambda: sift_features(np.zeros((8, 8), np.float32)), "uint8"),
    (lambda: sift_features(np.zeros((8, 8), np.uint8), np.zeros((4, 4))), "mask must have"),
    (lambda: LocalFeatures(np.zeros((3, 2)), np.zeros((2, 128)), (4, 4)), "K = 3"),
])
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- real photos


@pytest.mark.skipif(not DOGS.is_dir(), reason="../shared/datasets/dogfacenet-reid absent")
def test_real_photo_matches_its_warped_copy_not_another_dog(tmp_path):
    """Dog faces have little texture for SIFT (two photos of one dog rarely match), so the
    real-image check is a real photo against a rotated, rescaled copy of itself."""
    with open(DOGS / "test_labels.csv") as handle:
        labels = list(csv.DictReader(handle))
    first = labels[0]
    other = next(row for row in labels if row["ground_truth"] != first["ground_truth"])
    photo = DOGS / "test" / first["filename"]
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    copy = coat_png(tmp_path / "copy.png", warp(rgb, angle_deg=12.0, scale=1.0))
    a, b = image_features(photo), image_features(copy)
    c = image_features(DOGS / "test" / other["filename"])
    assert len(a) > 100
    same, different = match_pair(a, b), match_pair(a, c)
    assert same > 40 and different <= 8, (same, different)
