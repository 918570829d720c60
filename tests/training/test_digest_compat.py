"""Folds trained by the previous code (training digest version 1, before key roles) keep
skipping and resuming with today's: `Digest.matches` recognises their stored digest through
`Digest.earlier`. The folds are real ones, made by that code (`tests/fixtures/v1_fold/`, see its
README.md and make.py), copied here into a fresh work folder whose paths differ from theirs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from jaguar_reid import layout, train
from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.data.splits import load_or_create_folds
from jaguar_reid.training.checkpoint import load_checkpoint
from jaguar_reid.training.digest import training_digest
from tests.helpers import TINY_ARGS, base_args, exp_path, fold_path, make_data, snapshot

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v1_fold"
# The recipe make.py trained with (after TINY_ARGS; 6 training images per fold of make_data),
# with the defaults of that time that have moved since (a user of the new defaults has another
# recipe: those folds are trained again, rightly).
RECIPE = ("model.backbone=test_efficientnet", "train.batch_size=4", "fold=0",
          "data.resize=squash", "folds.strategy=grouped")
FINISHED = "v1"  # the experiments make.py wrote, as named then
UNFINISHED = ("exp=v1_unfinished", "train.epochs=2")


def v1_args(tmp_path: Path, *extra: str) -> list[str]:
    data = make_data(tmp_path / "data")
    return [*TINY_ARGS, *base_args(data, tmp_path, *RECIPE, *extra)]


def copy_plain(source: Path, dest: Path) -> None:
    """Files' bytes only, no permission bits: the fixtures may be read-only."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def place(kind: str, args: list[str]) -> Path:
    """The previous code's experiment `kind` as this config's experiment, and its folds as this
    config's folds file (as they were where it was trained); returns its fold 0."""
    exp = exp_path(args)
    copy_plain(FIXTURES / kind, exp)
    shutil.copyfile(exp / layout.EXP_FOLDS, layout.folds_path(load_config(args)))
    return fold_path(args)


def stored_digest(fold: Path, name: str) -> str:
    if name == layout.CHECKPOINT:
        return load_checkpoint(fold / name)["training_digest"]
    return json.loads((fold / name).read_text())["training_digest"]


def todays_digest(args: list[str]):
    cfg = train.recipe(load_config(args))
    return training_digest(cfg, load_or_create_folds(cfg))


def log_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- finished fold


@pytest.mark.parametrize("changed", [(), ("local.top_b=5",), ("floor.enabled=true",),
                                     ("local.top_b=5", "floor.enabled=true")],
                         ids=["same", "local", "floor", "local+floor"])
def test_fold_finished_by_previous_code_is_skipped(tmp_path, capsys, changed):
    args = v1_args(tmp_path, f"exp={FINISHED}", *changed)
    fold = place("finished", args)
    before = snapshot(fold)
    train.main(args)
    out = capsys.readouterr().out
    assert f"fold 0: already finished in {fold}; skipping" in out
    assert "epoch 1:" not in out  # nothing trained
    assert snapshot(fold) == before


def test_fold_finished_by_previous_code_with_another_recipe_is_refused(tmp_path):
    args = v1_args(tmp_path, f"exp={FINISHED}", "train.lr=0.5")
    fold = place("finished", args)
    before = snapshot(fold)
    with pytest.raises(ConfigError, match="trained with a different config"):
        train.main(args)
    assert snapshot(fold) == before


def test_previous_digests_are_recognised_by_the_earlier_format_only(tmp_path):
    """The compatibility path is what matches: the stored digests are among `earlier`, never
    today's format (`current`)."""
    args = v1_args(tmp_path, f"exp={FINISHED}")
    fold = place("finished", args)
    stored = stored_digest(fold, layout.FOLD_METRICS)
    digest = todays_digest(args)
    assert stored in digest.earlier
    assert stored != digest.current
    assert digest.matches(stored)
    # Another recipe: neither format matches.
    assert not todays_digest([*args, "train.lr=0.5"]).matches(stored)

    args = v1_args(tmp_path, *UNFINISHED)
    fold = place("unfinished", args)
    stored = stored_digest(fold, layout.CHECKPOINT)
    digest = todays_digest(args)
    assert stored in digest.earlier and stored != digest.current


# --------------------------------------------------------------------------- unfinished fold


def test_checkpoint_of_previous_code_is_resumed(tmp_path, capsys):
    args = v1_args(tmp_path, *UNFINISHED)
    fold = place("unfinished", args)
    first_epochs = log_rows(fold / layout.TRAIN_LOG)
    assert [row["epoch"] for row in first_epochs] == ["0", "1"]
    train.main(args)
    out = capsys.readouterr().out
    assert f"fold 0: resuming after epoch 1 from {fold / layout.CHECKPOINT}" in out
    assert "fold 0 epoch 1:" not in out and "fold 0 epoch 2:" in out
    metrics = json.loads((fold / layout.FOLD_METRICS).read_text())
    assert metrics["epochs_run"] == 2
    # Written in today's format.
    assert metrics["training_digest"] == todays_digest(args).current
    assert not (fold / layout.CHECKPOINT).exists()
    rows = log_rows(fold / layout.TRAIN_LOG)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert rows[:2] == first_epochs  # epoch 0 and 1 are the previous code's

    # Finished now, in today's format: the next run skips it.
    before = snapshot(fold)
    train.main(args)
    assert "already finished" in capsys.readouterr().out
    assert snapshot(fold) == before


def test_checkpoint_of_previous_code_with_another_recipe_is_refused(tmp_path):
    args = v1_args(tmp_path, *UNFINISHED, "train.lr=0.5")
    fold = place("unfinished", args)
    before = snapshot(fold)
    with pytest.raises(ConfigError, match="an unfinished run of a different config"):
        train.main(args)
    assert snapshot(fold) == before
