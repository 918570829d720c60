"""tools/hold_out.py: a data folder's copy with a seeded share of identities out of train.csv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO

TOOL = REPO / "tools" / "hold_out.py"


def make_data(root: Path, identities: int = 10, per_identity: int = 3) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = [(f"t{i}_{j}.png", f"id_{i:02d}")
            for i in range(identities) for j in range(per_identity)]
    for name, _ in rows:
        (root / "train" / name).write_bytes(b"x")
    (root / "test" / "q.png").write_bytes(b"q")
    pd.DataFrame(rows, columns=["filename", "ground_truth"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"filename": ["q.png"]}).to_csv(root / "test.csv", index=False)
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def test_holds_out_the_seeded_share_and_copies_the_rest(tmp_path):
    src, dst = make_data(tmp_path / "src"), tmp_path / "dst"
    done = run(str(src), str(dst), "--share", "0.3", "--seed", "1")
    assert done.returncode == 0, done.stderr
    held = (dst / "heldout.txt").read_text().split()
    assert len(held) == 3 and held == sorted(held)
    train = pd.read_csv(dst / "train.csv")
    assert set(train["ground_truth"]) == {f"id_{i:02d}" for i in range(10)} - set(held)
    assert len(train) == 7 * 3
    assert sorted(p.name for p in (dst / "train").iterdir()) == sorted(
        p.name for p in (src / "train").iterdir())
    assert (dst / "test.csv").read_text() == (src / "test.csv").read_text()
    assert not (dst / "test_labels.csv").exists()
    again = tmp_path / "again"
    assert run(str(src), str(again), "--share", "0.3", "--seed", "1").returncode == 0
    assert (again / "heldout.txt").read_text().split() == held
    other = tmp_path / "other"
    assert run(str(src), str(other), "--share", "0.3", "--seed", "2").returncode == 0
    assert (other / "heldout.txt").read_text().split() != held


@pytest.mark.parametrize("share", ["0", "1", "1.5"])
def test_a_share_outside_zero_and_one_is_one_line(tmp_path, share):
    src = make_data(tmp_path / "src")
    done = run(str(src), str(tmp_path / "dst"), "--share", share)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--share {float(share)}" in done.stderr
    assert not (tmp_path / "dst").exists()


def test_refuses_a_missing_train_csv_and_writing_over_the_source(tmp_path):
    src = make_data(tmp_path / "src")
    missing = run(str(tmp_path / "nowhere"), str(tmp_path / "dst"))
    assert missing.returncode == 2 and "train.csv: not found" in missing.stderr
    same = run(str(src), str(src))
    assert same.returncode == 2 and "must not be the data folder" in same.stderr
    assert len(pd.read_csv(src / "train.csv")) == 30
