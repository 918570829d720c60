"""Pseudo-labels chosen out of fold, a round trained on them from the first experiment's
weights, and a student distilled from the ensemble: each command on a tiny closed-fold
experiment, with the numbers checked against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from jaguar_reid import layout
from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.data.csv_tables import DataError, pair_image_names, read_test_csv
from jaguar_reid.retrieval.votes import choose_threshold, precision_coverage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def closed(demo_dir, tmp_path_factory):
    """A tiny experiment on closed folds (folds 0 and 1 of 3), trained once for this file."""
    from jaguar_reid import train
    from tests.helpers import TINY_ARGS

    tmp = tmp_path_factory.mktemp("pseudo")
    args = [*TINY_ARGS, f"data.dir={demo_dir}", f"output_dir={tmp / 'out'}",
            f"folds.file={tmp / 'folds.csv'}", "folds.n_folds=3", "folds.strategy=closed",
            "exp=base"]
    train.main([*args, "fold=0..1"])
    return args, tmp


def _pseudo(args, *extra):
    from jaguar_reid import pseudo

    return pseudo.run(load_config([*args, *extra]))


def test_pseudo_labels_keep_what_the_out_of_fold_curve_allows(closed, capsys):
    args, tmp = closed
    result = _pseudo(args, "pseudo.min_precision=0.01")
    out = capsys.readouterr().out
    assert "| precision at least | threshold | OOF coverage | test images kept |" in out
    assert "test_labels.csv: the kept pseudo-labels are" in out
    kept = pd.read_csv(result["file"])
    curve = pd.read_csv(layout.work_dir(load_config(args)) / layout.PSEUDO_CURVE)
    # The curve file is the out-of-fold material's: recompute it from the saved view
    # embeddings, one fold at a time, with plain prototypes and a plain softmax.
    confidence, correct = [], []
    for fold in result["folds"]:
        with np.load(layout.oof_views_path(load_config(args), "base", fold)) as d:
            val, train = d["val.orig"].astype(np.float64), d["train.orig"].astype(np.float64)
            val_labels, train_labels = d["val_labels"], d["train_labels"]
        classes = sorted(set(train_labels))
        protos = np.stack([train[train_labels == c].sum(0) for c in classes])
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        logits = 30.0 * val @ protos.T
        post = np.exp(logits - logits.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        top = np.sort(post, axis=1)
        confidence += list(top[:, -1] - top[:, -2])  # one experiment: agreement is 1
        correct += list(np.array(classes)[post.argmax(1)] == val_labels)
    ref = precision_coverage(np.array(confidence), np.array(correct))
    # float32 embeddings: sums differ in the last bits across numpy versions
    assert np.allclose(curve["threshold"], ref.thresholds, atol=1e-6)
    assert np.allclose(curve["precision"], ref.precision)
    assert result["threshold"] == pytest.approx(choose_threshold(ref, 0.01), abs=1e-6)
    assert result["oof_images"] == len(confidence)
    # Kept: the test images at or above the threshold, each with a training identity.
    assert len(kept) == result["kept"] > 0 and (kept["confidence"] >= result["threshold"]).all()
    train_ids = set(pd.read_csv(layout.data_files(load_config(args)).train)["ground_truth"])
    assert set(kept["identity"]) <= train_ids
    assert list(kept["confidence"]) == sorted(kept["confidence"], reverse=True)
    labels = pd.read_csv(layout.data_files(load_config(args)).test_labels)
    truth = dict(zip(labels["filename"], labels["ground_truth"], strict=True))
    right = np.mean([truth[f] == i for f, i in zip(kept["filename"], kept["identity"],
                                                   strict=True)])
    assert result["real"]["kept_precision"] == pytest.approx(right)


def test_pseudo_labels_refuse_what_cannot_be_measured(closed, tmp_path, monkeypatch):
    from jaguar_reid import pseudo, train
    from jaguar_reid.pseudo import PseudoError

    args, _ = closed
    # Whether the tiny model's most confident image is right is chance: the curve that
    # never reaches the precision asked for is forced here.
    monkeypatch.setattr(pseudo, "choose_threshold", lambda curve, level: None)
    with pytest.raises(PseudoError, match="no threshold reaches precision 0.97"):
        _pseudo(args, "pseudo.min_precision=0.97", f"pseudo.file={tmp_path / 'p.csv'}")
    assert not (tmp_path / "p.csv").exists()
    monkeypatch.undo()
    grouped = [*args, "exp=grouped", "folds.strategy=grouped",
               f"folds.file={tmp_path / 'grouped.csv'}"]
    train.main([*grouped, "fold=0", "train.epochs=0"])
    with pytest.raises(PseudoError, match="grouped folds.*folds.strategy=closed"):
        _pseudo(grouped)


def test_a_round_starts_from_the_first_experiment_and_trains_on_the_pseudo_labels(closed):
    from jaguar_reid import train

    args, tmp = closed
    result = _pseudo(args, "pseudo.min_precision=0.01", f"pseudo.file={tmp / 'round1.csv'}")
    round1 = [*args, "exp=round1", "train.init=base", f"data.pseudo={tmp / 'round1.csv'}",
              "train.lr=1e-5", "fold=0"]
    train.main(round1)
    cfg = load_config(round1)
    fold = layout.fold_dir(layout.model_dir(cfg), 0)
    metrics = json.loads((fold / layout.FOLD_METRICS).read_text())
    base = json.loads((layout.fold_dir(layout.model_dir(load_config(args)), 0)
                       / layout.FOLD_METRICS).read_text())
    assert metrics["n_extra"] == result["kept"]
    assert metrics["n_train"] == base["n_train"] + result["kept"]
    # Epoch 0 of the round is the first experiment's finished model, scored again.
    log = pd.read_csv(fold / layout.TRAIN_LOG)
    assert log.loc[0, "map"] == pytest.approx(base["map"], abs=1e-6)
    # Other pseudo-labels are another recipe: the finished fold is not silently reused.
    rows = pd.read_csv(tmp / "round1.csv")
    rows.iloc[:-1].to_csv(tmp / "round1.csv", index=False)
    with pytest.raises(ConfigError, match="different config"):
        train.main(round1)
    rows.assign(identity="Nobody").to_csv(tmp / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv: row 2: identity 'Nobody' is not in"):
        train.main([*round1, "exp=bad", f"data.pseudo={tmp / 'bad.csv'}"])


def test_a_student_learns_the_ensembles_embedding_and_submits_alone(closed, capsys):
    from jaguar_reid import submission, train

    args, tmp = closed
    student = [*args, "exp=student", "train.teacher=base", "train.distill_loss=contr_reg",
               "fold=full", "submit.folds=full", "train.epochs=2"]
    train.main(student)
    out = capsys.readouterr().out
    cached = sorted((layout.cache_root(load_config(args)) / layout.TEACHER_CACHE).glob("*.npz"))
    assert len(cached) == 1 and "teacher embeddings" in out
    with np.load(cached[0]) as data:
        teacher_train, teacher_test = data["train"], data["test"]
    n_test = len(pd.read_csv(layout.data_files(load_config(args)).test_labels))
    assert teacher_test.shape == (n_test, teacher_train.shape[1])
    assert np.allclose(np.linalg.norm(teacher_train, axis=1), 1.0, atol=1e-5)
    fold = layout.fold_dir(layout.model_dir(load_config(student)), layout.FULL)
    metrics = json.loads((fold / layout.FOLD_METRICS).read_text())
    assert metrics["n_extra"] == n_test  # every test image, unlabelled
    saved = load_config([f"config={fold / layout.RUN_CONFIG}"])
    assert saved.model.embed_dim == teacher_train.shape[1] and saved.model.retrieval == "neck"
    log = pd.read_csv(fold / layout.TRAIN_LOG)
    assert log["loss"].iloc[-1] < log["loss"].iloc[1]  # it moves towards the teachers
    # Another student of the same teachers reads the cache instead of embedding again.
    from jaguar_reid.retrieval.teacher import teacher_embeddings

    cfg = load_config([*student, "exp=student2", "train.distill_loss=reg"])
    train_names = pd.read_csv(layout.data_files(cfg).train)["filename"].tolist()
    test_names = pair_image_names(read_test_csv(layout.data_files(cfg).test))
    again = teacher_embeddings(cfg, train_names, test_names, "cpu")
    assert "teacher embeddings" not in capsys.readouterr().out
    assert np.array_equal(again[0], teacher_train)
    result = submission.run(load_config([*student]))
    assert result["rows"] == len(pd.read_csv(layout.data_files(load_config(args)).test))
    with pytest.raises(ConfigError, match="train.sampler"):
        load_config([*student, "train.sampler=pk"])
