"""Synthetic demo dataset: Kaggle layout, closed-set split, images, seeding, overwrite, patterns."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaguar_reid.data.demo import (
    generate_demo_dataset,
    main,
    make_coat_style,
    make_flank_pattern,
    make_identity_patterns,
    plan_dataset,
    render_image,
)

SMALL = {"n_ids": 5, "min_images": 6, "max_images": 10, "image_size": 64}


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def load_rgba(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGBA", path
        return np.asarray(img)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    summary = generate_demo_dataset(out, seed=0, **SMALL)
    return out, summary


def test_layout_and_csv_columns(small_demo):
    out, summary = small_demo
    for name in ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    header, train = read_rows(out / "train.csv")
    assert header == ["filename", "ground_truth"]
    assert [r[0] for r in train] == [f"train_{i:04d}.png" for i in range(1, len(train) + 1)]
    assert sorted(p.name for p in (out / "train" / "train").iterdir()) == [r[0] for r in train]
    header, labels = read_rows(out / "test_labels.csv")
    assert header == ["filename", "ground_truth"]
    test_files = [r[0] for r in labels]
    assert test_files == [f"test_{i:04d}.png" for i in range(1, len(labels) + 1)]
    assert sorted(p.name for p in (out / "test" / "test").iterdir()) == test_files
    assert summary == {"n_ids": 5, "n_train": len(train), "n_test": len(labels),
                       "n_pairs": len(labels) * (len(labels) - 1), "out_dir": str(out)}


def test_pairs_are_every_ordered_pair_query_major(small_demo):
    out, _ = small_demo
    _, labels = read_rows(out / "test_labels.csv")
    files = [r[0] for r in labels]
    header, pairs = read_rows(out / "test.csv")
    assert header == ["row_id", "query_image", "gallery_image"]
    expected = [(q, g) for q in files for g in files if q != g]
    assert len(pairs) == len(files) * (len(files) - 1)
    assert [int(r[0]) for r in pairs] == list(range(len(pairs)))
    assert [(r[1], r[2]) for r in pairs] == expected
    assert (pairs[0][1], pairs[0][2]) == ("test_0001.png", "test_0002.png")
    header, sub = read_rows(out / "sample_submission.csv")
    assert header == ["row_id", "similarity"]
    assert [r[0] for r in sub] == [r[0] for r in pairs]
    assert {r[1] for r in sub} == {"0.5"}


def test_closed_set_split(small_demo):
    out, _ = small_demo
    _, train = read_rows(out / "train.csv")
    _, test = read_rows(out / "test_labels.csv")
    train_ids = [r[1] for r in train]
    test_ids = {r[1] for r in test}
    assert set(train_ids) == {f"ind_{i:02d}" for i in range(5)}
    assert test_ids == set(train_ids)  # every identity is in test, and only known ones
    assert min(train_ids.count(i) for i in set(train_ids)) >= 4
    # Interleaved, not grouped by identity.
    changes = sum(a != b for a, b in zip(train_ids, train_ids[1:], strict=False))
    assert changes > len(set(train_ids))


def test_images_are_rgba_with_binary_plausible_masks(small_demo):
    out, _ = small_demo
    paths = sorted((out / "train" / "train").glob("*.png")) + sorted(
        (out / "test" / "test").glob("*.png"))
    for path in paths:
        arr = load_rgba(path)
        h, w = arr.shape[:2]
        assert w == 64 and 64 / 2.0 - 1 <= h <= 64 / 1.2 + 1, (path, arr.shape)
        alpha = arr[..., 3]
        assert set(np.unique(alpha).tolist()) <= {0, 255}, path
        assert 0.05 <= (alpha == 255).mean() <= 0.9, path
        assert arr[..., :3].std() > 5, path  # a photo, not a flat fill


def test_same_seed_same_data_other_seed_differs(small_demo, tmp_path):
    out, _ = small_demo
    again = tmp_path / "again"
    generate_demo_dataset(again, seed=0, **SMALL)
    for name in ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    for sub in ("train/train", "test/test"):
        for path in sorted((out / sub).glob("*.png")):
            assert np.array_equal(load_rgba(path), load_rgba(again / sub / path.name)), path
    other = tmp_path / "other"
    generate_demo_dataset(other, seed=1, **SMALL)
    assert (other / "train.csv").read_bytes() != (out / "train.csv").read_bytes()
    a = load_rgba(out / "train" / "train" / "train_0001.png")
    b = load_rgba(other / "train" / "train" / "train_0001.png")
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_existing_dataset_needs_overwrite(tmp_path):
    out = tmp_path / "demo"
    generate_demo_dataset(out, seed=0, n_ids=3, min_images=5, max_images=5, image_size=32)
    stale = out / "train" / "train" / "train_9999.png"
    stale.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=str(out)):
        generate_demo_dataset(out, seed=0, n_ids=3, min_images=5, max_images=5, image_size=32)
    summary = generate_demo_dataset(out, seed=1, n_ids=4, min_images=5, max_images=5,
                                    image_size=32, overwrite=True)
    assert summary["n_ids"] == 4 and not stale.exists()
    _, train = read_rows(out / "train.csv")
    assert len(train) == summary["n_train"] == 4 * 4


def test_cli_summary_and_refusal(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--ids", "3", "--min-images", "5", "--max-images", "6",
            "--image-size", "32", "--seed", "3"]
    main(args)
    line = capsys.readouterr().out.strip()
    assert "3 identities" in line and "train images" in line and str(out) in line
    with pytest.raises(SystemExit):
        main(args)
    assert str(out) in capsys.readouterr().err
    main([*args, "--overwrite"])


def test_invalid_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_images"):
        generate_demo_dataset(tmp_path / "x", min_images=4)
    with pytest.raises(ValueError, match="n_ids"):
        generate_demo_dataset(tmp_path / "x", n_ids=1)


def test_default_plan_sizes():
    for seed in range(5):
        train, test = plan_dataset(seed, 24, 6, 40, 0.2)
        assert 450 <= len(train) <= 550, (seed, len(train))
        assert len({i for i, _ in test}) == 24
        for ident in range(24):
            flanks = [f for i, f in train if i == ident]
            assert flanks.count("left") >= 2 and flanks.count("right") >= 2


def test_flank_patterns_differ_and_are_not_mirrors():
    patterns = make_identity_patterns(0, 3)
    left, right = patterns["left"], patterns["right"]
    assert left.shape == right.shape and left.dtype == np.float32
    assert left.min() >= 0.0 and left.max() <= 1.0
    assert 0.05 < (left > 0.5).mean() < 0.6  # marks cover part of the flank, not all of it
    for other in (right, right[:, ::-1], right[::-1, :]):
        assert abs(np.corrcoef(left.ravel(), other.ravel())[0, 1]) < 0.5
    assert np.array_equal(make_identity_patterns(0, 3)["left"], left)  # seeded
    assert not np.array_equal(make_identity_patterns(0, 4)["left"], left)


def test_flank_pattern_mark_count():
    rng = np.random.default_rng(0)
    style = make_coat_style(rng)
    pattern = make_flank_pattern(rng, style)
    from scipy import ndimage

    _, n_marks = ndimage.label(pattern > 0.5)
    assert 10 <= n_marks <= 40


def test_render_image_shape_and_mask():
    pattern = make_identity_patterns(0, 0)["left"]
    arr = render_image(np.random.default_rng(1), pattern, "left", 96, 64)
    assert arr.shape == (64, 96, 4) and arr.dtype == np.uint8
    assert set(np.unique(arr[..., 3]).tolist()) <= {0, 255}
    with pytest.raises(ValueError):
        render_image(np.random.default_rng(1), pattern, "front", 96, 64)
