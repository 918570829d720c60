"""Learned local features (DISK + LightGlue through kornia) with RANDOM weights: shapes, units,
masks, the coordinate convention, determinism, symmetry, the weight files (both formats,
strict loading, errors naming the file) and that nothing is ever downloaded.

Random weights cannot show that learned matching WORKS (that needs the released files, which
these tests never fetch): no test asserts an inlier count only real weights would give."""

from __future__ import annotations

import ast
import re
import sys
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("kornia")

import torch  # noqa: E402

from jaguar_reid.io_utils import UserInputError  # noqa: E402
from jaguar_reid.retrieval import learned, local  # noqa: E402
from jaguar_reid.retrieval.learned import (  # noqa: E402
    LearnedWeightsError,
    check_weights,
    disk_features,
    lightglue_inlier_matches,
    lightglue_match_pair,
    lightglue_putative_matches,
)
from jaguar_reid.retrieval.local import LocalFeatures  # noqa: E402

SIZE = (128, 160)  # (height, width): small, so that DISK runs in well under a second
# Random LightGlue weights give confidences far below the released model's 0.1 threshold:
# every mutual match is kept, so that the matching and fitting code runs at all.
LOOSE = {"match_threshold": 0.0, "min_matches": 4}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test fails if anything tries to fetch weights or open a URL."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def coat(seed: int, size: tuple[int, int] = SIZE, count: int = 50) -> np.ndarray:
    """A grayscale coat: dark ellipses on a noisy light ground."""
    rng = np.random.default_rng(seed)
    img = np.clip(170 + rng.normal(0, 6, size), 0, 255).astype(np.uint8)
    for _ in range(count):
        centre = (int(rng.integers(0, size[1])), int(rng.integers(0, size[0])))
        axes = (int(rng.integers(3, 10)), int(rng.integers(3, 10)))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    int(rng.integers(0, 90)), -1)
    return img


