"""Preprocessing cache: decoded once, hit when unchanged, rebuilt for what changed."""

import os

import numpy as np
import pytest
from PIL import Image

import jaguar_reid.data.image_cache as cache
from jaguar_reid.config import load_config
from jaguar_reid.data.csv_tables import DataError
from jaguar_reid.data.images import load_cached, read_rgba


def make_rgba(path, value: int, size=(120, 80)):
    w, h = size
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = value
    rgba[20:60, 30:90, 3] = 255  # mask box: rows 20..59, cols 30..89 (40 x 60)
    rgba[20:60, 30:90, 1] = 200
    Image.fromarray(rgba, "RGBA").save(path)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = cache.process_image

    def spy(src, *args):
        calls.append(os.path.basename(src))
        return real(src, *args)

    monkeypatch.setattr(cache, "process_image", spy)
    return calls


def cfg_for(tmp_path, *extra):
    return load_config([f"output_dir={tmp_path / 'out'}", "cache.workers=1", "data.img_size=48",
                        "data.alpha=crop", "data.crop_margin=0", *extra])


def test_hit_miss_and_rebuild(tmp_path, counted):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img_{i}.png")
        make_rgba(paths[-1], 10 * i)
    cfg = cfg_for(tmp_path)
    files, records = cache.build_cache(paths, cfg)
    assert sorted(counted) == ["img_0.png", "img_1.png", "img_2.png"]
    assert [r["filename"] for r in records] == ["img_0.png", "img_1.png", "img_2.png"]

    counted.clear()
    again, _ = cache.build_cache(paths, cfg)
    assert counted == [] and again == files  # all hits

    make_rgba(paths[1], 99)  # a changed source: new bytes and mtime
    os.utime(paths[1], ns=(1, 1))
    rebuilt, _ = cache.build_cache(paths, cfg)
    assert counted == ["img_1.png"]
    assert read_rgba(rebuilt[1])[..., 0].max() == 99  # entries are named by content
    assert rebuilt[1] != files[1] and rebuilt[0] == files[0]

    counted.clear()
    other = cfg_for(tmp_path, "data.img_size=32")  # other settings: another folder
    files32, _ = cache.build_cache(paths, other)
    assert sorted(counted) == ["img_0.png", "img_1.png", "img_2.png"]
    assert files32[0].parent != files[0].parent


def test_crop_resize_and_record(tmp_path):
    make_rgba(tmp_path / "a.png", 50)
    cfg = cfg_for(tmp_path)  # cache size = 1.25 x 48 = 60 on the long side
    (file,), (record,) = cache.build_cache([tmp_path / "a.png"], cfg)
    cached = read_rgba(file)
    assert cached.shape[:2] == (40, 60)  # the 40 x 60 mask box, already under 60
    assert (cached[..., 3] == 255).all()
    assert record["width"] == 120 and record["height"] == 80 and record["mode"] == "RGBA"
    assert record["mask_fraction"] == pytest.approx(40 * 60 / (120 * 80))
    assert len(record["phash"]) == 16 and record["problems"] == []

    big = load_config([f"output_dir={tmp_path / 'o2'}", "cache.workers=1", "cache.size=30",
                       "data.alpha=rgb"])
    (file2,), _ = cache.build_cache([tmp_path / "a.png"], big)
    assert Image.open(file2).size == (30, 20)  # whole image, long side 30


def test_cached_loader_fills_background(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[1:3, 1:3, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    filled = np.asarray(load_cached(tmp_path / "c.png", "crop_fill", (1, 2, 3)))
    assert filled[0, 0].tolist() == [1, 2, 3] and filled[1, 1].tolist() == [200, 0, 0]
    kept = np.asarray(load_cached(tmp_path / "c.png", "crop"))
    assert kept[0, 0].tolist() == [200, 0, 0]


def test_bad_images_are_errors_naming_the_file(tmp_path):
    make_rgba(tmp_path / "ok.png", 1)
    (tmp_path / "junk.png").write_bytes(b"nope")
    Image.new("RGB", (3, 500)).save(tmp_path / "thin.png")
    cfg = cfg_for(tmp_path)
    with pytest.raises(DataError, match=r"2 image\(s\) cannot be used: .*junk\.png: unreadable"):
        cache.build_cache([tmp_path / "ok.png", tmp_path / "junk.png", tmp_path / "thin.png"],
                          cfg)
    _, records = cache.build_cache([tmp_path / "thin.png"], cfg, raise_on_error=False)
    assert records[0]["problems"] == ["absurd dimensions: 3x500 pixels, a side under 8"]
    assert records[0]["action"] == "error"


def test_parallel_build_matches_serial(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"p{i}.png")
        make_rgba(paths[-1], 30 * i)
    serial, rec1 = cache.build_cache(paths, cfg_for(tmp_path / "s"))
    parallel, rec2 = cache.build_cache(paths, cfg_for(tmp_path / "p", "cache.workers=2"))
    for a, b in zip(serial, parallel, strict=True):
        assert (read_rgba(a) == read_rgba(b)).all()
    assert [r["phash"] for r in rec1] == [r["phash"] for r in rec2]


def test_two_builds_at_once_keep_each_others_entries(tmp_path, monkeypatch):
    """A second process finishing its build while ours decodes: the index keeps both."""
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    make_rgba(ours, 10)
    make_rgba(theirs, 20)
    cfg = cfg_for(tmp_path)
    real = cache.process_image
    interleaved = []

    def process(src, *args):
        if not interleaved:  # the other process runs to the end in the middle of ours
            interleaved.append(True)
            cache.build_cache([theirs], cfg)
        return real(src, *args)

    monkeypatch.setattr(cache, "process_image", process)
    cache.build_cache([ours], cfg)
    calls = []
    monkeypatch.setattr(cache, "process_image", lambda src, *a: calls.append(src) or real(src, *a))
    cache.build_cache([ours, theirs], cfg)
    assert calls == []  # both were still in the index: nothing decoded again
