"""Every cache is keyed by what decides its content, never by a file's name or path: two data
folders with the same file names and other pixels (the competition's two rounds) never share
an entry, and a file rewritten in place, same size, its mtime put back (`cp -p`, `os.utime`),
is never served stale. One test per cache: preprocessing, floor, local features and pair
counts, teacher embeddings."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jaguar_reid.config import load_config
from jaguar_reid.data import source_ids
from jaguar_reid.data.image_cache import build_cache
from jaguar_reid.data.images import read_rgba
from jaguar_reid.retrieval import floor as floor_mod
from jaguar_reid.retrieval import local, teacher, verify
from tests.helpers import spots, warp

NAMES = ("x.png", "y.png")


def write_png(path: Path, array: np.ndarray) -> Path:
    """Uncompressed: the file's size depends on the picture's size alone, so a rewrite with
    other pixels keeps it (what a size + mtime key cannot see)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=0)
    return path


def rewrite_in_place(path: Path, array: np.ndarray) -> None:
    """New pixels under the same name, same size, modification time put back."""
    before = path.stat()
    time.sleep(0.02)  # past the clock tick of the first write, as any real rewrite is
    write_png(path.with_name("new.tmp.png"), array)
    shutil.copyfile(path.with_name("new.tmp.png"), path)  # into the same inode, as cp does
    path.with_name("new.tmp.png").unlink()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)


def round_folder(root: Path, pictures: list[np.ndarray]) -> Path:
    """A data folder holding NAMES (the same in every round) with these pictures."""
    for name, picture in zip(NAMES, pictures, strict=True):
        write_png(root / "train" / name, picture)
    (root / "train.csv").write_text("filename,ground_truth\n" +
                                    "".join(f"{n},a\n" for n in NAMES))
    (root / "test.csv").write_text("row_id,query_image,gallery_image\n0,x.png,y.png\n"
                                   "1,y.png,x.png\n")
    return root


@pytest.fixture(params=["fresh", "aged"])
def shortcut(request, monkeypatch) -> str:
    """fresh: files as just written (hashed every time, being racily clean); aged: as if
    written long ago, so a remembered digest is trusted while the file's stamp holds."""
    if request.param == "aged":
        monkeypatch.setattr(source_ids, "RACY_NS", -10**15)
    return request.param


def rounds(tmp_path: Path) -> tuple[Path, Path]:
    one = round_folder(tmp_path / "round1", [spots(1), warp(spots(1))])
    two = round_folder(tmp_path / "round2", [spots(2), warp(spots(3))])
    return one, two


def cfg_for(data: Path, out: Path, *extra: str):
    return load_config([f"data.dir={data}", f"output_dir={out}", "cache.workers=1", *extra])


# --------------------------------------------------------------------------- source ids