def rotated(img: np.ndarray, angle: float = 12.0) -> np.ndarray:
    height, width = img.shape
    affine = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 0.95)
    return cv2.warpAffine(img, affine, (width, height), borderValue=170)


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("learned")
    base = coat(1)
    rgba = np.dstack([np.repeat(base[..., None], 3, axis=2), np.full(SIZE, 255, np.uint8)])
    rgba[:, : SIZE[1] // 2, 3] = 0  # the left half is background
    return {"base": _png(folder / "base.png", base),
            "rotated": _png(folder / "rotated.png", rotated(base)),
            "other": _png(folder / "other.png", coat(2)),
            "half": _png(folder / "half.png", rgba)}


@pytest.fixture(scope="module")
def feats(images: dict[str, Path]) -> dict[str, LocalFeatures]:
    return {name: disk_features(images[name], None, max_keypoints=96)
            for name in ("base", "rotated", "other")}


def _seeded(kind: str, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return learned._new_model(kind)


def _cvg_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kornia's LightGlue names -> cvg/LightGlue's release names, and without the derived
    buffer the release files lack."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^transformers\.(\d+)\.(self_attn|cross_attn)\.", r"\2.\1.", key)
        if key != "confidence_thresholds":
            out[key] = value
    return out


def _same(f: LocalFeatures, g: LocalFeatures) -> bool:
    return (f.image_size == g.image_size and np.array_equal(f.xy, g.xy)
            and np.array_equal(f.descriptors, g.descriptors))


# --------------------------------------------------------------------------- DISK


def test_disk_features_shapes_units_and_determinism(images, feats):
    f = feats["base"]
    assert 0 < len(f) <= 96
    assert f.xy.dtype == np.float32 and f.descriptors.dtype == np.float32
    assert f.descriptors.shape == (len(f), learned.DISK_DIM)
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert f.image_size == SIZE
    assert np.all(f.xy >= 0) and np.all(f.xy <= np.array(SIZE[::-1]) - 1)
    assert _same(disk_features(images["base"], None, max_keypoints=96), f)


def test_disk_cap_keeps_the_strongest(images, feats):
    capped = disk_features(images["base"], None, max_keypoints=20)
    assert len(capped) == 20
    np.testing.assert_array_equal(capped.xy, feats["base"].xy[:20])


def test_disk_mask_drops_the_background(images):
    f = disk_features(images["half"], None, max_keypoints=200, mask_erode=4)
    assert len(f) > 0
    _, mask, _ = local._read_working(images["half"], local.MAX_SIDE, None)
    inside = local.erode_mask(mask, 4)
    cols, rows = np.rint(f.xy).astype(int).T
    assert np.all(inside[rows, cols] > 0)
    assert f.xy[:, 0].min() >= SIZE[1] // 2 + 4


def test_disk_fully_transparent_image_is_the_whole_image(images, tmp_path):
    """An empty mask means the whole image, as everywhere else (`images.decode_image`)."""
    rgba = np.asarray(Image.open(images["base"]).convert("RGBA")).copy()
    rgba[..., 3] = 0
    f = disk_features(_png(tmp_path / "empty.png", rgba), None)
    rgba[..., 3] = 255
    whole = disk_features(_png(tmp_path / "whole.png", rgba), None)
    assert len(f) > 0 and f.image_size == whole.image_size
    np.testing.assert_array_equal(f.xy, whole.xy)


def test_disk_coordinates_are_in_the_original_image(images, tmp_path):
    """At a smaller working size, keypoints are those of the working image mapped by local's
    pixel-centre rule: the same convention as the SIFT path."""
    gray, _, original = local._read_working(images["base"], 96, None)
    small = disk_features(images["base"], None, max_side=96)
    direct = disk_features(_png(tmp_path / "working.png", gray), None, max_side=96)
    scale = np.array([original[1] / gray.shape[1], original[0] / gray.shape[0]], np.float32)
    np.testing.assert_allclose(small.xy, (direct.xy + 0.5) * scale - 0.5, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(small.descriptors, direct.descriptors)
    assert small.image_size == SIZE


def test_disk_argument_errors(images):
    with pytest.raises(ValueError, match="max_keypoints"):
        disk_features(images["base"], None, max_keypoints=0)


# --------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("wrapped", [True, False], ids=["extractor-dict", "plain"])
def test_disk_weight_file_round_trip(images, feats, tmp_path, wrapped):
    state = _seeded("disk", learned.RANDOM_INIT_SEED).state_dict()
    path = tmp_path / "disk.pth"
    torch.save({"extractor": state} if wrapped else state, path)
    loaded = disk_features(images["base"], path, max_keypoints=96)
    assert _same(loaded, feats["base"])  # the file holds exactly weights=None's model


def test_disk_weight_file_is_used(images, feats, tmp_path):
    path = tmp_path / "other-seed.pth"
    torch.save(_seeded("disk", 7).state_dict(), path)
    assert not _same(disk_features(images["base"], path, max_keypoints=96), feats["base"])


def test_disk_bad_weight_files_name_the_path(images, tmp_path):
    state = _seeded("disk", 0).state_dict()
    renamed = {("x." + k if i == 0 else k): v for i, (k, v) in enumerate(state.items())}
    torch.save(renamed, bad_key := tmp_path / "bad_key.pth")
    first = next(iter(state))
    torch.save({**state, first: torch.zeros(3)}, bad_shape := tmp_path / "bad_shape.pth")
    (garbage := tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    torch.save({"extractor": [1, 2]}, not_dict := tmp_path / "not_dict.pth")
    for path, what in ((bad_key, "missing keys"), (bad_shape, "wrong shapes"),
                       (garbage, "unreadable"), (not_dict, "not a mapping")):
        with pytest.raises(LearnedWeightsError, match=what) as info:
            disk_features(images["base"], path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.pth"))):
        disk_features(images["base"], tmp_path / "absent.pth")


def test_lightglue_file_in_release_naming_loads(feats, tmp_path):
    glue = _seeded("lightglue", learned.RANDOM_INIT_SEED)
    release = _cvg_names(glue.state_dict())
    assert any(k.startswith("self_attn.0.") for k in release)  # the renaming is exercised
    torch.save(release, path := tmp_path / "disk_lightglue.pth")
    a, b = feats["base"], feats["rotated"]
    expected = lightglue_putative_matches(a, b, None, match_threshold=0.0)
    got = lightglue_putative_matches(a, b, path, match_threshold=0.0)
    assert len(expected[0]) > 0
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_lightglue_bad_weight_files_name_the_path(feats, tmp_path):
    a, b = feats["base"], feats["rotated"]
    torch.save(_seeded("disk", 0).state_dict(), disk_file := tmp_path / "disk.pth")
    release = _cvg_names(_seeded("lightglue", 0).state_dict())
    torch.save({**release, "extra.weight": torch.zeros(1)}, extra := tmp_path / "extra.pth")
    for path, what in ((disk_file, "missing keys"), (extra, "unexpected keys")):
        with pytest.raises(LearnedWeightsError, match=what) as info:
            lightglue_match_pair(a, b, path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        lightglue_match_pair(a, b, tmp_path / "absent.pth")
    # The file is checked even when the pair is too small to be matched.
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        lightglue_match_pair(_empty(), a, tmp_path / "absent.pth")


def test_check_weights(tmp_path):
    (present := tmp_path / "w.pth").write_bytes(b"x")
    assert check_weights(present, "disk") == present.resolve()
    with pytest.raises(FileNotFoundError, match=r"local\.weights=.*(?i:nothing is ever down)"):
        check_weights(tmp_path / "absent.pth", "disk")
    with pytest.raises(LearnedWeightsError, match=r"local\.matcher_weights is not set"):
        check_weights(None, "lightglue")
    with pytest.raises(ValueError, match="kind"):
        check_weights(present, "superpoint")


def test_kornia_is_imported_lazily(monkeypatch):
    tree = ast.parse(Path(learned.__file__).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module}
    assert "kornia" not in top
    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setitem(sys.modules, "kornia.feature", None)
    with pytest.raises(UserInputError, match=r"pip install 'jaguar-reid\[kornia\]'"):
        learned._kornia_feature()


# --------------------------------------------------------------------------- LightGlue


def _empty(size: tuple[int, int] = SIZE) -> LocalFeatures:
    return LocalFeatures(np.zeros((0, 2)), np.zeros((0, learned.DISK_DIM)), size)


def test_lightglue_pair_is_symmetric_and_deterministic(feats):
    a, b, c = feats["base"], feats["rotated"], feats["other"]
    for x, y in ((a, b), (a, c)):
        # Enough putative matches that the robust fit runs (no claim about its count).
        assert len(lightglue_putative_matches(x, y, None, match_threshold=0.0)[0]) >= 4
        count = lightglue_match_pair(x, y, None, **LOOSE)
        assert count == lightglue_match_pair(y, x, None, **LOOSE)
        assert count == lightglue_match_pair(x, y, None, **LOOSE)


def test_lightglue_inliers_in_the_callers_order(feats):
    a, b = feats["base"], feats["rotated"]
    xy_a, xy_b = lightglue_inlier_matches(a, b, None, **LOOSE)
    swapped_b, swapped_a = lightglue_inlier_matches(b, a, None, **LOOSE)
    assert len(xy_a) == len(xy_b) == lightglue_match_pair(a, b, None, **LOOSE)
    np.testing.assert_array_equal(xy_a, swapped_a)
    np.testing.assert_array_equal(xy_b, swapped_b)
    # Every end is one of its own image's keypoints.
    for ends, f in ((xy_a, a), (xy_b, b)):
        assert all(np.any(np.all(f.xy == p, axis=1)) for p in ends)


def test_lightglue_threshold_and_min_matches(feats):
    a, b = feats["base"], feats["rotated"]
    loose = lightglue_putative_matches(a, b, None, match_threshold=0.0)
    strict = lightglue_putative_matches(a, b, None, match_threshold=0.5)
    assert len(strict[0]) <= len(loose[0])
    assert len(set(loose[0].tolist())) == len(loose[0])  # one match per keypoint
    too_many = len(loose[0]) + 1
    assert lightglue_match_pair(a, b, None, min_matches=too_many, match_threshold=0.0) == 0


def test_lightglue_tiny_and_empty_feature_sets(feats):
    a = feats["base"]
    one = LocalFeatures(a.xy[:1], a.descriptors[:1], a.image_size)
    for x, y in ((_empty(), a), (a, _empty()), (_empty(), _empty()), (one, a), (one, one)):
        assert lightglue_match_pair(x, y, None, **LOOSE) == 0
        xy_x, xy_y = lightglue_inlier_matches(x, y, None, **LOOSE)
        assert xy_x.shape == xy_y.shape == (0, 2)
    assert len(lightglue_putative_matches(one, a, None)[0]) == 0


def test_lightglue_bad_inputs(feats):
    a = feats["base"]
    sift_like = LocalFeatures(a.xy, np.ones((len(a), 64), np.float32), a.image_size)
    with pytest.raises(ValueError, match="128-d"):
        lightglue_match_pair(sift_like, a, None, **LOOSE)
    outside = LocalFeatures(a.xy + 1000, a.descriptors, a.image_size)
    with pytest.raises(ValueError, match="inside"):
        lightglue_match_pair(outside, a, None, **LOOSE)
    with pytest.raises(ValueError, match="match_threshold"):
        lightglue_match_pair(a, a, None, match_threshold=1.5)
    with pytest.raises(ValueError, match="min_matches"):
        lightglue_match_pair(a, a, None, min_matches=2)
