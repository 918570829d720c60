"""Data-check report from hand-made cache records: numbers, every problem listed, figures, files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaguar_reid import layout
from jaguar_reid.config import load_config
from jaguar_reid.data.audit import (
    plot_figures,
    problem_kind,
    quantiles,
    render_markdown,
    summarise,
    write_report,
)
from tests.helpers import REPO


def rec(filename, split="train", identity=None, width=400, height=300, mode="RGBA",
        mask_fraction=0.4, problems=(), action=""):
    return {"filename": filename, "split": split, "identity": identity,
            "path": None if "missing" in problems else f"/data/{split}/{filename}",
            "width": width, "height": height, "mode": mode, "mask_fraction": mask_fraction,
            "phash": None if width is None else "0123456789abcdef",
            "problems": list(problems), "action": action}


def dataset():
    """8 train images of 3 identities and 2 test images, with every problem kind once."""
    records = [
        rec("train_0001.png", identity="Marcela", width=400, height=300, mask_fraction=0.5),
        rec("train_0002.png", identity="Marcela", width=410, height=300, mask_fraction=0.45),
        rec("train_0003.png", identity="Marcela", width=None, height=None, mode=None,
            mask_fraction=None, problems=["unreadable: cannot identify image file"],
            action="error"),
        rec("train_0004.png", identity="Pixana", width=800, height=600, mask_fraction=0.3,
            problems=["truncated"], action="loaded with LOAD_TRUNCATED_IMAGES"),
        rec("train_0005.png", identity="Pixana", width=640, height=480, mode="L",
            mask_fraction=None, problems=["grayscale", "no alpha"],
            action="converted to RGB; whole image used (no mask)"),
        rec("train_0006.png", identity="Pixana", width=1, height=90000, mask_fraction=0.2,
            problems=["absurd dimensions: 1x90000"], action="error"),
        rec("train_0007.png", identity="Bagua", width=500, height=500, mode="I;16",
            mask_fraction=None, problems=["16-bit", "no alpha"], action="scaled to 8 bit"),
        rec("train_0008.png", identity="Pixana", width=300, height=200, mask_fraction=0.0,
            problems=["empty mask"], action="whole image used (no mask)"),
        rec("test_0001.png", split="test", width=200, height=100, mask_fraction=0.6),
        rec("test_0002.jpg", split="test", width=None, height=None, mode=None,
            mask_fraction=None, problems=["missing"], action="error"),
    ]
    # Train images 0 and 1 are near-duplicates of Marcela; train images 3 (Pixana) and 6 (Bagua)
    # are near-duplicates across identities.
    groups = np.array([0, 0, 1, 2, 3, 4, 5, 6])
    cross = [(3, 6, 4)]
    return records, groups, cross


def clean_dataset():
    records = [rec(f"train_{i}.png", identity=name) for i, name in enumerate("AABC")]
    records.append(rec("test_0.png", split="test"))
    return records, np.arange(4), []


def test_problem_kind():
    assert problem_kind("unreadable: cannot identify") == "unreadable"
    assert problem_kind("truncated") == "truncated"


def test_quantiles_empty_and_numpy():
    assert quantiles([]) == dict.fromkeys(["min", "p05", "median", "p95", "max"])
    vals = [3, 1, 2, 10]
    q = quantiles(vals)
    assert q["p05"] == pytest.approx(np.quantile(vals, 0.05))
    assert (q["min"], q["median"], q["max"]) == (1, 2.5, 10)


def test_summary_numbers():
    records, groups, cross = dataset()
    s = summarise(records, groups, cross)
    json.dumps(s)  # JSON-ready as it is

    assert s["images"] == {"total": 10, "train": 8, "test": 2}
    assert s["identities"] == 3
    assert s["identity_counts"] == [["Pixana", 4], ["Marcela", 3], ["Bagua", 1]]
    assert s["images_per_identity"] == {"min": 1, "median": 3.0, "mean": pytest.approx(8 / 3),
                                        "max": 4}

    widths = [400, 410, 800, 640, 1, 500, 300, 200]
    heights = [300, 300, 600, 480, 90000, 500, 200, 100]
    assert s["readable"] == 8
    for key, vals in (("width", widths), ("height", heights),
                      ("aspect_ratio", np.divide(widths, heights))):
        expected = np.quantile(vals, [0, 0.05, 0.5, 0.95, 1])
        got = [s[key][k] for k in ("min", "p05", "median", "p95", "max")]
        assert got == pytest.approx(expected), key

    fractions = [0.5, 0.45, 0.3, 0.2, 0.0, 0.6]
    assert s["with_mask"] == 6
    assert s["mask_coverage"]["median"] == pytest.approx(np.median(fractions))
    assert s["mask_coverage"]["p95"] == pytest.approx(np.quantile(fractions, 0.95))
    assert s["no_alpha"] == 2  # grayscale and 16-bit; unreadable and missing are not counted
    assert s["empty_mask"] == 1

    assert s["n_duplicate_groups"] == 1
    assert s["n_duplicate_images"] == 2
    assert s["duplicate_groups"][0]["filenames"] == ["train_0001.png", "train_0002.png"]
    assert s["duplicate_groups"][0]["identities"] == ["Marcela"]
    assert s["n_cross_identity_pairs"] == 1
    assert s["cross_identity_pairs"][0] == {
        "filename_a": "train_0004.png", "identity_a": "Pixana",
        "filename_b": "train_0007.png", "identity_b": "Bagua", "distance": 4}

    assert s["n_problem_images"] == 7
    assert len(s["problems"]) == 9
    assert s["problem_counts"] == {
        "no alpha": 2, "16-bit": 1, "absurd dimensions": 1, "empty mask": 1,
        "grayscale": 1, "missing": 1, "truncated": 1, "unreadable": 1}
    assert {"filename": "test_0002.jpg", "split": "test", "problem": "missing",
            "action": "error"} in s["problems"]


def test_summary_rejects_mismatched_groups():
    records, groups, cross = dataset()
    with pytest.raises(ValueError, match="one id per train record"):
        summarise(records, groups[:-1], cross)
    with pytest.raises(ValueError, match="outside"):
        summarise(records, groups, [(0, 8, 3)])


def test_markdown_lists_every_problem_and_duplicates():
    records, groups, cross = dataset()
    s = summarise(records, groups, cross)
    md = render_markdown(s, {"identity_counts": "identity_counts.png"})
    rows = md.splitlines()
    for r in records:
        for problem in r["problems"]:
            # the problem, its file and its action on one table row
            assert any(r["filename"] in line and problem in line and r["action"] in line
                       for line in rows), (r["filename"], problem)
    assert "No problems found" not in md
    near_dup = md[md.index("## Near-duplicates"):]
    assert "train_0001.png, train_0002.png" in near_dup
    assert any("train_0004.png" in line and "train_0007.png" in line and "Bagua" in line
               for line in near_dup.splitlines())
    assert "![identity counts](identity_counts.png)" in md
    assert "| Pixana | 4 |" in md


def test_markdown_names_missing_action_and_escapes_pipes():
    records = [rec("a|b.png", identity="X", problems=["truncated"], action="")]
    md = render_markdown(summarise(records, np.zeros(1, dtype=int), []), {})
    assert "a\\|b.png" in md
    assert "(no action recorded)" in md


def test_clean_dataset_says_no_problems():
    s = summarise(*clean_dataset())
    md = render_markdown(s, {})
    assert s["problems"] == [] and s["problem_counts"] == {}
    assert "No problems found" in md
    assert "No near-duplicate groups" in md
    assert "No near-duplicates across identities" in md


def test_plot_figures_writes_pngs(tmp_path):
    records, groups, cross = dataset()
    s = summarise(records, groups, cross)
    figures = plot_figures(s, records, tmp_path)
    assert set(figures) == {"identity_counts", "image_sizes", "aspect_ratios", "mask_coverage"}
    for filename in figures.values():
        with Image.open(tmp_path / filename) as im:
            assert im.format == "PNG"
            assert im.size[0] > 0 and im.size[1] > 0


def test_plot_figures_without_masks_or_images(tmp_path):
    records = [rec("a.jpg", identity="X", mode="RGB", mask_fraction=None, problems=["no alpha"],
                   action="whole image used (no mask)"),
               rec("b.jpg", identity="X", width=None, height=None, mask_fraction=None,
                   problems=["missing"], action="error")]
    s = summarise(records, np.zeros(2, dtype=int), [])
    assert s["mask_coverage"]["median"] is None and s["with_mask"] == 0
    figures = plot_figures(s, records, tmp_path)
    for filename in figures.values():
        assert Image.open(tmp_path / filename).size[0] > 0


def test_write_report(tmp_path, capsys):
    records, groups, cross = dataset()
    out = tmp_path / "reports" / "datacheck"
    path = write_report(records, groups, cross, out)
    assert path == out / "report.md"
    md = path.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cross_identity_pairs"] == 1
    assert summary["identity_counts"][0] == ["Pixana", 4]
    for link in ("identity_counts.png", "image_sizes.png", "aspect_ratios.png",
                 "mask_coverage.png"):
        assert f"]({link})" in md
        assert (out / link).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    assert "replacing" not in capsys.readouterr().out

    # A second run into the same folder replaces the report, and says so.
    write_report(*clean_dataset(), out)
    assert f"replacing {out / 'report.md'}" in capsys.readouterr().out
    assert "No problems found" in (out / "report.md").read_text()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_import_does_not_load_pyplot():
    # A fresh interpreter: this test session may have imported pyplot already.
    code = "import sys, jaguar_reid.data.audit; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_command_line_reports_every_bad_image(tmp_path: Path):
    """Real files: a good RGBA, a truncated PNG, garbage bytes, a grayscale, a 16-bit, an
    empty mask, an absurd size and a missing file, plus a resized copy (a near-duplicate)."""
    import pandas as pd
    from PIL import Image

    from jaguar_reid.data.audit import main

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    # a smooth picture: pHash keys on low frequencies, which pure noise does not have
    yy, xx = np.mgrid[0:40, 0:60]
    rgba = np.zeros((40, 60, 4), np.uint8)
    for c, (fy, fx) in enumerate([(0.15, 0.05), (0.05, 0.2), (0.1, 0.1)]):
        rgba[..., c] = (127 + 120 * np.sin(fy * yy + fx * xx + c)).astype(np.uint8)
    rgba[10:30, 10:50, 3] = 255
    Image.fromarray(rgba, "RGBA").save(data / "train" / "good.png")
    # Resized as RGB and mask apart: Pillow's RGBA resize would blacken the hidden background.
    copy = np.dstack([np.asarray(Image.fromarray(rgba[..., :3]).resize((90, 60))),
                      np.asarray(Image.fromarray(rgba[..., 3]).resize((90, 60),
                                                                      Image.Resampling.NEAREST))])
    Image.fromarray(copy, "RGBA").save(data / "train" / "copy.png")
    full = (data / "train" / "good.png").read_bytes()
    (data / "train" / "cut.png").write_bytes(full[: len(full) // 2])
    (data / "train" / "junk.png").write_bytes(b"not an image")
    Image.fromarray(rgba[..., 0], "L").save(data / "train" / "grey.png")
    Image.fromarray(rgba[..., 0].astype(np.uint16) * 257).save(data / "train" / "deep.png")
    empty = rgba.copy()
    empty[..., 3] = 0
    Image.fromarray(empty, "RGBA").save(data / "train" / "empty.png")
    Image.new("RGB", (2, 400)).save(data / "train" / "thin.png")
    Image.fromarray(rgba, "RGBA").save(data / "train" / "test_a.png")
    names = ["good.png", "copy.png", "cut.png", "junk.png", "grey.png", "deep.png",
             "empty.png", "thin.png", "gone.png"]
    pd.DataFrame({"filename": names, "ground_truth": ["a", "a", "b", "b", "c", "c", "d", "d",
                                                     "e"]}).to_csv(data / "train.csv",
                                                                   index=False)
    pd.DataFrame({"row_id": [0, 1], "query_image": ["test_a.png", "good.png"],
                  "gallery_image": ["good.png", "test_a.png"]}).to_csv(data / "test.csv",
                                                                       index=False)
    args = [f"data.dir={data}", f"output_dir={tmp_path / 'out'}", "data.alpha=crop",
            "cache.workers=1"]
    main(args)
    report_dir = layout.datacheck_dir(load_config(args))
    report = (report_dir / "report.md").read_text()
    summary = json.loads((report_dir / "summary.json").read_text())
    kinds = summary["problem_counts"]
    for kind in ("truncated", "unreadable", "grayscale", "16-bit", "empty mask",
                 "absurd dimensions", "missing", "no alpha"):
        assert kinds.get(kind, 0) >= 1, kind
    for name in ("cut.png", "junk.png", "grey.png", "deep.png", "empty.png", "thin.png",
                 "gone.png"):
        assert name in report
    groups = [set(g["filenames"]) for g in summary["duplicate_groups"]]
    assert {"good.png", "copy.png"} in groups


def test_paths_accepts_str(tmp_path: Path):
    records, groups, cross = clean_dataset()
    path = write_report(records, groups, cross, str(tmp_path / "r"))
    assert path.exists()


def test_command_line_reports_a_turned_photo_and_an_empty_mask(tmp_path: Path):
    """A JPEG stored sideways (EXIF orientation 6) and an RGBA image with no pixel inside its
    mask are findings, each with what every reader does about it."""
    import pandas as pd

    from jaguar_reid.data.audit import main

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(
        data / "train" / "turned.jpg", exif=exif)
    empty = rng.integers(0, 255, (30, 30, 4), np.uint8)
    empty[..., 3] = 0
    Image.fromarray(empty, "RGBA").save(data / "train" / "empty.png")
    pd.DataFrame({"filename": ["turned.jpg", "empty.png"],
                  "ground_truth": ["a", "b"]}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"row_id": [0], "query_image": ["turned.jpg"],
                  "gallery_image": ["empty.png"]}).to_csv(data / "test.csv", index=False)
    args = [f"data.dir={data}", f"output_dir={tmp_path / 'out'}", "cache.workers=1"]
    main(args)
    report_dir = layout.datacheck_dir(load_config(args))
    summary = json.loads((report_dir / "summary.json").read_text())
    found = {(p["filename"], p["problem"], p["action"]) for p in summary["problems"]}
    assert ("turned.jpg", "EXIF orientation: 6", "EXIF orientation 6 applied; whole image used"
            ) in found
    assert ("empty.png", "empty mask", "whole image used") in found
    # Sizes as seen: the turned photo (stored 60 x 40) stands upright.
    assert (summary["width"]["max"], summary["height"]["max"]) == (40, 60)
    assert "EXIF orientation 6 applied" in (report_dir / "report.md").read_text()
