"""A run's outputs are committed together: whatever fails while a submission is computed or
written, the files beside the submission stay the earlier run's, all of them; a training's
leaderboard row names exactly the folds whose scores it holds."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaguar_reid import commit, layout, submission
from jaguar_reid.config import load_config
from jaguar_reid.io_utils import atomic_write_json, run_main
from jaguar_reid.reporting.runs import run_row
from tests.helpers import IDS, TINY_ARGS, base_args, fake_experiment, make_data


def _outputs(exp: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(exp.glob("submission*"))}


@pytest.fixture
def submitted(tmp_path):
    """An experiment submitted once with local test labels: submission, embeddings, scores."""
    data = make_data(tmp_path / "data")
    labels = [f"test_{i:04d}.png,{IDS[i % 2]}\n" for i in range(1, 4)]
    (data / "test_labels.csv").write_text("filename,ground_truth\n" + "".join(labels))
    args = [*TINY_ARGS, *base_args(data, tmp_path, "exp=e", "submit.folds=0")]
    exp = fake_experiment(args)
    submission.main(args)
    before = _outputs(exp)
    assert set(before) == {layout.SUBMISSION, "submission.embeddings.npz",
                           "submission.scores.json"}
    return data, args, exp, before


def _fails(args, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_main(submission.main, args)
    return capsys.readouterr().err


def test_scoring_that_fails_writes_nothing(submitted, capsys):
    data, args, exp, before = submitted
    labels = (data / "test_labels.csv").read_text().splitlines()
    (data / "test_labels.csv").write_text("\n".join(labels[:-1]) + "\n")  # one image unlabelled
    assert "test_0003.png" in _fails([*args, "submit.retrieval=backbone"], capsys)
    assert _outputs(exp) == before


def test_a_full_disk_at_the_embeddings_keeps_every_earlier_file(submitted, monkeypatch,
                                                                capsys):
    _, args, exp, before = submitted
    real = np.savez

    def savez(handle, **arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", savez)
    err = _fails([*args, "submit.retrieval=backbone"], capsys)
    monkeypatch.setattr(np, "savez", real)
    assert "the disk is full" in err and "are all intact" in err
    assert _outputs(exp) == before
    assert not list(exp.glob(".*.tmp*"))


def test_a_run_without_labels_removes_the_earlier_runs_scores(submitted):
    data, args, exp, before = submitted
    (data / "test_labels.csv").unlink()
    submission.main([*args, "submit.retrieval=backbone"])
    after = _outputs(exp)
    assert "submission.scores.json" not in after
    assert after[layout.SUBMISSION] != before[layout.SUBMISSION]


def test_a_submission_killed_while_committing_is_completed_by_the_next(submitted, monkeypatch):
    _, args, exp, before = submitted
    real = os.replace

    def die_at_the_embeddings(src, dst):
        if str(dst).endswith(".npz"):
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(commit.os, "replace", die_at_the_embeddings)
    with pytest.raises(KeyboardInterrupt):
        submission.main([*args, "submit.retrieval=backbone"])
    monkeypatch.setattr(commit.os, "replace", real)
    half = _outputs(exp)
    assert half[layout.SUBMISSION] != before[layout.SUBMISSION]
    assert half["submission.embeddings.npz"] == before["submission.embeddings.npz"]
    submission.main([*args, "submit.retrieval=backbone"])  # completes, then submits again
    done = _outputs(exp)
    scores = json.loads(done["submission.scores.json"])
    with np.load(exp / "submission.embeddings.npz") as arrays:
        assert arrays["embeddings"].shape[0] == 3
    assert scores["rows"] == len(done[layout.SUBMISSION].splitlines()) - 1
    assert not list(exp.glob(".*commit.json"))


def test_a_trainings_row_names_the_folds_it_scored(tmp_path):
    args = [*TINY_ARGS, *base_args(make_data(tmp_path / "data"), tmp_path, "exp=e")]
    exp = fake_experiment(args, folds=(0, 1))  # another training finished fold 0 meanwhile
    atomic_write_json(exp / layout.OOF_SCORES, {
        "folds": [{"fold": 1, "map": 0.5, "pair_auc": 0.7}],
        "mean": {"map": 0.5, "pair_auc": 0.7}})
    row = run_row(load_config(args), "train")
    # not 0,1: fold 0 holds no score here
    assert (row["folds"], row["oof_map"]) == ("1", "0.500000")
