"""Runs that move: an experiment folder copied to another place (or made read-only, as a
Kaggle dataset is) skips its finished folds, resumes its checkpoint bit-identically and
submits byte-identically; the starting weights are known by their content, not their path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
from safetensors.torch import load_file, save_file

from jaguar_reid import layout, submission, train
from jaguar_reid.config import ConfigError, load_config
from jaguar_reid.manifest import ManifestError
from tests.helpers import set_writable, snapshot

pytestmark = pytest.mark.slow


class Interrupted(Exception):
    pass


def _args(tiny_cfg_args, demo_dir, out: Path, folds: Path, *extra: str) -> list[str]:
    return [*tiny_cfg_args, f"data.dir={demo_dir}", f"output_dir={out}", f"folds.file={folds}",
            "folds.n_folds=4", "exp=moved", *extra]


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert np.array_equal(left[key].numpy(), right[key].numpy()), key


def test_copied_and_read_only_experiment_submits_the_same_bytes(demo_dir, tmp_path,
                                                                tiny_cfg_args, capsys):
    out, folds = tmp_path / "out", tmp_path / "folds.csv"
    args = _args(tiny_cfg_args, demo_dir, out, folds)
    train.main([*args, "fold=0..1"])
    submission.main([*args, "submit.folds=0..1"])
    original = (layout.work_dir(load_config(args)) / layout.SUBMISSION).read_bytes()

    # Another machine: the experiment folder alone, read-only, under another root; the
    # folds file is gone too (the experiment carries its own copy).
    models = tmp_path / "dataset" / "moved"
    shutil.copytree(layout.model_dir(load_config(args)), models)
    folds.unlink()
    set_writable(models.parent, False)
    before = snapshot(models.parent)
    work = tmp_path / "work"
    try:
        moved = [*_args(tiny_cfg_args, demo_dir, work, tmp_path / "nowhere.csv"),
                 f"models={models}", "submit.folds=0..1", "report.enabled=true"]
        # A folder copied by hand carries no manifest: read only when the user says so.
        with pytest.raises(ManifestError, match="no manifest.json.*models_verify=false"):
            submission.main(moved)
        moved.insert(-3, "models_verify=false")
        submission.main(moved)
        assert snapshot(models.parent) == before  # nothing changed, nothing added
    finally:
        set_writable(models.parent, True)
    assert (layout.work_dir(load_config(moved)) / layout.SUBMISSION).read_bytes() == original
    assert (layout.report_dir(load_config(moved)) / "index.html").is_file()
    # A folder holding <exp>/ works the same as the experiment folder itself.
    assert layout.model_dir(load_config([*moved[:-4], f"models={models.parent}"])) == models


def test_copied_folder_skips_finished_folds(demo_dir, tmp_path, tiny_cfg_args, capsys):
    args = _args(tiny_cfg_args, demo_dir, tmp_path / "out", tmp_path / "folds.csv")
    train.main([*args, "fold=0"])
    shutil.copytree(tmp_path / "out", tmp_path / "elsewhere")
    shutil.copyfile(tmp_path / "folds.csv", tmp_path / "folds-copy.csv")
    moved = _args(tiny_cfg_args, demo_dir, tmp_path / "elsewhere", tmp_path / "folds-copy.csv",
                  "data.num_workers=1", "cache.workers=1")
    weights = layout.fold_dir(layout.model_dir(load_config(moved)), 0) / layout.MODEL_WEIGHTS
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    train.main([*moved, "fold=0"])
    assert "already finished" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp


def test_copied_unfinished_fold_resumes_bit_identically(demo_dir, tmp_path, tiny_cfg_args):
    extra = ("fold=0", "train.epochs=3", "train.ema=true", "train.sampler=pk", "train.pk_k=2",
             "train.batch_size=8")
    straight = _args(tiny_cfg_args, demo_dir, tmp_path / "a", tmp_path / "folds.csv", *extra)
    train.main(straight)

    def stop_after_two(fold, epoch):
        if epoch == 2:
            raise Interrupted
    first = _args(tiny_cfg_args, demo_dir, tmp_path / "b", tmp_path / "folds.csv", *extra)
    with pytest.raises(Interrupted):
        train.run(load_config(first), after_epoch=stop_after_two)
    # Carried to another folder (and another folds file path) before it finished.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    shutil.rmtree(tmp_path / "b")
    shutil.copyfile(tmp_path / "folds.csv", tmp_path / "folds-c.csv")
    resumed = _args(tiny_cfg_args, demo_dir, tmp_path / "c", tmp_path / "folds-c.csv", *extra)
    fold = layout.fold_dir(layout.model_dir(load_config(resumed)), 0)
    assert (fold / layout.CHECKPOINT).is_file()
    train.main(resumed)
    assert not (fold / layout.CHECKPOINT).exists()
    _same_weights(layout.fold_dir(layout.model_dir(load_config(straight)), 0)
                  / layout.MODEL_WEIGHTS, fold / layout.MODEL_WEIGHTS)


def _backbone_weights(path: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=0, global_pool="")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_weights_known_by_content_not_path(demo_dir, tmp_path, tiny_cfg_args, capsys):
    weights, elsewhere = tmp_path / "w.safetensors", tmp_path / "other" / "w2.safetensors"
    _backbone_weights(weights, seed=1)
    args = _args(tiny_cfg_args, demo_dir, tmp_path / "out", tmp_path / "folds.csv", "fold=0")
    train.main([*args, f"model.weights={weights}"])

    # The same file at another path: the same recipe, so the finished fold is kept.
    elsewhere.parent.mkdir()
    shutil.copyfile(weights, elsewhere)
    capsys.readouterr()
    train.main([*args, f"model.weights={elsewhere}"])
    assert "already finished" in capsys.readouterr().out

    # Other weights under the same path (new content, new modification time): refused.
    _backbone_weights(weights, seed=2)
    os.utime(weights, ns=(1, 1))
    with pytest.raises(ConfigError, match="different config"):
        train.main([*args, f"model.weights={weights}"])
