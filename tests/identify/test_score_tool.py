"""tools/score_identify.py: the held-out check's rates, against counts made by hand."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from tests.helpers import REPO

TOOL = REPO / "tools" / "score_identify.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def write(tmp_path, rows, labels):
    columns = ["photo", "verdict", "identity", "identity_1", "error"]
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "identify.csv", index=False)
    pd.DataFrame(labels, columns=["filename", "ground_truth"]).to_csv(tmp_path / "labels.csv",
                                                                     index=False)
    pd.DataFrame({"filename": ["g1.jpg", "g2.jpg"], "ground_truth": ["a", "b"]}).to_csv(
        tmp_path / "train.csv", index=False)
    return [str(tmp_path / "identify.csv"), "--labels", str(tmp_path / "labels.csv"),
            "--known", str(tmp_path / "train.csv")]


def test_rates_match_hand_counts(tmp_path):
    # known photos p1..p4 (a, a, b, b), new photos p5..p7 (c), one unreadable photo p8 (c).
    rows = [("x/p1.jpg", "known", "a", "a", ""),   # named right
            ("x/p2.jpg", "known", "b", "b", ""),   # named wrong (top-1 wrong too)
            ("x/p3.jpg", "new", "", "b", ""),      # called new, top-1 right
            ("x/p4.jpg", "known", "b", "b", ""),   # named right
            ("x/p5.jpg", "new", "", "a", ""),      # new, called new
            ("x/p6.jpg", "known", "a", "a", ""),   # new, given a known name
            ("x/p7.jpg", "new", "", "b", ""),      # new, called new
            ("x/p8.jpg", "", "", "", "cannot read")]
    labels = [(f"p{i}.jpg", who) for i, who in enumerate("aabbcccc", start=1)]
    done = run(*write(tmp_path, rows, labels))
    assert done.returncode == 0, done.stderr
    expected = {"known individual: top candidate right (no threshold)": "75.0%",
                "known individual: named right": "50.0%",
                "known individual: named wrong": "25.0%",
                "known individual: called new": "25.0%",
                "new individual: called new": "66.7%",
                "new individual: given a known name": "33.3%"}
    for name, value in expected.items():
        assert f"| {name} | {value} |" in done.stdout
    assert "4 photos of known individuals, 3 of new ones. 1 photos not read." in done.stdout


def test_a_photo_without_a_label_is_one_line(tmp_path):
    rows = [("x/p1.jpg", "known", "a", "a", ""), ("x/p9.jpg", "new", "", "a", "")]
    done = run(*write(tmp_path, rows, [("p1.jpg", "a")]))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "labels.csv: no row for p9.jpg (1 photos in all)" in done.stderr