def test_a_remembered_digest_is_used_only_while_the_stamp_vouches(tmp_path, monkeypatch):
    path = write_png(tmp_path / "a.png", spots(1))
    cfg = cfg_for(tmp_path, tmp_path / "out")
    hashed = []
    real = source_ids.file_sha256
    monkeypatch.setattr(source_ids, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = source_ids.content_ids(cfg, [path])
    source_ids.content_ids(cfg, [path])
    assert len(hashed) == 2  # just written: racily clean, so hashed again
    monkeypatch.setattr(source_ids, "RACY_NS", -10**15)
    hashed.clear()
    assert source_ids.content_ids(cfg, [path]) == first and hashed == []  # remembered
    rewrite_in_place(path, spots(2))  # same size, same mtime, same inode: ctime moved
    assert source_ids.content_ids(cfg, [path]) != first and len(hashed) == 1
    assert source_ids.content_ids(cfg, [tmp_path / "gone.png"]) == [None]


def test_a_memo_that_cannot_be_written_costs_hashing_only(tmp_path, monkeypatch, capsys):
    """A read-only output folder (identifying from a read-only disk): the digests are right,
    computed each time, and one note says why."""
    path = write_png(tmp_path / "a.png", spots(1))
    cfg = cfg_for(tmp_path, tmp_path / "out")
    expected = source_ids.file_sha256(path)

    def refused(*_a, **_k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(source_ids, "atomic_write_text", refused)
    monkeypatch.setattr(source_ids, "RACY_NS", -10**15)
    assert source_ids.content_ids(cfg, [path]) == [expected]
    assert source_ids.content_ids(cfg, [path]) == [expected]
    said = capsys.readouterr()
    assert "cannot remember the files' digests there (Read-only file system)" in said.out + said.err


# --------------------------------------------------------------------------- the caches


def test_preprocessing_cache(tmp_path, shortcut):
    one, two = rounds(tmp_path)
    out = tmp_path / "out"
    cached_one, _ = build_cache([one / "train" / n for n in NAMES], cfg_for(one, out))
    cached_two, _ = build_cache([two / "train" / n for n in NAMES], cfg_for(two, out))
    assert not set(cached_one) & set(cached_two)
    for round_dir, cached in ((one, cached_one), (two, cached_two)):
        for name, file in zip(NAMES, cached, strict=True):
            np.testing.assert_array_equal(read_rgba(file), read_rgba(round_dir / "train" / name))
    rewrite_in_place(one / "train" / "x.png", spots(4))
    again, _ = build_cache([one / "train" / "x.png"], cfg_for(one, out))
    np.testing.assert_array_equal(read_rgba(again[0]), read_rgba(one / "train" / "x.png"))


def tiny_floor(cfg):
    """A stand-in backbone, fast and pixel-exact: the mean of each channel in 4 x 4 cells."""
    def transform(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((32, 32)), np.float32)).permute(2, 0, 1)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    model.num_features = 48
    return model, transform


def test_floor_embeddings(tmp_path, shortcut, monkeypatch):
    monkeypatch.setattr(floor_mod, "floor_model", tiny_floor)
    monkeypatch.setattr(floor_mod, "TRANSFORMS", ("timm",))  # the stand-in's own transform
    one, two = rounds(tmp_path)
    out = tmp_path / "out"

    def floor(data: Path) -> np.ndarray:
        cfg = cfg_for(data, out, "model.backbone=resnet18")
        return floor_mod.FloorEmbedder(cfg, "cpu").embed(list(NAMES), data / "train.csv")

    def direct(data: Path) -> np.ndarray:
        return floor_mod.embed_plain(*tiny_floor(None), [data / "train" / n for n in NAMES],
                                     "cpu", 2)
    first = floor(one)
    np.testing.assert_allclose(floor(two), direct(two), atol=1e-6)
    np.testing.assert_allclose(first, direct(one), atol=1e-6)
    rewrite_in_place(one / "train" / "x.png", spots(4))
    np.testing.assert_allclose(floor(one), direct(one), atol=1e-6)
    assert not np.allclose(floor(one)[0], first[0])


def test_local_features_and_pair_counts(tmp_path, shortcut):
    # Round 1: x and y one coat (many inliers); round 2: two coats (few).
    one, two = rounds(tmp_path)
    out = tmp_path / "out"
    sim = np.array([[1.0, 0.9], [0.9, 1.0]])

    def inliers(data: Path) -> int:
        cfg = cfg_for(data, out, "local.top_b=1", "local.max_keypoints=256")
        return int(verify.verify_shortlist(cfg, [data / "train" / n for n in NAMES], sim)[0][0, 1])

    def direct(data: Path) -> int:
        a, b = (local.image_features(data / "train" / n, 512, 256) for n in NAMES)
        return local.match_pair(a, b)
    assert inliers(one) == direct(one) > 20
    assert inliers(two) == direct(two) < 10  # not round 1's count for the same names
    rewrite_in_place(one / "train" / "y.png", spots(5))
    assert inliers(one) == direct(one) < 10
    cfg = cfg_for(one, out, "local.max_keypoints=256")
    got = verify.features_for(cfg, [one / "train" / "y.png"])[0]
    np.testing.assert_array_equal(got.xy, local.image_features(one / "train" / "y.png", 512,
                                                               256).xy)


def test_teacher_embeddings_key(tmp_path, shortcut):
    one, two = rounds(tmp_path)
    out = tmp_path / "out"

    def key(data: Path) -> str:
        cfg = cfg_for(data, out, "exp=student", "train.teacher=teach")
        return teacher.cache_key(cfg, list(NAMES), ["x.png"])
    first = key(one)
    assert key(two) != first  # the same names in another round
    assert key(one) == first
    rewrite_in_place(one / "train" / "x.png", spots(4))
    assert key(one) != first


def test_tuning_views_key(tmp_path, shortcut):
    """Saved out-of-fold view embeddings stand for the weights and the images by content."""
    from jaguar_reid.retrieval.embedding import fold_config, views_digest
    from tests.helpers import fake_experiment

    one, two = rounds(tmp_path)

    def key(data: Path) -> str:
        cfg = cfg_for(data, tmp_path / "out", "exp=v", "folds.n_folds=2")
        fake_experiment(cfg, folds=(0,), weights=b"weights: only their bytes are read")
        return views_digest(cfg, *fold_config(cfg, "v", 0))

    first = key(one)
    assert key(one) == first and key(two) != first  # same names, other pixels
    rewrite_in_place(one / "train" / NAMES[0], spots(5))
    assert key(one) != first
