"""Local verification in the pipeline: feature and pair caches, the shortlist's inlier matrix."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaguar_reid.config import load_config
from jaguar_reid.retrieval import local, verify
from tests.helpers import coat_png, spots, warp


@pytest.fixture
def coats(tmp_path):
    """Two coats, each with a warped second photo: images 0, 1 one animal, 2, 3 another."""
    a, b = spots(1), spots(2)
    arrays = [a, warp(a), b, warp(b, angle_deg=-11.0, scale=1.05)]
    paths = [coat_png(tmp_path / f"img{i}.png", arr) for i, arr in enumerate(arrays)]
    cfg = load_config([f"output_dir={tmp_path / 'out'}", "local.top_b=1",
                       "local.max_keypoints=256"])
    return cfg, paths


def test_shortlist_inliers_are_symmetric_and_find_the_same_coat(coats):
    cfg, paths = coats
    sim = np.array([[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.3, 0.2],
                    [0.2, 0.3, 1.0, 0.8], [0.1, 0.2, 0.8, 1.0]])
    inliers, verified = verify.verify_shortlist(cfg, paths, sim)
    # top 1 of each image: pairs (0, 1) and (2, 3) only, both orders filled
    assert verified.sum() == 4 and verified[0, 1] and verified[1, 0] and verified[2, 3]
    np.testing.assert_array_equal(inliers, inliers.T)
    assert inliers[0, 1] > 20 and inliers[2, 3] > 20 and inliers[0, 2] == 0
    want = local.match_pair(local.image_features(paths[0], 512, 256),
                            local.image_features(paths[1], 512, 256))
    assert inliers[0, 1] == want


def test_caches_are_reused_and_a_changed_image_is_read_again(coats, monkeypatch):
    cfg, paths = coats
    sim = np.eye(4) + 0.5
    first = verify.verify_shortlist(cfg, paths, sim)
    calls = {"features": 0, "match": 0}
    real_features, real_match = local.image_features, local.match_pair

    def count_features(*args, **kwargs):
        calls["features"] += 1
        return real_features(*args, **kwargs)

    def count_match(*args, **kwargs):
        calls["match"] += 1
        return real_match(*args, **kwargs)

    monkeypatch.setattr(local, "image_features", count_features)
    monkeypatch.setattr(local, "match_pair", count_match)
    again = verify.verify_shortlist(cfg, paths, sim)  # a new run: everything from disk
    assert calls == {"features": 0, "match": 0}
    for got, want in zip(again, first, strict=True):
        np.testing.assert_array_equal(got, want)
    stat = paths[3].stat()
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes
    verify.verify_shortlist(cfg, paths, sim)
    assert calls == {"features": 0, "match": 0}  # known by content, not by mtime
    stat = paths[3].stat()
    coat_png(paths[3], warp(spots(3)))  # image 3 rewritten in place, its mtime restored
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verify.verify_shortlist(cfg, paths, sim)
    assert calls["features"] == 1 and calls["match"] >= 1
    # other settings: other cache files, nothing reused
    other = load_config([f"output_dir={cfg.output_dir}", "local.top_b=1",
                         "local.max_keypoints=128"])
    verify.verify_shortlist(other, paths, sim)
    assert calls["features"] == 5


def test_fused_similarity_clips_and_applies_the_calibration():
    from jaguar_reid.retrieval.fusion import fit_fusion

    rng = np.random.default_rng(0)
    same = rng.random(400) < 0.2
    sim = np.clip(0.5 + 0.2 * same + 0.1 * rng.normal(size=400), 0, 1)
    inl = np.where(same, rng.integers(10, 40, 400), rng.integers(0, 6, 400))
    ver = np.ones(400, dtype=bool)
    model = fit_fusion(sim, inl, ver, same)
    got = verify.fused_similarity(model, sim + 1e-9, inl, ver)  # rounding above 1 is clipped
    np.testing.assert_allclose(got, model.predict(np.clip(sim + 1e-9, 0, 1), inl, ver))


def test_learned_path_needs_local_files_and_caches_by_their_content(coats, tmp_path):
    pytest.importorskip("kornia")
    import torch

    from jaguar_reid.retrieval import learned
    from jaguar_reid.retrieval.learned import LearnedWeightsError

    cfg, paths = coats
    sim = np.eye(4) + 0.5
    disk = load_config([f"output_dir={cfg.output_dir}", "local.top_b=1",
                        "local.max_keypoints=64", "local.max_side=160", "local.extractor=disk",
                        "local.matcher=lightglue"])
    with pytest.raises(LearnedWeightsError, match="local.weights"):
        verify.verify_shortlist(disk, paths, sim)
    files = {}
    for kind in ("disk", "lightglue"):  # random weights: the plumbing, not the accuracy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            files[kind] = tmp_path / f"{kind}.pth"
            torch.save(learned._new_model(kind).state_dict(), files[kind])
    disk.local.weights, disk.local.matcher_weights = str(files["disk"]), str(files["lightglue"])
    inliers, verified = verify.verify_shortlist(disk, paths, sim)
    np.testing.assert_array_equal(inliers, inliers.T)
    assert verified.sum() >= 4
    digest = verify.feature_settings(disk)["weights"]
    renamed = tmp_path / "copy.pth"
    renamed.write_bytes(files["disk"].read_bytes())
    disk.local.weights = str(renamed)
    assert verify.feature_settings(disk)["weights"] == digest  # known by content, not name
    again = verify.verify_shortlist(disk, paths, sim)  # the same cache: the same counts
    np.testing.assert_array_equal(again[0], inliers)
    assert verify.feature_settings(cfg).get("weights") is None  # SIFT: no weight file
